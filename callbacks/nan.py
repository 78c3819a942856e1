"""StopOnNaN: Keras's TerminateOnNaN that says where the loss stopped being finite."""
from __future__ import annotations

from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:
    from faceid_keras.backup import GlobalStep


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that also says in which epoch, batch and global step the loss stopped being finite.

    The position is the run's `global_step` (a `GlobalStep` callback placed before this one), so it
    is right across resumed runs and with `steps_per_execution` > 1 (then the step named is the
    last of the call whose loss was not finite).
    """

    def __init__(self, steps_per_epoch: int, global_step: GlobalStep):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.global_step = global_step
        self.stopped_at: dict | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        super().on_train_batch_end(batch, logs)
        loss = (logs or {}).get("loss")
        if self.stopped_at is None and loss is not None and not np.isfinite(loss):
            step = self.global_step.step
            epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
            self.stopped_at = {"epoch": epoch + 1, "batch": in_epoch + 1, "step": step}
            print(
                f"Loss became {float(loss)} in epoch {epoch + 1}, batch {in_epoch + 1} of "
                f"{self.steps_per_epoch} (global step {step}): training stopped."
            )
