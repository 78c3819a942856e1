"""`faceid import MODEL.onnx --output embedding.keras`: insightface's IResNet recognition ONNX as our model.

Reads the graph PyTorch's exporter writes for arcface_torch's iresnet (`torch2onnx.py`): each
Conv->BatchNorm pair fused into one Conv with a bias, the BatchNorms that precede a Conv kept,
PRelu slopes [C, 1, 1], Flatten then Gemm, a final BatchNormalization. Depth, width, input and
embedding size come from the graph; the weights go exactly onto `backbones.build("iresnetN")`
(a fused Conv becomes the conv kernel plus a BatchNorm that only adds the bias) and the result is
wrapped like `ArcFaceModel.embedding_model()`: [0, 255] RGB pixels -> L2-normalised embedding.
The file is untrusted: it is parsed by the `onnx` package without external data, and every tensor
must be float32 with as many bytes as its shape says.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

from faceid_keras.backbones.iresnet import DEPTHS, WIDTHS
from faceid_keras.backbones.normalization import EPSILON
from faceid_keras.exporters import MissingDependencyError, require

MAX_FILE_BYTES = 2**31  # protobuf's own limit for one message
IMPORT_MIN_COSINE = 0.99999


class UnsupportedModelError(ValueError):
    """An ONNX file that is not an insightface IResNet recognition model."""


class _Graph:
    """The nodes, initializers and tensor consumers of an ONNX graph, with bounded tensor reads."""

    def __init__(self, proto, source: str):
        self.source = source
        self.graph = proto.graph
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.consumers = collections.defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def fail(self, what: str):
        ops = collections.Counter(node.op_type for node in self.graph.node)
        found = ", ".join(f"{op} x{count}" for op, count in ops.most_common())
        raise UnsupportedModelError(
            f"{self.source}: not an insightface IResNet recognition model: {what}. Graph ops: {found or 'none'}."
        )

    def array(self, name: str) -> np.ndarray:
        """An initializer as float32, refused unless it is float32 data stored in the file itself."""
        from onnx import TensorProto, numpy_helper

        tensor = self.initializers.get(name)
        if tensor is None:
            self.fail(f"weight {name!r} is not an initializer")
        if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type != TensorProto.FLOAT:
            self.fail(f"weight {name!r} is not float32 data inside the file")
        count = int(np.prod([max(int(d), 0) for d in tensor.dims], dtype=np.float64))
        stored = len(tensor.raw_data) // 4 if tensor.raw_data else len(tensor.float_data)
        if count != stored:
            self.fail(f"weight {name!r} claims shape {list(tensor.dims)} but holds {stored} values")
        return numpy_helper.to_array(tensor).astype(np.float32)

    def only_consumer(self, tensor: str, op_type: str):
        nodes = self.consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            self.fail(f"expected {tensor!r} to feed one {op_type}, found {[n.op_type for n in nodes]}")
        return nodes[0]


def _attributes(node) -> dict:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _conv(graph: _Graph, node, kernel: int, stride: int) -> dict:
    """Kernel (HWIO) and bias of a Conv with PyTorch's symmetric padding (kernel - 1) // 2."""
    attributes = _attributes(node)
    pad = (kernel - 1) // 2
    weight = graph.array(node.input[1])
    if (
        weight.ndim != 4 or weight.shape[2:] != (kernel, kernel) or attributes.get("group", 1) != 1
        or list(attributes.get("strides", [1, 1])) != [stride, stride]
        or list(attributes.get("pads", [0, 0, 0, 0])) != [pad] * 4
        or list(attributes.get("dilations", [1, 1])) != [1, 1]
    ):
        graph.fail(
            f"Conv {node.name!r} is not a {kernel}x{kernel} stride-{stride} conv with padding {pad} "
            f"(weight {list(weight.shape)}, attributes {attributes})"
        )
    bias = graph.array(node.input[2]) if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
    return {"kernel": weight.transpose(2, 3, 1, 0), "bias": bias}


def _batch_norm(graph: _Graph, node, scale: bool = True) -> list[np.ndarray]:
    """Keras BatchNormalization weights (epsilon 1e-5) computing what the ONNX node computes."""
    gamma, beta, mean, variance = (graph.array(name) for name in node.input[1:5])
    epsilon = float(_attributes(node).get("epsilon", 1e-5))
    variance = variance + epsilon - EPSILON
    if not scale:  # gamma / sqrt(var + eps) == 1 / sqrt(var' + eps)
        if np.any(gamma <= 0):
            graph.fail(f"BatchNormalization {node.name!r} has non-positive scales where insightface fixes 1")
        variance = (variance + EPSILON) / np.square(gamma) - EPSILON
        return [beta, mean, variance]
    return [gamma, beta, mean, variance]


