"""``ot``: OT fusion on activations (Singh & Jaggi, NeurIPS 2020), all-to-one.

Singh, S. P. & Jaggi, M., "Model Fusion via Optimal Transport", NeurIPS 2020
(activation-based variant). For a merge point with reference features ``x``
(shape (d,)) and model-``m`` features ``y`` (shape (d,)), the ground cost between
reference feature ``i`` and model feature ``j`` is the mean squared distance of
their activation vectors over the calibration samples,

``C[i, j] = E[(x_i − y_j)²] = E[x_i²] + E[y_j²] − 2 E[x_i y_j]``,

computed from the streamed second moments (``cov + μ μᵀ``), so no activation is
stored. With uniform marginals ``1/d`` the optimal transport plan ``T``
(shape (d, d), rows = reference features, columns = model features) is solved
exactly (``ot.emd``, network simplex) or entropically (``ot.sinkhorn``).
``d · T`` (rows sum to one) is the merge matrix: the merged feature ``i`` is the
transport-weighted average of the model features sent to reference feature ``i``.

* ``method="emd"``: with uniform marginals the optimal vertex is a permutation
  matrix divided by ``d``, so the merge is a permutation ``P`` (snapped to exact
  0/1) and the unmerge its transpose ``Pᵀ = P⁻¹`` (kind ``"permutation"``).
* ``method="sinkhorn"``: ``d · T`` is a dense doubly-stochastic matrix (rows
  renormalised to sum to exactly one). By default the unmerge is its inverse,
  computed with ``torch.linalg.pinv`` (the exact inverse when ``d · T`` is
  invertible, the Moore–Penrose pseudo-inverse when it is numerically singular,
  which the plan's note reports, as it does a Sinkhorn run that stopped before
  its column sums reached one); ``unmerge="transpose"`` uses ``(d · T)ᵀ`` as in
  the paper's algorithm (the incoming weights are multiplied by the transport map
  itself, not its inverse). Kind ``"linear"``. A Sinkhorn plan within 1e-6 of a
  permutation (tiny ``reg``) is snapped to that permutation (kind
  ``"permutation"``).

Needs the POT package (``pip install pot``), imported when the aligner is used.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import AlignProblem, PointPlan, PointwiseAligner, identity_plan
from .registry import register_aligner

__all__ = ["OTAligner", "activation_cost", "ot_transport"]


def _import_pot() -> Any:
    try:
        import ot as pot  # the POT package ("Python Optimal Transport")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'ot' aligner needs the POT (Python Optimal Transport) package: pip install pot"
        ) from exc
    return pot


def activation_cost(stats: PointStats, i: int, j: int, *, center: bool = False) -> torch.Tensor:
    """Mean squared distance between the activations of model ``i``'s and model ``j``'s features.

    Parameters
    ----------
    stats : PointStats
        Statistics of the point (must hold the cross term of ``(i, j)``).
    i, j : int
        Model indices (``i`` gives the rows, ``j`` the columns).
    center : bool, default False
        Use centred activations (covariances) instead of raw second moments. The
        paper uses the raw activation vectors (``False``).

    Returns
    -------
    Tensor, shape (d, d), float64, on the CPU
        ``C[a, b] = E[(x_i,a − x_j,b)²]`` (clamped at 0 against round-off).
    """
    cij = stats.cov(i, j).double().cpu()
    vi = stats.var(i).double().cpu()
    vj = stats.var(j).double().cpu()
    if not center:
        mi, mj = stats.mean(i).double().cpu(), stats.mean(j).double().cpu()
        cij = cij + torch.outer(mi, mj)
        vi = vi + mi * mi
        vj = vj + mj * mj
    return torch.clamp(vi[:, None] + vj[None, :] - 2.0 * cij, min=0.0)


def ot_transport(
    cost: torch.Tensor, *, method: str = "emd", reg: float = 0.01, max_iter: int | None = None
) -> torch.Tensor:
    """Optimal transport plan between two uniform distributions over ``d`` features.

    Parameters
    ----------
    cost : Tensor, shape (d, d)
        Ground cost, rows = source (reference) features, columns = target features.
    method : {"emd", "sinkhorn"}, default "emd"
        Exact network simplex (``ot.emd``) or entropic regularisation (``ot.sinkhorn``:
        the plain iteration when ``max C / ε ≤ 500``, the log-domain one otherwise).
    reg : float, default 0.01
        Entropic regularisation for ``"sinkhorn"``, relative to the mean of ``cost``.
    max_iter : int, optional
        Iteration limit (``numItermax``); defaults to ``max(100000, 20 d²)`` for EMD and
        10000 for Sinkhorn (which stops earlier once the marginals match to 1e-9).

    Returns
    -------
    Tensor, shape (d, d), float64
        Transport plan ``T`` with ``T 1 = Tᵀ 1 = 1/d`` (Sinkhorn: rows exact, columns
        up to the solver's tolerance).
    """
    pot = _import_pot()
    d = cost.shape[0]
    c = np.ascontiguousarray(cost.detach().double().cpu().numpy())
    a = np.full(d, 1.0 / d)
    if method == "emd":
        it = max_iter if max_iter is not None else max(100_000, 20 * d * d)
        t = pot.emd(a, a, c, numItermax=it)
    elif method == "sinkhorn":
        scale = float(c.mean())
        eps = reg * (scale if scale > 0 else 1.0)
        it = max_iter if max_iter is not None else 10_000
        # the plain (fast) iteration while exp(-C/eps) cannot underflow, the log-domain one otherwise
        solver = "sinkhorn" if float(c.max()) <= 500.0 * eps else "sinkhorn_log"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge" is judged on the marginals by the caller
            t = pot.sinkhorn(a, a, c, eps, method=solver, numItermax=it, stopThr=1e-9)
            if solver == "sinkhorn" and not np.isfinite(t).all():
                t = pot.sinkhorn(a, a, c, eps, method="sinkhorn_log", numItermax=it, stopThr=1e-9)
    else:
        raise ValueError(f"method must be 'emd' or 'sinkhorn', got {method!r}")
    return torch.as_tensor(np.asarray(t), dtype=torch.float64)


def _snap_permutation(m: torch.Tensor, atol: float = 1e-6) -> torch.Tensor | None:
    """The exact permutation matrix ``m`` is within ``atol`` of, or ``None``."""
    perm = m.argmax(dim=1)
    if torch.unique(perm).numel() != m.shape[0]:
        return None
    p = torch.eye(m.shape[0], dtype=torch.float64)[perm]
    return p if bool(torch.allclose(m, p, atol=atol, rtol=0.0)) else None


@register_aligner
class OTAligner(PointwiseAligner):
    """OT fusion (Singh & Jaggi 2020): align every model to the reference by optimal transport.

    The ground cost is the mean squared distance of activation vectors, computed
    from second moments (see :func:`activation_cost`); marginals are uniform.

    Parameters
    ----------
    method : {"emd", "sinkhorn"}, default "emd"
        Exact OT (the plan is a permutation; kind ``"permutation"``) or entropic OT
        (a soft, doubly-stochastic plan; kind ``"linear"``).
    reg : float, default 0.01
        Sinkhorn regularisation, relative to the mean ground cost of the point.
    unmerge : {"inverse", "transpose"}, default "inverse"
        For Sinkhorn: unmerge with ``pinv(d T)`` (a true inverse when the plan is
        invertible) or with ``(d T)ᵀ`` as in the paper. Irrelevant for EMD, where both
        are the same permutation.
    center : bool, default False
        Use centred activations for the cost (the paper uses raw activations).
    max_iter : int, optional
        Solver iteration limit (see :func:`ot_transport`).

    Notes
    -----
    The score is the mean correlation of matched features under the plan,
    ``Σ_ij (d T)_ij corr_ij / d``, comparable to ``permutation``'s score.

    Examples
    --------
    >>> import autoalign, autoalign.aligners.ot
    >>> autoalign.get_aligner("ot", method="sinkhorn", reg=0.05)
    OTAligner(method='sinkhorn', reg=0.05, unmerge='inverse', center=False, max_iter=None)
    """

    name = "ot"
    needs = "reference"
    self_moments = "diagonal"  # activation costs need cross terms and variances only
    description = "OT fusion (Singh & Jaggi 2020): optimal transport on activations (EMD or Sinkhorn), all-to-one"

    def __init__(
        self,
        *,
        method: str = "emd",
        reg: float = 0.01,
        unmerge: str = "inverse",
        center: bool = False,
        max_iter: int | None = None,
    ) -> None:
        if method not in ("emd", "sinkhorn"):
            raise ValueError(f"method must be 'emd' or 'sinkhorn', got {method!r}")
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg!r}")
        if unmerge not in ("inverse", "transpose"):
            raise ValueError(f"unmerge must be 'inverse' or 'transpose', got {unmerge!r}")
        if max_iter is not None and max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
        self.method = method
        self.reg = float(reg)
        self.unmerge = unmerge
        self.center = bool(center)
        self.max_iter = max_iter

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        assert stats is not None
        _import_pot()
        ref, d = problem.reference, point.dim
        eye = torch.eye(d, dtype=torch.float64)
        merges, unmerges, scores, notes = [], [], [], []
        exact = True
        for m in range(problem.n_models):
            if m == ref:
                merges.append(eye)
                unmerges.append(eye)
                continue
            cost = activation_cost(stats, ref, m, center=self.center)
            if not bool(torch.isfinite(cost).all()):
                return identity_plan(d, problem.n_models, note="non-finite activation statistics; identity used")
            t = ot_transport(cost, method=self.method, reg=self.reg, max_iter=self.max_iter)
            plan = t * d
            perm = _snap_permutation(plan)
            if perm is not None:
                mm, um = perm, perm.T.contiguous()
            elif self.method == "emd":
                # a degenerate vertex can only come from solver trouble; fall back to its nearest permutation
                from .linalg import nearest_permutation

                mm = nearest_permutation(plan).cpu()
                um = mm.T.contiguous()
                notes.append(f"model {m}: EMD plan was not a permutation; nearest permutation used")
            else:
                exact = False
                col_err = float((plan.sum(dim=0) - 1.0).abs().max())
                if col_err > 1e-3:
                    notes.append(f"model {m}: Sinkhorn did not converge (column sums off by {col_err:.1e}); raise max_iter or reg")
                rows = plan.sum(dim=1, keepdim=True)
                mm = plan / torch.clamp(rows, min=torch.finfo(torch.float64).tiny)
                if self.unmerge == "transpose":
                    um = mm.T.contiguous()
                else:
                    s = torch.linalg.svdvals(mm)
                    if float(s[-1]) <= 1e-10 * float(s[0]):
                        notes.append(f"model {m}: Sinkhorn plan is singular (σ_min/σ_max = {float(s[-1] / s[0]):.1e}); pseudo-inverse used")
                    um = torch.linalg.pinv(mm)
            corr = stats.corr(ref, m).double().cpu()
            scores.append(float((mm * corr).sum() / d))
            merges.append(mm)
            unmerges.append(um)
        score = sum(scores) / len(scores) if scores else None
        kind = "permutation" if exact else "linear"
        return PointPlan(merges, unmerges, kind=kind, score=score, note="; ".join(notes) or None)
