"""`faceid eval MODEL --data_path DIR`: verification accuracy of a saved model on lfw, cfp_fp, ...;
`--ijb DIR --ijb_set IJBC` adds IJB-C / IJB-B TAR@FAR (see `faceid_keras.ijb_eval`)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping

# Importing the faceid_keras package registers its serialisable classes (ArcFaceModel, ...), so
# keras.models.load_model needs no custom_objects.
from faceid_keras import embedding, ijb_eval, model_file, packs
from faceid_keras.argtypes import positive_int


def format_table(results: Mapping[str, dict]) -> str:
    """Aligned text table: one row per target with accuracy +- std, VAL@FAR=1e-3 +- std and AUC."""
    header = ("target", "pairs", "accuracy", "VAL@FAR=1e-3", "FAR", "AUC")
    rows = [
        (
            name,
            str(result["pairs"]),
            f"{result['accuracy']:.5f} +- {result['accuracy_std']:.5f}",
            f"{result['val']:.5f} +- {result['val_std']:.5f}",
            f"{result['far']:.6f}",
            f"{result['auc']:.5f}",
        )
        for name, result in results.items()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def format_decisions(results: Mapping[str, dict]) -> str:
    """Per target and FAR: the threshold (cosine similarity and squared distance) and the TAR there."""
    header = ("target", "FAR", "cosine >", "sq. distance <", "TAR", "FAR measured")
    rows: list[tuple[str, ...]] = []
    for name, result in results.items():
        for decision in result["decisions"]:
            far = f"{decision['far_target']:g}"
            if decision["too_small"]:
                rows.append((name, far, f"set too small: {decision['different_pairs']} different pairs, "
                             f"needs {decision['needed_different_pairs']}"))
            else:
                rows.append((name, far, f"{decision['cosine']:.5f}", f"{decision['squared_distance']:.5f}",
                             f"{decision['tar']:.5f}", f"{decision['far']:.6f}"))
    table = [row for row in (header, *rows) if len(row) == len(header)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    widths[:2] = [max(len(row[i]) for row in (header, *rows)) for i in range(2)]
    lines = []
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1])]
        if len(row) == len(header):
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
        else:
            cells.append(row[2])
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_roc(results: Mapping[str, dict], path: str) -> None:
    """Writes the ROC curves (TPR against log-scale FPR, one per target, AUC in the legend) to path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 5))
    smallest = 1.0
    for name, result in results.items():
        fpr, tpr = result["fpr"], result["tpr"]
        keep = fpr > 0
        axes.plot(fpr[keep], tpr[keep], label=f"{name} (AUC {result['auc']:.5f})")
        if keep.any():
            smallest = min(smallest, float(fpr[keep].min()))
    axes.set_xscale("log")
    axes.set_xlim(min(smallest, 1e-3), 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("False positive rate (log scale)")
    axes.set_ylabel("True positive rate")
    axes.set_title("Verification ROC")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Loads the model and the targets, evaluates them, prints the table, optionally plots the ROC."""
    if args.data_path is None and args.ijb is None:
        raise ValueError("faceid eval needs --data_path (verification packs) or --ijb (an IJB folder)")
    names = [name for name in args.targets.split(",") if name]
    targets = packs.load_targets(args.data_path, names) if args.data_path is not None else {}
    model = model_file.load_model(args.model)
    results = {}
    for name, (images, issame) in targets.items():
        results[name] = embedding.verify(model, images, issame, args.batch_size)
    if targets:
        print(format_table(results))
        print()
        print("Decision thresholds over all pairs (same person when cosine > threshold):")
        print(format_decisions(results))
    if args.ijb is not None:
        results.update(ijb_eval.run(model, args))
    if args.roc_plot:
        plot_roc(results, args.roc_plot)
        print(f"ROC curves written to {args.roc_plot}")
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the ``eval`` subcommand on a ``faceid`` subparsers object."""
    parser = subparsers.add_parser(
        "eval",
        help="verification accuracy of a saved model (lfw, cfp_fp, agedb_30)",
        description="Evaluates a saved model under the insightface verification protocol.",
    )
    parser.add_argument("model", help="saved model (.keras) whose output is the face embedding")
    parser.add_argument(
        "--data_path",
        help="tfds data directory holding ms1m_arcface/verification, or an insightface folder "
        "with <target>.bin packs",
    )
    parser.add_argument(
        "--targets",
        default=",".join(packs.DEFAULT_TARGETS),
        help="comma-separated verification targets (default: %(default)s)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, help="embedding batch size")
    ijb_eval.add_arguments(parser)
    parser.add_argument("--roc_plot", metavar="FILE.png", help="write ROC curves here")
    parser.set_defaults(func=run)
    return parser
