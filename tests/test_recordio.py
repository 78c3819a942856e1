"""RecordIO reader/writer: framing, multi-part records, IRHeader labels, index handling, bad input."""

import struct

import numpy as np
import pytest

from tfds_ms1m import insightface_folder, recordio, recordio_writer

MAGIC = struct.pack("<I", recordio.MAGIC)


def _write(tmp_path, records):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with recordio_writer.RecordWriter(rec, idx) as w:
        for key, payload in records:
            w.write(key, payload)
    return rec, idx


def test_round_trip_framing_and_padding(tmp_path):
    payloads = {k: bytes(range(k)) * 3 for k in range(1, 8)}
    rec, idx = _write(tmp_path, payloads.items())
    data = rec.read_bytes()
    assert struct.unpack_from("<II", data, 0) == (recordio.MAGIC, 3)
    assert len(data) % 4 == 0
    lines = idx.read_text().splitlines()
    assert lines[0] == "1\t0" and lines[1] == "2\t12"  # 8 + 3 bytes padded to 4
    with recordio.RecordReader(rec) as r:
        assert r.keys.tolist() == list(payloads)
        for k, p in payloads.items():
            assert r.read(k) == p
        assert dict(iter(r)) == payloads


def test_writer_splits_on_aligned_magic_like_dmlc(tmp_path):
    payload = b"abcd" + MAGIC + b"efgh" + MAGIC + b"ij" + b"x" + MAGIC + b"yz"
    rec, _ = _write(tmp_path, [(5, payload), (6, MAGIC)])
    data = rec.read_bytes()
    heads = []
    pos = 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == recordio.MAGIC
        heads.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
    # Magic at aligned offsets 4 and 12 splits; the one at offset 19 (unaligned) does not.
    assert heads == [(1, 4), (2, 4), (3, len(payload) - 16), (1, 0), (3, 0)]
    with recordio.RecordReader(rec) as r:
        assert r.read(5) == payload
        assert r.read(6) == MAGIC


def _frame(cflag, data):
    pad = b"\0" * ((4 - len(data) % 4) % 4)
    return struct.pack("<II", recordio.MAGIC, (cflag << 29) | len(data)) + data + pad


def test_reads_hand_crafted_multipart_record_and_unsorted_index(tmp_path):
    whole = _frame(0, b"hello")
    multi = _frame(1, b"ab") + _frame(2, b"") + _frame(3, b"cdefg")
    rec = tmp_path / "m.rec"
    rec.write_bytes(whole + multi)
    idx = tmp_path / "m.idx"
    idx.write_text(f"9\t{len(whole)}\n3\t0\n")
    with recordio.RecordReader(rec, idx) as r:
        assert r.keys.tolist() == [3, 9]
        assert r.read(3) == b"hello"
        assert r.read(9) == b"ab" + MAGIC + MAGIC + b"cdefg"
        assert [k for k, _ in r] == [3, 9]
        with pytest.raises(KeyError, match="key 4"):
            r.read(4)
    idx.write_text(f"1\t{len(whole) + 12}\n")  # points at the middle part
    with recordio.RecordReader(rec, idx) as r:
        with pytest.raises(recordio.RecordIOError, match="key 1 at offset 28: starts with cflag 2"):
            r.read(1)
    rec.write_bytes(_frame(1, b"ab") + _frame(0, b"cd"))
    idx.write_text("1\t0\n")
    with recordio.RecordReader(rec, idx) as r:
        with pytest.raises(recordio.RecordIOError, match="cflag 0 inside a multi-part record"):
            r.read(1)


def test_reader_accepts_open_files(tmp_path):
    rec, idx = _write(tmp_path, [(0, b"zero"), (1, b"one")])
    with open(rec, "rb") as f, open(idx, "rb") as fi:
        r = recordio.RecordReader(f, fi)
        assert r.read(1) == b"one"


def test_pack_unpack_scalar_and_vector_labels():
    label, image = recordio.unpack_record(recordio.pack_record(7, b"\xff\xd8jpg", id=3))
    assert label.dtype == np.float32 and label.tolist() == [7.0] and image == b"\xff\xd8jpg"
    payload = recordio.pack_record([5, 1], b"img", id=2, id2=9)
    header, labels, start = recordio.unpack_header(payload)
    assert header.flag == 2 and header.id == 2 and header.id2 == 9 and start == 32
    assert recordio.unpack_record(payload)[0].tolist() == [5.0, 1.0]
    with pytest.raises(recordio.RecordIOError, match="announces 5 labels"):
        recordio.unpack_record(struct.pack("<IfQQ", 5, 0, 0, 0) + b"\0" * 8)


