"""`faceid export MODEL --format onnx|tflite|saved_model --output PATH`: the embedding model for deployment.

The export is written beside PATH under a temporary name, opened in its own runtime, compared with
the Keras model (`faceid_keras.parity`), and only then moved to PATH: an unquantised export that
does not match leaves nothing behind. What a consumer needs (input layout and size, normalisation,
embedding size, the verification threshold `faceid calibrate` stored in `MODEL.threshold.json`)
goes into the ONNX `metadata_props`, or a JSON file beside a TFLite file / inside a SavedModel.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from faceid_keras import calibrate, exporters, packs, parity
from faceid_keras.argtypes import positive_int

SAVED_MODEL_METADATA = "faceid_metadata.json"
GENERATED_PAIRS = 60
SAMPLE_PAIRS = 200  # pairs of the first pack compared when no --targets are named


class ExportError(ValueError):
    """A model or an output path that cannot be exported as asked."""


def embedding_parts(model, source: str):
    """(embedding model [0, 255] pixels -> normalised embedding, backbone [-1, 1] pixels -> raw
    embedding) of an ArcFaceModel or of the embedding model it saves."""
    from faceid_keras.model import ArcFaceModel, backbone_of

    if isinstance(model, ArcFaceModel):
        return model.embedding_model(), model.backbone
    names = {layer.name for layer in getattr(model, "layers", [])}
    backbone = backbone_of(model)
    if "pixel_scaling" not in names or "l2_normalize" not in names or backbone is None:
        raise ExportError(
            f"{source}: expected an ArcFaceModel or its embedding_model() (pixel_scaling, a backbone, "
            f"l2_normalize); found layers {sorted(names)}."
        )
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ExportError(f"{source}: the export needs a fixed input size, the model takes {tuple(shape)}.")
    return model, backbone


def stored_threshold(model_path: str) -> dict | None:
    """What the metadata carries of the threshold `faceid calibrate` stored beside the model, or None."""
    record = calibrate.read_threshold(model_path)
    if record is None:
        return None
    return {key: record[key] for key in ("cosine", "squared_distance", "far", "embedding") if key in record}


def build_metadata(embedding_model, fmt: str, layout: str, quantize: str, threshold: dict | None) -> dict:
    """What a consumer of the exported file needs to feed it and to compare its embeddings."""
    height, width = (int(s) for s in embedding_model.inputs[0].shape[1:3])
    insightface = layout == "insightface"
    metadata = {
        "producer": "faceid-keras",
        "format": fmt,
        "input_name": exporters.INPUT_NAMES[layout],
        "input_layout": "NCHW" if insightface else "NHWC",
        "input_size": [height, width],
        "input_channels": "RGB",
        "normalization": "(x - 127.5) / 127.5 applied by the caller" if insightface
        else "none: float32 pixels in [0, 255], the model normalises (x / 255 - 0.5) / 0.5",
        "output_name": exporters.OUTPUT_NAME,
        "embedding_size": int(embedding_model.outputs[0].shape[-1]),
        "output_l2_normalized": not insightface,
        "similarity": "cosine",
        "quantization": quantize,
    }
    if threshold is not None:
        metadata["verification_threshold"] = threshold
    return metadata


def parity_targets(data_path: str | None, names: list[str], image_size: tuple[int, int]) -> dict:
    """Verification pairs for parity: the named targets, else about SAMPLE_PAIRS pairs of the first
    pack under `data_path`, else generated synthetic faces (the `tfds_ms1m.synthetic` renderer)."""
    if data_path is not None:
        if names:
            return packs.load_targets(data_path, names, image_size)
        first = packs.available_targets(data_path)[:1]
        if not first:
            raise ExportError(f"{data_path}: no verification packs to measure parity on.")
        (name, (images, issame)), = packs.load_targets(data_path, first, image_size).items()
        step = max(1, len(issame) // SAMPLE_PAIRS)  # every step-th pair keeps same and different ones
        pairs = np.arange(0, len(issame), step)
        chosen = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
        return {f"{name} (every {step}th pair)" if step > 1 else name: (images[chosen], issame[pairs])}
    from tfds_ms1m import synthetic

    with tempfile.TemporaryDirectory(prefix="faceid-export-faces-") as folder:
        synthetic.write_dataset(folder, 10, 1, image_size=max(image_size), pairs_per_target=GENERATED_PAIRS,
                                targets=("lfw",), seed=0)
        return {"generated": packs.load_bin(os.path.join(folder, "lfw.bin"), image_size)}


def _write(fmt: str, embedding_model, backbone, path: str, layout: str, quantize: str, metadata: dict, scratch: str):
    """Writes one export to `path` and returns its runner (pixels -> embeddings)."""
    if fmt == "onnx":
        model = exporters.insightface_model(backbone) if layout == "insightface" else embedding_model
        exporters.write_onnx(model, path, layout, metadata)
        return exporters.load_onnx(path, layout)
    if fmt == "saved_model":
        exporters.write_saved_model(embedding_model, path)
        with open(os.path.join(path, SAVED_MODEL_METADATA), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
        return exporters.load_saved_model(path)
    saved_model = os.path.join(scratch, "saved_model")
    exporters.write_saved_model(embedding_model, saved_model)
    exporters.write_tflite(saved_model, path, quantize)
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return exporters.load_tflite(path)


def _move(scratch_path: str, output: str, overwrite: bool) -> None:
    """Moves a finished export (and a TFLite file's JSON) to `output`, replacing the old one only now."""
    moves = [(scratch_path, output)]
    if os.path.exists(scratch_path + ".json"):
        moves.append((scratch_path + ".json", output + ".json"))
    for source, target in moves:
        if os.path.isdir(target) and overwrite:
            shutil.rmtree(target)
        os.replace(source, target)


def export(
    model_path: str,
    fmt: str,
    output: str,
    layout: str = "nhwc",
    quantize: str = "none",
    data_path: str | None = None,
    targets: list[str] | None = None,
    batch_size: int = 64,
    min_cosine: float = parity.MIN_COSINE,
    overwrite: bool = False,
) -> dict:
    """Exports the embedding part of a saved model and proves its parity; returns the parity report."""
    import keras

    if fmt not in exporters.FORMATS:
        raise ExportError(f"Unknown format {fmt!r}; choose from {list(exporters.FORMATS)}.")
    if layout not in exporters.LAYOUTS or (layout != "nhwc" and fmt != "onnx"):
        raise ExportError(f"--layout {layout} is not available for {fmt}; insightface's layout is ONNX only.")
    if quantize != "none" and fmt != "tflite":
        raise ExportError(f"--quantize {quantize} is for tflite exports only, not {fmt}.")
    if os.path.lexists(output) and not overwrite:
        raise ExportError(f"{output} already exists; pass --overwrite to replace it.")
    embedding_model, backbone = embedding_parts(keras.models.load_model(model_path), model_path)
    metadata = build_metadata(embedding_model, fmt, layout, quantize, stored_threshold(model_path))
    image_size = tuple(int(s) for s in embedding_model.inputs[0].shape[1:3])
    pairs = parity_targets(data_path, list(targets or []), image_size)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".faceid-export-", dir=folder)
    try:
        scratch_path = os.path.join(scratch, os.path.basename(os.path.abspath(output)))
        run = _write(fmt, embedding_model, backbone, scratch_path, layout, quantize, metadata, scratch)

        def reference(images):
            return embedding_model.predict(images, batch_size=batch_size, verbose=0)

        report = parity.compare(reference, run, pairs, batch_size)
        print(parity.format_report(report))
        if quantize == "none":
            parity.check(report, f"{fmt} export of {model_path}", min_cosine)
        _move(scratch_path, output, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["metadata"] = metadata
    return report


def run(args: argparse.Namespace) -> int:
    """`faceid export` handler: exports and prints parity; 0 on success, 1 with the reason on stderr."""
    targets = [name for name in (args.targets or "").split(",") if name]
    try:
        if targets and args.data_path is None:
            raise ExportError("--targets needs --data_path (where the verification packs are).")
        export(args.model, args.format, args.output, args.layout, args.quantize, args.data_path, targets,
               args.batch_size, args.min_cosine, args.overwrite)
    except (ExportError, calibrate.ThresholdFileError, parity.ParityError, exporters.MissingDependencyError) as err:
        print(f"faceid export: error: {err}", file=sys.stderr)
        return 1
    print(f"Exported {args.model} to {args.output} ({args.format}"
          f"{', ' + args.layout if args.format == 'onnx' else ''}"
          f"{', ' + args.quantize if args.format == 'tflite' else ''})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `export` subcommand on a `faceid` subparsers object."""
    parser = subparsers.add_parser(
        "export",
        help="export the embedding model to ONNX, TFLite or SavedModel, with proven parity",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("model", help="saved model (.keras): an ArcFaceModel or its embedding model")
    parser.add_argument("--format", required=True, choices=exporters.FORMATS, help="export format")
    parser.add_argument("--output", required=True, help="file (onnx, tflite) or folder (saved_model) to write")
    parser.add_argument("--layout", choices=exporters.LAYOUTS, default="nhwc",
                        help="ONNX input layout: nhwc ([N, H, W, 3] pixels in [0, 255], normalised output) or "
                        "insightface ([N, 3, H, W], (x - 127.5) / 127.5, raw output) (default: %(default)s)")
    parser.add_argument("--quantize", choices=exporters.QUANTIZATIONS, default="none",
                        help="TFLite quantisation (default: %(default)s)")
    parser.add_argument("--data_path", default=None,
                        help="tfds data dir or insightface folder whose verification pairs measure parity "
                        "(default: generated faces)")
    parser.add_argument("--targets", default=None, help="comma-separated verification targets, e.g. lfw,cfp_fp")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="parity batch size")
    parser.add_argument("--min_cosine", type=float, default=parity.MIN_COSINE,
                        help="least cosine an unquantised export must reach on every image (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)
    return parser
