"""Small linear-algebra helpers shared by aligners and the engine."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .low_rank import OVERSAMPLE, low_rank_polar_nearest_identity

__all__ = ["sym_power", "psd_noise", "polar_nearest_identity", "match_permutation", "nearest_permutation", "nearest_orthogonal", "nearest_rotary",
           "pair_rotations", "is_permutation", "is_rotary"]


def sym_power(s: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """``s^power`` of a symmetric positive semi-definite matrix via eigh (eigenvalues clamped at ``floor``)."""
    evals, evecs = torch.linalg.eigh(s)
    evals = torch.clamp(evals, min=floor)
    if power < 0:
        tiny = torch.finfo(s.dtype).tiny
        evals = torch.clamp(evals, min=max(floor, tiny))
    return (evecs * evals.pow(power)) @ evecs.T


def psd_noise(c: torch.Tensor) -> float:
    """Rounding level of a covariance: ``max(0, −λ_min(c))``.

    A covariance is positive semi-definite; a negative eigenvalue is rounding in the
    feature products (float32 products leave ~1e-7 of the largest eigenvalue), and
    its size is how far any eigenvalue (or singular value of a cross-covariance
    built the same way) can be moved by it.
    """
    if c.numel() == 0:
        return 0.0
    return max(0.0, -float(torch.linalg.eigvalsh(c)[0]))


def polar_nearest_identity(
    m: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0, identity: torch.Tensor | None = None,
    rank_bound: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The orthogonal ``Q`` maximising ``tr(Qᵀ m)``, nearest the identity where that is not unique.

    With ``m = U S Vᵀ``, ``Q = U Vᵀ`` (the polar factor). On the singular vectors
    whose singular values are zero (at most ``rtol`` times the largest or ``atol``;
    all of them when ``m`` is zero) every orthogonal map from the right null space onto the left
    one maximises the trace equally, and an SVD returns an arbitrary one: a rank-
    deficient ``m`` (dead units, constant features) would scramble them. Of those
    maps, ``U0 R V0ᵀ`` with ``R`` the polar factor of ``U0ᵀ V0`` is the one nearest the
    identity, so a symmetric positive semi-definite ``m`` (a model against its own
    copy) gives exactly ``Q = I`` up to rounding, in degenerate directions too.

    Parameters
    ----------
    m : Tensor, shape (d, d)
        A cross-covariance, or a whitened one (canonical correlations).
    rtol, atol : float
        Singular values up to ``max(rtol · s_max, atol)`` count as zero (``atol``: the
        rounding level of the statistics ``m`` was built from, see :func:`psd_noise`).
    identity : Tensor, shape (d, d), optional
        The orthogonal matrix to be nearest to on the zero singular values (default
        the identity): with ``m = Aᵀ m' B`` for orthogonal ``A``, ``B``, passing ``Aᵀ B``
        gives ``Aᵀ Q' B`` with ``Q'`` the answer for ``m'``.
    rank_bound : int, optional
        An upper bound on the rank of ``m`` apart from rounding (``n − 1`` for a
        cross-covariance of ``n`` samples). When it is below a quarter of ``d`` (and
        ``identity`` is not given), the same ``Q`` is computed in a subspace of
        dimension at most twice the bound
        (:func:`~autoalign.aligners.low_rank.low_rank_polar_nearest_identity`), without
        a ``(d, d)`` SVD; ``s`` then holds zeros beyond the sketch's singular values.

    Returns
    -------
    Q : Tensor, shape (d, d)
        Orthogonal.
    s : Tensor, shape (d,)
        The singular values of ``m``, descending.
    rank : int
        The number of singular values above the threshold.

    Examples
    --------
    >>> import torch
    >>> m = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    >>> q, s, rank = polar_nearest_identity(m)
    >>> torch.equal(q.round(decimals=12), torch.eye(4, dtype=torch.float64)), rank
    (True, 2)
    """
    d = m.shape[0]
    if rank_bound is not None and identity is None and 4 * (rank_bound + OVERSAMPLE) <= d:
        found = low_rank_polar_nearest_identity(m, rank_bound, rtol, atol)
        if found is not None:
            return found
    u, s, vt = torch.linalg.svd(m)
    smax = float(s[0]) if s.numel() else 0.0
    rank = int((s > max(rtol * smax, atol)).sum()) if smax > 0 else 0
    q = u[:, :rank] @ vt[:rank]
    if rank < d:
        u0, v0 = u[:, rank:], vt[rank:].T
        a, _, ct = torch.linalg.svd(u0.T @ v0 if identity is None else u0.T @ identity @ v0)
        q = q + u0 @ (a @ ct) @ v0.T
    return q, s, rank


