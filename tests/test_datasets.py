"""Tests of autoalign.examples.datasets: offline loading, caching and loaders.

Synthetic files stand in for MNIST / CIFAR-10; the real data (``AUTOALIGN_DATA``,
else ``../shared/data`` next to the repository) is only touched by tests that are
skipped when it is absent.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from autoalign.examples import datasets  # noqa: E402
from autoalign.examples.datasets import cifar as cifar_module  # noqa: E402
from autoalign.examples.datasets import (  # noqa: E402
    DATASET_STATS,
    DATASETS,
    load_dataset,
    make_loader,
    read_idx,
    resolve_data_root,
)

REAL_DATA_ROOT = pathlib.Path(os.environ.get("AUTOALIGN_DATA") or REPO_ROOT.parent / "shared" / "data")
HAVE_REAL_MNIST = (REAL_DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
HAVE_REAL_CIFAR = (REAL_DATA_ROOT / "CIFAR-10-jpg" / "cifar10-jpg.tar.gz").is_file()


# --------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


def _write_idx_dataset(folder: pathlib.Path, n_train: int, n_test: int, *, gz: bool = True, seed: int = 0):
    """Write MNIST-layout IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            name = f"{prefix}-{kind}"
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as fh:
                    fh.write(data)
            else:
                (folder / name).write_bytes(data)
        out[prefix] = (images, labels)
    return out


# Distinct grey levels per class so that labels can be recovered after JPEG coding.
_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _grey(class_index: int, split: str) -> int:
    return 10 + 22 * class_index + (5 if split == "test" else 0)


