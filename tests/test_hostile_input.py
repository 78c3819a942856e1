"""Hostile and broken input: memory bombs, malformed numbers and damaged files must end in one of
our errors (naming the file and what is wrong) or a correct result, never a crash or a huge
allocation. Risky cases run in a subprocess under RLIMIT_AS / RLIMIT_CPU (tests/limited_reader.py),
so a reader that allocates without bound fails the test instead of exhausting the machine."""

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfds_ms1m import binpack, recordio, recordio_writer, synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)


def _limited(args, timeout=400):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, os.path.join(HERE, "limited_reader.py"), *args],
                            capture_output=True, text=True, env=env, timeout=timeout)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (result.returncode, lines[-1:], result.stderr[-4000:])
    return lines


def encode_jpeg(size=8, color=(200, 30, 90)):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _claiming(jpeg, width, height):
    """The JPEG with its frame header (SOF0) claiming width x height pixels."""
    at = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


class _Reduce:
    """Pickles as `callable(*args)` with an optional BUILD state, without calling anything."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _repeated_encode_pickle(chunk: str, copies: int) -> bytes:
    """A protocol-2 pickle of (bins, issame) where bins calls _codecs.encode on ONE memoized string
    `copies` times: each call would make a new copy of it."""
    body = bytearray(b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(chunk.encode()))
                     + chunk.encode() + b"q\x01X\x06\x00\x00\x00latin1q\x02]q\x03(")
    body += b"h\x00h\x01h\x02\x86R" * copies
    body += b"e]q\x04" + b"(" + b"\x88" * (copies // 2) + b"e\x86."
    return bytes(body)


def _nested_issame_pickle(depth: int) -> bytes:
    """A protocol-2 pickle of ([b"a", b"b"], [[[...]]]) with the list nested `depth` deep."""
    bins = b"](U\x01aU\x01be"
    return b"\x80\x02" + bins + b"]" * (depth + 1) + b"a" * depth + b"\x86."


def _cases(tmp_path):
    """(id, reader, path, kwargs, expected outcome, pattern in the message or None)."""
    cases = []

    def bin_case(case_id, obj_or_bytes, outcome, pattern, reader="read_bin", **kwargs):
        path = tmp_path / f"{case_id}.bin"
        data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else pickle.dumps(obj_or_bytes, protocol=2)
        path.write_bytes(data)
        cases.append(dict(id=case_id, reader=reader, path=str(path), kwargs=kwargs,
                          expect=outcome, pattern=pattern))

    real = _numpy_reconstruct()
    # A 70-byte pickle asking numpy for a 16 GiB array, directly or through the BUILD state.
    bin_case("huge_shape", ([_Reduce(real, (np.ndarray, (2**34,), b"b"))], []), "error",
             "_reconstruct is allowed only as numpy pickles use it")
    bin_case("huge_state", ([_Reduce(real, (np.ndarray, (0,), b"b"),
                                     (1, (2**34,), np.dtype("u1"), False, b""))] * 2, [True]),
             "error", r"needs 17179869184 bytes, the pickle holds 0")
    bin_case("object_dtype", ([np.array([b"x"], dtype=object)] * 2, [True]), "error",
             "dtype .* is not allowed")
    for length in (2**40, 2**63 - 1, 2**64 - 1):
        bin_case(f"binbytes8_{length}", b"\x80\x04\x8e" + struct.pack("<Q", length) + b"abc.",
                 "error", "announces .* bytes but only")
    bin_case("frame_huge", b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N.", "error", "malformed")
    # One 64 KiB array referenced 40,000 times: one conversion, 40,000 references to it.
    shared = np.frombuffer(os.urandom(1 << 16), np.uint8)
    bin_case("shared_array", ([shared] * 40_000, [True] * 20_000), "ok", None)
    # One string turned into bytes 40,000 times by _codecs.encode: 2.6 GB of copies, refused.
    bin_case("repeated_encode", _repeated_encode_pickle("\xff" * (1 << 16), 40_000), "error",
             "more than twice its own size")
    # 40,000 distinct arrays BUILT from one memoized 64 KiB state: 2.6 GB as bytes, refused.
    state = (1, (1 << 16,), np.dtype("u1"), False, os.urandom(1 << 16))
    args = (np.ndarray, (0,), b"b")
    bin_case("repeated_array_state", ([_Reduce(real, args, state) for _ in range(40_000)],
                                      [True] * 20_000), "error", "more than twice its own size")
    # A JPEG referenced 60,000 times decodes once into the output array.
    jpeg = encode_jpeg(8)
    bin_case("shared_jpeg", ([jpeg] * 60_000, [True] * 30_000), "ok", None, reader="load_bin")
    bin_case("pack_too_big", ([encode_jpeg(112)] * 2_000, [True] * 1_000), "error",
             r"2000 images of 112x112 need 75264000 bytes decoded, more than the limit",
             reader="load_bin", max_bytes=50_000_000)
    bin_case("decompression_bomb", ([jpeg, _claiming(jpeg, 60_000, 60_000)], [True]), "error",
             r"image 1 \(pair 0\) cannot be decoded: .*exceeds limit", reader="load_bin")
    bin_case("large_claim", ([jpeg, _claiming(jpeg, 5000, 5000)], [True]), "error",
             r"image 1 \(pair 0\): 5000x5000 pixels, more than", reader="load_bin")
    bin_case("nested_issame", _nested_issame_pickle(100_000), "error", r"issame_list\[0\] is list")
    bin_case("zero_d_issame", ([b"a", b"b"], np.array(True)), "error", "expected a 1-d bool array")
    bin_case("long_issame", ([], np.zeros(binpack.MAX_PAIRS + 1, bool)), "error",
             f"{binpack.MAX_PAIRS + 1} pairs, more than {binpack.MAX_PAIRS}")
    bin_case("huge_int_flag", ([b"a", b"b"], [10**5000]), "error", r"issame_list\[0\] is int")

    def folder_case(case_id, mutate, outcome, pattern, reader="check_train_folder"):
        folder = synthetic.write_dataset(tmp_path / case_id, 3, 2, image_size=8, pairs_per_target=20,
                                         targets=("lfw",), seed=1)
        mutate(folder)
        cases.append(dict(id=case_id, reader=reader, path=str(folder), kwargs={}, expect=outcome,
                          pattern=pattern.replace("FOLDER", str(folder))))

    def prop(text):
        return lambda folder: (folder / "property").write_bytes(text)

    folder_case("property_utf8", prop(b"\xff\xfe3,8,8\n"), "error", r"FOLDER/property: content")
    folder_case("property_4e9", prop(b"4000000000,112,112\n"), "error",
                r"FOLDER/property: .*classes must be in \[1, 4194304\]")
    folder_case("property_more_than_images", prop(b"100,8,8\n"), "error",
                "declares 100 classes but FOLDER/train.rec holds only 6 images")

    def relabel(value, key=3):
        def mutate(folder):
            with recordio.RecordReader(folder / "train.rec") as reader:
                records = list(reader)
            with recordio_writer.RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
                for k, payload in records:
                    if k == key:
                        _, image = recordio.unpack_record(payload)
                        payload = recordio.pack_record(value, image)
                    writer.write(k, payload)
        return mutate

    for name, value in (("inf", np.inf), ("-inf", -np.inf), ("nan", np.nan)):
        folder_case(f"label_{name}", relabel([value, 1], key=1), "error",
                    rf"FOLDER/train.rec: record key 1: image label is {name}", reader="iter_images")
        folder_case(f"header_{name}", relabel([value, 10], key=0), "error",
                    rf"FOLDER/train.rec: header record key 0: id_start is {name}")
    for id_start in (1, 0, -5):
        folder_case(f"header_id_start_{id_start}", relabel([id_start, 10], key=0), "error",
                    "header record key 0: id_start is")
    folder_case("header_past_index", relabel([1e30, 2e30], key=0), "error",
                r"says images are keys 1\.\.1000000015047466219876688855039 but key \d+ is not in")
    folder_case("empty_idx", lambda folder: (folder / "train.idx").write_bytes(b""), "error",
                r"FOLDER/train.idx: index is empty but FOLDER/train.rec holds \d+ bytes")
    return cases


@pytest.fixture(scope="module")
def limited_run(tmp_path_factory):
    """The regression cases and a short derandomized fuzz run, in one limited subprocess."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    cases = _cases(tmp_path)
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps(cases))
    lines = _limited(["--cases", str(listing), "--fuzz", str(tmp_path), "--examples", "25", "--models"])
    return cases, {line["id"]: line for line in lines}


