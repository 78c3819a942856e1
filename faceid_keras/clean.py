"""`faceid clean`: drop the samples of an insightface folder far from their class's dominant sub-centre.

Sub-center ArcFace's recipe (Deng et al., ECCV 2020) for a noisy set such as MS1M: train with K
sub-centres per class (`faceid train --subcenters 3`), embed every training image, find each
class's dominant sub-centre (the one most of its images are nearest to), drop the images whose
angle to it exceeds `--max_angle` degrees (75 in the paper), then retrain with one centre per
class on the cleaned folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Iterator

import numpy as np

from faceid_keras.argtypes import positive_int
from tfds_ms1m import insightface_folder, recordio, recordio_writer


class CleanError(ValueError):
    """Raised for a model or folder that cannot be cleaned, naming the file and the problem."""


def _batches(folder: str, size: int) -> Iterator[tuple[list[int], np.ndarray, list[bytes]]]:
    keys, labels, images = [], [], []
    for key, label, image in insightface_folder.iter_images(folder):
        keys.append(key)
        labels.append(label)
        images.append(image)
        if len(keys) == size:
            yield keys, np.asarray(labels, "int64"), images
            keys, labels, images = [], [], []
    if keys:
        yield keys, np.asarray(labels, "int64"), images


def subcentre_cosines(model, folder: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, labels, cosines (N, K)) of every image of `folder` against its class's K sub-centres."""
    import tensorflow as tf

    from faceid_keras import compat

    head = model.head
    subcenters = head.subcenters
    centres = compat.to_numpy(head.centres).astype("float64")
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    centres = centres.reshape(head.num_classes, subcenters, -1)
    all_keys, all_labels, all_cosines = [], [], []
    for keys, labels, images in _batches(folder, batch_size):
        if labels.min() < 0 or labels.max() >= head.num_classes:
            raise CleanError(f"{folder}/train.rec: labels {labels.min()}..{labels.max()} outside the model's "
                             f"{head.num_classes} classes")
        pixels = tf.stack([tf.io.decode_jpeg(image, channels=3) for image in images])
        if tuple(pixels.shape[1:]) != tuple(model.image_shape):
            raise CleanError(f"{folder}/train.rec: images are {tuple(pixels.shape[1:])}, the model takes "
                             f"{tuple(model.image_shape)}")
        embeddings = compat.to_numpy(model(pixels, training=False)).astype("float64")
        all_cosines.append(np.einsum("nd,nkd->nk", embeddings, centres[labels]))
        all_keys.extend(keys)
        all_labels.append(labels)
    if not all_keys:
        raise CleanError(f"{folder}/train.rec: no image records")
    return np.asarray(all_keys), np.concatenate(all_labels), np.concatenate(all_cosines)


