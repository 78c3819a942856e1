"""StopOnNaN: Keras's TerminateOnNaN that says where the loss stopped being finite."""
from __future__ import annotations

import keras
import numpy as np


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that also says in which epoch, batch and global step the loss stopped being finite."""

    def __init__(self, steps_per_epoch: int, first_step: int = 0):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.step = first_step
        self.stopped_at: dict | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        super().on_train_batch_end(batch, logs)
        loss = (logs or {}).get("loss")
        if self.stopped_at is None and loss is not None and not np.isfinite(loss):
            epoch, in_epoch = divmod(self.step - 1, self.steps_per_epoch)
            self.stopped_at = {"epoch": epoch + 1, "batch": in_epoch + 1, "step": self.step}
            print(
                f"Loss became {float(loss)} in epoch {epoch + 1}, batch {in_epoch + 1} of "
                f"{self.steps_per_epoch} (global step {self.step}): training stopped."
            )
