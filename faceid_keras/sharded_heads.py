"""Model-parallel class centres: one shard of the margin head per replica (insightface's partial_fc_v2)."""
from __future__ import annotations

import math
import random
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from faceid_keras import compat
from faceid_keras.heads import HeadLoss, MarginHead
from faceid_keras.shard_sgd import ShardSGD, all_finite, poison


class ShardedLoss(NamedTuple):
    """One replica's part of the distributed cross-entropy of `ShardedMarginHead.sharded_cross_entropy`."""

    loss: tf.Tensor  # (global batch,) cross-entropy of every example of the global batch
    local_loss: tf.Tensor  # (batch,) the entries of `loss` for this replica's own examples
    hits: tf.Tensor  # (batch,) 1.0 where the plain-cosine argmax over all classes is the label
    rows: tf.Tensor  # the rows of the local shard the step used (all, or the sampled ones)


@keras.saving.register_keras_serializable(package="faceid")
class ShardedMarginHead(MarginHead):
    """`MarginHead(shard_centres=True)`: model-parallel centres (Keras 3), as insightface's partial_fc_v2.

    With R replicas in sync when the head is built, replica r holds rows [r*S, (r+1)*S) of the
    centres, S = ceil(num_classes / R) (the last shard padded with zero rows that never act as
    classes), and their SGD momentum, so each replica stores ~num_classes * dim / R of each.
    Training gathers the embeddings and labels of all replicas, takes the cosines of the global
    batch against the local shard and a distributed softmax cross-entropy
    (`sharded_cross_entropy`), and each replica updates its own shard with a `ShardSGD` that
    follows the compiled optimizer. With `sample_rate` < 1 each shard samples within itself: its
    positive classes plus random others, drawn from (`seed`, step, replica). See `build` for the
    kind of variable and why. `save`/`save_weights` store the whole (num_classes, dim) centres
    and momentum, so a file loads on any number of replicas; `get_weights` sees replica 0's
    shard only (`gather_shards`/`assign_shards` give or set the whole matrix).
    """

    centres_replicated = False  # each replica holds and steps its own shard

    def __init__(self, num_classes: int, *args, shard_centres: bool = True, **kwargs):
        if shard_centres is not True:
            raise ValueError(f"ShardedMarginHead always shards its centres; got shard_centres={shard_centres!r}.")
        super().__init__(num_classes, *args, shard_centres=True, **kwargs)
        self.num_shards = 1
        self.shard_size = num_classes
        self.supports_jit = False  # a sharded step (all-gathers, sync-on-read shards) runs without XLA
        self._shard_sgd = None

    def build(self, input_shape):
        """Creates this replica's shard of the centres and of their SGD momentum, (S, dim) each.

        Both are tf.distribute sync-on-read variables (`synchronization="on_read"`): the one kind
        of distributed variable, under MirroredStrategy and MultiWorkerMirroredStrategy alike,
        whose per-replica components may differ, each read and assigned by its own replica in
        replica context with no collective op (mirrored variables are kept equal by the strategy).
        They cannot be trainable, so the compiled optimizer, which sums the gradients of its
        variables over the replicas, never sees them; the head steps them itself. Aggregation
        "only_first_replica" makes a cross-replica read (e.g. `get_weights`) give replica 0's
        shard without a collective op, so it cannot hang under several workers; the whole matrix
        comes from `gather_shards`. Strategies copy replica 0's initial value to every replica,
        so each shard is then drawn again from (a seed, its replica id): the full matrix has
        i.i.d. N(0, 0.01^2) entries, as the unsharded RandomNormal(stddev=0.01) initialisation.
        """
        dim = int(input_shape[-1])
        strategy = tf.distribute.get_strategy()
        self._strategy = strategy
        self.num_shards = strategy.num_replicas_in_sync
        self.shard_size = -(-self.num_classes // self.num_shards)

        def shard_variable(name):
            return keras.Variable(
                initializer="zeros",
                shape=(self.shard_size, dim),
                dtype="float32",
                trainable=False,
                autocast=False,
                synchronization="on_read",
                aggregation="only_first_replica",
                name=name,
            )

        with keras.name_scope(self.name, caller=self):
            self.centres = shard_variable("centres")
            self.momentum = shard_variable("centres_momentum")
        seed = random.randint(1, 10**9)  # Python's generator, which seeds Keras's initializers too

        def draw(context):
            replica = context.replica_id_in_sync_group
            values = tf.random.stateless_normal((self.shard_size, dim), seed=[seed, replica], stddev=0.01)
            rows = replica * self.shard_size + tf.range(self.shard_size)
            return tf.where((rows < self.num_classes)[:, None], values, 0.0)

        with tf.init_scope():
            self._assign_per_replica(self.centres, strategy.experimental_distribute_values_from_function(draw))
        keras.layers.Layer.build(self, input_shape)

    def _assign_per_replica(self, variable, values) -> None:
        """Assigns each replica's component of a shard variable its own value of `values`."""

        @tf.function
        def assign(values):
            self._strategy.run(lambda value: compat.variable_tensor(variable).assign(value), args=(values,))

        assign(values)

    def gather_shards(self, variable) -> np.ndarray:
        """The whole (num_classes, dim) matrix of a shard variable (centres or momentum), in class order.

        Under several workers this is a collective op: every worker must call it.
        """

        @tf.function
        def gather():
            local = self._strategy.run(lambda: tf.identity(compat.variable_tensor(variable)))
            return self._strategy.gather(local, axis=0)

        return compat.to_numpy(gather())[: self.num_classes]

    def assign_shards(self, variable, value, key: str = "value") -> None:
        """Splits a whole (num_classes, dim) matrix into the shards of `variable` (centres or momentum)."""
        value = np.asarray(value, dtype="float32")
        expected = (self.num_classes, int(variable.shape[-1]))
        if value.shape != expected:
            raise ValueError(
                f"Layer {self.name!r}: entry {key!r} has shape {value.shape}, expected {expected} "
                "(num_classes x embedding size)."
            )
        size = self.shard_size
        padded = np.zeros((self.num_shards * size, expected[1]), "float32")
        padded[: self.num_classes] = value

        def shard(context):
            first = context.replica_id_in_sync_group * size
            return padded[first : first + size]

        self._assign_per_replica(variable, self._strategy.experimental_distribute_values_from_function(shard))

    def read_shard(self):
        """This replica's shard of the centres (S, dim) as a tensor (in a replica context)."""
        return tf.identity(compat.variable_tensor(self.centres))

    def _replica(self):
        """The replica context of the running step and its replica id, after checking the replica count."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas != self.num_shards:
            raise ValueError(
                f"Layer {self.name!r} holds its centres in {self.num_shards} shard(s) but runs on "
                f"{replicas} replica(s): build or load the model under the strategy it trains with."
            )
        context = tf.distribute.get_replica_context()
        return context, tf.cast(context.replica_id_in_sync_group, "int32")

    def _all_gather(self, context, value):
        return value if self.num_shards == 1 else context.all_gather(value, axis=0)

    def _all_sum(self, context, value):
        return value if self.num_shards == 1 else context.all_reduce(tf.distribute.ReduceOp.SUM, value)

    def _all_max(self, context, value):
        """Element-wise maximum over replicas, without gradient (all-reduce has no MAX: all-gather)."""
        value = tf.stop_gradient(value)
        return value if self.num_shards == 1 else tf.reduce_max(context.all_gather(value[None], axis=0), axis=0)

    def _sample_shard(self, local, owned, valid, step, replica):
        """Sorted rows of the local shard to train this step: its positives plus random valid others.

        max(int(sample_rate * valid rows), positives in the shard, 1) rows, drawn from
        (`seed`, `step`, `replica`); padding rows come only when a shard has no valid row left.
        """
        size = self.shard_size
        positive = tf.scatter_nd(
            tf.boolean_mask(local, owned)[:, None], tf.ones_like(tf.boolean_mask(local, owned)), (size,)
        ) > 0
        wanted = tf.cast(tf.floor(self.sample_rate * tf.cast(valid, "float64")), "int32")
        count = tf.maximum(tf.maximum(wanted, tf.reduce_sum(tf.cast(positive, "int32"))), 1)
        seed = tf.stack([tf.constant(self.seed, "int64"), tf.cast(step, "int64")])
        seed = tf.random.experimental.stateless_fold_in(seed, replica)
        scores = tf.random.stateless_uniform((size,), seed=seed)
        scores = tf.where(positive, 2.0, tf.where(tf.range(size) < valid, scores, -1.0))
        return tf.sort(tf.math.top_k(scores, k=tf.minimum(count, size), sorted=False).indices)

    def sharded_cross_entropy(self, embeddings, labels, shard, step=None) -> ShardedLoss:
        """Margin softmax cross-entropy of the global batch against sharded centres (replica context).

        Gathers the embeddings and labels of all replicas, takes their cosines against `shard`
        (this replica's centres from `read_shard`, watched by the caller's tape), puts the margin
        on the target column where the label lies in this shard, and combines the shards: the
        maximum over replicas of the row maxima, the sum of the exponentials, the target logit
        from its owner. The gradient of sum(loss) / global batch is exact: each replica gets
        (softmax - one-hot) / global batch on its own columns, so its shard's gradient is the
        full one, and the all-gather's gradient (all-reduce sum, then slice) gives each replica's
        embeddings the sum over shards. With `step` and sample_rate < 1 each shard uses only the
        rows `_sample_shard` draws.
        """
        context, replica = self._replica()
        labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
        batch = tf.shape(labels)[0]
        all_embeddings = self._all_gather(context, tf.cast(embeddings, "float32"))
        all_labels = self._all_gather(context, labels)
        offset = tf.reduce_sum(self._all_gather(context, batch[None])[:replica])
        first = replica * self.shard_size
        valid = tf.clip_by_value(self.num_classes - first, 0, self.shard_size)
        local = all_labels - first
        owned = (local >= 0) & (local < valid)
        if step is not None and self.sampling:
            index = self._sample_shard(local, owned, valid, step, replica)
            rows = tf.gather(shard, index)
            targets = tf.where(owned, tf.searchsorted(index, tf.where(owned, local, 0)), -1)
        else:
            index = tf.range(self.shard_size)
            rows = shard
            targets = tf.where(owned, local, -1)
        column_valid = index < valid
        cosine = self.cosine(all_embeddings, rows)
        logits = tf.where(column_valid, self.margin_logits(cosine, targets), -math.inf)
        loss = self._distributed_cross_entropy(context, logits, targets)
        prediction = self._distributed_argmax(context, tf.where(column_valid, cosine, -math.inf), first + index)
        hits = tf.cast(tf.equal(prediction, all_labels), "float32")
        return ShardedLoss(loss, loss[offset : offset + batch], hits[offset : offset + batch], rows)

    def _distributed_cross_entropy(self, context, logits, targets):
        """Per-example softmax cross-entropy over the columns of all shards; targets -1 lie elsewhere."""
        one_hot = tf.one_hot(targets, tf.shape(logits)[-1], dtype="float32")

        @tf.custom_gradient
        def cross_entropy(logits):
            row_max = self._all_max(context, tf.reduce_max(logits, axis=-1))
            shifted = logits - row_max[:, None]
            exp = tf.exp(shifted)
            sum_exp = self._all_sum(context, tf.reduce_sum(exp, axis=-1))
            target = self._all_sum(context, tf.reduce_sum(tf.where(one_hot > 0, shifted, 0.0), axis=-1))

            def gradient(upstream):
                return (exp / sum_exp[:, None] - one_hot) * upstream[:, None]

            return tf.math.log(sum_exp) - target, gradient

        return cross_entropy(logits)

    def _distributed_argmax(self, context, cosine, classes):
        """The class of the largest cosine over all shards (the first one on ties, like argmax)."""
        best = tf.reduce_max(cosine, axis=-1)
        choice = tf.gather(classes, tf.argmax(cosine, axis=-1, output_type=tf.int32))
        if self.num_shards == 1:
            return choice
        bests = context.all_gather(best[None], axis=0)
        choices = context.all_gather(choice[None], axis=0)
        winner = tf.argmax(bests, axis=0, output_type=tf.int32)
        return tf.gather(tf.transpose(choices), winner[:, None], batch_dims=1)[:, 0]

    def _sharded_cosine(self, embeddings):
        """cos(theta) against all classes with sharded centres: in a replica context of the head's
        strategy for that replica's embeddings, else for `embeddings` on every replica, gathered."""
        context = tf.distribute.get_replica_context()
        if context is not None and context.strategy is self._strategy:
            context, replica = self._replica()
            embeddings = tf.cast(embeddings, "float32")
            batch = tf.shape(embeddings)[0]
            offset = tf.reduce_sum(context.all_gather(batch[None], axis=0)[:replica])
            cosine = self.cosine(context.all_gather(embeddings, axis=0), self.read_shard())
            return context.all_gather(cosine, axis=1)[offset : offset + batch, : self.num_classes]
        local = self._strategy.run(lambda e: self.cosine(e, self.read_shard()), args=(embeddings,))
        return self._strategy.gather(local, axis=1)[:, : self.num_classes]

    def call(self, embeddings, labels=None):
        if self.num_shards == 1:
            return super().call(embeddings, labels)
        cosine = self._sharded_cosine(embeddings)
        if labels is None:
            return cosine * self.scale
        return self.margin_logits(cosine, labels)

    def accuracy_metric(self) -> keras.metrics.Metric:
        """No replica holds every class's cosine: the accuracy is the mean of the head's hits."""
        return keras.metrics.Mean(name="accuracy")

    def read_stepped_centres(self) -> list:
        """This replica's shard, read once for the step's tape to watch."""
        return [self.read_shard()]

    def loss(self, embeddings, labels, step=None, stepped_centres=()) -> HeadLoss:
        """The distributed cross-entropy (see `sharded_cross_entropy`) against `stepped_centres`
        (the watched shard of `read_stepped_centres`, read here when not given)."""
        shard = stepped_centres[0] if stepped_centres else self.read_shard()
        result = self.sharded_cross_entropy(embeddings, labels, shard, step)
        return HeadLoss(result.local_loss, (result.hits,), result.rows, result.loss)

    def shard_optimizer(self, optimizer) -> ShardSGD:
        """The `ShardSGD` that follows `optimizer`, built and validated once per optimizer."""
        if self._shard_sgd is None or self._shard_sgd.optimizer is not optimizer:
            self._shard_sgd = ShardSGD(optimizer, self.centres, self.momentum, self.shard_size)
        return self._shard_sgd

    def apply_gradients(self, optimizer, gradients, variables, stepped_gradients=()) -> None:
        """Steps the shard, then the optimizer's variables. Under loss scaling a step with a
        non-finite gradient on any replica (the shards' included) is skipped everywhere: every
        replica then hands the optimizer non-finite gradients and leaves its shard alone."""
        shard_sgd = self.shard_optimizer(optimizer)
        (shard_gradient,) = stepped_gradients
        finite = None
        if shard_sgd.loss_scaled:
            finite = all_finite(list(gradients) + [shard_gradient])
            gradients = [poison(g, finite) for g in gradients]
        shard_sgd.apply(shard_gradient, finite)
        compat.apply_gradients(optimizer, gradients, variables)

    def save_own_variables(self, store):
        """Sharded centres are saved whole, in class order: "0" the (num_classes, dim) centres,
        "1" their momentum, whatever the number of replicas (a collective op under several workers)."""
        store["0"] = self.gather_shards(self.centres)
        store["1"] = self.gather_shards(self.momentum)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` saved, split into this head's shards."""
        keys = sorted(store.keys())
        if keys != ["0", "1"]:
            raise ValueError(
                f"Layer {self.name!r} (shard_centres=True) loads centres and their momentum (entries "
                f"'0' and '1'), but the saved entries are {keys}: the file was saved by a head with "
                "shard_centres=False."
            )
        self.assign_shards(self.centres, store["0"], "0")
        self.assign_shards(self.momentum, store["1"], "1")

