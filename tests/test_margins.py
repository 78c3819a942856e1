"""AdaFace, arcface_torch, sub-centres and inter-class filtering against independent NumPy code:
logits and gradients, extreme angles, float16, learning, saving and resuming AdaFace's statistics."""
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from faceid_keras import ArcFaceModel, compat
from faceid_keras.heads import MarginHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, K, DIM, S = 5, 3, 6, 64.0


def np_cosine(e, w, k, eps):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return np.clip((e @ w.T).reshape(len(e), -1, k).max(axis=2), -1 + eps, 1 - eps)


def np_filter(cos, labels, threshold):
    if not threshold:
        return cos
    keep = ~(cos > threshold)
    for i, y in enumerate(labels):
        if 0 <= y < cos.shape[1]:
            keep[i, y] = True
    return cos * keep


def np_adaface_statistics(e, mean, std, t_alpha=0.01):
    norms = np.clip(np.linalg.norm(e, axis=1), 0.001, 100)
    batch_std = norms.std(ddof=1) if len(norms) > 1 else std
    return norms, t_alpha * norms.mean() + (1 - t_alpha) * mean, t_alpha * batch_std + (1 - t_alpha) * std


def np_logits(margin, e, w, labels, k=1, threshold=0.0, statistics=None):
    """Margin logits in float64 (statistics: AdaFace's fixed (norms, mean, std))."""
    cos = np_filter(np_cosine(e, w, k, 1e-6), labels, threshold)
    out = cos.copy()
    if margin == "adaface":
        m, h, eps = 0.4, 0.333, 1e-3
        norms, mean, std = statistics
        cos = np.clip(cos, -1 + eps, 1 - eps)
        out = cos.copy()
        scaler = np.clip(h * (norms - mean) / (std + eps), -1, 1)
    for i, y in enumerate(labels):
        if y < 0:
            continue
        if margin == "adaface":
            theta = np.clip(math.acos(cos[i, y]) - m * scaler[i], eps, math.pi - eps)
            out[i, y] = math.cos(theta) - (m + m * scaler[i])
        else:  # arcface_torch: cos(theta + 0.5) at every angle
            out[i, y] = math.cos(math.acos(cos[i, y]) + 0.5)
    return S * out


