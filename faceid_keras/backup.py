"""Step-exact backup and resume of a `fit` run: weights, optimizer state and the batch position.

Keras's `BackupAndRestore` (3.15) restores the weights, the optimizer and the epoch, but restarts an
interrupted epoch from its first batch (the saved batch index is never read), so a resumed run takes
more steps than an uninterrupted one; and until the first epoch of a resumed run ends, its
mid-epoch backups record epoch 0. `TrainingBackup` keeps the position as a count of batches trained
(`step`), so the caller can skip exactly the batches already done, and writes every backup
atomically: a new weights file, then a `state.json` pointer to it swapped in with `os.replace`,
so a kill at any moment leaves the previous complete backup in place.
"""
from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np

STATE_FILE = "state.json"


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the model (weights and optimizer variables) every `save_freq` steps and at epoch ends.

    `restore(model)` (call after `compile`, before `fit`) loads the newest backup and returns the
    number of batches already trained; the run then resumes at epoch `step // steps_per_epoch`,
    batch `step % steps_per_epoch`. The backup folder is deleted once all `epochs` are done, and kept
    when training stops early (an error, a kill, or TerminateOnNaN) so the run can be resumed.
    Place it last in the callback list, so an epoch's backup is written after its logs.
    """

    def __init__(self, backup_dir: str | os.PathLike, steps_per_epoch: int, epochs: int, save_freq: int):
        super().__init__()
        for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs), ("save_freq", save_freq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.save_freq = save_freq
        self.step = 0

    @property
    def total_steps(self) -> int:
        """Batches of the whole run: epochs x steps per epoch."""
        return self.epochs * self.steps_per_epoch

    def _state_path(self) -> str:
        return os.path.join(self.backup_dir, STATE_FILE)

    def read_state(self) -> dict | None:
        """The newest backup's state (step, epoch, batch, weights file, run shape), or None."""
        path = self._state_path()
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            step = int(state["step"])
            weights = os.path.join(self.backup_dir, os.path.basename(state["weights"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: unreadable backup state ({error}); delete {self.backup_dir} to start over.") from error
        if not os.path.exists(weights):
            raise ValueError(f"{path}: names weights file {weights}, which does not exist.")
        if state.get("steps_per_epoch") != self.steps_per_epoch or state.get("epochs") != self.epochs:
            raise ValueError(
                f"{path}: the backup is of a run with {state.get('epochs')} epochs of "
                f"{state.get('steps_per_epoch')} steps, this run has {self.epochs} epochs of "
                f"{self.steps_per_epoch} steps (different --train_epochs, --batch_size or --steps). "
                f"Rerun with the same flags, or delete {self.backup_dir} to start over."
            )
        if not 0 <= step < self.total_steps:
            raise ValueError(f"{path}: step {step} outside [0, {self.total_steps}).")
        state["step"] = step
        state["weights"] = weights
        return state

    def restore(self, model: keras.Model) -> int:
        """Loads the newest backup into a compiled model; returns the batches already trained (0 if none)."""
        state = self.read_state()
        if state is None:
            self.step = 0
            return 0
        if model.optimizer is None:
            raise ValueError("Compile the model before restoring a backup into it.")
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(state["weights"])
        self.step = state["step"]
        return self.step

    def save(self) -> None:
        """Writes a backup of the current model at the current step."""
        os.makedirs(self.backup_dir, exist_ok=True)
        weights = f"step-{self.step:09d}.weights.h5"
        self.model.save_weights(os.path.join(self.backup_dir, weights), overwrite=True)
        state = {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "weights": weights,
        }
        temporary = self._state_path() + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._state_path())
        for name in os.listdir(self.backup_dir):
            if name.startswith("step-") and name.endswith(".weights.h5") and name != weights:
                os.remove(os.path.join(self.backup_dir, name))

    def _healthy(self, logs: dict | None) -> bool:
        """False once training was stopped or the loss is not finite: such a state is not backed up."""
        loss = (logs or {}).get("loss")
        return not self.model.stop_training and (loss is None or bool(np.isfinite(loss)))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        # The last batch of an epoch is backed up at the epoch end, after the epoch's logs.
        if self.step % self.save_freq == 0 and self.step % self.steps_per_epoch and self._healthy(logs):
            self.save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.step < self.total_steps and self._healthy(logs):
            self.save()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.step >= self.total_steps and os.path.isdir(self.backup_dir):
            shutil.rmtree(self.backup_dir)
