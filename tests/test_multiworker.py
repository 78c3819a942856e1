"""Multi-worker training: two real worker processes (MultiWorkerMirroredStrategy from TF_CONFIG)
on localhost step like one process with the same global batch, and only the chief writes files;
`faceid train` run by two workers builds its data once, writes only from the chief and resumes both
workers from the chief's backup after they are killed."""
import csv
import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from faceid_keras.placement import Placement, StrategyPlacement
from helpers import REPO, WORKERS, local_cluster, repo_env, worker_command
TIMEOUT = 240

def _two_workers() -> dict[str, dict]:
    """TF_CONFIG of a fresh two-worker cluster on localhost, by worker name."""
    return {f"worker{i}": config for i, config in enumerate(local_cluster(2))}


def _start(argv: list[str], tf_config: dict, log: Path, **env: str) -> subprocess.Popen:
    env = repo_env(CUDA_VISIBLE_DEVICES="", TF_CONFIG=json.dumps(tf_config), **env)
    with open(log, "w") as stream:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)


def _logs(logs: dict[str, Path]) -> str:
    return "\n".join(f"--- {name}\n{log.read_text()[-3000:]}" for name, log in logs.items())


def _kill(processes: dict[str, subprocess.Popen]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_two_workers_step_like_one_process_and_only_the_chief_writes(tmp_path, monkeypatch):
    script = WORKERS / "multiworker_fit.py"
    runs = _two_workers()
    processes = {}
    try:
        for name, tf_config in runs.items():
            (tmp_path / name).mkdir()
            argv = worker_command("multiworker_fit", tmp_path / name, tmp_path / f"{name}.npz")
            processes[name] = _start(argv, tf_config, tmp_path / f"{name}.log")
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
        pytest.fail("training processes did not finish in time:\n" + _logs({n: tmp_path / f"{n}.log" for n in runs}))
    finally:
        _kill(processes)
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
        return StrategyPlacement("cpu", strategy=strategy)

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


def test_each_worker_gets_its_share_of_the_records_and_of_the_batch(monkeypatch):
    def shard(cluster, task_type, index):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}}))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        replicas = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        strategy = type("Strategy", (), {"cluster_resolver": resolver, "num_replicas_in_sync": replicas})()
        placement = StrategyPlacement("cpu", strategy=strategy)
        records, batch = placement.distribute_dataset(tf.data.Dataset.range(12), 6)
        return placement.worker_count, placement.worker_index, [int(r) for r in records], batch

    with_chief = {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]}
    assert shard(with_chief, "chief", 0) == (3, 0, [0, 3, 6, 9], 2)
    assert shard(with_chief, "worker", 0) == (3, 1, [1, 4, 7, 10], 2)
    assert shard(with_chief, "worker", 1) == (3, 2, [2, 5, 8, 11], 2)
    monkeypatch.delenv("TF_CONFIG")
    single = Placement.create("cpu")
    records, batch = single.distribute_dataset(tf.data.Dataset.range(12), 6)
    assert (single.worker_count, single.worker_index, [int(r) for r in records], batch) == (1, 0, list(range(12)), 6)


EPOCHS, STEPS = 1, 3


def _train_command(data_path: Path, tfds_dir: Path, model_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "faceid_keras.cli", "train", "--data_path", str(data_path),
        "--tfds_data_dir", str(tfds_dir), "--model_dir", str(model_dir), "--backbone", "iresnet18",
        "--embedding_size", "16", "--batch_size", "4", "--train_epochs", str(EPOCHS), "--steps", str(STEPS),
        "--backup_steps", "1", "--targets", "lfw", "--seed", "3", "--verbose", "2", "--jit_compile", "false",
    ]


def _wait_for_mid_epoch_backup(state_path: Path, processes: dict, logs: dict) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert all(p.poll() is None for p in processes.values()), "a worker ended early:\n" + _logs(logs)
        assert time.monotonic() < deadline, f"no mid-epoch backup after {TIMEOUT} s:\n" + _logs(logs)
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = None
        if state is not None and state["batch"] > 0:
            return state
        time.sleep(0.05)


def test_faceid_train_on_two_workers_writes_from_the_chief_and_resumes_both(synthetic_folder, tmp_path):
    """The chief builds the tfds data while worker 1 waits for it; both workers are killed after a
    mid-epoch backup; the rerun resumes both at the chief's step, and only the chief wrote files."""
    model_dir = tmp_path / "run"
    command = _train_command(synthetic_folder, tmp_path / "tfds", model_dir)
    temp = {name: tmp_path / f"tmp-{name}" for name in ("worker0", "worker1")}
    chief_pids = set()

    def start(phase: str) -> tuple[dict, dict]:
        logs = {name: tmp_path / f"{phase}-{name}.log" for name in temp}
        processes = {}
        for name, tf_config in _two_workers().items():
            temp[name].mkdir(exist_ok=True)
            processes[name] = _start(command, tf_config, logs[name], TMPDIR=str(temp[name]), PYTHONUNBUFFERED="1")
        chief_pids.add(processes["worker0"].pid)
        return processes, logs

    first, first_logs = start("first")
    try:
        state = _wait_for_mid_epoch_backup(model_dir / "backup" / "state.json", first, first_logs)
    finally:
        _kill(first)
    assert 0 < state["step"] < EPOCHS * STEPS
    assert "Building ms1m_arcface/train" in first_logs["worker0"].read_text()
    waited = first_logs["worker1"].read_text()
    assert "Waiting for the chief to build ms1m_arcface" in waited and "Building" not in waited
    assert os.listdir(tmp_path / "tfds" / "ms1m_arcface" / "train") == ["1.0.0"]

    second, second_logs = start("second")
    try:
        for process in second.values():
            process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed workers did not finish in time:\n" + _logs(second_logs))
    finally:
        _kill(second)
    outputs = {name: log.read_text() for name, log in second_logs.items()}
    for name, process in second.items():
        assert process.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"

    resumed = (f"Resuming from epoch {state['epoch'] + 1} step {state['batch']} "
               f"(global step {state['step']} of {EPOCHS * STEPS})")
    summaries = {}
    for name, output in outputs.items():
        assert resumed in output, f"{name}:\n{output[-3000:]}"
        line = [l for l in output.splitlines() if l.startswith("Final summary:")][-1]
        summaries[name] = dict(item.split("=") for item in line.split()[2:])
        assert summaries[name]["steps"] == str(EPOCHS * STEPS)
    for key in ("loss", "accuracy", "lfw"):
        assert summaries["worker0"][key] == summaries["worker1"][key], key
    assert "Saved " in outputs["worker0"] and "Saved " not in outputs["worker1"]

    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    events = {f for f in files if f.startswith("logs/")}
    assert files - events == {"training_log.csv", "model.keras", "embedding.keras"}
    writers = {re.fullmatch(r"logs/train/events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+\.v2", f) for f in events}
    assert events and None not in writers and {int(m.group(1)) for m in writers} <= chief_pids
    with open(model_dir / "training_log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == [str(e) for e in range(EPOCHS)]
    for name, folder in temp.items():
        assert not list(folder.glob("faceid-*")), f"{name} left {os.listdir(folder)}"
