"""Test double of `npu_device.train.optimizer`: NpuLossScaleOptimizer on the Keras 3 base class."""
import keras

import npu_device


class NpuLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Real: tf.keras LossScaleOptimizer with NPU overflow status. Exposes the same `loss_scale`
    and `last_step_finite`; overflow is detected from non-finite gradients."""

    def __init__(self, inner_optimizer, dynamic=True, initial_scale=None, dynamic_growth_steps=None):
        npu_device.record(
            "NpuLossScaleOptimizer", inner=type(inner_optimizer).__name__, dynamic=dynamic
        )
        super().__init__(
            inner_optimizer,
            initial_scale=2.0**15 if initial_scale is None else initial_scale,
            dynamic_growth_steps=2000 if dynamic_growth_steps is None else dynamic_growth_steps,
            dynamic=dynamic,
        )

    def build(self, var_list):
        super().build(var_list)
        self._last_step_finite = self.add_variable(
            shape=(), dtype="int32", initializer="zeros", aggregation="none", name="last_step_finite"
        )

    @property
    def loss_scale(self):
        return self.dynamic_scale

    @property
    def last_step_finite(self):
        return keras.ops.equal(self._last_step_finite, 1)

    def apply(self, grads, trainable_variables=None):
        finite = self.check_finite(grads)
        super().apply(grads, trainable_variables)
        self._last_step_finite.assign(keras.ops.cast(finite, "int32"))
