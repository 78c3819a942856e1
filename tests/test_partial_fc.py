"""Partial FC: the sampled margin head against the full head, sparse updates, learning, replicas."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from faceid_keras import ArcFaceModel, compat
from faceid_keras.heads import MarginHead
from helpers import dense_backbone, run_code


def sampled_head(num_classes, sample_rate, dim=8, seed=0):
    head = MarginHead(num_classes, margin="arcface", scale=16.0, sample_rate=sample_rate)
    head.build((None, dim))
    head.centres.assign(np.random.default_rng(seed).normal(size=(num_classes, dim)).astype("float32"))
    return head


def test_sample_holds_all_positives_with_the_right_size_and_remaps_labels():
    head = sampled_head(1000, 0.1)
    rng = np.random.default_rng(1)
    labels = rng.choice(1000, size=24, replace=True).astype("int32")
    labels[:4] = labels[4]  # repeated classes count once
    embeddings = rng.normal(size=(24, 8)).astype("float32")
    index, remapped = (t.numpy() for t in head.sample(labels, step=3))
    assert len(index) == head.num_sample == 100
    assert np.all(np.diff(index) > 0) and index.min() >= 0 and index.max() < 1000
    assert set(labels.tolist()) <= set(index.tolist())
    np.testing.assert_array_equal(index[remapped], labels)
    full = head(embeddings, labels).numpy()
    cosine = head.cosine(embeddings, tf.gather(compat.variable_tensor(head.centres), index))
    sampled = head.margin_logits(cosine, remapped).numpy()
    # Every column of the sample, the target (margin) logit included, is the full head's column.
    np.testing.assert_allclose(sampled, full[:, index], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(sampled[np.arange(24), remapped], full[np.arange(24), labels], rtol=1e-6)
    again, _ = head.sample(labels, step=3)
    other, _ = head.sample(labels, step=4)
    np.testing.assert_array_equal(again.numpy(), index)
    assert not np.array_equal(other.numpy(), index)


def test_sample_grows_to_the_number_of_distinct_labels():
    head = sampled_head(100, 0.05)
    labels = np.array([3, 3, 10, 11, 12, 50, 60, 70, 80, 90, 99, 0], "int32")
    index, remapped = head.sample(labels, step=0)
    assert head.num_sample == 5
    np.testing.assert_array_equal(index.numpy(), np.unique(labels))
    np.testing.assert_array_equal(index.numpy()[remapped.numpy()], labels)


def _one_step(sample_rate, weights=None, sample=None):
    keras.utils.set_random_seed(4)
    kwargs = {} if sample_rate is None else {"sample_rate": sample_rate}
    model = ArcFaceModel(dense_backbone(), num_classes=20, scale=8.0, weight_decay=0.1, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=False)
    if weights is not None:
        model.set_weights(weights)
    if sample is not None:
        model.head.sample = sample
    rng = np.random.default_rng(5)
    images = rng.normal(size=(6, 8, 8, 3)).astype("float32")
    labels = np.array([0, 4, 4, 9, 13, 19], "int32")
    start = [w.numpy() for w in model.weights]
    logs = model.train_on_batch(images, labels, return_dict=True)
    logits = model.head(model.backbone(images), labels).numpy()
    return start, [w.numpy() for w in model.weights], logs, logits


def test_sample_rate_one_is_the_full_head_exactly():
    def never(*args, **kwargs):
        raise AssertionError("sample_rate=1.0 must not sample")

    start, plain, plain_logs, plain_logits = _one_step(None)
    _, full, full_logs, full_logits = _one_step(1.0, weights=start, sample=never)
    assert plain_logs == full_logs
    np.testing.assert_array_equal(full_logits, plain_logits)
    for a, b in zip(full, plain):
        np.testing.assert_array_equal(a, b)


def test_sample_of_every_class_steps_like_the_full_head():
    """When the batch holds every class, the sampled path (gather of all rows) equals the full head."""
    keras.utils.set_random_seed(4)
    model = ArcFaceModel(dense_backbone(), num_classes=6, scale=8.0, weight_decay=0.1)
    sampled = ArcFaceModel(dense_backbone(), num_classes=6, scale=8.0, weight_decay=0.1, sample_rate=0.5)
    sampled.set_weights(model.get_weights())
    images = np.random.default_rng(6).normal(size=(8, 8, 8, 3)).astype("float32")
    labels = np.array([0, 1, 2, 3, 4, 5, 5, 2], "int32")
    results = []
    for m in (model, sampled):
        m.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        logs = m.train_on_batch(images, labels, return_dict=True)
        results.append((logs, [w.numpy() for w in m.trainable_weights]))
    np.testing.assert_allclose(results[1][0]["loss"], results[0][0]["loss"], rtol=1e-6)
    assert results[1][0]["accuracy"] == results[0][0]["accuracy"]
    for a, b in zip(results[1][1], results[0][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_changes_only_the_sampled_centres():
    keras.utils.set_random_seed(7)
    model = ArcFaceModel(dense_backbone(), num_classes=200, scale=8.0, weight_decay=0.1, sample_rate=0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
    assert model.head.sampling and not model.jit_compile
    rng = np.random.default_rng(8)
    images = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    labels = rng.choice(200, size=8, replace=False).astype("int32")
    index = model.head.sample(labels, step=int(model.optimizer.iterations)).__getitem__(0).numpy()
    before = model.head.centres.numpy()
    kernel = model.backbone.layers[-1].kernel.numpy()
    model.train_on_batch(images, labels)
    changed = np.flatnonzero(np.any(model.head.centres.numpy() != before, axis=1))
    np.testing.assert_array_equal(changed, index)
    assert len(index) == 20
    assert np.any(model.backbone.layers[-1].kernel.numpy() != kernel)


def test_tiny_model_learns_with_half_the_centres():
    keras.utils.set_random_seed(9)
    rng = np.random.default_rng(9)
    patterns = rng.uniform(-1, 1, size=(16, 8, 8, 3))
    labels = np.repeat(np.arange(16), 4).astype("int32")
    images = patterns[labels] + 0.2 * rng.normal(size=(64, 8, 8, 3))
    images = np.clip((images + 1.0) * 127.5, 0, 255).astype("float32")
    model = ArcFaceModel(dense_backbone(size=16), num_classes=16, margin="cosface", scale=16.0,
                         weight_decay=0.0, sample_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    history = model.fit(images, labels, batch_size=8, epochs=12, verbose=0).history
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    result = model.evaluate(images, labels, batch_size=64, verbose=0, return_dict=True)
    assert result["accuracy"] >= 0.9


def test_config_round_trip_and_validation(tmp_path):
    model = ArcFaceModel(dense_backbone(), num_classes=10, sample_rate=0.3)
    assert model.get_config()["sample_rate"] == 0.3
    assert model.head.get_config()["sample_rate"] == 0.3
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.sample_rate == 0.3 and loaded.head.num_sample == 3 and loaded.head.seed == 0
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    for bad in (0.0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="sample_rate"):
            MarginHead(10, sample_rate=bad)
    with pytest.raises(ValueError, match="seed"):
        MarginHead(10, seed=1.5)


def test_two_replicas_sample_the_same_centres_and_step_like_one(tmp_path):
    code = """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np
        from faceid_keras import ArcFaceModel

        rng = np.random.default_rng(0)
        images = rng.normal(size=(16, 8, 8, 3)).astype("float32")
        # Each replica's half holds classes the other half lacks: the sample must cover both.
        labels = np.array([1, 2, 3, 4, 1, 2, 3, 4, 50, 60, 70, 80, 90, 95, 96, 97], "int32")

        def train(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                inputs = keras.Input((8, 8, 3))
                x = keras.layers.Dense(8)(keras.layers.Flatten()(inputs))
                model = ArcFaceModel(keras.Model(inputs, x), num_classes=100, scale=8.0,
                                     weight_decay=0.05, sample_rate=0.1)
                model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=False)
            start = model.head.centres.numpy()
            history = model.fit(images, labels, batch_size=16, epochs=2, shuffle=False, verbose=0).history
            return start, [w.numpy() for w in model.trainable_weights], history["loss"]

        one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
        two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        np.testing.assert_array_equal(one[0], two[0])
        for a, b in zip(one[1], two[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(one[2], two[2], rtol=1e-4)
        moved = np.flatnonzero(np.any(two[1][-1] != two[0], axis=1))
        assert set(labels.tolist()) <= set(moved.tolist()) and len(moved) < 100, moved
        print("replicas agree", one[2])
        """
    assert "replicas agree" in run_code(code, cwd=tmp_path)
