"""Small datasets for the FusionBench configs: an image folder and scikit-learn's digits.

Both are plain functions returning map-style datasets of ``(input, label)`` pairs, so a config
names them with ``_target_``; neither needs FusionBench nor downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptionError

__all__ = ["image_folder", "digits"]


def image_folder(root: str, image_size: int = 224, resize: int | None = None, normalize: bool = True) -> Any:
    """``torchvision.datasets.ImageFolder`` with the usual evaluation transform.

    Parameters
    ----------
    root : str
        A folder with one sub-folder of images per class.
    image_size : int, default 224
        Side of the centre crop.
    resize : int, optional
        Shorter side before cropping (default: ``image_size * 8 // 7``).
    normalize : bool, default True
        Normalise with the ImageNet mean and std.

    Returns
    -------
    torchvision.datasets.ImageFolder

    Raises
    ------
    OptionError
        ``root`` is not a folder.
    """
    import os

    from torchvision import datasets, transforms

    if not os.path.isdir(root):
        raise OptionError(f"root={root!r} is not a folder of class sub-folders")
    steps: list[Any] = [transforms.Resize(resize or image_size * 8 // 7), transforms.CenterCrop(image_size), transforms.ToTensor()]
    if normalize:
        steps.append(transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return datasets.ImageFolder(root, transform=transforms.Compose(steps))


def digits(split: str = "train", flatten: bool = True, test_fraction: float = 0.25, seed: int = 0) -> torch.utils.data.TensorDataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), scaled to [0, 1], split once.

    Parameters
    ----------
    split : {"train", "test"}
    flatten : bool, default True
        Inputs of shape ``(64,)``; otherwise ``(1, 8, 8)``.
    test_fraction : float, default 0.25
    seed : int, default 0
        Seed of the split (the same seed gives disjoint train and test sets).

    Returns
    -------
    torch.utils.data.TensorDataset

    Examples
    --------
    >>> from autoalign.integrations.datasets import digits
    >>> train, test = digits("train"), digits("test")
    >>> len(train) + len(test), tuple(train[0][0].shape)
    (1797, (64,))
    """
    if split not in ("train", "test"):
        raise OptionError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    idx = order[:n_test] if split == "test" else order[n_test:]
    xs = x[idx] if flatten else x[idx].reshape(-1, 1, 8, 8)
    return torch.utils.data.TensorDataset(xs, y[idx])
