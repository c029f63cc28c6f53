"""In-memory tensors to batches: :class:`TensorBatchDataset`, :func:`make_loader`, :func:`random_subset`."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .base import DATASET_INFO, DATASET_STATS, canonical_name

__all__ = ["TensorBatchDataset", "make_loader", "random_subset"]


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
    key = canonical_name(dataset) if dataset is not None else _infer_dataset(images)
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
