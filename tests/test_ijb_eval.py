"""`faceid eval --ijb` end to end on a synthetic IJB folder, against the steps computed independently."""
import os
import re

import cv2
import keras
import numpy as np
import pytest
from PIL import Image

from faceid_keras import ArcFaceModel, alignment, ijb, ijb_embedding
from faceid_keras.ijb_protocol import read_protocol
from helpers import run_faceid
from tfds_ms1m import synthetic_ijb


@pytest.fixture(scope="module")
def ijb_folder(tmp_path_factory):
    return synthetic_ijb.write_ijb(tmp_path_factory.mktemp("ijb"), 8, seed=1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    backbone = keras.Sequential(
        [keras.Input((112, 112, 3)), keras.layers.AveragePooling2D(8), keras.layers.Flatten(), keras.layers.Dense(16)]
    )
    path = tmp_path_factory.mktemp("model") / "arcface.keras"
    ArcFaceModel(backbone=backbone, num_classes=4).save(path)
    return path


def reference_embeddings(model, protocol):
    """cv2.imread (BGR -> RGB), alignment, flip, and the backbone on (x - 127.5) / 127.5, one image at a time."""
    crops = []
    for name, points in zip(protocol.image_names, protocol.landmarks):
        image = cv2.cvtColor(cv2.imread(os.path.join(protocol.image_dir, name)), cv2.COLOR_BGR2RGB)
        crops.append(alignment.align_face(image, points))
    crops = (np.stack(crops).astype(np.float32) - 127.5) / 127.5
    return model.backbone.predict(crops, verbose=0), model.backbone.predict(crops[:, :, ::-1], verbose=0)


def test_eval_ijb_matches_independent_steps(model_path, ijb_folder, tmp_path, capsys):
    plot = tmp_path / "roc.png"
    results = run_faceid(
        ["eval", str(model_path), "--ijb", ijb_folder, "--ijb_set", "IJBC", "--ijb_mode", "N1D1F1,N0D0F0",
         "--ijb_cache", str(tmp_path / "cache"), "--batch_size", "5", "--roc_plot", str(plot)]
    )
    assert list(results) == ["IJBC N1D1F1", "IJBC N0D0F0"]
    protocol = read_protocol(ijb_folder, "IJBC")
    embeddings, flipped = reference_embeddings(keras.models.load_model(model_path), protocol)
    (chunk,) = [f for f in os.listdir(tmp_path / "cache") if f.startswith("chunk_")]
    with np.load(tmp_path / "cache" / chunk) as cached:  # pixels as OpenCV decodes them
        np.testing.assert_allclose(cached["embeddings"], embeddings, rtol=0, atol=1e-5)
        np.testing.assert_allclose(cached["flipped"], flipped, rtol=0, atol=1e-5)
    for name, flags in (("IJBC N1D1F1", (True, True, True)), ("IJBC N0D0F0", (False, False, False))):
        features = ijb.image_features(embeddings, flipped, protocol.detector_scores, *flags)
        ids, templates = ijb.template_features(features, protocol.templates, protocol.medias)
        scores = ijb.pair_scores(ids, templates, protocol.template1, protocol.template2)
        assert results[name]["pairs"] == len(protocol.labels)
        assert results[name]["auc"] == pytest.approx(ijb.auc(*ijb.roc_curve(scores, protocol.labels)[:2]), abs=1e-6)
        assert results[name]["tar"] == ijb.tar_at_far(scores, protocol.labels)
    out = capsys.readouterr().out
    table = out[out.index("target "):].splitlines()
    assert re.match(r"target\s+pairs\s+TAR@FAR=1e-06 .*TAR@FAR=1e-01\s+AUC$", table[0])
    assert table[1].split()[:3] == ["IJBC", "N1D1F1", str(results["IJBC N1D1F1"]["pairs"])]
    assert table[1].endswith(f"{results['IJBC N1D1F1']['auc']:.5f}")
    assert len({len(line) for line in table[:3]}) == 1
    assert re.match(r"target\s+TPIR@FPIR=1e-02\s+TPIR@FPIR=1e-01\s+rank-1\s+rank-5\s+rank-10$", table[3])
    assert [line.split()[2] for line in table[4:7]] == ["G1", "G2", "mean"]
    mean = results["IJBC N1D1F1"]["identification"]["mean"]["rank"][1]
    assert table[6].split()[5] == f"{mean:.5f}"
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_embeddings_resume_from_cache_chunks(model_path, ijb_folder, tmp_path):
    protocol = read_protocol(ijb_folder, "IJBC")
    model = keras.models.load_model(model_path)
    cache = str(tmp_path / "cache")
    args = (protocol.image_dir, protocol.image_names, protocol.landmarks, 4)
    first = ijb_embedding.embed_images(model, *args, cache_dir=cache, fingerprint={"m": 1}, chunk_size=10, verbose=0)
    chunks = sorted(f for f in os.listdir(cache) if f.startswith("chunk_"))
    assert len(chunks) == -(-len(protocol.image_names) // 10)
    os.remove(os.path.join(cache, chunks[1]))
    other = keras.models.clone_model(model.backbone)  # different weights: only the deleted chunk changes
    other_model = ArcFaceModel(backbone=other, num_classes=4)
    again = ijb_embedding.embed_images(other_model, *args, cache_dir=cache, fingerprint={"m": 1}, chunk_size=10, verbose=0)
    np.testing.assert_array_equal(again[0][:10], first[0][:10])
    np.testing.assert_array_equal(again[0][20:], first[0][20:])
    assert not np.allclose(again[0][10:20], first[0][10:20])
    with pytest.raises(ValueError, match=r"fingerprint\.json describes another run"):
        ijb_embedding.embed_images(model, *args, cache_dir=cache, fingerprint={"m": 2}, chunk_size=10, verbose=0)


def test_raw_embedding_model_skips_the_normalisation(model_path):
    model = keras.models.load_model(model_path)
    images = np.random.default_rng(0).uniform(0, 255, (3, 112, 112, 3)).astype(np.float32)
    raw = ijb_embedding.raw_embedding_model(model).predict(images, verbose=0)
    np.testing.assert_allclose(raw, model.backbone.predict(images / 127.5 - 1, verbose=0), atol=1e-5)
    from_embedding_model = ijb_embedding.raw_embedding_model(model.embedding_model()).predict(images, verbose=0)
    np.testing.assert_allclose(from_embedding_model, raw, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_eval_needs_a_data_path_or_an_ijb_folder(model_path, ijb_folder, tmp_path):
    with pytest.raises(ValueError, match="needs --data_path .* or --ijb"):
        run_faceid(["eval", str(model_path)])
    with pytest.raises(ValueError, match="--ijb_mode 'N2D1F1'"):
        run_faceid(["eval", str(model_path), "--ijb", ijb_folder, "--ijb_mode", "N2D1F1"])
