"""Loading a saved model file (`.keras` archive or legacy `.h5`) with errors that name the file.

`keras.models.load_model` reports a broken file as a KeyError, an h5py OSError or a JSON error
without the path; `load_model` checks the container first (zip or HDF5 signature, the archive's
`config.json` and its size) and turns any failure into `ModelFileError`. safe_mode stays on.
"""
from __future__ import annotations

import os
import zipfile

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Largest `config.json` a `.keras` archive may hold once decompressed (a model's is a few MB).
MAX_CONFIG_BYTES = 64 << 20


class ModelFileError(ValueError):
    """A saved model file that is missing, malformed or not loadable; the message names it."""


def _check_archive(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo("config.json")
            except KeyError:
                raise ModelFileError(
                    f"{path}: not a Keras model archive: it holds no config.json "
                    f"(found {', '.join(archive.namelist()[:5]) or 'nothing'})"
                ) from None
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelFileError(
                    f"{path}: config.json is {info.file_size} bytes decompressed, more than "
                    f"{MAX_CONFIG_BYTES}"
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise ModelFileError(f"{path}: not a .keras model archive (zip): {err}") from None


def load_model(path: str | os.PathLike):
    """`keras.models.load_model(path)` (safe_mode on) with ModelFileError naming the file on failure."""
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such model file")
    with open(path, "rb") as f:
        signature = f.read(len(_HDF5_SIGNATURE))
    if signature == _HDF5_SIGNATURE:
        kind = "HDF5 (.h5)"
    elif signature.startswith(b"PK"):
        kind = "Keras archive (.keras)"
        _check_archive(path)
    else:
        raise ModelFileError(
            f"{path}: neither a .keras archive (zip) nor an .h5 file (starts with {signature.hex(' ')})"
        )
    try:
        return keras.models.load_model(path)
    except Exception as err:  # Keras and h5py raise many types for a damaged file; name the file.
        raise ModelFileError(
            f"{path}: cannot load this {kind} model: {type(err).__name__}: {str(err)[:300]}"
        ) from err
