"""Folders of face images -> an insightface training folder (`train.rec`, `train.idx`, `property`).

    faceid pack IMAGE_TREE OUTPUT_DIR [--image_size 112] [--landmarks FILE]
                [--pairs NAME=FILE] [--workers N]

`IMAGE_TREE/<identity>/<file>` (jpg, jpeg, png, bmp, webp; subfolders of an identity count as
that identity): identities sorted by folder name get labels 0..N-1, images sorted by path. The
output is what insightface's `rec_builder` and MXNet's `im2rec` write, read back by insightface,
MXNet and `tfds build ms1m_arcface --manual_dir OUTPUT_DIR`, with `identities.txt` (label and
folder per line) beside it.

A JPEG already at the target size keeps its bytes; every other image is decoded, resized (or,
with `--landmarks`, aligned to insightface's template) and encoded as JPEG quality 95. Files that
cannot be used are skipped and listed with the reason in the summary and in `skipped.txt`; an
identity with no usable image gets no label and is reported. Images are prepared by `--workers`
threads (Pillow decodes, resizes and encodes with the GIL released) with a bounded number in
flight, and written in order as they come, so memory stays flat however many images there are.
Every output is written under a temporary name and renamed into place only when the whole run
succeeded, so a failed or interrupted run leaves the folder as it was.

`--pairs NAME=FILE` also writes the verification pack `NAME.bin` from LFW's `pairs.txt` format
(`name n1 n2` / `name1 n1 name2 n2` lines, images `name/name_000n.jpg`) or a CSV of
`path1,path2,is_same`; paths are relative to IMAGE_TREE. The tfds builder reads the packs named
like insightface's (lfw, cfp_fp, agedb_30, calfw, cplfw, cfp_ff, vgg2_fp); `faceid eval` reads any.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from tfds_ms1m import binpack, landmarks as landmark_files, recordio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95
PARTIAL_SUFFIX = ".partial"
SKIPPED_FILE = "skipped.txt"
IDENTITIES_FILE = "identities.txt"
MAX_IMAGE_PIXELS = 100_000_000
_IN_FLIGHT_PER_WORKER = 16
_TRUE = ("1", "true", "same", "yes")
_FALSE = ("0", "false", "different", "no")


class PackError(ValueError):
    """Input that cannot be packed (a missing tree, a malformed pairs file, an existing output)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One image ready to write: its JPEG bytes, or why it was skipped."""

    path: str
    jpeg: bytes | None
    reason: str = ""
    kept_bytes: bool = False


def identity_folders(root: str) -> list[str]:
    """Names of the identity folders of an image tree, sorted (label order); hidden ones left out."""
    if not os.path.isdir(root):
        raise PackError(f"{root}: no such image folder")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def identity_files(root: str, identity: str) -> tuple[list[str], list[str]]:
    """(image paths, other files) of one identity, relative to the tree with "/", sorted."""
    images, others = [], []
    for folder, subfolders, files in os.walk(os.path.join(root, identity)):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(relative)
    return images, others


def _encode(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def prepare_image(path: str, root: str, image_size: int, points: np.ndarray | None = None) -> Prepared:
    """Reads one image and returns it as a target-size JPEG (bytes kept when already one), or why not."""
    from PIL import Image, UnidentifiedImageError

    full = path if os.path.isabs(path) else os.path.join(root, path)
    try:
        with open(full, "rb") as f:
            data = f.read()
    except OSError as err:
        return Prepared(path, None, f"unreadable: {err.strerror or err}")
    if not data:
        return Prepared(path, None, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return Prepared(path, None, f"{image.width}x{image.height} is over {MAX_IMAGE_PIXELS} pixels")
            keep = (points is None and image.format == "JPEG" and image.mode == "RGB"
                    and image.size == (image_size, image_size))
            image.load()  # decodes everything: a truncated file fails here
            if keep:
                return Prepared(path, data, kept_bytes=True)
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return Prepared(path, None, f"not a readable image: {err}")
    if points is not None:
        from faceid_keras import alignment

        try:
            pixels = alignment.align_face(pixels, points, image_size=image_size)
        except ValueError as err:
            return Prepared(path, None, f"cannot be aligned: {err}")
    elif pixels.shape[:2] != (image_size, image_size):
        resized = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(resized)
    return Prepared(path, _encode(pixels))


def ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(function, items)` on `workers` threads, in order, with a bounded number of items in flight."""
    if workers <= 1:
        yield from map(function, items)
        return
    window = workers * _IN_FLIGHT_PER_WORKER
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


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


