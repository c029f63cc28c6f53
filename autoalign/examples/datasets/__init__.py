"""Offline access to the image-classification data sets used in tests and benchmarks.

Nothing here ever downloads. Data is read from a *data root* folder, given as an
argument (``data_root=``, ``--data-root`` on command lines) or through the
``AUTOALIGN_DATA`` environment variable. The layout under the root is::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/CIFAR-10-jpg/cifar10-jpg.tar.gz       (CIFAR-10-images/{train,test}/<class>/NNNN.jpg)
    <root>/CIFAR-10-images/{train,test}/<class>/NNNN.jpg   (unpacked alternative)
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}  (torchvision pickles, alternative)

``"digits"`` (scikit-learn's bundled 8x8 digits) needs no data root at all, which
makes it the data set of choice for fast tests.

CIFAR-10 JPEGs are decoded once into a ``.npz`` file of ``uint8`` arrays under a
cache folder (``cache_dir=``, else ``AUTOALIGN_CACHE``, else
``~/.cache/autoalign``); later loads read the cache.

Modules: :mod:`.base` (names, statistics, folders), :mod:`.digits`, :mod:`.idx`
(MNIST-style IDX files), :mod:`.cifar`, :mod:`.loaders` (tensors to batches).

Typical use::

    from autoalign.examples.datasets import load_dataset, make_loader

    x, y = load_dataset("mnist", data_root="../shared/data", split="train")
    loader = make_loader(x, y, batch_size=128, shuffle=True, seed=0, dataset="mnist")
    for xb, yb in loader:  # xb: (b, 1, 28, 28) float32 normalised, yb: (b,) int64
        ...
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from .base import (
    CACHE_ENV_VAR,
    CIFAR10_CLASSES,
    DATA_ENV_VAR,
    DATASET_INFO,
    DATASET_STATS,
    DATASETS,
    DatasetInfo,
    canonical_name,
    resolve_cache_dir,
    resolve_data_root,
)
from .cifar import load_cifar10
from .digits import load_digits_arrays
from .idx import load_idx_dataset, read_idx
from .loaders import TensorBatchDataset, make_loader, random_subset

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "DATASET_STATS",
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "DatasetInfo",
    "canonical_name",
    "resolve_data_root",
    "resolve_cache_dir",
    "load_dataset",
    "make_loader",
    "random_subset",
    "TensorBatchDataset",
    "read_idx",
    "CIFAR10_CLASSES",
]


def load_dataset(
    name: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    split: Literal["train", "test"] = "train",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a data set into memory.

    Parameters
    ----------
    name : {"digits", "mnist", "fashion-mnist", "cifar10"}
        Data set name.
    data_root : str or path-like or None
        Data root folder (see the module docstring); ``None`` uses
        ``AUTOALIGN_DATA``. Ignored for ``"digits"``.
    split : {"train", "test"}
        Which split.
    cache_dir : str or path-like or None
        Where decoded CIFAR-10 is cached (see :func:`resolve_cache_dir`).

    Returns
    -------
    images : torch.Tensor
        ``(n, C, H, W)`` float32 in ``[0, 1]``.
    labels : torch.Tensor
        ``(n,)`` int64 in ``0 .. num_classes - 1``.

    Raises
    ------
    ValueError
        Unknown name or split.
    FileNotFoundError
        No data root, or the data set's files are not where they are expected.
    """
    key = canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if key == "digits":
        x, y = load_digits_arrays(split)
    elif key in ("mnist", "fashion-mnist"):
        root = resolve_data_root(data_root)
        x, y = load_idx_dataset(root, key, split)
    else:
        root = resolve_data_root(data_root)
        x, y = load_cifar10(root, split, cache_dir)
    images = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    if key == "digits":
        images.div_(16.0)
    else:
        images.div_(255.0)
    labels = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))
    return images, labels
