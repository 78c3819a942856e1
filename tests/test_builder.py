"""The `ms1m_arcface` tfds builder: standard builder tests, the `tfds build` command, loading a built
dataset without its source folder, and bad input that must fail without leaving a dataset behind."""

import os
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_ms1m
from tfds_ms1m import binpack, insightface_folder, rebuild, recordio, recordio_writer, synthetic
from tfds_ms1m.ms1m_arcface import ms1m_arcface_dataset_builder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tfds_ms1m.__file__)))


class TrainConfigTest(tfds.testing.DatasetBuilderTestCase):
    """Standard builder test on dummy_data, config `train`."""

    DATASET_CLASS = ms1m_arcface_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["train"]
    SPLITS = {"train": 6}


class VerificationConfigTest(tfds.testing.DatasetBuilderTestCase):
    """Standard builder test on dummy_data, config `verification`."""

    DATASET_CLASS = ms1m_arcface_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["verification"]
    SPLITS = {"lfw": 2, "cfp_fp": 2}


def _build(folder, data_dir, config="train"):
    builder = tfds.builder(f"ms1m_arcface/{config}", data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(folder))
    )
    return builder


def _raw_train(data_dir):
    ds = tfds.load(
        "ms1m_arcface", split="train", data_dir=str(data_dir),
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    return sorted((ex["image"], int(ex["label"])) for ex in ds.as_numpy_iterator())


def _source_train(folder):
    return sorted((jpeg, label) for _, label, jpeg in insightface_folder.iter_images(folder))


def test_fixture_dataset_matches_source(tfds_data_dir, synthetic_folder):
    builder = tfds.builder("ms1m_arcface", data_dir=str(tfds_data_dir))
    assert builder.info.features["label"].num_classes == 8
    assert builder.info.supervised_keys is not None
    assert _raw_train(tfds_data_dir) == _source_train(synthetic_folder)
    image, label = next(iter(tfds.load("ms1m_arcface", split="train", data_dir=str(tfds_data_dir),
                                       as_supervised=True)))
    assert image.shape == (32, 32, 3) and 0 <= int(label) < 8
    for target in ("lfw", "cfp_fp", "agedb_30"):
        bins, issame = binpack.read_bin(synthetic_folder / f"{target}.bin")
        ds = tfds.load(
            "ms1m_arcface/verification", split=target, data_dir=str(tfds_data_dir),
            decoders={"image1": tfds.decode.SkipDecoding(), "image2": tfds.decode.SkipDecoding()},
        )
        pairs = [(ex["image1"], ex["image2"], ex["is_same"]) for ex in ds.as_numpy_iterator()]
        assert pairs == [(bins[2 * i], bins[2 * i + 1], bool(s)) for i, s in enumerate(issame)]


def test_tfds_build_command_line(tmp_path):
    folder = synthetic.write_dataset(tmp_path / "src", 5, 3, image_size=16, pairs_per_target=20,
                                     targets=("lfw",), seed=3)
    out = tmp_path / "out"
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", "ms1m_arcface",
         "--imports", "tfds_ms1m", "--manual_dir", str(folder), "--data_dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _raw_train(out) == _source_train(folder)
    assert tfds.builder("ms1m_arcface", data_dir=str(out)).info.features["label"].num_classes == 5


def test_load_built_dataset_without_manual_dir(tmp_path):
    folder = synthetic.write_dataset(tmp_path / "src", 3, 2, image_size=8, pairs_per_target=20,
                                     targets=("agedb_30",))
    expected = _source_train(folder)
    _build(folder, tmp_path / "data", "train")
    _build(folder, tmp_path / "data", "verification")
    shutil.rmtree(folder)
    builder = tfds.builder("ms1m_arcface", data_dir=str(tmp_path / "data"))
    assert builder.is_prepared() and builder.info.features["label"].num_classes == 3
    assert _raw_train(tmp_path / "data") == expected
    info = tfds.builder("ms1m_arcface/verification", data_dir=str(tmp_path / "data")).info
    assert list(info.splits) == ["agedb_30"] and info.splits["agedb_30"].num_examples == 20
    # A second download_and_prepare reuses the data and needs no manual dir.
    builder.download_and_prepare()


def test_any_record_layout_builds_the_same_examples(tmp_path):
    # Records out of key order, split into parts (the magic inside the data), larger than a read
    # block, or straddling block ends: all come out as the per-key reads give them.
    rng = np.random.default_rng(0)
    magic = struct.pack("<I", recordio.MAGIC)
    sizes = [300_000] * 6 + [1_500_000] + [40] * 5
    images = {}
    for key, size in enumerate(sizes, start=1):
        body = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes().replace(magic, b"\0" * 4))
        if key % 3 == 0:
            body[14:18] = magic  # 4-aligned in the payload: 32-byte header + 2 SOI bytes + 14
        images[key] = b"\xff\xd8" + bytes(body) + b"\xff\xd9"
    n = len(sizes)
    order = [1, 2, 3, 4, 5, 6, 7, 12, 8, 10, 9, 11]
    folder = tmp_path / "src"
    folder.mkdir()
    with recordio_writer.RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key in order:
            writer.write(key, recordio.pack_record([key % 4, 1], images[key]))
        for c in range(4):
            writer.write(n + 1 + c, recordio.pack_record([1, 2], b""))
        writer.write(0, recordio.pack_record([n + 1, n + 5], b""))
    insightface_folder.write_property(folder, 4, 8, 8)
    # 17 records, 4 of them written in two parts: every part starts with the magic.
    assert (folder / "train.rec").read_bytes().count(magic) == 17 + 4
    expected = [(key, key % 4, images[key]) for key in range(1, n + 1)]
    assert list(insightface_folder.iter_images(folder)) == expected
    _build(folder, tmp_path / "data")
    assert _raw_train(tmp_path / "data") == sorted((jpeg, label) for _, label, jpeg in expected)


