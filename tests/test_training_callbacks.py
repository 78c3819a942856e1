"""LossScaleMonitor and ThroughputLogger in real fits: overflow skipping, scale, rates, summary."""
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from callbacks import LossScaleMonitor, ThroughputLogger, for_placement
from faceid_keras import compat
from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import Placement

FAKE_NPU = Path(__file__).resolve().parent / "fake_npu_device"
OVERFLOW_BATCH = 2


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


class BatchRecorder(keras.callbacks.Callback):
    """Keeps the weights and the logs after every train batch."""

    def __init__(self):
        super().__init__()
        self.weights, self.logs = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])
        self.logs.append(dict(logs))


def _regression_data(huge: float):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = rng.normal(size=(24, 1)).astype("float32")
    x[4 * OVERFLOW_BATCH : 4 * OVERFLOW_BATCH + 4] = huge
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _assert_overflow_steps_skipped(recorder, monitor, history):
    weights = recorder.weights
    before, skipped, after = weights[OVERFLOW_BATCH - 1], weights[OVERFLOW_BATCH], weights[OVERFLOW_BATCH + 1]
    assert all(np.array_equal(a, b) for a, b in zip(before, skipped))
    assert any(not np.array_equal(a, b) for a, b in zip(skipped, after))
    assert any(not np.array_equal(a, b) for a, b in zip(weights[-2], weights[-1]))
    # Two epochs of six batches; the third batch of each overflows.
    scales = [logs["loss_scale"] for logs in recorder.logs]
    first = scales[0]
    assert scales == [first] * 2 + [first / 2] * 6 + [first / 4] * 4
    assert [logs["skipped_steps"] for logs in recorder.logs] == [0, 0] + [1] * 6 + [2] * 4
    assert history.history["skipped_steps"] == [1, 2]
    assert history.history["loss_scale"] == [first / 2, first / 4]
    assert monitor.skipped_steps == 2


def test_float16_overflow_skips_the_step_halves_the_scale_and_training_goes_on():
    placement = Placement.create("cpu", precision="mixed_float16")
    with placement.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        # A modest initial scale, so that only the poisoned batch overflows float16.
        optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=256.0)
        assert placement.wrap_optimizer(optimizer) is optimizer
        model.compile(optimizer=optimizer, loss="mse")
    monitor = LossScaleMonitor(per_batch=True)
    recorder = BatchRecorder()
    # 1e5 does not fit in float16: the forward pass of that one batch gives inf.
    history = model.fit(_regression_data(1e5), epochs=2, verbose=0, callbacks=[monitor, recorder])
    _assert_overflow_steps_skipped(recorder, monitor, history)


@pytest.mark.skipif(compat.KERAS_3, reason="npu_device exists for tf.keras (Keras 2) only; TF 2.13 lane")
def test_monitor_reads_npu_optimizer_loss_scale_and_last_step_finite(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_NPU))
    for name in [m for m in sys.modules if m == "npu_device" or m.startswith("npu_device.")]:
        monkeypatch.delitem(sys.modules, name)
    from npu_device.train.optimizer import NpuLossScaleOptimizer

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=NpuLossScaleOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    monitor = LossScaleMonitor(per_batch=True)
    recorder = BatchRecorder()
    # float32 model: 1e30 squared overflows the loss and its gradients.
    history = model.fit(_regression_data(1e30), epochs=2, verbose=0, callbacks=[monitor, recorder])
    _assert_overflow_steps_skipped(recorder, monitor, history)
    finite = [logs["last_step_finite"] for logs in recorder.logs]
    assert finite == [1, 1, 0, 1, 1, 1] * 2
    for name in [m for m in sys.modules if m == "npu_device" or m.startswith("npu_device.")]:
        del sys.modules[name]


def test_monitor_writes_nothing_without_loss_scaling():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(_regression_data(0.0), epochs=1, verbose=0, callbacks=[LossScaleMonitor()])
    assert "loss_scale" not in history.history and "skipped_steps" not in history.history


class SlowFirstBatch(keras.callbacks.Callback):
    """Stands in for graph compilation: the first batch of training takes `seconds` longer."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 and not self.model.optimizer.iterations.numpy():
            time.sleep(self.seconds)


def test_throughput_excludes_the_first_batch_per_epoch_and_summarises_the_run():
    lines = []
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    logger = ThroughputLogger(batch_size=4, print_fn=lines.append)
    history = model.fit(
        _regression_data(0.0), epochs=2, verbose=0, callbacks=[SlowFirstBatch(1.0), logger]
    )
    rates = history.history["images_per_second"]
    assert len(rates) == 2 and min(rates) > 100
    assert logger.summary["images"] == 2 * 24
    assert logger.summary["wall_seconds"] >= 1.0
    assert logger.summary["images_per_second"] < 48 / 1.0
    assert lines == [
        f"Throughput: 48 images in {logger.summary['wall_seconds']:.1f} s, "
        f"{logger.summary['images_per_second']:.1f} images/s"
    ]
    with pytest.raises(ValueError):
        ThroughputLogger(batch_size=0)


def test_arcface_model_trains_under_mixed_float16_placement():
    placement = Placement.create("cpu", precision="mixed_float16")
    with placement.scope():  # layers made here compute in float16
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
        backbone = keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(x)))
        model = ArcFaceModel(backbone, num_classes=4)
        optimizer = placement.wrap_optimizer(keras.optimizers.SGD(0.01))
        model.compile(optimizer=optimizer)
    assert model.optimizer is optimizer
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (64, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 4, 64).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    callbacks = for_placement(placement) + [ThroughputLogger(8, print_fn=lambda line: None)]
    history = model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks)
    # The s=64 margin logits overflow float16 at the initial scale 2**15: the first steps are
    # skipped, each halving the scale, until the gradients fit; then training proceeds.
    skipped = history.history["skipped_steps"][-1]
    assert 0 < skipped < 16
    assert history.history["loss_scale"][-1] == 2.0**15 / 2**skipped
    # Keras 2 counts skipped steps in `iterations`, Keras 3 does not.
    assert int(optimizer.iterations) == 16 - (0 if compat.SKIPPED_STEPS_ADVANCE_ITERATIONS else skipped)
    assert all(np.isfinite(history.history["loss"]))
    assert min(history.history["images_per_second"]) > 0
