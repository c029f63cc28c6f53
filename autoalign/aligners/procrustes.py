"""``procrustes``: the best orthogonal map onto the reference (orthogonal Procrustes), all-to-one.

An ablation between activation matching and CCA Merge (Horoi et al., ICML 2024):
a rotation/reflection of the feature space has more freedom than a permutation
(Li et al. 2016) but, unlike CCA's map, preserves the geometry of the features.
For a merge point with reference features ``x`` and model features ``y``, the
orthogonal ``Q`` minimising ``E‖x − μ_x − Q (y − μ_y)‖²`` is ``Q = U Vᵀ`` from the SVD
``C_xy = U S Vᵀ`` of the cross-covariance (Schönemann 1966); ``merges[m] = Q``,
``unmerges[m] = Qᵀ``.

Relation to ``cca``: with ridged covariances ``S = C + γ I`` and ``γ → ∞``, CCA's
whitening ``S^{-1/2}`` tends to ``γ^{-1/2} I``, so its map
``S_xx^{1/2} U' V'ᵀ S_yy^{-1/2}`` tends to ``(γ_x/γ_y)^{1/2} · Q``, with an
``O(1/γ)`` error: exactly ``Q`` with ``ridge_mode="absolute"`` and
``(tr C_xx / tr C_yy)^{1/2} · Q`` with the default relative ridge.
"""

from __future__ import annotations

import torch

from ..spec import MergePoint
from ..stats import PointStats
from ..vocab import SelfMoments, check_choice
from .base import ReferenceAligner, permutation_matrix
from .linalg import match_permutation, nearest_rotary, polar_nearest_identity, psd_noise
from .lstsq import matched_correlation
from .registry import register_aligner

__all__ = ["ProcrustesAligner", "permutation_procrustes", "procrustes_transform"]

#: Singular values of the cross-covariance below this fraction of the largest count as zero.
_SV_RTOL = 1e-10


def procrustes_transform(cxy: torch.Tensor, noise: float = 0.0, samples: int | None = None) -> tuple[torch.Tensor, int]:
    """Orthogonal Procrustes map of ``y``-features onto ``x``-features.

    Parameters
    ----------
    cxy : Tensor, shape (d, d)
        Cross-covariance ``E[(x − μ_x)(y − μ_y)ᵀ]`` (or a cross-correlation).
    noise : float, default 0
        Rounding level of the statistics (:func:`~autoalign.aligners.linalg.psd_noise`
        of the covariances): singular values within 10 times it count as zero too.
    samples : int, optional
        The number of samples behind ``cxy``: with fewer than about a quarter of ``d``,
        its rank is at most ``samples − 1`` and ``Q`` is computed without a (d, d) SVD
        (the same ``Q``; see :func:`~autoalign.aligners.linalg.polar_nearest_identity`).

    Returns
    -------
    Q : Tensor, shape (d, d)
        The orthogonal matrix maximising ``tr(Qᵀ C_xy)``: ``U Vᵀ`` from
        ``C_xy = U S Vᵀ``. When ``C_xy`` is rank-deficient (singular values below
        ``1e-10`` of the largest count as zero) the maximiser is not unique on the
        null spaces; of those, the one nearest the identity is used, so
        identical models get ``Q = I`` even with dead units.
    rank : int
        The numerical rank of ``C_xy``.

    Examples
    --------
    >>> import torch
    >>> q = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)   # a rotation
    >>> cxx = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> Q, rank = procrustes_transform(cxx @ q)      # y = qᵀ x exactly, so C_xy = C_xx q
    >>> torch.allclose(Q, q), rank
    (True, 2)
    """
    bound = None if samples is None else max(0, int(samples) - 1)
    q, _, rank = polar_nearest_identity(cxy, _SV_RTOL, 10.0 * noise, rank_bound=bound)
    return q, rank