def np_gradient(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def extreme_embeddings(w, labels, k, rng):
    """Random rows, plus rows almost along and almost opposite a sub-centre of their class."""
    e = rng.normal(size=(len(labels), DIM)) * rng.uniform(0.5, 40, size=(len(labels), 1))
    e[0] = w[labels[0] * k] * 30 + 1e-4 * rng.normal(size=DIM)
    e[1] = -w[labels[1] * k] * 0.02 + 1e-5 * rng.normal(size=DIM)
    e[2] = w[labels[2] * k + k - 1] * 200  # norm clipped to 100
    return e


CASES = [
    ("adaface", 1, 0.0),
    ("arcface_torch", 1, 0.0),
    ("adaface", K, 0.2),
    ("arcface_torch", K, 0.2),
]


@pytest.mark.parametrize("margin, k, threshold", CASES)
def test_logits_and_gradients_match_numpy(margin, k, threshold):
    rng = np.random.default_rng(k)
    labels = np.array([0, 1, 2, 3, 4, 0, 2, -1])
    w = rng.normal(size=(C * k, DIM))
    e = extreme_embeddings(w, labels, k, rng)
    head = MarginHead(C, margin=margin, subcenters=k, interclass_filtering_threshold=threshold)
    head.build((None, DIM))
    head.centres.assign(w.astype("float32"))
    embeddings = tf.Variable(e.astype("float32"))
    weights = rng.normal(size=(len(labels), C))
    with tf.GradientTape() as tape:
        logits = head(embeddings, labels, training=True)
        objective = tf.reduce_sum(logits * weights)
    grad_e, grad_w = tape.gradient(objective, [embeddings, head.centres])
    statistics = None
    if margin == "adaface":
        statistics = np_adaface_statistics(e, 20.0, 100.0)
        np.testing.assert_allclose([head.batch_mean.numpy(), head.batch_std.numpy()], statistics[1:], rtol=1e-5)
    want = np_logits(margin, e, w, labels, k, threshold, statistics)
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-4, atol=2e-3)
    if margin == "arcface_torch":  # no gradient through the margin: d logit / d cos = s everywhere
        def scalar(e_, w_):
            return np.sum(S * np_filter(np_cosine(e_, w_, k, 1e-6), labels, threshold) * weights)
    else:
        def scalar(e_, w_):
            return np.sum(np_logits(margin, e_, w_, labels, k, threshold, statistics) * weights)
    want_e = np_gradient(lambda x: scalar(x, w), e)
    want_w = np_gradient(lambda x: scalar(e, x), w)
    for got, expected in ((grad_e.numpy(), want_e), (grad_w.numpy(), want_w)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_arcface_torch_has_no_fallback_and_default_arcface_is_unchanged():
    cosine = tf.constant(np.cos(np.linspace(0.0, math.pi, 9))[:, None].clip(-1 + 1e-6, 1 - 1e-6), "float32")
    labels = np.zeros(9, "int32")
    torch_head, ours = MarginHead(1, margin="arcface_torch", scale=1.0), MarginHead(1, scale=1.0)
    theta = np.arccos(cosine.numpy()[:, 0].astype("float64"))
    np.testing.assert_allclose(torch_head.margin_logits(cosine, labels).numpy()[:, 0], np.cos(theta + 0.5), atol=1e-5)
    past = theta + 0.5 > math.pi
    fallback = np.cos(theta) - math.sin(math.pi - 0.5) * 0.5
    np.testing.assert_allclose(ours.margin_logits(cosine, labels).numpy()[past, 0], fallback[past], atol=1e-5)


@pytest.mark.parametrize("margin", ["adaface", "arcface_torch"])
def test_float16_embeddings_give_finite_float32_logits(margin):
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 3, 4, 0, 2, -1])
    w = rng.normal(size=(C * K, DIM))
    e = extreme_embeddings(w, labels, K, rng).astype("float16")
    head = MarginHead(C, margin=margin, subcenters=K, interclass_filtering_threshold=0.3)
    head.build((None, DIM))
    head.centres.assign(w.astype("float32"))
    logits = head(tf.constant(e), labels, training=True)
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()
    statistics = np_adaface_statistics(e.astype("float64"), 20.0, 100.0) if margin == "adaface" else None
    want = np_logits(margin, e.astype("float64"), w, labels, K, 0.3, statistics)
    np.testing.assert_allclose(logits.numpy(), want, rtol=1e-3, atol=1e-2)


def test_adaface_statistics_update_only_in_training_and_keep_std_for_one_example():
    head = MarginHead(C, margin="adaface")
    e = np.random.default_rng(4).normal(size=(4, DIM)).astype("float32") * 10
    head(e, np.zeros(4, "int32"))
    head(e, np.zeros(4, "int32"), training=False)
    assert (head.batch_mean.numpy(), head.batch_std.numpy()) == (20.0, 100.0)
    head(e[:1], np.zeros(1, "int32"), training=True)
    norm = np.linalg.norm(e[0])
    np.testing.assert_allclose([head.batch_mean.numpy(), head.batch_std.numpy()],
                               [0.01 * norm + 0.99 * 20.0, 100.0], rtol=1e-6)


def dense_backbone(size=16, input_shape=(8, 8, 3)):
    images = keras.Input(input_shape)
    return keras.Model(images, keras.layers.Dense(size)(keras.layers.Flatten()(images)))


def separable_data(seed, classes=8, per_class=4):
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(-1, 1, size=(classes, 8, 8, 3))
    labels = np.repeat(np.arange(classes), per_class).astype("int32")
    images = patterns[labels] + 0.2 * rng.normal(size=(len(labels), 8, 8, 3))
    return np.clip((images + 1.0) * 127.5, 0, 255).astype("float32"), labels


