"""Raw embeddings of an IJB protocol's loose crops and of their mirror images, streamed and resumable.

Each crop is read and decoded as OpenCV decodes it (`decode_jpeg(dct_method="INTEGER_ACCURATE")`
gives cv2.imread's pixels), aligned with its five landmarks onto the ArcFace template
(`faceid_keras.alignment`) and embedded together with its horizontal flip, in batches through
tf.data. The network's raw output is used: the backbone embedding before L2 normalisation, whose
norm insightface's IJB scoring keeps. Images are processed in chunks; each finished chunk is saved
to the cache folder, so an interrupted run resumes at the first missing chunk.
"""
from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from faceid_keras import alignment
from faceid_keras.model import ArcFaceModel

DEFAULT_CHUNK = 8192


def raw_embedding_model(model: keras.Model) -> keras.Model:
    """[0, 255] images -> backbone embeddings without the final L2 normalisation.

    An `ArcFaceModel` gives its backbone behind its pixel scaling; a functional model ending in a
    UnitNormalization layer (such as `embedding_model()`) is cut before it; any other model is
    taken to output raw embeddings already.
    """
    if isinstance(model, ArcFaceModel):
        images = keras.Input(model.image_shape, name="images")
        return keras.Model(images, model.backbone(model.pixel_scaling(images)), name="raw_embedding")
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.UnitNormalization):
        return keras.Model(model.inputs, last.input, name="raw_embedding")
    return model


def _crop_size(model: keras.Model) -> int:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[0] != shape[1] or shape[0] is None:
        raise ValueError(f"the model must take square images [S, S, 3], got input shape {shape}")
    return int(shape[0])


def _dataset(paths: np.ndarray, landmarks: np.ndarray, size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of aligned crops followed by their mirror images: float32 pixels [2B, S, S, 3]."""

    def load(path, points):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")
        crop = tf.numpy_function(lambda i, p: alignment.align_face(i, p, size), [image, points], tf.uint8)
        return tf.ensure_shape(crop, (size, size, 3))

    return (
        tf.data.Dataset.from_tensor_slices((paths, landmarks))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .map(lambda crops: tf.cast(tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0), tf.float32))
        .prefetch(2)
    )


def _check_cache(cache_dir: str, fingerprint: dict) -> None:
    """Creates the cache folder with its fingerprint, or checks that an existing one matches."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "fingerprint.json")
    if os.path.exists(path):
        with open(path) as file:
            found = json.load(file)
        if found != fingerprint:
            raise ValueError(
                f"{path} describes another run ({found}, this one is {fingerprint}); "
                "pass another cache folder or delete this one"
            )
        return
    with open(path, "w") as file:
        json.dump(fingerprint, file)


def embed_images(
    model: keras.Model,
    image_dir: str,
    image_names: np.ndarray,
    landmarks: np.ndarray,
    batch_size: int = 64,
    cache_dir: str | None = None,
    fingerprint: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    verbose: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings [N, D], raw embeddings of the flipped crops [N, D]), float32.

    With `cache_dir`, every chunk of `chunk_size` images is saved there as it finishes and reused on
    the next call; `fingerprint` (what the embeddings depend on: model, protocol) is stored beside
    them and must match to resume.
    """
    paths = np.array([os.path.join(image_dir, name) for name in image_names])
    missing = next((i for i, path in enumerate(paths) if not os.path.isfile(path)), None)
    if missing is not None:
        raise FileNotFoundError(f"{paths[missing]} does not exist (image {missing + 1} of the protocol)")
    raw = raw_embedding_model(model)
    size = _crop_size(raw)
    if cache_dir is not None:
        _check_cache(cache_dir, {**(fingerprint or {}), "images": len(paths), "chunk_size": chunk_size,
                                 "crop_size": size})
    progress = keras.utils.Progbar(len(paths), verbose=verbose, unit_name="image")
    parts, flipped_parts = [], []
    for start in range(0, len(paths), chunk_size):
        end = min(start + chunk_size, len(paths))
        cached = None if cache_dir is None else os.path.join(cache_dir, f"chunk_{start:09d}_{end:09d}.npz")
        if cached is not None and os.path.exists(cached):
            with np.load(cached) as saved:
                parts.append(saved["embeddings"])
                flipped_parts.append(saved["flipped"])
            progress.add(end - start)
            continue
        outputs, flipped = [], []
        for batch in _dataset(paths[start:end], landmarks[start:end].astype(np.float64), size, batch_size):
            both = np.asarray(raw.predict_on_batch(batch), dtype=np.float32)
            half = len(both) // 2
            outputs.append(both[:half])
            flipped.append(both[half:])
            progress.add(half)
        parts.append(np.concatenate(outputs))
        flipped_parts.append(np.concatenate(flipped))
        if cached is not None:
            partial = cached + ".partial.npz"
            np.savez(partial, embeddings=parts[-1], flipped=flipped_parts[-1])
            os.replace(partial, cached)
    return np.concatenate(parts), np.concatenate(flipped_parts)
