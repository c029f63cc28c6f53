"""CIFAR-10 from JPEGs (a tar archive or an unpacked folder) or torchvision's pickles.

JPEGs are decoded once into a ``.npz`` file of ``uint8`` arrays under the cache
folder (:func:`~autoalign.examples.datasets.resolve_cache_dir`); later loads read
the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import tarfile
from typing import Callable, Iterator

import numpy as np

from .base import resolve_cache_dir, root_help

__all__ = ["load_cifar10", "decode_cifar_source"]

_CIFAR_CACHE_VERSION = 1
_CIFAR_TAR = pathlib.Path("CIFAR-10-jpg") / "cifar10-jpg.tar.gz"
_CIFAR_DIR = "CIFAR-10-images"
_CIFAR_PICKLES = "cifar-10-batches-py"


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


def decode_cifar_source(source: pathlib.Path) -> dict[str, np.ndarray]:
    """Decode every ``{train,test}/<class>/*.jpg`` into uint8 arrays.

    Parameters
    ----------
    source : pathlib.Path
        The ``cifar10-jpg.tar.gz`` archive or an unpacked ``CIFAR-10-images`` folder.

    Returns
    -------
    dict of str to numpy.ndarray
        ``x_train (n, 3, 32, 32)``, ``y_train (n,)``, ``x_test``, ``y_test``,
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


def load_cifar10(
    root: pathlib.Path,
    split: str,
    cache_dir: str | os.PathLike[str] | None,
    *,
    decode: Callable[[pathlib.Path], dict[str, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One split of CIFAR-10 under a data root.

    Parameters
    ----------
    root : pathlib.Path
        The data root (see :mod:`autoalign.examples.datasets` for the layouts).
    split : {"train", "test"}
        Which split.
    cache_dir : str or path-like or None
        Where decoded JPEGs are cached (see
        :func:`~autoalign.examples.datasets.resolve_cache_dir`).
    decode : callable, optional
        Decodes an archive or folder of JPEGs when the cache has no copy yet
        (default: this module's :func:`decode_cifar_source`, looked up at call time).

    Returns
    -------
    images : numpy.ndarray
        ``(n, 3, 32, 32)`` uint8.
    labels : numpy.ndarray
        ``(n,)`` int64.

    Raises
    ------
    FileNotFoundError
        If none of the layouts is under ``root``.
    """
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
            f"folder, or torchvision's {str(pickles)!r}) under data root {str(root)!r}; {root_help()}"
        )

    cache_file = _cifar_cache_path(source, cache_dir)
    arrays = _read_cifar_cache(cache_file)
    if arrays is None:
        arrays = (decode or decode_cifar_source)(source)
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


def _load_cifar_pickles(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        path = folder / n
        if not path.is_file():
            raise FileNotFoundError(f"cifar10 {split} split incomplete: {str(path)!r} is missing; {root_help()}")
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)
