"""Small building blocks shared by the backbones, matching insightface's PyTorch layers."""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from faceid_keras.backbones.normalization import normalization


def check_input_shape(input_shape, name: str) -> tuple[int, int, int]:
    """Validates (height, width, channels) with height and width divisible by 16."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{name}: input_shape must be (height, width, channels) of positive ints, got {input_shape!r}.")
    if shape[0] % 16 or shape[1] % 16:
        raise ValueError(
            f"{name}: input height and width must be divisible by 16 (the backbone downsamples 16x), "
            f"got {shape[0]}x{shape[1]}."
        )
    return shape


@keras.saving.register_keras_serializable(package="faceid")
class GroupedConv2D(keras.layers.Layer):
    """Grouped convolution without bias, padding "valid": `Conv2D(filters, kernel_size, strides, groups=groups)`.

    Computed as a depthwise convolution (each input channel to filters/groups outputs) followed by
    a sum over the input channels of each group: TensorFlow runs grouped Conv2D kernels very slowly
    on CPU (seconds per step for MobileFaceNet's groups=64 layer), depthwise ones fast. The kernel
    has shape (k, k, channels, filters/groups): entry [.., c, j] is Conv2D's [.., c % (channels/groups),
    (c // (channels/groups)) * (filters/groups) + j]; initialised like Conv2D's glorot_uniform.
    """

    def __init__(self, filters: int, kernel_size: int, strides: int = 1, groups: int = 1, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("filters", filters), ("kernel_size", kernel_size), ("strides", strides), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupedConv2D: {name} must be a positive integer, got {value!r}.")
        if filters % groups:
            raise ValueError(f"GroupedConv2D: filters ({filters}) must be divisible by groups ({groups}).")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.groups = groups

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(f"GroupedConv2D: input channels ({channels}) must be divisible by groups ({self.groups}).")
        area = self.kernel_size * self.kernel_size
        limit = math.sqrt(6.0 / (area * channels // self.groups + area * self.filters))
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.kernel_size, self.kernel_size, channels, self.filters // self.groups),
            initializer=keras.initializers.RandomUniform(-limit, limit),
        )
        super().build(input_shape)

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        x = tf.nn.depthwise_conv2d(inputs, kernel, [1, self.strides, self.strides, 1], "VALID")
        batch, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        per_group = kernel.shape[2] // self.groups
        x = tf.reshape(x, [batch, height, width, self.groups, per_group, self.filters // self.groups])
        return tf.reshape(tf.reduce_sum(x, axis=4), [batch, height, width, self.filters])

    def compute_output_shape(self, input_shape):
        def out(size):
            return None if size is None else (size - self.kernel_size) // self.strides + 1

        return (input_shape[0], out(input_shape[1]), out(input_shape[2]), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, groups=self.groups)
        return config


class Blocks:
    """Creates layers with one norm choice and dtype; convolutions pad like PyTorch (symmetric)."""

    def __init__(self, norm: str, dtype=None):
        self.norm = norm
        self.dtype = dtype

    def conv(self, x, filters, kernel, stride, name, groups=1, depthwise=False):
        """Conv without bias, padding (kernel - 1) // 2 on every side, as PyTorch's `padding=k//2`."""
        pad = (kernel - 1) // 2
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad", dtype=self.dtype)(x)
        if depthwise:
            layer = keras.layers.DepthwiseConv2D(kernel, stride, use_bias=False, name=name, dtype=self.dtype)
        elif groups > 1:
            layer = GroupedConv2D(filters, kernel, stride, groups=groups, name=name, dtype=self.dtype)
        else:
            layer = keras.layers.Conv2D(filters, kernel, stride, use_bias=False, name=name, dtype=self.dtype)
        return layer(x)

    def norm_layer(self, x, name, scale=True):
        """The chosen normalisation over the channels of x; scale=False leaves gamma out (fixed at 1)."""
        return normalization(self.norm, int(x.shape[-1]), name, scale=scale, dtype=self.dtype)(x)

    def prelu(self, x, name):
        """Per-channel PReLU with PyTorch's initial slope 0.25."""
        return keras.layers.PReLU(
            alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name, dtype=self.dtype
        )(x)
