"""Writing MXNet RecordIO (`.rec` + `.idx`) files in pure Python, as insightface and MXNet do."""

from __future__ import annotations

from etils import epath

from tfds_ms1m import recordio

# Payloads must be shorter than this: dmlc-core stores a part's length in 29 bits.
_MAX_LENGTH = 1 << 29


class RecordWriter:
    """Write `.rec` + `.idx` exactly as MXNet's MXIndexedRecordIO (dmlc-core framing) does."""

    def __init__(self, rec_path: recordio.PathLike, idx_path: recordio.PathLike | None = None) -> None:
        self.rec_path = epath.Path(rec_path)
        self.idx_path = epath.Path(idx_path) if idx_path is not None else recordio.default_idx_path(rec_path)
        self._rec = self.rec_path.open("wb")
        self._idx = self.idx_path.open("w")
        self._keys: set[int] = set()
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under `key` and index it."""
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        size = len(payload)
        if size >= _MAX_LENGTH:
            raise ValueError(f"{self.rec_path}: key {key}: record of {size} bytes, limit is 2**29 - 1")
        self._keys.add(key)
        self._idx.write(f"{key}\t{self._pos}\n")
        for piece in recordio.frame(payload):
            self._rec.write(piece)
            self._pos += len(piece)

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
