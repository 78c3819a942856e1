"""Backbones: insightface parameter counts, layouts, input checks, and our BatchRenormalization."""
import keras
import numpy as np
import pytest

from faceid_keras import backbones
from faceid_keras.backbones import BatchRenormalization
from faceid_keras.backbones.normalization import group_count


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@pytest.mark.parametrize("name, count", [("iresnet50", 43_590_336), ("iresnet100", 65_155_648)])
def test_trainable_parameters_equal_insightface(name, count):
    # insightface's iresnet with 512-d output at 112x112x3, final BatchNorm scale frozen at 1.
    assert trainable_count(backbones.build(name)) == count


@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "group"])
def test_iresnet18_small_input_every_norm(norm):
    model = backbones.build("iresnet18", input_shape=(32, 32, 3), embedding_size=16, norm=norm)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    for training in (True, False):
        out = model(images, training=training)
        assert out.shape == (4, 16) and np.isfinite(np.asarray(out)).all()
    features = model.get_layer("features")
    assert not any("gamma" in v.name for v in features.weights)


def test_iresnet_layout():
    model = backbones.build("iresnet34", input_shape=(32, 32, 3), embedding_size=8)
    units = {layer.name.split("_")[0] + "_" + layer.name.split("_")[1] for layer in model.layers
             if layer.name.endswith("_add")}
    assert sorted(units) == sorted(f"stage{s}_unit{u}" for s, n in enumerate((3, 4, 6, 3), 1) for u in range(1, n + 1))
    assert model.get_layer("stem_prelu").weights[0].shape == (1, 1, 64)
    assert model.get_layer("stage2_unit1_conv2").strides == (2, 2)
    assert model.get_layer("stage2_unit1_down_conv").kernel.shape == (1, 1, 64, 128)
    assert model.get_layer("stage2_unit2_conv1").strides == (1, 1)
    assert model.get_layer("output_fc").kernel.shape == (512 * 2 * 2, 8)


def test_mobilefacenet_non_square_input():
    model = backbones.build("mobilefacenet", input_shape=(32, 48, 3), embedding_size=16, dropout=0.1)
    out = model(np.zeros((2, 32, 48, 3), "float32"), training=True)
    assert out.shape == (2, 16)
    assert model.get_layer("gdc_conv").kernel_size == (2, 3)
    assert model.get_layer("stem_group_conv").groups == 64


def test_build_follows_dtype_argument():
    model = backbones.build("mobilefacenet", (32, 32, 3), 8, dtype="mixed_float16")
    assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float16"
    assert all(v.dtype == "float32" for v in model.weights)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="resnet50"), "valid backbones are \\['iresnet18', 'iresnet34', 'iresnet50', 'iresnet100', 'mobilefacenet'\\]"),
        (dict(name="iresnet18", input_shape=(30, 32, 3)), "divisible by 16"),
        (dict(name="mobilefacenet", input_shape=(32, 32)), "height, width, channels"),
        (dict(name="iresnet18", norm="layer"), "valid norms"),
        (dict(name="iresnet18", embedding_size=0), "embedding_size"),
        (dict(name="iresnet18", dropout=1.5), "dropout"),
    ],
)
def test_build_rejects_bad_arguments(kwargs, message):
    kwargs = {"input_shape": (32, 32, 3), **kwargs}
    with pytest.raises(ValueError, match=message):
        backbones.build(**kwargs)


def test_group_count():
    assert [group_count(c) for c in (512, 64, 16, 24, 7)] == [32, 32, 16, 24, 7]
    assert group_count(48) == 24


def _renorm(**kwargs):
    layer = BatchRenormalization(**kwargs)
    layer.build((None, 3))
    return layer


def test_batch_renorm_inference_uses_moving_statistics():
    layer = _renorm()
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    layer.moving_variance.assign([4.0, 1.0, 0.25])
    layer.gamma.assign([2.0, 1.0, 1.0])
    layer.beta.assign([0.0, 1.0, 0.0])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    want = (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5) * [2.0, 1.0, 1.0] + [0.0, 1.0, 0.0]
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), want, rtol=1e-5, atol=1e-5)


def test_batch_renorm_without_correction_equals_batch_norm():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(16, 4, 4, 3)).astype("float32")
    renorm = BatchRenormalization(rmax=1.0, dmax=0.0)
    batch_norm = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    np.testing.assert_allclose(
        np.asarray(renorm(x, training=True)), np.asarray(batch_norm(x, training=True)), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(renorm.moving_mean.numpy(), batch_norm.moving_mean.numpy(), rtol=1e-5)
    # Keras 2's BatchNormalization averages the unbiased batch variance (n / (n - 1) larger, as
    # PyTorch does), Keras 3's the biased one, like ours.
    want_variance = 0.9 + 0.1 * x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(renorm.moving_variance.numpy(), want_variance, rtol=1e-5)
    np.testing.assert_allclose(renorm.moving_variance.numpy(), batch_norm.moving_variance.numpy(), rtol=5e-3)


def test_batch_renorm_clips_r_and_d():
    layer = _renorm(rmax=3.0, dmax=5.0)
    layer.renorm_mean.assign([-1e3, 1e3, 0.0])
    layer.renorm_stddev.assign([1e-3, 1e-3, 1e3])
    x = np.random.default_rng(2).normal(size=(64, 3)).astype("float32")
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    want = x_hat * [3.0, 3.0, 1.0 / 3.0] + [5.0, -5.0, 0.0]
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), want, rtol=1e-4, atol=1e-4)


def test_batch_renorm_config_round_trip():
    layer = BatchRenormalization(rmax=2.0, dmax=1.0, renorm_momentum=0.9, scale=False, name="r")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, BatchRenormalization)
    assert (clone.rmax, clone.dmax, clone.renorm_momentum, clone.scale) == (2.0, 1.0, 0.9, False)
    with pytest.raises(ValueError, match="rmax"):
        BatchRenormalization(rmax=0.5)


@pytest.mark.parametrize("groups,channels,filters,strides", [(64, 128, 128, 1), (4, 8, 12, 2), (1, 3, 5, 1)])
def test_grouped_conv_equals_keras_grouped_conv2d(groups, channels, filters, strides):
    from faceid_keras.backbones.layers import GroupedConv2D

    rng = np.random.default_rng(groups)
    images = rng.standard_normal((2, 9, 11, channels)).astype("float32")
    reference = keras.layers.Conv2D(filters, 3, strides, groups=groups, use_bias=False)
    expected = reference(images).numpy()
    grouped = reference.kernel.numpy()  # (3, 3, channels / groups, filters)
    per_group, outputs = channels // groups, filters // groups
    kernel = np.empty((3, 3, channels, outputs), "float32")
    for c in range(channels):
        g, r = divmod(c, per_group)
        kernel[:, :, c, :] = grouped[:, :, r, g * outputs : (g + 1) * outputs]
    layer = GroupedConv2D(filters, 3, strides, groups=groups)
    layer.build(images.shape)
    layer.kernel.assign(kernel)
    actual = layer(images).numpy()
    assert actual.shape == expected.shape == tuple(layer.compute_output_shape(images.shape))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert GroupedConv2D.from_config(layer.get_config()).get_config() == layer.get_config()
    assert layer.count_params() == reference.count_params()
