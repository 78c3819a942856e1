"""The margin head: normalised class centres, margin logits, and Partial FC sampling of the centres."""
from __future__ import annotations

import math
from typing import NamedTuple

import keras
import tensorflow as tf

from faceid_keras import compat, margins


class NormStatistics(NamedTuple):
    """AdaFace's inputs besides the cosines: clipped gradient-free norms and the running statistics."""

    norms: tf.Tensor  # (batch,) embedding norms clipped to [0.001, 100]
    mean: tf.Tensor  # running mean of the norms (after this step's update in training)
    std: tf.Tensor  # running (unbiased) standard deviation of the norms


class HeadLoss(NamedTuple):
    """What a head's training loss gives the model for one replica's batch."""

    cross_entropy: tf.Tensor  # (batch,) softmax cross-entropy of this replica's examples
    accuracy: tuple  # the arguments of the head's `accuracy_metric().update_state`
    decay_rows: tf.Tensor | None  # centre rows used this step, weight-decayed in place of the centres
    global_cross_entropy: tf.Tensor | None = None  # (global batch,) when the gradient of its mean is
    # this replica's exact part (sharded centres); None: differentiate the replica's share of the mean


@keras.saving.register_keras_serializable(package="faceid")
class MarginHead(keras.layers.Layer):
    """Class centres W (num_classes x dim) and scaled margin logits for ArcFace-style training.

    `head(embeddings)` gives s * cos(theta); `head(embeddings, labels)` puts the margin on each
    example's target class: s * (cos(m1 * theta + m2) - m3) for a preset or triple (see
    `margins.CombinedMargin`, which also describes the fallback past theta + m2 > pi). Centres,
    cosines and logits are always float32, whatever the global dtype policy, so softmax
    cross-entropy stays exact. Labels outside [0, num_classes) (e.g. -1) get no margin, so the
    margin can be applied to the cosines of any subset of centres via `margin_logits`.

    Partial FC (An et al., CVPR 2022): with `sample_rate` < 1, training uses `sample(labels, step)`
    to pick max(int(sample_rate * num_classes), unique labels) centres each step (every class of
    the batch plus random others) and computes the margin logits against those rows only, so the
    head's compute and activations scale with the sample. Under tf.distribute the labels of all
    replicas are gathered and the draw is a function of (`seed`, step) only, so every replica and
    every worker picks the same centres. `call` (inference) always uses all centres. The sample
    has a data-dependent size, which XLA cannot compile, so a sampling head sets
    `supports_jit = False` (Keras then compiles `fit` without XLA).

    `margin="adaface"` (see `margins.AdaFaceMargin`) makes the head keep the running mean and
    std of the embedding norms (`batch_mean`, `batch_std`, starting at 20 and 100) as model state:
    a training-mode call (`loss` with a step, or `head(e, labels, training=True)`) first updates
    them from the clipped norms of the global batch (all replicas), mean <- t_alpha * batch mean
    + (1 - t_alpha) * mean and std likewise with the unbiased batch std (a batch of one keeps
    the std), then applies the margin with the updated values; evaluation only reads them. The
    head must then receive raw (unnormalised) embeddings. `margin="arcface_torch"` is
    `margins.ArcFaceTorchMargin`.

    Sub-center ArcFace (Deng et al., ECCV 2020): `subcenters=K` keeps K centres per class (rows
    c*K .. c*K+K-1 of `centres`) and a class's cosine is the largest over its sub-centres, with
    every margin and with Partial FC (which samples whole classes). Inter-class filtering
    (insightface's `interclass_filtering_threshold`): in margin logits (labels given), every non-target
    cosine above the threshold is set to 0 without gradient, and every cosine above it of a row
    whose label is not among the columns (-1). 0 turns it off.

    `shard_centres=True` (Keras 3) constructs a `ShardedMarginHead` (faceid_keras.sharded_heads):
    model-parallel centres, one shard per replica, as insightface's partial_fc_v2. It takes the
    combined margins and arcface_torch with one centre per class and no filtering.
    """

    centres_replicated = True  # every replica holds all centres (their gradient is summed over replicas)

    def __new__(cls, *args, **kwargs):
        shard_centres = kwargs.get("shard_centres", args[6] if len(args) > 6 else False)
        if cls is MarginHead and shard_centres is True:
            if not compat.KERAS_3:
                raise NotImplementedError(
                    "shard_centres=True needs Keras 3 with tf.distribute; on Keras 2 (the Ascend NPU stack, "
                    "which has no tf.distribute strategy) keep shard_centres=False."
                )
            from faceid_keras.sharded_heads import ShardedMarginHead

            cls = ShardedMarginHead
        return super().__new__(cls, *args, **kwargs)

    def __init__(
        self,
        num_classes: int,
        margin: str | tuple = "arcface",
        scale: float = 64.0,
        epsilon: float = 1e-6,
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_centres: bool = False,
        subcenters: int = 1,
        interclass_filtering_threshold: float = 0.0,
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
        if isinstance(subcenters, bool) or not isinstance(subcenters, int) or subcenters < 1:
            raise ValueError(f"subcenters must be a positive integer, got {subcenters!r}.")
        threshold = interclass_filtering_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"interclass_filtering_threshold must be a number in [0, 1), got {threshold!r}.")
        if shard_centres and (margin == "adaface" or subcenters > 1 or threshold > 0):
            raise ValueError(
                "shard_centres=True takes one centre per class, no inter-class filtering and a margin "
                "without norm statistics: its distributed cross-entropy and argmax hold one column per "
                "class on one shard, and AdaFace's norms would need their own all-gather. Train "
                "margin='adaface', subcenters > 1 or interclass_filtering_threshold > 0 with "
                "shard_centres=False (sample_rate < 1 keeps the head small)."
            )
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.interclass_filtering_threshold = float(threshold)
        self.margin = margin if isinstance(margin, str) else tuple(float(m) for m in margin)
        self.scale = float(scale)
        self.epsilon = float(epsilon)
        self.margin_formula = margins.build(margin, self.scale, self.epsilon)
        self.sample_rate = float(sample_rate)
        self.num_sample = min(num_classes, int(self.sample_rate * num_classes))
        self.seed = seed
        self.shard_centres = shard_centres
        self.supports_jit = not self.sampling

    @property
    def m1(self) -> float:
        return self.margin_formula.m1

    @property
    def m2(self) -> float:
        return self.margin_formula.m2

    @property
    def m3(self) -> float:
        return self.margin_formula.m3

    def build(self, input_shape):
        self.centres = self.add_weight(
            name="centres",
            shape=(self.num_classes * self.subcenters, int(input_shape[-1])),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype="float32",
        )
        if self.margin_formula.uses_norms:
            self.batch_mean, self.batch_std = (
                self.add_weight(name=name, shape=(), initializer=keras.initializers.Constant(value),
                                dtype="float32", trainable=False, aggregation=compat.ONLY_FIRST_REPLICA)
                for name, value in (("batch_mean", 20.0), ("batch_std", 100.0))
            )
        super().build(input_shape)

    def norm_statistics(self, embeddings, update: bool) -> NormStatistics | None:
        """AdaFace's norms and statistics (None for other margins); with `update`, first folds the
        norms of the global batch (every replica's) into the running mean and std."""
        if not self.margin_formula.uses_norms:
            return None
        norms = tf.norm(tf.cast(embeddings, "float32"), axis=-1)
        norms = tf.stop_gradient(tf.clip_by_value(tf.reshape(norms, (-1,)), 0.001, 100.0))
        mean, std = tf.identity(self.batch_mean), tf.identity(self.batch_std)
        if update:
            everyone = norms
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                everyone = context.all_gather(norms, axis=0)
            count = tf.cast(tf.size(everyone), "float32")
            batch_mean = tf.reduce_mean(everyone)
            squares = tf.reduce_sum(tf.square(everyone - batch_mean))
            batch_std = tf.where(count > 1, tf.sqrt(squares / tf.maximum(count - 1.0, 1.0)), std)
            alpha = self.margin_formula.t_alpha
            mean = alpha * batch_mean + (1.0 - alpha) * mean
            std = alpha * batch_std + (1.0 - alpha) * std
            self.batch_mean.assign(mean)
            self.batch_std.assign(std)
        return NormStatistics(norms, mean, std)

    def class_rows(self, index):
        """The rows of `centres` (every sub-centre) of the classes `index`, class by class."""
        if self.subcenters == 1:
            return index
        rows = index[:, None] * self.subcenters + tf.range(self.subcenters)[None, :]
        return tf.reshape(rows, (-1,))

    def filter_interclass(self, cosine, labels):
        """insightface's inter-class filtering: cosines above the threshold that are not a row's
        target set to 0, without gradient (rows with label -1 have no target)."""
        if not self.interclass_filtering_threshold:
            return cosine
        dirty = (cosine > self.interclass_filtering_threshold) & ~(margins.target_mask(cosine, labels) > 0)
        return cosine * tf.stop_gradient(1.0 - tf.cast(dirty, "float32"))

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
        if self.subcenters > 1:
            cosine = tf.reduce_max(tf.reshape(cosine, (tf.shape(cosine)[0], -1, self.subcenters)), axis=-1)
        return tf.clip_by_value(cosine, -1.0 + self.epsilon, 1.0 - self.epsilon)

    def target_logit(self, cosine):
        """Unscaled margin logit of a target cosine (see the margin formula)."""
        return self.margin_formula.target_logit(cosine)

    def margin_logits(self, cosine, labels, statistics: NormStatistics | None = None):
        """Scaled logits from clipped cosines (batch x classes): margin on each label's column
        (AdaFace: from `statistics` of `norm_statistics`)."""
        if self.margin_formula.uses_norms:
            if statistics is None:
                raise ValueError("margin='adaface' needs the norm statistics of the raw embeddings.")
            return self.margin_formula.logits(cosine, labels, *statistics)
        return self.margin_formula.logits(cosine, labels)

    def call(self, embeddings, labels=None, training=None):
        cosine = self.cosine(embeddings)
        if labels is None:
            return cosine * self.scale
        statistics = self.norm_statistics(embeddings, update=bool(training))
        return self.margin_logits(self.filter_interclass(cosine, labels), labels, statistics)

    def compute_output_shape(self, input_shape, labels_shape=None):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def accuracy_metric(self) -> keras.metrics.Metric:
        """The training model's top-1 accuracy metric, updated with `HeadLoss.accuracy`."""
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def read_stepped_centres(self) -> list:
        """Tensors of the centres this head steps itself (none: the compiled optimizer steps them)."""
        return []

    def loss(self, embeddings, labels, step=None, stepped_centres=()) -> HeadLoss:
        """Margin softmax cross-entropy of one replica's batch (replica context).

        `step` is the training step (None: evaluation). With a step and sample_rate < 1 only the
        centres `sample` draws take part, gathered from the variable so their gradient is a
        `tf.IndexedSlices` over the sample. AdaFace's statistics are updated first in training.
        """
        labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
        statistics = self.norm_statistics(embeddings, update=step is not None)
        centres = None
        if step is not None and self.sampling:
            index, labels = self.sample(labels, step)
            centres = tf.gather(compat.variable_tensor(self.centres), self.class_rows(index))
        cosine = self.cosine(embeddings, centres)
        logits = self.margin_logits(self.filter_interclass(cosine, labels), labels, statistics)
        cross_entropy = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return HeadLoss(cross_entropy, (labels, cosine), centres)

    def apply_gradients(self, optimizer, gradients, variables, stepped_gradients=()) -> None:
        """Applies the gradients of a `scale_loss`-scaled objective with the compiled optimizer."""
        compat.apply_gradients(optimizer, gradients, variables)

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
            subcenters=self.subcenters,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
        )
        return config
