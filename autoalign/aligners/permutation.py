"""``permutation``: activation matching (Hungarian on the correlation matrix), all-to-one.

Each model's features are matched one-to-one to the reference model's by the
assignment that maximises the summed correlation (Li et al. 2016, "Convergent
learning"; Ainsworth et al. 2023, "Git Re-Basin", activation matching).
"""

from __future__ import annotations

import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import AlignProblem, PointPlan, PointwiseAligner, permutation_matrix
from .linalg import match_permutation
from .registry import register_aligner

__all__ = ["PermutationAligner"]


@register_aligner
class PermutationAligner(PointwiseAligner):
    """Permutation matching of features by correlation, every model to the reference.

    The merge matrix of model ``m`` is the permutation ``P_m`` maximising
    ``Σ_i corr(x_ref,i, x_m,perm(i))``; its unmerge matrix is ``P_mᵀ``.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("permutation")
    PermutationAligner()
    """

    name = "permutation"
    needs = "reference"
    description = "activation matching: Hungarian on feature correlations, all-to-one (Git Re-Basin AM)"

    def solve_point(self, point: MergePoint, stats: PointStats | None, problem: AlignProblem) -> PointPlan:
        assert stats is not None
        ref = problem.reference
        merges, unmerges, scores = [], [], []
        for m in range(problem.n_models):
            if m == ref:
                eye = torch.eye(point.dim, dtype=torch.float64)
                merges.append(eye)
                unmerges.append(eye)
                continue
            corr = stats.corr(ref, m).cpu()
            perm = match_permutation(corr)
            P = permutation_matrix(perm)
            merges.append(P)
            unmerges.append(P.T.contiguous())
            scores.append(float(corr[torch.arange(point.dim), perm].mean()))
        score = sum(scores) / len(scores) if scores else None
        return PointPlan(merges, unmerges, kind="permutation", score=score)
