"""``mcca``: multi-view (generalised) CCA Merge — every model into one shared space.

CCA Merge (Horoi et al., ICML 2024) aligns every model to a *reference*; ``mcca``
treats the ``N`` models symmetrically with the MAXVAR generalised CCA
(Carroll 1968; Kettenring 1971) and then chooses one merged coordinate frame
from all models at once.

Algorithm, for one merge point of width ``d`` (all matrices float64):

1. **Whitening.** ``S_m = C_mm + γ_m I`` with ``γ_m = ridge · tr(C_mm) / d``
   (``ridge_mode="relative"``, default) or ``γ_m = ridge``; ``W_m = S_m^{-1/2}``.
2. **MAXVAR.** The ``(N d, N d)`` block matrix ``B`` with blocks
   ``B_ij = W_i C_ij W_j`` for ``i ≠ j`` and ``B_mm = W_m S_m W_m = I``: the
   whitened form of the regularised MAXVAR problem ``C v = λ diag(S_1 … S_N) v``
   (``C`` the full covariance), which is how CCA itself regularises — with the
   ridged ``S_m`` as the normaliser. Its top-``d`` eigenvectors ``V``
   (``N d × d``) split into per-model blocks ``V_m`` (``d × d``). An eigenvalue
   is ``λ = 1 + (N − 1) ρ̄`` where ``ρ̄`` is the average pairwise correlation of
   the canonical variate, so the reported score is ``mean((λ − 1) / (N − 1))``
   clipped to ``[0, 1]`` (for ``N = 2``: exactly the mean canonical correlation
   of CCA Merge with the same ridge).
3. **Shared space.** Model ``m``'s projection into the shared space is
   ``A_m = O_mᵀ W_m`` where ``O_m`` is the orthogonal polar factor of ``V_m``
   (``blocks="orthogonal"``, default), or ``A_m = V_mᵀ W_m`` (``blocks="raw"``, the
   textbook canonical weights). In the noise-free case (and always for ``N = 2``
   without ridge) ``V_m`` is an orthogonal matrix times ``1/√N``, so both agree
   up to scale; the polar factor keeps ``A_m`` invertible when ``V_m`` is
   ill-conditioned (eigenvalues near 1 whose eigenvectors concentrate on a few
   models, which happens for ``N ≥ 3``). For ``N = 2``, ``A_0^{-1} A_1`` is
   exactly CCA Merge's ``T = S_xx^{1/2} U Vᵀ S_yy^{-1/2}`` (same ridge).
   ``B_m = A_m^{-1}`` maps the shared space back into model ``m``'s coordinates:
   ``B_m = S_m^{1/2} O_m`` in closed form for orthogonal blocks,
   ``torch.linalg.solve(A_m, I)`` for raw blocks.
4. **Merged frame** ``Q`` (``d × d``), common to all models: ``M_m = Q A_m``.
   Any invertible ``Q`` merges a noise-free set exactly; the choice decides which
   coordinates the nonlinearities and the averaging see. We use the polar form
   ``Q = R K`` with

   * ``K = (Σ_m w_m B_mᵀ B_m)^{1/2}`` (symmetric positive definite): the
     weighted mean of the metrics the models' own coordinates induce on the
     shared space, so for every sample on which the models agree in the shared
     space ``‖y‖² = Σ_m w_m ‖x_m‖²`` — merged features have the models' mean
     scale, layer by layer;
   * ``R = polar(Σ_m w_m B_m K)`` (orthogonal Procrustes): the rotation that
     brings ``y = Q s`` closest to the models' own coordinates ``x_m = B_m s``,
     ``min_R Σ_m w_m ‖R K − B_m‖_F²`` (the shared space is white).

   Why not the plain least-squares frame ``Q = Σ_m w_m B_m`` (the mean of the
   models' coordinates) or ``Q = (Σ_m w_m A_m)^{-1}``: for models trained from
   different seeds the ``B_m`` differ by (near-)permutations, and the mean of
   ``I`` and a permutation with an even cycle is singular — the merged frame
   would collapse. ``R K`` is invertible by construction
   (``cond(Q) = cond(K) ≤ max_m cond(S_m^{1/2})``), equals ``A^{-1}`` when all
   models are identical (so ``merge([A] * N)`` uses identity transforms, exactly
   like the reference in CCA Merge), and — like the whole plan — depends only on
   the top-``d`` eigenspace, not on the basis ``eigh`` returns for it.

   ``frame="reference"`` uses ``Q = B_ref`` instead (``M_ref = I``): the models
   still meet in the symmetric shared space, but the merged coordinates are the
   reference's. At points that only admit permutations (after ReLU), where the
   engine projects every ``M_m`` onto its nearest permutation, a neuron frame
   matters more than symmetry; the mean frame mixes the models' neurons.
5. **Unmerge** ``U_m = M_m^{-1} = B_m Q^{-1}`` with ``Q^{-1} = K^{-1} Rᵀ``
   (``K^{-1}`` from the same eigendecomposition as ``K``): no general inverse is
   formed for orthogonal blocks; raw blocks use ``torch.linalg.solve`` for
   ``B_m``.

The MAXVAR problem is solved by a dense ``eigh`` of the ``(N d, N d)`` matrix:
``O((N d)³)`` time, a few seconds at ``N d ≈ 4000`` on a CPU. A consensus term
``ε · 1 1ᵀ ⊗ I`` is added to ``B`` before ``eigh`` as a tie-breaker: when
eigenvalues are tied at the boundary of the top-``d`` subspace (constant
features, identical models), it picks the variates that treat all models alike.
``ε = 1e-9``, or ten times the covariances' rounding level when that is larger
(float32 feature products leave negative eigenvalues of ~1e-7 where there should
be zeros; in whitened units they would otherwise pick a "difference" variate, a
reflection, over the consensus one); elsewhere its effect is of order ``ε``.

The shared space is found symmetrically (unweighted); the merge weights ``w_m``
enter through the frame ``Q``. The ``reference`` of the problem is used only
with ``frame="reference"``.

References
----------
.. [1] J. D. Carroll, "Generalization of canonical correlation analysis to three
   or more sets of variables", Proc. 76th Annual Convention of the APA, 1968.
.. [2] J. R. Kettenring, "Canonical analysis of several sets of variables",
   Biometrika 58(3), 1971.
.. [3] S. Horoi, A. M. Orozco Camacho, E. Belilovsky, G. Wolf, "Harmony in
   Diversity: Merging Neural Networks with Canonical Correlation Analysis",
   ICML 2024 (arXiv 2407.05385).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import AlignProblem, PointPlan, PointwiseAligner, identity_plan
from .linalg import psd_noise
from .registry import register_aligner

__all__ = ["MCCAAligner", "mcca_transforms"]

#: Weight of the consensus tie-breaker ``1 1ᵀ ⊗ I`` added to the MAXVAR matrix.
_TIE_BREAK = 1e-9
#: Eigenvalues of ``S_m`` are floored at this fraction of their mean (only matters with ``ridge=0``).
_EIG_FLOOR = 1e-12


def _polar(m: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``U Vᵀ`` of ``m = U Σ Vᵀ``, shape (d, d)."""
    u, _, vt = torch.linalg.svd(m)
    return u @ vt