def _rewrite_train(folder, mutate):
    """Rewrite train.rec with `mutate(key, payload) -> payload` applied to every record."""
    with recordio.RecordReader(folder / "train.rec") as reader:
        records = [(k, mutate(k, p)) for k, p in reader]
    with recordio_writer.RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        for key, payload in records:
            writer.write(key, payload)


@pytest.fixture
def bad_folder(tmp_path):
    return synthetic.write_dataset(tmp_path / "bad", 4, 3, image_size=8, pairs_per_target=20,
                                   targets=("lfw",))


def _assert_build_fails(folder, data_dir, pattern, config="train", error=Exception):
    builder = tfds.builder(f"ms1m_arcface/{config}", data_dir=str(data_dir))
    with pytest.raises(error, match=pattern):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(folder))
        )
    assert not tfds.builder(f"ms1m_arcface/{config}", data_dir=str(data_dir)).is_prepared()
    with pytest.raises(Exception):
        tfds.load(f"ms1m_arcface/{config}", data_dir=str(data_dir), download=False)
    # tfds writes into an `incomplete.*` folder and renames it only on success: nothing stays behind.
    leftovers = [p.name for p in data_dir.rglob("*") if "tfrecord" in p.name
                 or p.name in ("dataset_info.json", "features.json") or "incomplete" in p.name]
    assert leftovers == []


def test_corrupt_jpeg_midway_leaves_no_dataset(bad_folder, tmp_path):
    def truncate(key, payload):
        return payload[:-20] if key == 7 else payload

    _rewrite_train(bad_folder, truncate)
    _assert_build_fails(
        bad_folder, tmp_path / "data", r"train\.rec: record key 7: corrupt JPEG", error=ValueError
    )


def test_not_a_jpeg(bad_folder, tmp_path):
    def garble(key, payload):
        return payload[:24] + b"GIF89a" + payload[30:] if key == 2 else payload

    _rewrite_train(bad_folder, garble)
    _assert_build_fails(bad_folder, tmp_path / "data", r"record key 2: not a JPEG image")


def test_truncated_rec(bad_folder, tmp_path):
    rec = bad_folder / "train.rec"
    with recordio.RecordReader(rec) as reader:
        cut = reader.offset(9) + 20
    rec.write_bytes(rec.read_bytes()[:cut])
    # The index still lists the records cut off: the build stops before writing anything.
    _assert_build_fails(
        bad_folder, tmp_path / "data",
        r"train\.rec: index entry for key \d+ points to offset \d+, past the end of the file \(\d+ bytes\)",
    )


def test_bad_magic(bad_folder, tmp_path):
    rec = bad_folder / "train.rec"
    with recordio.RecordReader(rec) as reader:
        offset = reader.offset(4)
    data = bytearray(rec.read_bytes())
    data[offset:offset + 4] = b"BAD!"
    rec.write_bytes(bytes(data))
    _assert_build_fails(bad_folder, tmp_path / "data", rf"record key 4 at offset {offset}: bad magic")


def test_index_past_end(bad_folder, tmp_path):
    with open(bad_folder / "train.idx", "a") as f:
        f.write("99\t123456789\n")
    _assert_build_fails(bad_folder, tmp_path / "data", r"train\.rec: index entry for key 99 .* past the end")


