"""Step-exact backup and resume of a `fit` run: weights, optimizer state and the batch position.

Keras's `BackupAndRestore` (3.15) restores the weights, the optimizer and the epoch, but restarts an
interrupted epoch from its first batch (the saved batch index is never read), so a resumed run takes
more steps than an uninterrupted one; and until the first epoch of a resumed run ends, its
mid-epoch backups record epoch 0. `TrainingBackup` keeps the position as a count of batches trained
(`step`, read from its `GlobalStep`), so the caller can skip exactly the batches already done, and
writes every backup atomically: a new weights file, then a `state.json` pointer to it swapped in
with `os.replace`, so a kill at any moment leaves the previous complete backup in place.

With several workers (MultiWorkerMirroredStrategy) every worker keeps a `TrainingBackup` over the
same folder on a shared filesystem, but only the chief's (`chief=True`) writes or deletes it; the
others only restore from it, so every worker resumes at the chief's step. Every worker joins
each save (on Keras 2 it reads sync-on-read variables, a collective op); the others write theirs
into a temporary folder that is removed at once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import numpy as np

from faceid_keras import compat

STATE_FILE = "state.json"


def batches_done(batch: int, params: dict | None) -> int:
    """Batches of the epoch trained once the `fit` call that Keras reports as `batch` has run.

    Keras hands `on_train_batch_end` the index of the last batch of the call (one call trains
    `steps_per_execution` batches); Keras 3 reports a full call's index for an epoch's last,
    shorter call too, hence the bound by the epoch's steps (`params["steps"]`).
    """
    steps = (params or {}).get("steps")
    return batch + 1 if steps is None else min(batch + 1, steps)


class GlobalStep(keras.callbacks.Callback):
    """The number of batches trained in the whole run, across `fit` calls and resumes: the one step
    count that the run's callbacks (TrainingBackup, StopOnNaN) read.

    It is the step at the epoch's start plus `batches_done`, never an increment per call, so it is
    right with `steps_per_execution` > 1. Place it first in the callback list.
    """

    def __init__(self, step: int = 0):
        super().__init__()
        self.step = step
        self._epoch_start = step
        self.in_fit = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.in_fit = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = self.step

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step = self._epoch_start + batches_done(batch, self.params)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.in_fit = False


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the model (weights and optimizer variables) every `save_freq` steps and at epoch ends.

    `restore(model)` (call after `compile`, before `fit`) loads the newest backup and returns the
    number of batches already trained; the run then resumes at epoch `step // steps_per_epoch`,
    batch `step % steps_per_epoch`. The backup folder is deleted once all `epochs` are done, and kept
    when training stops early (an error, a kill, or TerminateOnNaN) so the run can be resumed.
    Its position is `global_step`, a `GlobalStep` callback: place that first in the callback list
    and the backup last, so an epoch's backup is written after its logs.
    With `chief=False` (a worker other than the chief) it restores, counts steps and joins every
    save, but never writes or deletes `backup_dir`.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        steps_per_epoch: int,
        epochs: int,
        save_freq: int,
        chief: bool = True,
    ):
        super().__init__()
        for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs), ("save_freq", save_freq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.save_freq = save_freq
        self.chief = bool(chief)
        self.global_step = GlobalStep()
        self._boundary = 0

    @property
    def step(self) -> int:
        """Batches trained so far in the run (its `global_step`'s count)."""
        return self.global_step.step

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
        if not compat.weights_exist(weights):
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
            self.global_step.step = 0
            return 0
        if model.optimizer is None:
            raise ValueError("Compile the model before restoring a backup into it.")
        with model.distribute_strategy.scope():  # the optimizer's variables belong to the strategy
            compat.build_optimizer(model.optimizer, model.trainable_variables)
        model.load_weights(state["weights"])
        self.global_step.step = state["step"]
        return self.step

    def save(self) -> None:
        """Writes a backup of the current model at the current step into `backup_dir` (the chief).

        Every worker runs the save: under MultiWorkerMirroredStrategy, reading a sync-on-read
        variable (Keras 2's BatchNormalization statistics) is a collective op. A worker other than
        the chief writes into a private temporary folder, removed at once.
        """
        stem = f"step-{self.step:09d}"
        weights = stem + compat.WEIGHTS_SUFFIX
        if not self.chief:
            folder = tempfile.mkdtemp(prefix="faceid-backup-")
            try:
                self.model.save_weights(os.path.join(folder, weights), overwrite=True)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
        os.makedirs(self.backup_dir, exist_ok=True)
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
            if name.startswith("step-") and not name.startswith(stem):
                os.remove(os.path.join(self.backup_dir, name))

    def _healthy(self, logs: dict | None) -> bool:
        """False once training was stopped or the loss is not finite: such a state is not backed up."""
        loss = (logs or {}).get("loss")
        return not self.model.stop_training and (loss is None or bool(np.isfinite(loss)))

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.global_step.in_fit:
            raise ValueError(
                "TrainingBackup reads its position from `backup.global_step`: pass that callback to "
                "`fit` too, first in the list (before the backup and every callback that reads the step)."
            )
        self._boundary = self.step // self.save_freq

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # A call of `steps_per_execution` batches may step over a multiple of `save_freq`: a backup
        # is due whenever one was crossed. An epoch's last batch is backed up at the epoch end,
        # after the epoch's logs.
        boundary = self.step // self.save_freq
        due, self._boundary = boundary > self._boundary, boundary
        if due and self.step % self.steps_per_epoch and self._healthy(logs):
            self.save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.step < self.total_steps and self._healthy(logs):
            self.save()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.chief and self.step >= self.total_steps and os.path.isdir(self.backup_dir):
            shutil.rmtree(self.backup_dir)
