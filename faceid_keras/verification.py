"""Face verification on lfw / cfp_fp / agedb_30 pairs, following insightface's protocol exactly.

Protocol (see DESIGN.md, "Verification protocol"):

- Images are scaled to (x / 255 - 0.5) / 0.5 (by the model: `ArcFaceModel` and its embedding
  model take [0, 255] pixels); the embedding of an image is f(x) + f(flip(x)), L2-normalised
  (flip = left-right mirror).
- The distance of a pair is the squared L2 distance of its two embeddings; a pair is predicted
  "same" when ``dist < threshold``.
- The pairs are cut into 10 contiguous folds in order (scikit-learn's ``KFold(10, shuffle=False)``:
  the first ``n % 10`` folds hold one pair more). For each fold the threshold is the first argmax of
  the accuracy on the other nine folds over thresholds 0, 0.01, ..., 3.99 and is applied to the fold;
  accuracy is the mean and (population, ddof 0) std of the ten fold accuracies.
- VAL@FAR=1e-3: on the nine training folds the false accept rate is computed for thresholds
  0, 0.001, ..., 3.999 and the threshold reaching FAR = 1e-3 is found by linear interpolation of
  threshold against FAR (threshold 0 when the FAR never reaches the target); VAL and FAR are then
  measured on the held-out fold and averaged.
- The ROC is insightface's: TPR and FPR of each held-out fold at every accuracy threshold,
  averaged over folds. AUC is the trapezoid area under that curve, closed at (1, 1).

Rates without a denominator (no same pairs, or no different pairs, in a fold) count as 0, the
convention insightface uses for TPR/FPR. insightface interpolates the FAR threshold with
``scipy.interpolate.interp1d(far, thresholds, kind="slinear")``, whose result on repeated FAR values
(scipy < 1.9; newer releases refuse them) is reproduced here: the segment used starts at the last
FAR value <= the target; a zero-length final segment yields threshold 0.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3
DEFAULT_TARGETS = ("lfw", "cfp_fp", "agedb_30")


def fold_slices(num_pairs: int, nrof_folds: int = 10) -> list[slice]:
    """Contiguous test folds in pair order; the first ``num_pairs % nrof_folds`` get one extra pair."""
    if nrof_folds < 2:
        raise ValueError(f"nrof_folds must be at least 2, got {nrof_folds}.")
    if num_pairs < nrof_folds:
        raise ValueError(f"Cannot split {num_pairs} pairs into {nrof_folds} folds.")
    sizes = np.full(nrof_folds, num_pairs // nrof_folds)
    sizes[: num_pairs % nrof_folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance between row i of ``embeddings1`` and row i of ``embeddings2``."""
    embeddings1 = np.asarray(embeddings1, dtype=np.float64)
    embeddings2 = np.asarray(embeddings2, dtype=np.float64)
    if embeddings1.ndim != 2 or embeddings1.shape != embeddings2.shape:
        raise ValueError(
            "Expected two embedding matrices of the same shape [pairs, dim], got "
            f"{embeddings1.shape} and {embeddings2.shape}."
        )
    return np.sum(np.square(embeddings1 - embeddings2), axis=1)


def _count_below(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[2, T] counts of same (row 0) and different (row 1) pairs with ``dist < threshold``."""
    same = np.searchsorted(np.sort(dist[issame]), thresholds, side="left")
    diff = np.searchsorted(np.sort(dist[~issame]), thresholds, side="left")
    return np.stack([same, diff])


def _rate(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """count / total with 0 where total is 0."""
    count = np.asarray(count, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    return np.divide(count, total, out=np.zeros(np.broadcast(count, total).shape), where=total > 0)


def interpolate_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which the non-decreasing ``far`` curve reaches ``far_target`` (0 if it never does).

    Reproduces insightface's degree-1 spline interpolation of thresholds against FAR.
    """
    if far.max() < far_target:
        return 0.0
    lo = min(int(np.searchsorted(far, far_target, side="right")) - 1, len(far) - 2)
    hi = lo + 1
    if far[hi] == far[lo]:
        return 0.0
    weight = 1.0 / (far[hi] - far[lo])
    return float(
        thresholds[lo] * (weight * (far[hi] - far_target))
        + thresholds[hi] * (weight * (far_target - far[lo]))
    )


def _validate_pairs(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame)
    if dist.ndim != 1 or issame.shape != dist.shape:
        raise ValueError(
            f"Expected 1-d distances and labels of the same length, got {dist.shape} and "
            f"{issame.shape}."
        )
    if issame.dtype != bool:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame must hold booleans (or 0/1).")
        issame = issame.astype(bool)
    if not np.isfinite(dist).all() or (dist < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(dist) | (dist < 0))[0])
        raise ValueError(f"Distances must be finite and >= 0; pair {bad} has {dist[bad]}.")
    return dist, issame


