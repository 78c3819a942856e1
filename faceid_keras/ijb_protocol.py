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
import os

import numpy as np

IJB_SETS = ("IJBC", "IJBB")
_BLOCK_BYTES = 1 << 24


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
        return os.path.join(self.root, "loose_crop")

    def meta_path(self, kind: str) -> str:
        return meta_path(self.root, self.ijb_set, kind)


def meta_path(root: str | os.PathLike, ijb_set: str, kind: str) -> str:
    """DIR/meta/<set>_<kind>.txt, e.g. kind "face_tid_mid" for IJBC: DIR/meta/ijbc_face_tid_mid.txt."""
    return os.path.join(os.fspath(root), "meta", f"{ijb_set.lower()}_{kind}.txt")


def _line_blocks(path: str):
    """(number of the first line, lines as bytes) a block of the file at a time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected insightface's IJB layout: DIR/meta, DIR/loose_crop)")
    first, rest = 1, b""
    with open(path, "rb") as file:
        while True:
            block = file.read(_BLOCK_BYTES)
            lines = (rest + block).split(b"\n")
            rest = lines.pop() if block else b""
            yield first, lines
            first += len(lines)
            if not block:
                return


def read_fields(path: str, num_fields: int) -> np.ndarray:
    """Whitespace-separated fields of a protocol file as a bytes array [lines, num_fields].

    Trailing blank lines are allowed; any other line without exactly `num_fields` fields is an error.
    """
    parts, blank = [], None
    for first, lines in _line_blocks(path):
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
        if rows:
            parts.append(np.array(rows, dtype=bytes))
    if not parts:
        raise IJBLayoutError(f"{path}: the file holds no lines")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _convert(path: str, fields: np.ndarray, columns: slice | int, dtype, what: str) -> np.ndarray:
    """fields[:, columns] as `dtype` (finite for floats); the first bad line is named in the error."""
    values = fields[:, columns]
    try:
        if np.issubdtype(dtype, np.floating):
            converted = values.astype(np.float64)
            if not np.all(np.isfinite(converted)):
                raise ValueError("not finite")
            return converted.astype(dtype)
        return values.astype(dtype)
    except ValueError:
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
            raise IJBLayoutError(f"{path}, line {index + 1}: {what} must be {kind}, got {text!r}")
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

    pair_fields = read_fields(pair_file, 3)
    pairs = _convert(pair_file, pair_fields, slice(0, 3), np.int64, "template ids and labels")
    del pair_fields
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
