"""insightface `.bin` verification packs: a pickle of (bins, issame_list), read without running code.

A pickle can call any importable function while loading, so `read_bin` uses an unpickler that
resolves only the globals needed to rebuild uint8 numpy arrays (`_reconstruct`, `ndarray`, `dtype`)
and `_codecs.encode` restricted to latin-1 (how Python 3 stores bytes in a protocol-2 pickle).
Everything else (os.system, eval, subprocess, ...) is refused before it can be called.
"""

from __future__ import annotations

import _codecs
import io
import os
import pickle
from typing import Sequence, Union

import numpy as np
from etils import epath

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

VERIFICATION_TARGETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")

PathLike = Union[str, os.PathLike]


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` limited to latin-1, the only codec protocol-2 pickles of bytes use."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return _codecs.encode(text, "latin1", errors)


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS` and refuses persistent ids."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a .bin verification pack"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a .bin verification pack")


def _as_bytes(item, index: int, name: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    kind = f"ndarray of {item.dtype} with shape {item.shape}" if isinstance(item, np.ndarray) else (
        type(item).__name__
    )
    raise ValueError(
        f"{name}: image {index} is a {kind}; expected encoded image bytes or a 1-d uint8 array"
    )


def read_bin(path: PathLike) -> tuple[list[bytes], np.ndarray]:
    """Load a `.bin` pack safely: (encoded images, 2 per pair; bool array with one flag per pair)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: verification pack missing")
    with path.open("rb") as f:
        data = f.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused or malformed pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: malformed pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: bins is a {type(bins).__name__}, expected a list")
    if not isinstance(issame, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: issame_list is a {type(issame).__name__}, expected a list")
    flags = list(issame.tolist() if isinstance(issame, np.ndarray) else issame)
    for i, flag in enumerate(flags):
        if not isinstance(flag, (bool, int)) or flag not in (0, 1):
            raise ValueError(f"{path}: issame_list[{i}] is {flag!r}, expected a bool")
    if len(bins) != 2 * len(flags):
        raise ValueError(
            f"{path}: {len(bins)} images for {len(flags)} pairs; a pack holds exactly 2 images per pair"
        )
    images = [_as_bytes(item, i, str(path)) for i, item in enumerate(bins)]
    return images, np.asarray(flags, dtype=bool)


def write_bin(path: PathLike, encoded_images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a `.bin` pack as insightface does: protocol-2 pickle of (bins, issame_list)."""
    images = [bytes(b) for b in encoded_images]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs, need 2 per pair")
    with epath.Path(path).open("wb") as f:
        pickle.dump((images, flags), f, protocol=2)
