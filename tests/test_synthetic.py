"""Synthetic insightface folders: layout, header/identity records, fold layout, learnability, CLI."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from tfds_ms1m import binpack, insightface_folder, recordio, synthetic


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_folder_layout_and_records(tmp_path):
    folder = synthetic.write_dataset(
        tmp_path / "d", 4, 3, image_size=16, pairs_per_target=20, targets=("lfw",)
    )
    assert sorted(p.name for p in folder.iterdir()) == ["lfw.bin", "property", "train.idx", "train.rec"]
    assert insightface_folder.read_property(folder) == (4, 16, 16)
    with recordio.RecordReader(folder / "train.rec") as reader:
        assert reader.keys.tolist() == list(range(17))
        assert recordio.unpack_record(reader.read(0))[0].tolist() == [13, 17]
        assert [recordio.unpack_record(reader.read(13 + c))[0].tolist() for c in range(4)] == [
            [1, 4], [4, 7], [7, 10], [10, 13]
        ]
        header, _, _ = recordio.unpack_header(reader.read(5))
        assert header.flag == 0
    images = list(insightface_folder.iter_images(folder))
    assert [(k, c) for k, c, _ in images] == [(k, (k - 1) // 3) for k in range(1, 13)]
    assert all(_decode(jpeg).shape == (16, 16, 3) for _, _, jpeg in images)
    bins, issame = binpack.read_bin(folder / "lfw.bin")
    assert len(bins) == 40
    assert issame.tolist() == [True, False] * 10  # 10 folds: same pairs, then different pairs


def test_deterministic_by_seed(tmp_path):
    a = synthetic.write_dataset(tmp_path / "a", 2, 2, image_size=8, pairs_per_target=20, targets=())
    b = synthetic.write_dataset(tmp_path / "b", 2, 2, image_size=8, pairs_per_target=20, targets=())
    c = synthetic.write_dataset(tmp_path / "c", 2, 2, image_size=8, pairs_per_target=20, targets=(), seed=1)
    assert (a / "train.rec").read_bytes() == (b / "train.rec").read_bytes()
    assert (a / "train.rec").read_bytes() != (c / "train.rec").read_bytes()


def test_identities_are_learnable(synthetic_folder):
    # Nearest class mean on raw pixels already separates identities on held-out pair images.
    images = list(insightface_folder.iter_images(synthetic_folder))
    labels = np.array([c for _, c, _ in images])
    pixels = np.stack([_decode(j).ravel() for _, _, j in images])
    means = np.stack([pixels[labels == c].mean(0) for c in range(8)])
    bins, issame = binpack.read_bin(synthetic_folder / "lfw.bin")
    assert len(issame) == 40 and issame.sum() == 20
    probe = np.stack([_decode(b).ravel() for b in bins])
    nearest = np.argmin(((probe[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    predicted_same = nearest[0::2] == nearest[1::2]
    assert (predicted_same == issame).mean() >= 0.8


def test_speed_112px(tmp_path):
    start = time.perf_counter()
    synthetic.write_dataset(tmp_path / "s", 20, 20, image_size=112, targets=())
    assert time.perf_counter() - start < 5.0  # 400 images; about 1 s on 2 cores


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="multiple of 20"):
        synthetic.write_dataset(tmp_path, 4, 2, pairs_per_target=30)
    with pytest.raises(ValueError, match="at least 2"):
        synthetic.write_dataset(tmp_path, 1, 2)
    with pytest.raises(ValueError, match="unknown targets"):
        synthetic.write_dataset(tmp_path, 2, 2, targets=("lfw2",))


def test_command_line(tmp_path, capsys):
    synthetic.main([str(tmp_path / "cli"), "--identities", "3", "--images", "2", "--image_size", "12",
                    "--pairs", "20", "--targets", "cfp_fp"])
    assert "wrote 6 images of 3 identities" in capsys.readouterr().out
    assert insightface_folder.read_property(tmp_path / "cli") == (3, 12, 12)
    assert (tmp_path / "cli" / "cfp_fp.bin").exists()
    with pytest.raises(SystemExit):
        synthetic.main([str(tmp_path / "bad"), "--identities", "3", "--images", "2", "--pairs", "7"])