@dataclasses.dataclass
class PackSummary:
    """What a pack run wrote and what it left out."""

    images: int = 0
    identities: int = 0
    kept_bytes: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    empty_identities: list[str] = dataclasses.field(default_factory=list)
    pairs: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def report(self, output_dir: str) -> str:
        """Text summary: counts, then the skipped files and empty identities (first 20 of each)."""
        rate = self.images / self.seconds if self.seconds else 0.0
        lines = [
            f"Packed {self.images} images of {self.identities} identities into {output_dir} in "
            f"{self.seconds:.1f} s ({rate:.0f} images/s; {self.kept_bytes} JPEGs kept as they were)."
        ]
        lines += [f"Wrote {name}.bin with {count} pairs." for name, count in self.pairs.items()]
        if self.empty_identities:
            lines.append(f"{len(self.empty_identities)} identity folders without a usable image (no label): "
                         + ", ".join(self.empty_identities[:20]) + (" ..." if len(self.empty_identities) > 20 else ""))
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} files (all listed in {os.path.join(output_dir, SKIPPED_FILE)}):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


class _Outputs:
    """Output files written under temporary names, renamed into place together by `commit`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.names: list[str] = []

    def path(self, name: str) -> str:
        self.names.append(name)
        return os.path.join(self.directory, name + PARTIAL_SUFFIX)

    def commit(self) -> None:
        for name in self.names:
            os.replace(os.path.join(self.directory, name + PARTIAL_SUFFIX), os.path.join(self.directory, name))
        self.names = []

    def discard(self) -> None:
        for name in self.names:
            try:
                os.remove(os.path.join(self.directory, name + PARTIAL_SUFFIX))
            except FileNotFoundError:
                pass


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, desc="pack")


def _write_train(
    root: str, outputs: _Outputs, image_size: int, points: dict | None, workers: int, summary: PackSummary,
    progress: bool,
) -> None:
    identities = identity_folders(root)
    if not identities:
        raise PackError(f"{root}: no identity folders (expected IMAGE_TREE/<identity>/<image files>)")
    top_level = sorted(e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith("."))
    summary.skipped += [(name, "not inside an identity folder") for name in top_level]
    total = sum(len(identity_files(root, name)[0]) for name in identities)

    def tasks() -> Iterator[tuple[int, str]]:
        for index, name in enumerate(identities):
            images, others = identity_files(root, name)
            summary.skipped.extend((other, "not an image file extension") for other in others)
            for image in images:
                yield index, image

    def prepare(task: tuple[int, str]) -> tuple[int, Prepared]:
        index, path = task
        if points is not None and path not in points:
            return index, Prepared(path, None, "no landmarks for it in --landmarks")
        return index, prepare_image(path, root, image_size, None if points is None else points[path])

    ranges: list[tuple[int, int]] = []
    labelled: list[str] = []
    key, current = 1, -1
    bar = _progress(total, progress)
    with recordio.RecordWriter(outputs.path("train.rec"), outputs.path("train.idx")) as writer:
        for index, prepared in ordered_map(prepare, tasks(), workers):
            bar.update(1)
            if prepared.jpeg is None:
                summary.skipped.append((prepared.path, prepared.reason))
                continue
            if index != current:  # the identity's first usable image gives it the next label
                current = index
                labelled.append(identities[index])
                ranges.append((key, key))
            writer.write(key, recordio.pack_record(len(labelled) - 1, prepared.jpeg, id=key))
            ranges[-1] = (ranges[-1][0], key + 1)
            summary.kept_bytes += prepared.kept_bytes
            key += 1
        bar.close()
        if not labelled:
            raise PackError(f"{root}: no usable image in any identity folder")
        id_start = key
        for label, (start, end) in enumerate(ranges):
            writer.write(id_start + label, recordio.pack_record([start, end], b"", id=id_start + label))
        writer.write(0, recordio.pack_record([id_start, id_start + len(labelled)], b"", id=0))
    recordio.write_property(outputs.path("property"), len(labelled), image_size, image_size)
    with open(outputs.path(IDENTITIES_FILE), "w", encoding="utf-8") as f:
        f.writelines(f"{label}\t{name}\n" for label, name in enumerate(labelled))
    summary.images, summary.identities = key - 1, len(labelled)
    summary.empty_identities = sorted(set(identities) - set(labelled))


def _write_pairs(
    root: str, outputs: _Outputs, name: str, pairs_file: str, image_size: int, points: dict | None,
    workers: int, summary: PackSummary,
) -> None:
    pairs = read_pairs(pairs_file, root)

    def prepare(path: str) -> Prepared:
        if points is not None and path not in points:
            return Prepared(path, None, "no landmarks for it in --landmarks")
        return prepare_image(path, root, image_size, None if points is None else points[path])

    flat = [path for pair in pairs for path in pair[:2]]
    prepared = list(ordered_map(prepare, flat, workers))
    images, issame = [], []
    for i, (first, second) in enumerate(zip(prepared[0::2], prepared[1::2])):
        bad = next((p for p in (first, second) if p.jpeg is None), None)
        if bad is not None:
            summary.skipped.append((f"{pairs_file} pair {i + 1} ({bad.path})", bad.reason))
            continue
        images += [first.jpeg, second.jpeg]
        issame.append(pairs[i][2])
    if not issame:
        raise PackError(f"{pairs_file}: none of its {len(pairs)} pairs has two usable images")
    binpack.write_bin(outputs.path(f"{name}.bin"), images, issame)
    summary.pairs[name] = len(issame)


def pack(
    image_tree: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 112,
    landmarks: str | os.PathLike | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> PackSummary:
    """Packs an image tree into an insightface folder; returns what was written and skipped."""
    root, output_dir = os.fspath(image_tree), os.fspath(output_dir)
    if image_size < 8:
        raise PackError(f"image_size={image_size}: need at least 8 pixels")
    if os.path.exists(os.path.join(output_dir, "train.rec")) and not overwrite:
        raise PackError(f"{output_dir} already holds a train.rec; pass --overwrite to replace it")
    for name, _ in pairs:
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise PackError(f"--pairs name {name!r}: expected a plain file name such as lfw")
    points = None
    if landmarks is not None:
        from faceid_keras import alignment

        try:
            alignment.template(image_size)
        except ValueError as err:
            raise PackError(f"--landmarks with --image_size {image_size}: {err}") from None
        points = landmark_files.read_landmarks(landmarks)
    workers = workers or min(8, os.cpu_count() or 1)
    os.makedirs(output_dir, exist_ok=True)
    summary = PackSummary()
    outputs = _Outputs(output_dir)
    started = time.perf_counter()
    try:
        _write_train(root, outputs, image_size, points, workers, summary, progress)
        for name, pairs_file in pairs:
            _write_pairs(root, outputs, name, pairs_file, image_size, points, workers, summary)
        with open(outputs.path(SKIPPED_FILE), "w", encoding="utf-8") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in summary.skipped)
            f.writelines(f"{name}/\tidentity folder without a usable image\n" for name in summary.empty_identities)
        outputs.commit()
    finally:
        outputs.discard()
    summary.seconds = time.perf_counter() - started
    return summary


def _pairs_argument(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (such as lfw=pairs.txt), got {text!r}")
    return name, path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `pack` subcommand on a `faceid` subparsers object."""
    parser = subparsers.add_parser(
        "pack", help="pack folders of face images into insightface's train.rec format",
        description=__doc__.split("\n")[0])
    parser.add_argument("image_tree", help="folder of identity folders of images")
    parser.add_argument("output_dir", help="insightface folder to write (train.rec, train.idx, property)")
    parser.add_argument("--image_size", type=int, default=112, help="square side of the packed images (default: 112)")
    parser.add_argument("--landmarks", default=None,
                        help="CSV relative_path,x1,y1,...,x5,y5 or JSON: align every image to the ArcFace template")
    parser.add_argument("--pairs", type=_pairs_argument, action="append", default=[], metavar="NAME=FILE",
                        help="also write NAME.bin from LFW pairs.txt or CSV path1,path2,is_same (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="threads preparing images (default: cores, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pack in OUTPUT_DIR")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Packs and prints the summary; exit status 1 on bad input."""
    try:
        summary = pack(args.image_tree, args.output_dir, args.image_size, args.landmarks, args.pairs,
                       args.workers, args.overwrite, progress=sys.stderr.isatty())
    except (PackError, landmark_files.LandmarksError) as err:
        print(f"pack: {err}", file=sys.stderr)
        return 1
    print(summary.report(args.output_dir))
    return 0
