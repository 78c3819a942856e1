"""Margin heads: normalised class centres and insightface's combined margin s*(cos(m1*theta+m2)-m3)."""
from __future__ import annotations

import math

import keras
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
    """

    def __init__(
        self,
        num_classes: int,
        margin: str | tuple = "arcface",
        scale: float = 64.0,
        epsilon: float = 1e-6,
        sample_rate: float = 1.0,
        seed: int = 0,
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
        self.num_classes = num_classes
        self.margin = margin if isinstance(margin, str) else tuple(float(m) for m in margin)
        self.m1, self.m2, self.m3 = resolve_margin(margin)
        self.scale = float(scale)
        self.epsilon = float(epsilon)
        self.sample_rate = float(sample_rate)
        self.num_sample = min(num_classes, int(self.sample_rate * num_classes))
        self.seed = seed
        self.supports_jit = not self.sampling
        theta_switch = (math.pi - self.m2) / self.m1
        self._switch_theta = theta_switch if theta_switch < math.pi else None
        if self._switch_theta is not None:
            self._switch_cos = math.cos(theta_switch)
            self._fallback_penalty = max(self.m2 * math.sin(self.m2), 1.0 + self._switch_cos)

    def build(self, input_shape):
        self.centres = self.add_weight(
            name="centres",
            shape=(self.num_classes, int(input_shape[-1])),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype="float32",
        )
        super().build(input_shape)

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
        cosine = self.cosine(embeddings)
        if labels is None:
            return cosine * self.scale
        return self.margin_logits(cosine, labels)

    def compute_output_shape(self, input_shape, labels_shape=None):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            margin=self.margin,
            scale=self.scale,
            epsilon=self.epsilon,
            sample_rate=self.sample_rate,
            seed=self.seed,
        )
        return config