def select(labels: np.ndarray, cosines: np.ndarray, num_classes: int, max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, angle in degrees to the dominant sub-centre) of each sample."""
    nearest = np.argmax(cosines, axis=1)
    votes = np.zeros((num_classes, cosines.shape[1]), "int64")
    np.add.at(votes, (labels, nearest), 1)
    dominant = np.argmax(votes, axis=1)
    cosine = cosines[np.arange(len(labels)), dominant[labels]]
    angles = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    return angles <= max_angle, angles


def write_clean_folder(source: str, output: str, keys: np.ndarray, labels: np.ndarray, size: tuple) -> list[int]:
    """Writes train.rec/.idx/property with the images `keys` (of classes `labels`), classes renumbered
    densely in order and their images contiguous, as insightface's layout; copies the verification
    packs. Streams the records; returns the kept old classes in their new order."""
    classes = np.unique(labels)
    new_labels = np.searchsorted(classes, labels)
    order = np.lexsort((keys, new_labels))
    keys, new_labels = keys[order], new_labels[order]
    id_start = len(keys) + 1
    starts = 1 + np.searchsorted(new_labels, np.arange(len(classes) + 1))
    with recordio.RecordReader(os.path.join(source, "train.rec"), os.path.join(source, "train.idx")) as reader, \
            recordio_writer.RecordWriter(os.path.join(output, "train.rec"), os.path.join(output, "train.idx")) as writer:
        writer.write(0, recordio.pack_record([id_start, id_start + len(classes)], b"", id=0))
        for chunk in range(0, len(keys), 4096):
            records = reader.read_many(keys[chunk : chunk + 4096])
            for new_key, (key, payload) in enumerate(records, start=chunk + 1):
                _, image = recordio.unpack_image(payload, f"{reader.name}: record key {key}")
                writer.write(new_key, recordio.pack_record(int(new_labels[new_key - 1]), image, id=new_key))
        for new in range(len(classes)):
            writer.write(id_start + new, recordio.pack_record([starts[new], starts[new + 1]], b"", id=id_start + new))
    insightface_folder.write_property(os.path.join(output, "property"), len(classes), *size)
    for name in sorted(os.listdir(source)):
        if name.endswith(".bin"):
            shutil.copyfile(os.path.join(source, name), os.path.join(output, name))
    return classes.tolist()


def clean(model_path: str, data_path: str, output: str, max_angle: float = 75.0, batch_size: int = 64) -> dict:
    """Writes a cleaned copy of the insightface folder `data_path` to `output`; returns the report."""
    import keras

    if not 0 < max_angle <= 180:
        raise CleanError(f"max_angle must be in (0, 180] degrees, got {max_angle}")
    if os.path.exists(output) and os.listdir(output):
        raise CleanError(f"{output}: exists and is not empty; give a new folder for the cleaned data")
    if os.path.abspath(output) == os.path.abspath(data_path):
        raise CleanError(f"{output}: the output must differ from --data_path")
    num_classes, height, width = insightface_folder.read_property(os.path.join(data_path, "property"))
    model = keras.models.load_model(model_path)
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "subcenters"):
        raise CleanError(f"{model_path}: not an ArcFaceModel training model (it has no margin head)")
    if head.num_classes != num_classes:
        raise CleanError(f"{model_path}: the model has {head.num_classes} classes, {data_path}/property "
                         f"{num_classes}")
    keys, labels, cosines = subcentre_cosines(model, data_path, batch_size)
    keep, angles = select(labels, cosines, num_classes, max_angle)
    if not keep.any():
        raise CleanError(f"{data_path}: every image lies farther than {max_angle} degrees from its class's "
                         "dominant sub-centre; nothing to write")
    os.makedirs(output, exist_ok=True)
    kept_classes = write_clean_folder(data_path, output, keys[keep], labels[keep], (height, width))
    dropped = np.flatnonzero(~keep)
    report = {
        "model": model_path,
        "data_path": data_path,
        "subcenters": int(head.subcenters),
        "max_angle": max_angle,
        "images": int(len(keys)),
        "kept_images": int(keep.sum()),
        "dropped_images": int(len(dropped)),
        "classes": int(num_classes),
        "kept_classes": len(kept_classes),
        "dropped_classes": sorted(set(range(num_classes)) - set(kept_classes)),
        "new_class_of_old": {str(old): new for new, old in enumerate(kept_classes)},
        "dropped": [{"key": int(keys[i]), "class": int(labels[i]), "angle": round(float(angles[i]), 2)}
                    for i in dropped],
    }
    with open(os.path.join(output, "clean_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _positive_angle(text: str) -> float:
    value = float(text)
    if not 0 < value <= 180 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be an angle in (0, 180] degrees, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """`faceid clean`: cleans, prints a one-line summary; status 0."""
    report = clean(args.model, args.data_path, args.output, args.max_angle, args.batch_size)
    print(f"kept {report['kept_images']} of {report['images']} images and {report['kept_classes']} of "
          f"{report['classes']} classes (max angle {report['max_angle']} degrees); report: "
          f"{os.path.join(args.output, 'clean_report.json')}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the ``clean`` subcommand on a ``faceid`` subparsers object."""
    parser = subparsers.add_parser(
        "clean",
        help="drop training images far from their class's dominant sub-centre (sub-center ArcFace)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("model", help="a .keras training model (ArcFaceModel), e.g. trained with --subcenters 3")
    parser.add_argument("--data_path", required=True, help="insightface folder (train.rec, train.idx, property)")
    parser.add_argument("--output", required=True, help="new folder for the cleaned insightface folder")
    parser.add_argument("--max_angle", type=_positive_angle, default=75.0,
                        help="largest angle in degrees to the dominant sub-centre kept (default: 75)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images embedded at once")
    parser.set_defaults(func=run)
    return parser
