"""`faceid clean` end to end: a K=3 model, the dominant sub-centre, the dropped images and classes."""
import json

import keras
import numpy as np
import pytest

from faceid_keras import ArcFaceModel, cli
from faceid_keras.clean import CleanError
from tfds_ms1m import insightface_folder, recordio


def _images(folder):
    keys, labels, images = [], [], []
    for key, label, image in insightface_folder.iter_images(folder):
        keys.append(key)
        labels.append(label)
        images.append(image)
    return np.array(keys), np.array(labels), images


def test_clean_drops_far_images_and_empty_classes(synthetic_folder, tmp_path, capsys):
    import tensorflow as tf

    keys, labels, jpegs = _images(synthetic_folder)
    pixels = np.stack([tf.io.decode_jpeg(j, channels=3).numpy() for j in jpegs]).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    backbone = keras.Model(inputs, keras.layers.Dense(16)(keras.layers.Flatten()(inputs)))
    model = ArcFaceModel(backbone, num_classes=8, subcenters=3, scale=16.0, weight_decay=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.fit(pixels, labels, batch_size=16, epochs=3, verbose=0)
    model.save(tmp_path / "k3.keras")

    # Independently: nearest sub-centre per image, the class's most voted one, the angle to it.
    e = model.predict(pixels, verbose=0).astype("float64")
    w = model.head.centres.numpy().astype("float64").reshape(8, 3, -1)
    w /= np.linalg.norm(w, axis=2, keepdims=True)
    cos = np.einsum("nd,nkd->nk", e, w[labels])
    dominant = [np.bincount(cos[labels == c].argmax(axis=1), minlength=3).argmax() for c in range(8)]
    angles = np.degrees(np.arccos(cos[np.arange(len(labels)), np.array(dominant)[labels]]))
    per_class_min = np.array([angles[labels == c].min() for c in range(8)])
    emptied = int(per_class_min.argmax())
    max_angle = float(per_class_min[emptied] - 1e-3)  # that class loses every image, the others keep some
    assert 0 < max_angle < 180

    output = tmp_path / "clean"
    status = cli.main(["clean", str(tmp_path / "k3.keras"), "--data_path", str(synthetic_folder),
                       "--output", str(output), "--max_angle", repr(max_angle)])
    assert status == 0 and "report:" in capsys.readouterr().out
    report = json.loads((output / "clean_report.json").read_text())
    kept = angles <= max_angle
    assert not kept.all()
    assert report["dropped_classes"] == [emptied] and report["kept_classes"] == 7
    assert sorted(d["key"] for d in report["dropped"]) == sorted(keys[~kept].tolist())
    assert insightface_folder.read_property(output / "property") == (7, 32, 32)
    new_keys, new_labels, new_jpegs = _images(output)
    old_to_new = {old: new for new, old in enumerate(c for c in range(8) if c != emptied)}
    assert sorted(new_labels.tolist()) == sorted(old_to_new[c] for c in labels[kept])
    assert sorted(new_jpegs) == sorted(j for j, k in zip(jpegs, kept) if k)
    with recordio.RecordReader(output / "train.rec") as reader:  # identity records cover their images
        header, ranges, _ = recordio.unpack_header(reader.read(0))
        for new in range(7):
            _, (start, end), _ = recordio.unpack_header(reader.read(int(ranges[0]) + new))
            assert set(new_labels[(new_keys >= start) & (new_keys < end)]) == {new}
    assert (output / "lfw.bin").read_bytes() == (synthetic_folder / "lfw.bin").read_bytes()

    with pytest.raises(CleanError, match="not empty"):
        cli.main(["clean", str(tmp_path / "k3.keras"), "--data_path", str(synthetic_folder),
                  "--output", str(output)])
