"""Five-point face landmark files: CSV ``relative_path,x1,y1,...,x5,y5`` or JSON.

Points are in pixels of the original image, in insightface's order: left eye, right eye, nose,
left mouth corner, right mouth corner. JSON is an object mapping each relative path to ten numbers
or to five [x, y] pairs. A CSV may start with a header line (its second field not a number).
Paths use "/" and are relative to the image tree (or as given on the command line).
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]
MAX_FILE_BYTES = 1 << 31


class LandmarksError(ValueError):
    """A landmark file that cannot be read as five points per image."""


def _points(values, where: str) -> np.ndarray:
    try:
        points = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise LandmarksError(f"{where}: landmarks must be numbers: {err}") from None
    if points.size != 10 or not np.isfinite(points).all():
        raise LandmarksError(f"{where}: expected 10 finite numbers (5 points x, y), got {points.size}")
    return points.reshape(5, 2)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def normalise_key(path: str) -> str:
    """The lookup key of a path: forward slashes, no leading "./"."""
    key = path.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def read_landmarks(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a CSV or JSON landmark file into {relative path: float64 [5, 2]}."""
    path = os.fspath(path)
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise LandmarksError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json") or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LandmarksError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise LandmarksError(f"{path}: expected a JSON object mapping image paths to landmarks")
        return {normalise_key(k): _points(v, f"{path}: {k}") for k, v in data.items()}
    table: dict[str, np.ndarray] = {}
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if line_number == 1 and len(row) > 1 and not _is_number(row[1]):
            continue  # header
        where = f"{path}, line {line_number}"
        if len(row) != 11:
            raise LandmarksError(f"{where}: expected 11 fields (path and 10 coordinates), got {len(row)}")
        key = normalise_key(row[0])
        if key in table:
            raise LandmarksError(f"{where}: {key} listed twice")
        table[key] = _points(row[1:], where)
    return table
