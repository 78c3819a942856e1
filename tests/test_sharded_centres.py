"""Model-parallel class centres (MarginHead(shard_centres=True)): exact equality with the unsharded
model, per-replica memory, sampling within shards, saving across replica counts, loss scaling."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from faceid_keras import ArcFaceModel, cli, compat
from faceid_keras.heads import MarginHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_keras3 = pytest.mark.skipif(not compat.KERAS_3, reason="sharded centres need Keras 3 (tf.distribute)")

# Runs on two logical CPUs (MirroredStrategy) in a fresh interpreter and writes its numbers to
# results.npz / results.json in the working folder; the tests below check them.
_TWO_REPLICAS = """
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from faceid_keras import ArcFaceModel

one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out, info = {}, {}
rng = np.random.default_rng(0)
C = 7  # two shards of S = 4 rows; the last row of shard 1 is padding
images = rng.uniform(0, 255, size=(24, 8, 8, 3)).astype("float32")
labels = rng.integers(0, C, size=24).astype("int32")

def backbone():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(x)))

def make(strategy, shard, num_classes=C, sample_rate=1.0, momentum=0.9, decoupled=1e-3):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = ArcFaceModel(backbone(), num_classes=num_classes, scale=8.0, weight_decay=0.05,
                             shard_centres=shard, sample_rate=sample_rate)
        schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.8)
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=decoupled),
                      jit_compile=False)
    return model

def full(model, name="centres"):
    return model.head.gather_shards(getattr(model.head, name))

# 3. Per-replica shards: S rows on each replica, different initial values, N(0, 0.01) overall.
big = make(mirrored, True, num_classes=999)
components = mirrored.experimental_local_results(big.head.centres.value)
info["component_shapes"] = [list(c.shape) for c in components]
out["component0"], out["component1"] = (c.numpy() for c in components)
out["init_full"] = full(big)

# 1. Two replicas sharded == one replica unsharded, with the same start.
plain = make(one_device, False)
sharded = make(mirrored, True)
sharded.head.assign_shards(sharded.head.centres, plain.head.centres.numpy())
for a, b in zip(plain.backbone.weights, sharded.backbone.weights):
    b.assign(a.numpy())
out["start_centres"] = plain.head.centres.numpy()
histories = [m.fit(images, labels, batch_size=12, epochs=2, shuffle=False, verbose=0).history
             for m in (plain, sharded)]
info["plain_history"], info["sharded_history"] = histories
out["plain_centres"], out["sharded_centres"] = plain.head.centres.numpy(), full(sharded)
out["plain_momentum"] = [v for v in plain.optimizer.variables if "centres" in v.path][0].numpy()
out["sharded_momentum"] = full(sharded, "momentum")
for i, (a, b) in enumerate(zip(plain.backbone.weights, sharded.backbone.weights)):
    out[f"plain_backbone{i}"], out[f"sharded_backbone{i}"] = a.numpy(), b.numpy()
info["plain_eval"] = plain.evaluate(images, labels, batch_size=24, verbose=0, return_dict=True)
info["sharded_eval"] = sharded.evaluate(images, labels, batch_size=24, verbose=0, return_dict=True)

# 4. Save on two replicas; load on one device (no strategy) and back on two.
sharded.save("sharded.keras")
sharded.save_weights("sharded.weights.h5")
embeddings = sharded.predict(images, verbose=0)
out["embeddings"], out["logits"] = embeddings, sharded.head(embeddings).numpy()
out["plain_logits"] = plain.head(embeddings).numpy()
halves = mirrored.experimental_distribute_values_from_function(
    lambda context: embeddings[12 * context.replica_id_in_sync_group:][:12])
in_replicas = tf.function(lambda e: mirrored.gather(mirrored.run(sharded.head, args=(e,)), axis=0))
out["replica_logits"] = in_replicas(halves).numpy()
single = keras.models.load_model("sharded.keras")
info["single_shards"] = single.head.num_shards
out["single_embeddings"] = single.predict(images, verbose=0)
out["single_logits"] = single.head(embeddings).numpy()
out["single_centres"], out["single_momentum"] = full(single), full(single, "momentum")
info["single_iterations"] = int(single.optimizer.iterations)
resumed = make(mirrored, True)
with mirrored.scope():
    resumed.optimizer.build(resumed.trainable_variables)
