"""MXNet RecordIO (`.rec` + `.idx`) in pure Python, as used by insightface: the format and reading.

Framing (dmlc-core): uint32 magic, uint32 lrec (cflag = lrec >> 29, length = lrec & (2**29 - 1)),
payload, zero padding to 4 bytes. A payload holding the magic at a 4-aligned offset is split there
into parts with cflag 1 (first), 2 (middle), 3 (last); the reader rejoins them with the magic.
Payloads start with an IRHeader ('<IfQQ': flag, label, id, id2); `flag` > 0 means `flag` float32
labels follow. The `.idx` holds "key\\toffset" lines, in any order.
Writing is in `recordio_writer`; insightface's folder (`property`, image keys) in `insightface_folder`.
"""

from __future__ import annotations

import io
import math
import os
import struct
from typing import BinaryIO, Iterator, NamedTuple, Sequence, Union

import numpy as np
from etils import epath

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# Most bytes `RecordReader.read_many` reads at once (more only for a larger record).
_BLOCK_BYTES = 1 << 20
_FLAG_LABEL = struct.Struct("<If")
_FLOAT = struct.Struct("<f")

PathLike = Union[str, os.PathLike]


class RecordIOError(ValueError):
    """Malformed RecordIO data; the message names the file, the key or offset and the problem."""


class IRHeader(NamedTuple):
    """The image-record header insightface and MXNet put before every payload."""

    flag: int
    label: float
    id: int
    id2: int


def _pad4(length: int) -> int:
    return (length + 3) & ~3


def pack_record(
    label: float | Sequence[float] | np.ndarray, image_bytes: bytes, id: int = 0, id2: int = 0
) -> bytes:
    """Return an IRHeader-prefixed payload: a scalar label gives flag 0, a vector flag = its length."""
    values = np.asarray(label, dtype=np.float32)
    if values.ndim == 0:
        return _IR_HEADER.pack(0, float(values), id, id2) + bytes(image_bytes)
    values = values.reshape(-1)
    if values.size == 0:
        raise ValueError("pack_record: a vector label needs at least one value")
    return _IR_HEADER.pack(values.size, 0.0, id, id2) + values.tobytes() + bytes(image_bytes)