def match_permutation(score: torch.Tensor) -> torch.Tensor:
    """Assignment maximising ``Σ_i score[i, perm[i]]`` (Hungarian), returns ``perm`` (d,)."""
    s = score.detach().cpu().double().numpy()
    s = np.nan_to_num(s, nan=-1e9)
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long)


def nearest_permutation(m: torch.Tensor) -> torch.Tensor:
    """The permutation matrix closest to ``m`` (assignment maximising ``Σ |m[i, perm[i]]|``)."""
    perm = match_permutation(m.abs())
    return torch.eye(m.shape[0], dtype=torch.float64, device=m.device)[perm]


def nearest_orthogonal(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix closest to ``m`` in Frobenius norm (polar factor ``U Vᵀ``)."""
    u, _, vt = torch.linalg.svd(m.double())
    return u @ vt


def pair_rotations(dim: int, pairs: Sequence[tuple[int, int]], angles: torch.Tensor) -> torch.Tensor:
    """The ``(dim, dim)`` matrix rotating each coordinate pair ``(i, j)`` by its angle and
    keeping every other coordinate: ``[[cos, -sin], [sin, cos]]`` on rows and columns ``(i, j)``.

    Examples
    --------
    >>> import math
    >>> pair_rotations(3, [(0, 2)], torch.tensor([math.pi / 2])).round().int().tolist()
    [[0, 0, -1], [0, 1, 0], [1, 0, 0]]
    """
    out = torch.eye(dim, dtype=torch.float64, device=angles.device)
    if not pairs:
        return out
    i, j = (torch.tensor(c, device=angles.device) for c in zip(*pairs))
    cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
    out[i, i], out[j, j], out[i, j], out[j, i] = cos, cos, -sin, sin
    return out


def nearest_rotary(m: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The matrix closest to ``m`` in Frobenius norm among those that rotate each pair in its
    plane and keep every other coordinate (:func:`pair_rotations`).

    The problem splits by pair: for the block ``[[a, b], [c, d]]`` of rows and columns
    ``(i, j)`` the nearest rotation has angle ``atan2(c - b, a + d)``.
    """
    if not pairs:
        return torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    i, j = (torch.tensor(c, device=m.device) for c in zip(*pairs))
    m = m.double()
    angles = torch.atan2(m[j, i] - m[i, j], m[i, i] + m[j, j])
    return pair_rotations(m.shape[0], pairs, angles)


def is_rotary(m: torch.Tensor, pairs: Sequence[tuple[int, int]], atol: float = 1e-8) -> bool:
    """Whether ``m`` rotates each pair in its plane and keeps every other coordinate (within ``atol``)."""
    return bool(torch.allclose(m.double(), nearest_rotary(m, pairs), atol=atol))


def is_permutation(m: torch.Tensor) -> bool:
    """Whether ``m`` is exactly a permutation matrix."""
    m = m.detach()
    if not bool(((m == 0) | (m == 1)).all()):
        return False
    return bool((m.sum(0) == 1).all()) and bool((m.sum(1) == 1).all())


def is_orthogonal(m: torch.Tensor, atol: float = 1e-8) -> bool:
    """Whether ``mᵀ m = I`` within ``atol``."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return bool(torch.allclose(m.T @ m, eye, atol=atol))
