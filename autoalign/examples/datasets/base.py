"""Names, shapes and statistics of the data sets, and the folders their files live in.

Shared by the loaders of :mod:`autoalign.examples.datasets` (digits, IDX, CIFAR-10)
and by :func:`~autoalign.examples.datasets.make_loader`.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "DATASET_STATS",
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "CIFAR10_CLASSES",
    "DatasetInfo",
    "canonical_name",
    "root_help",
    "resolve_data_root",
    "resolve_cache_dir",
]

DATA_ENV_VAR = "AUTOALIGN_DATA"
CACHE_ENV_VAR = "AUTOALIGN_CACHE"

#: Names accepted by :func:`~autoalign.examples.datasets.load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")

#: Per-channel ``(mean, std)`` of the training images scaled to [0, 1].
#: MNIST / Fashion-MNIST / digits were measured on the training sets here; CIFAR-10
#: uses the usual published values (the JPEG copy matches them to ~1e-3).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    Attributes
    ----------
    name : str
        Name accepted by :func:`~autoalign.examples.datasets.load_dataset`.
    channels, height, width : int
        Shape of one image, ``(channels, height, width)``.
    num_classes : int
        Number of labels; labels are ``0 .. num_classes - 1``.
    mean, std : tuple of float
        Per-channel normalisation constants (length ``channels``).
    """

    name: str
    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        return (self.channels, self.height, self.width)


DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 1, 8, 8, 10, *DATASET_STATS["digits"]),
    "mnist": DatasetInfo("mnist", 1, 28, 28, 10, *DATASET_STATS["mnist"]),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 28, 10, *DATASET_STATS["fashion-mnist"]),
    "cifar10": DatasetInfo("cifar10", 3, 32, 32, 10, *DATASET_STATS["cifar10"]),
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


def canonical_name(name: str) -> str:
    """The name in :data:`DATASETS` that ``name`` (any case, or an alias) stands for.

    Parameters
    ----------
    name : str
        A data set name such as ``"MNIST"``, ``"fashion_mnist"`` or ``"cifar-10"``.

    Returns
    -------
    str
        One of :data:`DATASETS`.

    Raises
    ------
    ValueError
        If ``name`` is no known data set.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def root_help() -> str:
    """The hint appended to messages about a missing data root."""
    return f"pass data_root= (--data-root on the command line) or set the {DATA_ENV_VAR} environment variable"


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> pathlib.Path:
    """Find the data root folder.

    Parameters
    ----------
    data_root : str or path-like or None
        Folder holding the data sets. ``None`` falls back to the ``AUTOALIGN_DATA``
        environment variable.

    Returns
    -------
    pathlib.Path
        The folder, with ``~`` expanded.

    Raises
    ------
    FileNotFoundError
        If neither the argument nor ``AUTOALIGN_DATA`` is given, or the folder
        does not exist.
    """
    if data_root is None or str(data_root) == "":
        env = os.environ.get(DATA_ENV_VAR, "")
        if not env:
            raise FileNotFoundError(f"no data root given: {root_help()}")
        root = pathlib.Path(env).expanduser()
        origin = f"{DATA_ENV_VAR}={env!r}"
    else:
        root = pathlib.Path(data_root).expanduser()
        origin = f"data_root={str(data_root)!r}"
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} (from {origin}) is not a folder; {root_help()}")
    return root


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Folder for decoded-data caches.

    Parameters
    ----------
    cache_dir : str or path-like or None
        Explicit folder; ``None`` uses ``AUTOALIGN_CACHE`` or else
        ``~/.cache/autoalign``.

    Returns
    -------
    pathlib.Path
        The folder (not created here).
    """
    if cache_dir is not None and str(cache_dir) != "":
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR, "")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/autoalign").expanduser()
