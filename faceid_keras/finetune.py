"""Fine-tuning from a saved model: `faceid train --init_from MODEL [--freeze_bn] [--freeze_backbone_epochs N]`.

The backbone comes from a saved `.keras` of ours: an `ArcFaceModel`, or an embedding model as
`ArcFaceModel.embedding_model()` saves it (and `faceid import` writes from insightface's ONNX):
pixel scaling, the backbone (a nested Keras model), L2 normalisation. The new identities' class
centres start at each identity's mean unit embedding under that backbone (one pass over the
training images), so the margin head starts near the solution instead of at chance and the
first steps do not push the pretrained backbone around with random centres' gradients.
"""
from __future__ import annotations

import keras
import numpy as np

from faceid_keras import data
from faceid_keras.model import ArcFaceModel, backbone_of


class InitFromError(ValueError):
    """A model file that cannot supply a backbone to fine-tune."""


def load_backbone(path: str) -> keras.Model:
    """The backbone (pixels scaled to [-1, 1] -> raw embedding) of a saved ArcFaceModel or embedding model."""
    model = keras.models.load_model(path)
    backbone = backbone_of(model)
    if backbone is None:
        nested = sum(isinstance(layer, keras.Model) for layer in model.layers)
        raise InitFromError(
            f"{path}: expected an ArcFaceModel or an embedding model holding one backbone model "
            f"(as ArcFaceModel.embedding_model() saves it); found {nested} nested models in "
            f"{type(model).__name__} {model.name!r}."
        )
    return backbone


def check_image_size(backbone: keras.Model, image_size: tuple[int, int], path: str) -> None:
    """Raises unless the backbone takes images of the training size."""
    expected = tuple(backbone.inputs[0].shape[1:3])
    if expected != tuple(image_size):
        raise InitFromError(
            f"{path}: its backbone takes {expected[0]}x{expected[1]} images but training runs at "
            f"{image_size[0]}x{image_size[1]}; pass --image_size {expected[0]}."
        )


def _layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def freeze_batch_norm(model: keras.Model) -> int:
    """Freezes every BatchNormalization layer (statistics, scale and offset); returns how many."""
    count = 0
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def mean_embeddings(model: ArcFaceModel, dataset, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised mean unit embedding [C, dim], image count [C]) per label over (images, labels) batches.

    Each image counts with its mirror image, so the means do not depend on the pipeline's random flips.
    """
    sums = np.zeros((num_classes, model.embedding_size), dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for images, labels in dataset:
        embeddings = np.asarray(model(images, training=False), dtype=np.float64)
        embeddings += np.asarray(model(images[:, :, ::-1], training=False), dtype=np.float64)
        labels = np.asarray(labels)
        np.add.at(sums, labels, embeddings)
        np.add.at(counts, labels, 1)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return sums / np.maximum(norms, 1e-12), counts


def init_centres(model: ArcFaceModel, data_dir: str, image_size: tuple[int, int], batch_size: int) -> int:
    """Sets each class centre to its identity's mean embedding (one pass over the training split).

    Identities without a training image keep their random centre. Returns how many were set.
    """
    if model.shard_centres:
        raise InitFromError("--init_from with --shard_centres: sharded centres cannot be initialised yet.")
    # Every image once, in file order (batches of one image, then regrouped: no remainder dropped).
    images = data.train_dataset(data_dir, 1, shuffle_buffer=0, seed=0, image_size=image_size)
    dataset = images.unbatch().batch(batch_size)
    means, counts = mean_embeddings(model, dataset, model.num_classes)
    centres = np.asarray(model.head.centres.numpy(), dtype=np.float64)
    seen = counts > 0
    scale = np.linalg.norm(centres, axis=1, keepdims=True)  # keeps the initialiser's magnitude
    centres[seen] = means[seen] * scale[seen]
    model.head.centres.assign(centres.astype(np.float32))
    return int(seen.sum())


class FreezeBackbone(keras.callbacks.Callback):
    """Trains the margin head alone for the first `epochs` epochs, then the whole model.

    The optimizer is built over every trainable variable before the backbone is frozen, so it holds
    the backbone's slots when it is unfrozen; the train step is retraced at each switch. Unfreezing
    sets every backbone layer trainable, so with `freeze_bn` the BatchNorm layers are frozen again.
    """

    def __init__(self, epochs: int, freeze_bn: bool = False) -> None:
        super().__init__()
        self.epochs = epochs
        self.freeze_bn = freeze_bn

    def on_train_begin(self, logs=None) -> None:
        optimizer = self.model.optimizer
        if not getattr(optimizer, "built", getattr(optimizer, "_built", False)):
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        frozen = epoch < self.epochs
        backbone = self.model.backbone
        if backbone.trainable == (not frozen):
            return
        backbone.trainable = not frozen
        if not frozen and self.freeze_bn:
            freeze_batch_norm(backbone)
        self.model.make_train_function(force=True)
        print(f"Epoch {epoch + 1}: {'margin head only (backbone frozen)' if frozen else 'backbone unfrozen'}")
