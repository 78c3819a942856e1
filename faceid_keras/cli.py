"""The `faceid` command line: demo, train, eval, calibrate, verify, embed, identify, pack, clean,
export and import.

Installed as the `faceid` console script; `python -m faceid_keras.cli` runs the same.

TensorFlow reads its environment flags (TF_ENABLE_ONEDNN_OPTS, TF_CPP_MIN_LOG_LEVEL) when it is
imported, before this module runs, so they are the user's to export (see the README).
"""
import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Returns the `faceid` parser with one subcommand per module."""
    from faceid_keras import calibrate, clean, demo, evaluate, export, faces, onnx_import, train
    from tfds_ms1m import pack

    parser = argparse.ArgumentParser(
        prog="faceid",
        description="Train ArcFace face recognizers with Keras and verify faces with them.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, train, evaluate, calibrate, faces, pack, clean, export, onnx_import):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `faceid` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
