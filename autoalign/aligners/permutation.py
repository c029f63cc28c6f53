"""``permutation``: activation matching (Hungarian on the correlation matrix), all-to-one.

Each model's features are matched one-to-one to the reference model's by the
assignment that maximises the summed correlation (Li et al. 2016, "Convergent
learning"; Ainsworth et al. 2023, "Git Re-Basin", activation matching).
"""

from __future__ import annotations

import torch

from ..spec import MergePoint
from ..stats import PointStats
from .base import ReferenceAligner, permutation_matrix
from .linalg import match_permutation
from .registry import register_aligner

__all__ = ["PermutationAligner"]


@register_aligner
class PermutationAligner(ReferenceAligner):
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
    self_moments = "diagonal"  # correlations need cross terms and variances only
    kind = "permutation"
    description = "activation matching: Hungarian on feature correlations, all-to-one (Git Re-Basin AM)"

    def solve_pair(self, point: MergePoint, stats: PointStats, ref: int, m: int) -> tuple[torch.Tensor, torch.Tensor, float, None]:
        corr = stats.corr(ref, m).cpu()
        perm = match_permutation(corr)
        P = permutation_matrix(perm)
        return P, P.T.contiguous(), float(corr[torch.arange(point.dim), perm].mean()), None