def test_iter_images_with_header_record_anywhere(tmp_path):
    # Header record 0 written last; images carry flag-2 [class, aligned] labels.
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with recordio_writer.RecordWriter(rec, idx) as w:
        for key, cls in [(1, 0), (2, 0), (3, 1)]:
            w.write(key, recordio.pack_record([cls, 1], f"img{key}".encode()))
        w.write(4, recordio.pack_record([1, 3], b""))
        w.write(5, recordio.pack_record([3, 4], b""))
        w.write(0, recordio.pack_record([4, 6], b""))
    assert list(insightface_folder.iter_images(tmp_path)) == [(1, 0, b"img1"), (2, 0, b"img2"), (3, 1, b"img3")]


def test_iter_images_flag0_header_means_all_keys_are_images(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with recordio_writer.RecordWriter(rec, idx) as w:
        w.write(1, recordio.pack_record(4, b"b"))
        w.write(0, recordio.pack_record(2, b"a"))
    assert list(insightface_folder.iter_images(tmp_path)) == [(0, 2, b"a"), (1, 4, b"b")]


def test_property_round_trip_and_errors(tmp_path):
    insightface_folder.write_property(tmp_path, 85742, 112, 112)
    assert (tmp_path / "property").read_text() == "85742,112,112\n"
    assert insightface_folder.read_property(tmp_path) == (85742, 112, 112)
    (tmp_path / "property").write_text("85742;112")
    with pytest.raises(ValueError, match="property.*classes,height,width"):
        insightface_folder.read_property(tmp_path / "property")
    with pytest.raises(FileNotFoundError, match="nothere"):
        insightface_folder.read_property(tmp_path / "nothere")


def test_truncated_rec(tmp_path):
    rec, idx = _write(tmp_path, [(0, b"a" * 40), (1, b"b" * 40)])
    rec.write_bytes(rec.read_bytes()[:-10])
    with recordio.RecordReader(rec, idx) as r:
        assert r.read(0) == b"a" * 40
        with pytest.raises(recordio.RecordIOError, match=r"x\.rec: record key 1 at offset 48: truncated"):
            r.read(1)


def test_bad_magic(tmp_path):
    rec, idx = _write(tmp_path, [(0, b"a" * 8), (1, b"b" * 8)])
    data = bytearray(rec.read_bytes())
    data[16:20] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with recordio.RecordReader(rec, idx) as r:
        with pytest.raises(recordio.RecordIOError, match="key 1 at offset 16: bad magic 0x00000000"):
            r.read(1)


def test_index_past_end_and_malformed(tmp_path):
    rec, idx = _write(tmp_path, [(0, b"abcd")])
    idx.write_text("0\t0\n7\t4096\n")
    with pytest.raises(recordio.RecordIOError, match=r"key 7 points to offset 4096, past the end"):
        recordio.RecordReader(rec, idx)
    idx.write_text("0\t0\n1 x\n")
    with pytest.raises(recordio.RecordIOError, match=r"x\.idx: line 2"):
        recordio.RecordReader(rec, idx)


def test_missing_idx_and_rec(tmp_path):
    rec, idx = _write(tmp_path, [(0, b"abcd")])
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=r"x\.idx"):
        recordio.RecordReader(rec)
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        list(insightface_folder.iter_images(tmp_path))


def test_read_many_equals_read_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    # Small records, one larger than a read block, and one split around aligned magic numbers.
    payloads = {k: rng.bytes(int(rng.integers(1, 300))) for k in range(40)}
    payloads[17] = rng.bytes((1 << 20) + 5)
    payloads[23] = b"abcd" + MAGIC + b"efgh" + MAGIC + b"ij"
    rec, idx = _write(tmp_path, payloads.items())
    with recordio.RecordReader(rec, idx) as r:
        for keys in (list(range(40)), rng.permutation(40).tolist(), [5, 6, 7, 3, 4, 30, 31], []):
            assert list(r.read_many(keys)) == [(k, payloads[k]) for k in keys]
        with pytest.raises(KeyError, match="key 99"):
            list(r.read_many([1, 99]))


def test_unpack_image_equals_unpack_record():
    for label in (7.0, [3.0, 1.0, 2.0]):
        payload = recordio.pack_record(label, b"\xff\xd8jpeg")
        want_label, want_image = recordio.unpack_record(payload)
        assert recordio.unpack_image(payload) == (int(want_label[0]), want_image)
    with pytest.raises(recordio.RecordIOError, match="key 4: 10 bytes, too short"):
        recordio.unpack_image(b"\0" * 10, "x.rec: key 4")
    short = struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8
    with pytest.raises(recordio.RecordIOError, match="flag 5 announces 5 labels"):
        recordio.unpack_image(short)
