"""Face verification on lfw / cfp_fp / agedb_30 pairs: insightface's protocol, exactly, in NumPy.

Embedding images with a model (flip test-time augmentation) is `faceid_keras.embedding`; reading
the packs is `faceid_keras.packs` (`load_bin` is also reachable here, its documented place).

Protocol (see DESIGN.md, "Verification protocol"):

- Images are scaled to (x / 255 - 0.5) / 0.5 (by the model: `ArcFaceModel` and its embedding
  model take [0, 255] pixels); the embedding of an image is f(x) + f(flip(x)), L2-normalised
  (flip = left-right mirror).
- The distance of a pair is the squared L2 distance of its two embeddings; a pair is predicted
  "same" when ``dist < threshold``.
- The pairs are cut into 10 contiguous folds in order (scikit-learn's ``KFold(10, shuffle=False)``:
  the first ``n % 10`` folds hold one pair more). For each fold the threshold is the first argmax of
  the accuracy on the other nine folds over thresholds 0, 0.01, ..., 3.99 and is applied to the fold;
  accuracy is the mean and (population, ddof 0) std of the ten fold accuracies.
- VAL@FAR=1e-3: on the nine training folds the false accept rate is computed for thresholds
  0, 0.001, ..., 3.999 and the threshold reaching FAR = 1e-3 is found by linear interpolation of
  threshold against FAR (threshold 0 when the FAR never reaches the target); VAL and FAR are then
  measured on the held-out fold and averaged.
- The ROC is insightface's: TPR and FPR of each held-out fold at every accuracy threshold,
  averaged over folds. AUC is the trapezoid area under that curve, closed at (1, 1).

Rates without a denominator (no same pairs, or no different pairs, in a fold) count as 0, the
convention insightface uses for TPR/FPR. insightface interpolates the FAR threshold with
``scipy.interpolate.interp1d(far, thresholds, kind="slinear")``, whose result on repeated FAR values
(scipy < 1.9; newer releases refuse them) is reproduced here: the segment used starts at the last
FAR value <= the target; a zero-length final segment yields threshold 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from faceid_keras.packs import load_bin  # noqa: F401  (its documented public name)

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3
DECISION_FARS = (1e-2, 1e-3, 1e-4)


def fold_slices(num_pairs: int, nrof_folds: int = 10) -> list[slice]:
    """Contiguous test folds in pair order; the first ``num_pairs % nrof_folds`` get one extra pair."""
    if nrof_folds < 2:
        raise ValueError(f"nrof_folds must be at least 2, got {nrof_folds}.")
    if num_pairs < nrof_folds:
        raise ValueError(f"Cannot split {num_pairs} pairs into {nrof_folds} folds.")
    sizes = np.full(nrof_folds, num_pairs // nrof_folds)
    sizes[: num_pairs % nrof_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance between row i of ``embeddings1`` and row i of ``embeddings2``."""
    embeddings1 = np.asarray(embeddings1, dtype=np.float64)
    embeddings2 = np.asarray(embeddings2, dtype=np.float64)
    if embeddings1.ndim != 2 or embeddings1.shape != embeddings2.shape:
        raise ValueError(
            "Expected two embedding matrices of the same shape [pairs, dim], got "
            f"{embeddings1.shape} and {embeddings2.shape}."
        )
    return np.sum(np.square(embeddings1 - embeddings2), axis=1)


def _count_below(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[2, T] counts of same (row 0) and different (row 1) pairs with ``dist < threshold``."""
    same = np.searchsorted(np.sort(dist[issame]), thresholds, side="left")
    diff = np.searchsorted(np.sort(dist[~issame]), thresholds, side="left")
    return np.stack([same, diff])


def _rate(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """count / total with 0 where total is 0."""
    count = np.asarray(count, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    return np.divide(count, total, out=np.zeros(np.broadcast(count, total).shape), where=total > 0)


def interpolate_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which the non-decreasing ``far`` curve reaches ``far_target`` (0 if it never does).

    Reproduces insightface's degree-1 spline interpolation of thresholds against FAR.
    """
    if far.max() < far_target:
        return 0.0
    lo = min(int(np.searchsorted(far, far_target, side="right")) - 1, len(far) - 2)
    hi = lo + 1
    if far[hi] == far[lo]:
        return 0.0
    weight = 1.0 / (far[hi] - far[lo])
    return float(
        thresholds[lo] * (weight * (far[hi] - far_target))
        + thresholds[hi] * (weight * (far_target - far[lo]))
    )


def _validate_pairs(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame)
    if dist.ndim != 1 or issame.shape != dist.shape:
        raise ValueError(
            f"Expected 1-d distances and labels of the same length, got {dist.shape} and "
            f"{issame.shape}."
        )
    if issame.dtype != bool:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame must hold booleans (or 0/1).")
        issame = issame.astype(bool)
    if not np.isfinite(dist).all() or (dist < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(dist) | (dist < 0))[0])
        raise ValueError(f"Distances must be finite and >= 0; pair {bad} has {dist[bad]}.")
    return dist, issame


