"""Normalisation layers for the backbones: our BatchRenormalization and the `norm` factory."""
from __future__ import annotations

import keras
import tensorflow as tf

from faceid_keras import compat

NORMS = ("batch", "sync_batch", "batch_renorm", "group")
EPSILON = 1e-5  # insightface's BatchNorm eps
MOMENTUM = 0.9  # PyTorch momentum 0.1 expressed as Keras's moving-average decay


@keras.saving.register_keras_serializable(package="faceid")
class BatchRenormalization(keras.layers.Layer):
    """Batch renormalisation (Ioffe 2017) over the last axis.

    In training, x_hat = (x - mean_B) / std_B * r + d with r = clip(std_B / std_R, 1/rmax, rmax)
    and d = clip((mean_B - mean_R) / std_R, -dmax, dmax) treated as constants, where mean_R and
    std_R are renorm statistics averaged with `renorm_momentum`. Inference uses the moving mean and
    variance (averaged with `momentum`), like BatchNormalization. Statistics are computed in float32.
    """

    def __init__(
        self,
        momentum: float = MOMENTUM,
        epsilon: float = EPSILON,
        rmax: float = 3.0,
        dmax: float = 5.0,
        renorm_momentum: float = 0.99,
        center: bool = True,
        scale: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if rmax < 1:
            raise ValueError(f"rmax must be >= 1, got {rmax}.")
        if dmax < 0:
            raise ValueError(f"dmax must be >= 0, got {dmax}.")
        for name, value in (("momentum", momentum), ("renorm_momentum", renorm_momentum)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}.")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.renorm_momentum = float(renorm_momentum)
        self.center = center
        self.scale = scale
        self.supports_masking = True

    def build(self, input_shape):
        shape = (int(input_shape[-1]),)

        def stat(name, initializer):
            return self.add_weight(
                name=name, shape=shape, initializer=initializer, trainable=False, **compat.NO_AUTOCAST
            )

        self.gamma = self.add_weight(name="gamma", shape=shape, initializer="ones") if self.scale else None
        self.beta = self.add_weight(name="beta", shape=shape, initializer="zeros") if self.center else None
        self.moving_mean = stat("moving_mean", "zeros")
        self.moving_variance = stat("moving_variance", "ones")
        self.renorm_mean = stat("renorm_mean", "zeros")
        self.renorm_stddev = stat("renorm_stddev", "ones")
        super().build(input_shape)

    def call(self, inputs, training=None):
        input_dtype = inputs.dtype
        x = tf.cast(inputs, "float32")
        if training:
            axes = list(range(len(x.shape) - 1))
            mean, variance = tf.nn.moments(x, axes=axes)
            stddev = tf.sqrt(variance + self.epsilon)
            renorm_stddev = tf.cast(self.renorm_stddev, "float32")
            renorm_mean = tf.cast(self.renorm_mean, "float32")
            r = tf.stop_gradient(tf.clip_by_value(stddev / renorm_stddev, 1.0 / self.rmax, self.rmax))
            d = tf.stop_gradient(tf.clip_by_value((mean - renorm_mean) / renorm_stddev, -self.dmax, self.dmax))
            x = (x - mean) / stddev * r + d
            self._average(self.moving_mean, mean, self.momentum)
            self._average(self.moving_variance, variance, self.momentum)
            self._average(self.renorm_mean, mean, self.renorm_momentum)
            self._average(self.renorm_stddev, stddev, self.renorm_momentum)
        else:
            x = (x - tf.cast(self.moving_mean, "float32")) / tf.sqrt(
                tf.cast(self.moving_variance, "float32") + self.epsilon
            )
        if self.gamma is not None:
            x = x * tf.cast(self.gamma, "float32")
        if self.beta is not None:
            x = x + tf.cast(self.beta, "float32")
        return tf.cast(x, input_dtype)

    @staticmethod
    def _average(variable, value, momentum):
        variable.assign(variable * momentum + tf.stop_gradient(value) * (1.0 - momentum))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            rmax=self.rmax,
            dmax=self.dmax,
            renorm_momentum=self.renorm_momentum,
            center=self.center,
            scale=self.scale,
        )
        return config


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of `channels` that is at most `max_groups` (32 as in Wu & He 2018)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def normalization(norm: str, channels: int, name: str, scale: bool = True, dtype=None) -> keras.layers.Layer:
    """A normalisation layer over the last axis: `batch`, `sync_batch`, `batch_renorm` or `group`.

    `batch` normalises each replica's part of the batch on its own (like DDP without SyncBN);
    `sync_batch` all-reduces the statistics across replicas, so N replicas train exactly like one
    device with the global batch. `group` uses `group_count(channels)` groups.
    """
    if norm in ("batch", "sync_batch"):
        return keras.layers.BatchNormalization(
            momentum=MOMENTUM,
            epsilon=EPSILON,
            scale=scale,
            synchronized=norm == "sync_batch",
            name=name,
            dtype=dtype,
        )
    if norm == "batch_renorm":
        return BatchRenormalization(scale=scale, name=name, dtype=dtype)
    if norm == "group":
        return keras.layers.GroupNormalization(
            groups=group_count(channels), epsilon=EPSILON, scale=scale, name=name, dtype=dtype
        )
    raise ValueError(f"Unknown norm {norm!r}; valid norms are {list(NORMS)}.")