resumed.load_weights("sharded.weights.h5")
out["resumed_centres"], out["resumed_momentum"] = full(resumed), full(resumed, "momentum")
for model, name in ((sharded, "continued"), (resumed, "resumed")):
    info[name + "_history"] = model.fit(images, labels, batch_size=12, epochs=1, shuffle=False, verbose=0).history
    out[name + "_after"] = full(model)
    out[name + "_kernel"] = model.backbone.weights[-2].numpy()
# One device -> two replicas, through .weights.h5 and .keras.
single.fit(images, labels, batch_size=24, epochs=1, verbose=0)
single.save_weights("single.weights.h5")
single.save("single.keras")
out["single_trained"] = full(single)
spread = make(mirrored, True)
with mirrored.scope():
    spread.optimizer.build(spread.trainable_variables)
spread.load_weights("single.weights.h5")
out["spread_centres"] = full(spread)
with mirrored.scope():
    spread_model = keras.models.load_model("single.keras")
info["spread_model_shards"] = spread_model.head.num_shards
out["spread_model_centres"] = full(spread_model)
out["spread_model_momentum"] = full(spread_model, "momentum")
out["single_trained_momentum"] = full(single, "momentum")

# 2. Sampling within shards (momentum 0): only the sampled rows of each shard move.
sampled = make(mirrored, True, num_classes=40, sample_rate=0.25, momentum=0.0, decoupled=None)
sample_labels = np.array([0, 1, 2, 3, 5, 5, 8, 9, 25, 30, 31, 39], "int32")
sample_images = images[:12]
head = sampled.head
for step in range(2):
    before = full(sampled)
    logs = sampled.train_on_batch(sample_images, sample_labels, return_dict=True)
    changed = np.flatnonzero(np.any(full(sampled) != before, axis=1))
    expected = []
    for replica in range(2):
        first = replica * head.shard_size
        local = tf.constant(sample_labels - first)
        owned = (local >= 0) & (local < head.shard_size)
        rows = head._sample_shard(local, owned, head.shard_size, step, replica).numpy()
        expected.extend((rows + first).tolist())
    info[f"sample{step}"] = {"changed": changed.tolist(), "expected": expected, "loss": logs["loss"]}
info["shard_size_40"] = head.shard_size

np.savez("results.npz", **out)
with open("results.json", "w") as f:
    json.dump(info, f)
print("done")
"""


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Numbers from one run of `_TWO_REPLICAS` on two logical CPUs: (arrays, json info, folder)."""
    if not compat.KERAS_3:
        pytest.skip("sharded centres need Keras 3 (tf.distribute)")
    folder = tmp_path_factory.mktemp("two_replicas")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_TWO_REPLICAS)], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-4000:]
    with open(folder / "results.json") as f:
        info = json.load(f)
    return dict(np.load(folder / "results.npz")), info, folder


def test_each_replica_holds_its_own_shard_with_its_own_initial_values(two_replicas):
    out, info, _ = two_replicas
    assert info["component_shapes"] == [[500, 8], [500, 8]]  # ceil(999 / 2) rows, not 999
    first, second = out["component0"], out["component1"]
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(second[-1], 0.0)  # the padding row
    whole = out["init_full"]
    assert whole.shape == (999, 8)
    np.testing.assert_array_equal(whole, np.concatenate([first, second])[:999])
    assert abs(whole.mean()) < 5e-4 and abs(whole.std() - 0.01) < 5e-4
    assert np.unique(whole).size == whole.size


