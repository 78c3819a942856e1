"""MobileFaceNet (insightface arcface_torch layout): depthwise separable blocks and a GDC head."""
from __future__ import annotations

import keras

from faceid_keras.backbones.layers import Blocks, check_input_shape

BLOCKS = (1, 4, 6, 2)
WIDTH = 2  # arcface_torch's `scale`: channel multiplier of the 64/128 base widths


def _conv_block(blocks: Blocks, x, filters, kernel, stride, name, groups=1, depthwise=False, linear=False):
    """Conv (no bias) + norm, followed by PReLU unless linear."""
    x = blocks.conv(x, filters, kernel, stride, f"{name}_conv", groups=groups, depthwise=depthwise)
    x = blocks.norm_layer(x, f"{name}_bn")
    return x if linear else blocks.prelu(x, f"{name}_prelu")


def _depthwise(blocks: Blocks, x, filters, expansion, stride, name, residual):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise (stride), 1x1 linear projection, skip if residual."""
    y = _conv_block(blocks, x, expansion, 1, 1, f"{name}_expand")
    y = _conv_block(blocks, y, expansion, 3, stride, f"{name}_dw", depthwise=True)
    y = _conv_block(blocks, y, filters, 1, 1, f"{name}_project", linear=True)
    if residual:
        y = keras.layers.Add(name=f"{name}_add", dtype=blocks.dtype)([x, y])
    return y


def mobilefacenet(
    input_shape=(112, 112, 3),
    embedding_size: int = 512,
    norm: str = "batch",
    dropout: float = 0.0,
    dtype=None,
) -> keras.Model:
    """MobileFaceNet: images (preprocessed to [-1, 1]) -> embedding (not normalised).

    The GDC head is a depthwise conv over the whole final feature map (7x7 at 112x112 input).
    `dropout` is applied before the final linear layer (0 in insightface).
    """
    height, width, _ = check_input_shape(input_shape, "mobilefacenet")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    blocks = Blocks(norm, dtype)
    c1, c2 = 64 * WIDTH, 128 * WIDTH
    inputs = keras.Input(tuple(input_shape), name="images")
    x = _conv_block(blocks, inputs, c1, 3, 2, "stem")
    x = _conv_block(blocks, x, c1, 3, 1, "stem_group", groups=64)
    stages = ((c1, 128, BLOCKS[1]), (c2, 256, BLOCKS[2]), (c2, 512, BLOCKS[3]))
    for stage, (filters, expansion, units) in enumerate(stages, start=1):
        x = _depthwise(blocks, x, filters, expansion, 2, f"stage{stage}_down", residual=False)
        residual_expansion = 128 if stage == 1 else 256
        for unit in range(1, units + 1):
            x = _depthwise(blocks, x, filters, residual_expansion, 1, f"stage{stage}_unit{unit}", residual=True)
    x = _conv_block(blocks, x, 512, 1, 1, "conv_sep")
    x = keras.layers.DepthwiseConv2D(
        (height // 16, width // 16), use_bias=False, name="gdc_conv", dtype=dtype
    )(x)
    x = blocks.norm_layer(x, "gdc_bn")
    x = keras.layers.Flatten(name="gdc_flatten", dtype=dtype)(x)
    x = keras.layers.Dropout(dropout, name="gdc_dropout", dtype=dtype)(x)
    x = keras.layers.Dense(embedding_size, use_bias=False, name="gdc_fc", dtype=dtype)(x)
    x = blocks.norm_layer(x, "features")
    return keras.Model(inputs, x, name="mobilefacenet")
