"""Embeddings for verification: f(x) + f(flip(x)), L2-normalised, batched through the model.

The model takes [0, 255] pixels and normalises them itself (`ArcFaceModel` and its
`embedding_model()` do); `verify` embeds a set of pairs and runs `faceid_keras.verification`'s
protocol on them.
"""
from __future__ import annotations

import numpy as np

from faceid_keras.verification import evaluate


def model_image_size(model) -> tuple[int, int] | None:
    """(height, width) the model takes, or None when its input size is not fixed or not known.

    Functional and Sequential models expose ``input_shape``; subclassed models such as
    ArcFaceModel keep ``input_shape`` (without the batch axis) in their config.
    """
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        try:
            shape = model.get_config().get("input_shape")
        except NotImplementedError:
            shape = None
        shape = None if shape is None else (None, *shape)
    if isinstance(shape, list):
        shape = shape[0]
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def embed(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalised f(x) + f(flip(x)) for uint8 images [N, H, W, 3], as float64 [N, dim].

    The model gets float32 pixels in [0, 255] and normalises them itself, as `ArcFaceModel` and
    its `embedding_model()` do. Images whose size differs from the model's fixed input size are
    resized (bilinear) to it.
    """
    import tensorflow as tf

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"Expected uint8 images [N, H, W, 3], got dtype {images.dtype} shape {images.shape}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    size = model_image_size(model)

    def prepare(batch):
        batch = tf.cast(batch, tf.float32)
        if size is not None and tuple(images.shape[1:3]) != size:
            batch = tf.image.resize(batch, size)
        # One forward pass per batch: the images, then their mirror images.
        return tf.concat([batch, tf.reverse(batch, axis=[2])], axis=0)

    dataset = (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(batch_size)
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    outputs = np.asarray(model.predict(dataset, verbose=0), dtype=np.float64)
    if outputs.ndim != 2 or len(outputs) != 2 * len(images):
        raise ValueError(
            f"Expected the model to return one embedding per image, got output shape {outputs.shape} "
            f"for {2 * len(images)} images."
        )
    starts = np.arange(0, len(images), batch_size)
    pieces = []
    for start in starts:
        count = min(batch_size, len(images) - start)
        chunk = outputs[2 * start : 2 * start + 2 * count]
        pieces.append(chunk[:count] + chunk[count:])
    summed = np.concatenate(pieces) if pieces else np.zeros((0, outputs.shape[-1]))
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return summed / np.maximum(norms, 1e-12)


def verify(model, images: np.ndarray, issame: np.ndarray, batch_size: int = 64) -> dict:
    """Embeds the 2N images of N pairs (pair i = images 2i, 2i+1) and runs the protocol."""
    issame = np.asarray(issame, dtype=bool)
    if len(images) != 2 * len(issame):
        raise ValueError(f"Expected {2 * len(issame)} images for {len(issame)} pairs, got {len(images)}.")
    embeddings = embed(model, images, batch_size)
    return evaluate(embeddings[0::2], embeddings[1::2], issame)
