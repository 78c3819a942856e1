"""`faceid eval MODEL --ijb DIR --ijb_set IJBC`: IJB-B / IJB-C 1:1 verification (and 1:N when listed).

Test modes are insightface's names: N1 keeps the feature norm (N0 L2-normalises each image feature),
D1 multiplies by the detector score, F1 adds the flipped crop's embedding. insightface's default and
the figure papers report is N1D1F1.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re

from faceid_keras import ijb, ijb_embedding, ijb_identification, ijb_protocol

DEFAULT_MODE = "N1D1F1"
ALL_MODES = tuple(f"N{n}D{d}F{f}" for f, n, d in itertools.product((1, 0), (1, 0), (0, 1)))


def parse_modes(text: str) -> list[str]:
    """Comma-separated test modes such as "N1D1F1,N0D0F1", or "all"."""
    modes = list(ALL_MODES) if text == "all" else [mode for mode in text.split(",") if mode]
    for mode in modes:
        if not re.fullmatch(r"N[01]D[01]F[01]", mode):
            raise ValueError(f"--ijb_mode {mode!r}: expected N<0|1>D<0|1>F<0|1> (e.g. N1D1F1) or all")
    return modes


def _mode_flags(mode: str) -> dict[str, bool]:
    return {"use_norm": mode[1] == "1", "use_detector_score": mode[3] == "1", "use_flip": mode[5] == "1"}


def format_verification_table(results: dict[str, dict], fars=ijb.DEFAULT_FARS) -> str:
    """Aligned table: one row per test mode with the pairs, TAR at each FAR and the AUC."""
    header = ("target", "pairs", *(f"TAR@FAR={far:.0e}" for far in fars), "AUC")
    rows = [
        (name, str(result["pairs"]), *(f"{result['tar'][far]:.5f}" for far in fars), f"{result['auc']:.5f}")
        for name, result in results.items()
    ]
    return _align(header, rows)


def format_identification_table(results: dict[str, dict]) -> str:
    """Aligned table: per test mode and gallery (G1, G2, their mean) TPIR at each FPIR and rank-k rates."""
    rows, header = [], None
    for name, result in results.items():
        for gallery in (*ijb_identification.GALLERIES, "mean"):
            figures = result["identification"][gallery]
            header = header or ("target", *(f"TPIR@FPIR={f:.0e}" for f in figures["tpir"]),
                                *(f"rank-{k}" for k in figures["rank"]))
            rows.append((f"{name} {gallery}", *(f"{v:.5f}" for v in figures["tpir"].values()),
                         *(f"{v:.5f}" for v in figures["rank"].values())))
    return _align(header, rows)


def _align(header, rows) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
        for row in (header, *rows)
    )


def default_cache_dir(model_path: str, ijb_set: str) -> str:
    """The embedding cache beside the model: MODEL.<set>_embeddings/."""
    return f"{os.path.abspath(model_path)}.{ijb_set.lower()}_embeddings"


def run(model, args: argparse.Namespace) -> dict[str, dict]:
    """Embeds the protocol's crops, scores every requested test mode, prints the tables.

    Returns {"<set> <mode>": {"pairs", "tar", "auc", "fpr", "tpr"[, "identification"]}}.
    """
    modes = parse_modes(args.ijb_mode)
    protocol = ijb_protocol.read_protocol(args.ijb, args.ijb_set)
    stat = os.stat(args.model)
    fingerprint = {
        "model": os.path.abspath(args.model), "model_bytes": stat.st_size, "model_mtime_ns": stat.st_mtime_ns,
        "ijb": os.path.abspath(args.ijb), "ijb_set": args.ijb_set,
    }
    cache_dir = args.ijb_cache or default_cache_dir(args.model, args.ijb_set)
    embeddings, flipped = ijb_embedding.embed_images(
        model, protocol.image_dir, protocol.image_names, protocol.landmarks, args.batch_size,
        cache_dir=cache_dir, fingerprint=fingerprint,
    )
    with_identification = ijb_identification.has_identification_lists(args.ijb, args.ijb_set)
    results = {}
    for mode in modes:
        features = ijb.image_features(embeddings, flipped, protocol.detector_scores, **_mode_flags(mode))
        template_ids, template_features = ijb.template_features(features, protocol.templates, protocol.medias)
        del features
        scores = ijb.pair_scores(template_ids, template_features, protocol.template1, protocol.template2)
        fpr, tpr, _ = ijb.roc_curve(scores, protocol.labels)
        result = {
            "pairs": len(scores), "tar": ijb.tar_at_far(scores, protocol.labels, roc=(fpr, tpr)),
            "auc": ijb.auc(fpr, tpr), "fpr": fpr, "tpr": tpr,
        }
        if with_identification:
            result["identification"] = ijb_identification.identification(
                args.ijb, args.ijb_set, template_ids, template_features
            )
        results[f"{args.ijb_set} {mode}"] = result
    print(format_verification_table(results))
    if with_identification:
        print(format_identification_table(results))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The IJB flags of `faceid eval`."""
    parser.add_argument("--ijb", metavar="DIR", help="insightface's IJB folder (DIR/meta, DIR/loose_crop)")
    parser.add_argument("--ijb_set", choices=ijb_protocol.IJB_SETS, default="IJBC", help="IJB set (default: %(default)s)")
    parser.add_argument(
        "--ijb_mode", default=DEFAULT_MODE,
        help="comma-separated test modes N<0|1>D<0|1>F<0|1> (norm kept, detector score, flip), or all "
        "(default: %(default)s, insightface's)",
    )
    parser.add_argument(
        "--ijb_cache", metavar="DIR",
        help="folder for the per-chunk embedding cache that lets a run resume (default: MODEL.<set>_embeddings)",
    )
