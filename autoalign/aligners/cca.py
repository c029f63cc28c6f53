"""``cca``: CCA Merge (Horoi et al., ICML 2024), all-to-one.

For a merge point with reference features ``x`` and model features ``y``:

* ``S_xx = cov(x) + γ_x I``, ``S_yy = cov(y) + γ_y I``, ``S_xy = cov(x, y)``;
* ``U Σ Vᵀ = svd(S_xx^{-1/2} S_xy S_yy^{-1/2})`` (``Σ`` holds the canonical correlations);
* ``T = S_xx^{1/2} U Vᵀ S_yy^{-1/2}`` maps the model's features into the
  reference's coordinates, ``T⁻¹ = S_yy^{1/2} V Uᵀ S_xx^{-1/2}`` maps back; no
  explicit inverse is formed.

``U Vᵀ`` is the polar factor of the whitened cross-covariance. On directions whose
canonical correlation is zero (dead units, constant features, more features than
samples) any rotation is optimal and an SVD picks one at random — and float32 feature
products turn those zeros into ±1e-7-sized values, the negative ones into reflections.
So correlations below ``1e-6`` of the largest, or within ten times the rounding level
of the covariances (their most negative eigenvalue, relative to the ridged ones), count
as zero, and on those directions the rotation nearest the identity is used (:func:`~autoalign.aligners.linalg.polar_nearest_identity`),
so a model aligned to its own copy gets ``T = I`` in every direction.

The ridge ``γ`` is relative to the covariance's mean eigenvalue
(``γ_x = ridge · tr(cov(x)) / d``), so one default works at any feature scale;
``ridge_mode="absolute"`` uses ``γ = ridge`` as in the authors' code. As
``ridge → ∞``, ``T`` tends to ``√(γ_x/γ_y) · Q`` with ``Q`` the orthogonal Procrustes
solution of the cross-covariance (the ``procrustes`` aligner): exactly ``Q`` with
``ridge_mode="absolute"``, ``Q`` scaled by ``√(tr cov(x) / tr cov(y))`` with the
relative ridge (tests/test_lstsq_procrustes.py pins both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import ReferenceAligner
from .linalg import polar_nearest_identity
from .registry import register_aligner

__all__ = ["CCAAligner", "cca_transform"]

#: Eigenvalues of the ridged covariances are floored at this fraction of their mean.
_EIG_FLOOR = 1e-12
#: Canonical correlations below this fraction of the largest count as zero: on those
#: directions any rotation is optimal and the one nearest the identity is used.
_RHO_RTOL = 1e-6
#: Canonical correlations within this many times the covariances' noise level count as zero.
_NOISE_FACTOR = 10.0
#: ... but never more than this: statistics noisier than that are not aligned by a threshold.
_RHO_TOL_MAX = 0.1


class _Roots(NamedTuple):
    """A ridged covariance ``S = C + γ I = E diag(r²) Eᵀ`` by its eigenvectors ``E`` and the roots
    ``r`` of its (floored) eigenvalues, and its noise level.

    ``noise`` is ``max(0, −λ_min(C)) / λ_min(S)``: a covariance is positive
    semi-definite, so a negative eigenvalue is rounding in the feature products
    (float32 products leave ~1e-7 of the largest eigenvalue), and divided by the
    smallest eigenvalue of ``S`` it bounds how much that rounding moves a whitened
    cross-covariance, i.e. the canonical correlations that are indistinguishable from 0.
    """

    vecs: torch.Tensor
    root: torch.Tensor
    noise: float

    @property
    def half(self) -> torch.Tensor:
        """``S^{1/2}``, shape (d, d)."""
        return (self.vecs * self.root) @ self.vecs.T

    @property
    def inv_half(self) -> torch.Tensor:
        """``S^{-1/2}``, shape (d, d)."""
        return (self.vecs / self.root) @ self.vecs.T


def _ridged_roots(c: torch.Tensor, ridge: float, relative: bool) -> _Roots:
    """Eigenbasis, roots and noise level of the ridged covariance ``S = c + γ I`` (see :class:`_Roots`)."""
    d = c.shape[0]
    g = ridge * (float(torch.trace(c)) / d if relative else 1.0)
    s = c + g * torch.eye(d, dtype=c.dtype, device=c.device)
    evals, evecs = torch.linalg.eigh(s)
    # eigenvalues floored relative to the mean one, so rank-deficient covariances (dead
    # units, duplicated channels, fewer samples than channels) stay finite even at ridge=0
    floor = max(_EIG_FLOOR * float(evals.sum()) / d, torch.finfo(s.dtype).tiny)
    lam_min = float(evals[0]) if d else 0.0
    evals = torch.clamp(evals, min=floor)
    noise = max(0.0, g - lam_min) / float(evals[0]) if d else 0.0
    return _Roots(evecs, evals.sqrt(), noise)


def cca_transform(
    cxx: torch.Tensor,
    cyy: torch.Tensor,
    cxy: torch.Tensor,
    *,
    ridge: float = 0.01,
    relative: bool = True,
    x_roots: _Roots | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CCA alignment of ``y``-features onto ``x``-features from covariances.

    Computed in the ridged covariances' eigenbases (``S_xx = E_x diag(g²) E_xᵀ``,
    ``S_yy = E_y diag(l²) E_yᵀ``): the whitened cross-covariance is
    ``K = diag(1/g) E_xᵀ S_xy E_y diag(1/l)``, its polar factor ``Q`` (the rotation
    nearest the identity of the symmetric whitening on zero correlations,
    :func:`~autoalign.aligners.linalg.polar_nearest_identity`), and
    ``T = E_x diag(g) Q diag(1/l) E_yᵀ``, ``T⁻¹ = E_y diag(l) Qᵀ diag(1/g) E_xᵀ`` — the
    same maps as with symmetric square roots, in fewer products.

    Parameters
    ----------
    cxx, cyy : Tensor, shape (d, d)
        Covariances of the reference features ``x`` and of the model features ``y``.
    cxy : Tensor, shape (d, d)
        Cross-covariance ``E[(x − μ_x)(y − μ_y)ᵀ]``.
    ridge : float
        Regularisation ``γ`` (relative to the mean eigenvalue when ``relative``).
    relative : bool
        Scale the ridge by ``tr(c)/d`` of each covariance.
    x_roots : _Roots, optional
        The reference's eigenbasis and roots (they do not depend on the model),
        computed once per point by :class:`CCAAligner`; computed here when omitted.

    Returns
    -------
    T : Tensor, shape (d, d)
        Maps ``y`` into ``x``'s coordinates.
    T_inv : Tensor, shape (d, d)
        Its inverse, ``S_yy^{1/2} V Uᵀ S_xx^{-1/2}``.
    rho : Tensor, shape (d,)
        Canonical correlations, descending.
    """
    rx = x_roots if x_roots is not None else _ridged_roots(cxx, ridge, relative)
    ry = _ridged_roots(cyy, ridge, relative)
    ex, g, ey, l = rx.vecs, rx.root, ry.vecs, ry.root
    # canonical correlations at the covariances' rounding level are zeros: an SVD would
    # give them arbitrary directions (and a negative rounding eigenvalue a reflection)
    tol = min(_RHO_TOL_MAX, _NOISE_FACTOR * max(rx.noise, ry.noise))
    k = (ex.T @ cxy @ ey) / torch.outer(g, l)
    # on zero correlations, the rotation nearest the identity *of the symmetric whitening*, i.e.
    # nearest E_xᵀ E_y in these bases (polar_nearest_identity of E_x K E_yᵀ, rotated). (The
    # polar factor from eigh(KᵀK) would halve this step, but K is rank-deficient at most points
    # of real networks — dependent or dead features — where only the SVD is accurate.)
    q, rho, _ = polar_nearest_identity(k, _RHO_RTOL, tol, identity=ex.T @ ey)
    t = (ex * g) @ (q / l) @ ey.T
    t_inv = (ey * l) @ (q.T / g) @ ex.T
    return t, t_inv, rho


