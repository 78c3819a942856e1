"""`faceid verify`, `faceid embed` and `faceid identify`: decisions on image files with a saved model.

    faceid verify MODEL a.jpg b.jpg [--landmarks FILE] [--threshold T]
    faceid embed MODEL IMAGE_TREE --output embeddings.npz
    faceid identify MODEL --gallery embeddings.npz IMAGE... [--top_k 5]

The threshold is `--threshold`, else the one `faceid calibrate` stored in `MODEL.threshold.json`.
`embeddings.npz` holds `embeddings` (float32 [N, dim], unit rows), `labels` (identity folder of
each row) and `paths` (image path relative to the tree), loadable with `allow_pickle=False`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from faceid_keras.argtypes import positive_int
from faceid_keras.verifier import FaceVerifier, load_face


def _landmarks_for(table: dict | None, paths: Sequence[str], source: str | None) -> list:
    """Each path's five points from a landmark table (by path as given, else by file name)."""
    from tfds_ms1m.landmarks import normalise_key

    if table is None:
        return [None] * len(paths)
    found = []
    for path in paths:
        key = normalise_key(path)
        points = table.get(key, table.get(os.path.basename(key)))
        if points is None:
            raise ValueError(f"{source}: no landmarks for {path}")
        found.append(points)
    return found


def _read_table(path: str | None) -> dict | None:
    from tfds_ms1m.landmarks import read_landmarks

    return None if path is None else read_landmarks(path)


def run_verify(args: argparse.Namespace) -> int:
    """Prints the cosine similarity and same/different; exit status 0 for same, 2 for different."""
    verifier = FaceVerifier.load(args.model, threshold=args.threshold)
    if verifier.threshold is None:
        raise SystemExit(f"faceid verify: no threshold; pass --threshold or run faceid calibrate {args.model} ...")
    points = _landmarks_for(_read_table(args.landmarks), [args.image1, args.image2], args.landmarks)
    similarity, same = verifier.verify(args.image1, args.image2, *points)
    verdict = "same" if same else "different"
    print(f"cosine similarity {similarity:.5f} (threshold {verifier.threshold:.5f}): {verdict}")
    return 0 if same else 2


def gallery_files(image_tree: str) -> tuple[list[str], list[str]]:
    """(relative image paths, identity of each) of an image tree laid out as `faceid pack` reads it."""
    from tfds_ms1m.image_tree import identity_files, identity_folders

    paths, labels = [], []
    for identity in identity_folders(image_tree):
        images, _ = identity_files(image_tree, identity)
        paths += images
        labels += [identity] * len(images)
    return paths, labels


def run_embed(args: argparse.Namespace) -> int:
    """Embeds every image of the tree in batches and writes the gallery `.npz`."""
    from tqdm import tqdm

    from tfds_ms1m.parallel import ordered_map

    verifier = FaceVerifier.load(args.model, batch_size=args.batch_size)
    paths, labels = gallery_files(args.image_tree)
    if not paths:
        raise SystemExit(f"faceid embed: {args.image_tree} holds no images in identity folders")
    points = _landmarks_for(_read_table(args.landmarks), paths, args.landmarks)

    def read(index: int):
        try:
            return load_face(os.path.join(args.image_tree, paths[index]), verifier.image_size, points[index])
        except ValueError as err:
            return err

    chunks, kept, skipped = [], [], []
    faces, batch_rows = [], []
    bar = tqdm(total=len(paths), unit="img", desc="embed", file=sys.stderr, disable=not sys.stderr.isatty())
    for index, face in enumerate(ordered_map(read, range(len(paths)), args.workers)):
        bar.update(1)
        if isinstance(face, ValueError):
            skipped.append(f"{paths[index]}: {face}")
        else:
            faces.append(face)
            batch_rows.append(index)
        if len(faces) == args.batch_size or (index == len(paths) - 1 and faces):
            chunks.append(verifier.embed(faces))
            kept += batch_rows
            faces, batch_rows = [], []
    bar.close()
    if not kept:
        raise SystemExit(f"faceid embed: none of the {len(paths)} images could be read")
    output = args.output if args.output.endswith(".npz") else args.output + ".npz"
    temporary = output[: -len(".npz")] + ".partial.npz"
    np.savez(temporary, embeddings=np.concatenate(chunks), labels=np.asarray([labels[i] for i in kept]),
             paths=np.asarray([paths[i] for i in kept]))
    os.replace(temporary, output)
    print(f"Embedded {len(kept)} images of {len(set(labels[i] for i in kept))} identities into {output}")
    for line in skipped:
        print(f"Skipped {line}")
    return 0


