"""scikit-learn's bundled 8x8 digits: no download, no data root, a fixed train/test split."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_arrays"]

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


def load_digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of scikit-learn's digits as arrays.

    Parameters
    ----------
    split : {"train", "test"}
        Which split: a stratified 80/20 split under a fixed seed.

    Returns
    -------
    images : numpy.ndarray
        ``(n, 1, 8, 8)`` float64 in ``[0, 16]``.
    labels : numpy.ndarray
        ``(n,)`` int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED, stratify=y
    )
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)
