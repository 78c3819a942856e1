"""LossScaleMonitor: the dynamic loss scale and the number of overflow-skipped steps, in the logs."""
from __future__ import annotations

import keras

from faceid_keras import compat
from faceid_keras.backup import batches_done


class LossScaleMonitor(keras.callbacks.Callback):
    """Writes `loss_scale` and `skipped_steps` (overflow steps since training began) into the logs,
    and with an NPU optimizer `last_step_finite` (1 or 0).

    Every epoch, and every batch with `per_batch=True`. How skipped steps are counted depends on
    the optimizer:
    - Keras 3 `LossScaleOptimizer`: a skipped step leaves the inner optimizer's `iterations`
      unchanged, so skipped = train steps run - iterations advanced; exact even with
      `steps_per_execution` > 1, and read only when logs are written.
    - Keras 2 (tf.keras) `LossScaleOptimizer`: `iterations` advances on skipped steps too, and a
      skipped step halves the scale, so each batch compares the scale with the previous batch's
      (a skip at the minimum scale of 1 leaves it unchanged and is not seen).
    - NPU `NpuLossScaleOptimizer` (a Keras 2 one): each batch reads its `last_step_finite`.
    With `steps_per_execution` or NPU loops > 1, the Keras 2 and NPU counts see only the last step
    of each call. With an optimizer that does not scale the loss, nothing is written.
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
        """(how skips are counted: "npu", "scale", "iterations" or None, the optimizer)."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "last_step_finite"):
            return "npu", optimizer
        if compat.is_loss_scale_optimizer(optimizer):
            return ("scale" if compat.SKIPPED_STEPS_ADVANCE_ITERATIONS else "iterations"), optimizer
        return None, optimizer

    def _update(self, logs: dict | None) -> None:
        kind, optimizer = self._optimizer()
        if kind is None:
            return
        if kind == "iterations":
            advanced = int(compat.to_numpy(optimizer.iterations)) - self._start_iterations
            self.skipped_steps = self._steps - advanced
        self.loss_scale = compat.loss_scale(optimizer)
        if logs is not None:
            logs["loss_scale"] = self.loss_scale
            logs["skipped_steps"] = self.skipped_steps
            if kind == "npu":
                logs["last_step_finite"] = int(bool(compat.to_numpy(optimizer.last_step_finite)))

    def on_train_begin(self, logs=None):
        self.skipped_steps = 0
        self._steps = 0
        kind, optimizer = self._optimizer()
        self._start_iterations = int(compat.to_numpy(optimizer.iterations)) if kind == "iterations" else 0
        self.loss_scale = compat.loss_scale(optimizer) if kind == "scale" else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_first_step = self._steps

    def on_train_batch_end(self, batch, logs=None):
        self._steps = self._epoch_first_step + batches_done(batch, self.params)
        kind, optimizer = self._optimizer()
        if kind == "npu" and not bool(compat.to_numpy(optimizer.last_step_finite)):
            self.skipped_steps += 1
        if kind == "scale":
            scale = compat.loss_scale(optimizer)
            if scale < self.loss_scale:
                self.skipped_steps += 1
            self.loss_scale = scale
        if self.per_batch:
            self._update(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._update(logs)
