"""insightface `.bin` verification packs: a pickle of (bins, issame_list), read without running code.

A pickle can call any importable function while loading, so `read_bin` uses an unpickler that
resolves only what rebuilding byte strings and numpy arrays needs: `_codecs.encode` restricted to
latin-1 (how Python 3 stores bytes in a protocol-2 pickle) and `bytes()` (an empty one), numpy's `_reconstruct` / `ndarray` /
`dtype` (protocols 0-4) and `_frombuffer` (numpy's protocol-5 arrays), each replaced by a checked
stand-in. Everything else (os.system, eval, subprocess, ...) is refused before it can be called.

Untrusted packs also cannot make the reader allocate without bound: every length in the pickle
stream is checked against the bytes that remain before anything is read; arrays are only rebuilt
from data present in the file, with a few plain dtypes; bytes made while loading are counted
against a budget of twice the file size (a shared reference costs nothing, a copy per reference
is refused); pair counts are capped. Every failure raises `BinPackError` naming the file.
"""

from __future__ import annotations

import _codecs
import io
import math
import os
import pickle
import pickletools
from typing import Any, Sequence, Union

import numpy as np
from etils import epath

VERIFICATION_TARGETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")
# The largest pack insightface ships (vgg2_fp) has 10,000 pairs; this leaves ample room.
MAX_PAIRS = 1_000_000
# Bytes the unpickler may create beyond the file itself (copies of the file's data count).
_SLACK_BYTES = 1 << 20
_ALLOWED_DTYPES = frozenset(
    ["b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8", "bool", "uint8"]
)
# Opcodes that need objects from outside the stream (persistent ids, the extension registry,
# out-of-band buffers); a `.bin` pack never uses them.
_REFUSED_OPCODES = frozenset(
    ["PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"]
)

PathLike = Union[str, os.PathLike]


class BinPackError(ValueError):
    """A malformed or refused `.bin` pack; the message names the file and what is wrong."""


_OPCODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_COUNT_BYTES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def _scan(data: bytes) -> None:
    """Walk the pickle's opcodes without building or decoding anything: every length an opcode
    announces must fit in the bytes that follow it (the unpickler allocates a length before it
    reads), and opcodes that reach outside the stream are refused."""
    pos, end = 0, len(data)
    while pos < end:
        op = _OPCODES.get(data[pos])
        if op is None:
            raise pickle.UnpicklingError(f"unknown opcode 0x{data[pos]:02x} at byte {pos}")
        if op.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} is not allowed")
        start, pos = pos, pos + 1
        kind = op.arg.n if op.arg is not None else 0
        if kind >= 0:
            size = kind
        elif kind == pickletools.UP_TO_NEWLINE:
            lines = 2 if op.arg.name == "stringnl_noescape_pair" else 1
            size = pos
            for _ in range(lines):
                size = data.find(b"\n", size) + 1
                if not size:
                    raise pickle.UnpicklingError(f"{op.name} at byte {start}: no end of line")
            size -= pos
        else:
            width, signed = _COUNT_BYTES[kind]
            count = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            if count < 0:
                raise pickle.UnpicklingError(f"{op.name} at byte {start}: negative length {count}")
            size = width + count
        if pos + size > end:
            raise pickle.UnpicklingError(
                f"{op.name} at byte {start} announces {size} bytes but only {end - pos} follow"
            )
        pos += size
        if op.name == "STOP":
            return
    raise pickle.UnpicklingError("pickle data ends without STOP")


def _nbytes(shape: Any, dtype: np.dtype) -> int:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"array shape {type(shape).__name__} is not a tuple of sizes")
    if len(shape) > 8:
        raise pickle.UnpicklingError(f"array with {len(shape)} dimensions")
    return math.prod(shape) * dtype.itemsize