def test_two_sharded_replicas_train_like_one_unsharded_device(two_replicas):
    out, info, _ = two_replicas
    plain, sharded = info["plain_history"], info["sharded_history"]
    np.testing.assert_allclose(sharded["loss"], plain["loss"], rtol=1e-5)
    assert sharded["accuracy"] == plain["accuracy"]
    assert np.abs(out["plain_centres"] - out["start_centres"]).max() > 1e-3
    np.testing.assert_allclose(out["sharded_centres"], out["plain_centres"], rtol=1e-4, atol=1e-6)
    assert np.abs(out["plain_momentum"]).max() > 1e-3
    np.testing.assert_allclose(out["sharded_momentum"], out["plain_momentum"], rtol=1e-4, atol=1e-6)
    count = len([k for k in out if k.startswith("plain_backbone")])
    assert count == 4
    for i in range(count):
        np.testing.assert_allclose(out[f"sharded_backbone{i}"], out[f"plain_backbone{i}"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(info["sharded_eval"]["loss"], info["plain_eval"]["loss"], rtol=1e-5)
    assert info["sharded_eval"]["accuracy"] == info["plain_eval"]["accuracy"]
    # head(embeddings) on sharded centres: cosines against all classes, gathered in order.
    np.testing.assert_allclose(out["logits"], out["plain_logits"], rtol=1e-4, atol=1e-4)
    # ... and inside a replica context, each replica its own examples' logits.
    np.testing.assert_allclose(out["replica_logits"], out["plain_logits"], rtol=1e-4, atol=1e-4)


def test_sampling_moves_only_each_shards_sample_holding_every_positive(two_replicas):
    _, info, _ = two_replicas
    assert info["shard_size_40"] == 20
    labels = {0, 1, 2, 3, 5, 8, 9, 25, 30, 31, 39}
    for step in (0, 1):
        record = info[f"sample{step}"]
        changed, expected = record["changed"], sorted(record["expected"])
        assert np.isfinite(record["loss"])
        assert changed == expected
        assert labels <= set(changed)
        # Shard 0 has 7 positives (rows 0-9), shard 1 has 4 (< int(0.25 * 20) = 5).
        assert len([r for r in changed if r < 20]) == 7 and len([r for r in changed if r >= 20]) == 5
    assert info["sample0"]["changed"] != info["sample1"]["changed"]


def test_saved_shards_load_on_one_device_and_back_on_two(two_replicas):
    out, info, _ = two_replicas
    assert info["single_shards"] == 1 and info["single_iterations"] == 4
    # The same weights; one device computes the batch of 24 in one matmul, two replicas in halves.
    np.testing.assert_allclose(out["single_embeddings"], out["embeddings"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["single_logits"], out["logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["single_centres"], out["sharded_centres"])
    np.testing.assert_array_equal(out["single_momentum"], out["sharded_momentum"])
    np.testing.assert_array_equal(out["resumed_centres"], out["sharded_centres"])
    np.testing.assert_array_equal(out["resumed_momentum"], out["sharded_momentum"])
    # Training on after the round trip is training on without it.
    assert info["resumed_history"] == info["continued_history"]
    np.testing.assert_array_equal(out["resumed_after"], out["continued_after"])
    np.testing.assert_array_equal(out["resumed_kernel"], out["continued_kernel"])
    # One device -> two replicas.
    assert np.abs(out["single_trained"] - out["single_centres"]).max() > 1e-4
    np.testing.assert_array_equal(out["spread_centres"], out["single_trained"])
    assert info["spread_model_shards"] == 2
    np.testing.assert_array_equal(out["spread_model_centres"], out["single_trained"])
    np.testing.assert_array_equal(out["spread_model_momentum"], out["single_trained_momentum"])


def test_saved_sharded_model_loads_in_a_fresh_process_with_safe_mode(two_replicas):
    out, _, folder = two_replicas
    model = keras.models.load_model(folder / "sharded.keras", safe_mode=True)
    assert isinstance(model, ArcFaceModel) and model.shard_centres and model.get_config()["shard_centres"]
    images = np.random.default_rng(0).uniform(0, 255, size=(24, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(images, verbose=0), out["single_embeddings"])
    np.testing.assert_array_equal(model.head.gather_shards(model.head.centres), out["sharded_centres"])


def dense_backbone(size=8):
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Dense(size)(keras.layers.Flatten()(inputs)))


def _pair(weight_decay=0.05, **compile_kwargs):
    keras.utils.set_random_seed(3)
    plain = ArcFaceModel(dense_backbone(), num_classes=6, scale=8.0, weight_decay=weight_decay)
    sharded = ArcFaceModel(dense_backbone(), num_classes=6, scale=8.0, weight_decay=weight_decay,
                           shard_centres=True)
    sharded.backbone.set_weights(plain.backbone.get_weights())
    sharded.head.assign_shards(sharded.head.centres, plain.head.centres.numpy())
    return plain, sharded


@needs_keras3
def test_one_device_sharded_head_steps_like_keras_sgd():
    plain, sharded = _pair()
    assert sharded.head.num_shards == 1 and sharded.head.centres.shape == (6, 8)
    for model in (plain, sharded):
        model.compile(optimizer=keras.optimizers.SGD(0.3, momentum=0.9, nesterov=True), jit_compile=False)
    rng = np.random.default_rng(4)
    for step in range(3):
        images = rng.uniform(0, 255, size=(8, 8, 8, 3)).astype("float32")
        labels = rng.integers(0, 6, size=8).astype("int32")
        logs = [m.train_on_batch(images, labels, return_dict=True) for m in (plain, sharded)]
        np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], rtol=1e-6)
        assert logs[1]["accuracy"] == logs[0]["accuracy"]
        np.testing.assert_allclose(sharded.head.centres.numpy(), plain.head.centres.numpy(), rtol=1e-5, atol=1e-7)
        for a, b in zip(plain.backbone.weights, sharded.backbone.weights):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)
    momentum = [v for v in plain.optimizer.variables if "centres" in v.path][0].numpy()
    np.testing.assert_allclose(sharded.head.momentum.numpy(), momentum, rtol=1e-5, atol=1e-7)
    assert not any("centres" in v.path for v in sharded.optimizer.variables)


@needs_keras3
@pytest.mark.parametrize(
    "optimizer, match",
    [(lambda: keras.optimizers.Adam(1e-3), "not Adam"),
     (lambda: keras.optimizers.SGD(0.1, clipnorm=1.0), "clipnorm"),
     (lambda: keras.optimizers.SGD(0.1, use_ema=True), "use_ema")],
)
def test_sharded_centres_need_plain_sgd(optimizer, match):
    model = ArcFaceModel(dense_backbone(), num_classes=4, shard_centres=True)
    model.compile(optimizer=optimizer(), jit_compile=False)
    with pytest.raises(ValueError, match=match):
        model.train_on_batch(np.zeros((2, 8, 8, 3), "float32"), np.array([0, 1], "int32"))


@needs_keras3
def test_sharded_head_rejects_unsharded_files_and_bad_arguments(tmp_path):
    plain = ArcFaceModel(dense_backbone(), num_classes=4)
    plain.save_weights(tmp_path / "plain.weights.h5")
    sharded = ArcFaceModel(dense_backbone(), num_classes=4, shard_centres=True)
    with pytest.raises(ValueError, match="saved by a head with shard_centres=False"):
        sharded.load_weights(tmp_path / "plain.weights.h5")
    with pytest.raises(ValueError, match=r"entry 'x' has shape \(3, 8\), expected \(4, 8\)"):
        sharded.head.assign_shards(sharded.head.centres, np.zeros((3, 8)), "x")
    with pytest.raises(ValueError, match="shard_centres must be True or False"):
        MarginHead(4, shard_centres="yes")


@pytest.mark.skipif(compat.KERAS_3, reason="Keras 3 supports sharded centres")
def test_keras2_refuses_sharded_centres_clearly():
    with pytest.raises(NotImplementedError, match="needs Keras 3"):
        MarginHead(4, shard_centres=True)
    with pytest.raises(NotImplementedError, match="needs Keras 3"):
        ArcFaceModel(dense_backbone(), num_classes=4, shard_centres=True)


@needs_keras3
def test_float16_overflow_skips_the_shard_update_too():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(5)
        model = ArcFaceModel(dense_backbone(), num_classes=4, scale=8.0, shard_centres=True)
        optimizer = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                                                             initial_scale=256.0)
        model.compile(optimizer=optimizer, jit_compile=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
    labels = np.array([0, 1, 2, 3], "int32")

    def state():
        return [model.head.centres.numpy(), model.head.momentum.numpy(), *model.backbone.get_weights()]

    model.train_on_batch(images, labels)
    before = state()
    assert np.abs(before[1]).max() > 0
    logs = model.train_on_batch(np.full_like(images, 1e7), labels, return_dict=True)  # inf in float16
    assert not np.isfinite(logs["loss"])
    for a, b in zip(before, state()):
        np.testing.assert_array_equal(a, b)
    assert float(optimizer.dynamic_scale) == 128.0 and int(optimizer.iterations) == 1
    model.train_on_batch(images, labels)
    after = state()
    assert all(np.any(a != b) for a, b in zip(before, after))


@needs_keras3
def test_faceid_train_with_sharded_centres(tfds_data_dir, tmp_path, capsys):
    model_dir = tmp_path / "run"
    status = cli.main(["train", "--data_path", str(tfds_data_dir), "--model_dir", str(model_dir),
                       "--train_epochs", "1", "--steps", "2", "--targets", "none", "--shard_centres",
                       "--backbone", "iresnet18", "--embedding_size", "16", "--batch_size", "8",
                       "--jit_compile", "false", "--verbose", "0"])
    assert status == 0, capsys.readouterr().out[-3000:]
    model = keras.models.load_model(model_dir / "model.keras")
    assert model.shard_centres and int(model.optimizer.iterations) == 2
    assert model.head.centres.shape == (8, 16) and np.abs(model.head.momentum.numpy()).max() > 0


# Run by two worker processes (TF_CONFIG) with sharded centres and once by a single process with
# the same global batches and unsharded centres; both save the whole centres to `<out>.npy`.
_WORKER = """
import json, os, sys
import keras, numpy as np, tensorflow as tf
from faceid_keras.model import ArcFaceModel
from faceid_keras.placement import Placement

out, shard = sys.argv[1], sys.argv[2] == "1"
placement = Placement.create("cpu")
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (24, 8, 8, 3)).astype("float32")
labels = rng.integers(0, 7, 24).astype("int32")
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).with_options(options)
with placement.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    backbone = keras.Model(inputs, keras.layers.Dense(8)(keras.layers.Flatten()(inputs)))
    model = ArcFaceModel(backbone, num_classes=7, scale=8.0, weight_decay=5e-4, shard_centres=shard)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
start = os.path.join(os.path.dirname(out), "start.npy")
if shard:
    model.head.assign_shards(model.head.centres, np.load(start))
else:
    np.save(start, model.head.centres.numpy())
history = model.fit(dataset, epochs=2, verbose=0).history
with placement.output_dir(out + "_model") as folder:  # a collective op: every worker saves
    model.save(os.path.join(folder, "model.keras"))
np.save(out + ".npy", model.head.gather_shards(model.head.centres) if shard else model.head.centres.numpy())
with open(out + ".json", "w") as f:
    json.dump({"loss": history["loss"], "replicas": placement.num_replicas_in_sync}, f)
"""


@needs_keras3
@pytest.mark.slow
def test_two_workers_with_sharded_centres_step_like_one_unsharded_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "0"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    workers = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"worker{index}"), "1"],
            env={**env, "TF_CONFIG": json.dumps(config)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in processes), "\n".join(o[-3000:] for o in outputs)
    reference = np.load(tmp_path / "single.npy")
    with open(tmp_path / "single.json") as f:
        reference_loss = json.load(f)["loss"]
    for index in range(2):
        with open(tmp_path / f"worker{index}.json") as f:
            info = json.load(f)
        assert info["replicas"] == 2
        np.testing.assert_allclose(info["loss"], reference_loss, rtol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"worker{index}.npy"), reference, rtol=1e-4, atol=1e-6)
    saved = keras.models.load_model(tmp_path / "worker0_model" / "model.keras")
    np.testing.assert_allclose(saved.head.centres.numpy(), reference, rtol=1e-4, atol=1e-6)
