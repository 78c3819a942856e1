"""Test double of `npu_device.train.optimizer`: NpuLossScaleOptimizer on Keras 2's loss-scale optimizer."""
import tensorflow as tf
from keras.src.mixed_precision.loss_scale_optimizer import LossScaleOptimizerV3

import npu_device


class NpuLossScaleOptimizer(LossScaleOptimizerV3):
    """Real: a tf.keras LossScaleOptimizer that reads the NPU's float-overflow status and records it
    in `last_step_finite`. Here the status is whether every gradient is finite, which is what the
    NPU status reports for the same step."""

    def __init__(self, inner_optimizer, dynamic=True, initial_scale=None, dynamic_growth_steps=None):
        npu_device.record(
            "NpuLossScaleOptimizer", inner=type(inner_optimizer).__name__, dynamic=dynamic
        )
        super().__init__(inner_optimizer, dynamic, initial_scale, dynamic_growth_steps)
        self._last_step_finite = tf.Variable(
            True,
            name="npu_last_step_finite",
            trainable=False,
            synchronization=tf.VariableSynchronization.AUTO,
            aggregation=tf.VariableAggregation.NONE,
        )

    @property
    def last_step_finite(self):
        return self._last_step_finite

    def apply_gradients(self, grads_and_vars, skip_gradients_aggregation=False, **kwargs):
        grads_and_vars = tuple(grads_and_vars)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g, _ in grads_and_vars])
        self._last_step_finite.assign(finite)
        return super().apply_gradients(grads_and_vars, skip_gradients_aggregation, **kwargs)
