"""``lstsq``: the direct least-squares linear map onto the reference, all-to-one.

An ablation of CCA Merge (Horoi et al., ICML 2024): is it CCA's correlation
criterion that matters, or only the extra degrees of freedom of a dense linear
map over a permutation (Li et al. 2016, "Convergent learning", matching)? For a
merge point with reference features ``x`` and model features ``y``,

* ``T = argmin_T E‖x − μ_x − T (y − μ_y)‖² = C_xy (C_yy + γ I)⁺`` maps the model's
  features into the reference's coordinates (``merges[m] = T``);
* ``unmerges[m] = T⁻¹`` (computed from the SVD of ``T``; singular values below
  ``rcond · σ_max`` are dropped, a truncated pseudo-inverse, and the report's note
  says so).

Where ``C_yy + γ I`` is singular (``ridge=0`` with dead units or fewer samples
than channels) every map that agrees with ``C_xy C_yy⁺`` on the span of the
model's features is a least-squares solution; the one nearest the identity,
``C_xy C_yy⁺ + (I − P_y)`` with ``P_y`` the projector onto that span, is used, so
directions the data says nothing about are left where they are.

Relation to ``cca`` (at ``ridge=0``, full-rank covariances): with CCA's SVD
``U Σ Vᵀ = C_xx^{-1/2} C_xy C_yy^{-1/2}``, CCA's map is ``C_xx^{1/2} U Vᵀ C_yy^{-1/2}``
while the regression map is ``C_xx^{1/2} U Σ Vᵀ C_yy^{-1/2}``: least squares is CCA
with every canonical direction shrunk by its canonical correlation ``ρ_i``. So
CCA's map matches covariances (``T C_yy Tᵀ = C_xx``), the regression map does not
(``T C_yy Tᵀ = C_xy C_yy⁻¹ C_yx ⪯ C_xx``, equal only for an exact linear relation),
and ``T⁻¹`` amplifies weakly correlated directions by ``1/ρ_i``.
"""

from __future__ import annotations

import math

import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import ReferenceAligner
from .registry import register_aligner

__all__ = ["LstsqAligner", "lstsq_transform", "truncated_inverse"]

#: Eigenvalues of the (ridged) model covariance below this fraction of the largest count as zero.
_EIG_RTOL = 1e-10


def truncated_inverse(t: torch.Tensor, rcond: float) -> tuple[torch.Tensor, int]:
    """Inverse of a square matrix from its SVD, dropping singular values below ``rcond · σ_max``.

    Parameters
    ----------
    t : Tensor, shape (d, d)
    rcond : float
        Relative cut-off; ``0`` keeps every non-zero singular value.

    Returns
    -------
    t_inv : Tensor, shape (d, d)
        ``T⁻¹`` when no singular value was dropped, otherwise the truncated
        pseudo-inverse ``V diag(1/σ_i) Uᵀ`` over the kept ones.
    dropped : int
        How many singular values were dropped.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([[2.0, 0.0], [0.0, 1e-9]], dtype=torch.float64)
    >>> t_inv, dropped = truncated_inverse(t, 1e-6)
    >>> t_inv.diagonal().tolist(), dropped
    ([0.5, 0.0], 1)
    """
    u, s, vt = torch.linalg.svd(t)
    smax = float(s[0]) if s.numel() else 0.0
    keep = s > rcond * smax if smax > 0 else torch.zeros_like(s, dtype=torch.bool)
    inv_s = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return (vt.T * inv_s) @ u.T, int((~keep).sum())


def matched_correlation(cxx: torch.Tensor, cyy: torch.Tensor, cxy: torch.Tensor, t: torch.Tensor, floor: float = 1e-6) -> float:
    """Mean correlation of each reference feature with the same coordinate of ``T y``.

    For a permutation ``T`` this is the mean matched correlation (the ``permutation``
    aligner's score). Variances are floored at ``floor`` times their mean, as in
    :meth:`autoalign.stats.PointStats.corr`.

    Examples
    --------
    >>> import torch
    >>> c = torch.eye(3, dtype=torch.float64)
    >>> round(matched_correlation(c, c, c, c), 4)   # y = x and T = I
    1.0
    """
    vx = torch.clamp(torch.diagonal(cxx), min=0.0)
    vt = torch.clamp(torch.einsum("ij,jk,ik->i", t, cyy, t), min=0.0)
    cov = torch.einsum("ij,ij->i", cxy, t)  # cov(x_i, (T y)_i) = Σ_j C_xy[i, j] T[i, j]
    tiny = torch.finfo(torch.float64).tiny
    denom = torch.sqrt((vx + floor * vx.mean() + tiny) * (vt + floor * vt.mean() + tiny))
    return float((cov / denom).mean())


