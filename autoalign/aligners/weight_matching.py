"""``weight_matching``: data-free permutation matching of the weights (Git Re-Basin).

Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, Section 3.2 (weight matching, Algorithm 1)
and Appendix (MergeMany, Algorithm 3).

Two models
    Model ``B`` is aligned to the reference ``A`` by maximising the summed inner
    product of their parameters, ``Σ_t <A_t, π(B)_t>``, over one permutation per
    non-frozen merge point. The problem is solved by coordinate descent: merge
    points are visited in a random order, and for point ``p`` every other point's
    permutation is held fixed, which leaves a linear assignment problem
    ``max_π Σ_i S[i, π(i)]`` with the ``(d, d)`` similarity

    ``S = Σ_{axes touching p} A_(p) · B'_(p)ᵀ``

    where ``X_(p)`` holds, for each coordinate of ``p``, the slice of the tensor
    at that coordinate flattened over all other axes (summed over replicas after
    ``flatten``) and ``B'`` is ``B`` with every *other* point's current
    permutation applied by its role (:mod:`autoalign.apply`). A sweep over all
    points that changes no permutation is a fixed point and ends the descent.

More than two models
    ``strategy="merge_many"`` (the default for ``N > 2``): start from every model
    matched to the reference, then repeatedly, for each model in a random order,
    weight-match it to the (merge-weighted) average of the other models in their
    current alignment, until a round changes nothing. ``strategy="all_to_one"``
    matches every model to the reference only.

Conventions are those of :func:`autoalign.transform_state_dict`: the merge matrix
``P`` of a model satisfies ``(P y)_i = y_{perm[i]}`` (model coordinates → merged
ones), its unmerge matrix is ``Pᵀ``. Along any axis, ``P`` (output, channel,
additive rows) and ``Pᵀ`` (input columns) both gather position ``i`` from position
``perm[i]``. BatchNorm's learned vectors (``channel``/``folded`` roles) are matched like any
per-channel vector; its running statistics are buffers, not weights, and are left
out of the objective (they are permuted with the rest). Since the plan is made of
permutations, the engine does not fold them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from ..spec import AxisRole, MergeSpec
from .base import AlignProblem, Aligner, Plan, PointPlan, permutation_matrix
from .linalg import match_permutation
from .weight_layout import Perms, WeightLayout
from .registry import register_aligner

__all__ = ["WeightMatchingAligner", "weight_matching"]

def _contract(
    layout: WeightLayout,
    ax: AxisRole,
    idx: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cache: dict[tuple[int, int], torch.Tensor],
    point: int,
) -> torch.Tensor:
    """``Σ_r a_(p),r · b_(p),rᵀ`` for one axis role: the ``(d, d)`` similarity it contributes.

    ``a`` and ``b`` are whole tensors; when the point fills the axis in order (no
    block, no replica) the product is a plain ``tensordot`` over the other axes,
    otherwise ``a``'s rows are kept in ``cache`` under ``(id(ax), point)``.
    """
    if ax.block is None and idx.shape[0] == 1 and idx.shape[1] == ax.size and bool((idx[0] == torch.arange(ax.size)).all()):
        other = [i for i in range(a.dim()) if i != ax.axis]
        return torch.tensordot(a, b, dims=(other, other))
    key = (id(ax), point)
    if key not in cache:
        cache[key] = layout.rows(ax, idx, a)  # the target's rows do not change during a descent
    return cache[key] @ layout.rows(ax, idx, b).T


def _coordinate_descent(
    layout: WeightLayout,
    target: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    perms: Perms,
    *,
    max_iter: int,
    rng: np.random.Generator,
    first_sweep: str = "topological",
) -> tuple[Perms, int, bool]:
    """Weight-match ``model`` to ``target`` (Git Re-Basin, Algorithm 1).

    A point's similarity only depends on the permutations of the points it shares
    a tensor with; a point none of whose neighbours changed since it was last
    solved would get the same answer and is skipped (the result is the same as
    recomputing it).

    Parameters
    ----------
    layout : WeightLayout
    target : dict of str to Tensor
        The tensors to match to, already in merged coordinates.
    model : dict of str to Tensor
        The model's tensors in its own coordinates.
    perms : dict of int to Tensor of shape (d,)
        Starting permutations (a modified copy is returned).
    max_iter : int
        Maximum number of sweeps over the points.
    rng : numpy.random.Generator
        Order of the points in each sweep.
    first_sweep : {"topological", "random"}
        Order of the first sweep: the spec's (topological) order, or random.

    Returns
    -------
    perms : dict of int to Tensor of shape (d,)
    sweeps : int
        Sweeps done.
    converged : bool
        Whether the last sweep changed no permutation.
    """
    perms = dict(perms)
    dirty = set(layout.active)
    eps = torch.finfo(next(iter(model.values())).dtype).eps if model else 1e-16
    # the model's tensors with every current permutation applied, rebuilt when one changes
    full: dict[str, torch.Tensor] = {}
    target_rows: dict[tuple[int, int], torch.Tensor] = {}
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        changed = False
        order = layout.active if (sweeps == 1 and first_sweep == "topological") else rng.permutation(layout.active).tolist()
        for p in order:
            if p not in dirty:
                continue
            dirty.discard(p)
            s_full = None
            for ax, idx in layout.touching[p]:
                if ax.tensor not in full:
                    full[ax.tensor] = layout.permuted(ax.tensor, model[ax.tensor], perms)
                contrib = _contract(layout, ax, idx, target[ax.tensor], full[ax.tensor], target_rows, p).double().cpu()
                s_full = contrib if s_full is None else s_full + contrib
            if s_full is None:
                continue
            old = perms[p]
            # with p's own permutation applied, column i of s_full holds the model's coordinate
            # old[i]; undo it: s[:, j] compares with the model's coordinate j
            s = torch.empty_like(s_full)
            s[:, old] = s_full
            new = match_permutation(s)
            ar = torch.arange(s.shape[0])
            before = float(s_full.diagonal().sum())
            gain = float(s[ar, new].sum()) - before
            # accept only improvements beyond rounding, so that ties cannot make the descent cycle
            if gain > 1e3 * eps * max(float(s_full.diagonal().abs().sum()), 1e-300) and not torch.equal(new, old):
                inv_old = torch.empty_like(old)
                inv_old[old] = torch.arange(old.numel())
                rel = inv_old[new]
                for ax, idx in layout.touching[p]:
                    if ax.tensor in full:
                        if layout.incremental[(id(ax), p)]:
                            layout.repermute(full[ax.tensor], ax, idx, rel)
                        else:
                            full.pop(ax.tensor)
                perms[p] = new
                changed = True
                dirty |= layout.neighbours[p]
        if not changed:
            return perms, sweeps, True
    return perms, sweeps, False


def _cosines(layout: WeightLayout, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[int, float]:
    """Per active point, the cosine similarity of the tensors touching it in ``a`` and ``b``."""
    dots = {k: (float((a[k] * b[k]).sum()), float((a[k] * a[k]).sum()), float((b[k] * b[k]).sum())) for k in layout.tensors}
    out = {}
    for p in layout.active:
        names = sorted({ax.tensor for ax, _ in layout.touching[p]})
        if not names:
            continue
        dot, na, nb = (sum(dots[k][j] for k in names) for j in range(3))
        out[p] = dot / max(float(np.sqrt(na * nb)), 1e-300)
    return out


def weight_matching(
    spec: MergeSpec,
    state_dicts: list[dict[str, torch.Tensor]],
    *,
    reference: int = 0,
    weights: torch.Tensor | None = None,
    strategy: str | None = None,
    max_iter: int = 100,
    seed: int = 0,
    first_sweep: str = "topological",
    dtype: torch.dtype = torch.float32,
    exclude: Collection[str] = (),
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Permutations aligning every model's weights (Git Re-Basin weight matching).

    Parameters
    ----------
    spec : MergeSpec
    state_dicts : list of dict
        The models' state dicts (not modified).
    reference : int, default 0
    weights : Tensor of shape (N,), optional
        Merge weights; MergeMany matches each model to the weighted average of the
        others (uniform by default).
    strategy : {"all_to_one", "merge_many"}, optional
        Default ``"all_to_one"`` for two models, ``"merge_many"`` for more.
    max_iter : int, default 100
        Maximum sweeps of the coordinate descent (and rounds of MergeMany).
    seed : int, default 0
        Seed of the random visiting orders.
    first_sweep : {"topological", "random"}, default "topological"
        Order of the first sweep of each coordinate descent. ``"topological"``
        visits the points in the spec's order, so that each point is first solved
        with the points feeding it already matched (which recovers permuted copies
        of deep networks exactly, where a random first sweep can lock into a
        poor fixed point); later sweeps are random. ``"random"`` follows the
        paper's Algorithm 1 throughout.
    dtype : torch.dtype, default float32
        Precision of the similarity computations.
    exclude : collection of str, optional
        State-dict keys left out of the objective (they are still permuted when the
        plan is applied). :class:`WeightMatchingAligner` passes the models' buffers:
        BatchNorm running statistics are not weights (Git Re-Basin matches
        parameters only), and their scale (running variances in the thousands on a
        trained ResNet20) would otherwise decide the matching of the points they sit on.

    Returns
    -------
    perms : list of dict of str to Tensor of shape (d,)
        Per model, per non-frozen point name, ``perm`` with merge matrix
        ``P = eye[perm]``, i.e. ``(P y)_i = y_{perm[i]}``.
    info : dict
        ``iterations`` (sweeps, or MergeMany rounds), ``converged`` (bool),
        ``strategy`` and ``scores`` (point name → mean cosine similarity of the
        aligned weights touching it).
    """
    n = len(state_dicts)
    if strategy is None:
        strategy = "all_to_one" if n <= 2 else "merge_many"
    if strategy not in ("all_to_one", "merge_many"):
        raise ValueError(f'strategy must be "all_to_one" or "merge_many", got {strategy!r}')
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if first_sweep not in ("topological", "random"):
        raise ValueError(f'first_sweep must be "topological" or "random", got {first_sweep!r}')
    if not 0 <= reference < n:
        raise ValueError(f"reference must be in [0, {n}), got {reference}")
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    layout = WeightLayout(spec, state_dicts[0], exclude)
    sds = [{k: sd[k].detach().to(dtype) for k in layout.tensors} for sd in state_dicts]
    rng = np.random.default_rng(seed)
    ident = {p: torch.arange(spec.points[p].dim) for p in layout.active}
    perms: list[Perms] = [dict(ident) for _ in range(n)]
    converged = True
    iterations = 0
    # all to one: every model matched to the reference (also MergeMany's start)
    for m in range(n):
        if m == reference:
            continue
        perms[m], it, ok = _coordinate_descent(layout, sds[reference], sds[m], ident, max_iter=max_iter, rng=rng, first_sweep=first_sweep)
        iterations = max(iterations, it)
        converged &= ok
    if strategy == "merge_many" and n > 2:
        aligned = [layout.permute_all(sds[m], perms[m]) for m in range(n)]
        rounds_converged = False
        rounds = 0
        for rounds in range(1, max_iter + 1):
            changed = False
            inner_ok = True
            for m in rng.permutation(n).tolist():
                others = [k for k in range(n) if k != m]
                wo = w[others]
                wo = wo / wo.sum() if float(wo.sum()) > 0 else torch.full((n - 1,), 1.0 / (n - 1), dtype=torch.float64)
                target = {t: sum(float(wk) * aligned[k][t] for wk, k in zip(wo, others)) for t in layout.tensors}
                new, _, ok = _coordinate_descent(layout, target, sds[m], perms[m], max_iter=max_iter, rng=rng, first_sweep=first_sweep)
                inner_ok &= ok
                if any(not torch.equal(new[p], perms[m][p]) for p in layout.active):
                    perms[m] = new
                    aligned[m] = layout.permute_all(sds[m], new)
                    changed = True
            if not changed:
                rounds_converged = inner_ok
                break
        iterations = rounds
        converged = rounds_converged
        # cosine of each model with the average of the others
        cos_sum: dict[int, float] = {}
        for m in range(n):
            others = [k for k in range(n) if k != m]
            target = {t: sum(aligned[k][t] for k in others) / len(others) for t in layout.tensors}
            for p, c in _cosines(layout, target, aligned[m]).items():
                cos_sum[p] = cos_sum.get(p, 0.0) + c / n
        scores = cos_sum
    else:
        ref = sds[reference]
        cos_sum = {}
        for m in range(n):
            if m == reference:
                continue
            for p, c in _cosines(layout, ref, layout.permute_all(sds[m], perms[m])).items():
                cos_sum[p] = cos_sum.get(p, 0.0) + c / (n - 1)
        scores = cos_sum
    out = [{spec.points[p].name: pm[p] for p in layout.active} for pm in perms]
    info = {
        "iterations": iterations,
        "converged": converged,
        "strategy": strategy,
        "scores": {spec.points[p].name: s for p, s in scores.items()},
    }
    return out, info


