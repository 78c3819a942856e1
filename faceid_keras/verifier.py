"""`FaceVerifier`: a saved embedding model with its threshold: load, embed, compare, identify.

    verifier = FaceVerifier.load("runs/faceid/embedding.keras")
    similarity, same = verifier.verify("a.jpg", "b.jpg")

Embeddings are the verification protocol's (f(x) + f(flip(x)), L2-normalised), so a threshold
from `faceid calibrate` means the FAR it was chosen at. Images are RGB files or uint8 arrays;
with five landmarks they are aligned to insightface's template, else used as they are (aligned
crops at the model's size) or resized to it.

Identification is exact search: similarities by matrix product against the gallery in chunks,
best image per identity. A query costs 2 * dim multiply-adds per gallery image (measured on two
shared CPU cores: 16 queries against 1,000,000 512-d embeddings in 3 s, 1 s of it the products),
and the gallery holds 4 * dim bytes per image in memory (2 GB per million 512-d embeddings). That
is the right tool up to a few million gallery images at interactive query rates; beyond that, or
for many queries per second, use an approximate index (faiss, ScaNN) over the same embeddings.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from faceid_keras import calibrate, embedding

SEARCH_CHUNK = 65_536


def load_face(
    image: str | os.PathLike | np.ndarray, image_size: tuple[int, int] | None, landmarks: np.ndarray | None = None
) -> np.ndarray:
    """A uint8 [H, W, 3] face: aligned by `landmarks` when given, and resized to `image_size` if needed.

    Alignment is at `image_size` when insightface's template is defined there (multiples of 112 or
    128), else at 112 and then resized.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, np.ndarray):
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"Expected a uint8 [H, W, 3] image, got {pixels.dtype} {pixels.shape}.")
    else:
        try:
            with Image.open(image) as opened:
                pixels = np.asarray(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{image}: cannot be read as an image: {err}") from err
    if landmarks is not None:
        from faceid_keras import alignment

        side = (image_size or (112, 112))[0]
        if side % 112 and side % 128:  # the template is defined at these sizes: align at 112, then resize
            side = 112
        pixels = alignment.align_face(pixels, np.asarray(landmarks, dtype=np.float64), image_size=side)
    if image_size is not None and pixels.shape[:2] != tuple(image_size):
        resized = Image.fromarray(pixels).resize((image_size[1], image_size[0]), Image.BILINEAR)
        pixels = np.asarray(resized)
    return pixels


def search(
    queries: np.ndarray, gallery: np.ndarray, labels: Sequence[str], k: int = 5, chunk: int = SEARCH_CHUNK
) -> list[list[tuple[str, float]]]:
    """Exact top-k identities per query: [(label, cosine of its best gallery image)], best first.

    Gallery rows are L2-normalised embeddings; products are taken `chunk` rows at a time, so
    memory beyond the gallery is queries x chunk floats.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    labels = np.asarray(labels)
    if gallery.ndim != 2 or queries.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"Expected [Q, d] queries and [N, d] gallery, got {queries.shape} and {gallery.shape}.")
    if len(labels) != len(gallery) or len(gallery) == 0:
        raise ValueError(f"Expected one label per gallery row and a non-empty gallery, got {len(labels)} "
                         f"labels for {len(gallery)} rows.")
    names, ids = np.unique(labels, return_inverse=True)
    order = np.argsort(ids, kind="stable")  # rows of one identity next to each other
    gallery, ids = gallery[order], ids[order]
    best = np.full((len(queries), len(names)), -np.inf, dtype=np.float32)
    for start in range(0, len(gallery), chunk):
        rows, row_ids = gallery[start : start + chunk], ids[start : start + chunk]
        similarity = queries @ rows.T
        starts = np.flatnonzero(np.r_[True, row_ids[1:] != row_ids[:-1]])
        segment_ids = row_ids[starts]
        best[:, segment_ids] = np.maximum(best[:, segment_ids], np.maximum.reduceat(similarity, starts, axis=1))
    k = min(k, len(names))
    top = np.argsort(-best, axis=1, kind="stable")[:, :k]
    return [[(str(names[j]), float(best[i, j])) for j in row] for i, row in enumerate(top)]


class FaceVerifier:
    """A face embedding model plus its same/different threshold (cosine similarity)."""

    def __init__(self, model, threshold: float | None = None, batch_size: int = 64) -> None:
        self.model = model
        self.threshold = threshold
        self.batch_size = batch_size
        self.image_size = embedding.model_image_size(model)

    @classmethod
    def load(cls, path: str | os.PathLike, threshold: float | None = None, batch_size: int = 64) -> "FaceVerifier":
        """Loads a saved model; the threshold is the given one, else the stored `<path>.threshold.json`."""
        import keras

        model = keras.models.load_model(os.fspath(path))
        if threshold is None:
            record = calibrate.read_threshold(path)
            threshold = None if record is None else float(record["cosine"])
        return cls(model, threshold, batch_size)

    def embed(self, images: Sequence, landmarks: Sequence | None = None) -> np.ndarray:
        """float32 [N, dim] unit embeddings of image files or uint8 arrays (landmarks: one [5, 2] or None each)."""
        landmarks = [None] * len(images) if landmarks is None else list(landmarks)
        if len(landmarks) != len(images):
            raise ValueError(f"{len(images)} images but {len(landmarks)} landmark entries.")
        if not len(images):
            return np.zeros((0, 0), dtype=np.float32)
        faces = np.stack([load_face(image, self.image_size, points) for image, points in zip(images, landmarks)])
        return embedding.embed(self.model, faces, self.batch_size).astype(np.float32)

    @staticmethod
    def compare(embedding1: np.ndarray, embedding2: np.ndarray) -> float:
        """Cosine similarity of two embeddings."""
        a, b = np.asarray(embedding1, dtype=np.float64), np.asarray(embedding2, dtype=np.float64)
        return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))

    def verify(self, image1, image2, landmarks1=None, landmarks2=None) -> tuple[float, bool]:
        """(cosine similarity, same person) of two faces; needs a threshold."""
        if self.threshold is None:
            raise ValueError("No threshold: pass one, or store one with `faceid calibrate`.")
        embeddings = self.embed([image1, image2], [landmarks1, landmarks2])
        similarity = self.compare(embeddings[0], embeddings[1])
        return similarity, similarity > self.threshold

    def identify(self, images: Sequence, gallery: np.ndarray, labels: Sequence[str], k: int = 5,
                 landmarks: Sequence | None = None) -> list[list[tuple[str, float]]]:
        """Top-k gallery identities of each image (see `search`)."""
        return search(self.embed(images, landmarks), gallery, labels, k)
