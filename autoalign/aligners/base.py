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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..spec import MergePoint, MergeSpec
from ..stats import PointStats, Stats

__all__ = ["AlignProblem", "PointPlan", "Plan", "Aligner", "PointwiseAligner"]


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
    """

    spec: MergeSpec
    state_dicts: list[dict[str, torch.Tensor]]
    reference: int
    weights: torch.Tensor
    stats: Stats | None = None

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
    """

    merges: list[torch.Tensor]
    unmerges: list[torch.Tensor]
    kind: str = "linear"
    score: float | None = None
    note: str | None = None
    projected: str | None = None
    seconds: float = 0.0


@dataclass
class Plan:
    """Per merge point (by name) a :class:`PointPlan`; points not listed keep the identity."""

    points: dict[str, PointPlan] = field(default_factory=dict)

    def transforms_for(self, m: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{point: (merge, unmerge)}`` for model ``m`` (input of :func:`autoalign.transform_state_dict`)."""
        return {name: (pp.merges[m], pp.unmerges[m]) for name, pp in self.points.items()}


class Aligner:
    """Base class of all aligners.

    Subclasses set ``name`` (the registry name), ``needs`` (which feature
    statistics they use: ``"reference"``, ``"all_pairs"``, ``"self"`` or ``"none"``),
    take their hyperparameters as keyword arguments of ``__init__`` and implement
    :meth:`solve`.

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
    needs: ClassVar[str] = "reference"
    description: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"aligner {self.name!r} got unknown options {sorted(options)}")

    def solve(self, problem: AlignProblem) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement solve(problem)")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class PointwiseAligner(Aligner):
    """An aligner that solves each merge point on its own.

    Implement :meth:`solve_point`; points without statistics (no observable
    site) get the identity with a note, frozen points are skipped.
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


def identity_plan(dim: int, n_models: int, *, note: str | None = None) -> PointPlan:
    """Identity merge/unmerge for every model."""
    eye = torch.eye(dim, dtype=torch.float64)
    return PointPlan([eye] * n_models, [eye] * n_models, kind="permutation", note=note)


def permutation_matrix(perm: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``P`` with ``(P x)_i = x_{perm[i]}``, shape (d, d), float64."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    return torch.eye(perm.numel(), dtype=torch.float64)[perm]
