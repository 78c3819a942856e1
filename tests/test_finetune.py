"""`faceid train --init_from`: a pretrained backbone, centres at identity means, frozen BN / backbone."""
import io

import keras
import numpy as np
import pytest
from PIL import Image

import tensorflow as tf

from faceid_keras import ArcFaceModel, data, finetune, prepare, training
from tfds_ms1m import insightface_folder, synthetic


def _tiny(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(32), keras.layers.BatchNormalization(),
    ], name="tiny")


def _arrays(folder):
    records = list(insightface_folder.iter_images(folder))
    images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, _, data in records])
    return images, np.array([label for _, label, _ in records])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def fresh(root):
    """The tiny architecture, untrained, saved as an embedding model."""
    ArcFaceModel(backbone=_tiny(1), num_classes=2).embedding_model().save(root / "fresh.keras")
    return root / "fresh.keras"


@pytest.fixture(scope="module")
def pretrained(root):
    """The tiny backbone trained on 32 synthetic identities (20 epochs of 8 images each)."""
    images, labels = _arrays(synthetic.write_dataset(root / "A", 32, 8, image_size=32, pairs_per_target=20,
                                                     targets=("lfw",), seed=1))
    model = ArcFaceModel(backbone=_tiny(0), num_classes=32)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(images, labels, batch_size=16, epochs=20, verbose=0)
    model.embedding_model().save(root / "pretrained.keras")
    return root / "pretrained.keras"


@pytest.fixture(scope="module")
def new_identities(root):
    """16 identities the pretrained model never saw, with 200 verification pairs of them."""
    return synthetic.write_dataset(root / "B", 16, 6, image_size=32, pairs_per_target=200,
                                   targets=("lfw",), seed=2)


def _train(data, model_dir, tfds_dir, **options):
    return training.train(training.TrainConfig(
        str(data), model_dir=str(model_dir), tfds_data_dir=str(tfds_dir), train_epochs=1, batch_size=16,
        lr=0.05, verbose=0, **{"targets": ("lfw",), **options}))


@pytest.mark.slow
def test_finetuning_beats_the_same_backbone_from_scratch(fresh, pretrained, new_identities, tmp_path):
    # "Scratch" is the same architecture with untrained weights through the same code path (its
    # centres start at means too): only the pretrained weights differ.
    tfds_dir = tmp_path / "tfds"
    scratch = _train(new_identities, tmp_path / "scratch", tfds_dir, init_from=str(fresh))
    moving_mean = finetune.load_backbone(str(pretrained)).layers[1].moving_mean.numpy()
    tuned = _train(new_identities, tmp_path / "tuned", tfds_dir, init_from=str(pretrained), freeze_bn=True)
    assert tuned.summary["lfw"] >= scratch.summary["lfw"] + 0.05, (tuned.summary, scratch.summary)
    assert tuned.summary["lfw"] >= 0.9
    np.testing.assert_array_equal(tuned.model.backbone.layers[1].moving_mean.numpy(), moving_mean)  # --freeze_bn


def test_centres_start_at_identity_means_and_backbone_can_stay_frozen(fresh, new_identities, tmp_path):
    backbone = finetune.load_backbone(str(fresh))
    model = ArcFaceModel(backbone=backbone, num_classes=16)
    tfds_dir = tmp_path / "tfds"
    prepare.prepare_tfds(str(new_identities), str(tfds_dir))
    assert finetune.init_centres(model, str(tfds_dir), (32, 32), batch_size=7) == 16
    records = list(insightface_folder.iter_images(new_identities))  # decoded as the input pipeline decodes
    images = np.stack([data.decode_image(tf.constant(image), None).numpy() for _, _, image in records])
    labels = np.array([label for _, label, _ in records])
    embeddings = model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)
    centres = model.head.centres.numpy()
    for label in range(16):
        mean = embeddings[labels == label].mean(axis=0)
        np.testing.assert_allclose(centres[label] / np.linalg.norm(centres[label]), mean / np.linalg.norm(mean),
                                   atol=1e-5)

    weights = [w.numpy() for w in backbone.weights]
    result = _train(new_identities, tmp_path / "run", tfds_dir, init_from=str(fresh), freeze_backbone_epochs=1,
                    targets=())
    for before, after in zip(weights, result.model.backbone.weights):
        np.testing.assert_array_equal(after.numpy(), before)


def test_freeze_backbone_unfreezes_after_its_epochs_and_keeps_bn_frozen(fresh):
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(32) % 4
    model = ArcFaceModel(backbone=finetune.load_backbone(str(fresh)), num_classes=4)
    assert finetune.freeze_batch_norm(model.backbone) == 3
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    kernel, moving_mean = model.backbone.layers[0].kernel, model.backbone.layers[1].moving_mean
    snapshots = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: snapshots.append((kernel.numpy(), moving_mean.numpy())))
    start = (kernel.numpy(), moving_mean.numpy())
    model.fit(images, labels, batch_size=16, epochs=2, verbose=0,
              callbacks=[finetune.FreezeBackbone(1, freeze_bn=True), record])
    np.testing.assert_array_equal(snapshots[0][0], start[0])  # epoch 1: head only
    assert not np.allclose(snapshots[1][0], start[0])  # epoch 2: the backbone trains
    np.testing.assert_array_equal(snapshots[1][1], start[1])  # its BatchNorm statistics do not


def test_init_from_refuses_other_sizes_and_models(fresh, tmp_path):
    backbone = finetune.load_backbone(str(fresh))
    with pytest.raises(finetune.InitFromError, match=r"takes 32x32 images .* pass --image_size 32"):
        finetune.check_image_size(backbone, (112, 112), "fresh.keras")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(finetune.InitFromError, match="found 0 nested models"):
        finetune.load_backbone(str(tmp_path / "plain.keras"))
