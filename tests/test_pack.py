"""`faceid pack`: image folders to insightface's train.rec/.idx/property and .bin packs, read back."""
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from faceid_keras import alignment
from faceid_keras.cli import main as faceid
from tfds_ms1m import binpack, insightface_folder, pack


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour image (JPEG keeps it to about a grey level)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return (127.5 + 100 * np.sin(3 * x[..., None] + 2 * y[..., None] + phase)).astype(np.uint8)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def tree(synthetic_image_tree, tmp_path_factory):
    """The synthetic tree plus a PNG to resize, unusable files and identities without images."""
    root = tmp_path_factory.mktemp("tree") / "faces"
    shutil.copytree(synthetic_image_tree, root)
    (root / "id_3" / "big.png").write_bytes(_png(_smooth(48, 48, 0)))
    (root / "id_3" / "empty.jpg").write_bytes(b"")
    (root / "id_5" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "id_5" / "notes.txt").write_text("photographer: me")
    (root / "a_empty").mkdir()
    (root / "b_only_broken").mkdir()
    (root / "b_only_broken" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "stray.jpg").write_bytes((root / "id_0" / "001.jpg").read_bytes())
    (root / "pairs.csv").write_text("path1,path2,is_same\nid_0/001.jpg,id_0/002.jpg,1\n"
                                    "id_0/001.jpg,id_1/007.jpg,0\nid_3/big.png,id_3/empty.jpg,1\n")
    return root


def test_pack_reads_back_with_labels_bytes_and_skipped_files(tree, tmp_path, capsys):
    out = tmp_path / "packed"
    assert faceid(["pack", str(tree), str(out), "--image_size", "32", "--workers", "2",
                   "--pairs", f"lfw={tree / 'pairs.csv'}"]) == 0
    report = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["identities.txt", "lfw.bin", "property", "skipped.txt", "train.idx", "train.rec"]
    assert insightface_folder.read_property(out) == (8, 32, 32)  # a_empty and b_only_broken get no label
    assert (out / "identities.txt").read_text().splitlines() == [f"{i}\tid_{i}" for i in range(8)]

    records = list(insightface_folder.iter_images(out))
    assert len(records) == 8 * 6 + 1
    expected = sorted((f"id_{label}", name) for label in range(8) for name in os.listdir(tree / f"id_{label}")
                      if name.endswith((".jpg", ".png")) and name not in ("empty.jpg", "broken.jpg"))
    for (key, label, data), (identity, name) in zip(records, expected):
        assert label == int(identity[3:])
        source = (tree / identity / name).read_bytes()
        if name == "big.png":  # decoded, resized to 32x32, encoded as JPEG
            assert data[:2] == b"\xff\xd8" and _decode(data).shape == (32, 32, 3)
            resized = np.asarray(Image.open(tree / identity / name).resize((32, 32), Image.BILINEAR))
            assert np.abs(_decode(data) - resized).mean() < 2
        else:
            assert data == source  # a 32x32 JPEG keeps its bytes

    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert skipped["id_3/empty.jpg"] == "empty file"
    assert skipped["id_5/broken.jpg"].startswith("not a readable image")
    assert skipped["id_5/notes.txt"] == "not an image file extension"
    assert skipped["stray.jpg"] == "not inside an identity folder"
    assert skipped["b_only_broken/x.png"].startswith("not a readable image")
    assert skipped["a_empty/"] == skipped["b_only_broken/"] == "identity folder without a usable image"
    assert "pair 3 (id_3/empty.jpg)" in " ".join(skipped)
    assert "Packed 49 images of 8 identities" in report and "a_empty, b_only_broken" in report
    assert "id_3/empty.jpg: empty file" in report

    images, issame = binpack.read_bin(out / "lfw.bin")
    assert list(issame) == [True, False]
    assert images[0] == (tree / "id_0" / "001.jpg").read_bytes()


def test_pack_builds_with_tfds(tree, tmp_path):
    import tensorflow_datasets as tfds

    import tfds_ms1m  # noqa: F401

    out = tmp_path / "packed"
    pack.pack(tree, out, image_size=32, pairs=[("lfw", str(tree / "pairs.csv"))])
    config = tfds.download.DownloadConfig(manual_dir=str(out))
    builder = tfds.builder("ms1m_arcface/train", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=config)
    labels = [int(x["label"]) for x in builder.as_dataset(split="train").as_numpy_iterator()]
    assert builder.info.features["label"].num_classes == 8
    assert sorted(labels) == sorted([i for i in range(8) for _ in range(6)] + [3])


def test_failed_pack_leaves_folder_as_it_was(tree, tmp_path):
    out = tmp_path / "packed"
    out.mkdir()
    (out / "notes").write_text("mine")
    (tmp_path / "bad_pairs.txt").write_text("10\t300\nid_0 1\n")
    with pytest.raises(pack.PackError, match=r"bad_pairs.txt, line 2: expected 'name n1 n2'"):
        pack.pack(tree, out, image_size=32, pairs=[("lfw", str(tmp_path / "bad_pairs.txt"))])
    assert os.listdir(out) == ["notes"]  # the train.rec written before the failure is gone
    pack.pack(tree, out, image_size=32)
    with pytest.raises(pack.PackError, match="already holds a train.rec"):
        pack.pack(tree, out, image_size=32)


def test_lfw_pairs_and_landmarks_align_every_image(tmp_path):
    root = tmp_path / "lfw"
    rng = np.random.default_rng(1)
    rows = []
    for name in ("Ann_Lee", "Bo_Ma"):
        (root / name).mkdir(parents=True)
        for number in (1, 2):
            path = f"{name}/{name}_{number:04d}.jpg"
            Image.fromarray(_smooth(90, 80, number)).save(root / path, quality=98)
            points = alignment.template(112) * 0.6 + rng.uniform(5, 15, 2)
            rows.append((path, points))
    (tmp_path / "marks.csv").write_text(
        "".join(f"{path}," + ",".join(f"{v:.3f}" for v in points.ravel()) + "\n" for path, points in rows))
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Ma\t2\n")
    out = tmp_path / "packed"
    summary = pack.pack(root, out, landmarks=tmp_path / "marks.csv", pairs=[("cfp_fp", str(tmp_path / "pairs.txt"))],
                        workers=1)
    assert (summary.images, summary.identities, summary.pairs, summary.skipped) == (4, 2, {"cfp_fp": 2}, [])
    for (_, _, data), (path, points) in zip(insightface_folder.iter_images(out), rows):
        with Image.open(root / path) as image:
            aligned = alignment.align_face(np.asarray(image), np.round(points, 3))
        assert np.abs(_decode(data) - aligned).mean() < 2
    images, issame = binpack.read_bin(out / "cfp_fp.bin")
    assert list(issame) == [True, False] and len(images) == 4
