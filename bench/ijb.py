"""Times IJB template and pair scoring (faceid_keras.ijb) at full IJB-C size against plain loops.

A synthetic protocol of IJB-C's size (469,375 images, 23,124 templates, 15,658,489 pairs; random
512-d float32 image features, media ids that recur across templates, pairs of one of the 3,531
enrolled templates with any template as in IJB-C, or any two with --uniform_pairs) is scored end to end: template
features, pair scores, ROC and TAR@FAR. The plain loop implementation (insightface's: one template
and one media at a time, one dot product per pair) runs on a subset of the templates and pairs of
the same protocol, checked to 1e-9 against ours; the ratio is per template / per pair. scikit-learn's `roc_curve` is timed on
the full scores when it is installed. Peak memory is the process's maximum resident set.

    python bench/ijb.py [--images 469375 --templates 23124 --pairs 15658489]
"""
import argparse
import resource
import time

import numpy as np

from faceid_keras import ijb


def loop_template_features(features, templates, medias, ids):
    """insightface's loop over the templates `ids`: a search of all images per template, then per media."""
    out = np.zeros((len(ids), features.shape[1]))
    for row, template in enumerate(ids):
        (members,) = np.where(templates == template)
        media_features = []
        for media in np.unique(medias[members]):
            rows = members[medias[members] == media]
            chosen = features[rows].astype(np.float64)
            media_features.append(chosen[0] if len(rows) == 1 else chosen.mean(axis=0))
        total = np.sum(media_features, axis=0)
        out[row] = total / max(np.sqrt(total @ total), 1e-300)
    return out


def loop_pair_scores(ids, features, template1, template2):
    row = {int(t): i for i, t in enumerate(ids)}
    return np.array([features[row[a]] @ features[row[b]] for a, b in zip(template1.tolist(), template2.tolist())])


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--subset_templates", type=int, default=500)
    parser.add_argument("--subset_pairs", type=int, default=200_000)
    parser.add_argument("--uniform_pairs", action="store_true", help="pair any two templates")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    templates = rng.integers(0, args.templates, args.images)
    templates[: args.templates] = np.arange(args.templates)  # every template has an image
    medias = (templates * 7 + rng.integers(0, 4, args.images)) % (args.templates * 2)
    features = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    if args.uniform_pairs:  # the worst case: every pair side may be any template
        template1 = rng.integers(0, args.templates, args.pairs)
    else:  # IJB-C's 1:1 pairs: enrolled (G1 + G2, 3,531) against verification templates
        template1 = rng.integers(0, 3_531 * args.templates // 23_124, args.pairs)
    template2 = rng.integers(0, args.templates, args.pairs)
    labels = (rng.random(args.pairs) < 0.0013).astype(np.int8)  # IJB-C: 19,557 genuine pairs
    print(f"protocol: {args.images:,} images, {args.templates:,} templates, {args.pairs:,} pairs, "
          f"dim {args.dim}; resident after setup {peak_gib():.2f} GiB")

    start = time.perf_counter()
    ids, template_features = ijb.template_features(features, templates, medias)
    t_templates = time.perf_counter() - start
    start = time.perf_counter()
    scores = ijb.pair_scores(ids, template_features, template1, template2)
    t_pairs = time.perf_counter() - start
    start = time.perf_counter()
    roc = ijb.roc_curve(scores + labels * 0.05, labels)
    tar = ijb.tar_at_far(scores, labels, roc=roc)
    t_roc = time.perf_counter() - start
    total = t_templates + t_pairs + t_roc
    print(f"ours, full size: templates {t_templates:.1f} s, pairs {t_pairs:.1f} s, ROC + TAR {t_roc:.1f} s, "
          f"total {total:.1f} s; peak resident {peak_gib():.2f} GiB; TAR@1e-4 {tar[1e-4]:.4f}")

    subset_ids = ids[:: max(1, len(ids) // args.subset_templates)][: args.subset_templates]
    start = time.perf_counter()
    loop_features = loop_template_features(features, templates, medias, subset_ids)
    t_loop = time.perf_counter() - start
    assert np.abs(loop_features - template_features[np.searchsorted(ids, subset_ids)]).max() < 1e-9
    loop_full = t_loop * len(ids) / len(subset_ids)
    print(f"templates: loop {t_loop:.1f} s for {len(subset_ids)} of them, so about {loop_full:.0f} s for all; "
          f"ours {t_templates:.1f} s for all, ratio {loop_full / t_templates:.0f}x")

    part = slice(0, args.subset_pairs)
    start = time.perf_counter()
    loop_scores = loop_pair_scores(ids, template_features, template1[part], template2[part])
    t_loop = time.perf_counter() - start
    assert np.abs(loop_scores - scores[part]).max() < 1e-9
    print(f"pairs, {args.subset_pairs:,} of them: loop {t_loop:.2f} s, ours (from the full run) "
          f"{t_pairs * args.subset_pairs / args.pairs:.2f} s, ratio {t_loop / (t_pairs * args.subset_pairs / args.pairs):.1f}x")
    try:
        from sklearn.metrics import roc_curve
    except ImportError:
        return
    start = time.perf_counter()
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores + labels * 0.05)
    t_sklearn = time.perf_counter() - start
    assert np.array_equal(sk_fpr, roc[0]) and np.array_equal(sk_tpr, roc[1])
    print(f"ROC on {args.pairs:,} scores: scikit-learn {t_sklearn:.1f} s, ours (with TAR) {t_roc:.1f} s, identical points")


if __name__ == "__main__":
    main()
