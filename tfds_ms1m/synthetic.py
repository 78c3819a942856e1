"""Learnable synthetic faces written as a complete insightface folder (train.rec/.idx, property, .bin).

Each identity is a smooth pattern: a background colour, a low-frequency colour wave and a few
coloured Gaussian blobs, all drawn from a per-identity random state. Each image of an identity
shifts the pattern slightly, scales its brightness and adds pixel noise, then is JPEG-encoded.

Verification pairs use held-out images of the training identities: new renderings (their own random
stream, never written to train.rec) of identities the model was trained on, so a model trained on
the train split does better than chance. Pairs come in 10 folds, each fold holding its "same" pairs
and then its "different" pairs, as in the LFW protocol files the real packs follow.

Command line: `python -m tfds_ms1m.synthetic DIR --identities N --images K`.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from typing import Sequence, Union

import numpy as np
from etils import epath
from PIL import Image

from tfds_ms1m import binpack, insightface_folder, recordio, recordio_writer

PathLike = Union[str, os.PathLike]

_BLOBS = 5
_NUM_FOLDS = 10


class Identity:
    """One identity's smooth pattern, rendered at any small shift, brightness and noise level."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.background = rng.uniform(40, 215, size=3).astype(np.float32)
        self.wave_freq = (rng.uniform(0.5, 2.0, size=2) * rng.choice([-1, 1], size=2)).astype(np.float32)
        self.wave_phase = np.float32(rng.uniform(0, 2 * np.pi))
        self.wave_colour = rng.uniform(-50, 50, size=3).astype(np.float32)
        self.centres = rng.uniform(0.15, 0.85, size=(_BLOBS, 2)).astype(np.float32)
        self.sigmas = rng.uniform(0.08, 0.2, size=_BLOBS).astype(np.float32)
        self.colours = rng.uniform(-110, 110, size=(_BLOBS, 3)).astype(np.float32)

    def render(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Return one uint8 HxWx3 image with a random shift, brightness and noise."""
        shift = rng.uniform(-0.04, 0.04, size=2).astype(np.float32)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        y, x = coords - shift[0], coords - shift[1]
        wave = np.cos(
            2 * np.pi * (self.wave_freq[0] * y[:, None] + self.wave_freq[1] * x[None, :]) + self.wave_phase
        )
        image = self.background + wave[..., None] * self.wave_colour
        # Gaussian blobs are separable: (K, H) x (K, W) profiles, mixed by colour with one matmul.
        inv = 1.0 / (2 * self.sigmas * self.sigmas)
        gy = np.exp(-((y[None, :] - self.centres[:, :1]) ** 2) * inv[:, None])
        gx = np.exp(-((x[None, :] - self.centres[:, 1:]) ** 2) * inv[:, None])
        coloured = gy[:, :, None] * self.colours[:, None, :]
        blobs = coloured.reshape(_BLOBS, size * 3).T @ gx
        image = image + blobs.reshape(size, 3, size).transpose(0, 2, 1)
        image = image * rng.uniform(0.8, 1.2) + rng.standard_normal(image.shape, dtype=np.float32) * 6
        return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 HxWx3 image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _pairs(
    identities: list[Identity], num_pairs: int, image_size: int, rng: np.random.Generator, quality: int
) -> tuple[list[bytes], list[bool]]:
    """Render `num_pairs` pairs in 10 folds of (same pairs, then different pairs)."""
    images: list[bytes] = []
    issame: list[bool] = []
    per_fold = num_pairs // _NUM_FOLDS
    n = len(identities)
    for _ in range(_NUM_FOLDS):
        for same in (True, False):
            for _ in range(per_fold // 2):
                a = int(rng.integers(n))
                b = a if same else int((a + rng.integers(1, n)) % n)
                images.append(encode_jpeg(identities[a].render(image_size, rng), quality))
                images.append(encode_jpeg(identities[b].render(image_size, rng), quality))
                issame.append(same)
    return images, issame


def write_dataset(
    directory: PathLike,
    num_identities: int,
    images_per_identity: int,
    image_size: int = 112,
    pairs_per_target: int = 200,
    targets: Sequence[str] = ("lfw", "cfp_fp", "agedb_30"),
    seed: int = 0,
    jpeg_quality: int = 90,
) -> epath.Path:
    """Write an insightface-format folder of `num_identities` x `images_per_identity` synthetic faces.

    Returns the folder. Train records are keyed 1..N*K (identity-major), with the header record 0
    and one record per identity, as insightface's `train.rec`; `pairs_per_target` must be a positive
    multiple of 20 (10 folds, half same, half different).
    """
    if num_identities < 2:
        raise ValueError(f"num_identities={num_identities}: need at least 2 (pairs need two identities)")
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity={images_per_identity}: need at least 1")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: need at least 8 pixels")
    if pairs_per_target <= 0 or pairs_per_target % (2 * _NUM_FOLDS):
        raise ValueError(
            f"pairs_per_target={pairs_per_target}: must be a positive multiple of 20 "
            "(10 folds, each half same and half different pairs)"
        )
    unknown = [t for t in targets if t not in binpack.VERIFICATION_TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {binpack.VERIFICATION_TARGETS}")
    folder = epath.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    id_seed, train_seed, *target_seeds = root.spawn(2 + len(targets))
    identities = [Identity(np.random.default_rng(s)) for s in id_seed.spawn(num_identities)]

    num_images = num_identities * images_per_identity
    id_start = num_images + 1
    rng = np.random.default_rng(train_seed)
    with recordio_writer.RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, recordio.pack_record([id_start, id_start + num_identities], b"", id=0))
        key = 1
        for label, identity in enumerate(identities):
            for _ in range(images_per_identity):
                jpeg = encode_jpeg(identity.render(image_size, rng), jpeg_quality)
                writer.write(key, recordio.pack_record(label, jpeg, id=key))
                key += 1
        for label in range(num_identities):
            start = 1 + label * images_per_identity
            writer.write(
                id_start + label,
                recordio.pack_record([start, start + images_per_identity], b"", id=id_start + label),
            )
    insightface_folder.write_property(folder / "property", num_identities, image_size, image_size)
    for target, target_seed in zip(targets, target_seeds):
        images, issame = _pairs(
            identities, pairs_per_target, image_size, np.random.default_rng(target_seed), jpeg_quality
        )
        binpack.write_bin(folder / f"{target}.bin", images, issame)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a synthetic insightface folder."""
    parser = argparse.ArgumentParser(
        prog="python -m tfds_ms1m.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directory", help="output folder (created if missing)")
    parser.add_argument("--identities", type=int, required=True, help="number of identities")
    parser.add_argument("--images", type=int, required=True, help="images per identity")
    parser.add_argument("--image_size", type=int, default=112, help="square side in pixels")
    parser.add_argument("--pairs", type=int, default=200, help="pairs per verification pack (multiple of 20)")
    parser.add_argument(
        "--targets", default="lfw,cfp_fp,agedb_30", help="comma-separated verification packs to write"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    targets = [t for t in args.targets.split(",") if t]
    try:
        folder = write_dataset(
            args.directory, args.identities, args.images, image_size=args.image_size,
            pairs_per_target=args.pairs, targets=targets, seed=args.seed,
        )
    except ValueError as e:
        parser.error(str(e))
    print(
        f"wrote {args.identities * args.images} images of {args.identities} identities and "
        f"{len(targets)} verification packs to {folder} in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
