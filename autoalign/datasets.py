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

Typical use::

    from autoalign.datasets import load_dataset, make_loader

    x, y = load_dataset("mnist", data_root="../shared/data", split="train")
    loader = make_loader(x, y, batch_size=128, shuffle=True, seed=0, dataset="mnist")
    for xb, yb in loader:  # xb: (b, 1, 28, 28) float32 normalised, yb: (b,) int64
        ...
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

__all__ = [
    "DATASETS",
    "DATASET_INFO",
    "DATASET_STATS",
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "DatasetInfo",
    "resolve_data_root",
    "resolve_cache_dir",
    "load_dataset",
    "make_loader",
    "random_subset",
    "TensorBatchDataset",
    "read_idx",
    "CIFAR10_CLASSES",
]

DATA_ENV_VAR = "AUTOALIGN_DATA"
CACHE_ENV_VAR = "AUTOALIGN_CACHE"

#: Names accepted by :func:`load_dataset`.
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

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_CIFAR_CACHE_VERSION = 1


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    Attributes
    ----------
    name : str
        Name accepted by :func:`load_dataset`.
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


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _root_help() -> str:
    return f"pass data_root= (--data-root on the command line) or set the {DATA_ENV_VAR} environment variable"


# --------------------------------------------------------------------------- paths


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
            raise FileNotFoundError(f"no data root given: {_root_help()}")
        root = pathlib.Path(env).expanduser()
        origin = f"{DATA_ENV_VAR}={env!r}"
    else:
        root = pathlib.Path(data_root).expanduser()
        origin = f"data_root={str(data_root)!r}"
    if not root.is_dir():
        raise FileNotFoundError(f"data root {str(root)!r} (from {origin}) is not a folder; {_root_help()}")
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


# --------------------------------------------------------------------------- public loader


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
    key = _canonical_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if key == "digits":
        x, y = _load_digits(split)
    elif key in ("mnist", "fashion-mnist"):
        root = resolve_data_root(data_root)
        x, y = _load_idx_dataset(root, key, split)
    else:
        root = resolve_data_root(data_root)
        x, y = _load_cifar10(root, split, cache_dir)
    images = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    if key == "digits":
        images.div_(16.0)
    else:
        images.div_(255.0)
    labels = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))
    return images, labels


# --------------------------------------------------------------------------- digits


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 1, 8, 8)`` float64 in [0, 16] and ``(n,)`` int64, deterministic split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED, stratify=y
    )
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


# --------------------------------------------------------------------------- MNIST-style IDX

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


