"""Multi-worker training: two real worker processes (MultiWorkerMirroredStrategy from TF_CONFIG)
on localhost step like one process with the same global batch, and only the chief writes files."""
import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from faceid_keras.placement import Placement

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240

# The two workers run this script with TF_CONFIG set; the test process runs it once without, as
# the single-process reference.
_TRAIN = textwrap.dedent(
    """
    import json
    import os
    import sys

    import keras
    import numpy as np
    import tensorflow as tf

    from faceid_keras.model import ArcFaceModel
    from faceid_keras.placement import Placement

    out, result = sys.argv[1], sys.argv[2]
    placement = Placement.create("cpu")

    # One deterministic dataset of global batches, the same in every process. Its examples come
    # from memory (no files), so it is sharded by DATA: each worker reads it all and keeps its
    # part of every global batch; AUTO would try FILE sharding first and fall back with a warning.
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (24, 8, 8, 3)).astype("float32")
    labels = (np.arange(24) % 12).astype("int32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).with_options(options)

    with placement.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
        x = keras.layers.Dense(8)(keras.layers.Flatten()(x))
        model = ArcFaceModel(keras.Model(inputs, x), num_classes=12, scale=8.0, weight_decay=5e-4,
                             sample_rate=0.5)
        model.compile(optimizer=placement.wrap_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)),
                      jit_compile=False)
    start = [w.numpy() for w in model.weights]
    callbacks = [keras.callbacks.CSVLogger(os.path.join(out, "log.csv"))] if placement.is_chief else []
    with placement.output_dir(os.path.join(out, "checkpoints")) as folder:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            os.path.join(folder, "epoch{epoch}.weights.h5"), save_weights_only=True))
        history = model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks).history
        worker_folder = folder
    with placement.output_dir(out) as folder:
        model.save_weights(os.path.join(folder, "final.weights.h5"))
    np.savez(result, *[w.numpy() for w in model.weights])
    with open(result + ".json", "w") as f:
        json.dump({
            "task": list(placement.task), "chief": placement.is_chief,
            "replicas": placement.num_replicas_in_sync, "loss": history["loss"],
            "worker_folder": worker_folder,
            "update": max(float(np.abs(w.numpy() - s).max()) for w, s in zip(model.weights, start)),
        }, f)
    """
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(script: Path, out: Path, result: Path, tf_config: dict, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", TF_CONFIG=json.dumps(tf_config))
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        return subprocess.Popen([sys.executable, str(script), str(out), str(result)], cwd=REPO, env=env,
                                stdout=stream, stderr=subprocess.STDOUT)


def test_two_workers_step_like_one_process_and_only_the_chief_writes(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    runs = {
        "worker0": {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}},
        "worker1": {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}},
    }
    processes = {}
    try:
        for name, tf_config in runs.items():
            processes[name] = _start(script, tmp_path / name, tmp_path / f"{name}.npz", tf_config,
                                     tmp_path / f"{name}.log")
        monkeypatch.delenv("TF_CONFIG", raising=False)
        (tmp_path / "single").mkdir()
        argv = sys.argv
        sys.argv = [str(script), str(tmp_path / "single"), str(tmp_path / "single.npz")]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
            keras.mixed_precision.set_global_policy("float32")
        deadline = time.monotonic() + TIMEOUT
        for name, process in processes.items():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("training processes did not finish in time:\n" + "\n".join(
            f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-2000:]}" for n in runs))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"

    names = [*runs, "single"]
    info = {name: json.loads((tmp_path / f"{name}.npz.json").read_text()) for name in names}
    assert info["worker0"]["task"] == ["worker", 0] and info["worker0"]["chief"]
    assert info["worker1"]["task"] == ["worker", 1] and not info["worker1"]["chief"]
    assert info["single"]["chief"] and info["single"]["replicas"] == 1
    assert info["worker0"]["replicas"] == info["worker1"]["replicas"] == 2

    weights = {name: np.load(tmp_path / f"{name}.npz") for name in names}
    assert info["single"]["update"] > 1e-3
    for key in weights["single"].files:
        np.testing.assert_array_equal(weights["worker0"][key], weights["worker1"][key])
        single = weights["single"][key]
        assert np.abs(weights["worker0"][key] - single).max() <= 1e-5 * np.abs(single).max(), key
    np.testing.assert_allclose(info["worker0"]["loss"], info["single"]["loss"], rtol=1e-5)

    written = {"log.csv", "final.weights.h5", "checkpoints/epoch1.weights.h5",
               "checkpoints/epoch2.weights.h5"}
    assert {p.relative_to(tmp_path / "worker0").as_posix() for p in (tmp_path / "worker0").rglob("*")
            if p.is_file()} == written
    assert not [p for p in (tmp_path / "worker1").rglob("*")]
    assert not os.path.exists(info["worker1"]["worker_folder"])


def test_chief_is_the_chief_task_or_worker_zero(monkeypatch):
    """`task` and `is_chief` read the cluster of the strategy (no processes started)."""
    def placement(cluster, task_type, index):
        config = {"cluster": cluster, "task": {"type": task_type, "index": index}}
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = type("Strategy", (), {"cluster_resolver": resolver, "num_replicas_in_sync": 1})()
        return Placement("cpu", strategy=strategy)

    two = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    assert placement(two, "worker", 0).is_chief and not placement(two, "worker", 1).is_chief
    with_chief = {"chief": ["127.0.0.1:3"], "worker": ["127.0.0.1:4"]}
    assert placement(with_chief, "chief", 0).is_chief
    assert placement(with_chief, "worker", 0).task == ("worker", 0)
    assert not placement(with_chief, "worker", 0).is_chief
    monkeypatch.delenv("TF_CONFIG")
    single = Placement.create("cpu")
    assert single.task == ("worker", 0) and single.is_chief
    with single.output_dir(Path(os.environ.get("TMPDIR", "/tmp")) / "faceid-chief-dir") as folder:
        assert folder.endswith("faceid-chief-dir") and os.path.isdir(folder)
    os.rmdir(folder)
    worker = placement(two, "worker", 1)
    with worker.output_dir("/nonexistent/shared") as folder:
        assert os.path.isdir(folder) and "worker1" in os.path.basename(folder)
        Path(folder, "x").write_text("x")
    assert not os.path.exists(folder) and not os.path.exists("/nonexistent/shared")