def _bias_norm(bias: np.ndarray) -> list[np.ndarray]:
    """BatchNormalization weights that only add `bias`: gamma sqrt(1 + eps), mean 0, variance 1."""
    return [np.full_like(bias, np.sqrt(1.0 + EPSILON)), bias, np.zeros_like(bias), np.ones_like(bias)]


def _prelu(graph: _Graph, node) -> list[np.ndarray]:
    slope = graph.array(node.input[1])
    if slope.ndim != 3 or slope.shape[1:] != (1, 1):
        graph.fail(f"PRelu {node.name!r} slope has shape {list(slope.shape)}, expected [C, 1, 1]")
    return [slope.reshape(1, 1, -1)]


def _next(node, graph: _Graph, op_type: str):
    return graph.only_consumer(node.output[0], op_type)


def parse(proto, source: str) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """({depth, input_size, embedding_size}, {layer name: Keras weights}) of an insightface IResNet graph."""
    graph = _Graph(proto, source)
    inputs = [value.name for value in graph.graph.input if value.name not in graph.initializers]
    if len(inputs) != 1 or len(graph.graph.output) != 1:
        graph.fail(f"expected one image input and one embedding output, found inputs {inputs}")
    first = graph.only_consumer(inputs[0], "Conv")
    weights = {}
    stem = _conv(graph, first, 3, 1)
    if stem["kernel"].shape[2:] != (3, WIDTHS[0]):
        graph.fail(f"stem conv maps {stem['kernel'].shape[2]} to {stem['kernel'].shape[3]} channels, expected 3 to 64")
    weights["stem_conv"], weights["stem_bn"] = [stem["kernel"]], _bias_norm(stem["bias"])
    node = _next(first, graph, "PRelu")
    weights["stem_prelu"] = _prelu(graph, node)
    tensor, channels, units = node.output[0], WIDTHS[0], []
    while True:
        nodes = graph.consumers.get(tensor, [])
        kinds = sorted(n.op_type for n in nodes)
        if kinds == ["BatchNormalization"]:  # the BatchNorm after the last stage, before Flatten
            break
        if kinds not in (["Add", "BatchNormalization"], ["BatchNormalization", "Conv"]):
            graph.fail(f"after unit {len(units)} expected BatchNormalization with a Conv or Add shortcut, found {kinds}")
        bn1 = next(n for n in nodes if n.op_type == "BatchNormalization")
        down = next((n for n in nodes if n.op_type == "Conv"), None)
        conv1 = _next(bn1, graph, "Conv")
        filters = graph.array(conv1.input[1]).shape[0]
        stride = 2 if down is not None else 1
        layers = {"bn1": _batch_norm(graph, bn1)}
        conv = _conv(graph, conv1, 3, 1)
        layers["conv1"], layers["bn2"] = [conv["kernel"]], _bias_norm(conv["bias"])
        prelu = _next(conv1, graph, "PRelu")
        layers["prelu"] = _prelu(graph, prelu)
        conv2 = _next(prelu, graph, "Conv")
        conv = _conv(graph, conv2, 3, stride)
        layers["conv2"], layers["bn3"] = [conv["kernel"]], _bias_norm(conv["bias"])
        add = _next(conv2, graph, "Add")
        if down is not None:
            conv = _conv(graph, down, 1, stride)
            layers["down_conv"], layers["down_bn"] = [conv["kernel"]], _bias_norm(conv["bias"])
            if _next(down, graph, "Add") is not add:
                graph.fail(f"the shortcut of unit {len(units) + 1} does not join its residual branch")
        elif add not in graph.consumers[tensor]:
            graph.fail(f"unit {len(units) + 1} has no identity shortcut")
        units.append((filters, stride, layers))
        tensor, channels = add.output[0], filters
    stages = []
    for filters, stride, layers in units:
        if stride == 2:
            stages.append([])
        if not stages:
            graph.fail("the first unit does not downsample")
        stages[-1].append(layers)
    counts = tuple(len(s) for s in stages)
    widths = tuple(units[i][0] for i in np.cumsum([0, *counts[:-1]]))
    depth = next((d for d, c in DEPTHS.items() if c == counts), None)
    if depth is None or widths != WIDTHS:
        graph.fail(f"stages of {counts} units with widths {widths} (IResNet has {dict(DEPTHS)} and widths {WIDTHS})")
    for stage, layers_of_stage in enumerate(stages, start=1):
        for unit, layers in enumerate(layers_of_stage, start=1):
            for suffix, value in layers.items():
                weights[f"stage{stage}_unit{unit}_{suffix}"] = value
    output_bn = graph.consumers[tensor][0]
    weights["output_bn"] = _batch_norm(graph, output_bn)
    flatten = _next(output_bn, graph, "Flatten")
    gemm = _next(flatten, graph, "Gemm")
    fc = _gemm(graph, gemm, channels)
    features = _next(gemm, graph, "BatchNormalization")
    if features.output[0] != graph.graph.output[0].name:
        graph.fail("the final BatchNormalization is not the graph output")
    weights["features"] = _batch_norm(graph, features, scale=False)
    size = int(round(np.sqrt(fc["area"]))) * 16
    if size * size != fc["area"] * 256:
        graph.fail(f"the fully connected layer takes {fc['area']} positions, not a square feature map")
    weights["output_fc"] = [fc["kernel"], fc["bias"]]
    return {"depth": depth, "input_size": size, "embedding_size": fc["kernel"].shape[1]}, weights