def _plain_dtype(dtype: Any) -> np.dtype:
    """`dtype` as one of the plain numeric dtypes a pack may use (no objects, records or strings)."""
    if isinstance(dtype, np.dtype) and dtype.names is None and dtype.kind in "biuf":
        if dtype.str[1:] in _ALLOWED_DTYPES:
            return dtype
    raise pickle.UnpicklingError(f"array dtype {dtype!s:.40} is not allowed in a .bin pack")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`, how protocols 0-2 store an empty byte string; nothing else is allowed."""
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


class _PendingArray:
    """What numpy's `_reconstruct` returns here: an empty slot that the pickle's BUILD fills with
    (version, shape, dtype, fortran, data) once `data` is checked against shape and dtype."""

    def __init__(self, unpickler: "_RestrictedUnpickler") -> None:
        self._unpickler = unpickler
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        dtype = _plain_dtype(dtype)
        if isinstance(raw, str):
            raw = self._unpickler.encode(raw)
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError(f"numpy array data is a {type(raw).__name__}, not bytes")
        if _nbytes(shape, dtype) != len(raw):
            raise pickle.UnpicklingError(
                f"numpy array of shape {shape} and dtype {dtype} needs {_nbytes(shape, dtype)} "
                f"bytes, the pickle holds {len(raw)}"
            )
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only checked stand-ins for the globals a pack needs."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.budget = 2 * len(data) + _SLACK_BYTES
        self._globals = {
            ("_codecs", "encode"): self._codecs_encode,
            ("__builtin__", "bytes"): _empty_bytes,
            ("builtins", "bytes"): _empty_bytes,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
        }

    def charge(self, nbytes: int) -> None:
        """Count bytes made while loading; refuse once they pass twice the file size."""
        self.budget -= nbytes
        if self.budget < 0:
            raise pickle.UnpicklingError(
                "the pickle makes more than twice its own size in data (one object copied for "
                "each of many references)"
            )

    def encode(self, text: str) -> bytes:
        self.charge(len(text))
        return _codecs.encode(text, "latin1")

    def _codecs_encode(self, text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """`_codecs.encode` limited to latin-1 strings, the only use protocol-2 pickles of bytes make."""
        if not isinstance(encoding, str) or encoding.replace("_", "-").lower() not in (
            "latin1", "latin-1", "iso-8859-1"
        ):
            raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r:.40}")
        if not isinstance(text, str):
            raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
        return self.encode(text)

    def _dtype(self, name: Any, align: Any = False, copy: Any = True) -> np.dtype:
        if not isinstance(name, str) or name not in _ALLOWED_DTYPES:
            raise pickle.UnpicklingError(f"array dtype {name!r:.40} is not allowed in a .bin pack")
        return np.dtype(name, False, True)  # a copy: the pickle's BUILD may set its state

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
        if subtype is not np.ndarray or shape != (0,):
            raise pickle.UnpicklingError(
                "numpy _reconstruct is allowed only as numpy pickles use it: ndarray, shape (0,)"
            )
        return _PendingArray(self)

    def _frombuffer(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        """numpy's protocol-5 array constructor: a view of in-band bytes of exactly the right size."""
        dtype = _plain_dtype(dtype)
        if isinstance(buffer, pickle.PickleBuffer):
            buffer = buffer.raw()
        if not isinstance(buffer, (bytes, bytearray, memoryview)):
            raise pickle.UnpicklingError(f"numpy array data is a {type(buffer).__name__}, not bytes")
        if order not in ("C", "F") or _nbytes(shape, dtype) != len(buffer):
            raise pickle.UnpicklingError(
                f"numpy array of shape {shape} and dtype {dtype} does not match its "
                f"{len(buffer)} bytes of data"
            )
        return np.frombuffer(buffer, dtype).reshape(shape, order=order)

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module:.60}.{name:.60} is not allowed in a .bin verification pack"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a .bin verification pack")


def _resolve(item: Any) -> Any:
    if isinstance(item, _PendingArray):
        if item.array is None:
            raise pickle.UnpicklingError("numpy array without its data")
        return item.array
    return item


def _kind(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return f"ndarray of {item.dtype} with shape {item.shape}"
    return type(item).__name__


def _images(bins: Sequence, unpickler: _RestrictedUnpickler, name: str) -> list[bytes]:
    """The pack's images as bytes; a shared array is converted once, not once per reference."""
    converted: dict[int, bytes] = {}
    images = []
    for index, item in enumerate(bins):
        item = _resolve(item)
        if isinstance(item, bytes):
            images.append(item)
            continue
        if not (isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1):
            raise BinPackError(
                f"{name}: image {index} is a {_kind(item)}; expected encoded image bytes or a 1-d "
                "uint8 array"
            )
        if id(item) not in converted:
            try:
                unpickler.charge(item.nbytes)
            except pickle.UnpicklingError as e:
                raise BinPackError(f"{name}: image {index}: {e}") from None
            converted[id(item)] = item.tobytes()
        images.append(converted[id(item)])
    return images


def _flags(issame: Any, name: str) -> np.ndarray:
    """issame_list as a bool array, checked without converting (or printing) arbitrary objects."""
    issame = _resolve(issame)
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or issame.dtype.kind not in "biu":
            raise BinPackError(f"{name}: issame_list is a {_kind(issame)}; expected a 1-d bool array")
        if len(issame) > MAX_PAIRS:
            raise BinPackError(f"{name}: issame_list has {len(issame)} pairs, more than {MAX_PAIRS}")
        bad = np.flatnonzero((issame != 0) & (issame != 1))
        if bad.size:
            raise BinPackError(f"{name}: issame_list[{bad[0]}] is {issame[bad[0]]}, expected a bool")
        return issame.astype(bool)
    if not isinstance(issame, (list, tuple)):
        raise BinPackError(f"{name}: issame_list is a {_kind(issame)}, expected a list")
    if len(issame) > MAX_PAIRS:
        raise BinPackError(f"{name}: issame_list has {len(issame)} pairs, more than {MAX_PAIRS}")
    for i, flag in enumerate(issame):
        if type(flag) not in (bool, int) or flag not in (0, 1):
            shown = repr(flag) if type(flag) in (bool, int) and abs(flag) < 10**6 else _kind(flag)
            raise BinPackError(f"{name}: issame_list[{i}] is {shown}, expected a bool")
    return np.asarray(issame, dtype=bool)


def read_bin(path: PathLike) -> tuple[list[bytes], np.ndarray]:
    """Load a `.bin` pack safely: (encoded images, 2 per pair; bool array with one flag per pair)."""
    path = epath.Path(path)
    name = os.fspath(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: verification pack missing")
    data = path.read_bytes()
    unpickler = _RestrictedUnpickler(data)
    try:
        _scan(data)
        obj = unpickler.load()
    except pickle.UnpicklingError as e:
        raise BinPackError(f"{name}: refused or malformed pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError) as e:
        raise BinPackError(f"{name}: malformed pickle: {type(e).__name__}: {str(e):.200}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinPackError(f"{name}: expected a pickled (bins, issame_list) pair, got {_kind(obj)}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinPackError(f"{name}: bins is a {_kind(_resolve(bins))}, expected a list")
    flags = _flags(issame, name)
    if len(bins) != 2 * len(flags):
        raise BinPackError(
            f"{name}: {len(bins)} images for {len(flags)} pairs; a pack holds exactly 2 images per pair"
        )
    return _images(bins, unpickler, name), flags


def write_bin(path: PathLike, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a `.bin` pack as insightface does: protocol-2 pickle of (bins, issame_list)."""
    images = [bytes(b) for b in encoded_images]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs, need 2 per pair")
    with epath.Path(path).open("wb") as f:
        pickle.dump((images, flags), f, protocol=2)
