"""LossScaleMonitor: the dynamic loss scale and the number of overflow-skipped steps, in the logs."""
from __future__ import annotations

import keras


class LossScaleMonitor(keras.callbacks.Callback):
    """Writes `loss_scale` and `skipped_steps` (overflow steps since training began) into the logs.

    Every epoch, and every batch with `per_batch=True`. Two kinds of loss-scaled optimizer:
    - Keras 3 `LossScaleOptimizer`: the scale is its `dynamic_scale`. A skipped step leaves the
      inner optimizer's `iterations` unchanged, so skipped = train steps run - iterations advanced;
      exact even with `steps_per_execution` > 1, and read only when logs are written.
    - An NPU (tf.keras) `NpuLossScaleOptimizer`: the scale is `loss_scale`; its iterations advance
      on skipped steps too, so each batch reads `last_step_finite` (with `steps_per_execution`
      or NPU loops > 1, only the last step of each call is seen).
    With an optimizer that does not scale the loss, nothing is written.
    """

    def __init__(self, per_batch: bool = False):
        super().__init__()
        self.per_batch = bool(per_batch)
        self.skipped_steps = 0
        self.loss_scale: float | None = None
        self._steps = 0
        self._epoch_first_step = 0
        self._start_iterations = 0

    def _optimizer(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "last_step_finite"):
            return "npu", optimizer
        if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
            return "keras", optimizer
        return None, optimizer

    def _current_scale(self, kind: str, optimizer) -> float:
        if kind == "npu":
            return float(keras.ops.convert_to_numpy(optimizer.loss_scale))
        if optimizer.built:
            return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
        return float(optimizer.initial_scale)

    def _update(self, logs: dict | None) -> None:
        kind, optimizer = self._optimizer()
        if kind is None:
            return
        if kind == "keras":
            advanced = int(keras.ops.convert_to_numpy(optimizer.iterations)) - self._start_iterations
            self.skipped_steps = self._steps - advanced
        self.loss_scale = self._current_scale(kind, optimizer)
        if logs is not None:
            logs["loss_scale"] = self.loss_scale
            logs["skipped_steps"] = self.skipped_steps

    def on_train_begin(self, logs=None):
        self.skipped_steps = 0
        self._steps = 0
        kind, optimizer = self._optimizer()
        self._start_iterations = (
            int(keras.ops.convert_to_numpy(optimizer.iterations)) if kind == "keras" else 0
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_first_step = self._steps

    def on_train_batch_end(self, batch, logs=None):
        self._steps = self._epoch_first_step + batch + 1
        kind, optimizer = self._optimizer()
        if kind == "npu" and not bool(keras.ops.convert_to_numpy(optimizer.last_step_finite)):
            self.skipped_steps += 1
        if self.per_batch:
            self._update(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._update(logs)
