"""Margin heads: normalised class centres and insightface's combined margin s*(cos(m1*theta+m2)-m3)."""
from __future__ import annotations

import math
import random
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from faceid_keras import compat

MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
}


def resolve_margin(margin: str | tuple | list) -> tuple[float, float, float]:
    """Turns a preset name or an (m1, m2, m3) triple into three validated floats."""
    if isinstance(margin, str):
        if margin not in MARGIN_PRESETS:
            raise ValueError(
                f"Unknown margin preset {margin!r}; valid presets are {sorted(MARGIN_PRESETS)} "
                "or a tuple (m1, m2, m3)."
            )
        return MARGIN_PRESETS[margin]
    if not isinstance(margin, (tuple, list)) or len(margin) != 3:
        raise ValueError(
            f"margin must be one of {sorted(MARGIN_PRESETS)} or a tuple (m1, m2, m3), got {margin!r}."
        )
    try:
        m1, m2, m3 = (float(m) for m in margin)
    except (TypeError, ValueError) as error:
        raise ValueError(f"margin values must be numbers, got {margin!r}.") from error
    if not all(math.isfinite(m) for m in (m1, m2, m3)):
        raise ValueError(f"margin values must be finite, got {margin!r}.")
    if m1 <= 0:
        raise ValueError(f"margin m1 (angle multiplier) must be > 0, got {m1}.")
    if not 0 <= m2 < math.pi:
        raise ValueError(f"margin m2 (additive angle) must be in [0, pi), got {m2}.")
    if m3 < 0:
        raise ValueError(f"margin m3 (cosine subtraction) must be >= 0, got {m3}.")
    return m1, m2, m3


class ShardedLoss(NamedTuple):
    """One replica's part of the distributed cross-entropy of `MarginHead.sharded_cross_entropy`."""

    loss: tf.Tensor  # (global batch,) cross-entropy of every example of the global batch
    local_loss: tf.Tensor  # (batch,) the entries of `loss` for this replica's own examples
    hits: tf.Tensor  # (batch,) 1.0 where the plain-cosine argmax over all classes is the label
    rows: tf.Tensor  # the rows of the local shard the step used (all, or the sampled ones)


