"""Calibration data for ``autoalign merge --data SPEC``.

Three sources (see :data:`autoalign.cli.parser.DATA_HELP`): a named data set of
:mod:`autoalign.examples.datasets` (``digits``, ``mnist[:ROOT]``,
``fashion-mnist[:ROOT]``, ``cifar10[:ROOT]``), a saved tensor (``tensor:FILE.pt``)
and a folder of images by class (``imagefolder:PATH``).
"""

from __future__ import annotations

import difflib
import pathlib
import pickle
from collections.abc import Mapping
from typing import Any, Sequence

from .parser import CLIError

__all__ = ["make_data"]

_NAMED = ("digits", "mnist", "fashion-mnist", "fashion_mnist", "cifar10", "cifar-10")


def make_data(
    spec: str,
    *,
    batch_size: int = 64,
    split: str = "train",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Any:
    """A re-iterable of calibration batches from a ``--data`` value.

    Parameters
    ----------
    spec : str
        ``digits``, ``mnist[:ROOT]``, ``fashion-mnist[:ROOT]``, ``cifar10[:ROOT]``
        (``ROOT`` defaults to ``$AUTOALIGN_DATA``), ``imagefolder:PATH`` or
        ``tensor:FILE.pt`` (a tensor of inputs, an ``(inputs, targets)`` pair or a
        dict with an ``inputs``/``x`` entry).
    batch_size : int, default 64
        Samples per batch.
    split : {"train", "test"}, default "train"
        Split of a named data set.
    image_size : int, optional
        Resize and centre-crop imagefolder images to this size.
    mean, std : sequence of float, optional
        Per-channel normalisation (both or neither); named data sets are otherwise
        normalised with their own statistics.

    Returns
    -------
    iterable
        Batches ``(x, y)`` (or ``x`` for a tensor file without targets). Named data
        sets come in a fixed random order, so that the first batches see every class.

    Raises
    ------
    CLIError
        An unknown source, a missing file name, or an unreadable file.
    FileNotFoundError
        A missing data root, file or folder.
    """
    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in _NAMED:
        return _named_data(spec, kind, arg, batch_size=batch_size, split=split, mean=mean, std=std)
    if kind == "tensor":
        return _tensor_data(arg, batch_size=batch_size, mean=mean, std=std)
    if kind == "imagefolder":
        return _imagefolder_data(arg, batch_size=batch_size, image_size=image_size, mean=mean, std=std)
    choices = "digits, mnist:ROOT, fashion-mnist:ROOT, cifar10:ROOT, imagefolder:PATH, tensor:FILE.pt"
    close = difflib.get_close_matches(kind, ["digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "tensor"], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise CLIError(f"unknown --data {spec!r}; use one of {choices}.{hint}")


def _normalized(x: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch

    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _named_data(
    spec: str,
    kind: str,
    arg: str,
    *,
    batch_size: int,
    split: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Any:
    from ..examples import datasets

    try:
        x, y = datasets.load_dataset(kind, data_root=arg or None, split=split)  # type: ignore[arg-type]
    except FileNotFoundError:
        if arg:
            raise
        raise FileNotFoundError(
            f"--data {spec}: no data root; give it as --data {kind}:ROOT or set {datasets.DATA_ENV_VAR}"
        ) from None
    x, y = datasets.random_subset(x, y)  # a fixed random order: --num-batches then sees every class
    if mean is not None and std is not None:
        x = _normalized(x, mean, std)
        return datasets.make_loader(x, y, batch_size=batch_size, shuffle=False, normalize=False)
    return datasets.make_loader(x, y, batch_size=batch_size, shuffle=False, dataset=kind)


def _tensor_data(arg: str, *, batch_size: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Any]:
    import torch

    if not arg:
        raise CLIError("--data tensor: needs a file, e.g. tensor:inputs.pt")
    if not pathlib.Path(arg).is_file():
        raise FileNotFoundError(f"data file {arg!r} does not exist")
    try:
        obj = torch.load(arg, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CLIError(f"cannot read data file {arg!r}: {exc}") from None
    x, y = obj, None
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        x, y = obj[0], (obj[1] if len(obj) > 1 else None)
    elif isinstance(obj, Mapping):
        xk = next((k for k in ("inputs", "input", "x", "images", "data") if k in obj), None)
        yk = next((k for k in ("targets", "target", "labels", "y") if k in obj), None)
        if xk is None:
            raise CLIError(f"data file {arg!r} is a dict without an 'inputs'/'x' entry (keys: {sorted(map(str, obj))})")
        x, y = obj[xk], obj.get(yk) if yk else None
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise CLIError(f"data file {arg!r} must hold a non-empty tensor of inputs (first axis = samples), got {type(x).__name__}")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
        y = None
    if mean is not None and std is not None and x.dim() == 4:
        x = _normalized(x, mean, std)
    n = int(x.shape[0])
    if y is None:
        return [x[i : i + batch_size] for i in range(0, n, batch_size)]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def _imagefolder_data(
    arg: str,
    *,
    batch_size: int,
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Any:
    if not arg:
        raise CLIError("--data imagefolder: needs a folder, e.g. imagefolder:data/train")
    if not pathlib.Path(arg).is_dir():
        raise FileNotFoundError(f"image folder {arg!r} does not exist")
    import torch
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    steps: list[Any] = []
    if image_size is not None:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    steps.append(transforms.ToTensor())
    if mean is not None and std is not None:
        steps.append(transforms.Normalize(mean, std))
    try:
        ds = torchvision.datasets.ImageFolder(arg, transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CLIError(f"image folder {arg!r}: {exc}") from None
    # a fixed random order: ImageFolder lists the images class by class, and single-class batches
    # would both bias --num-batches and spoil BatchNorm statistics estimated in training mode
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    return DataLoader(Subset(ds, order), batch_size=batch_size, shuffle=False)
