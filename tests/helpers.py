"""Shared test helpers: child processes that import this checkout, free local ports, tiny backbones."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import keras
import pytest
import tensorflow as tf

from faceid_keras import cli

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"

# For tests of what happens where TensorFlow sees no GPU (device "auto" means the CPU there).
without_gpu = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                                 reason="asserts the behaviour of a host without a GPU")


def repo_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, so child processes test this code."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def worker_command(name: str, *args) -> list[str]:
    """The command line that runs tests/workers/<name>.py with `args`."""
    return [sys.executable, str(WORKERS / f"{name}.py"), *map(str, args)]


def _checked(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout or "")[-2000:] + (result.stderr or "")[-4000:]
    return result.stdout


def run_code(code: str, cwd, timeout: float = 300) -> str:
    """Runs `code` in a fresh interpreter (a new TF runtime, nothing registered in advance);
    asserts it succeeded and returns its standard output."""
    return _checked(subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=repo_env(),
                                   capture_output=True, text=True, timeout=timeout))


def run_worker(name: str, *args, cwd=None, timeout: float = 300, **env: str) -> str:
    """Runs tests/workers/<name>.py in a fresh interpreter; asserts it succeeded, returns its output."""
    return _checked(subprocess.run(worker_command(name, *args), cwd=cwd or REPO, env=repo_env(**env),
                                   capture_output=True, text=True, timeout=timeout))


def run_faceid(argv: list[str]) -> Any:
    """Runs `faceid ARGV` in this process and returns what the command's handler returned."""
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(workers: int) -> list[dict]:
    """TF_CONFIG of each worker of a fresh cluster on localhost."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    return [{"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}} for i in range(workers)]


def dense_backbone(input_shape=(8, 8, 3), size: int = 8, regularizer=None) -> keras.Model:
    """The smallest backbone: images -> Flatten -> Dense(size)."""
    images = keras.Input(input_shape)
    x = keras.layers.Flatten()(images)
    x = keras.layers.Dense(size, kernel_regularizer=regularizer)(x)
    return keras.Model(images, x, name="user_backbone")
