"""Training data on disk: an insightface folder built into a tfds data dir, or a data dir already built.

`faceid train --data_path` takes either; with several workers only the chief builds, the others
wait until tfds has renamed the finished build into place.
"""
from __future__ import annotations

import os
import time

import tensorflow_datasets as tfds

import tfds_ms1m
from faceid_keras import data
from tfds_ms1m.binpack import VERIFICATION_TARGETS

DATA_POLL_SECONDS = 2.0


def prepare_tfds(folder: str, data_dir: str) -> str:
    """Builds the `train` and `verification` configs of an insightface folder into a tfds data dir.

    Configs already built there are reused; `verification` is skipped when there is no `.bin` pack.
    Returns `data_dir`.
    """
    config = tfds.download.DownloadConfig(manual_dir=folder)
    has_packs = any(os.path.exists(os.path.join(folder, f"{t}.bin")) for t in VERIFICATION_TARGETS)
    for name in ("train", "verification"):
        builder = tfds.builder(f"{tfds_ms1m.Builder.name}/{name}", data_dir=data_dir)
        if builder.is_prepared():
            print(f"Using ms1m_arcface/{name} already built in {data_dir}")
            continue
        if name == "verification" and not has_packs:
            continue
        print(f"Building ms1m_arcface/{name} from {folder} into {data_dir}")
        builder.download_and_prepare(download_config=config)
    return data_dir


def wait_for_tfds(folder: str, data_dir: str, timeout: float) -> str:
    """Waits until another process (the chief) has built `folder` into `data_dir`; returns `data_dir`.

    tfds builds a config in a temporary folder and renames it into place when complete, so a config
    counts as built once `is_prepared()`. Raises TimeoutError after `timeout` seconds.
    """
    has_packs = any(os.path.exists(os.path.join(folder, f"{t}.bin")) for t in VERIFICATION_TARGETS)
    names = ("train", "verification") if has_packs else ("train",)
    pending = [tfds.builder(f"{tfds_ms1m.Builder.name}/{name}", data_dir=data_dir) for name in names]
    deadline = time.monotonic() + timeout
    print(f"Waiting for the chief to build ms1m_arcface from {folder} into {data_dir}")
    while True:
        pending = [builder for builder in pending if not builder.is_prepared()]
        if not pending:
            return data_dir
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{pending[0].data_path}: not built by the chief within --data_timeout {timeout:g} s. "
                "The tfds data dir must be on a filesystem every worker shares; or build it once "
                f"(tfds build ms1m_arcface --imports tfds_ms1m --manual_dir {folder} --data_dir DIR) "
                "and pass DIR as --data_path."
            )
        time.sleep(DATA_POLL_SECONDS)


def resolve_data_dir(data_path: str, tfds_data_dir: str, build: bool = True, timeout: float = 0.0) -> str:
    """The tfds data dir to train from: `data_path` itself, or `tfds_data_dir` built from it.

    With `build=False` (a worker other than the chief) an insightface `data_path` is not built
    here: this waits up to `timeout` seconds for the chief to build it.
    """
    if os.path.exists(os.path.join(data_path, "train.rec")):
        if not build:
            return wait_for_tfds(data_path, tfds_data_dir, timeout)
        return prepare_tfds(data_path, tfds_data_dir)
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path}: no such directory.")
    if not data.builder(data_path).is_prepared():
        raise FileNotFoundError(
            f"--data_path {data_path}: neither an insightface folder (no train.rec) nor a tfds data "
            "dir with ms1m_arcface built in it. Build one with: tfds build ms1m_arcface "
            f"--imports tfds_ms1m --manual_dir FOLDER --data_dir {data_path}"
        )
    return data_path
