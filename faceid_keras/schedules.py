"""Learning-rate schedules used to train ArcFace models: linear warmup, then polynomial or step decay.

Both follow insightface's arcface_torch conventions: `step` is the optimizer's iteration count
(0 on the first update), warmup ramps linearly from 0 to `base_learning_rate` over `warmup_steps`.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


def _check_non_negative(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="faceid")
class WarmupPolynomialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then insightface's PolyScheduler decay to 0 at `total_steps`.

    lr(step) = base * step / warmup_steps                                   for step < warmup_steps
    lr(step) = base * (1 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power  after,
    clamped at 0 from `total_steps` on.
    """

    def __init__(
        self,
        base_learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        power: float = 2.0,
        name: str | None = None,
    ):
        super().__init__()
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = _check_non_negative("total_steps", total_steps)
        self.warmup_steps = _check_non_negative("warmup_steps", warmup_steps)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"`total_steps` ({total_steps}) must be larger than `warmup_steps` ({warmup_steps})."
            )
        self.power = float(power)
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, "float32")
        base = self.base_learning_rate
        warmup = float(self.warmup_steps)
        decay_span = float(self.total_steps - self.warmup_steps)
        progress = tf.clip_by_value((step - warmup) / decay_span, 0.0, 1.0)
        decayed = base * tf.pow(1.0 - progress, self.power)
        if self.warmup_steps == 0:
            return decayed
        return tf.where(step < warmup, base * step / warmup, decayed)

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "power": self.power,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="faceid")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then the rate times `factor` at every boundary passed (piecewise constant).

    lr(step) = base * step / warmup_steps                      for step < warmup_steps
    lr(step) = base * factor ** (number of boundaries <= step)  after.
    Boundaries are absolute optimizer steps, strictly increasing.
    """

    def __init__(
        self,
        base_learning_rate: float,
        boundaries: Sequence[int],
        warmup_steps: int = 0,
        factor: float = 0.1,
        name: str | None = None,
    ):
        super().__init__()
        self.base_learning_rate = float(base_learning_rate)
        self.boundaries = [_check_non_negative("boundaries", b) for b in boundaries]
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"`boundaries` must be strictly increasing, got {list(boundaries)}.")
        self.warmup_steps = _check_non_negative("warmup_steps", warmup_steps)
        self.factor = float(factor)
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, "float32")
        base = self.base_learning_rate
        passed = tf.zeros((), "float32")
        for boundary in self.boundaries:
            passed = passed + tf.cast(step >= float(boundary), "float32")
        decayed = base * tf.pow(self.factor, passed)
        if self.warmup_steps == 0:
            return decayed
        warmup = float(self.warmup_steps)
        return tf.where(step < warmup, base * step / warmup, decayed)

    def get_config(self) -> dict:
        return {
            "base_learning_rate": self.base_learning_rate,
            "boundaries": list(self.boundaries),
            "warmup_steps": self.warmup_steps,
            "factor": self.factor,
            "name": self.name,
        }