def lstsq_transform(
    cyy: torch.Tensor, cxy: torch.Tensor, *, ridge: float = 0.0, relative: bool = True
) -> torch.Tensor:
    """Least-squares map of ``y``-features onto ``x``-features from covariances.

    Parameters
    ----------
    cyy : Tensor, shape (d, d)
        Covariance of the model features ``y``.
    cxy : Tensor, shape (d, d)
        Cross-covariance ``E[(x − μ_x)(y − μ_y)ᵀ]`` with the reference features ``x``.
    ridge : float
        Ridge ``γ`` added to ``cyy`` (relative to its mean eigenvalue when ``relative``).
    relative : bool
        Scale the ridge by ``tr(cyy)/d``.

    Returns
    -------
    T : Tensor, shape (d, d)
        ``C_xy (C_yy + γ I)⁻¹``; where that matrix is singular, the least-squares
        solution nearest the identity, ``C_xy S⁺ + (I − P)`` with ``S = C_yy + γ I``
        and ``P = S S⁺`` (eigenvalues below ``1e-10`` of the largest count as zero).

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> cxx = torch.tensor([[1.0, 0.3], [0.3, 2.0]], dtype=torch.float64)
    >>> cyy, cxy = a @ cxx @ a.T, cxx @ a.T          # y = A x exactly
    >>> torch.allclose(lstsq_transform(cyy, cxy) @ a, torch.eye(2, dtype=torch.float64))
    True
    """
    d = cyy.shape[0]
    eye = torch.eye(d, dtype=cyy.dtype, device=cyy.device)
    gamma = ridge * (float(torch.trace(cyy)) / d if relative else 1.0)
    s = cyy + gamma * eye
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    top = float(evals[-1]) if evals.numel() else 0.0
    keep = evals > _EIG_RTOL * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    kept = evecs[:, keep]
    s_pinv = (evecs * inv) @ evecs.T
    proj = kept @ kept.T
    return cxy @ s_pinv + (eye - proj)


@register_aligner
class LstsqAligner(ReferenceAligner):
    """Least-squares linear map of every model's features onto the reference's.

    An ablation of CCA Merge (Horoi et al., ICML 2024) that keeps its dense linear
    maps but drops its correlation criterion: model ``m``'s merge matrix is the
    regression of the reference's centred features ``x`` on the model's ``y``,
    ``T_m = C_xy (C_yy + γ I)⁻¹`` (the linear analogue of Li et al. 2016's
    one-to-one matching), its unmerge ``T_m⁻¹``; the reference gets the identity.
    The score is the mean correlation of each reference feature with the same
    coordinate of ``T_m y``.

    Parameters
    ----------
    ridge : float, default 0.0
        Ridge added to the model covariance, relative to its mean eigenvalue
        (``ridge_mode="relative"``, like ``cca``'s) or absolute. ``0`` is plain least
        squares (the solution nearest the identity where it is not unique); a
        positive ridge shrinks ``T_m``, so even identical models no longer get the
        identity.
    ridge_mode : {"relative", "absolute"}, default "relative"
    rcond : float, default 1e-4
        When inverting ``T_m`` for the unmerge, singular values below
        ``rcond · σ_max(T_m)`` are dropped (a truncated pseudo-inverse) and the
        point's note says so; otherwise the unmerge is exactly ``T_m⁻¹``.

    Examples
    --------
    >>> import torch, autoalign
    >>> autoalign.get_aligner("lstsq", ridge=0.01)
    LstsqAligner(ridge=0.01, ridge_mode='relative', rcond=0.0001)
    >>> _ = torch.manual_seed(0)
    >>> a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> result = autoalign.merge_with_report([a, a], [torch.randn(32, 3)], aligner="lstsq")
    >>> [pp.kind for pp in result.plan.points.values()]
    ['linear']
    """

    name = "lstsq"
    needs = "reference"
    kind = "linear"
    description = "least-squares linear map onto the reference, all-to-one (ablation of CCA Merge)"

    def __init__(self, *, ridge: float = 0.0, ridge_mode: str = "relative", rcond: float = 1e-4) -> None:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if ridge_mode not in ("relative", "absolute"):
            raise ValueError(f"ridge_mode must be 'relative' or 'absolute', got {ridge_mode!r}")
        if isinstance(rcond, bool) or not isinstance(rcond, (int, float)) or not (0 <= rcond < 1):
            raise ValueError(f"rcond must be a number in [0, 1), got {rcond!r}")
        self.ridge = float(ridge)
        self.ridge_mode = ridge_mode
        self.rcond = float(rcond)

    def solve_pair(
        self, point: MergePoint, stats: PointStats, ref: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor, float | None, str | None]:
        cxx, cyy, cxy = stats.cov(ref), stats.cov(m), stats.cov(ref, m)
        t = lstsq_transform(cyy, cxy, ridge=self.ridge, relative=self.ridge_mode == "relative")
        t_inv, dropped = truncated_inverse(t, self.rcond)
        if dropped == point.dim:  # T = 0: the model's features predict nothing of the reference's
            eye = torch.eye(point.dim, dtype=torch.float64, device=cxx.device)
            return eye, eye, None, f"model {m}: features uncorrelated with the reference's; identity used"
        note = None
        if dropped:
            note = (
                f"model {m}: T is ill-conditioned ({dropped} of {point.dim} singular values below "
                f"rcond·σ_max = {self.rcond:g}·σ_max); unmerge is its truncated pseudo-inverse"
            )
        return t, t_inv, matched_correlation(cxx, cyy, cxy, t), note