def unpack_header(payload: bytes, where: str = "payload") -> tuple[IRHeader, np.ndarray, int]:
    """Parse a payload's IRHeader: (header, float32 label vector, offset of the data after it)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"{where}: {len(payload)} bytes, too short for the 24-byte IRHeader")
    header = IRHeader(*_IR_HEADER.unpack_from(payload, 0))
    if header.flag == 0:
        return header, np.array([header.label], dtype=np.float32), _IR_HEADER.size
    end = _IR_HEADER.size + 4 * header.flag
    if end > len(payload):
        raise RecordIOError(
            f"{where}: IRHeader flag {header.flag} announces {header.flag} labels but the payload "
            f"has only {len(payload)} bytes"
        )
    labels = np.frombuffer(payload, dtype=np.float32, count=header.flag, offset=_IR_HEADER.size)
    return header, labels.copy(), end


def unpack_record(payload: bytes, where: str = "payload") -> tuple[np.ndarray, bytes]:
    """Split a payload into (float32 1-d label, image bytes)."""
    _, label, start = unpack_header(payload, where)
    return label, payload[start:]


def unpack_image(payload: bytes, where: str = "payload") -> tuple[int, bytes]:
    """Split an image record's payload into (class id, image bytes); the class is the first label.

    The same result as `unpack_record` with `int(label[0])`, without building arrays, for readers
    that go through millions of records.
    """
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"{where}: {len(payload)} bytes, too short for the 24-byte IRHeader")
    flag, label = _FLAG_LABEL.unpack_from(payload, 0)
    start = _IR_HEADER.size
    if flag:
        start += 4 * flag
        if start > len(payload):
            raise RecordIOError(
                f"{where}: IRHeader flag {flag} announces {flag} labels but the payload "
                f"has only {len(payload)} bytes"
            )
        label = _FLOAT.unpack_from(payload, _IR_HEADER.size)[0]
    if not math.isfinite(label):
        raise RecordIOError(f"{where}: image label is {label}, not a class id")
    return int(label), payload[start:]


def frame(payload: bytes) -> Iterator[bytes | memoryview]:
    """Yield what stores `payload` in a `.rec`, as dmlc-core writes it: each part's header, data
    and padding, the payload split at every magic at a 4-aligned offset."""
    view, size = memoryview(payload), len(payload)
    parts = []
    start = 0
    i = payload.find(_MAGIC_BYTES)
    while 0 <= i <= size - 4:
        if i % 4 == 0:
            parts.append((1 if start == 0 else 2, view[start:i]))
            start = i + 4
            i = payload.find(_MAGIC_BYTES, start)
        else:
            i = payload.find(_MAGIC_BYTES, i + 1)
    parts.append((3 if start else 0, view[start:]))
    for cflag, part in parts:
        n = len(part)
        yield _HEAD.pack(MAGIC, (cflag << 29) | n)
        yield part
        pad = _pad4(n) - n
        if pad:
            yield b"\0" * pad


def _open(path_or_file: PathLike | BinaryIO, mode: str) -> tuple[BinaryIO, str, bool]:
    """Return (file object, display name, whether we own it) for a path or an open binary file."""
    if hasattr(path_or_file, "read") or hasattr(path_or_file, "write"):
        return path_or_file, str(getattr(path_or_file, "name", repr(path_or_file))), False
    path = epath.Path(path_or_file)
    return path.open(mode), os.fspath(path), True


def _from_block(block: bytes, start: int) -> bytes | None:
    """The payload of the whole, single-part record at `start` in `block`; None if the record is
    not entirely in the block or is not a plain, well-framed record."""
    if start < 0 or start + 8 > len(block):
        return None
    magic, lrec = _HEAD.unpack_from(block, start)
    end = start + 8 + (lrec & _LENGTH_MASK)
    if magic != MAGIC or lrec >> 29 or end > len(block):
        return None
    return block[start + 8 : end]


def default_idx_path(rec_path: PathLike) -> epath.Path:
    """The `.idx` that goes with a `.rec`: the same path with the `.idx` suffix."""
    path = epath.Path(rec_path)
    return path.with_suffix(".idx")


def read_index(idx_path: PathLike | BinaryIO) -> tuple[np.ndarray, np.ndarray]:
    """Parse a `.idx` file into (keys, offsets) int64 arrays sorted by key."""
    f, name, own = _open(idx_path, "rb")
    try:
        text = f.read()
    finally:
        if own:
            f.close()
    if isinstance(text, str):
        text = text.encode()
    if not text.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        pairs = np.loadtxt(io.BytesIO(text), dtype=np.int64, ndmin=2, comments=None)
        if pairs.size and pairs.shape[1] != 2:
            raise ValueError
    except ValueError:
        _raise_index_error(text, name)
    pairs = pairs.reshape(-1, 2)
    order = np.argsort(pairs[:, 0], kind="stable")
    keys, offsets = pairs[order, 0], pairs[order, 1]
    if keys.size > 1:
        dup = np.nonzero(keys[1:] == keys[:-1])[0]
        if dup.size:
            raise RecordIOError(f"{name}: key {int(keys[dup[0]])} appears more than once")
    if offsets.size and offsets.min() < 0:
        bad = int(np.argmin(offsets))
        raise RecordIOError(f"{name}: key {int(keys[bad])} has negative offset {int(offsets[bad])}")
    return keys, offsets


def _raise_index_error(text: bytes, name: str) -> None:
    """Find the first malformed `.idx` line and raise an error naming it."""
    for i, line in enumerate(text.split(b"\n")):
        fields = line.split()
        if not fields and i == text.count(b"\n"):
            continue
        if len(fields) != 2 or not all(f.lstrip(b"-").isdigit() for f in fields):
            raise RecordIOError(f"{name}: line {i + 1} is {line[:60]!r}, expected 'key<TAB>offset'")
    raise RecordIOError(f"{name}: not a valid index ('key<TAB>offset' lines)")


class RecordReader:
    """Random access to a `.rec` file by key through its `.idx` (MXNet's MXIndexedRecordIO layout)."""

    def __init__(
        self,
        rec_path: PathLike | BinaryIO,
        idx_path: PathLike | BinaryIO | None = None,
    ) -> None:
        if idx_path is None:
            if hasattr(rec_path, "read"):
                raise ValueError("RecordReader: give idx_path when rec_path is an open file")
            idx_path = default_idx_path(rec_path)
            if not idx_path.exists():
                raise FileNotFoundError(f"{idx_path}: index file missing (needed to read {rec_path})")
        self._keys, self._offsets = read_index(idx_path)
        self._file, self.name, self._own = _open(rec_path, "rb")
        self._file.seek(0, io.SEEK_END)
        self.size = self._file.tell()
        self._file.seek(0)
        if self._offsets.size and self._offsets.max() >= self.size:
            bad = int(np.argmax(self._offsets))
            raise RecordIOError(
                f"{self.name}: index entry for key {int(self._keys[bad])} points to offset "
                f"{int(self._offsets[bad])}, past the end of the file ({self.size} bytes)"
            )
        if not self._keys.size and self.size:
            idx_name = idx_path.name if hasattr(idx_path, "read") else os.fspath(idx_path)
            raise RecordIOError(
                f"{idx_name}: index is empty but {self.name} holds {self.size} bytes of records"
            )
        self._keys.flags.writeable = False
        self._contiguous = bool(
            self._keys.size and self._keys[0] == 0 and self._keys[-1] == self._keys.size - 1
        )
        self._ends: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        """All keys of the index, ascending (read-only int64 array)."""
        return self._keys

    def __len__(self) -> int:
        return int(self._keys.size)

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def _position(self, key: int) -> int | None:
        if self._contiguous:
            return key if 0 <= key < self._keys.size else None
        i = int(np.searchsorted(self._keys, key))
        return i if i < self._keys.size and self._keys[i] == key else None

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Index positions of `keys` (vectorised `_position`); KeyError naming the first missing key."""
        if self._contiguous:
            positions = keys
            found = (keys >= 0) & (keys < self._keys.size)
        else:
            positions = np.minimum(np.searchsorted(self._keys, keys), max(self._keys.size - 1, 0))
            found = self._keys[positions] == keys if self._keys.size else np.zeros(keys.shape, bool)
        if not found.all():
            raise KeyError(f"{self.name}: key {int(keys[np.argmin(found)])} is not in the index")
        return positions

    def offset(self, key: int) -> int:
        """File offset of the record with this key."""
        i = self._position(key)
        if i is None:
            raise KeyError(f"{self.name}: key {key} is not in the index")
        return int(self._offsets[i])

    def read(self, key: int) -> bytes:
        """Return the payload of the record with this key (multi-part records rejoined)."""
        return self.read_at(self.offset(key), key)

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """Return the payload of the record starting at this file offset."""
        f = self._file
        f.seek(offset)
        where = f"{self.name}: record key {key} at offset {offset}" if key is not None else (
            f"{self.name}: record at offset {offset}"
        )
        parts = []
        pos = offset
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise RecordIOError(
                    f"{where}: truncated, file ends at {self.size} bytes inside the record header "
                    f"at offset {pos}"
                )
            magic, lrec = _HEAD.unpack_from(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{where}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x})"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            data = f.read(length)
            if len(data) < length:
                raise RecordIOError(
                    f"{where}: truncated, record part at offset {pos} needs {length} bytes but the "
                    f"file ends at {self.size} bytes"
                )
            if not parts:
                if cflag == 0:
                    return data
                if cflag != 1:
                    raise RecordIOError(
                        f"{where}: starts with cflag {cflag}; expected 0 (whole record) or 1 (first part)"
                    )
            elif cflag not in (2, 3):
                raise RecordIOError(
                    f"{where}: part at offset {pos} has cflag {cflag} inside a multi-part record"
                )
            parts.append(data)
            if cflag == 3:
                return _MAGIC_BYTES.join(parts)
            pos += 8 + _pad4(length)
            if length != _pad4(length):
                f.seek(pos)

    def _record_ends(self) -> np.ndarray:
        """Per index position, where its record ends at the latest: the next record's offset in
        the file, or the file's end (computed on first use)."""
        if self._ends is None:
            order = np.argsort(self._offsets, kind="stable")
            self._ends = np.empty_like(self._offsets)
            self._ends[order] = np.append(self._offsets[order][1:], self.size)
        return self._ends

    def read_many(self, keys: Sequence[int] | np.ndarray) -> Iterator[tuple[int, bytes]]:
        """Yield (key, payload) for `keys`, in the given order, with few large reads.

        Keys whose records follow one another in the file (a `.rec` read in key order) are read
        in blocks of up to 1 MB that end where the last of them ends, instead of a seek and two
        reads per record; multi-part or malformed records go through `read_at`, which rejoins
        them or raises its error.
        """
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if not keys.size:
            return
        positions = self._positions(keys)
        offsets, ends = self._offsets[positions], self._record_ends()[positions]
        # Runs of keys whose records lie further on in the file; a block never reads past a run.
        first = np.append(True, offsets[1:] <= offsets[:-1])
        last = np.append(np.nonzero(first)[0][1:] - 1, keys.size - 1)
        run_ends = ends[last][np.cumsum(first) - 1]
        lengths = np.maximum(ends - offsets, np.minimum(run_ends - offsets, _BLOCK_BYTES))
        block, base = b"", 0
        for key, offset, length in zip(keys.tolist(), offsets.tolist(), lengths.tolist()):
            payload = _from_block(block, offset - base)
            if payload is None:
                self._file.seek(offset)
                block, base = self._file.read(length), offset
                payload = _from_block(block, 0)
            yield key, self.read_at(offset, key) if payload is None else payload

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Yield (key, payload) for every record, in file order (sequential reads)."""
        for i in np.argsort(self._offsets, kind="stable"):
            yield int(self._keys[i]), self.read_at(int(self._offsets[i]), int(self._keys[i]))

    def close(self) -> None:
        """Close the `.rec` file if this reader opened it."""
        if self._own:
            self._file.close()

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
