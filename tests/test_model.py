"""ArcFaceModel: learning with fit, saving and reloading in a fresh process, mixed precision, replicas."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import faceid_keras
from faceid_keras import ArcFaceModel
from helpers import dense_backbone, run_code

def separable_data(num_classes=4, per_class=8, size=32, seed=0):
    """Distinct fixed patterns per class plus noise, as uint8 pixels like decoded faces."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-1, 1, size=(num_classes, size, size, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    images = patterns[labels] + 0.3 * rng.normal(size=(len(labels), size, size, 3))
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype("uint8")
    order = rng.permutation(len(labels))
    return pixels[order], labels[order].astype("int32")


@pytest.fixture(scope="module")
def trained():
    """iresnet18 (batch renorm) trained with fit on separable data; shared by the learning and saving tests.

    CosFace with a moderate scale converges in a few epochs on tiny data; ArcFace's m=0.5 at s=64
    starts from target logits far below the others and needs many more steps.
    """
    keras.utils.set_random_seed(0)
    images, labels = separable_data()
    model = ArcFaceModel("iresnet18", num_classes=4, embedding_size=16, margin="cosface", scale=16.0,
                         input_shape=(32, 32, 3), norm="batch_renorm", weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    history = model.fit(images, labels, batch_size=32, epochs=8, verbose=0).history
    return model, images, labels, history


def test_fit_learns_separable_classes(trained):
    model, images, labels, history = trained
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] >= 0.9
    result = model.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"} and np.isfinite(result["loss"])


def test_call_returns_normalised_float32_embeddings_and_defaults():
    model = ArcFaceModel("iresnet18", num_classes=3, embedding_size=16, input_shape=(32, 32, 3))
    embeddings = model(np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")).numpy()
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert model.head.centres.shape == (3, 16)
    model.compile()
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert np.isclose(float(optimizer.learning_rate), 0.1) and optimizer.momentum == 0.9
    assert model.weight_decay == 5e-4


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ArcFaceModel(dense_backbone())
    with pytest.raises(TypeError, match="backbone must be"):
        ArcFaceModel(object(), num_classes=3)
    with pytest.raises(ValueError, match="valid backbones"):
        ArcFaceModel("resnet", num_classes=3)


def test_coupled_weight_decay_adds_to_gradient():
    keras.utils.set_random_seed(1)
    images, labels = separable_data(num_classes=3, per_class=2, size=8)
    models = []
    for weight_decay in (0.0, 0.1):
        keras.utils.set_random_seed(1)
        model = ArcFaceModel(dense_backbone(), num_classes=3, scale=8.0, weight_decay=weight_decay)
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    start = [np.array(w) for w in models[0].get_weights()]
    for model in models:
        model.train_on_batch(images, labels)
    for w0, plain, decayed in zip(start, models[0].trainable_weights, models[1].trainable_weights):
        np.testing.assert_allclose(decayed.numpy(), plain.numpy() - 0.5 * 0.1 * w0, rtol=1e-4, atol=1e-6)


def test_mixed_float16_step_matches_float32():
    images, labels = separable_data(num_classes=3, per_class=4, size=8)
    results = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(2)
            model = ArcFaceModel(dense_backbone(size=16), num_classes=3, scale=8.0, weight_decay=5e-4)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        if policy == "float32":
            initial = model.get_weights()
        else:
            model.set_weights(initial)
            assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
            assert model.head.centres.dtype == "float32"
            assert model.backbone.layers[-1].compute_dtype == "float16"
            cosine = model.head.cosine(model.backbone(images[:2]))
            assert cosine.dtype == tf.float32
            assert model.head.margin_logits(cosine, labels[:2]).dtype == tf.float32
        logs = model.train_on_batch(images, labels, return_dict=True)
        assert np.isfinite(logs["loss"])
        results[policy] = ([w.numpy() for w in model.trainable_weights], logs["loss"])
    np.testing.assert_allclose(results["mixed_float16"][1], results["float32"][1], rtol=1e-2)
    for initial_w, w32, w16 in zip(initial, *(results[p][0] for p in ("float32", "mixed_float16"))):
        step = np.abs(w32 - initial_w).max()
        assert step > 0
        np.testing.assert_allclose(w16 - initial_w, w32 - initial_w, atol=0.02 * step + 1e-6)


def test_save_and_load_in_fresh_process(tmp_path, trained):
    named, images, labels, _ = trained
    user = ArcFaceModel(dense_backbone((32, 32, 3), regularizer=keras.regularizers.L2(1e-3)), num_classes=4)
    user.compile(jit_compile=False)
    user.fit(images, labels, batch_size=16, epochs=4, verbose=0)
    for name, model in (("named", named), ("user", user)):
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_embeddings.npy", model.predict(images, verbose=0))
        np.save(tmp_path / f"{name}_momentum.npy", model.optimizer.variables[2].numpy())
        model.embedding_model().save(tmp_path / f"{name}_embedding.keras")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    out = run_code(
        """
        import keras, numpy as np
        import faceid_keras
        images, labels = np.load("images.npy"), np.load("labels.npy")
        for name in ("named", "user"):
            model = keras.models.load_model(name + ".keras")
            assert isinstance(model, faceid_keras.ArcFaceModel)
            np.testing.assert_array_equal(model.predict(images, verbose=0), np.load(name + "_embeddings.npy"))
            assert int(model.optimizer.iterations) == 8, int(model.optimizer.iterations)
            slot = model.optimizer.variables[2].numpy()
            assert np.abs(slot).max() > 0
            np.testing.assert_array_equal(slot, np.load(name + "_momentum.npy"))
            embedder = keras.models.load_model(name + "_embedding.keras")
            assert not isinstance(embedder, faceid_keras.ArcFaceModel)
            assert not any("centres" in v.name for v in embedder.weights)
            np.testing.assert_allclose(embedder(images).numpy(), np.load(name + "_embeddings.npy"), atol=1e-5)
        # Training continues from the restored optimizer state (the user backbone keeps this quick).
        history = model.fit(images, labels, batch_size=16, epochs=1, verbose=0).history
        assert int(model.optimizer.iterations) == 10 and np.isfinite(history["loss"][0])
        print("loaded")
        """,
        cwd=tmp_path,
    )
    assert "loaded" in out


def test_embedding_model_exports_saved_model(tmp_path):
    model = ArcFaceModel(dense_backbone(), num_classes=3)
    embedder = model.embedding_model()
    images = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    embedder.export(str(tmp_path / "served"))
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(images).numpy(), model(images).numpy(), atol=1e-6)