def evaluate_distances(
    dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10, far_target: float = FAR_TARGET
) -> dict:
    """Runs the verification protocol on pair distances (squared L2) and same/different labels.

    Returns a dict: pairs, accuracy, accuracy_std, fold_accuracies, fold_thresholds; threshold and
    best_accuracy (the single best threshold for all pairs together and its accuracy); val,
    val_std, far, fold_val, fold_far, val_thresholds (VAL@FAR=far_target); tpr and fpr (the ROC
    over ACCURACY_THRESHOLDS, averaged over folds) and auc.
    """
    dist, issame = _validate_pairs(dist, issame)
    folds = fold_slices(len(dist), nrof_folds)
    # Counts below every threshold, per held-out fold; a training set's counts are total - fold.
    test_counts = np.stack([_count_below(dist[f], issame[f], ACCURACY_THRESHOLDS) for f in folds])
    test_val_counts = np.stack([_count_below(dist[f], issame[f], VAL_THRESHOLDS) for f in folds])
    fold_same = np.array([[issame[f].sum(), (~issame[f]).sum()] for f in folds])  # [F, 2]
    fold_sizes = fold_same.sum(axis=1)
    train_counts = test_counts.sum(axis=0) - test_counts
    train_val_counts = test_val_counts.sum(axis=0) - test_val_counts
    train_same = fold_same.sum(axis=0) - fold_same

    # Accuracy: correct = same pairs below the threshold + different pairs at or above it.
    train_correct = train_counts[:, 0] + (train_same[:, 1:2] - train_counts[:, 1])
    best = np.argmax(train_correct, axis=1)  # first argmax of accuracy: one denominator per fold
    rows = np.arange(len(folds))
    test_correct = test_counts[rows, 0, best] + fold_same[:, 1] - test_counts[rows, 1, best]
    fold_accuracies = test_correct / fold_sizes
    tpr = _rate(test_counts[:, 0], fold_same[:, 0:1]).mean(axis=0)
    fpr = _rate(test_counts[:, 1], fold_same[:, 1:2]).mean(axis=0)

    total_counts = test_counts.sum(axis=0)
    all_correct = total_counts[0] + fold_same[:, 1].sum() - total_counts[1]
    overall_best = int(np.argmax(all_correct))

    fold_val, fold_far, val_thresholds = [], [], []
    for i, f in enumerate(folds):
        far_train = _rate(train_val_counts[i, 1], train_same[i, 1])
        threshold = interpolate_threshold(far_train, VAL_THRESHOLDS, far_target)
        below = dist[f] < threshold
        fold_val.append(_rate(np.sum(below & issame[f]), fold_same[i, 0]))
        fold_far.append(_rate(np.sum(below & ~issame[f]), fold_same[i, 1]))
        val_thresholds.append(threshold)
    fold_val = np.array(fold_val, dtype=np.float64)

    roc_fpr = np.append(fpr, 1.0)
    roc_tpr = np.append(tpr, 1.0)
    auc = float(np.sum(np.diff(roc_fpr) * (roc_tpr[1:] + roc_tpr[:-1]) / 2.0))
    return {
        "pairs": len(dist),
        "accuracy": float(np.mean(fold_accuracies)),
        "accuracy_std": float(np.std(fold_accuracies)),
        "fold_accuracies": fold_accuracies,
        "fold_thresholds": ACCURACY_THRESHOLDS[best],
        "threshold": float(ACCURACY_THRESHOLDS[overall_best]),
        "best_accuracy": float(all_correct[overall_best] / len(dist)),
        "val": float(np.mean(fold_val)),
        "val_std": float(np.std(fold_val)),
        "far": float(np.mean(fold_far)),
        "fold_val": fold_val,
        "fold_far": np.array(fold_far, dtype=np.float64),
        "val_thresholds": np.array(val_thresholds, dtype=np.float64),
        "tpr": tpr,
        "fpr": fpr,
        "auc": auc,
    }


def evaluate(
    embeddings1: np.ndarray, embeddings2: np.ndarray, issame: np.ndarray, nrof_folds: int = 10
) -> dict:
    """Runs the verification protocol on the embeddings of the two sides of every pair."""
    return evaluate_distances(pair_distances(embeddings1, embeddings2), issame, nrof_folds)


def _model_image_size(model) -> tuple[int, int] | None:
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
    size = _model_image_size(model)

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
    """The newest prepared ms1m_arcface/verification version folder under a tfds data dir."""
    import tensorflow as tf

    root = os.path.join(os.fspath(data_path), "ms1m_arcface", "verification")
    if not tf.io.gfile.isdir(root):
        return None
    versions = []
    for name in tf.io.gfile.listdir(root):
        name = name.rstrip("/")
        parts = name.split(".")
        if all(p.isdigit() for p in parts) and tf.io.gfile.exists(
            os.path.join(root, name, "dataset_info.json")
        ):
            versions.append((tuple(int(p) for p in parts), name))
    return os.path.join(root, max(versions)[1]) if versions else None


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
    import tensorflow as tf

    builder_dir = _tfds_verification_dir(data_path)
    if builder_dir is not None:
        import tensorflow_datasets as tfds

        return sorted(tfds.builder_from_directory(builder_dir).info.splits)
    if not tf.io.gfile.isdir(os.fspath(data_path)):
        raise FileNotFoundError(f"{data_path}: no such directory.")
    return sorted(n[: -len(".bin")] for n in tf.io.gfile.listdir(os.fspath(data_path)) if n.endswith(".bin"))


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