def _load_idx_dataset(root: pathlib.Path, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = root / _IDX_FOLDERS[key] / "raw"
    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{prefix}-{kind}"
        path = _find_idx_file(folder, stem)
        if path is None:
            raise FileNotFoundError(
                f"{key} {split} split not found: expected {str(folder / (stem + '.gz'))!r} "
                f"(or the unpacked {stem!r}) under data root {str(root)!r}; {_root_help()}"
            )
        out.append(read_idx(path))
    images, labels = out
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{key} {split}: inconsistent IDX shapes {images.shape} and {labels.shape}")
    return images[:, None, :, :], labels.astype(np.int64)


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_TAR = pathlib.Path("CIFAR-10-jpg") / "cifar10-jpg.tar.gz"
_CIFAR_DIR = "CIFAR-10-images"
_CIFAR_PICKLES = "cifar-10-batches-py"


def _load_cifar10(
    root: pathlib.Path, split: str, cache_dir: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 3, 32, 32)`` uint8 and ``(n,)`` int64 for one split."""
    pickles = root / _CIFAR_PICKLES
    if (pickles / "test_batch").is_file():
        return _load_cifar_pickles(pickles, split)

    tar_path = root / _CIFAR_TAR
    folder = None
    for candidate in (root / _CIFAR_DIR, root / "CIFAR-10-jpg" / _CIFAR_DIR):
        if (candidate / "train").is_dir() or (candidate / "test").is_dir():
            folder = candidate
            break
    if tar_path.is_file():
        source = tar_path
    elif folder is not None:
        source = folder
    else:
        raise FileNotFoundError(
            f"cifar10 not found: expected {str(tar_path)!r} (or an unpacked {str(root / _CIFAR_DIR)!r} "
            f"folder, or torchvision's {str(pickles)!r}) under data root {str(root)!r}; {_root_help()}"
        )

    cache_file = _cifar_cache_path(source, cache_dir)
    arrays = _read_cifar_cache(cache_file)
    if arrays is None:
        arrays = _decode_cifar_source(source)
        _write_npz_atomic(cache_file, arrays)
    return arrays[f"x_{split}"], arrays[f"y_{split}"].astype(np.int64)


def _cifar_cache_path(source: pathlib.Path, cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    """Cache file named after the source's absolute path, size and mtime."""
    st = source.stat()
    ident = f"v{_CIFAR_CACHE_VERSION}|{source.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return resolve_cache_dir(cache_dir) / f"cifar10-{digest}.npz"


def _read_cifar_cache(path: pathlib.Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable or partial cache: rebuild it
    return arrays


def _write_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return arr


def _iter_cifar_files(source: pathlib.Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative path under CIFAR-10-images, jpeg bytes)``."""
    if source.is_dir():
        for path in sorted(source.rglob("*.jpg")):
            yield path.relative_to(source).as_posix(), path.read_bytes()
        return
    with tarfile.open(source, "r:*") as tf:
        for member in tf:
            if not member.isfile() or not member.name.lower().endswith(".jpg"):
                continue
            parts = pathlib.PurePosixPath(member.name).parts
            if _CIFAR_DIR in parts:
                parts = parts[parts.index(_CIFAR_DIR) + 1 :]
            fh = tf.extractfile(member)
            if fh is None:
                continue
            yield "/".join(parts), fh.read()


def _decode_cifar_source(source: pathlib.Path) -> dict[str, np.ndarray]:
    """Decode every ``{train,test}/<class>/*.jpg`` into uint8 arrays.

    Returns ``x_train (n, 3, 32, 32)``, ``y_train (n,)``, ``x_test``, ``y_test``,
    ordered by (class, file name). Labels follow the alphabetical class-folder order.
    """
    files: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for rel, data in _iter_cifar_files(source):
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in files:
            continue
        files[parts[0]].append((parts[1], parts[2], data))
    if not files["train"] and not files["test"]:
        raise FileNotFoundError(f"no {_CIFAR_DIR}/{{train,test}}/<class>/*.jpg images in {str(source)!r}")
    classes = sorted({cls for entries in files.values() for cls, _, _ in entries})
    class_index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {}
    for split, entries in files.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        x = np.empty((len(entries), 3, 32, 32), dtype=np.uint8)
        y = np.empty((len(entries),), dtype=np.int64)
        for i, (cls, fname, data) in enumerate(entries):
            img = _decode_jpeg(data)
            if img.shape != (32, 32, 3):
                raise ValueError(f"{split}/{cls}/{fname}: expected a 32x32 RGB image, got shape {img.shape}")
            x[i] = img.transpose(2, 0, 1)
            y[i] = class_index[cls]
        out[f"x_{split}"] = x
        out[f"y_{split}"] = y
    return out


def _load_cifar_pickles(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        path = folder / n
        if not path.is_file():
            raise FileNotFoundError(f"cifar10 {split} split incomplete: {str(path)!r} is missing; {_root_help()}")
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- loaders


class TensorBatchDataset(Dataset):
    """In-memory data set indexed by *lists* of indices, returning whole batches.

    Used by :func:`make_loader` with a :class:`~torch.utils.data.BatchSampler` so a
    batch costs one tensor gather instead of ``batch_size`` Python calls.
    Augmentation (random crop with zero padding, optional horizontal flip) and
    normalisation are applied per batch, in that order.

    Parameters
    ----------
    images : torch.Tensor
        ``(n, C, H, W)`` float in ``[0, 1]``.
    labels : torch.Tensor
        ``(n,)`` int64.
    mean, std : sequence of float or None
        Per-channel normalisation; ``None`` for none.
    crop_padding : int
        Zero padding for the random crop; 0 disables cropping.
    flip : bool
        Random horizontal flips with probability 1/2.
    seed : int
        Seed of the augmentation random generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (n, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be ({images.shape[0]},), got shape {tuple(labels.shape)}")
        self.images = images if images.dtype.is_floating_point else images.float()
        self.labels = labels.long()
        c = images.shape[1]
        if mean is not None and std is not None:
            if len(mean) != c or len(std) != c:
                raise ValueError(f"mean/std need {c} values, got {len(mean)} and {len(std)}")
            self.mean: torch.Tensor | None = torch.tensor(mean, dtype=self.images.dtype).view(1, c, 1, 1)
            self.std: torch.Tensor | None = torch.tensor(std, dtype=self.images.dtype).view(1, c, 1, 1)
        else:
            self.mean = self.std = None
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.generator = torch.Generator().manual_seed(int(seed) + 1_000_003)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        single = isinstance(index, int)
        idx = torch.as_tensor([index] if single else index, dtype=torch.long)
        x = self.images[idx]
        y = self.labels[idx]
        x = self._augment(x)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if single:
            return x[0], y[0]
        return x, y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            # Random crop of the zero-padded batch as one flat gather (much faster
            # than advanced indexing on four axes).
            hp, wp = h + 2 * p, w + 2 * p
            padded = F.pad(x, (p, p, p, p)).reshape(b, c, hp * wp)
            oy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
            rows = oy[:, None, None] + torch.arange(h)[None, :, None]  # (b, h, 1)
            cols = ox[:, None, None] + torch.arange(w)[None, None, :]  # (b, 1, w)
            flat = (rows * wp + cols).reshape(b, 1, h * w).expand(b, c, h * w)
            x = torch.gather(padded, 2, flat).reshape(b, c, h, w)
        if self.flip:
            mask = torch.rand(b, generator=self.generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x


def _infer_dataset(images: torch.Tensor) -> str | None:
    shape = tuple(images.shape[1:])
    for key in ("digits", "mnist", "cifar10"):
        if DATASET_INFO[key].input_shape == shape:
            return key
    return None


def random_subset(
    images: torch.Tensor, labels: torch.Tensor, n: int | None = None, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset (or, with ``n=None``, a fixed random order) of a data set.

    Calibration takes the first batches of its data; CIFAR-10's files are stored
    class by class, so its first 5,000 training images are all airplanes. Take
    calibration images through this function instead of slicing.

    Parameters
    ----------
    images : torch.Tensor
        ``(n_total, ...)``.
    labels : torch.Tensor
        ``(n_total,)``.
    n : int or None
        How many samples (at most ``n_total``); ``None``: all of them, reordered.
    seed : int
        The order is ``torch.randperm(n_total)`` under this seed.

    Returns
    -------
    images, labels : torch.Tensor
        ``(min(n, n_total), ...)`` and ``(min(n, n_total),)``.

    Examples
    --------
    >>> import torch
    >>> x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    >>> xs, ys = random_subset(x, y, 4)
    >>> xs.shape, bool((xs[:, 0].long() == ys).all()), len(set(ys.tolist()))
    (torch.Size([4, 1]), True, 4)
    """
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    if n is not None:
        idx = idx[:n]
    return images[idx], labels[idx]


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    augment: bool = False,
    normalize: bool = True,
    dataset: str | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """Wrap in-memory tensors in a :class:`~torch.utils.data.DataLoader`.

    Parameters
    ----------
    images : torch.Tensor
        ``(n, C, H, W)`` float in ``[0, 1]`` (as returned by :func:`load_dataset`).
    labels : torch.Tensor
        ``(n,)`` int64.
    batch_size : int
        Batch size.
    shuffle : bool
        Reshuffle every epoch (the order is a deterministic function of ``seed``
        and the epoch number).
    seed : int
        Seeds the shuffling and the augmentation.
    augment : bool
        Random crop with zero padding (4 pixels for 32x32, 2 for 28x28, 1 for 8x8)
        and, for 3-channel images, random horizontal flips. Digits are not flipped.
    normalize : bool
        Subtract the per-channel mean and divide by the std of
        :data:`DATASET_STATS`.
    dataset : str or None
        Which stats to use. ``None`` infers it from the image shape: 1x8x8 ->
        digits, 1x28x28 -> mnist (pass ``"fashion-mnist"`` explicitly for
        Fashion-MNIST), 3x32x32 -> cifar10; other shapes are normalised with their
        own per-channel mean and std.
    drop_last : bool
        Drop the last incomplete batch.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(x, y)``: ``x`` ``(b, C, H, W)`` float32, ``y`` ``(b,)`` int64.
        ``len(loader)`` is the number of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    key = _canonical_name(dataset) if dataset is not None else _infer_dataset(images)
    mean = std = None
    if normalize:
        if key is not None:
            mean, std = DATASET_STATS[key]
        else:
            flat = images.transpose(0, 1).reshape(images.shape[1], -1).float()
            mean = tuple(flat.mean(1).tolist())
            std = tuple(flat.std(1).clamp_min(1e-6).tolist())
    crop_padding = 0
    flip = False
    if augment:
        h = images.shape[-1]
        crop_padding = 4 if h >= 32 else 2 if h >= 16 else 1
        flip = images.shape[1] == 3
    ds = TensorBatchDataset(images, labels, mean=mean, std=std, crop_padding=crop_padding, flip=flip, seed=seed)
    if shuffle:
        base = RandomSampler(ds, generator=torch.Generator().manual_seed(int(seed)))
    else:
        base = SequentialSampler(ds)
    sampler = BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)
