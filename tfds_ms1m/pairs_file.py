"""Verification pairs files: LFW's `pairs.txt` (`name n1 n2` / `name1 n1 name2 n2` lines, images
`name/name_000n.<ext>`) or a CSV `path1,path2,is_same`, paths relative to an image tree."""
from __future__ import annotations

import csv
import os

from tfds_ms1m import landmarks as landmark_files
from tfds_ms1m.image_tree import IMAGE_EXTENSIONS, PackError

_TRUE = ("1", "true", "same", "yes")
_FALSE = ("0", "false", "different", "no")


def _parse_flag(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise PackError(f"{where}: is_same must be 1/0, true/false or same/different, got {text!r}")


def _lfw_image(root: str, name: str, number: str, where: str) -> str:
    try:
        index = int(number)
    except ValueError:
        raise PackError(f"{where}: image number {number!r} is not an integer") from None
    stem = f"{name}/{name}_{index:04d}"
    for extension in IMAGE_EXTENSIONS:
        if os.path.exists(os.path.join(root, stem + extension)):
            return stem + extension
    return stem + ".jpg"


def read_pairs(path: str, root: str) -> list[tuple[str, str, bool]]:
    """Pairs (path1, path2, is_same) from LFW's pairs.txt format or a CSV path1,path2,is_same."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PackError(f"{path}: cannot read the pairs file: {err}") from None
    pairs = []
    if any("," in line for line in lines[:5]):
        for number, row in enumerate(csv.reader(lines), start=1):
            if not row or not "".join(row).strip():
                continue
            where = f"{path}, line {number}"
            if len(row) != 3:
                raise PackError(f"{where}: expected path1,path2,is_same, got {len(row)} fields")
            if number == 1 and row[2].strip().lower() not in _TRUE + _FALSE:
                continue  # header
            pairs.append((landmark_files.normalise_key(row[0]), landmark_files.normalise_key(row[1]),
                          _parse_flag(row[2], where)))
    else:
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            where = f"{path}, line {number}"
            if not fields or (number == 1 and all(f.isdigit() for f in fields)):
                continue  # LFW's first line: folds and pairs per fold
            if len(fields) == 3:
                pairs.append((_lfw_image(root, fields[0], fields[1], where),
                              _lfw_image(root, fields[0], fields[2], where), True))
            elif len(fields) == 4:
                pairs.append((_lfw_image(root, fields[0], fields[1], where),
                              _lfw_image(root, fields[2], fields[3], where), False))
            else:
                raise PackError(f"{where}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line!r}")
    if not pairs:
        raise PackError(f"{path}: no pairs")
    return pairs
