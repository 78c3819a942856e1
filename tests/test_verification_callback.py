"""VerificationCallback inside a real fit: logs, printed lines, ModelCheckpoint and best-model saving."""
import io
import re

import keras
import numpy as np
import pytest
from PIL import Image

from callbacks import VerificationCallback
from faceid_keras import ArcFaceModel
from tfds_ms1m.binpack import write_bin


def _backbone():
    return keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(8)], name="tiny_backbone"
    )


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), np.arange(20) % 2 == 0


@pytest.fixture(scope="module")
def train_data():
    rng = np.random.default_rng(1)
    images = (rng.random((32, 16, 16, 3)).astype("float32") - 0.5) / 0.5
    return images, rng.integers(0, 4, 32)


def _arcface_model():
    model = ArcFaceModel(backbone=_backbone(), num_classes=4, scale=16.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model


def test_fit_logs_reach_history_and_checkpoint(pairs, train_data, tmp_path, capsys):
    # Keras 2.13's ModelCheckpoint(save_best_only=True) cannot write .keras files; weights work on both.
    checkpoint = tmp_path / "best_lfw.weights.h5"
    model = _arcface_model()
    history = model.fit(
        *train_data,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[
            VerificationCallback(targets={"lfw": pairs, "agedb_30": pairs}, batch_size=16),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor="lfw_accuracy", mode="max", save_best_only=True, save_weights_only=True
            ),
        ],
    )
    for key in ("lfw_accuracy", "lfw_accuracy_std", "lfw_val", "lfw_val_std", "lfw_far", "lfw_auc",
                "agedb_30_accuracy", "verification_accuracy"):
        assert len(history.history[key]) == 2, key
    assert history.history["verification_accuracy"] == history.history["lfw_accuracy"]
    assert checkpoint.exists()
    lines = capsys.readouterr().out.splitlines()
    pattern = r"\[(lfw|agedb_30)\]\[epoch [12]\] accuracy \d\.\d{4} \+- \d\.\d{4}  VAL@FAR=1e-3 \d\.\d{4}  AUC \d\.\d{4}"
    assert sum(bool(re.fullmatch(pattern, line)) for line in lines) == 4


def test_every_n_epochs_and_save_best(pairs, train_data, tmp_path, capsys):
    best = tmp_path / "best.keras"
    model = keras.Sequential([_backbone(), keras.layers.UnitNormalization()])
    model.compile(optimizer="sgd", loss="mse")
    callback = VerificationCallback({"lfw": pairs}, every_n_epochs=2, save_best=best, monitor="lfw_auc")
    history = model.fit(train_data[0], np.zeros((32, 8)), epochs=3, verbose=0, callbacks=[callback])
    assert len(history.history["lfw_accuracy"]) == 1  # only epoch 2 was evaluated
    out = capsys.readouterr().out
    assert "[lfw][epoch 2]" in out and "[lfw][epoch 1]" not in out and "[lfw][epoch 3]" not in out
    assert callback.best == history.history["lfw_auc"][0]
    restored = keras.models.load_model(best)
    np.testing.assert_allclose(restored.predict(train_data[0][:2], verbose=0),
                               model.predict(train_data[0][:2], verbose=0), atol=1e-6)


def test_targets_from_a_data_path(pairs, tmp_path):
    images, issame = pairs
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    write_bin(tmp_path / "lfw.bin", encoded, issame)
    callback = VerificationCallback(tmp_path, names=["lfw"])
    np.testing.assert_array_equal(callback.targets["lfw"][0], images)
    with pytest.raises(FileNotFoundError, match="cfp_fp.bin does not exist; targets found: lfw"):
        VerificationCallback(tmp_path, names=["lfw", "cfp_fp"])


def test_argument_validation(pairs):
    with pytest.raises(ValueError, match="monitor must be one of"):
        VerificationCallback({"lfw": pairs}, monitor="cfp_fp_accuracy")
    with pytest.raises(ValueError, match=r"\.keras"):
        VerificationCallback({"lfw": pairs}, save_best="best.h5")
    with pytest.raises(ValueError, match="every_n_epochs"):
        VerificationCallback({"lfw": pairs}, every_n_epochs=0)
    with pytest.raises(ValueError, match="expected 40 images for 20 pairs"):
        VerificationCallback({"lfw": (pairs[0][:10], pairs[1])})
