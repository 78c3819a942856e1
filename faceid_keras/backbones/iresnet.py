"""IResNet (insightface arcface_torch layout): improved residual units and the BN-Dropout-FC-BN head."""
from __future__ import annotations

import keras

from faceid_keras.backbones.layers import Blocks, check_input_shape

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)


def _unit(blocks: Blocks, x, filters: int, stride: int, name: str):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus the shortcut (1x1 conv + BN when shape changes)."""
    shortcut = x
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = blocks.conv(x, filters, 1, stride, f"{name}_down_conv")
        shortcut = blocks.norm_layer(shortcut, f"{name}_down_bn")
    y = blocks.norm_layer(x, f"{name}_bn1")
    y = blocks.conv(y, filters, 3, 1, f"{name}_conv1")
    y = blocks.norm_layer(y, f"{name}_bn2")
    y = blocks.prelu(y, f"{name}_prelu")
    y = blocks.conv(y, filters, 3, stride, f"{name}_conv2")
    y = blocks.norm_layer(y, f"{name}_bn3")
    return keras.layers.Add(name=f"{name}_add", dtype=blocks.dtype)([y, shortcut])


def iresnet(
    depth: int,
    input_shape=(112, 112, 3),
    embedding_size: int = 512,
    norm: str = "batch",
    dropout: float = 0.0,
    dtype=None,
) -> keras.Model:
    """IResNet-{18,34,50,100}: images (preprocessed to [-1, 1]) -> embedding (not normalised).

    The final normalisation's scale is left out (insightface freezes it at 1), so trainable
    parameter counts equal insightface's.
    """
    if depth not in DEPTHS:
        raise ValueError(f"Unknown IResNet depth {depth!r}; valid depths are {sorted(DEPTHS)}.")
    check_input_shape(input_shape, f"iresnet{depth}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    blocks = Blocks(norm, dtype)
    inputs = keras.Input(tuple(input_shape), name="images")
    x = blocks.conv(inputs, 64, 3, 1, "stem_conv")
    x = blocks.norm_layer(x, "stem_bn")
    x = blocks.prelu(x, "stem_prelu")
    for stage, (units, filters) in enumerate(zip(DEPTHS[depth], WIDTHS), start=1):
        for unit in range(1, units + 1):
            x = _unit(blocks, x, filters, 2 if unit == 1 else 1, f"stage{stage}_unit{unit}")
    x = blocks.norm_layer(x, "output_bn")
    x = keras.layers.Dropout(dropout, name="output_dropout", dtype=dtype)(x)
    x = keras.layers.Flatten(name="output_flatten", dtype=dtype)(x)
    x = keras.layers.Dense(embedding_size, name="output_fc", dtype=dtype)(x)
    x = blocks.norm_layer(x, "features", scale=False)
    return keras.Model(inputs, x, name=f"iresnet{depth}")
