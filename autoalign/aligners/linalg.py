"""Small linear-algebra helpers shared by aligners and the engine."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["sym_power", "match_permutation", "nearest_permutation", "nearest_orthogonal", "is_permutation"]


def sym_power(s: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """``s^power`` of a symmetric positive semi-definite matrix via eigh (eigenvalues clamped at ``floor``)."""
    evals, evecs = torch.linalg.eigh(s)
    evals = torch.clamp(evals, min=floor)
    if power < 0:
        tiny = torch.finfo(s.dtype).tiny
        evals = torch.clamp(evals, min=max(floor, tiny))
    return (evecs * evals.pow(power)) @ evecs.T


def sym_sqrt_pair(s: torch.Tensor, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s^{1/2}, s^{-1/2})`` of a symmetric PSD matrix from one eigh (eigenvalues clamped at ``floor``)."""
    evals, evecs = torch.linalg.eigh(s)
    evals = torch.clamp(evals, min=max(floor, torch.finfo(s.dtype).tiny))
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


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
