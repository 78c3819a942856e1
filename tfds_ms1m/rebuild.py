"""Rebuild a prepared `ms1m_arcface` dataset without risking it: build beside it, then swap.

`tfds build ms1m_arcface --overwrite` deletes the prepared version folder as soon as it creates
the builder (tensorflow_datasets `scripts/cli/build.py`, `_make_builder`), before the manual dir is
read, so a broken or half-copied source folder leaves no dataset at all. Here the real `tfds build`
runs into a staging data dir inside the target data dir (same file system); only when it succeeds
is each built config moved into place, the old version folder renamed away first and deleted
last. On failure the staging dir is removed and the prepared data is untouched.

    python -m tfds_ms1m.rebuild [ms1m_arcface[/CONFIG]] --manual_dir ~/faces_emore \\
        [--data_dir ~/tensorflow_datasets] [any other `tfds build` flag]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence

import tensorflow_datasets as tfds

import tfds_ms1m

DATASET = "ms1m_arcface"


class RebuildError(RuntimeError):
    """The staged build failed; the prepared dataset was left as it was."""


def _default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _built_versions(staging: str) -> list[str]:
    """`CONFIG/VERSION` folders, relative to `staging/ms1m_arcface`, of the configs tfds built there."""
    found = []
    for config in tfds_ms1m.Builder.BUILDER_CONFIGS:
        builder = tfds.builder(f"{DATASET}/{config.name}", data_dir=staging)
        # is_prepared() warns about a version folder that is missing: only ask about the ones there.
        if os.path.isdir(builder.data_dir) and builder.is_prepared():
            found.append(os.path.relpath(builder.data_dir, os.path.join(staging, DATASET)))
    return found


def _swap_in(built: str, target: str) -> None:
    """Move the folder `built` to `target`; an existing `target` is renamed away, then deleted."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    old = None
    if os.path.exists(target):
        old = f"{target}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(built, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


def rebuild(data_dir: str, manual_dir: str, dataset: str = DATASET, tfds_flags: Sequence[str] = ()) -> list[str]:
    """Build `dataset` from `manual_dir` with `tfds build` beside `data_dir`'s copy and swap it in.

    Returns the `CONFIG/VERSION` folders replaced; raises RebuildError (data untouched) on failure.
    """
    if dataset.split("/")[0] != DATASET:
        raise ValueError(f"{dataset}: this command rebuilds {DATASET} only")
    if "--overwrite" in tfds_flags:
        raise ValueError("--overwrite is what this command avoids; leave it out")
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DATASET}-rebuild-", dir=data_dir)
    try:
        command = [
            sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", dataset,
            "--imports", "tfds_ms1m", "--data_dir", staging,
            "--manual_dir", os.path.expanduser(manual_dir), *tfds_flags,
        ]
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        if subprocess.run(command, env=dict(os.environ, PYTHONPATH=path)).returncode != 0:
            raise RebuildError(
                f"tfds build {dataset} from {manual_dir} failed (its error is above); the prepared "
                f"data in {os.path.join(data_dir, DATASET)} was not changed"
            )
        built = _built_versions(staging)
        if not built:
            raise RebuildError(f"tfds build {dataset} finished but built nothing in {staging}")
        for folder in built:
            _swap_in(os.path.join(staging, DATASET, folder), os.path.join(data_dir, DATASET, folder))
        metadata = os.path.join(staging, DATASET, ".config")
        if os.path.isdir(metadata) and not os.path.exists(os.path.join(data_dir, DATASET, ".config")):
            os.rename(metadata, os.path.join(data_dir, DATASET, ".config"))
        return built
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the dataset, --manual_dir and --data_dir; other flags go to `tfds build`."""
    parser = argparse.ArgumentParser(prog="python -m tfds_ms1m.rebuild", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", default=DATASET, help="ms1m_arcface or ms1m_arcface/CONFIG")
    parser.add_argument("--manual_dir", required=True, help="the insightface folder to build from")
    parser.add_argument("--data_dir", default=_default_data_dir(), help="tfds data dir to update")
    args, tfds_flags = parser.parse_known_args(argv)
    try:
        replaced = rebuild(args.data_dir, args.manual_dir, args.dataset, tfds_flags)
    except (RebuildError, ValueError) as err:
        print(f"rebuild: {err}", file=sys.stderr)
        return 1
    for folder in replaced:
        print(f"rebuilt {os.path.join(args.data_dir, DATASET, folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
