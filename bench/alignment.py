"""Face alignment speed and fidelity: faceid_keras.alignment vs insightface's recipe (OpenCV).

The reference is what `insightface.utils.face_align.norm_crop` runs: scikit-image's
`SimilarityTransform` estimate, then `cv2.warpAffine` per image. Ours estimates all transforms in
one vectorised NumPy pass, then warps with `cv2.warpAffine`. The alternative we measured and did
not take, TensorFlow's ImageProjectiveTransformV3 on float pixels rounded to nearest (no OpenCV,
runs on the device), is timed too. Prints images/s of each, ratios to the reference, and the
largest pixel difference of each from the reference.

    python bench/alignment.py [--images 512] [--size 112] [--rounds 5]

Needs scikit-image (the reference only).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from skimage.transform import SimilarityTransform  # noqa: E402

from faceid_keras import alignment  # noqa: E402


def faces(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth 250x250 images and landmarks from random similarities of the template, with noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 250, 250, 3), dtype=np.uint8)
    images = np.stack([cv2.GaussianBlur(image, (0, 0), 2.0) for image in images])
    angles, scales = rng.uniform(-0.5, 0.5, count), rng.uniform(0.8, 2.0, count)
    rotations = scales[:, None, None] * np.stack(
        [np.stack([np.cos(angles), -np.sin(angles)], -1), np.stack([np.sin(angles), np.cos(angles)], -1)], 1)
    landmarks = np.einsum("kj,nij->nki", alignment.ARCFACE_TEMPLATE, rotations)
    landmarks += rng.uniform(20, 90, (count, 1, 2)) + rng.normal(0, 2, (count, 5, 2))
    return images, landmarks


def reference(images: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    crops = []
    for image, points in zip(images, landmarks):
        matrix = SimilarityTransform.from_estimate(points, alignment.template(size)).params[:2]
        crops.append(cv2.warpAffine(image, matrix, (size, size), borderValue=0.0))
    return np.stack(crops)


def tensorflow_warp(images: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """The TF alternative: the inverse maps as projective rows, one op for the batch, rounded."""
    transforms = alignment.estimate_transforms(landmarks, size)
    inverse = np.linalg.inv(transforms[:, :, :2])
    offset = -np.einsum("nij,nj->ni", inverse, transforms[:, :, 2])
    rows = np.concatenate([inverse, offset[:, :, None]], axis=2).reshape((-1, 6))
    rows = np.concatenate([rows, np.zeros((len(rows), 2))], axis=1).astype(np.float32)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=rows, output_shape=[size, size],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.cast(tf.clip_by_value(tf.round(warped), 0, 255), tf.uint8).numpy()


def rate(function, rounds: int, count: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    images, landmarks = faces(args.images)
    expected = reference(images, landmarks, args.size).astype(int)
    reference_rate = rate(lambda: reference(images, landmarks, args.size), args.rounds, args.images)
    print(f"skimage + cv2.warpAffine (insightface): {reference_rate:,.0f} img/s")
    for name, function in (("faceid_keras.alignment", alignment.align_faces), ("TF projective op", tensorflow_warp)):
        difference = np.abs(function(images, landmarks, args.size).astype(int) - expected)
        speed = rate(lambda: function(images, landmarks, args.size), args.rounds, args.images)
        print(f"{name}: {speed:,.0f} img/s, ratio {speed / reference_rate:.2f}; pixel difference max "
              f"{difference.max()}, differing {np.mean(difference > 0):.2e} of values")


if __name__ == "__main__":
    main()