def test_two_replicas_step_like_one(tmp_path):
    out = run_code(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np
        from faceid_keras import ArcFaceModel

        rng = np.random.default_rng(0)
        images = rng.normal(size=(8, 8, 8, 3)).astype("float32")
        labels = rng.integers(0, 5, size=8).astype("int32")

        def train(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                inputs = keras.Input((8, 8, 3))
                x = keras.layers.Flatten()(inputs)
                x = keras.layers.Dense(8, kernel_regularizer=keras.regularizers.L2(0.05))(x)
                model = ArcFaceModel(keras.Model(inputs, x), num_classes=5, scale=8.0, weight_decay=0.05)
                model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=False)
            start = [w.numpy() for w in model.trainable_weights]
            history = model.fit(images, labels, batch_size=8, epochs=2, shuffle=False, verbose=0).history
            return start, [w.numpy() for w in model.trainable_weights], history["loss"]

        one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
        two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        for a, b in zip(one[0], two[0]):
            np.testing.assert_array_equal(a, b)
        for start, a, b in zip(one[0], one[1], two[1]):
            assert np.abs(a - start).max() > 1e-3
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(one[2], two[2], rtol=1e-4)
        print("replicas agree", one[2])
        """,
        cwd=tmp_path,
    )
    assert "replicas agree" in out


def test_sync_batch_norm_makes_two_replicas_step_like_one(tmp_path):
    """With `sync_batch` the BatchNorm statistics span the global batch, so 2 replicas train like 1;
    plain `batch` normalises each replica's half and ends elsewhere."""
    out = run_code(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np
        from faceid_keras import ArcFaceModel
        from faceid_keras.backbones import normalization

        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, size=(8, 8, 8, 3)).astype("uint8")
        labels = rng.integers(0, 5, size=8).astype("int32")

        def train(strategy, norm):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                inputs = keras.Input((8, 8, 3))
                x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
                x = normalization(norm, 4, "bn")(x)
                x = keras.layers.Dense(8)(keras.layers.Flatten()(x))
                model = ArcFaceModel(keras.Model(inputs, x), num_classes=5, scale=8.0)
                model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=False)
            model.fit(images, labels, batch_size=8, epochs=2, shuffle=False, verbose=0)
            return [w.numpy() for w in model.weights]

        def gap(a, b):
            return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

        one = tf.distribute.OneDeviceStrategy("/cpu:0")
        two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        synced = gap(train(one, "sync_batch"), train(two, "sync_batch"))
        per_replica = gap(train(one, "batch"), train(two, "batch"))
        print("gaps", synced, per_replica)
        """,
        cwd=tmp_path,
    )
    synced, per_replica = (float(v) for v in out.split("gaps")[-1].split())
    assert synced < 1e-4
    assert per_replica > 1e-3


def test_public_names():
    assert faceid_keras.MarginHead.__name__ == "MarginHead"
    assert callable(faceid_keras.backbones.build)
    assert keras.saving.get_registered_name(ArcFaceModel) == "faceid>ArcFaceModel"


def test_fit_needs_labels_and_rejects_sample_weights():
    model = ArcFaceModel(dense_backbone(), num_classes=3)
    model.compile(jit_compile=False)
    images = np.zeros((4, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="images only"):
        model.train_on_batch(images)
    with pytest.raises(ValueError, match="sample weights"):
        model.train_on_batch(images, np.zeros(4, "int32"), sample_weight=np.ones(4, "float32"))
