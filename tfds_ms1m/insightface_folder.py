"""insightface's training folder on top of RecordIO: the `property` file and the image records.

`property` holds "classes,height,width". `train.rec` keeps its images under keys 1 .. id_start - 1
when header record 0 carries the labels [id_start, id_end] (identity records follow the images);
without it, or when record 0 has a scalar label, every record is an image.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from etils import epath

from tfds_ms1m import recordio

# Keys per `read_many` call in `iter_images`: bounds the index arrays held at once.
_ITER_KEYS = 1 << 16
# Most classes a `property` file may declare (WebFace42M, the largest public set, has 2.06M).
MAX_CLASSES = 1 << 22
# Largest image side a `property` file may declare.
MAX_SIDE = 1 << 14


def read_property(path: recordio.PathLike) -> tuple[int, int, int]:
    """Read insightface's `property` file ("classes,height,width") from a file or its folder."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / "property"
    if not path.exists():
        raise FileNotFoundError(f"{path}: `property` file missing (expected 'classes,height,width')")
    with path.open("rb") as f:
        raw = f.read(256)
    try:
        text = raw.decode("ascii").strip()
        fields = text.split(",")
        if len(raw) == 256 or len(fields) != 3 or not all(x.strip().isdigit() for x in fields):
            raise ValueError
        num_classes, height, width = (int(x) for x in fields)
    except ValueError:
        raise recordio.RecordIOError(
            f"{path}: content {raw[:60]!r}, expected 'classes,height,width' (three positive integers)"
        ) from None
    if not (0 < num_classes <= MAX_CLASSES and 0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise recordio.RecordIOError(
            f"{path}: content {text!r}: classes must be in [1, {MAX_CLASSES}] and height and "
            f"width in [1, {MAX_SIDE}]"
        )
    return num_classes, height, width


def write_property(path: recordio.PathLike, num_classes: int, height: int, width: int) -> None:
    """Write insightface's `property` file (to `path`, or to `path/property` if it is a folder)."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / "property"
    path.write_text(f"{int(num_classes)},{int(height)},{int(width)}\n")


def image_keys(reader: recordio.RecordReader) -> Sequence[int]:
    """Keys of the image records: 1 .. id_start-1 from header record 0, else every key."""
    if 0 not in reader:
        return reader.keys
    header, label, _ = recordio.unpack_header(reader.read(0), f"{reader.name}: record key 0")
    if header.flag == 0:
        return reader.keys
    if label.size < 2:
        raise recordio.RecordIOError(
            f"{reader.name}: header record key 0 has {label.size} label(s), expected [id_start, id_end]"
        )
    where = f"{reader.name}: header record key 0"
    if not math.isfinite(label[0]) or label[0] != int(label[0]) or label[0] < 2:
        raise recordio.RecordIOError(
            f"{where}: id_start is {label[0]}; expected an integer >= 2 (images are keys "
            "1 .. id_start - 1)"
        )
    id_start = int(label[0])
    index = reader.keys
    present = int(np.searchsorted(index, min(id_start, index[-1] + 1)) - np.searchsorted(index, 1))
    if present != id_start - 1:
        # Among keys 1 .. len(index) + 1 one is always missing, so this stops early.
        first_missing = next(k for k in range(1, id_start) if k not in reader)
        raise recordio.RecordIOError(
            f"{where}: says images are keys 1..{id_start - 1} but key {first_missing} is not in "
            f"the index ({present} of them are)"
        )
    return range(1, id_start)


def iter_images(
    folder: recordio.PathLike, rec_name: str = "train"
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (key, class_id, image_bytes) for every image record of an insightface folder, in key
    order (read in large blocks where the file is in key order, as insightface writes it)."""
    folder = epath.Path(folder)
    rec_path, idx_path = folder / f"{rec_name}.rec", folder / f"{rec_name}.idx"
    for path in (rec_path, idx_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (an insightface folder has train.rec and train.idx)")
    with recordio.RecordReader(rec_path, idx_path) as reader:
        keys = image_keys(reader)
        for start in range(0, len(keys), _ITER_KEYS):
            for key, payload in reader.read_many(keys[start : start + _ITER_KEYS]):
                label, image = recordio.unpack_image(payload, f"{reader.name}: record key {key}")
                yield key, label, image