def permutation_procrustes(cxy: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes within the permutations: the ``P`` maximising ``tr(Pᵀ C_xy)``.

    Among permutations, ``E‖x − P y‖² = E‖x‖² + E‖y‖² − 2 tr(Pᵀ C_xy)``, so the best
    one is the assignment maximising ``Σ_i C_xy[i, perm(i)]`` (Hungarian). Where that
    is not unique (dead or duplicated units tie), the identity's entries win, so a
    model against its own copy gets ``P = I`` (a covariance has
    ``C_ij ≤ (C_ii + C_jj) / 2``: the identity is always a maximiser then).

    Parameters
    ----------
    cxy : Tensor, shape (d, d)
        Cross-covariance ``E[(x − μ_x)(y − μ_y)ᵀ]`` (or a cross-correlation).

    Returns
    -------
    P : Tensor, shape (d, d), float64
        ``(P y)_i = y_{perm(i)}``.

    Examples
    --------
    >>> import torch
    >>> c = torch.tensor([[0.1, 2.0, 0.0], [0.0, 0.2, 3.0], [1.0, 0.0, 0.3]], dtype=torch.float64)
    >>> permutation_procrustes(c).argmax(1).tolist()
    [1, 2, 0]
    """
    c = cxy.detach().double().cpu()
    scale = float(c.abs().max()) if c.numel() else 0.0
    tie = 1e-9 * scale  # far below any difference the statistics resolve, decisive between exact ties
    return permutation_matrix(match_permutation(c + tie * torch.eye(c.shape[0], dtype=c.dtype)))


@register_aligner
class ProcrustesAligner(ReferenceAligner):
    """Orthogonal Procrustes: the rotation/reflection of every model's features closest to the reference's.

    Model ``m``'s merge matrix is ``Q_m = U Vᵀ`` from the SVD ``C_xy = U S Vᵀ`` of the
    cross-covariance of the reference's centred features ``x`` and the model's ``y``
    (Schönemann 1966), its unmerge ``Q_mᵀ``; the reference gets the identity. It
    sits between activation matching (Li et al. 2016), whose permutations are
    orthogonal too, and CCA Merge (Horoi et al., ICML 2024), whose map tends to
    ``Q_m`` times a scalar as its ridge grows. The score is the mean correlation of
    each reference feature with the same coordinate of ``Q_m y``. At a ``rotary`` point
    ``Q_m`` maximises the same ``tr(Qᵀ C_xy)`` among rotations of the point's coordinate
    pairs (per pair the angle of ``atan2(c − b, a + d)`` of the block ``[[a, b], [c, d]]``).

    Parameters
    ----------
    standardize : bool, default False
        Take the SVD of the cross-correlation ``D_x^{-1/2} C_xy D_y^{-1/2}`` (the
        features' variances floored as in :meth:`autoalign.stats.PointStats.corr`)
        instead of the cross-covariance, so every feature counts equally, as in
        activation matching. ``Q_m`` is still applied to the raw features (it is the
        orthogonal map chosen by a different criterion, not the optimum in the
        standardised coordinates mapped back, which would not be orthogonal).
    permutation_points : {"assign", "project"}, default "assign"
        At points that admit only permutations (depthwise convolutions, unfolded
        BatchNorm, gates): ``"assign"`` solves Procrustes within the permutations, the
        assignment maximising ``tr(Pᵀ C_xy)`` (:func:`permutation_procrustes`), which
        reads only the cross-covariance and the variances, so the statistics pass
        skips those points' (d, d) self-products and the solve their SVDs;
        ``"project"`` takes the dense ``U Vᵀ`` and lets the engine project it onto the
        nearest permutation (the behaviour before 2026-12-01).

    Examples
    --------
    >>> import torch, autoalign
    >>> autoalign.get_aligner("procrustes", standardize=True)
    ProcrustesAligner(standardize=True, permutation_points='assign')
    >>> _ = torch.manual_seed(0)
    >>> a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> result = autoalign.merge_with_report([a, a], [torch.randn(32, 3)], aligner="procrustes")
    >>> [pp.kind for pp in result.plan.points.values()]
    ['orthogonal']
    """

    name = "procrustes"
    needs = "reference"
    kind = "orthogonal"
    description = "orthogonal Procrustes on the cross-covariance, all-to-one (Schönemann 1966)"

    def __init__(self, *, standardize: bool = False, permutation_points: str = "assign") -> None:
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize must be True or False, got {standardize!r}")
        check_choice("permutation_points", permutation_points, ("assign", "project"))
        self.standardize = standardize
        self.permutation_points = permutation_points

    def _assigns(self, point: MergePoint) -> bool:
        return self.permutation_points == "assign" and getattr(point, "kind", None) == "permutation"

    def self_moments_at(self, point: MergePoint) -> SelfMoments:
        """Variances only where the point admits nothing but permutations (the assignment reads
        the cross-covariance alone); full covariances elsewhere."""
        return "diagonal" if self._assigns(point) else "full"

    def plan_kind(self, point: MergePoint) -> str:
        """At ``permutation`` and ``rotary`` points the solve stays within the point's group."""
        kind = getattr(point, "kind", None)
        return kind if kind == "rotary" or self._assigns(point) else self.kind

    def solve_pair(
        self, point: MergePoint, stats: PointStats, ref: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor, float, str | None]:
        if self._assigns(point):  # the maximiser of tr(Pᵀ C) among permutations
            corr = stats.corr(ref, m)
            p = permutation_procrustes(corr if self.standardize else stats.cov(ref, m)).to(corr.device)
            return p, p.T.contiguous(), float((corr * p).sum() / point.dim), None
        cxx, cyy, cxy = stats.cov(ref), stats.cov(m), stats.cov(ref, m)
        if "noise" not in self.reference_cache:  # the reference's rounding level: once per point
            self.reference_cache["noise"] = psd_noise(stats.corr(ref, ref) if self.standardize else cxx)
        ref_noise = self.reference_cache["noise"]
        target = stats.corr(ref, m) if self.standardize else cxy
        if getattr(point, "kind", None) == "rotary":  # the maximiser of tr(Qᵀ C) among rotations of the point's pairs
            q = nearest_rotary(target, point.pairs)
            return q, q.T.contiguous(), matched_correlation(cxx, cyy, cxy, q), None
        if self.standardize:
            q, rank = procrustes_transform(target, max(ref_noise, psd_noise(stats.corr(m, m))), stats.n)
        else:
            q, rank = procrustes_transform(target, max(ref_noise, psd_noise(cyy)), stats.n)
        note = None
        if rank < point.dim:
            note = f"model {m}: cross-covariance of rank {rank} < {point.dim}; on its null space the rotation nearest the identity"
        return q, q.T.contiguous(), matched_correlation(cxx, cyy, cxy, q), note