def _jpeg_bytes(value: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _cifar_files(per_class: dict[str, int]):
    """(relative path, bytes) of a tiny CIFAR-10-images tree, in a shuffled order."""
    files = []
    for split, n in per_class.items():
        for ci, cls in enumerate(_CLASSES):
            for k in range(n):
                files.append((f"CIFAR-10-images/{split}/{cls}/{k:04d}.jpg", _jpeg_bytes(_grey(ci, split))))
    rng = np.random.default_rng(1)
    order = rng.permutation(len(files))
    return [files[i] for i in order]


def _write_cifar_tar(root: pathlib.Path, per_class: dict[str, int]) -> pathlib.Path:
    path = root / "CIFAR-10-jpg" / "cifar10-jpg.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in _cifar_files(per_class):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _check_cifar_labels(x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (3, 32, 32)
    means = x.mean(dim=(1, 2, 3)) * 255
    expected = torch.tensor([_grey(int(c), split) for c in y], dtype=torch.float32)
    assert torch.all((means - expected).abs() < 4), "labels do not follow alphabetical class order"


# --------------------------------------------------------------------------- digits and errors


def test_digits_shapes_ranges_and_determinism():
    x_tr, y_tr = load_dataset("digits", split="train")
    x_te, y_te = load_dataset("digits", split="test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) == set(range(10))
    x2, y2 = load_dataset("digits", split="train")
    assert torch.equal(x_tr, x2) and torch.equal(y_tr, y2)
    # The digits stats constant matches the data.
    assert abs(float(x_tr.mean()) - DATASET_STATS["digits"][0][0]) < 0.01


def test_digits_needs_no_data_root(monkeypatch):
    monkeypatch.delenv("AUTOALIGN_DATA", raising=False)
    x, _ = load_dataset("digits", split="test", data_root=None)
    assert x.shape[0] == 360


def test_unknown_dataset_names_choices():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")  # type: ignore[arg-type]


def test_missing_data_root_mentions_options(monkeypatch):
    monkeypatch.delenv("AUTOALIGN_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="AUTOALIGN_DATA") as info:
        resolve_data_root(None)
    assert "data-root" in str(info.value)
    with pytest.raises(FileNotFoundError, match="AUTOALIGN_DATA"):
        load_dataset("mnist")


def test_data_root_from_env_and_nonexistent(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOALIGN_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root(tmp_path / ".") == tmp_path / "."  # the argument wins
    with pytest.raises(FileNotFoundError, match="AUTOALIGN_DATA"):
        resolve_data_root(tmp_path / "missing")


def test_missing_files_name_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "AUTOALIGN_DATA" in msg
    with pytest.raises(FileNotFoundError, match="cifar10-jpg.tar.gz"):
        load_dataset("cifar10", data_root=tmp_path, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- MNIST-style IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "unpacked"])
def test_mnist_from_synthetic_idx(tmp_path, gz):
    written = _write_idx_dataset(tmp_path / "MNIST" / "raw", 7, 3, gz=gz)
    x, y = load_dataset("mnist", data_root=tmp_path, split="train")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (7,) and y.dtype == torch.int64
    images, labels = written["train"]
    assert torch.allclose(x[:, 0], torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()
    x_te, y_te = load_dataset("mnist", data_root=str(tmp_path), split="test")
    assert x_te.shape == (3, 1, 28, 28)
    assert y_te.tolist() == written["t10k"][1].tolist()


def test_fashion_mnist_layout_and_env(tmp_path, monkeypatch):
    written = _write_idx_dataset(tmp_path / "FashionMNIST" / "raw", 4, 2, seed=3)
    monkeypatch.setenv("AUTOALIGN_DATA", str(tmp_path))
    x, y = load_dataset("fashion-mnist", split="test")
    assert x.shape == (2, 1, 28, 28)
    assert y.tolist() == written["t10k"][1].tolist()


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(bad)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_from_synthetic_tar_and_cache_reuse(tmp_path, monkeypatch):
    root = tmp_path / "data"
    cache = tmp_path / "cache"
    _write_cifar_tar(root, {"train": 2, "test": 1})
    x, y = load_dataset("cifar10", data_root=root, split="train", cache_dir=cache)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [c for c in range(10) for _ in range(2)]  # sorted by (class, file)
    _check_cifar_labels(x, y, "train")
    cached = list(cache.glob("cifar10-*.npz"))
    assert len(cached) == 1

    # Second load (either split) must come from the cache, not the archive.
    def _no_decode(*args, **kwargs):
        raise AssertionError("the archive was decoded again instead of reading the cache")

    monkeypatch.setattr(cifar_module, "decode_cifar_source", _no_decode)
    x2, y2 = load_dataset("cifar10", data_root=root, split="train", cache_dir=cache)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x_te, y_te = load_dataset("cifar10", data_root=root, split="test", cache_dir=cache)
    assert x_te.shape == (10, 3, 32, 32) and y_te.tolist() == list(range(10))
    _check_cifar_labels(x_te, y_te, "test")


def test_cifar_cache_dir_from_env(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _write_cifar_tar(root, {"train": 1, "test": 1})
    monkeypatch.setenv("AUTOALIGN_CACHE", str(tmp_path / "envcache"))
    load_dataset("cifar10", data_root=root, split="test")
    assert len(list((tmp_path / "envcache").glob("cifar10-*.npz"))) == 1


def test_cifar_from_unpacked_folder(tmp_path):
    root = tmp_path / "data"
    for name, data in _cifar_files({"train": 1, "test": 1}):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    x, y = load_dataset("cifar10", data_root=root, split="test", cache_dir=tmp_path / "cache")
    assert x.shape == (10, 3, 32, 32)
    assert y.tolist() == list(range(10))
    _check_cifar_labels(x, y, "test")


def test_cifar_from_torchvision_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    x, y = load_dataset("cifar10", data_root=tmp_path, split="train", cache_dir=tmp_path / "cache")
    assert x.shape == (15, 3, 32, 32)
    d1, l1 = batches["data_batch_1"]
    assert torch.allclose(x[:3].reshape(3, -1), torch.from_numpy(d1).float() / 255)
    assert y[:3].tolist() == l1
    x_te, y_te = load_dataset("cifar10", data_root=tmp_path, split="test", cache_dir=tmp_path / "cache")
    assert x_te.shape == (3, 3, 32, 32) and y_te.tolist() == batches["test_batch"][1]


# --------------------------------------------------------------------------- loaders


def test_make_loader_batches_normalisation_and_order():
    x = torch.rand(50, 1, 28, 28)
    y = torch.arange(50) % 10
    loader = make_loader(x, y, batch_size=16, shuffle=False, dataset="mnist")
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    mean, std = DATASET_STATS["mnist"]
    assert torch.allclose(xb, (x[:16] - mean[0]) / std[0])
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    raw = make_loader(x, y, batch_size=64, shuffle=False, normalize=False)
    assert torch.equal(next(iter(raw))[0], x)


def test_make_loader_shuffle_is_seeded():
    x = torch.rand(40, 3, 32, 32)
    y = torch.arange(40)

    def order(seed):
        return torch.cat([b[1] for b in make_loader(x, y, batch_size=8, shuffle=True, seed=seed)]).tolist()

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c and sorted(a) == list(range(40))
    loader = make_loader(x, y, batch_size=8, shuffle=True, seed=0)
    epoch1 = torch.cat([b[1] for b in loader]).tolist()
    epoch2 = torch.cat([b[1] for b in loader]).tolist()
    assert epoch1 != epoch2  # reshuffled every epoch


def test_make_loader_augment_crop_and_flip():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    y = torch.arange(64)
    loader = make_loader(x, y, batch_size=64, shuffle=False, augment=True, normalize=False, seed=3)
    xb, yb = next(iter(loader))
    assert xb.shape == x.shape and torch.equal(yb, y)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, a : a + 32, b : b + 32] for a in range(9) for b in range(9)]
        plain = any(torch.equal(xb[i], w) for w in windows)
        flipped = any(torch.equal(xb[i], w.flip(-1)) for w in windows)
        assert plain or flipped, "augmented image is not a (flipped) crop of the padded original"
        flips += int(flipped and not plain)
    assert 10 < flips < 54
    # Same seed, same augmentation.
    again = next(iter(make_loader(x, y, batch_size=64, shuffle=False, augment=True, normalize=False, seed=3)))[0]
    assert torch.equal(xb, again)


def test_make_loader_grey_augment_does_not_flip():
    x = torch.rand(32, 1, 8, 8)
    y = torch.zeros(32, dtype=torch.long)
    xb, _ = next(iter(make_loader(x, y, batch_size=32, shuffle=False, augment=True, normalize=False)))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(32):
        assert any(torch.equal(xb[i], padded[i, :, a : a + 8, b : b + 8]) for a in range(3) for b in range(3))


# --------------------------------------------------------------------------- real data (optional)
# Marked ``slow`` (the project's marker for tests that need ../shared/data).


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL_MNIST, reason=f"real MNIST not found under {REAL_DATA_ROOT} (set AUTOALIGN_DATA)")
def test_real_mnist_and_fashion_test_splits():
    for name, mean in (("mnist", DATASET_STATS["mnist"][0][0]), ("fashion-mnist", DATASET_STATS["fashion-mnist"][0][0])):
        x, y = load_dataset(name, data_root=REAL_DATA_ROOT, split="test")
        assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
        assert y.bincount().numel() == 10
        assert abs(float(x.mean()) - mean) < 0.01


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL_CIFAR, reason=f"real CIFAR-10 not found under {REAL_DATA_ROOT} (set AUTOALIGN_DATA)")
def test_real_cifar10():
    # Uses the default cache (~/.cache/autoalign or AUTOALIGN_CACHE) so the decode
    # (tens of seconds on 2 cores) is paid once per machine.
    x, y = load_dataset("cifar10", data_root=REAL_DATA_ROOT, split="test")
    assert x.shape == (10000, 3, 32, 32)
    assert y.bincount().tolist() == [1000] * 10
    means = x.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor(DATASET_STATS["cifar10"][0]), atol=0.01)


def test_cli_calibration_from_class_sorted_cifar_sees_every_class(tmp_path, monkeypatch):
    """CIFAR-10 is stored class by class; ``--data cifar10:ROOT --num-batches k`` takes the
    first batches, which must not all be airplanes."""
    from autoalign.cli import make_data

    root = tmp_path / "data"
    _write_cifar_tar(root, {"train": 6, "test": 1})
    monkeypatch.setenv(datasets.CACHE_ENV_VAR, str(tmp_path / "cache"))
    x, y = load_dataset("cifar10", data_root=root, split="train", cache_dir=tmp_path / "cache")
    assert y[:6].tolist() == [0] * 6  # the stored order
    first = next(iter(make_data(f"cifar10:{root}", batch_size=20)))
    assert len(set(first[1].tolist())) >= 6
    xs, ys = datasets.random_subset(x, y, 20)
    assert torch.equal(xs, datasets.random_subset(x, y, 20)[0]) and len(set(ys.tolist())) >= 6
