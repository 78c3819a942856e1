"""MarginHead: logits against an independent NumPy formula, numerical safety, dtypes, validation."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from faceid_keras.heads import MarginHead

EPS = 1e-6


def reference_logits(embeddings, centres, labels, m1, m2, m3, s):
    """The combined margin written out in NumPy (float64), with the documented monotonic fallback."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1 + EPS, 1 - EPS)
    logits = cos.copy()
    for i, label in enumerate(labels):
        c = cos[i, label]
        theta = math.acos(c)
        switch = (math.pi - m2) / m1
        if theta <= switch or switch >= math.pi:
            value = math.cos(m1 * theta + m2) - m3
        else:
            value = c - m3 - max(m2 * math.sin(m2), 1 + math.cos(switch))
        logits[i, label] = value
    return s * logits


def make_head(margin, scale=64.0, num_classes=6, dim=8, seed=0):
    head = MarginHead(num_classes, margin=margin, scale=scale)
    head.build((None, dim))
    centres = np.random.default_rng(seed).normal(size=(num_classes, dim)).astype("float32")
    head.centres.assign(centres)
    return head, centres


def embeddings_with_extreme_angles(centres, labels, rng):
    """Random embeddings, plus rows almost along and almost opposite their target centre."""
    e = rng.normal(size=(len(labels), centres.shape[1])).astype("float32")
    e[0] = centres[labels[0]] + 1e-3 * rng.normal(size=centres.shape[1])
    e[1] = -centres[labels[1]] + 1e-3 * rng.normal(size=centres.shape[1])
    e[2] = centres[labels[2]] * 3.0
    e[3] = -centres[labels[3]] * 0.5
    return e


@pytest.mark.parametrize(
    "margin, triple",
    [
        ("arcface", (1.0, 0.5, 0.0)),
        ("cosface", (1.0, 0.0, 0.35)),
        ((1.0, 0.3, 0.2), (1.0, 0.3, 0.2)),
        ((1.35, 0.0, 0.0), (1.35, 0.0, 0.0)),
        ((0.9, 0.4, 0.1), (0.9, 0.4, 0.1)),
    ],
)
def test_logits_match_numpy_formula(margin, triple):
    rng = np.random.default_rng(1)
    head, centres = make_head(margin, scale=30.0)
    labels = rng.integers(0, 6, size=12)
    embeddings = embeddings_with_extreme_angles(centres, labels, rng)
    got = head(embeddings, labels).numpy()
    want = reference_logits(embeddings.astype(np.float64), centres.astype(np.float64), labels, *triple, 30.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def test_without_labels_returns_scaled_cosine():
    rng = np.random.default_rng(2)
    head, centres = make_head("arcface", scale=64.0)
    embeddings = rng.normal(size=(5, 8)).astype("float32")
    want = reference_logits(embeddings, centres, [], 1, 0, 0, 64.0)
    np.testing.assert_allclose(head(embeddings).numpy(), want, rtol=1e-5, atol=1e-4)


def test_label_outside_classes_gets_no_margin():
    head, centres = make_head("arcface", scale=10.0)
    embeddings = np.random.default_rng(3).normal(size=(3, 8)).astype("float32")
    cosine = head.cosine(embeddings)
    np.testing.assert_allclose(head.margin_logits(cosine, np.array([-1, -1, -1])).numpy(), 10.0 * cosine.numpy())


@pytest.mark.parametrize("margin", ["arcface", "cosface", (1.2, 0.3, 0.1), (1.35, 0.0, 0.0)])
def test_target_logit_never_increases_with_angle(margin):
    head, _ = make_head(margin)
    cosine = np.cos(np.linspace(0.0, math.pi, 2001)).astype("float32")
    values = np.asarray(head.target_logit(tf.constant(np.clip(cosine, -1 + EPS, 1 - EPS))))
    assert np.all(np.diff(values) <= 1e-6)


@pytest.mark.parametrize("margin", ["arcface", "cosface", (1.2, 0.3, 0.1)])
def test_gradients_finite_at_cosine_plus_minus_one(margin):
    head, centres = make_head(margin)
    labels = np.array([0, 1, 2, 3])
    embeddings = tf.constant(np.stack([centres[0], -centres[1], 2 * centres[2], -centres[3]]))
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        logits = head(embeddings, labels)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )
    grad_e, grad_w = tape.gradient(loss, [embeddings, head.centres])
    assert np.isfinite(logits.numpy()).all() and np.isfinite(loss.numpy())
    assert np.isfinite(grad_e.numpy()).all() and np.isfinite(grad_w.numpy()).all()
    assert np.abs(grad_w.numpy()).sum() > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_embeddings_give_float32_logits(dtype):
    head, centres = make_head("arcface")
    labels = np.array([0, 1])
    embeddings = tf.cast(tf.constant(np.stack([centres[0], -centres[1]]) * 50.0), dtype)
    logits = head(embeddings, labels)
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()


def test_mixed_policy_keeps_head_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = MarginHead(4)
        logits = head(tf.ones((2, 8), "float16"), np.array([0, 1]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert head.centres.dtype == "float32" and logits.dtype == tf.float32


def test_config_round_trip():
    head = MarginHead(7, margin=(1.0, 0.2, 0.1), scale=32.0, name="h")
    clone = MarginHead.from_config(head.get_config())
    assert (clone.num_classes, clone.m1, clone.m2, clone.m3, clone.scale) == (7, 1.0, 0.2, 0.1, 32.0)
    assert keras.saving.get_registered_name(MarginHead) == "faceid>MarginHead"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(margin="sphereface"), "valid presets are \\['arcface', 'cosface'\\]"),
        (dict(margin=(1.0, 0.5)), "tuple \\(m1, m2, m3\\)"),
        (dict(margin=(0.0, 0.5, 0.0)), "m1"),
        (dict(margin=(1.0, 4.0, 0.0)), "m2"),
        (dict(margin=(1.0, 0.0, -0.1)), "m3"),
        (dict(scale=0.0), "scale"),
        (dict(num_classes=0), "num_classes"),
        (dict(dtype="mixed_float16"), "float32"),
    ],
)
def test_invalid_arguments_are_explained(kwargs, message):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        MarginHead(**kwargs)
