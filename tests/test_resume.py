"""A training run killed with SIGKILL mid-epoch resumes and ends with exactly the steps of an unbroken run."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import faceid_keras  # noqa: F401  (registers the model classes for load_model)
from faceid_keras import train

from helpers import REPO, repo_env

EPOCHS, STEPS = 2, 5


def _command(data_dir, model_dir):
    return [
        sys.executable, "-m", "faceid_keras.cli", "train", "--data_path", str(data_dir),
        "--model_dir", str(model_dir), "--backbone", "iresnet18", "--embedding_size", "16",
        "--batch_size", "8", "--train_epochs", str(EPOCHS), "--steps", str(STEPS),
        "--backup_steps", "1", "--targets", "none", "--seed", "3", "--verbose", "2",
    ]


def _wait_for_mid_epoch_backup(state_path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it backed up mid-epoch"
        try:
            with open(state_path) as f:
                if json.load(f)["batch"] > 0:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no mid-epoch backup in {state_path} after {timeout} s")


def _kill_mid_epoch_and_rerun(data_dir, model_dir, log_dir):
    """Runs the command, SIGKILLs it after its first mid-epoch backup, reruns it; returns (state, rerun)."""
    command = _command(data_dir, model_dir)
    env = repo_env()
    state_path = model_dir / "backup" / "state.json"
    with open(log_dir / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_mid_epoch_backup(state_path, first)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL
    with open(state_path) as f:
        state = json.load(f)
    assert 0 < state["step"] < EPOCHS * STEPS and state["batch"] > 0

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return state, second


def test_sigkill_mid_epoch_then_rerun_finishes_with_the_same_steps(tfds_data_dir, tmp_path):
    model_dir = tmp_path / "run"
    state, second = _kill_mid_epoch_and_rerun(tfds_data_dir, model_dir, tmp_path)
    assert f"Resuming from epoch {state['epoch'] + 1} step {state['batch']} (global step {state['step']}" in second.stdout

    model = keras.models.load_model(model_dir / train.MODEL_FILE)
    assert int(model.optimizer.iterations) == EPOCHS * STEPS
    assert f"steps={EPOCHS * STEPS} " in second.stdout
    with open(model_dir / train.CSV_FILE) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == [str(e) for e in range(EPOCHS)]
    assert not os.path.exists(model_dir / "backup")


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_unbroken_run(tfds_data_dir, tmp_path):
    _kill_mid_epoch_and_rerun(tfds_data_dir, tmp_path / "resumed", tmp_path)
    unbroken = subprocess.run(_command(tfds_data_dir, tmp_path / "unbroken"), cwd=REPO, env=repo_env(),
                              capture_output=True, text=True, timeout=600)
    assert unbroken.returncode == 0, unbroken.stdout[-3000:] + unbroken.stderr[-3000:]
    resumed = keras.models.load_model(tmp_path / "resumed" / train.MODEL_FILE)
    reference = keras.models.load_model(tmp_path / "unbroken" / train.MODEL_FILE)
    for a, b in zip(resumed.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6, err_msg=a.name)
