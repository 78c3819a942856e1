"""Placement: device and precision choice, optimizer wrapping, the NPU call protocol, 2 replicas."""
import json
import os
import sys
from pathlib import Path

import keras
import pytest
import tensorflow as tf

from callbacks import BroadcastInitialWeights, LossScaleMonitor, for_placement
from faceid_keras import compat
from faceid_keras.placement import AscendPlacement, Placement, StrategyPlacement
from helpers import run_worker, without_gpu

FAKE_NPU = Path(__file__).resolve().parent / "fake_npu_device"


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def fake_npu(monkeypatch):
    """The npu_device test double on sys.path, with a clean call record and NPU environment.

    Like the real adapter it imports under tf.keras (Keras 2) only: these tests run on the TF 2.13
    lane."""
    if compat.KERAS_3:
        pytest.skip("npu_device exists for tf.keras (Keras 2) only; tested on the TF 2.13 lane")
    for name in ("ASCEND_DEVICE_ID", "RANK_SIZE", "RANK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(FAKE_NPU))
    for name in [m for m in sys.modules if m == "npu_device" or m.startswith("npu_device.")]:
        monkeypatch.delitem(sys.modules, name)
    import npu_device

    npu_device.reset()
    yield npu_device
    for name in [m for m in sys.modules if m == "npu_device" or m.startswith("npu_device.")]:
        del sys.modules[name]


def _tiny_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def test_cpu_fp32_is_plain_keras():
    placement = Placement.create("cpu")
    assert isinstance(placement, StrategyPlacement)
    assert placement.device == "cpu" and placement.precision == "fp32"
    assert placement.num_replicas_in_sync == 1
    assert keras.mixed_precision.global_policy().name == "float32"
    optimizer = keras.optimizers.SGD(0.1)
    assert placement.wrap_optimizer(optimizer) is optimizer
    assert for_placement(placement) == []
    dataset = tf.data.Dataset.range(10)
    assert placement.distribute_dataset(dataset, 4) == (dataset, 4)
    with placement.scope():
        assert tf.distribute.get_strategy() is placement.strategy
    assert placement.device_names == ("/cpu:0",)


@without_gpu
def test_auto_without_npu_or_gpu_is_cpu():
    assert Placement.create().device == "cpu"


def test_mixed_float16_wraps_once_and_compile_keeps_it():
    placement = Placement.create("cpu", precision="mixed_float16")
    assert placement.loss_scaling
    wrapped = placement.wrap_optimizer(keras.optimizers.SGD(0.1))
    assert isinstance(wrapped, keras.mixed_precision.LossScaleOptimizer)
    assert placement.wrap_optimizer(wrapped) is wrapped
    model = _tiny_model()
    model.compile(optimizer=wrapped, loss="mse")
    assert model.optimizer is wrapped
    assert not isinstance(wrapped.inner_optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert [type(c) for c in for_placement(placement)] == [LossScaleMonitor]


def test_mixed_bfloat16_sets_policy_without_loss_scaling():
    placement = Placement.create("cpu", precision="mixed_bfloat16")
    with placement.scope():
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    optimizer = keras.optimizers.SGD(0.1)
    assert placement.wrap_optimizer(optimizer) is optimizer
    assert for_placement(placement) == []


def test_the_policy_holds_inside_scope_only():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    placement = Placement.create("cpu", precision="mixed_float16")
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    with placement.scope():
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        layer = keras.layers.Dense(2)
    assert layer.dtype_policy.name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    with pytest.raises(RuntimeError, match="inside"):
        with placement.scope():
            raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"device": "tpu"}, ValueError),
        ({"precision": "float16"}, ValueError),
        pytest.param({"device": "gpu"}, RuntimeError, marks=without_gpu),
        ({"device": "npu"}, RuntimeError),
    ],
)
def test_bad_requests_raise(kwargs, error):
    with pytest.raises(error):
        Placement.create(**kwargs)


def test_tf_config_with_two_workers_makes_multi_worker_strategy(monkeypatch):
    made = []

    def multi_worker():
        made.append(True)
        return tf.distribute.get_strategy()

    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}),
    )
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", multi_worker)
    Placement.create("cpu")
    assert made == [True]
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        Placement.create("cpu")


