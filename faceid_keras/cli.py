"""The `faceid` command line: demo, train, eval, calibrate, verify, embed, identify, pack, clean,
export and import.

Run by the `faceid` command (scripts/faceid), which first sets TensorFlow's flags: TensorFlow
reads them when it is imported, and importing this package imports it. `python -m faceid_keras.cli`
runs the same commands with the environment as it is.
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
