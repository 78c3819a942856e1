"""Reader for insightface's IJB-B / IJB-C release layout (the 1:1 protocol files and the loose crops).

    DIR/meta/ijbc_face_tid_mid.txt        image template_id media_id          (one line per image)
    DIR/meta/ijbc_name_5pts_score.txt     image x1 y1 ... x5 y5 detector_score (same rows, same order)
    DIR/meta/ijbc_template_pair_label.txt template1 template2 label           (label 1 = same person)
    DIR/loose_crop/<image>

IJB-B uses the `ijbb_` prefix. The two image lists are paired by row, as insightface pairs them; a
row whose image names differ is an error. Landmarks and scores are float32, as insightface parses
them. Every malformed line, a pair naming a template without images, and a missing file raise an
error naming the file (and the line).
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import warnings

import numpy as np

IJB_SETS = ("IJBC", "IJBB")
_BLOCK_BYTES = 1 << 24
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


class IJBLayoutError(ValueError):
    """A protocol file of the IJB layout is malformed; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class IJBProtocol:
    """The 1:1 protocol of one IJB set: per-image rows and per-pair rows, as NumPy arrays."""

    root: str
    ijb_set: str
    image_names: np.ndarray  # str [N], relative to loose_crop/
    landmarks: np.ndarray  # float32 [N, 5, 2]
    detector_scores: np.ndarray  # float32 [N]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    template1: np.ndarray  # int64 [P]
    template2: np.ndarray  # int64 [P]
    labels: np.ndarray  # int8 [P]

    @property
    def image_dir(self) -> str:
        """DIR/loose_crop, where `image_names` are."""
        return os.path.join(self.root, "loose_crop")


def meta_path(root: str | os.PathLike, ijb_set: str, kind: str) -> str:
    """DIR/meta/<set>_<kind>.txt, e.g. kind "face_tid_mid" for IJBC: DIR/meta/ijbc_face_tid_mid.txt."""
    return os.path.join(os.fspath(root), "meta", f"{ijb_set.lower()}_{kind}.txt")