def test_fake_npu_options_reject_unknown_fields(fake_npu):
    with pytest.raises(ValueError):
        fake_npu.global_options().precision_modus = "force_fp32"


def test_npu_one_device_calls_in_order(fake_npu, monkeypatch):
    monkeypatch.setenv("ASCEND_DEVICE_ID", "3")
    placement = Placement.create(precision="mixed_float16")
    assert isinstance(placement, AscendPlacement) and not placement.broadcasts_initial_weights
    assert placement.device == "npu" and placement.num_replicas_in_sync == 1
    with placement.scope():
        assert keras.mixed_precision.global_policy().name == "float32"
    optimizer = placement.wrap_optimizer(keras.optimizers.SGD(0.1))
    assert placement.wrap_optimizer(optimizer) is optimizer
    dataset = tf.data.Dataset.range(8)
    assert placement.distribute_dataset(dataset, 4) == (dataset, 4)
    assert [type(c) for c in for_placement(placement)] == [LossScaleMonitor]
    assert fake_npu.CALLS == [
        ("global_options", {}),
        ("global_options.set", {"field": "precision_mode", "value": "allow_mix_precision"}),
        ("open", {"device_id": 3}),
        ("as_default", {"device_id": 3}),
        ("NpuLossScaleOptimizer", {"inner": "SGD", "dynamic": True}),
    ]
    assert placement.device_names == ("npu:3",)


def test_npu_fp32_uses_force_fp32_and_no_loss_scaling(fake_npu):
    placement = Placement.create("npu", precision="fp32")
    optimizer = keras.optimizers.SGD(0.1)
    assert placement.wrap_optimizer(optimizer) is optimizer
    assert for_placement(placement) == []
    assert fake_npu.CALLS == [
        ("global_options", {}),
        ("global_options.set", {"field": "precision_mode", "value": "force_fp32"}),
        ("open", {"device_id": 0}),
        ("as_default", {"device_id": 0}),
    ]


def _two_rank_float16_calls(device_id, global_batch, model):
    """The npu_device calls, in order, of a float16 fit on one of two Ascend ranks."""
    return [
        ("global_options", {}),
        ("global_options.set", {"field": "precision_mode", "value": "allow_mix_precision"}),
        ("open", {"device_id": device_id}),
        ("as_default", {"device_id": device_id}),
        ("NpuLossScaleOptimizer", {"inner": "SGD", "dynamic": True}),
        (
            "npu_distributed_keras_optimizer_wrapper",
            {"optimizer": "NpuLossScaleOptimizer", "reduce_reduction": "mean"},
        ),
        ("shard_and_rebatch_dataset", {"global_bs": global_batch}),
        ("broadcast", {"count": len(model.trainable_variables), "root_rank": 0}),
    ]


def test_npu_two_ranks_shard_wrap_and_broadcast_in_order(fake_npu, monkeypatch):
    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("RANK_ID", "1")
    placement = Placement.create(precision="mixed_float16")
    assert placement.num_replicas_in_sync == 2
    model = _tiny_model()
    model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.1)), loss="mse")
    records = tf.data.Dataset.range(16).map(lambda i: (tf.fill([3], tf.cast(i, tf.float32)), tf.zeros([2])))
    shard, batch_size = placement.distribute_dataset(records, 8)
    assert batch_size == 4
    assert [int(x[0]) for x, _ in shard] == list(range(1, 16, 2))
    callbacks = for_placement(placement)
    assert [type(c) for c in callbacks] == [BroadcastInitialWeights, LossScaleMonitor]
    history = model.fit(shard.batch(batch_size), epochs=1, verbose=0, callbacks=callbacks)
    assert history.history["skipped_steps"] == [0]
    assert fake_npu.CALLS == _two_rank_float16_calls(device_id=0, global_batch=8, model=model)


def test_npu_defaults_to_allow_mix_precision_and_cpu_to_fp32(fake_npu):
    placement = Placement.create()
    assert (placement.device, placement.precision, placement.loss_scaling) == ("npu", "mixed_float16", True)
    assert ("global_options.set", {"field": "precision_mode", "value": "allow_mix_precision"}) in fake_npu.CALLS
    assert Placement.create("cpu").precision == "fp32"


