"""The aligner contract: ``solve(problem) -> Plan``.

An aligner receives an :class:`AlignProblem` (the spec, the models' state dicts,
the reference model, the merge weights and — computed lazily, only what the
aligner declares in ``needs`` — the feature statistics) and returns a
:class:`Plan`: per merge point, per model, a ``merge`` matrix (model coordinates
→ merged coordinates) and an ``unmerge`` matrix (merged → model coordinates).

The merged model is ``Σ_m w_m · M_m W_m U_m`` applied to every parameter by its
role (see :mod:`autoalign.apply`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

import torch

from ..errors import MergeError
from ..spec import MergePoint, MergeSpec, kind_rank
from ..stats import PointStats, Stats
from ..vocab import Needs, SelfMoments
from .linalg import is_orthogonal, is_permutation, is_rotary, nearest_orthogonal, nearest_permutation, nearest_rotary

__all__ = ["AlignProblem", "PointPlan", "Plan", "Aligner", "PointwiseAligner", "ReferenceAligner"]


@dataclass
class AlignProblem:
    """What an aligner gets to solve.

    Attributes
    ----------
    spec : MergeSpec
        The architecture's merge points and parameter roles.
    state_dicts : list of dict
        The models' state dicts (read-only).
    reference : int
        Index of the reference model (all-to-one schemes align to it).
    weights : Tensor, shape (N,)
        Merge weights, summing to one.
    stats : Stats or None
        Feature statistics (``None`` for data-free aligners).
    buffers : frozenset of str
        State-dict keys that are buffers (e.g. BatchNorm running statistics), not
        learned parameters. Data-free aligners that score weights leave them out of
        their objective; the engine still moves them with the plan.

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(2, 3))
    >>> problem = autoalign.AlignProblem(spec, [net.state_dict()] * 2, 0, torch.tensor([0.5, 0.5], dtype=torch.float64))
    >>> problem.n_models
    2
    """

    spec: MergeSpec
    state_dicts: list[dict[str, torch.Tensor]]
    reference: int
    weights: torch.Tensor
    stats: Stats | None = None
    buffers: frozenset[str] = frozenset()

    @property
    def n_models(self) -> int:
        return len(self.state_dicts)


@dataclass
class PointPlan:
    """Transforms of one merge point.

    Attributes
    ----------
    merges : list of Tensor, each (d, d)
        ``merges[m]`` maps model ``m``'s coordinates into the merged coordinates.
    unmerges : list of Tensor, each (d, d)
        ``unmerges[m]`` maps merged coordinates back to model ``m``'s.
    kind : str
        The kind the aligner produced (``"linear"``, ``"orthogonal"``, ``"permutation"``).
    score : float or None
        A quality figure (mean canonical correlation, mean matched correlation ...).
    note : str or None
        Anything worth reporting (e.g. why the identity was used).
    projected : str or None
        Set by the engine when it projected the transform onto the point's kind.
    seconds : float
        Time spent solving this point.

    Examples
    --------
    >>> import torch, autoalign
    >>> eye = torch.eye(3, dtype=torch.float64)
    >>> pp = autoalign.PointPlan([eye, eye], [eye, eye], kind="permutation")
    >>> pp.kind, len(pp.merges)
    ('permutation', 2)
    """

    merges: list[torch.Tensor]
    unmerges: list[torch.Tensor]
    kind: str = "linear"
    score: float | None = None
    note: str | None = None
    projected: str | None = None
    seconds: float = 0.0

    def _with(self, merges: list[torch.Tensor], unmerges: list[torch.Tensor], **changes: Any) -> "PointPlan":
        return replace(self, merges=merges, unmerges=unmerges, **changes)

    def projected_onto(self, kind: str, pairs: Sequence[tuple[int, int]] = ()) -> "PointPlan":
        """The plan projected onto the transforms a point of ``kind`` allows (``projected``
        records it; a plan already of that kind is returned as is). ``pairs``: the
        coordinate pairs of a ``rotary`` point (:attr:`autoalign.MergePoint.pairs`).

        Examples
        --------
        >>> import torch
        >>> m = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
        >>> pp = PointPlan([m], [m.inverse()]).projected_onto("permutation")
        >>> pp.merges[0].tolist(), pp.projected
        ([[1.0, 0.0], [0.0, 1.0]], 'permutation')
        """
        if kind == "linear":
            return self
        if kind == "permutation":
            if all(is_permutation(m) for m in self.merges):
                return self
            merges = [nearest_permutation(m) for m in self.merges]
        elif kind == "orthogonal":
            if all(is_orthogonal(m) for m in self.merges):
                return self
            merges = [nearest_orthogonal(m) for m in self.merges]
        elif kind == "rotary":
            if all(is_rotary(m, pairs) for m in self.merges):  # e.g. procrustes solves within the group
                return self if self.kind in ("rotary", "permutation") else replace(self, kind="rotary")
            merges = [nearest_rotary(m, pairs) for m in self.merges]
        else:
            raise MergeError(f"cannot project onto kind {kind!r}")
        return self._with(merges, [m.T.contiguous() for m in merges], kind=kind, projected=kind)

    def without_last(self) -> "PointPlan":
        """The plan without its last model (the iterative scheme's current merged model)."""
        return self._with(self.merges[:-1], self.unmerges[:-1])

    def rebased(self, ref: int) -> "PointPlan":
        """The plan expressed in model ``ref``'s coordinates: ``U_ref M_m`` and ``U_m M_ref``.

        The iterative scheme aligns every model to the merged model; going through it
        to the reference keeps the reference's weights untouched (its maps become the
        identity), so dense maps, which are exact for no model through a nonlinearity,
        still leave one model exact. Products of permutations (orthogonal maps) stay
        permutations (orthogonal).
        """
        to_ref, from_ref = self.unmerges[ref], self.merges[ref]
        eye = torch.eye(to_ref.shape[0], dtype=to_ref.dtype, device=to_ref.device)
        merges = [eye if m == ref else to_ref @ self.merges[m] for m in range(len(self.merges))]
        unmerges = [eye if m == ref else self.unmerges[m] @ from_ref for m in range(len(self.unmerges))]
        return self._with(merges, unmerges)


@dataclass
class Plan:
    """Per merge point (by name) a :class:`PointPlan`; points not listed keep the identity.

    Examples
    --------
    >>> import torch, autoalign
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> plan = autoalign.Plan({"fc": autoalign.PointPlan([eye, eye], [eye, eye])})
    >>> sorted(plan.transforms_for(1))
    ['fc']
    """

    points: dict[str, PointPlan] = field(default_factory=dict)

    def transforms_for(self, m: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{point: (merge, unmerge)}`` for model ``m`` (input of :func:`autoalign.transform_state_dict`)."""
        return {name: (pp.merges[m], pp.unmerges[m]) for name, pp in self.points.items()}

    def change_from(self, old: "Plan") -> float:
        """Largest relative Frobenius change of any model's merge matrix at any point
        (``inf`` when a point is new)."""
        change = 0.0
        for name, pp in self.points.items():
            prev = old.points.get(name)
            if prev is None:
                return float("inf")
            for a, b in zip(prev.merges, pp.merges):
                change = max(change, float(torch.linalg.norm(b - a) / torch.linalg.norm(a).clamp_min(1e-12)))
        return change

    def checked_against(self, spec: MergeSpec, n_models: int, who: str) -> "Plan":
        """Check the plan against the spec (no transform at a frozen point, one merge and
        unmerge matrix per model) and project each point's transforms onto its kind.

        Raises
        ------
        MergeError
            Naming the aligner ``who`` and the merge point.
        """
        for p in spec.points:
            pp = self.points.get(p.name)
            if pp is None:
                continue
            if p.kind == "frozen":
                raise MergeError(f"aligner {who} returned a transform for frozen merge point {p.name!r}")
            if len(pp.merges) != n_models or len(pp.unmerges) != n_models:
                raise MergeError(f"aligner {who}: merge point {p.name!r} needs {n_models} merge and unmerge matrices")
            if kind_rank(pp.kind) > kind_rank(p.kind) or p.kind != "linear":
                self.points[p.name] = pp.projected_onto(p.kind, p.pairs)
        return self


class Aligner:
    """Base class of all aligners.

    Subclasses set ``name`` (the registry name), ``needs`` (which feature
    statistics they use: ``"reference"``, ``"all_pairs"``, ``"self"`` or ``"none"``),
    optionally ``self_moments`` (``"full"``, the default: each model's (d, d)
    covariance is collected; ``"diagonal"``: only its variances, for aligners
    that use just ``cov(i, j)``, ``var``, ``std``, ``corr`` and ``mean``, which
    makes statistics collection cheaper), take their hyperparameters as keyword
    arguments of ``__init__`` and implement :meth:`solve`.

    Examples
    --------
    >>> import torch, autoalign
    >>> class Flip(autoalign.PointwiseAligner):
    ...     name = "flip-example"
    ...     needs = "none"
    ...     def solve_point(self, point, stats, problem):
    ...         eye = torch.eye(point.dim, dtype=torch.float64)
    ...         return autoalign.PointPlan([eye] * problem.n_models, [eye] * problem.n_models, "permutation")
    """

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = "reference"
    self_moments: ClassVar[SelfMoments] = "full"
    description: ClassVar[str] = ""
    #: What a user choosing a scheme should know (e.g. that the aligner iterates itself).
    scheme_note: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"aligner {self.name!r} got unknown options {sorted(options)}")

    def self_moments_at(self, point: MergePoint) -> SelfMoments:
        """Each model's own second moments this aligner reads at ``point``: the class's
        ``self_moments`` unless a subclass knows better per point (``procrustes`` needs only
        variances where the point admits nothing but permutations)."""
        return self.self_moments

    def solve(self, problem: AlignProblem) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement solve(problem)")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class PointwiseAligner(Aligner):
    """An aligner that solves each merge point on its own.

    Implement :meth:`solve_point`; points without statistics (no observable
    site) get the identity with a note, frozen points are skipped.

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.aligners import identity_plan
    >>> class Same(autoalign.PointwiseAligner):
    ...     name, needs = "same-example", "none"
    ...     def solve_point(self, point, stats, problem):
    ...         return identity_plan(point.dim, problem.n_models)
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(2)]
    >>> merged = autoalign.merge(nets, [torch.randn(8, 3)], aligner=Same())
    >>> type(merged).__name__
    'Sequential'
    """

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:  # pragma: no cover
        raise NotImplementedError

    def solve(self, problem: AlignProblem) -> Plan:
        plan = Plan()
        for p in problem.spec.points:
            if p.kind == "frozen":
                continue
            st = problem.stats.get(p.name) if problem.stats is not None else None
            t0 = time.perf_counter()
            if st is None and self.needs != "none":
                pp = identity_plan(p.dim, problem.n_models, note="no features observed at this point; identity used")
            else:
                pp = self.solve_point(p, st, problem)
            pp.seconds = time.perf_counter() - t0
            plan.points[p.name] = pp
        return plan


class ReferenceAligner(PointwiseAligner):
    """An all-to-one aligner that maps each model onto the reference, one pair at a time.

    Implement :meth:`solve_pair`; this class gives the reference the identity,
    gives the identity (with a note) when the reference's or a model's features
    are constant at a point, averages the pair scores and joins the notes. Set
    the class attribute ``kind`` to what :meth:`solve_pair` returns. What
    :meth:`solve_pair` derives from the reference alone (a factorisation of its
    covariance, say) can be kept in :attr:`reference_cache`, which holds for the
    pairs of one point and is cleared before the next.

    Examples
    --------
    >>> import torch, autoalign
    >>> class Scale(autoalign.aligners.ReferenceAligner):
    ...     name, kind = "scale-example", "linear"
    ...     def solve_pair(self, point, stats, ref, m):
    ...         r = (stats.cov(ref).trace() / stats.cov(m).trace()).sqrt()
    ...         eye = torch.eye(point.dim, dtype=torch.float64)
    ...         return r * eye, eye / r, None, None
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(2)]
    >>> plan = autoalign.merge_with_report(nets, [torch.randn(8, 3)], aligner=Scale()).plan
    >>> [pp.kind for pp in plan.points.values()]
    ['linear']
    """

    kind: ClassVar[str] = "linear"

    def plan_kind(self, point: MergePoint) -> str:
        """The kind of the matrices :meth:`solve_pair` returns at ``point`` (the class's
        ``kind``; an aligner that solves within a point's own group says so here, and the
        engine then has nothing to project)."""
        return self.kind

    @property
    def reference_cache(self) -> dict[str, Any]:
        """Per point, what :meth:`solve_pair` computed from the reference alone (cleared per
        point; not an option, so not in the repr)."""
        cache = self.__dict__.get("_reference_cache")
        if cache is None:
            cache = self._reference_cache = {}
        return cache

    def solve_pair(
        self, point: MergePoint, stats: PointStats, ref: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor, float | None, str | None]:  # pragma: no cover - abstract
        """``(merge, unmerge, score, note)`` of model ``m`` onto the reference ``ref`` at ``point``."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve_pair(point, stats, ref, m)")

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        self._reference_cache: dict[str, Any] = {}
        try:
            return self._solve_pairs(point, stats, problem)
        finally:
            self._reference_cache = {}

    def _solve_pairs(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        assert stats is not None
        ref = problem.reference
        if float(stats.var(ref).sum()) <= 0:
            return identity_plan(point.dim, problem.n_models, note="reference features are constant; identity used")
        eye = torch.eye(point.dim, dtype=torch.float64, device=stats.sums[ref].device)
        merges, unmerges, scores, notes = [], [], [], []
        for m in range(problem.n_models):
            if m == ref:
                merges.append(eye)
                unmerges.append(eye)
                continue
            if float(stats.var(m).sum()) <= 0:
                merges.append(eye)
                unmerges.append(eye)
                notes.append(f"model {m}: features are constant; identity used")
                continue
            merge, unmerge, score, note = self.solve_pair(point, stats, ref, m)
            merges.append(merge)
            unmerges.append(unmerge)
            if score is not None:
                scores.append(score)
            if note:
                notes.append(note)
        score = sum(scores) / len(scores) if scores else None
        return PointPlan(merges, unmerges, kind=self.plan_kind(point), score=score, note="; ".join(notes) or None)


def identity_plan(dim: int, n_models: int, *, note: str | None = None) -> PointPlan:
    """Identity merge/unmerge for every model.

    Examples
    --------
    >>> from autoalign.aligners import identity_plan
    >>> pp = identity_plan(3, 2, note="nothing to align")
    >>> pp.kind, tuple(pp.merges[0].shape)
    ('permutation', (3, 3))
    """
    eye = torch.eye(dim, dtype=torch.float64)
    return PointPlan([eye] * n_models, [eye] * n_models, kind="permutation", note=note)


def permutation_matrix(perm: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``P`` with ``(P x)_i = x_{perm[i]}``, shape (d, d), float64.

    Examples
    --------
    >>> import torch
    >>> from autoalign.aligners import permutation_matrix
    >>> permutation_matrix([2, 0, 1]) @ torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    tensor([30., 10., 20.], dtype=torch.float64)
    """
    perm = torch.as_tensor(perm, dtype=torch.long)
    return torch.eye(perm.numel(), dtype=torch.float64)[perm]
