"""Verification packs: insightface `.bin` files or the built ms1m_arcface/verification tfds config,
read into (uint8 images [2N, H, W, 3], bool issame [N]) with the decoded size bounded.

Dataset inputs are reached through `etils.epath`, the file layer tensorflow-datasets and tfds_ms1m
use, so a pack folder may be local or remote (gs://...) like the data it comes with.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_TARGETS = ("lfw", "cfp_fp", "agedb_30")
# Decoded-pixel bounds for verification packs: one image (a face crop is ~112x112; PIL's own
# bomb limit is ~89M pixels) and all images of a pack together, as uint8 RGB.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PACK_BYTES = 4 << 30


def _decode(data: bytes, source: str, index: int):
    """Decodes one encoded image to an RGB PIL image, naming the file and index on failure.

    The image size is read from its header and checked against MAX_IMAGE_PIXELS before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    from tfds_ms1m.binpack import BinPackError

    where = f"{source}: image {index} (pair {index // 2})"
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BinPackError(
                    f"{where}: {image.width}x{image.height} pixels, more than {MAX_IMAGE_PIXELS} "
                    "(not a face crop)"
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        if isinstance(err, BinPackError):
            raise
        raise BinPackError(f"{where} cannot be decoded: {err}") from err


def _stack(
    encoded: Sequence[bytes],
    source: str,
    image_size: tuple[int, int] | None,
    max_bytes: int = MAX_PACK_BYTES,
) -> np.ndarray:
    """Decodes encoded images one at a time into uint8 [N, H, W, 3], resizing (bilinear) to
    image_size or the first image's size; an image referenced several times is decoded once."""
    from PIL import Image

    from tfds_ms1m.binpack import BinPackError

    if not len(encoded):
        raise BinPackError(f"{source}: no images.")
    first = _decode(encoded[0], source, 0)
    height, width = image_size if image_size is not None else (first.height, first.width)
    nbytes = len(encoded) * height * width * 3
    if nbytes > max_bytes:
        raise BinPackError(
            f"{source}: {len(encoded)} images of {height}x{width} need {nbytes} bytes decoded, "
            f"more than the limit of {max_bytes}"
        )
    out = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    decoded_at: dict[int, int] = {}
    for i, data in enumerate(encoded):
        if id(data) in decoded_at:
            out[i] = out[decoded_at[id(data)]]
            continue
        image = first if i == 0 else _decode(data, source, i)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        out[i] = np.asarray(image)
        decoded_at[id(data)] = i
    return out


def load_bin(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    max_bytes: int = MAX_PACK_BYTES,
):
    """Reads an insightface ``.bin`` pack into (uint8 images [2N, H, W, 3], bool issame [N]).

    Images are resized (bilinear) to ``image_size`` (height, width) when given, else to the size
    of the first image when sizes differ; pair i is images 2i and 2i+1. A pack whose decoded images
    would take more than ``max_bytes`` raises ``BinPackError`` before any is decoded.
    """
    from tfds_ms1m.binpack import read_bin

    encoded, issame = read_bin(path)
    return _stack(encoded, os.fspath(path), image_size, max_bytes), np.asarray(issame, dtype=bool)


def _tfds_verification_dir(data_path: str | os.PathLike) -> str | None:
    """The prepared ms1m_arcface/verification folder under a tfds data dir, or None."""
    import tensorflow_datasets as tfds

    import tfds_ms1m  # noqa: F401  (registers the ms1m_arcface builder)

    builder = tfds.builder("ms1m_arcface/verification", data_dir=os.fspath(data_path))
    return builder.data_dir if builder.is_prepared() else None


def load_tfds_split(builder_dir: str, name: str, image_size: tuple[int, int] | None = None):
    """Reads one split of the prepared ms1m_arcface/verification config as load_bin does."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(builder_dir)
    if name not in builder.info.splits:
        raise FileNotFoundError(
            f"{builder_dir}: no verification split {name!r}; found {sorted(builder.info.splits)}."
        )
    dataset = builder.as_dataset(split=name, shuffle_files=False, decoders={
        "image1": tfds.decode.SkipDecoding(), "image2": tfds.decode.SkipDecoding()})
    source = f"{builder_dir} split {name}"
    images, issame = [], []
    for example in dataset.as_numpy_iterator():
        images += [example["image1"], example["image2"]]
        issame.append(bool(example["is_same"]))
    return _stack(images, source, image_size), np.asarray(issame, dtype=bool)


def available_targets(data_path: str | os.PathLike) -> list[str]:
    """Names of the verification packs under a tfds data dir or an insightface folder."""
    from etils import epath

    builder_dir = _tfds_verification_dir(data_path)
    if builder_dir is not None:
        import tensorflow_datasets as tfds

        return sorted(tfds.builder_from_directory(builder_dir).info.splits)
    folder = epath.Path(data_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{data_path}: no such directory.")
    return sorted(path.stem for path in folder.iterdir() if path.name.endswith(".bin"))


def load_targets(
    data_path: str | os.PathLike,
    names: Iterable[str] = DEFAULT_TARGETS,
    image_size: tuple[int, int] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads verification targets by name from a tfds data dir (ms1m_arcface/verification) or from
    an insightface folder of ``<name>.bin`` packs: {name: (uint8 images, bool issame)}."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    names = list(names)
    if not names:
        raise ValueError("No verification targets named.")
    builder_dir = _tfds_verification_dir(data_path)
    found = available_targets(data_path)
    targets = {}
    for name in names:
        if name not in found:
            if builder_dir is not None:
                where = f"{builder_dir}: no split {name!r}"
            else:
                where = f"{os.path.join(os.fspath(data_path), name + '.bin')} does not exist"
            listing = ", ".join(found) or (
                "none (neither ms1m_arcface/verification tfds data nor .bin packs there)"
            )
            raise FileNotFoundError(f"{where}; targets found: {listing}.")
        if builder_dir is not None:
            targets[name] = load_tfds_split(builder_dir, name, image_size)
        else:
            targets[name] = load_bin(os.path.join(os.fspath(data_path), name + ".bin"), image_size)
    return targets