def test_npu_arcface_fit_on_the_tfds_pipeline_makes_the_npu_calls_in_order(fake_npu, monkeypatch, tfds_data_dir):
    """What `faceid train` does on rank 0 of two Ascend devices, through a real fit of ArcFaceModel."""
    from faceid_keras import data
    from faceid_keras.model import ArcFaceModel

    monkeypatch.setenv("ASCEND_DEVICE_ID", "1")
    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("RANK_ID", "0")
    placement = Placement.create()
    num_classes, shape = data.dataset_info(str(tfds_data_dir))
    with placement.scope():
        inputs = keras.Input(shape)
        features = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, strides=4)(inputs))
        model = ArcFaceModel(keras.Model(inputs, keras.layers.Dense(8)(features)), num_classes=num_classes)
        model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.01)))
    dataset = data.train_dataset(str(tfds_data_dir), batch_size=8, seed=0, placement=placement)
    images, labels = next(iter(dataset))
    assert images.shape[0] == 4 and labels.shape == (4,)  # this rank's half of the global batch
    history = model.fit(dataset.take(3), epochs=1, verbose=0, callbacks=for_placement(placement))
    assert fake_npu.CALLS == _two_rank_float16_calls(device_id=1, global_batch=8, model=model)
    # float32 on the host: nothing overflows at the initial scale.
    assert history.history["skipped_steps"] == [0] and history.history["last_step_finite"] == [1]
    assert history.history["loss_scale"] == [2.0**15]
    assert int(model.optimizer.iterations) == 3


def test_faceid_train_on_two_npu_ranks_makes_the_npu_calls_in_order(fake_npu, monkeypatch, tfds_data_dir, tmp_path):
    """`faceid train --device npu` on rank 0 of two: precision defaults to allow_mix_precision."""
    from faceid_keras import cli, train, training

    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("RANK_ID", "0")
    args = cli.build_parser().parse_args([
        "train", "--data_path", str(tfds_data_dir), "--model_dir", str(tmp_path / "run"), "--device", "npu",
        "--backbone", "iresnet18", "--embedding_size", "16", "--batch_size", "4", "--train_epochs", "2",
        "--steps", "2", "--targets", "none", "--verbose", "0",
    ])
    result = training.train(train.config_from_args(args))
    assert [name for name, _ in fake_npu.CALLS] == [
        "global_options", "global_options.set", "open", "as_default", "NpuLossScaleOptimizer",
        "npu_distributed_keras_optimizer_wrapper",
        "shard_and_rebatch_dataset", "shard_and_rebatch_dataset",  # one record stream per epoch
        "broadcast",
    ]
    assert fake_npu.CALLS[1][1]["value"] == "allow_mix_precision"
    assert all(details["global_bs"] == 8 for name, details in fake_npu.CALLS if name == "shard_and_rebatch_dataset")
    assert result.summary["steps"] == 4 and result.history["skipped_steps"][-1] >= 0
    assert os.path.exists(result.model_path) and os.path.exists(result.embedding_path)


@without_gpu
def test_npu_device_does_not_import_under_keras_3(monkeypatch):
    if not compat.KERAS_3:
        pytest.skip("Keras 2: npu_device imports")
    monkeypatch.syspath_prepend(str(FAKE_NPU))
    for name in [m for m in sys.modules if m == "npu_device" or m.startswith("npu_device.")]:
        monkeypatch.delitem(sys.modules, name)
    assert Placement.create().device == "cpu"
    with pytest.raises(RuntimeError, match="npu_device"):
        Placement.create("npu")


def test_npu_rank_outside_rank_size_raises(fake_npu, monkeypatch):
    monkeypatch.setenv("RANK_SIZE", "2")
    monkeypatch.setenv("RANK_ID", "2")
    with pytest.raises(ValueError, match="RANK_ID"):
        Placement.create()


def test_two_cpu_replicas_step_like_one_replica_with_the_global_batch():
    lines = [line for line in run_worker("two_replicas_step").splitlines() if line.startswith("RESULT ")]
    assert lines
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == [2, 1]
    assert len(result["devices"]) == 2
    assert result["update"] > 1e-3
    assert result["diff"] <= 1e-5 * max(1.0, result["update"])