@register_aligner
class WeightMatchingAligner(Aligner):
    """Git Re-Basin weight matching (Ainsworth et al., ICLR 2023): data-free permutations.

    Every non-frozen merge point gets a permutation, chosen to maximise the inner
    product of the models' parameters by coordinate descent over the points
    (Algorithm 1); with more than two models, MergeMany (Algorithm 3) by default.

    Parameters
    ----------
    strategy : {"all_to_one", "merge_many"}, optional
        ``"all_to_one"`` matches every model to the reference;
        ``"merge_many"`` (default for more than two models) then rematches each
        model to the average of the others until nothing changes.
    max_iter : int, default 100
        Maximum sweeps of the coordinate descent (and rounds of MergeMany); a
        ``UserWarning`` is issued when it is reached without a fixed point.
    seed : int, default 0
        Seed of the random order in which points (and models) are visited.
    first_sweep : {"topological", "random"}, default "topological"
        Order of the first sweep of each coordinate descent: the spec's
        topological order (robust on deep networks) or random, as in the paper.
    dtype : torch.dtype, default torch.float32
        Precision of the similarity computations.

    Notes
    -----
    ``score`` of each point is the cosine similarity between the aligned weights
    touching the point and the reference's (for MergeMany: the average of the
    other models'), averaged over models; ``note`` gives the iterations used.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("weight_matching", seed=1)
    WeightMatchingAligner(strategy=None, max_iter=100, seed=1, first_sweep='topological', dtype=torch.float32)
    """

    name = "weight_matching"
    needs = "none"
    scheme_note = "it runs MergeMany itself (its option strategy='merge_many', the default for N > 2)"
    description = "weight matching: data-free permutations maximising weight similarity (Git Re-Basin WM, MergeMany)"

    def __init__(
        self,
        *,
        strategy: str | None = None,
        max_iter: int = 100,
        seed: int = 0,
        first_sweep: str = "topological",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if strategy not in (None, "all_to_one", "merge_many"):
            raise ValueError(f'strategy must be "all_to_one" or "merge_many", got {strategy!r}')
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.strategy = strategy
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        if first_sweep not in ("topological", "random"):
            raise ValueError(f'first_sweep must be "topological" or "random", got {first_sweep!r}')
        self.first_sweep = first_sweep
        self.dtype = dtype

    def solve(self, problem: AlignProblem) -> Plan:
        t0 = time.perf_counter()
        perms, info = weight_matching(
            problem.spec,
            problem.state_dicts,
            reference=problem.reference,
            weights=problem.weights,
            strategy=self.strategy,
            max_iter=self.max_iter,
            seed=self.seed,
            first_sweep=self.first_sweep,
            dtype=self.dtype,
            exclude=problem.buffers,
        )
        what = "rounds of MergeMany" if info["strategy"] == "merge_many" and problem.n_models > 2 else "sweeps"
        if not info["converged"]:
            warnings.warn(
                f"weight_matching did not reach a fixed point within max_iter={self.max_iter} {what}; "
                "the permutations may be suboptimal (raise max_iter)",
                UserWarning,
                stacklevel=3,
            )
        note = f"weight matching ({info['strategy']}): {info['iterations']} {what}" + (
            "" if info["converged"] else ", not converged"
        )
        active = [p for p in problem.spec.points if p.name in perms[0]]  # rotary points stay the identity
        seconds = (time.perf_counter() - t0) / max(1, len(active))
        plan = Plan()
        for p in active:
            merges = [permutation_matrix(pm[p.name]) for pm in perms]
            plan.points[p.name] = PointPlan(
                merges,
                [m.T.contiguous() for m in merges],
                kind="permutation",
                score=info["scores"].get(p.name),
                note=note,
                seconds=seconds,
            )
        return plan