def read_gallery(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of a gallery `.npz` written by `faceid embed` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings, labels = data["embeddings"], data["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a gallery written by faceid embed: {err}") from err
    if embeddings.ndim != 2 or len(labels) != len(embeddings):
        raise ValueError(f"{path}: embeddings {embeddings.shape} and {len(labels)} labels do not match")
    return embeddings, labels


def run_identify(args: argparse.Namespace) -> int:
    """Prints the top-k gallery identities of each image, and the decision when a threshold is known."""
    verifier = FaceVerifier.load(args.model, threshold=args.threshold, batch_size=args.batch_size)
    embeddings, labels = read_gallery(args.gallery)
    points = _landmarks_for(_read_table(args.landmarks), args.images, args.landmarks)
    results = verifier.identify(args.images, embeddings, labels, args.top_k, points)
    for image, matches in zip(args.images, results):
        print(image)
        for rank, (label, similarity) in enumerate(matches, start=1):
            print(f"  {rank}. {label}  {similarity:.5f}")
        if verifier.threshold is not None:
            label, similarity = matches[0]
            decision = label if similarity > verifier.threshold else "unknown"
            print(f"  decision (threshold {verifier.threshold:.5f}): {decision}")
    return 0


def _model_arguments(parser: argparse.ArgumentParser, threshold: bool = True) -> None:
    parser.add_argument("model", help="saved model (.keras) whose output is the face embedding")
    parser.add_argument("--landmarks", default=None,
                        help="CSV path,x1,y1,...,x5,y5 or JSON of five landmarks per image: align them first")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="embedding batch size")
    if threshold:
        parser.add_argument("--threshold", type=float, default=None,
                            help="cosine similarity above which two faces are the same person "
                            "(default: the one stored by faceid calibrate)")


def add_parser(subparsers) -> None:
    """Registers the `verify`, `embed` and `identify` subcommands on a `faceid` subparsers object."""
    verify = subparsers.add_parser("verify", help="are two face images the same person?",
                                   description="Cosine similarity of two faces and the same/different decision.")
    _model_arguments(verify)
    verify.add_argument("image1")
    verify.add_argument("image2")
    verify.set_defaults(func=run_verify)

    embed = subparsers.add_parser("embed", help="embed a folder of identity folders into a gallery .npz",
                                  description="Embeds IMAGE_TREE/<identity>/<image> into embeddings.npz.")
    _model_arguments(embed, threshold=False)
    embed.add_argument("image_tree", help="folder of identity folders of images")
    embed.add_argument("--output", required=True, help="gallery file to write (.npz)")
    embed.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                       help="threads reading images (default: cores, at most 8)")
    embed.set_defaults(func=run_embed)

    identify = subparsers.add_parser("identify", help="top-k gallery identities of face images",
                                     description="Exact search of each image's embedding in a gallery .npz.")
    _model_arguments(identify)
    identify.add_argument("images", nargs="+", metavar="IMAGE")
    identify.add_argument("--gallery", required=True, help="embeddings.npz written by faceid embed")
    identify.add_argument("--top_k", type=positive_int, default=5, help="identities listed per image (default: 5)")
    identify.set_defaults(func=run_identify)