@pytest.mark.parametrize("kwargs", [
    dict(margin="adaface", subcenters=2, sample_rate=0.5),
    dict(margin="arcface_torch", subcenters=3, interclass_filtering_threshold=0.3),
])
def test_tiny_model_learns(kwargs):
    keras.utils.set_random_seed(9)
    images, labels = separable_data(9)
    model = ArcFaceModel(dense_backbone(), num_classes=8, scale=16.0, weight_decay=0.0, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    history = model.fit(images, labels, batch_size=8, epochs=10, verbose=0).history
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    assert model.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)["accuracy"] >= 0.9


def test_keras_file_and_resume_keep_adaface_statistics(tmp_path):
    keras.utils.set_random_seed(2)
    images, labels = separable_data(2)

    def make():
        model = ArcFaceModel(dense_backbone(), num_classes=8, margin="adaface", subcenters=2,
                             interclass_filtering_threshold=0.4, scale=16.0)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
        return model

    model = make()
    model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    statistics = [model.head.batch_mean.numpy(), model.head.batch_std.numpy()]
    assert statistics != [20.0, 100.0]
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / ("backup" + compat.WEIGHTS_SUFFIX))
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert (loaded.margin, loaded.subcenters, loaded.interclass_filtering_threshold) == ("adaface", 2, 0.4)
    assert [loaded.head.batch_mean.numpy(), loaded.head.batch_std.numpy()] == statistics
    embeddings = model.backbone(images[:4])
    np.testing.assert_allclose(loaded.head(embeddings, labels[:4]).numpy(),
                               model.head(embeddings, labels[:4]).numpy(), rtol=1e-6)
    loaded.evaluate(images, labels, batch_size=8, verbose=0)
    assert [loaded.head.batch_mean.numpy(), loaded.head.batch_std.numpy()] == statistics
    resumed = make()
    compat.build_optimizer(resumed.optimizer, resumed.trainable_variables)
    resumed.load_weights(tmp_path / ("backup" + compat.WEIGHTS_SUFFIX))
    assert [resumed.head.batch_mean.numpy(), resumed.head.batch_std.numpy()] == statistics
    for m in (model, resumed):
        m.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(resumed.head.batch_mean.numpy(), model.head.batch_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(resumed.head.batch_std.numpy(), model.head.batch_std.numpy(), rtol=1e-6)


@pytest.mark.skipif(not compat.KERAS_3, reason="sharded centres need Keras 3")
@pytest.mark.parametrize("kwargs", [dict(margin="adaface"), dict(subcenters=2),
                                    dict(interclass_filtering_threshold=0.2)])
def test_sharded_centres_refuse_what_they_cannot_shard(kwargs):
    with pytest.raises(ValueError, match="shard_centres=True takes one centre per class"):
        MarginHead(4, shard_centres=True, **kwargs)


def test_adaface_statistics_come_from_the_global_batch(tmp_path):
    code = """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np
        from faceid_keras import ArcFaceModel

        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, size=(16, 8, 8, 3)).astype("float32")
        labels = rng.integers(0, 5, size=16).astype("int32")

        def train(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(0)
                inputs = keras.Input((8, 8, 3))
                x = keras.layers.Dense(8)(keras.layers.Flatten()(inputs))
                model = ArcFaceModel(keras.Model(inputs, x), num_classes=5, margin="adaface", scale=8.0)
                model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
            model.fit(images, labels, batch_size=16, epochs=2, shuffle=False, verbose=0)
            return model.head.batch_mean.numpy(), model.head.batch_std.numpy()

        one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
        two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        np.testing.assert_allclose(one, two, rtol=1e-5)
        assert one[1] != 100.0
        print("statistics agree", one, two)
        """
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "statistics agree" in result.stdout, result.stderr[-4000:]


def test_train_flags_reach_the_model_arguments():
    from faceid_keras import cli

    def parse(*argv):
        return cli.build_parser().parse_args(["train", "--data_path", "/d", *argv])

    args = parse("--margin", "adaface", "--subcenters", "3", "--interclass_filtering", "0.2")
    assert (args.margin, args.subcenters, args.interclass_filtering) == ("adaface", 3, 0.2)
    assert parse("--margin", "arcface_torch").margin == "arcface_torch"
    for bad in (["--subcenters", "0"], ["--interclass_filtering", "1.0"], ["--margin", "sphereface"]):
        with pytest.raises(SystemExit):
            parse(*bad)
