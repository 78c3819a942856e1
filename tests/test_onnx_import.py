"""faceid import: an insightface-layout IResNet ONNX (Conv+BN fused as PyTorch's exporter writes it)
built from our own weights imports back to the same embeddings; other graphs are refused."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE, EMBEDDING = 32, 16


def _randomised_backbone(seed=0):
    """A tiny iresnet18 whose BatchNorms hold non-trivial statistics and scales."""
    from faceid_keras import backbones

    backbone = backbones.build("iresnet18", (SIZE, SIZE, 3), EMBEDDING)
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if type(layer).__name__ == "BatchNormalization":
            values = [w.copy() for w in layer.get_weights()]
            *affine, mean, variance = values
            affine = [a + rng.normal(0, 0.1, a.shape).astype(np.float32) for a in affine]
            mean = rng.normal(0, 0.1, mean.shape).astype(np.float32)
            variance = rng.uniform(0.5, 1.5, variance.shape).astype(np.float32)
            layer.set_weights([*affine, mean, variance])
    return backbone


class _TorchStyleGraph:
    """Writes ONNX nodes the way PyTorch exports arcface_torch's iresnet (NCHW, fused Conv+BN)."""

    def __init__(self, backbone):
        self.backbone, self.nodes, self.initializers = backbone, [], []

    def _constant(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def _node(self, op, inputs, **attributes):
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attributes))
        return f"{name}_out"

    def conv_bn(self, x, conv, bn, stride):
        kernel = self.backbone.get_layer(conv).get_weights()[0]  # HWIO
        gamma, beta, mean, variance = self.backbone.get_layer(bn).get_weights()
        scale = gamma / np.sqrt(variance + 1e-5)
        weight = (kernel * scale).transpose(3, 2, 0, 1)
        pad = (kernel.shape[0] - 1) // 2
        return self._node("Conv", [x, self._constant(f"{conv}.w", weight), self._constant(f"{conv}.b", beta - mean * scale)],
                          kernel_shape=list(kernel.shape[:2]), strides=[stride, stride], pads=[pad] * 4)

    def bn(self, x, name):
        weights = self.backbone.get_layer(name).get_weights()
        if len(weights) == 3:
            weights = [np.ones_like(weights[0]), *weights]
        inputs = [self._constant(f"{name}.{i}", w) for i, w in enumerate(weights)]
        return self._node("BatchNormalization", [x, *inputs], epsilon=1e-5)

    def prelu(self, x, name):
        alpha = self.backbone.get_layer(name).get_weights()[0].reshape(-1, 1, 1)
        return self._node("PRelu", [x, self._constant(f"{name}.slope", alpha)])

    def build(self):
        x = self.prelu(self.conv_bn("data", "stem_conv", "stem_bn", 1), "stem_prelu")
        for stage, units in enumerate((2, 2, 2, 2), start=1):
            for unit in range(1, units + 1):
                name, stride = f"stage{stage}_unit{unit}", 2 if unit == 1 else 1
                shortcut = self.conv_bn(x, f"{name}_down_conv", f"{name}_down_bn", stride) if unit == 1 else x
                y = self.conv_bn(self.bn(x, f"{name}_bn1"), f"{name}_conv1", f"{name}_bn2", 1)
                y = self.conv_bn(self.prelu(y, f"{name}_prelu"), f"{name}_conv2", f"{name}_bn3", stride)
                x = self._node("Add", [y, shortcut])
        x = self._node("Flatten", [self.bn(x, "output_bn")], axis=1)
        kernel, bias = self.backbone.get_layer("output_fc").get_weights()
        side = SIZE // 16
        weight = kernel.reshape(side, side, -1, EMBEDDING).transpose(3, 2, 0, 1).reshape(EMBEDDING, -1)
        x = self._node("Gemm", [x, self._constant("fc.w", weight), self._constant("fc.b", bias)], transB=1)
        x = self.bn(x, "features")
        graph = helper.make_graph(
            self.nodes, "iresnet", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["None", EMBEDDING])], self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


@pytest.fixture(scope="module")
def insightface_onnx(tmp_path_factory):
    backbone = _randomised_backbone()
    path = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    onnx.save(_TorchStyleGraph(backbone).build(), str(path))
    return backbone, path


def _pixels(count=6, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3)).astype(np.float32)


def _normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_import_equals_onnxruntime_and_the_original_weights(insightface_onnx, tmp_path):
    import keras

    from faceid_keras import onnx_import

    backbone, path = insightface_onnx
    model, config = onnx_import.load(str(path))
    assert config == {"depth": 18, "input_size": SIZE, "embedding_size": EMBEDDING}
    images = _pixels()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nchw = ((images - 127.5) / 127.5).transpose(0, 3, 1, 2)
    expected = _normalised(session.run(None, {"data": nchw})[0])
    saved = tmp_path / "imported.keras"
    model.save(saved)
    loaded = keras.models.load_model(saved)  # safe_mode on
    actual = loaded.predict(images, verbose=0)
    assert np.sum(expected * actual, axis=1).min() >= 0.99999
    original = _normalised(backbone.predict(images / 127.5 - 1.0, verbose=0))
    np.testing.assert_allclose(actual, original, atol=2e-5)
    assert [layer.name for layer in loaded.layers] == ["images", "pixel_scaling", "iresnet18", "l2_normalize"]
    # `faceid train --init_from imported.keras` starts from this backbone, weights and all.
    from faceid_keras import finetune

    start = finetune.load_backbone(str(saved))
    np.testing.assert_allclose(_normalised(start.predict(images / 127.5 - 1.0, verbose=0)), actual, atol=2e-5)


def test_import_refuses_other_graphs(tmp_path):
    from faceid_keras import onnx_import

    kernel = numpy_helper.from_array(np.zeros((8, 1, 3, 3), np.float32), "dw")
    node = helper.make_node("Conv", ["data", "dw"], ["y"], group=8, pads=[1] * 4, name="Conv_0")
    graph = helper.make_graph([node], "mobilefacenet_like",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [kernel])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(onnx_import.UnsupportedModelError, match=r"not an insightface IResNet.*Conv x1"):
        onnx_import.load(str(path))
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(onnx_import.UnsupportedModelError, match="not a readable ONNX model|not an insightface"):
        onnx_import.load(str(path))


def test_import_refuses_a_tensor_larger_than_its_data(insightface_onnx, tmp_path):
    from faceid_keras import onnx_import

    proto = onnx.load(str(insightface_onnx[1]))
    proto.graph.initializer[0].dims[0] = 10**9
    path = tmp_path / "lying.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(onnx_import.UnsupportedModelError, match="claims shape"):
        onnx_import.load(str(path))


def test_faceid_import_command(insightface_onnx, tmp_path, capsys):
    from faceid_keras import cli

    output = tmp_path / "embedding.keras"
    assert cli.main(["import", str(insightface_onnx[1]), "--output", str(output)]) == 0
    assert output.exists() and "iresnet18" in capsys.readouterr().out
    assert cli.main(["import", str(insightface_onnx[1]), "--output", str(output)]) == 1
    assert "already exists" in capsys.readouterr().err
