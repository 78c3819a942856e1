"""`faceid calibrate MODEL --data_path DIR --far 1e-4`: the decision threshold, stored beside the model.

The threshold is chosen on the pairs of every named verification set together (more different
pairs measure a lower FAR) and written to ``<MODEL>.threshold.json``, where `faceid verify`,
`FaceVerifier` and exports look for it. It holds for the protocol's embeddings,
f(x) + f(flip(x)) L2-normalised ("embedding": "flip_sum" in the file).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np

from faceid_keras import embedding, packs, verification
from faceid_keras.argtypes import positive_int

THRESHOLD_SUFFIX = ".threshold.json"
EMBEDDING = "flip_sum"


class ThresholdFileError(ValueError):
    """A threshold file that is not the JSON `faceid calibrate` writes."""


def threshold_path(model_path: str | os.PathLike) -> str:
    """Where the threshold of a model file lives: ``<model path>.threshold.json``."""
    return os.fspath(model_path) + THRESHOLD_SUFFIX


def write_threshold(model_path: str | os.PathLike, decision: dict, targets: Sequence[str]) -> str:
    """Writes a `verification.threshold_at_far` result next to the model (atomically); returns the path."""
    if decision["too_small"]:
        raise ValueError(
            f"{decision['different_pairs']} different pairs cannot measure FAR {decision['far_target']:g}; "
            f"it needs at least {decision['needed_different_pairs']}."
        )
    record = {
        "far": decision["far_target"],
        "cosine": decision["cosine"],
        "squared_distance": decision["squared_distance"],
        "tar": decision["tar"],
        "far_measured": decision["far"],
        "same_pairs": decision["same_pairs"],
        "different_pairs": decision["different_pairs"],
        "targets": list(targets),
        "embedding": EMBEDDING,
        "model": os.path.basename(os.fspath(model_path)),
    }
    path = threshold_path(model_path)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(temporary, path)
    return path


def read_threshold(model_path: str | os.PathLike) -> dict | None:
    """The stored threshold record of a model, or None when it has none."""
    path = threshold_path(model_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ThresholdFileError(f"{path}: not a readable threshold file: {err}") from err
    cosine = record.get("cosine") if isinstance(record, dict) else None
    if not isinstance(cosine, (int, float)) or not -1.0 <= cosine <= 1.0:
        raise ThresholdFileError(f"{path}: expected a JSON object with a 'cosine' number in [-1, 1].")
    return record


def calibrate(model, targets: dict[str, tuple[np.ndarray, np.ndarray]], far: float, batch_size: int = 64) -> dict:
    """`verification.threshold_at_far` over the pairs of all targets together (protocol embeddings)."""
    distances, labels = [], []
    for images, issame in targets.values():
        embeddings = embedding.embed(model, images, batch_size)
        distances.append(verification.pair_distances(embeddings[0::2], embeddings[1::2]))
        labels.append(np.asarray(issame, dtype=bool))
    return verification.threshold_at_far(np.concatenate(distances), np.concatenate(labels), far)


def run(args: argparse.Namespace) -> dict:
    """Loads the model and the sets, picks the threshold, stores and prints it."""
    import keras

    names = [n for n in args.targets.split(",") if n] if args.targets else packs.available_targets(args.data_path)
    targets = packs.load_targets(args.data_path, names)
    model = keras.models.load_model(args.model)
    decision = calibrate(model, targets, args.far, args.batch_size)
    if decision["too_small"]:
        raise SystemExit(
            f"faceid calibrate: {', '.join(names)} hold {decision['different_pairs']} different pairs; "
            f"FAR {args.far:g} needs at least {decision['needed_different_pairs']}. Add pairs or raise --far."
        )
    path = write_threshold(args.model, decision, names)
    print(
        f"Threshold at FAR {args.far:g} on {', '.join(names)} ({decision['same_pairs']} same, "
        f"{decision['different_pairs']} different pairs): cosine > {decision['cosine']:.5f} "
        f"(squared distance < {decision['squared_distance']:.5f}), TAR {decision['tar']:.5f}, "
        f"measured FAR {decision['far']:.6f}"
    )
    print(f"Written to {path}")
    return decision


def _far(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the ``calibrate`` subcommand on a ``faceid`` subparsers object."""
    parser = subparsers.add_parser(
        "calibrate",
        help="choose the same/different threshold at a FAR and store it next to the model",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("model", help="saved model (.keras) whose output is the face embedding")
    parser.add_argument("--data_path", required=True,
                        help="tfds data dir holding ms1m_arcface/verification, or a folder of <name>.bin packs")
    parser.add_argument("--far", type=_far, default=1e-4, help="target false accept rate (default: %(default)g)")
    parser.add_argument("--targets", default=None,
                        help="comma-separated verification sets to pool (default: every set found)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="embedding batch size")
    parser.set_defaults(func=run)
    return parser