def evaluate_distances(
    dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10, far_target: float = FAR_TARGET
) -> dict:
    """Runs the verification protocol on pair distances (squared L2) and same/different labels.

    Returns a dict: pairs, accuracy, accuracy_std, fold_accuracies, fold_thresholds; threshold and
    best_accuracy (the single best threshold for all pairs together and its accuracy); val,
    val_std, far, fold_val, fold_far, val_thresholds (VAL@FAR=far_target); tpr and fpr (the ROC
    over ACCURACY_THRESHOLDS, averaged over folds) and auc; decisions (`decision_thresholds` at
    FAR 1e-2, 1e-3, 1e-4 over all pairs).
    """
    dist, issame = _validate_pairs(dist, issame)
    folds = fold_slices(len(dist), nrof_folds)
    # Counts below every threshold, per held-out fold; a training set's counts are total - fold.
    test_counts = np.stack([_count_below(dist[f], issame[f], ACCURACY_THRESHOLDS) for f in folds])
    test_val_counts = np.stack([_count_below(dist[f], issame[f], VAL_THRESHOLDS) for f in folds])
    fold_same = np.array([[issame[f].sum(), (~issame[f]).sum()] for f in folds])  # [F, 2]
    fold_sizes = fold_same.sum(axis=1)
    train_counts = test_counts.sum(axis=0) - test_counts
    train_val_counts = test_val_counts.sum(axis=0) - test_val_counts
    train_same = fold_same.sum(axis=0) - fold_same

    # Accuracy: correct = same pairs below the threshold + different pairs at or above it.
    train_correct = train_counts[:, 0] + (train_same[:, 1:2] - train_counts[:, 1])
    best = np.argmax(train_correct, axis=1)  # first argmax of accuracy: one denominator per fold
    rows = np.arange(len(folds))
    test_correct = test_counts[rows, 0, best] + fold_same[:, 1] - test_counts[rows, 1, best]
    fold_accuracies = test_correct / fold_sizes
    tpr = _rate(test_counts[:, 0], fold_same[:, 0:1]).mean(axis=0)
    fpr = _rate(test_counts[:, 1], fold_same[:, 1:2]).mean(axis=0)

    total_counts = test_counts.sum(axis=0)
    all_correct = total_counts[0] + fold_same[:, 1].sum() - total_counts[1]
    overall_best = int(np.argmax(all_correct))

    fold_val, fold_far, val_thresholds = [], [], []
    for i, f in enumerate(folds):
        far_train = _rate(train_val_counts[i, 1], train_same[i, 1])
        threshold = interpolate_threshold(far_train, VAL_THRESHOLDS, far_target)
        below = dist[f] < threshold
        fold_val.append(_rate(np.sum(below & issame[f]), fold_same[i, 0]))
        fold_far.append(_rate(np.sum(below & ~issame[f]), fold_same[i, 1]))
        val_thresholds.append(threshold)
    fold_val = np.array(fold_val, dtype=np.float64)

    roc_fpr = np.append(fpr, 1.0)
    roc_tpr = np.append(tpr, 1.0)
    auc = float(np.sum(np.diff(roc_fpr) * (roc_tpr[1:] + roc_tpr[:-1]) / 2.0))
    return {
        "pairs": len(dist),
        "accuracy": float(np.mean(fold_accuracies)),
        "accuracy_std": float(np.std(fold_accuracies)),
        "fold_accuracies": fold_accuracies,
        "fold_thresholds": ACCURACY_THRESHOLDS[best],
        "threshold": float(ACCURACY_THRESHOLDS[overall_best]),
        "best_accuracy": float(all_correct[overall_best] / len(dist)),
        "val": float(np.mean(fold_val)),
        "val_std": float(np.std(fold_val)),
        "far": float(np.mean(fold_far)),
        "fold_val": fold_val,
        "fold_far": np.array(fold_far, dtype=np.float64),
        "val_thresholds": np.array(val_thresholds, dtype=np.float64),
        "tpr": tpr,
        "fpr": fpr,
        "auc": auc,
        "decisions": decision_thresholds(dist, issame),
    }


def threshold_at_far(dist: np.ndarray, issame: np.ndarray, far: float) -> dict:
    """The decision threshold at false accept rate ``far`` over all pairs, and the TAR there.

    A pair is "same" when its cosine similarity is above ``cosine`` (equivalently, for unit
    embeddings, when its squared distance is below ``squared_distance`` = 2 - 2 * cosine). The
    threshold is the (k+1)-th largest similarity of the different pairs, k = floor(far * D) for D
    different pairs, so at most k of them are accepted (fewer on ties). A FAR needs D >= 1 / far
    pairs to be measured at all; below that the result has ``too_small`` True and no threshold.
    """
    dist, issame = _validate_pairs(dist, issame)
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}.")
    different = np.sort(1.0 - dist[~issame] / 2.0)[::-1]
    needed = int(np.ceil(1.0 / far - 1e-9))
    result = {"far_target": far, "different_pairs": len(different), "same_pairs": int(issame.sum()),
              "needed_different_pairs": needed}
    if len(different) < needed:
        return {**result, "too_small": True}
    allowed = int(np.floor(far * len(different) + 1e-9))
    cosine = float(different[allowed])
    similarity = 1.0 - dist / 2.0
    accepted = similarity > cosine
    return {
        **result,
        "too_small": False,
        "cosine": cosine,
        "squared_distance": 2.0 - 2.0 * cosine,
        "far": float(_rate(np.sum(accepted & ~issame), len(different))),
        "tar": float(_rate(np.sum(accepted & issame), issame.sum())),
    }


def decision_thresholds(
    dist: np.ndarray, issame: np.ndarray, fars: Sequence[float] = DECISION_FARS
) -> list[dict]:
    """`threshold_at_far` at each of ``fars``."""
    return [threshold_at_far(dist, issame, far) for far in fars]


def evaluate(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, nrof_folds: int = 10
) -> dict:
    """Runs the verification protocol on the embeddings of the two sides of every pair."""
    return evaluate_distances(pair_distances(embeddings1, embeddings2), issame, nrof_folds)
