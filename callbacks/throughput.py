"""ThroughputLogger: training images per second, per epoch and for the whole run."""
from __future__ import annotations

import time
from collections.abc import Callable

import keras

from faceid_keras.backup import batches_done


class ThroughputLogger(keras.callbacks.Callback):
    """Writes `images_per_second` into each epoch's logs and prints a summary when training ends.

    The epoch rate is steady state: it is timed from the end of the epoch's first train call to
    the end of its last, so graph tracing/compilation and input-pipeline warm-up are left out
    (an epoch of one call is timed whole). The summary counts every image and all wall time from
    train begin to train end. `batch_size` is the global batch (all replicas together).
    """

    def __init__(self, batch_size: int, print_fn: Callable[[str], None] | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        self.batch_size = int(batch_size)
        self.print_fn = print_fn or print
        self.summary: dict[str, float] = {}
        self._train_start = 0.0
        self._total_steps = 0
        self._epoch_start = 0.0
        self._first_call = None
        self._last_call = None

    def on_train_begin(self, logs=None):
        self._train_start = time.perf_counter()
        self._total_steps = 0
        self.summary = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._first_call = None
        self._last_call = None

    def on_train_batch_end(self, batch, logs=None):
        now, done = time.perf_counter(), batches_done(batch, self.params)
        if self._first_call is None:
            self._first_call = (done, now)
        self._last_call = (done, now)

    def on_epoch_end(self, epoch, logs=None):
        if self._last_call is None:
            return
        steps, end = self._last_call
        first_steps, first_end = self._first_call
        self._total_steps += steps
        if steps > first_steps:
            rate = (steps - first_steps) * self.batch_size / (end - first_end)
        else:
            rate = steps * self.batch_size / max(end - self._epoch_start, 1e-9)
        if logs is not None:
            logs["images_per_second"] = rate

    def on_train_end(self, logs=None):
        wall = time.perf_counter() - self._train_start
        images = self._total_steps * self.batch_size
        self.summary = {
            "images": images,
            "wall_seconds": wall,
            "images_per_second": images / wall if wall > 0 else 0.0,
        }
        self.print_fn(
            f"Throughput: {images} images in {wall:.1f} s, "
            f"{self.summary['images_per_second']:.1f} images/s"
        )