def _sym_eig_powers(s: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s^{1/2}, s^{-1/2})`` of a symmetric PSD matrix (eigenvalues floored at ``floor``)."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    evals = torch.clamp(evals, min=floor)
    half = evals.sqrt()
    return (evecs * half) @ evecs.T, (evecs / half) @ evecs.T


def mcca_transforms(
    cov: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    ridge: float = 0.01,
    relative: bool = True,
    blocks: str = "orthogonal",
    frame: str = "mean",
    reference: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Multi-view CCA (MAXVAR) merge transforms of ``N`` models from their covariances.

    Parameters
    ----------
    cov : N × N nested sequence of Tensor, each (d, d)
        ``cov[i][j] = E[(x_i − μ_i)(x_j − μ_j)ᵀ]``; ``cov[j][i]`` must be
        ``cov[i][j]ᵀ`` (only ``i <= j`` is read).
    weights : sequence of float or Tensor (N,), optional
        Merge weights (normalised here; uniform by default). They choose the
        merged frame, not the shared space.
    ridge : float, default 0.01
        Ridge ``γ`` added to every ``C_mm``: ``ridge · tr(C_mm)/d`` when
        ``relative``, else ``ridge``.
    relative : bool, default True
    blocks : {"orthogonal", "raw"}, default "orthogonal"
        Per-model shared-space maps ``A_m = O_mᵀ W_m`` with ``O_m`` the polar
        factor of ``V_m`` (always invertible), or the raw canonical weights
        ``A_m = V_mᵀ W_m``.
    frame : {"mean", "reference"}, default "mean"
        Merged coordinates: the mean frame ``Q = R K`` (no model privileged) or
        the frame of model ``reference`` (``Q = A_ref^{-1}``, so ``M_ref = I``).
    reference : int, default 0
        Used only with ``frame="reference"``.

    Returns
    -------
    merges : list of N Tensor, each (d, d)
        ``M_m = Q A_m``: model ``m``'s coordinates → merged coordinates.
    unmerges : list of N Tensor, each (d, d)
        ``U_m = M_m^{-1} = A_m^{-1} Q^{-1}``.
    rho : Tensor, shape (d,)
        Average pairwise canonical correlation of each shared variate,
        ``(λ − 1)/(N − 1)`` clipped to ``[0, 1]``, descending (ones for ``N = 1``).

    Raises
    ------
    ValueError
        On bad shapes or options.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(500, 4, dtype=torch.float64)
    >>> q = torch.randn(4, 4, dtype=torch.float64)
    >>> xs = [x, x @ q.T]                               # model 1 = mixed model 0
    >>> xs = [v - v.mean(0) for v in xs]
    >>> cov = [[a.T @ b / 500 for b in xs] for a in xs]
    >>> m, u, rho = mcca_transforms(cov, ridge=0.0)
    >>> bool(torch.allclose(m[1] @ q, m[0], atol=1e-6)), round(float(rho.min()), 6)
    (True, 1.0)
    """
    if blocks not in ("orthogonal", "raw"):
        raise ValueError(f"blocks must be 'orthogonal' or 'raw', got {blocks!r}")
    if frame not in ("mean", "reference"):
        raise ValueError(f"frame must be 'mean' or 'reference', got {frame!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    n = len(cov)
    if frame == "reference" and not 0 <= reference < n:
        raise ValueError(f"reference must be in [0, {n}), got {reference!r}")
    if n == 0 or any(len(row) != n for row in cov):
        raise ValueError("cov must be a non-empty N × N nested sequence of (d, d) tensors")
    c00 = cov[0][0]
    d = c00.shape[0]
    dt, dev = torch.float64, c00.device
    eye = torch.eye(d, dtype=dt, device=dev)
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=dt, device=dev)
    else:
        w = torch.as_tensor(weights, dtype=dt).to(dev)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
        w = w / w.sum()
    if n == 1:
        return [eye.clone()], [eye.clone()], torch.ones(d, dtype=dt, device=dev)

    # 1. whitening
    whiten, unwhiten = [], []
    noise = 0.0
    for m in range(n):
        c = cov[m][m].to(dt)
        if c.shape != (d, d):
            raise ValueError(f"cov[{m}][{m}] has shape {tuple(c.shape)}, expected {(d, d)}")
        mean_eig = float(torch.trace(c)) / d
        gamma = ridge * mean_eig if relative else ridge
        floor = max(_EIG_FLOOR * max(mean_eig, 0.0), torch.finfo(dt).tiny)
        s_half, s_ihalf = _sym_eig_powers(c + gamma * eye, floor)
        unwhiten.append(s_half)
        whiten.append(s_ihalf)
        # rounding in the products (a negative eigenvalue of c), as a shift of a whitened
        # correlation: the consensus tie-breaker below must outweigh it
        e = psd_noise(c)
        noise = max(noise, e / max(gamma - e, floor)) if e > 0 else noise

    # 2. MAXVAR: top-d eigenvectors of the whitened block matrix
    big = torch.empty(n * d, n * d, dtype=dt, device=dev)
    for i in range(n):
        for j in range(i, n):
            blk = eye if i == j else whiten[i] @ cov[i][j].to(dt) @ whiten[j]
            big[i * d:(i + 1) * d, j * d:(j + 1) * d] = blk
            big[j * d:(j + 1) * d, i * d:(i + 1) * d] = blk.T
    big = (big + big.T) / 2
    consensus = torch.kron(torch.ones(n, n, dtype=dt, device=dev), eye)
    _, evecs = torch.linalg.eigh(big + max(_TIE_BREAK, 10.0 * noise) * consensus)
    v = evecs[:, -d:].flip(1)  # (N d, d), descending eigenvalues
    lam = torch.einsum("ik,ij,jk->k", v, big, v)  # Rayleigh quotients of the unperturbed B
    rho = torch.clamp((lam - 1.0) / (n - 1), 0.0, 1.0)

    # 3. per-model maps into (A_m) and out of (B_m = A_m^{-1}) the shared space
    a_maps, b_maps = [], []
    for m in range(n):
        vm = v[m * d:(m + 1) * d]
        if blocks == "orthogonal":
            om = _polar(vm)
            a_maps.append(om.T @ whiten[m])
            b_maps.append(unwhiten[m] @ om)
        else:
            am = vm.T @ whiten[m] * (n ** 0.5)
            a_maps.append(am)
            b_maps.append(torch.linalg.solve(am, eye))

    # 4. merged frame Q = R K (or the reference's, Q = B_ref)
    if frame == "reference":
        q, q_inv = b_maps[reference], a_maps[reference]
    else:
        metric = sum(w[m] * b_maps[m].T @ b_maps[m] for m in range(n))
        k_half, k_ihalf = _sym_eig_powers(metric, torch.finfo(dt).tiny)
        r = _polar(sum(w[m] * b_maps[m] for m in range(n)) @ k_half)
        q, q_inv = r @ k_half, k_ihalf @ r.T

    # 5. merge / unmerge
    merges = [q @ a for a in a_maps]
    unmerges = [b @ q_inv for b in b_maps]
    return merges, unmerges, rho


@register_aligner
class MCCAAligner(PointwiseAligner):
    """Multi-view CCA Merge: all models into one shared space (MAXVAR generalised CCA), no reference.

    See the module docstring for the algorithm and the choice of merged frame.

    Parameters
    ----------
    ridge : float, default 0.01
        Ridge added to every covariance, relative to its mean eigenvalue
        (``ridge_mode="relative"``) or absolute.
    ridge_mode : {"relative", "absolute"}, default "relative"
    blocks : {"orthogonal", "raw"}, default "orthogonal"
        Per-model shared-space maps from the polar factor of the MAXVAR blocks
        (always invertible) or the raw canonical weights.
    frame : {"mean", "reference"}, default "mean"
        Merged coordinates: the symmetric mean frame, or the problem's reference
        model's frame (its merge is the identity).

    Notes
    -----
    Needs the cross-covariance of every pair of models (``needs="all_pairs"``):
    ``O(N² d²)`` statistics memory per merge point and one ``eigh`` of size
    ``N d`` per point. Points where some model's features are constant get the
    identity.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("mcca", ridge=0.1)
    MCCAAligner(ridge=0.1, ridge_mode='relative', blocks='orthogonal', frame='mean')
    """

    name = "mcca"
    needs = "all_pairs"
    description = "multi-view CCA Merge (MAXVAR generalised CCA): all models into one shared space, no reference"

    def __init__(
        self, *, ridge: float = 0.01, ridge_mode: str = "relative", blocks: str = "orthogonal", frame: str = "mean"
    ) -> None:
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge!r}")
        if ridge_mode not in ("relative", "absolute"):
            raise ValueError(f"ridge_mode must be 'relative' or 'absolute', got {ridge_mode!r}")
        if blocks not in ("orthogonal", "raw"):
            raise ValueError(f"blocks must be 'orthogonal' or 'raw', got {blocks!r}")
        if frame not in ("mean", "reference"):
            raise ValueError(f"frame must be 'mean' or 'reference', got {frame!r}")
        self.ridge = float(ridge)
        self.ridge_mode = ridge_mode
        self.blocks = blocks
        self.frame = frame

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        assert stats is not None
        n = problem.n_models
        if n == 1:
            return identity_plan(point.dim, n, note="a single model; identity used")
        covs = [[None] * n for _ in range(n)]
        for i in range(n):
            covs[i][i] = stats.cov(i)
            if float(torch.trace(covs[i][i])) <= 0:
                return identity_plan(point.dim, n, note=f"model {i}'s features are constant; identity used")
        for i in range(n):
            for j in range(i + 1, n):
                covs[i][j] = stats.cov(i, j)
                covs[j][i] = covs[i][j].T
        merges, unmerges, rho = mcca_transforms(
            covs, problem.weights, ridge=self.ridge, relative=self.ridge_mode == "relative", blocks=self.blocks,
            frame=self.frame, reference=problem.reference,
        )
        bad = [m for m in range(n) if not (bool(torch.isfinite(merges[m]).all()) and bool(torch.isfinite(unmerges[m]).all()))]
        if bad:
            return identity_plan(point.dim, n, note=f"non-finite multi-view CCA transforms for models {bad}; identity used")
        return PointPlan(merges, unmerges, kind="linear", score=float(rho.mean()))