def _blocks(path: str):
    """(number of the first line, whole lines as bytes) a block of the file at a time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected insightface's IJB layout: DIR/meta, DIR/loose_crop)")
    first, rest = 1, b""
    with open(path, "rb") as file:
        while True:
            data = file.read(_BLOCK_BYTES)
            block = rest + data
            cut = block.rfind(b"\n") + 1 if data else len(block)
            block, rest = block[:cut], block[cut:]
            if block:
                yield first, block
                first += block.count(b"\n")
            if not data:
                return


def _block_fields(path: str, first: int, block: bytes, num_fields: int, blank: int | None):
    """(fields [lines, num_fields] of a block's lines, or None, first blank line so far)."""
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    rows = []
    for number, line in enumerate(lines, first):
        fields = line.split()
        if not fields:
            blank = blank or number
        elif blank is not None or len(fields) != num_fields:
            bad, found = (blank, 0) if blank is not None else (number, len(fields))
            raise IJBLayoutError(f"{path}, line {bad}: expected {num_fields} fields, found {found}")
        else:
            rows.append(fields)
    return (np.array(rows, dtype=bytes) if rows else None), blank


def read_fields(path: str, num_fields: int) -> np.ndarray:
    """Whitespace-separated fields of a protocol file as a bytes array [lines, num_fields].

    Trailing blank lines are allowed; any other line without exactly `num_fields` fields is an error.
    """
    parts, blank = [], None
    for first, block in _blocks(path):
        fields, blank = _block_fields(path, first, block, num_fields, blank)
        if fields is not None:
            parts.append(fields)
    if not parts:
        raise IJBLayoutError(f"{path}: the file holds no lines")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def read_integers(path: str, num_fields: int, what: str) -> np.ndarray:
    """int64 [lines, num_fields] of a file of integers only, with `read_fields`' rules and errors.

    NumPy's C parser reads each block (~6x faster than splitting 15 million lines in Python); a
    block it refuses, or one with blank lines (which it would skip), is read line by line instead.
    """
    parts, blank = [], None
    for first, block in _blocks(path):
        if blank is None and _BLANK_LINE.search(b"\n" + block) is None:
            try:
                with warnings.catch_warnings():  # NumPy < 2 parses "2.5" as 2, with a warning
                    warnings.simplefilter("error", DeprecationWarning)
                    numbers = np.loadtxt(io.BytesIO(block), dtype=np.int64, ndmin=2, comments=None)
            except (ValueError, DeprecationWarning):
                numbers = None
            if numbers is not None and numbers.shape[1] == num_fields:
                parts.append(numbers)
                continue
        fields, blank = _block_fields(path, first, block, num_fields, blank)
        if fields is not None:
            parts.append(_convert(path, fields, slice(None), np.int64, what, first_line=first))
    if not parts:
        raise IJBLayoutError(f"{path}: the file holds no lines")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _convert(path: str, fields: np.ndarray, columns: slice | int, dtype, what: str, first_line: int = 1) -> np.ndarray:
    """fields[:, columns] as `dtype` (finite for floats); the first bad line is named in the error."""
    values = fields[:, columns]
    try:
        if np.issubdtype(dtype, np.floating):
            converted = values.astype(np.float64)
            if not np.all(np.isfinite(converted)):
                raise ValueError("not finite")
            return converted.astype(dtype)
        return values.astype(dtype)
    except (ValueError, OverflowError):
        pass
    floating = np.issubdtype(dtype, np.floating)
    for index, row in enumerate(values.reshape(len(values), -1)):
        try:
            numbers = [float(x) if floating else int(x) for x in row]
        except ValueError:
            numbers = None
        if numbers is None or not np.all(np.isfinite(numbers)):
            text = b" ".join(row).decode(errors="replace")
            kind = "finite numbers" if floating else "integers"
            raise IJBLayoutError(f"{path}, line {index + first_line}: {what} must be {kind}, got {text!r}")
    raise IJBLayoutError(f"{path}: {what} out of range for {np.dtype(dtype).name}")


def read_protocol(root: str | os.PathLike, ijb_set: str = "IJBC") -> IJBProtocol:
    """Reads and cross-checks the three 1:1 protocol files of `ijb_set` under `root`."""
    if ijb_set not in IJB_SETS:
        raise ValueError(f"ijb_set must be one of {IJB_SETS}, got {ijb_set!r}")
    root = os.fspath(root)
    media_file = meta_path(root, ijb_set, "face_tid_mid")
    landmark_file = meta_path(root, ijb_set, "name_5pts_score")
    pair_file = meta_path(root, ijb_set, "template_pair_label")

    media_fields = read_fields(media_file, 3)
    templates = _convert(media_file, media_fields, 1, np.int64, "template and media ids")
    medias = _convert(media_file, media_fields, 2, np.int64, "template and media ids")
    landmark_fields = read_fields(landmark_file, 12)
    landmarks = _convert(landmark_file, landmark_fields, slice(1, 11), np.float32, "landmarks")
    scores = _convert(landmark_file, landmark_fields, 11, np.float32, "the detector score")
    if len(landmark_fields) != len(media_fields):
        raise IJBLayoutError(
            f"{landmark_file} has {len(landmark_fields)} images but {media_file} has {len(media_fields)}"
        )
    differ = np.flatnonzero(landmark_fields[:, 0] != media_fields[:, 0])
    if len(differ):
        line = int(differ[0]) + 1
        raise IJBLayoutError(
            f"{landmark_file}, line {line}: image {landmark_fields[line - 1, 0].decode(errors='replace')!r} "
            f"differs from {media_fields[line - 1, 0].decode(errors='replace')!r} on line {line} of {media_file}"
        )

    pairs = read_integers(pair_file, 3, "template ids and labels")
    bad_label = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if len(bad_label):
        raise IJBLayoutError(f"{pair_file}, line {bad_label[0] + 1}: label must be 0 or 1, got {pairs[bad_label[0], 2]}")
    known = np.unique(templates)
    unknown = ~(np.isin(pairs[:, 0], known) & np.isin(pairs[:, 1], known))
    if unknown.any():
        line = int(np.argmax(unknown))
        missing = pairs[line, 0] if pairs[line, 0] not in known else pairs[line, 1]
        raise IJBLayoutError(f"{pair_file}, line {line + 1}: template {missing} has no images in {media_file}")
    return IJBProtocol(
        root=root,
        ijb_set=ijb_set,
        image_names=media_fields[:, 0].astype(str),
        landmarks=landmarks.reshape(-1, 5, 2),
        detector_scores=scores,
        templates=templates,
        medias=medias,
        template1=pairs[:, 0].copy(),
        template2=pairs[:, 1].copy(),
        labels=pairs[:, 2].astype(np.int8),
    )
