"""`faceid verify`, `faceid embed`, `faceid identify` and `FaceVerifier` end to end on synthetic faces."""
import json

import keras
import numpy as np
import pytest
from PIL import Image

from faceid_keras import ArcFaceModel, FaceVerifier, alignment, verifier
from faceid_keras.cli import main as faceid


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    backbone = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(16)])
    path = tmp_path_factory.mktemp("model") / "embedding.keras"
    ArcFaceModel(backbone=backbone, num_classes=8).embedding_model().save(path)
    return path


def test_embed_then_identify_finds_each_gallery_image(model_path, synthetic_image_tree, tmp_path, capsys):
    gallery = tmp_path / "gallery.npz"
    assert faceid(["embed", str(model_path), str(synthetic_image_tree), "--output", str(gallery),
                   "--batch_size", "5", "--workers", "2"]) == 0
    assert "Embedded 48 images of 8 identities" in capsys.readouterr().out
    with np.load(gallery, allow_pickle=False) as data:
        embeddings, labels, paths = data["embeddings"], data["labels"], data["paths"]
    assert embeddings.shape == (48, 16) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert [p.split("/")[0] for p in paths] == list(labels) and sorted(set(labels)) == [f"id_{i}" for i in range(8)]
    # The batched embeddings equal one image at a time.
    one = FaceVerifier.load(model_path).embed([synthetic_image_tree / paths[7]])
    np.testing.assert_allclose(one[0], embeddings[7], atol=1e-5)

    queries = [str(synthetic_image_tree / paths[i]) for i in (0, 20, 47)]
    assert faceid(["identify", str(model_path), "--gallery", str(gallery), *queries, "--top_k", "3",
                   "--threshold", "0.999"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 5
    for block, index in zip(range(0, 15, 5), (0, 20, 47)):
        assert lines[block] == queries[block // 5]
        label, similarity = lines[block + 1].split()[1:]
        assert label == labels[index] and float(similarity) == pytest.approx(1.0, abs=1e-4)
        assert lines[block + 4] == f"  decision (threshold 0.99900): {labels[index]}"


def test_search_is_exact_across_chunks():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((1000, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    labels = np.array([f"p{i % 37}" for i in rng.permutation(1000)])
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    found = verifier.search(queries, gallery, labels, k=5, chunk=64)
    similarity = queries @ gallery.T
    for row, matches in zip(similarity, found):
        best = {name: row[labels == name].max() for name in set(labels)}
        expected = sorted(best, key=lambda name: -best[name])[:5]
        assert [name for name, _ in matches] == expected
        assert [s for _, s in matches] == pytest.approx([best[name] for name in expected], abs=1e-5)


def test_verify_uses_stored_or_given_threshold_and_landmarks(model_path, synthetic_image_tree, tmp_path, capsys):
    a, b = synthetic_image_tree / "id_0" / "001.jpg", synthetic_image_tree / "id_4" / "025.jpg"
    with pytest.raises(SystemExit, match="no threshold"):
        faceid(["verify", str(model_path), str(a), str(b)])
    similarity = FaceVerifier.compare(*FaceVerifier.load(model_path).embed([a, b]))
    threshold = (model_path.parent / "embedding.keras.threshold.json")
    threshold.write_text(json.dumps({"cosine": similarity - 0.01}))
    assert faceid(["verify", str(model_path), str(a), str(b)]) == 0
    assert capsys.readouterr().out == f"cosine similarity {similarity:.5f} (threshold {similarity - 0.01:.5f}): same\n"
    assert faceid(["verify", str(model_path), str(a), str(b), "--threshold", str(similarity + 0.01)]) == 2
    assert capsys.readouterr().out.endswith(": different\n")
    threshold.unlink()

    # A 200x200 photo with its five landmarks: aligned at 112 (the template is defined there, not at
    # the model's 32) and resized, as by hand.
    photo = np.asarray(keras.utils.load_img(a).resize((200, 200)))
    keras.utils.save_img(tmp_path / "photo.png", photo)
    points = alignment.template(112) * 1.4 + 20
    (tmp_path / "marks.csv").write_text("photo.png," + ",".join(f"{v}" for v in points.ravel()) + "\n")
    face = FaceVerifier.load(model_path)
    aligned = Image.fromarray(alignment.align_face(photo, points)).resize((32, 32), Image.BILINEAR)
    expected = face.embed([np.asarray(aligned)])
    got = face.embed([tmp_path / "photo.png"], [points])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert faceid(["verify", str(model_path), str(tmp_path / "photo.png"), str(tmp_path / "photo.png"),
                   "--landmarks", str(tmp_path / "marks.csv"), "--threshold", "0.99"]) == 0
