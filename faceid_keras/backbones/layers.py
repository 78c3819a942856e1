"""Small building blocks shared by the backbones, matching insightface's PyTorch layers."""
from __future__ import annotations

import keras

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
        else:
            layer = keras.layers.Conv2D(
                filters, kernel, stride, groups=groups, use_bias=False, name=name, dtype=self.dtype
            )
        return layer(x)

    def norm_layer(self, x, name, scale=True):
        """The chosen normalisation over the channels of x; scale=False leaves gamma out (fixed at 1)."""
        return normalization(self.norm, int(x.shape[-1]), name, scale=scale, dtype=self.dtype)(x)

    def prelu(self, x, name):
        """Per-channel PReLU with PyTorch's initial slope 0.25."""
        return keras.layers.PReLU(
            alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], name=name, dtype=self.dtype
        )(x)