@register_aligner
class CCAAligner(ReferenceAligner):
    """CCA Merge: align every model to the reference with canonical correlation analysis.

    Parameters
    ----------
    ridge : float, default 0.01
        Ridge added to both covariances, relative to their mean eigenvalue
        (``ridge_mode="relative"``) or absolute.
    ridge_mode : {"relative", "absolute"}, default "relative"

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("cca", ridge=0.1)
    CCAAligner(ridge=0.1, ridge_mode='relative')
    """

    name = "cca"
    needs = "reference"
    kind = "linear"
    description = "CCA Merge (Horoi et al. 2024): canonical correlation alignment to the reference, all-to-one"

    def __init__(self, *, ridge: float = 0.01, ridge_mode: str = "relative") -> None:
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge!r}")
        if ridge_mode not in ("relative", "absolute"):
            raise ValueError(f"ridge_mode must be 'relative' or 'absolute', got {ridge_mode!r}")
        self.ridge = float(ridge)
        self.ridge_mode = ridge_mode

    def solve_pair(self, point: MergePoint, stats: PointStats, ref: int, m: int) -> tuple[torch.Tensor, torch.Tensor, float, None]:
        relative = self.ridge_mode == "relative"
        if "roots" not in self.reference_cache:  # the reference's roots: once per point
            self.reference_cache["roots"] = _ridged_roots(stats.cov(ref), self.ridge, relative)
        t, t_inv, rho = cca_transform(
            stats.cov(ref), stats.cov(m), stats.cov(ref, m), ridge=self.ridge, relative=relative, x_roots=self.reference_cache["roots"]
        )
        return t, t_inv, float(rho.mean()), None