@keras.saving.register_keras_serializable(package="faceid")
class MarginHead(keras.layers.Layer):
    """Class centres W (num_classes x dim) and scaled margin logits for ArcFace-style training.

    `head(embeddings)` gives s * cos(theta); `head(embeddings, labels)` puts
    s * (cos(m1 * theta + m2) - m3) on each example's target class. Centres, cosines and logits
    are always float32, whatever the global dtype policy, so softmax cross-entropy stays exact.

    Where m1 * theta + m2 passes pi the margin logit would rise again with theta. Beyond that
    switch point theta_t = (pi - m2) / m1 the target logit becomes cos(theta) - m3 - c with
    c = max(m2 * sin(m2), 1 + cos(theta_t)): insightface's ArcFace fallback
    cos(theta) - sin(pi - m2) * m2, or the larger penalty that keeps the logit non-increasing
    in theta for other (m1, m2). Margins with m1 * pi + m2 <= pi never switch.

    Labels outside [0, num_classes) (e.g. -1) get no margin, so the margin can be applied to
    the cosines of any subset of centres via `margin_logits`.

    Partial FC (An et al., CVPR 2022): with `sample_rate` < 1, training uses `sample(labels, step)`
    to pick max(int(sample_rate * num_classes), unique labels) centres each step (every class of
    the batch plus random others) and computes the margin logits against those rows only, so the
    head's compute and activations scale with the sample. Under tf.distribute the labels of all
    replicas are gathered and the draw is a function of (`seed`, step) only, so every replica and
    every worker picks the same centres. `call` (inference) always uses all centres. The sample
    has a data-dependent size, which XLA cannot compile, so a sampling head sets
    `supports_jit = False` (Keras then compiles `fit` without XLA).

    Model-parallel centres (`shard_centres=True`, Keras 3, as insightface's partial_fc_v2): with
    R replicas in sync when the head is built, replica r holds rows [r*S, (r+1)*S) of the centres,
    S = ceil(num_classes / R) (the last shard padded with zero rows that never act as classes),
    and their SGD momentum, so each replica stores ~num_classes * dim / R of each. Training gathers
    the embeddings and labels of all replicas, takes the cosines of the global batch against the
    local shard and a distributed softmax cross-entropy (`sharded_cross_entropy`), and each
    replica updates its own shard (`apply_shard_gradient`). With `sample_rate` < 1 each shard
    samples within itself: its positive classes plus random others, drawn from (`seed`, step,
    replica). See `_build_shards` for the kind of variable and why. `save`/`save_weights` store
    the whole (num_classes, dim) centres and momentum, so a file loads on any number of replicas;
    `get_weights` sees replica 0's shard only (`gather_shards`/`assign_shards` give or set the
    whole matrix).
    """

    def __init__(
        self,
        num_classes: int,
        margin: str | tuple = "arcface",
        scale: float = 64.0,
        epsilon: float = 1e-6,
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_centres: bool = False,
        **kwargs,
    ):
        dtype = kwargs.pop("dtype", None)
        if dtype is not None and compat.dtype_policy_name(dtype) != "float32":
            raise ValueError(
                f"MarginHead always computes in float32; got dtype {compat.dtype_policy_name(dtype)!r}."
            )
        super().__init__(dtype="float32", **kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
        if not 0 < epsilon < 0.1:
            raise ValueError(f"epsilon must be in (0, 0.1), got {epsilon!r}.")
        numeric = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
        if not (numeric and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if not isinstance(shard_centres, bool):
            raise ValueError(f"shard_centres must be True or False, got {shard_centres!r}.")
        if shard_centres and not compat.KERAS_3:
            raise NotImplementedError(
                "shard_centres=True needs Keras 3 with tf.distribute; on Keras 2 (the Ascend NPU stack, "
                "which has no tf.distribute strategy) keep shard_centres=False."
            )
        self.num_classes = num_classes
        self.margin = margin if isinstance(margin, str) else tuple(float(m) for m in margin)
        self.m1, self.m2, self.m3 = resolve_margin(margin)
        self.scale = float(scale)
        self.epsilon = float(epsilon)
        self.sample_rate = float(sample_rate)
        self.num_sample = min(num_classes, int(self.sample_rate * num_classes))
        self.seed = seed
        self.shard_centres = shard_centres
        self.num_shards = 1
        self.shard_size = num_classes
        # A sharded step (all-gathers, sync-on-read shards) runs without XLA.
        self.supports_jit = not (self.sampling or shard_centres)
        theta_switch = (math.pi - self.m2) / self.m1
        self._switch_theta = theta_switch if theta_switch < math.pi else None
        if self._switch_theta is not None:
            self._switch_cos = math.cos(theta_switch)
            self._fallback_penalty = max(self.m2 * math.sin(self.m2), 1.0 + self._switch_cos)

    def build(self, input_shape):
        if self.shard_centres:
            self._build_shards(int(input_shape[-1]))
        else:
            self.centres = self.add_weight(
                name="centres",
                shape=(self.num_classes, int(input_shape[-1])),
                initializer=keras.initializers.RandomNormal(stddev=0.01),
                dtype="float32",
            )
        super().build(input_shape)

    def _build_shards(self, dim: int) -> None:
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

    def check_optimizer(self, optimizer):
        """The SGD that steps the shards: `optimizer`, or the one its loss scaling wraps.

        Raises ValueError for any other optimizer, or SGD with clipping, EMA, gradient accumulation
        or a loss scale factor, which the shards' own update would not follow.
        """
        inner = optimizer.inner_optimizer if compat.is_loss_scale_optimizer(optimizer) else optimizer
        if not isinstance(inner, keras.optimizers.SGD):
            raise ValueError(
                "shard_centres=True steps each replica's class centres with SGD (momentum) itself: "
                f"compile the model with keras.optimizers.SGD (loss scaling allowed), not {type(inner).__name__}."
            )
        options = ("clipnorm", "clipvalue", "global_clipnorm", "use_ema", "gradient_accumulation_steps",
                   "loss_scale_factor")
        used = [name for name in options if getattr(inner, name, None)]
        if used:
            raise ValueError(
                f"shard_centres=True steps the centres with plain SGD (momentum, nesterov, weight_decay); "
                f"the optimizer sets {', '.join(used)}, which the centres' update does not follow."
            )
        return inner

    def apply_shard_gradient(self, gradient, optimizer, finite=None) -> None:
        """Steps this replica's shard as keras.optimizers.SGD steps a variable (replica context).

        `gradient` is of the loss `optimizer` scaled (unscaled here by its current scale); the
        learning rate is the optimizer's current one (its schedule at `iterations`), so call this
        before the optimizer applies the step. Decoupled weight decay (SGD's `weight_decay`)
        first, then m = momentum * m - lr * g and w += m (nesterov: w += momentum * m - lr * g);
        with a constant learning rate this is torch SGD's step (insightface's partial_fc_v2).
        Nothing changes where `finite` is False (a skipped loss-scaled step).
        """
        inner = self.check_optimizer(optimizer)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.math.unsorted_segment_sum(gradient.values, gradient.indices, self.shard_size)
        if inner is not optimizer:  # the scale `scale_loss` used; built with the optimizer's first step
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            gradient = gradient / tf.cast(scale, "float32")
        learning_rate = tf.cast(optimizer.learning_rate, "float32")
        centres = compat.variable_tensor(self.centres)
        velocity = compat.variable_tensor(self.momentum)

        def update():
            if inner.weight_decay is not None and inner._use_weight_decay(self.centres):
                centres.assign_sub(centres * tf.cast(inner.weight_decay, "float32") * learning_rate)
            if inner.momentum != 0:
                momentum = tf.cast(inner.momentum, "float32")
                velocity.assign(velocity * momentum - gradient * learning_rate)
                if inner.nesterov:
                    centres.assign_add(velocity * momentum - gradient * learning_rate)
                else:
                    centres.assign_add(velocity)
            else:
                centres.assign_sub(gradient * learning_rate)

        if finite is None:
            update()
        else:
            tf.cond(finite, update, lambda: None)

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

    @property
    def sampling(self) -> bool:
        """Whether training samples the centres (Partial FC), i.e. sample_rate < 1."""
        return self.sample_rate < 1.0

    def sample(self, labels, step):
        """Partial FC draw: (sorted indices of the sampled centres, labels as positions in them).

        The sample holds every class among the labels of all replicas plus random other classes,
        max(int(sample_rate * num_classes), number of distinct labels) in all; `step` (an integer
        scalar, e.g. the optimizer's iteration count) and `seed` fix the draw. Labels must lie in
        [0, num_classes).
        """
        labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
        all_labels = labels
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            all_labels = context.all_gather(labels, axis=0)
        positive = tf.scatter_nd(
            all_labels[:, None], tf.ones_like(all_labels), (self.num_classes,)
        ) > 0
        size = tf.maximum(self.num_sample, tf.reduce_sum(tf.cast(positive, "int32")))
        seed = tf.stack([tf.constant(self.seed, "int64"), tf.cast(step, "int64")])
        scores = tf.random.stateless_uniform((self.num_classes,), seed=seed)
        scores = tf.where(positive, 2.0, scores)
        index = tf.sort(tf.math.top_k(scores, k=size, sorted=False).indices)
        return index, tf.searchsorted(index, labels)

    def cosine(self, embeddings, centres=None):
        """cos(theta) between L2-normalised embeddings and centres (all centres by default)."""
        centres = self.centres if centres is None else centres
        embeddings = tf.math.l2_normalize(tf.cast(embeddings, "float32"), axis=-1, epsilon=1e-12)
        centres = tf.math.l2_normalize(tf.cast(centres, "float32"), axis=-1, epsilon=1e-12)
        cosine = tf.matmul(embeddings, centres, transpose_b=True)
        return tf.clip_by_value(cosine, -1.0 + self.epsilon, 1.0 - self.epsilon)

    def target_logit(self, cosine):
        """Unscaled margin logit cos(m1*theta + m2) - m3 (with the monotonic fallback)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cosine - self.m3
        theta = tf.acos(cosine)
        margin_form = tf.cos(self.m1 * theta + self.m2) - self.m3
        if self._switch_theta is None:
            return margin_form
        fallback = cosine - self.m3 - self._fallback_penalty
        return tf.where(cosine > self._switch_cos, margin_form, fallback)

    def margin_logits(self, cosine, labels):
        """Scaled logits from clipped cosines (batch x classes): margin on each label's column."""
        labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
        one_hot = tf.one_hot(labels, tf.shape(cosine)[-1], dtype="float32")
        target_cosine = tf.clip_by_value(
            tf.reduce_sum(cosine * one_hot, axis=-1, keepdims=True), -1.0 + self.epsilon, 1.0 - self.epsilon
        )
        logits = tf.where(one_hot > 0, self.target_logit(target_cosine), cosine)
        return logits * self.scale

    def call(self, embeddings, labels=None):
        if self.shard_centres and self.num_shards > 1:
            cosine = self._sharded_cosine(embeddings)
        else:
            cosine = self.cosine(embeddings)
        if labels is None:
            return cosine * self.scale
        return self.margin_logits(cosine, labels)

    def compute_output_shape(self, input_shape, labels_shape=None):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def save_own_variables(self, store):
        """Sharded centres are saved whole, in class order: "0" the (num_classes, dim) centres,
        "1" their momentum, whatever the number of replicas (a collective op under several workers)."""
        if not self.shard_centres:
            super().save_own_variables(store)
            return
        store["0"] = self.gather_shards(self.centres)
        store["1"] = self.gather_shards(self.momentum)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` saved, split into this head's shards."""
        if not self.shard_centres:
            super().load_own_variables(store)
            return
        keys = sorted(store.keys())
        if keys != ["0", "1"]:
            raise ValueError(
                f"Layer {self.name!r} (shard_centres=True) loads centres and their momentum (entries "
                f"'0' and '1'), but the saved entries are {keys}: the file was saved by a head with "
                "shard_centres=False."
            )
        self.assign_shards(self.centres, store["0"], "0")
        self.assign_shards(self.momentum, store["1"], "1")

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            margin=self.margin,
            scale=self.scale,
            epsilon=self.epsilon,
            sample_rate=self.sample_rate,
            seed=self.seed,
            shard_centres=self.shard_centres,
        )
        return config
