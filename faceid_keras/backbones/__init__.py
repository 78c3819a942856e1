"""Face recognition backbones (images -> embeddings) by name: IResNet-18/34/50/100 and MobileFaceNet."""
from __future__ import annotations

import functools

import keras

from faceid_keras.backbones.iresnet import iresnet
from faceid_keras.backbones.mobilefacenet import mobilefacenet
from faceid_keras.backbones.normalization import NORMS, BatchRenormalization, normalization

BACKBONES = {
    "iresnet18": functools.partial(iresnet, 18),
    "iresnet34": functools.partial(iresnet, 34),
    "iresnet50": functools.partial(iresnet, 50),
    "iresnet100": functools.partial(iresnet, 100),
    "mobilefacenet": mobilefacenet,
}


def build(
    name: str,
    input_shape=(112, 112, 3),
    embedding_size: int = 512,
    norm: str = "batch",
    dropout: float = 0.0,
    dtype=None,
) -> keras.Model:
    """Builds the named backbone as a functional keras.Model; dtype None follows the global policy."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid backbones are {list(BACKBONES)}.")
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid norms are {list(NORMS)}.")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}.")
    return BACKBONES[name](
        input_shape=input_shape, embedding_size=embedding_size, norm=norm, dropout=dropout, dtype=dtype
    )


__all__ = ["BACKBONES", "NORMS", "BatchRenormalization", "build", "normalization"]
