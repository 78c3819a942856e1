"""Margin formulas: what a margin head puts on the target cosine (insightface's losses.py).

Each margin is a small immutable object built once from the head's arguments; `logits(cosine,
labels)` turns clipped cosines (batch x classes) into scaled logits with the margin on each
example's target column. Labels outside [0, classes) (e.g. -1) get no margin.
"""
from __future__ import annotations

import math

import tensorflow as tf

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


def build(margin: str | tuple | list, scale: float, epsilon: float) -> CombinedMargin:
    """The margin object a head's `margin` argument names (a preset or an (m1, m2, m3) triple)."""
    return CombinedMargin(*resolve_margin(margin), scale=scale, epsilon=epsilon)