@pytest.mark.parametrize("name", ["property", "train.idx", "train.rec"])
def test_missing_files(bad_folder, tmp_path, name):
    (bad_folder / name).unlink()
    _assert_build_fails(bad_folder, tmp_path / "data", rf"bad/{name}: missing", error=FileNotFoundError)


def test_label_outside_property(bad_folder, tmp_path):
    insightface_folder.write_property(bad_folder, 2, 8, 8)
    _assert_build_fails(bad_folder, tmp_path / "data", r"record key 7: label 2 outside \[0, 2\)")


def test_bin_pair_count_mismatch(bad_folder, tmp_path):
    bins, issame = binpack.read_bin(bad_folder / "lfw.bin")
    with open(bad_folder / "lfw.bin", "wb") as f:
        pickle.dump((bins[:-1], issame.tolist()), f, protocol=2)
    _assert_build_fails(
        bad_folder, tmp_path / "data", r"lfw\.bin: 39 images for 20 pairs", config="verification"
    )


def test_no_verification_pack(bad_folder, tmp_path):
    (bad_folder / "lfw.bin").unlink()
    _assert_build_fails(bad_folder, tmp_path / "data", "no verification pack found", config="verification")


def test_missing_manual_dir_shows_instructions(tmp_path):
    _assert_build_fails(tmp_path / "absent", tmp_path / "data", "insightface")


def test_check_image():
    check = ms1m_arcface_dataset_builder.check_image
    check(b"\xff\xd8\xff\xe0..\xff\xd9\0\0", "x")
    check(b"\x89PNG\r\n\x1a\n....IEND\xaeB`\x82", "x", allow_png=True)
    with pytest.raises(ValueError, match="where: not a JPEG"):
        check(b"\x89PNG\r\n\x1a\n....IEND\xaeB`\x82", "where")
    with pytest.raises(ValueError, match="corrupt PNG"):
        check(b"\x89PNG\r\n\x1a\n....", "x", allow_png=True)


def test_empty_index_names_the_file(bad_folder, tmp_path):
    (bad_folder / "train.idx").write_bytes(b"")
    _assert_build_fails(bad_folder, tmp_path / "data",
                        r"bad/train\.idx: index is empty but .*bad/train\.rec holds \d+ bytes",
                        error=recordio.RecordIOError)


def test_class_count_bounded_before_names_are_built(bad_folder, tmp_path):
    (bad_folder / "property").write_text("4000000000,112,112\n")
    _assert_build_fails(bad_folder, tmp_path / "data", r"bad/property: .*classes must be in",
                        error=recordio.RecordIOError)


def _rebuild(folder, data_dir):
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "tfds_ms1m.rebuild", "ms1m_arcface/train", "--manual_dir", str(folder),
         "--data_dir", str(data_dir)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path), timeout=300,
    )


def test_rebuild_keeps_the_good_dataset_when_the_source_is_broken(bad_folder, tmp_path):
    data_dir = tmp_path / "data"
    _build(bad_folder, data_dir)
    good = _raw_train(data_dir)
    (bad_folder / "train.idx").write_bytes(b"")  # a half-copied source folder
    result = _rebuild(bad_folder, data_dir)
    assert result.returncode == 1
    assert "bad/train.idx: index is empty" in result.stderr
    assert "was not changed" in result.stderr
    assert _raw_train(data_dir) == good
    assert [p.name for p in data_dir.iterdir() if "rebuild" in p.name] == []  # no staging dir left
    # A good source replaces the dataset, with the new class count.
    other = synthetic.write_dataset(tmp_path / "other", 5, 2, image_size=8, pairs_per_target=20,
                                    targets=("lfw",), seed=4)
    result = _rebuild(other, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"rebuilt {data_dir / 'ms1m_arcface' / 'train' / '1.0.0'}" in result.stdout.splitlines()
    assert _raw_train(data_dir) == _source_train(other)
    assert tfds.builder("ms1m_arcface", data_dir=str(data_dir)).info.features["label"].num_classes == 5
    assert sorted(p.name for p in (data_dir / "ms1m_arcface" / "train").iterdir()) == ["1.0.0"]


def test_rebuild_finds_the_configs_built_in_a_data_dir(tfds_data_dir, tmp_path):
    assert rebuild._built_versions(str(tfds_data_dir)) == ["train/1.0.0", "verification/1.0.0"]
    assert rebuild._built_versions(str(tmp_path)) == []