def test_hostile_files_end_in_clean_errors_under_limits(limited_run):
    cases, outcomes = limited_run
    for case in cases:
        got = outcomes[case["id"]]
        assert got["outcome"] == case["expect"], (case["id"], got)
        if case["pattern"]:
            assert re.search(case["pattern"], got["message"]), (case["id"], got["message"])
            assert case["path"] in got["message"], (case["id"], got["message"])
    images, flags = outcomes["shared_array"]["result"]
    assert images == {"len": 40_000, "bytes": 40_000 << 16, "distinct": 1}
    pixels, flags = outcomes["shared_jpeg"]["result"]
    assert pixels["shape"] == [60_000, 8, 8, 3] and flags["shape"] == [30_000]


def test_fuzz_readers_derandomized(limited_run):
    _, outcomes = limited_run
    for name in ("recordio_readers", "bin_reader", "model_reader"):
        assert outcomes[name]["outcome"] == "ok" and outcomes[name]["examples"] == 25


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_valid_pack_loads_in_every_protocol(tmp_path, protocol):
    jpegs = [encode_jpeg(8, (i * 40, 10, 10)) for i in range(4)]
    path = tmp_path / "lfw.bin"
    arrays = [np.frombuffer(j, np.uint8) for j in jpegs]
    for bins in (jpegs, arrays, [b"", b""] + jpegs[:2]):
        for issame in ([True, False], np.array([True, False]), np.array([1, 0], np.int8)):
            count = len(bins) // 2
            path.write_bytes(pickle.dumps((bins, issame[:count]), protocol=protocol))
            images, flags = binpack.read_bin(path)
            assert images == [bytes(b) for b in bins]
            assert flags.dtype == bool and flags.tolist() == [True, False][:count]


def test_numpy_protocol5_array_reader_checks_size(tmp_path):
    # numpy's protocol-5 arrays go through _frombuffer: a size that does not match is refused.
    data = pickle.dumps(([np.zeros(8, np.uint8)] * 2, [True]), protocol=5)
    assert b"_frombuffer" in data
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(data.replace(b"K\x08\x85", b"K\x09\x85"))  # the shape (8,) becomes (9,)
    with pytest.raises(binpack.BinPackError, match=r"cfp_fp\.bin: .*does not match its 8 bytes"):
        binpack.read_bin(path)


@pytest.mark.fuzz
def test_fuzz_readers_long(tmp_path):
    seed = int(os.environ.get("FUZZ_SEED", "0")) or None
    args = ["--fuzz", str(tmp_path), "--examples", os.environ.get("FUZZ_EXAMPLES", "1500"), "--models"]
    outcomes = {line["id"]: line for line in _limited(args + (["--seed", str(seed)] if seed else []),
                                                     timeout=3600)}
    assert all(outcomes[name]["outcome"] == "ok" for name in ("recordio_readers", "bin_reader",
                                                               "model_reader"))
