"""Margin formulas: what a margin head puts on the target cosine (insightface's losses.py).

Each margin is a small immutable object built once from the head's arguments; `logits(cosine,
labels)` turns clipped cosines (batch x classes) into scaled logits with the margin on each
example's target column. Labels outside [0, classes) (e.g. -1) get no margin. A margin with
`uses_norms` (AdaFace) also takes the embeddings' clipped norms and the head's running statistics.
"""
from __future__ import annotations

import math

import tensorflow as tf

MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
}
# Margins that are not a combined-margin triple, and AdaFace's published MS1MV2 values.
NAMED_MARGINS = ("arcface_torch", "adaface")
ADAFACE = {"m": 0.4, "h": 0.333, "t_alpha": 0.01}


def resolve_margin(margin: str | tuple | list) -> tuple[float, float, float]:
    """Turns a preset name or an (m1, m2, m3) triple into three validated floats."""
    if isinstance(margin, str):
        if margin not in MARGIN_PRESETS:
            raise ValueError(
                f"Unknown margin preset {margin!r}; valid presets are {sorted(MARGIN_PRESETS)} "
                f"or a tuple (m1, m2, m3), or one of {list(NAMED_MARGINS)}."
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


def target_mask(cosine, labels):
    """One-hot float32 mask (batch x columns) of each label's column; all zero for a label outside."""
    labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
    return tf.one_hot(labels, tf.shape(cosine)[-1], dtype="float32")


class CombinedMargin:
    """insightface's combined margin: target logit s * (cos(m1 * theta + m2) - m3), others s * cos.

    Where m1 * theta + m2 passes pi the margin logit would rise again with theta. Beyond that
    switch point theta_t = (pi - m2) / m1 the target logit becomes cos(theta) - m3 - c with
    c = max(m2 * sin(m2), 1 + cos(theta_t)): insightface's ArcFace fallback
    cos(theta) - sin(pi - m2) * m2, or the larger penalty that keeps the logit non-increasing
    in theta for other (m1, m2). Margins with m1 * pi + m2 <= pi never switch. The gradient
    flows through the margin.
    """

    uses_norms = False

    def __init__(self, m1: float, m2: float, m3: float, scale: float, epsilon: float):
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.scale = scale
        self.epsilon = epsilon
        theta_switch = (math.pi - m2) / m1
        self.switch_theta = theta_switch if theta_switch < math.pi else None
        if self.switch_theta is not None:
            self.switch_cos = math.cos(theta_switch)
            self.fallback_penalty = max(m2 * math.sin(m2), 1.0 + self.switch_cos)

    def target_logit(self, cosine):
        """Unscaled margin logit cos(m1*theta + m2) - m3 (with the monotonic fallback)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cosine - self.m3
        theta = tf.acos(cosine)
        margin_form = tf.cos(self.m1 * theta + self.m2) - self.m3
        if self.switch_theta is None:
            return margin_form
        fallback = cosine - self.m3 - self.fallback_penalty
        return tf.where(cosine > self.switch_cos, margin_form, fallback)

    def logits(self, cosine, labels):
        """Scaled logits from clipped cosines (batch x classes): margin on each label's column."""
        one_hot = target_mask(cosine, labels)
        target_cosine = tf.clip_by_value(
            tf.reduce_sum(cosine * one_hot, axis=-1, keepdims=True), -1.0 + self.epsilon, 1.0 - self.epsilon
        )
        logits = tf.where(one_hot > 0, self.target_logit(target_cosine), cosine)
        return logits * self.scale



class ArcFaceTorchMargin(CombinedMargin):
    """ArcFace as insightface's arcface_torch computes it since its Dec 2022 change: the target logit
    is s * cos(theta + m2) for every angle (no fallback past theta + m2 > pi), applied without
    gradient, so d logit / d cos(theta) = s on the target as on every other class.

    Use it to reproduce models trained with arcface_torch's current code; the default "arcface"
    (`CombinedMargin`) is the formula of the ArcFace paper (Deng et al., CVPR 2019) and of
    insightface before that change, with the true gradient through the margin.
    """

    def __init__(self, m2: float, scale: float, epsilon: float):
        super().__init__(1.0, m2, 0.0, scale, epsilon)

    def target_logit(self, cosine):
        """cos(arccos(c) + m2), with the gradient of c itself."""
        return cosine + tf.stop_gradient(tf.cos(tf.acos(cosine) + self.m2) - cosine)


class AdaFaceMargin:
    """AdaFace (Kim et al., CVPR 2022) as its official head.py computes it, with the values of its
    published MS1MV2 runs by default (m 0.4, h 0.333, s 64; the head updates the norm statistics
    with t_alpha 0.01).

    From the clipped, gradient-free embedding norms and the running batch mean/std the head keeps:
    scaler = clip(h * (norm - mean) / (std + 1e-3), -1, 1); cosines clipped to +-(1 - 1e-3); the
    target's angle moves by -m * scaler (kept in [1e-3, pi - 1e-3]), then m + m * scaler is
    subtracted from its cosine; logits times s. The gradient flows through the angle.
    """

    epsilon = 1e-3
    uses_norms = True

    def __init__(self, m: float, h: float, scale: float, t_alpha: float):
        self.m, self.h, self.scale, self.t_alpha = m, h, scale, t_alpha

    def scaler(self, norms, mean, std):
        """The per-example margin scaler in [-1, 1], (batch, 1), without gradient."""
        scaler = self.h * (tf.stop_gradient(norms) - mean) / (std + self.epsilon)
        return tf.clip_by_value(scaler, -1.0, 1.0)[:, None]

    def logits(self, cosine, labels, norms=None, mean=None, std=None):
        """Scaled logits from cosines (batch x classes) and the batch's clipped norms (batch,)."""
        if norms is None:
            raise ValueError("margin='adaface' needs the embeddings' norms: call the head on raw embeddings.")
        cosine = tf.clip_by_value(cosine, -1.0 + self.epsilon, 1.0 - self.epsilon)
        one_hot = target_mask(cosine, labels)
        scaler = self.scaler(norms, mean, std)
        theta = tf.acos(tf.reduce_sum(cosine * one_hot, axis=-1, keepdims=True))
        theta = tf.clip_by_value(theta - self.m * scaler, self.epsilon, math.pi - self.epsilon)
        target = tf.cos(theta) - (self.m + self.m * scaler)
        return tf.where(one_hot > 0, target, cosine) * self.scale


def build(margin: str | tuple | list, scale: float, epsilon: float):
    """The margin object a head's `margin` argument names: "adaface", "arcface_torch", another
    preset or an (m1, m2, m3) triple."""
    if margin == "adaface":
        return AdaFaceMargin(ADAFACE["m"], ADAFACE["h"], scale, ADAFACE["t_alpha"])
    if margin == "arcface_torch":
        return ArcFaceTorchMargin(MARGIN_PRESETS["arcface"][1], scale, epsilon)
    return CombinedMargin(*resolve_margin(margin), scale=scale, epsilon=epsilon)
