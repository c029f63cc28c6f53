"""``zipit``: ZipIt! (Stoica et al., ICLR 2024), greedy feature zipping over all models.

Stoica, G., Bolya, D., Bjorner, J., Ramesh, P., Hearn, T. & Hoffman, J.,
"ZipIt! Merging Models from Different Tasks without Training", ICLR 2024.

For a merge point of width ``d`` and ``N`` models, the ``N·d`` features of all
models are pooled and their full correlation matrix is formed (within-model
blocks from ``stats.corr(m, m)``, cross blocks from ``stats.corr(i, j)``). Then,
as in the paper's greedy matching algorithm, the most correlated remaining pair
of (groups of) features is merged into one group, ``(N − 1)·d`` times, until
``d`` merged features remain. After each merge the group's correlation to every
other group is the minimum of its two parts' correlations (complete linkage),
as in the authors' ``match_tensors_zipit``.

Hyperparameters (the paper's Sec. 4.3, "α" and "β"):

``alpha`` — repeated matching.
    ``alpha > 0``: a merged group may be matched again; its correlations are
    multiplied by ``alpha`` after every merge it takes part in. ``alpha = 0``:
    a merged group is never matched again with a feature of a model it already
    contains (it may still absorb features of the other models: for ``N > 2``
    this is a multi-way matching with at most one feature per model per group).
``beta`` — same-model budget.
    The number of merges joining two groups that share a model (for
    singletons: two features of the same model) is limited, per model, to
    ``floor(beta · (N − 1)·d / N)`` (the authors' code). ``beta = 0`` allows no
    same-model merge at all, so with ``alpha = 0`` every group holds exactly one
    feature of every model: for ``N = 2`` this is greedy permutation matching
    (kind ``"permutation"``). (For ``N ≥ 3`` the greedy order can, rarely,
    dead-end — incomplete groups that pairwise share a model — and the forced
    merges that follow are reported in the plan's note.)

Deviations from the authors' code (documented, deliberate):

* their budget check lets one same-model merge through when the budget is 0
  (it decrements before testing); here a budget of 0 means none;
* their ``alpha = 0`` blocking indexes a shrinking matrix with the original
  per-model blocks; here groups track the set of models they contain;
* ties (e.g. the exact zeros of dead features) prefer cross-model pairs;
* the merge is weighted by the merge weights ``w`` (see below); with equal
  weights it is the paper's plain mean.

Transforms. Let group ``k`` have members ``G_k = {(m, a)}`` and
``W_k = Σ_{(m, a) ∈ G_k} w_m``. The merged feature is the weighted mean of its
members, ``z_k = Σ_{(m,a)∈G_k} w_m x_{m,a} / W_k``. The engine forms
``Σ_m w_m M_m x_m``, so ``M_m[k, a] = 1 / W_k`` for ``(m, a) ∈ G_k`` (0 otherwise):
for a group holding one feature of every model this is 1 (a permutation); a
feature kept from model ``m`` alone gets ``1 / w_m``. The unmerge copies the
merged feature back to every member: ``U_m[a, k] = 1`` for ``(m, a) ∈ G_k``.
For within-model groups ``U_m`` is not ``M_m⁻¹`` — ZipIt's design; the plan is
still a valid linear transform. Groups are ordered by the reference model's
feature they contain (so ``M_ref = I`` whenever the plan is a permutation).
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import AlignProblem, PointPlan, PointwiseAligner
from .registry import register_aligner

__all__ = ["ZipItAligner", "zipit_groups", "zipit_transforms"]


def zipit_groups(
    corr: torch.Tensor | np.ndarray, n_models: int, *, alpha: float = 0.0, beta: float = 0.0
) -> tuple[list[list[tuple[int, int]]], float | None, int]:
    """Greedy ZipIt! matching of ``N·d`` pooled features down to ``d`` groups.

    Parameters
    ----------
    corr : Tensor or ndarray, shape (N·d, N·d)
        Correlation of the pooled features; model ``m``'s features are rows
        ``m·d … (m+1)·d − 1``. The diagonal is ignored.
    n_models : int
        ``N``.
    alpha : float, default 0.0
        Repeated-matching factor (see the module docstring).
    beta : float, default 0.0
        Same-model budget fraction (see the module docstring; the aligner defaults to 0.125).

    Returns
    -------
    groups : list of list of (model, feature)
        ``d`` groups partitioning all ``N·d`` features.
    score : float or None
        Mean correlation (after decay) of the merges made.
    forced : int
        Merges made when every remaining pair was blocked by the ``alpha``/``beta``
        rules (a dead end: e.g. leftover features of one model whose budget is
        spent, with every group already holding that model): the most correlated
        remaining pair is merged regardless. (The authors' code merges an arbitrary
        pair in that case, the argmax of an all ``-inf`` matrix.)
    """
    s = np.array(corr.detach().cpu().double().numpy() if isinstance(corr, torch.Tensor) else corr, dtype=np.float64)
    n_feat = s.shape[0]
    if n_feat % n_models:
        raise ValueError(f"{n_feat} pooled features do not split into {n_models} models")
    d = n_feat // n_models
    s = np.nan_to_num(s, nan=-np.inf)
    np.fill_diagonal(s, -np.inf)
    origin = np.repeat(np.arange(n_models), d)
    models = (np.int64(1) << origin.astype(np.int64))  # bitmask of the models in each group
    size = np.ones(n_feat, dtype=np.int64)
    active = np.ones(n_feat, dtype=bool)
    members: list[list[tuple[int, int]]] = [[(int(origin[i]), int(i % d))] for i in range(n_feat)]
    budget = np.full(n_models, int(beta * ((n_models - 1) * d // n_models) + 1e-9), dtype=np.int64)
    exhausted = np.int64(0)
    for m in range(n_models):
        if budget[m] <= 0:
            exhausted |= np.int64(1) << np.int64(m)

    def allowed_row(i: int) -> np.ndarray:
        shared = models & models[i]
        ok = active.copy()
        ok[i] = False
        sharing = shared != 0
        if alpha <= 0:
            if size[i] > 1:
                ok &= ~sharing
            else:
                ok &= ~(sharing & (size > 1))
        ok &= ~(sharing & ((shared & exhausted) != 0))
        return ok

    row_best = np.full(n_feat, -np.inf)
    row_arg = np.full(n_feat, -1, dtype=np.int64)
    row_cross = np.zeros(n_feat, dtype=bool)

    def refresh(i: int) -> None:
        ok = allowed_row(i)
        vals = np.where(ok, s[i], -np.inf)
        best = vals.max() if vals.size else -np.inf
        if best == -np.inf:
            row_best[i], row_arg[i], row_cross[i] = -np.inf, -1, False
            return
        cand = vals == best
        cross = cand & ((models & models[i]) == 0)
        pick = cross if cross.any() else cand
        row_best[i], row_arg[i], row_cross[i] = best, int(np.flatnonzero(pick)[0]), bool(cross.any())

    for i in range(n_feat):
        refresh(i)

    values = []
    forced = 0
    for _ in range((n_models - 1) * d):
        cand = np.where(active, row_best, -np.inf)
        best = cand.max()
        if best == -np.inf:
            # dead end: every remaining pair is blocked (budget spent, or alpha = 0 and all
            # groups share a model); merge the most correlated active pair regardless
            idx = np.flatnonzero(active)
            sub = s[np.ix_(idx, idx)].copy()
            np.fill_diagonal(sub, -np.inf)
            sub = np.where(np.isfinite(sub), sub, -1e300)
            np.fill_diagonal(sub, -np.inf)
            flat = int(np.argmax(sub))
            i, j = int(idx[flat // idx.size]), int(idx[flat % idx.size])
            best = float(s[i, j]) if np.isfinite(s[i, j]) else 0.0
            forced += 1
        else:
            tied = cand == best
            tied_cross = tied & row_cross
            i = int(np.flatnonzero(tied_cross if tied_cross.any() else tied)[0])
            j = int(row_arg[i])
        r, c = min(i, j), max(i, j)
        shared = int(models[r] & models[c])
        values.append(float(best))
        # merge c into r
        members[r].extend(members[c])
        members[c] = []
        models[r] |= models[c]
        size[r] += size[c]
        active[c] = False
        new = np.minimum(s[r], s[c])
        if alpha > 0:
            new = new * alpha
        new[r] = -np.inf
        s[r, :] = new
        s[:, r] = new
        s[c, :] = -np.inf
        s[:, c] = -np.inf
        full_refresh = False
        if shared:
            for m in range(n_models):
                if shared >> m & 1:
                    budget[m] -= 1
                    if budget[m] <= 0 and not (int(exhausted) >> m & 1):
                        exhausted |= np.int64(1) << np.int64(m)
                        full_refresh = True
        if full_refresh:
            for k in np.flatnonzero(active):
                refresh(int(k))
        else:
            # scores to r and c only went down (min, decay, blocking): only rows that
            # pointed at r or c, and r itself, can change their best
            stale = np.flatnonzero(active & ((row_arg == r) | (row_arg == c)))
            for k in stale:
                refresh(int(k))
            refresh(r)
    groups = [members[i] for i in np.flatnonzero(active)]
    score = float(np.mean(values)) if values else None
    return groups, score, forced


def zipit_transforms(
    groups: list[list[tuple[int, int]]],
    weights: torch.Tensor,
    d: int,
    reference: int = 0,
    *,
    models: list[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """Merge and unmerge matrices of the ``N`` models from ZipIt groups.

    Parameters
    ----------
    groups : list of list of (model, feature)
        ``d`` groups partitioning the ``N·d`` features.
    weights : Tensor, shape (N,)
        Merge weights (summing to one).
    d : int
        Feature dimension.
    reference : int, default 0
        Groups are ordered by the reference feature they contain.
    models : list of int, optional
        The models the groups hold (default: all ``N``); the others get zero matrices.

    Returns
    -------
    merges : list of Tensor, each (d, d)
        ``M_m[k, a] = 1 / W_k`` for the members ``(m, a)`` of group ``k``.
    unmerges : list of Tensor, each (d, d)
        ``U_m[a, k] = 1`` for the members ``(m, a)`` of group ``k``.
    is_permutation : bool
        True when every group holds exactly one feature of every model (then every
        ``M_m`` is exactly a permutation and ``U_m = M_mᵀ``).
    """
    n = int(weights.numel())
    if len(groups) != d:
        raise ValueError(f"expected {d} groups, got {len(groups)}")

    def key(g: list[tuple[int, int]]) -> tuple[int, int, int]:
        refs = [a for m, a in g if m == reference]
        if refs:
            return (0, min(refs), 0)
        m0, a0 = min(g)
        return (1, m0, a0)

    groups = sorted(groups, key=key)
    w = weights.double().cpu()
    k_models = n if models is None else len(models)
    perm = all(len(g) == k_models and len({m for m, _ in g}) == k_models for g in groups)
    merges = [torch.zeros(d, d, dtype=torch.float64) for _ in range(n)]
    unmerges = [torch.zeros(d, d, dtype=torch.float64) for _ in range(n)]
    for k, g in enumerate(groups):
        wk = float(sum(float(w[m]) for m, _ in g))
        val = 1.0 if perm else (1.0 / wk if wk > 0 else 0.0)
        for m, a in g:
            merges[m][k, a] = val
            unmerges[m][a, k] = 1.0
    return merges, unmerges, perm


@register_aligner
class ZipItAligner(PointwiseAligner):
    """ZipIt!: greedily zip the features of all models (across and within models).

    Parameters
    ----------
    alpha : float, default 0.0
        Repeated matching (paper's α): ``0`` forbids re-matching a merged feature
        with a model it already contains; ``> 0`` allows it with its correlations
        scaled by ``alpha`` per merge.
    beta : float, default 0.125
        Same-model budget (paper's β): per model at most
        ``floor(beta · (N − 1)·d / N)`` merges joining features of the same model.
        ``0`` gives pure cross-model matching (a greedy permutation for ``N = 2``).

    Notes
    -----
    ``beta = 0.125`` is the authors' code default. ``alpha`` defaults to 0 (the
    authors' code: 0.3) because with ``alpha > 0`` and ``N ≥ 3`` the decay makes a
    group of two features prefer a same-model partner over the third model's copy,
    so merging identical models would no longer be exact; ``alpha = 0`` keeps
    multi-way groups with at most one feature per model. ``alpha = beta = 0`` is
    pure cross-model matching (for ``N = 2`` a greedy, not Hungarian, permutation
    matching: it equals the ``permutation`` aligner when the best matches are
    unambiguous, e.g. for a permuted copy of a model). Complexity: ``O((N d)²)`` memory and about
    ``O(N² d²)`` time per point for the greedy loop (cached row maxima).

    Examples
    --------
    >>> import autoalign, autoalign.aligners.zipit
    >>> autoalign.get_aligner("zipit", beta=0.5)
    ZipItAligner(alpha=0.0, beta=0.5)
    >>> autoalign.get_aligner("zipit")
    ZipItAligner(alpha=0.0, beta=0.125)
    """

    name = "zipit"
    needs = "all_pairs"
    description = "ZipIt! (Stoica et al. 2024): greedy zipping of correlated features across and within all models"

    def __init__(self, *, alpha: float = 0.0, beta: float = 0.125) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        assert stats is not None
        n, d = problem.n_models, point.dim
        # a model of weight 0 adds nothing to the merge, so it takes no part in the zipping
        # either (else its features would still be grouped with, and average away, the others')
        live = [m for m in range(n) if float(problem.weights[m]) > 0]
        blocks = [[stats.corr(i, j).double().cpu() for j in live] for i in live]
        corr = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
        groups, score, forced = zipit_groups(corr, len(live), alpha=self.alpha, beta=self.beta)
        groups = [[(live[m], a) for m, a in g] for g in groups]
        ref = problem.reference if problem.reference in live else live[0]
        merges, unmerges, perm = zipit_transforms(groups, problem.weights, d, ref, models=live)
        for m in range(n):
            if m not in live:  # weight 0: any invertible map; the identity
                merges[m] = unmerges[m] = torch.eye(d, dtype=torch.float64)
        note = None
        if not perm:
            within = sum(1 for g in groups if len({m for m, _ in g}) < len(g))
            partial = sum(1 for g in groups if len({m for m, _ in g}) < len(live))
            note = f"{within} merged features join features of one model; {partial} lack some model"
            if forced:
                note += f"; {forced} merges forced past the alpha/beta rules (dead end)"
        return PointPlan(merges, unmerges, kind="permutation" if perm else "linear", score=score, note=note)