def _gemm(graph: _Graph, node, channels: int) -> dict:
    """Dense kernel for NHWC-flattened features from a Gemm over NCHW-flattened ones."""
    attributes = _attributes(node)
    weight = graph.array(node.input[1])
    if attributes.get("transB", 0):
        weight = weight.T
    if weight.ndim != 2 or weight.shape[0] % channels or attributes.get("alpha", 1.0) != 1.0 \
            or attributes.get("beta", 1.0) != 1.0 or attributes.get("transA", 0):
        graph.fail(f"Gemm {node.name!r} with weight {list(weight.shape)} does not follow {channels} channels")
    area = weight.shape[0] // channels
    side = int(round(np.sqrt(area)))
    embedding = weight.shape[1]
    kernel = weight.reshape(channels, side, side, embedding).transpose(1, 2, 0, 3).reshape(-1, embedding)
    bias = graph.array(node.input[2]) if len(node.input) > 2 else np.zeros(embedding, np.float32)
    return {"kernel": kernel, "bias": bias, "area": area}


def load(path: str):
    """Reads `path` as an insightface IResNet ONNX model into our embedding model (not saved)."""
    from faceid_keras import backbones
    from faceid_keras.model import embedding_model

    onnx = require("onnx", "Importing an ONNX model")
    size = os.path.getsize(path)
    if size >= MAX_FILE_BYTES:
        raise UnsupportedModelError(f"{path}: {size} bytes, larger than one ONNX protobuf can be.")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # the onnx package raises protobuf's DecodeError and others
        raise UnsupportedModelError(f"{path}: not a readable ONNX model: {err}") from err
    config, weights = parse(proto, path)
    backbone = backbones.build(
        f"iresnet{config['depth']}", (config["input_size"], config["input_size"], 3), config["embedding_size"]
    )
    for name, values in weights.items():
        backbone.get_layer(name).set_weights(values)
    return embedding_model(backbone), config


def run(args: argparse.Namespace) -> int:
    """`faceid import` handler: converts, saves, checks against onnxruntime; 1 with the reason on failure."""
    from faceid_keras import exporters, parity

    try:
        if os.path.lexists(args.output) and not args.overwrite:
            raise UnsupportedModelError(f"{args.output} already exists; pass --overwrite to replace it.")
        model, config = load(args.model)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (8, config["input_size"], config["input_size"], 3)).astype(np.float32)
        expected = parity.normalised_embeddings(exporters.load_onnx(args.model, "insightface"), images)
        actual = parity.normalised_embeddings(lambda x: model.predict(x, verbose=0), images)
        cosine = float(np.sum(expected * actual, axis=1).min())
        if not cosine >= IMPORT_MIN_COSINE:
            raise UnsupportedModelError(f"{args.model}: imported model differs from onnxruntime (min cosine {cosine}).")
        temporary = args.output + ".partial.keras"
        model.save(temporary)
        os.replace(temporary, args.output)
    except (UnsupportedModelError, MissingDependencyError, OSError) as err:
        print(f"faceid import: error: {err}", file=sys.stderr)
        return 1
    print(f"Imported {args.model}: iresnet{config['depth']}, input {config['input_size']}x{config['input_size']}, "
          f"embedding {config['embedding_size']}; min cosine to onnxruntime {cosine:.7f}; saved {args.output}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `import` subcommand on a `faceid` subparsers object."""
    parser = subparsers.add_parser(
        "import",
        help="convert an insightface IResNet recognition ONNX model into a Keras embedding model",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("model", help="insightface recognition model (.onnx), e.g. w600k_r50.onnx")
    parser.add_argument("--output", required=True, help="embedding model to write (.keras)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)
    return parser
