"""faceid export: ONNX (both layouts) equals Keras in onnxruntime, TFLite runs in LiteRT with each
quantisation, SavedModel serves, and an export that fails its parity check leaves nothing behind."""
import json
import os

import numpy as np
import pytest

SIZE, EMBEDDING = 32, 16


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny untrained ArcFaceModel saved as .keras, with a calibrated threshold beside it."""
    from faceid_keras import ArcFaceModel

    model = ArcFaceModel("iresnet18", num_classes=8, embedding_size=EMBEDDING, input_shape=(SIZE, SIZE, 3))
    path = tmp_path_factory.mktemp("export") / "arcface.keras"
    model.save(path)
    threshold = {"cosine": 0.31, "squared_distance": 1.38, "far": 1e-3, "embedding": "flip_sum", "tar": 0.9}
    (path.parent / "arcface.keras.threshold.json").write_text(json.dumps(threshold))
    return path


def _pixels(count=5, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3)).astype(np.float32)


def _keras(saved_model):
    import keras

    return keras.models.load_model(saved_model)


def test_onnx_nhwc_through_the_command_line(saved_model, synthetic_folder, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from faceid_keras import cli

    output = tmp_path / "arcface.onnx"
    argv = ["export", str(saved_model), "--format", "onnx", "--output", str(output),
            "--data_path", str(synthetic_folder), "--targets", "lfw"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "min cosine" in printed and "lfw" in printed
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert metadata["input_layout"] == "NHWC" and json.loads(metadata["embedding_size"]) == EMBEDDING
    assert json.loads(metadata["verification_threshold"])["cosine"] == 0.31
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[0] == "N"
    images = _pixels()
    expected = _keras(saved_model).predict(images, verbose=0)
    for batch in (images, images[:1]):
        np.testing.assert_allclose(session.run(None, {"images": batch})[0], expected[: len(batch)], atol=1e-5)
    assert cli.main(argv) == 1 and "already exists" in capsys.readouterr().err


def test_onnx_insightface_layout(saved_model, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from faceid_keras import export, exporters

    output = tmp_path / "r18.onnx"
    report = export.export(str(saved_model), "onnx", str(output), layout="insightface")
    assert report["min_cosine"] >= 0.9999 and report["metadata"]["normalization"].startswith("(x - 127.5)")
    proto = onnx.load(str(output))
    assert not exporters.looks_normalised_in_graph(proto.graph)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "data" and session.get_inputs()[0].shape == ["N", 3, SIZE, SIZE]
    images = _pixels()
    blob = ((images - 127.5) / 127.5).transpose(0, 3, 1, 2)
    raw = _keras(saved_model).backbone.predict(images / 127.5 - 1.0, verbose=0)
    np.testing.assert_allclose(session.run(None, {"data": blob})[0], raw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "quantize", ["none", pytest.param("float16", marks=pytest.mark.slow), pytest.param("dynamic_int8", marks=pytest.mark.slow)]
)
def test_tflite_runs_in_litert_and_reports_accuracy(saved_model, tmp_path, quantize):
    pytest.importorskip("ai_edge_litert")
    from faceid_keras import export, exporters

    output = tmp_path / f"{quantize}.tflite"
    report = export.export(str(saved_model), "tflite", str(output), quantize=quantize)
    assert set(report["targets"]["generated"]) == {"keras", "export", "pairs"}
    assert json.loads((tmp_path / f"{quantize}.tflite.json").read_text())["quantization"] == quantize
    images = _pixels()
    expected = _keras(saved_model).predict(images, verbose=0)
    actual = exporters.load_tflite(str(output))(images)
    cosine = np.sum(expected * actual, axis=1) / np.linalg.norm(actual, axis=1)
    assert cosine.min() >= (0.9999 if quantize == "none" else 0.95)


@pytest.mark.slow
def test_saved_model_serving_default(saved_model, tmp_path):
    import tensorflow as tf

    from faceid_keras import export

    output = tmp_path / "served"
    export.export(str(saved_model), "saved_model", str(output))
    signature = tf.saved_model.load(str(output)).signatures["serving_default"]
    images = _pixels()
    actual = signature(images=tf.constant(images))["embedding"].numpy()
    np.testing.assert_allclose(actual, _keras(saved_model).predict(images, verbose=0), atol=1e-5)
    assert json.loads((output / "faceid_metadata.json").read_text())["input_size"] == [SIZE, SIZE]


def test_failed_parity_leaves_no_file(saved_model, tmp_path):
    from faceid_keras import export, parity

    output = tmp_path / "out" / "served"
    with pytest.raises(parity.ParityError, match="min cosine .* < 1.5. Nothing was written"):
        export.export(str(saved_model), "saved_model", str(output), min_cosine=1.5)
    assert os.listdir(output.parent) == []
