"""Times faceid_keras.verification.evaluate_distances against a plain per-threshold, per-fold loop.

Both run the same protocol (insightface's) on the same 6000 random pairs in this process; the
script prints both times and the speedup, and asserts that the results are identical.

    python bench/verification.py
"""
import time

import numpy as np

from faceid_keras import verification


def loop_accuracy(threshold, dist, issame):
    """(tpr, fpr, accuracy) of ``dist < threshold`` as predicted same; rates are 0 without denominator."""
    predicted = dist < threshold
    tp = np.sum(predicted & issame)
    fp = np.sum(predicted & ~issame)
    tn = np.sum(~predicted & ~issame)
    fn = np.sum(~predicted & issame)
    tpr = 0.0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0.0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def loop_val_far(threshold, dist, issame):
    """(val, far) of ``dist < threshold``; rates are 0 without denominator."""
    predicted = dist < threshold
    n_same, n_diff = np.sum(issame), np.sum(~issame)
    val = 0.0 if n_same == 0 else float(np.sum(predicted & issame)) / float(n_same)
    far = 0.0 if n_diff == 0 else float(np.sum(predicted & ~issame)) / float(n_diff)
    return val, far


def loop_interpolate(far, thresholds, target):
    """Degree-1 spline of thresholds over far evaluated at target, the segment found by a scan."""
    if np.max(far) < target:
        return 0.0
    lo = 0
    while lo + 2 < len(far) and far[lo + 1] <= target:
        lo += 1
    if far[lo + 1] == far[lo]:
        return 0.0
    w = 1.0 / (far[lo + 1] - far[lo])
    return float(thresholds[lo] * (w * (far[lo + 1] - target)) + thresholds[lo + 1] * (w * (target - far[lo])))


def loop_folds(n, k=10):
    """(train, test) index arrays of k ordered folds, the first n % k one larger."""
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    start, folds = 0, []
    for size in sizes:
        test = np.arange(start, start + size)
        folds.append((np.setdiff1d(np.arange(n), test), test))
        start += size
    return folds


def loop_evaluate(dist, issame, nrof_folds=10):
    """The protocol written as loops over folds and thresholds."""
    thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)
    folds = loop_folds(len(dist), nrof_folds)
    accuracies, best_thresholds = np.zeros(nrof_folds), np.zeros(nrof_folds)
    tprs, fprs = np.zeros((nrof_folds, len(thresholds))), np.zeros((nrof_folds, len(thresholds)))
    val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for i, (train, test) in enumerate(folds):
        acc_train = np.zeros(len(thresholds))
        for j, threshold in enumerate(thresholds):
            _, _, acc_train[j] = loop_accuracy(threshold, dist[train], issame[train])
        best = np.argmax(acc_train)
        for j, threshold in enumerate(thresholds):
            tprs[i, j], fprs[i, j], _ = loop_accuracy(threshold, dist[test], issame[test])
        _, _, accuracies[i] = loop_accuracy(thresholds[best], dist[test], issame[test])
        best_thresholds[i] = thresholds[best]
        far_train = np.zeros(len(val_thresholds))
        for j, threshold in enumerate(val_thresholds):
            _, far_train[j] = loop_val_far(threshold, dist[train], issame[train])
        threshold = loop_interpolate(far_train, val_thresholds, 1e-3)
        val[i], far[i] = loop_val_far(threshold, dist[test], issame[test])
    return {
        "fold_accuracies": accuracies,
        "fold_thresholds": best_thresholds,
        "fold_val": val,
        "fold_far": far,
        "tpr": np.mean(tprs, 0),
        "fpr": np.mean(fprs, 0),
    }


def random_pairs(n=6000, seed=0):
    """Squared distances of random unit vectors, same pairs drawn closer than different ones."""
    rng = np.random.default_rng(seed)
    issame = np.arange(n) % 2 == 0
    rng.shuffle(issame)
    dist = np.where(issame, rng.normal(0.9, 0.3, n), rng.normal(1.8, 0.3, n)).clip(0.0, 3.999)
    return dist, issame


def main():
    dist, issame = random_pairs()
    verification.evaluate_distances(dist, issame)  # warm-up
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        ours = verification.evaluate_distances(dist, issame)
    ours_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    reference = loop_evaluate(dist, issame)
    loop_s = time.perf_counter() - start
    for key, expected in reference.items():
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
    print(f"pairs: {len(dist)}  accuracy {ours['accuracy']:.5f} +- {ours['accuracy_std']:.5f}  "
          f"VAL@FAR=1e-3 {ours['val']:.5f}  FAR {ours['far']:.6f}  AUC {ours['auc']:.5f}")
    print(f"vectorised: {ours_s * 1e3:.2f} ms   loop: {loop_s * 1e3:.0f} ms   "
          f"speedup: {loop_s / ours_s:.0f}x   results identical")


if __name__ == "__main__":
    main()
