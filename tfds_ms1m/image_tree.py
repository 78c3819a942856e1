"""Image trees as `faceid pack` and `faceid embed` read them: `<identity>/<image files>`, and one
image prepared for a pack (a target-size JPEG, aligned with landmarks if given, or why not)."""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 95
MAX_IMAGE_PIXELS = 100_000_000


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
