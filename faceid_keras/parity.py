"""Parity of an exported model with its Keras original: embedding agreement and verification accuracy.

Both sides embed the same images and their mirror images; agreement compares the L2-normalised
per-image embeddings (max |diff|, min cosine), accuracy runs the verification protocol on each
side's f(x) + f(flip(x)), so a conversion that loses accuracy shows as a different pair count.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from faceid_keras import verification

MIN_COSINE = 0.9999
MAX_PAIR_DIFFERENCE = 1

Runner = Callable[[np.ndarray], np.ndarray]


class ParityError(ValueError):
    """An unquantised export that does not compute what its Keras model computes."""


def normalised_embeddings(run: Runner, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalised float64 embeddings of uint8 or float [N, H, W, 3] pixels, `batch_size` at a time."""
    pieces = [np.asarray(run(np.asarray(images[i : i + batch_size], np.float32)), np.float64)
              for i in range(0, len(images), batch_size)]
    outputs = np.concatenate(pieces)
    return outputs / np.maximum(np.linalg.norm(outputs, axis=1, keepdims=True), 1e-12)


def _sides(run: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Normalised embeddings of the images followed by those of their mirror images."""
    return normalised_embeddings(run, np.concatenate([images, images[:, :, ::-1]]), batch_size)


def _accuracy(sides: np.ndarray, issame: np.ndarray) -> float:
    """Protocol accuracy of pairs (2i, 2i+1) from `_sides` output: f(x) + f(flip(x)), normalised."""
    count = len(sides) // 2
    summed = sides[:count] + sides[count:]
    summed /= np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)
    return float(verification.evaluate(summed[0::2], summed[1::2], issame)["accuracy"])


def compare(
    reference: Runner,
    exported: Runner,
    targets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    batch_size: int = 64,
) -> dict:
    """Agreement over all images of `targets` ({name: (images, issame)}) and each target's accuracy
    on both sides: {"max_abs_diff", "min_cosine", "images", "targets": {name: {keras, export, pairs}}}."""
    max_abs_diff, min_cosine, count, accuracies = 0.0, 1.0, 0, {}
    for name, (images, issame) in targets.items():
        expected = _sides(reference, images, batch_size)
        actual = _sides(exported, images, batch_size)
        max_abs_diff = max(max_abs_diff, float(np.abs(expected - actual).max()))
        min_cosine = min(min_cosine, float(np.sum(expected * actual, axis=1).min()))
        count += len(expected)
        accuracies[name] = {
            "keras": _accuracy(expected, issame),
            "export": _accuracy(actual, issame),
            "pairs": int(len(issame)),
        }
    return {"max_abs_diff": max_abs_diff, "min_cosine": min_cosine, "images": count, "targets": accuracies}


def pair_difference(result: Mapping[str, float]) -> float:
    """How many more (or fewer) pairs one side verifies correctly than the other on one target."""
    return abs(result["keras"] - result["export"]) * result["pairs"]


def check(report: Mapping, what: str, min_cosine: float = MIN_COSINE) -> None:
    """Raises ParityError when `report` (from `compare`) shows an export that lost accuracy."""
    problems = []
    if not report["min_cosine"] >= min_cosine:
        problems.append(f"min cosine {report['min_cosine']:.6f} < {min_cosine}")
    for name, result in report["targets"].items():
        if pair_difference(result) > MAX_PAIR_DIFFERENCE + 1e-6:
            problems.append(
                f"{name} accuracy {result['export']:.5f} vs Keras {result['keras']:.5f} "
                f"({pair_difference(result):.0f} of {result['pairs']} pairs differ)"
            )
    if problems:
        raise ParityError(f"{what} does not match its Keras model: " + "; ".join(problems) + ". Nothing was written.")


def format_report(report: Mapping) -> str:
    """Parity lines: agreement over the images, then Keras and export accuracy side by side."""
    lines = [
        f"parity on {report['images']} images (and mirror images): max |diff| {report['max_abs_diff']:.3g}, "
        f"min cosine {report['min_cosine']:.7f}",
        f"{'target':<12}{'pairs':>7}{'keras':>10}{'export':>10}{'change':>10}",
    ]
    for name, result in report["targets"].items():
        change = result["export"] - result["keras"]
        lines.append(f"{name:<12}{result['pairs']:>7}{result['keras']:>10.5f}{result['export']:>10.5f}{change:>+10.5f}")
    return "\n".join(lines)
