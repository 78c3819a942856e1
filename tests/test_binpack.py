"""`.bin` verification packs: round trip, py2/numpy pickles, refusal of code-running pickles."""

import os
import pickle

import numpy as np
import pytest

from tfds_ms1m import binpack


def test_round_trip_protocol2(tmp_path):
    path = tmp_path / "lfw.bin"
    images = [b"\xff\xd8a\xff\xd9", b"\xff\xd8b\xff\xd9", b"c", b"d"]
    binpack.write_bin(path, images, [True, False])
    assert path.read_bytes()[:2] == b"\x80\x02"
    bins, issame = binpack.read_bin(path)
    assert bins == images
    assert issame.dtype == bool and issame.tolist() == [True, False]


def test_uint8_array_elements_from_numpy_pickle(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    arrays = [np.frombuffer(bytes([i, 1, 2]), np.uint8) for i in range(4)]
    path.write_bytes(pickle.dumps((arrays, [False, True]), protocol=2))
    bins, issame = binpack.read_bin(path)
    assert bins == [bytes([i, 1, 2]) for i in range(4)]
    assert issame.tolist() == [False, True]


def test_python2_style_pickle_with_numpy_core_names(tmp_path):
    # Python 2 pickles name numpy.core.multiarray and store byte strings as SHORT_BINSTRING.
    arrays = [np.frombuffer(b"xyz", np.uint8)] * 2
    data = pickle.dumps(arrays, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    # (bins, [True]) with bins = [arrays list]; build the tuple around the list by hand.
    py2 = b"\x80\x02" + data[2:-1] + b"]\x88a\x86."
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(py2)
    bins, issame = binpack.read_bin(path)
    assert bins == [b"xyz", b"xyz"] and issame.tolist() == [True]
    raw = b"\x80\x02]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x89a\x86q\x04."
    path.write_bytes(raw)
    assert binpack.read_bin(path)[0] == [b"ab", b"cd"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, exploit):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([exploit(marker), b"x"], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"evil\.bin: refused .*is not allowed"):
        binpack.read_bin(path)
    assert not marker.exists()


def test_codecs_encode_limited_to_latin1(tmp_path):
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(ValueError, match="refusing _codecs.encode with encoding 'base64'"):
        binpack.read_bin(path)


def test_pair_count_mismatch_and_bad_elements(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True, False]), protocol=2))
    with pytest.raises(ValueError, match=r"lfw\.bin: 3 images for 2 pairs"):
        binpack.read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", np.zeros(3, np.float32)], [True]), protocol=2))
    with pytest.raises(ValueError, match=r"lfw\.bin: image 1 is a ndarray of float32"):
        binpack.read_bin(path)
    path.write_bytes(pickle.dumps(([b"a", "text"], [True]), protocol=2))
    with pytest.raises(ValueError, match="image 1 is a str"):
        binpack.read_bin(path)
    path.write_bytes(b"\x80\x02]q")
    with pytest.raises(ValueError, match=r"lfw\.bin: .*malformed pickle"):
        binpack.read_bin(path)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        binpack.write_bin(tmp_path / "w.bin", [b"a", b"b", b"c"], [True])
