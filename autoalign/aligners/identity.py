"""``identity``: plain averaging of the weights, no alignment."""

from __future__ import annotations

from ..spec import MergePoint
from ..stats import PointStats
from .base import AlignProblem, PointPlan, PointwiseAligner, identity_plan
from .registry import register_aligner

__all__ = ["IdentityAligner"]


@register_aligner
class IdentityAligner(PointwiseAligner):
    """Plain weight averaging (no alignment): the baseline every method must beat.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("identity")
    IdentityAligner()
    """

    name = "identity"
    needs = "none"
    description = "plain weight averaging, no alignment (baseline)"

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        return identity_plan(point.dim, problem.n_models)
