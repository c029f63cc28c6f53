"""MNIST-style data sets stored as IDX files (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

from .base import root_help

__all__ = ["read_idx", "load_idx_dataset"]

_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends with ``.gz``).

    Parameters
    ----------
    path : str or path-like
        IDX file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        Array with the shape stored in the header, e.g. ``(n, 28, 28)`` uint8 for
        images or ``(n,)`` uint8 for labels.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(data) < header + count * dtype.itemsize:
        raise ValueError(f"{str(path)!r} is truncated: header says shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    # astype copies: the result is writable and in native byte order.
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def _find_idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(root: pathlib.Path, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of MNIST or Fashion-MNIST from ``<root>/{MNIST,FashionMNIST}/raw``.

    Parameters
    ----------
    root : pathlib.Path
        The data root.
    key : {"mnist", "fashion-mnist"}
        Canonical data set name.
    split : {"train", "test"}
        Which split (``train-*`` or ``t10k-*`` files, gzip-compressed or not).

    Returns
    -------
    images : numpy.ndarray
        ``(n, 1, 28, 28)`` uint8.
    labels : numpy.ndarray
        ``(n,)`` int64.

    Raises
    ------
    FileNotFoundError
        If a file of the split is missing.
    ValueError
        If the images and labels do not fit together.
    """
    folder = root / _IDX_FOLDERS[key] / "raw"
    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{prefix}-{kind}"
        path = _find_idx_file(folder, stem)
        if path is None:
            raise FileNotFoundError(
                f"{key} {split} split not found: expected {str(folder / (stem + '.gz'))!r} "
                f"(or the unpacked {stem!r}) under data root {str(root)!r}; {root_help()}"
            )
        out.append(read_idx(path))
    images, labels = out
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{key} {split}: inconsistent IDX shapes {images.shape} and {labels.shape}")
    return images[:, None, :, :], labels.astype(np.int64)
