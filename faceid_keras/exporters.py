"""Writers and runners of the deployment formats: ONNX (NHWC or insightface's NCHW), TFLite, SavedModel.

Each `write_*` turns a Keras model into a file; each `load_*` opens such a file in its own runtime
(onnxruntime, the LiteRT interpreter, TensorFlow) as a function `images -> embeddings` on float32
RGB [N, H, W, 3] pixels in [0, 255], so parity is measured on what a consumer will run.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf

from faceid_keras import compat

FORMATS = ("onnx", "tflite", "saved_model")
LAYOUTS = ("nhwc", "insightface")
QUANTIZATIONS = ("none", "float16", "dynamic_int8")
ONNX_OPSET = 13
OUTPUT_NAME = "embedding"
INPUT_NAMES = {"nhwc": "images", "insightface": "data"}
BATCH_DIM = "N"

Runner = Callable[[np.ndarray], np.ndarray]


class MissingDependencyError(ImportError):
    """A format needs a package that is not installed (the `faceid-keras[export]` extra)."""


def require(module: str, purpose: str):
    """Imports `module`, or raises MissingDependencyError naming it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module!r}, which is not installed ({err}); "
            f"install it with: pip install 'faceid-keras[export]'"
        ) from err


def insightface_model(backbone: keras.Model) -> keras.Model:
    """`backbone` behind an NCHW input named `data` that takes (x - 127.5) / 127.5 pixels (the
    backbone's own input range), giving the raw embedding, as insightface's recognition models."""
    height, width, channels = (int(s) for s in backbone.inputs[0].shape[1:])
    data = keras.Input((channels, height, width), name=INPUT_NAMES["insightface"])
    nhwc = keras.layers.Permute((2, 3, 1), name="nchw_to_nhwc")(data)
    return keras.Model(data, backbone(nhwc), name=f"{backbone.name}_insightface")


def _rename(graph, old: str, new: str) -> None:
    """Renames tensor `old` to `new` everywhere in an ONNX graph."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output):
        if value.name == old:
            value.name = new


def looks_normalised_in_graph(graph) -> bool:
    """insightface's ArcFaceONNX rule: a node named `Sub*`/`_minus*` and one named `Mul*`/`_mul*`
    among the first 8 graph nodes mean the graph normalises its input itself."""
    names = [node.name for node in graph.node[:8]]
    sub = any(name.startswith(("Sub", "_minus")) for name in names)
    mul = any(name.startswith(("Mul", "_mul")) for name in names)
    return sub and mul


def write_onnx(model: keras.Model, path: str, layout: str, metadata: Mapping[str, object]) -> None:
    """Writes `model` (NHWC layout: the embedding model; insightface: `insightface_model`) as ONNX
    with input/output names of the layout, a dynamic batch named N, and `metadata` in metadata_props."""
    onnx = require("onnx", "ONNX export")
    require("tf2onnx", "ONNX export")
    compat.export_onnx(model, path, INPUT_NAMES[layout], ONNX_OPSET)
    proto = onnx.load(path)
    graph = proto.graph
    _rename(graph, graph.input[0].name, INPUT_NAMES[layout])
    _rename(graph, graph.output[0].name, OUTPUT_NAME)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.producer_name = "faceid-keras"
    if layout == "insightface" and looks_normalised_in_graph(graph):
        raise ValueError(
            f"{path}: the first graph nodes are named like Sub and Mul ops, which insightface reads as "
            "an MXNet model normalising in the graph (mean 0, std 1): its get_feat would feed it raw pixels."
        )
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def load_onnx(path: str, layout: str) -> Runner:
    """An onnxruntime session on `path` as a function of [0, 255] NHWC pixels (the insightface
    layout gets them transposed to NCHW and normalised as insightface's `get_feat` does)."""
    ort = require("onnxruntime", "Running an ONNX export")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if layout == "insightface":
            images = np.ascontiguousarray(((images - 127.5) / 127.5).transpose(0, 3, 1, 2))
        return session.run(None, {name: images})[0]

    return run


def _serving_function(model: keras.Model):
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=INPUT_NAMES["nhwc"])

    @tf.function(input_signature=[spec])
    def serve(images):
        return {OUTPUT_NAME: model(images, training=False)}

    return serve


def write_saved_model(model: keras.Model, path: str) -> None:
    """Writes a SavedModel whose `serving_default` maps `images` [N, H, W, 3] to `embedding` [N, D]."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = _serving_function(model)
    archive.add_endpoint("serving_default", serve, serve.input_signature)
    archive.write_out(path)


def load_saved_model(path: str) -> Runner:
    """The `serving_default` signature of a SavedModel as a function of pixels."""
    signature = tf.saved_model.load(path).signatures["serving_default"]

    def run(images: np.ndarray) -> np.ndarray:
        return signature(**{INPUT_NAMES["nhwc"]: tf.constant(images, tf.float32)})[OUTPUT_NAME].numpy()

    return run


def write_tflite(saved_model: str, path: str, quantize: str) -> None:
    """Converts a `write_saved_model` folder with TensorFlow's TFLite converter (dynamic batch),
    optionally quantised: float16 weights, or dynamic-range int8 (int8 weights, activations
    quantised on the fly). Converting the SavedModel, not a concrete function of the Keras 3
    model, is what gives correct numbers: the latter converts to NaN outputs on TF 2.21."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantize!r}; choose from {list(QUANTIZATIONS)}.")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    with open(path, "wb") as f:
        f.write(converter.convert())


def load_tflite(path: str) -> Runner:
    """A LiteRT (ai-edge-litert) interpreter on `path` as a function of pixels, resized per batch size."""
    litert = require("ai_edge_litert.interpreter", "Running a TFLite export")
    interpreter = litert.Interpreter(model_path=path)
    input_detail = interpreter.get_input_details()[0]
    allocated = [None]

    def run(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        if allocated[0] != images.shape:
            interpreter.resize_tensor_input(input_detail["index"], images.shape)
            interpreter.allocate_tensors()
            allocated[0] = images.shape
        interpreter.set_tensor(input_detail["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()

    return run
