"""The SGD step of one replica's shard of the class centres, following the compiled optimizer."""
from __future__ import annotations

import keras
import tensorflow as tf

from faceid_keras import compat


class ShardSGD:
    """Steps one replica's shard of the centres as keras.optimizers.SGD steps a variable.

    Built once per compiled optimizer, which it validates: keras.optimizers.SGD (loss scaling
    allowed) without clipping, EMA, gradient accumulation or a loss scale factor, which the
    shard's own update would not follow.
    """

    def __init__(self, optimizer, centres, momentum, shard_size: int):
        loss_scaled = compat.is_loss_scale_optimizer(optimizer)
        inner = optimizer.inner_optimizer if loss_scaled else optimizer
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
        self.optimizer = optimizer
        self.loss_scaled = loss_scaled
        self.momentum = float(inner.momentum)
        self.nesterov = bool(inner.nesterov)
        decays = inner.weight_decay is not None and compat.uses_weight_decay(inner, centres)
        self.weight_decay = inner.weight_decay if decays else None
        self.shard_size = shard_size
        self.centres = centres
        self.velocity = momentum

    def apply(self, gradient, finite=None) -> None:
        """One SGD step of the shard (replica context), before the optimizer applies its own step.

        `gradient` is of the loss the optimizer scaled (unscaled here by its current scale); the
        learning rate is the optimizer's current one (its schedule at `iterations`). Decoupled
        weight decay (SGD's `weight_decay`) first, then m = momentum * m - lr * g and w += m
        (nesterov: w += momentum * m - lr * g); with a constant learning rate this is torch SGD's
        step (insightface's partial_fc_v2). Nothing changes where `finite` is False (a skipped
        loss-scaled step).
        """
        optimizer = self.optimizer
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.math.unsorted_segment_sum(gradient.values, gradient.indices, self.shard_size)
        if self.loss_scaled:  # the scale `scale_loss` used; built with the optimizer's first step
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            gradient = gradient / tf.cast(scale, "float32")
        learning_rate = tf.cast(optimizer.learning_rate, "float32")
        centres = compat.variable_tensor(self.centres)
        velocity = compat.variable_tensor(self.velocity)

        def update():
            if self.weight_decay is not None:
                centres.assign_sub(centres * tf.cast(self.weight_decay, "float32") * learning_rate)
            if self.momentum != 0:
                momentum = tf.cast(self.momentum, "float32")
                velocity.assign(velocity * momentum - gradient * learning_rate)
                if self.nesterov:
                    centres.assign_add(velocity * momentum - gradient * learning_rate)
                else:
                    centres.assign_add(velocity)
            else:
                centres.assign_sub(gradient * learning_rate)

        if finite is None:
            update()
        else:
            tf.cond(finite, update, lambda: None)


def all_finite(gradients):
    """Whether every gradient is finite on every replica (one all-reduce of a flag)."""
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in gradients if g is not None]
    bad = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]), "float32")
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return tf.equal(bad, 0.0)


def poison(gradient, finite):
    """`gradient` where `finite`, else NaN: the loss-scale optimizer then skips the step."""
    if gradient is None:
        return None
    nan_or_zero = tf.where(finite, 0.0, float("nan"))
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values + tf.cast(nan_or_zero, gradient.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient + tf.cast(nan_or_zero, gradient.dtype)
