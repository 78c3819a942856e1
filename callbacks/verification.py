"""Keras callback that measures verification accuracy (lfw, cfp_fp, agedb_30, ...) during fit."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from faceid_keras import embedding, packs

LOGGED_METRICS = ("accuracy", "accuracy_std", "val", "val_std", "far", "auc", "best_accuracy", "threshold")
MONITORABLE = ("accuracy", "best_accuracy", "val", "auc")  # higher is better


class VerificationCallback(keras.callbacks.Callback):
    """Runs the verification protocol on ``self.model`` every ``every_n_epochs`` epochs.

    For every target it writes ``<name>_accuracy``, ``<name>_accuracy_std``, ``<name>_val``,
    ``<name>_val_std``, ``<name>_far``, ``<name>_auc``, ``<name>_best_accuracy`` and
    ``<name>_threshold`` into the epoch logs, plus ``verification_accuracy`` (the mean accuracy over
    targets), and prints one line per target. Keras calls callbacks in list order, so place this
    callback before those that read these logs (ModelCheckpoint, CSVLogger, TensorBoard, ...), and
    give Keras's monitoring callbacks ``mode="max"``: they cannot infer the direction of a log key
    that is not a compiled metric, e.g.
    ``ModelCheckpoint("best.keras", monitor="lfw_accuracy", mode="max", save_best_only=True)``
    (Keras 2.13's ModelCheckpoint cannot save the best model as `.keras`: use `save_best` here,
    or a `.weights.h5` path with `save_weights_only=True`).

    Args:
        targets: mapping name -> (uint8 images [2N, H, W, 3], bool issame [N]), or a data path
            (a tfds data dir holding ms1m_arcface/verification, or an insightface folder with
            ``<name>.bin`` packs) from which ``names`` are loaded.
        names: targets to load when ``targets`` is a data path.
        every_n_epochs: evaluate after every n-th epoch (and only then write the logs).
        batch_size: batch size of the embedding pass.
        save_best: if set, a ``.keras`` path where the model is saved whenever ``monitor`` improves.
        monitor: log key deciding the best model (higher is better): ``"verification_accuracy"``
            (default) or ``"<name>_accuracy"``, ``"<name>_best_accuracy"``, ``"<name>_val"``,
            ``"<name>_auc"``.
        verbose: 0 silences the per-target lines.
    """

    def __init__(
        self,
        targets: Mapping[str, tuple[np.ndarray, np.ndarray]] | str | os.PathLike,
        names: Sequence[str] = packs.DEFAULT_TARGETS,
        every_n_epochs: int = 1,
        batch_size: int = 64,
        save_best: str | os.PathLike | None = None,
        monitor: str | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if save_best is not None and not os.fspath(save_best).endswith(".keras"):
            raise ValueError(f"save_best must be a path ending in .keras, got {save_best!r}.")
        if isinstance(targets, (str, os.PathLike)):
            targets = packs.load_targets(targets, names)
        if not targets:
            raise ValueError("VerificationCallback needs at least one target.")
        self.targets = {}
        for name, (images, issame) in targets.items():
            images, issame = np.asarray(images), np.asarray(issame, dtype=bool)
            if len(images) != 2 * len(issame):
                raise ValueError(
                    f"Target {name!r}: expected {2 * len(issame)} images for {len(issame)} pairs, "
                    f"got {len(images)}."
                )
            self.targets[name] = (images, issame)
        self.monitor = monitor or "verification_accuracy"
        known = {"verification_accuracy"} | {
            f"{name}_{metric}" for name in self.targets for metric in MONITORABLE
        }
        if self.monitor not in known:
            raise ValueError(f"monitor must be one of {sorted(known)}, got {self.monitor!r}.")
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.save_best = None if save_best is None else os.fspath(save_best)
        self.verbose = verbose
        self.best = -np.inf
        self.results = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Evaluates every target and adds the figures to ``logs`` in place."""
        if (epoch + 1) % self.every_n_epochs:
            return
        logs = logs if logs is not None else {}
        accuracies = []
        for name, (images, issame) in self.targets.items():
            result = embedding.verify(self.model, images, issame, self.batch_size)
            self.results[name] = result
            for metric in LOGGED_METRICS:
                logs[f"{name}_{metric}"] = result[metric]
            accuracies.append(result["accuracy"])
            if self.verbose:
                print(
                    f"[{name}][epoch {epoch + 1}] accuracy {result['accuracy']:.4f} +- "
                    f"{result['accuracy_std']:.4f}  VAL@FAR=1e-3 {result['val']:.4f}  "
                    f"AUC {result['auc']:.4f}"
                )
        logs["verification_accuracy"] = float(np.mean(accuracies))
        current = logs[self.monitor]
        if current > self.best:
            self.best = current
            if self.save_best is not None:
                self.model.save(self.save_best)
                if self.verbose:
                    print(f"[verification][epoch {epoch + 1}] {self.monitor} improved to "
                          f"{current:.4f}; saved {self.save_best}")
