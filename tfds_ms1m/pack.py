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
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence

from tfds_ms1m import binpack, insightface_folder, landmarks as landmark_files, recordio, recordio_writer
from tfds_ms1m.image_tree import PackError, Prepared, identity_files, identity_folders, prepare_image
from tfds_ms1m.pairs_file import read_pairs
from tfds_ms1m.parallel import ordered_map

PARTIAL_SUFFIX = ".partial"
SKIPPED_FILE = "skipped.txt"
IDENTITIES_FILE = "identities.txt"


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


def _prepare(path: str, root: str, image_size: int, points: dict | None) -> Prepared:
    """`prepare_image` under the --landmarks table: an image the table does not list is skipped."""
    if points is not None and path not in points:
        return Prepared(path, None, "no landmarks for it in --landmarks")
    return prepare_image(path, root, image_size, None if points is None else points[path])


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
        return index, _prepare(path, root, image_size, points)

    ranges: list[tuple[int, int]] = []
    labelled: list[str] = []
    key, current = 1, -1
    bar = _progress(total, progress)
    with recordio_writer.RecordWriter(outputs.path("train.rec"), outputs.path("train.idx")) as writer:
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
    insightface_folder.write_property(outputs.path("property"), len(labelled), image_size, image_size)
    with open(outputs.path(IDENTITIES_FILE), "w", encoding="utf-8") as f:
        f.writelines(f"{label}\t{name}\n" for label, name in enumerate(labelled))
    summary.images, summary.identities = key - 1, len(labelled)
    summary.empty_identities = sorted(set(identities) - set(labelled))


def _write_pairs(
    root: str, outputs: _Outputs, name: str, pairs_file: str, image_size: int, points: dict | None,
    workers: int, summary: PackSummary,
) -> None:
    pairs = read_pairs(pairs_file, root)

    flat = [path for pair in pairs for path in pair[:2]]
    prepared = list(ordered_map(lambda path: _prepare(path, root, image_size, points), flat, workers))
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
