"""Model-parallel class centres (MarginHead(shard_centres=True)): exact equality with the unsharded
model, per-replica memory, sampling within shards, saving across replica counts, loss scaling."""
import json
import subprocess

import keras
import numpy as np
import pytest

from faceid_keras import ArcFaceModel, cli, compat
from faceid_keras.heads import MarginHead
from helpers import dense_backbone, local_cluster, repo_env, run_worker, worker_command

needs_keras3 = pytest.mark.skipif(not compat.KERAS_3, reason="sharded centres need Keras 3 (tf.distribute)")



@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Numbers from one run of tests/workers/sharded_two_replicas.py on two logical CPUs: (arrays, json info, folder)."""
    if not compat.KERAS_3:
        pytest.skip("sharded centres need Keras 3 (tf.distribute)")
    folder = tmp_path_factory.mktemp("two_replicas")
    assert "done" in run_worker("sharded_two_replicas", cwd=folder, timeout=600)
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




@needs_keras3
@pytest.mark.slow
def test_two_workers_with_sharded_centres_step_like_one_unsharded_process(tmp_path):
    env = repo_env(CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    single = subprocess.run(worker_command("sharded_worker", tmp_path / "single", 0), env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    processes = []
    for index, config in enumerate(local_cluster(2)):
        processes.append(subprocess.Popen(
            worker_command("sharded_worker", tmp_path / f"worker{index}", 1),
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
