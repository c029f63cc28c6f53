"""Aligners: one contract, registered by name.

Built in: ``identity`` (plain averaging), ``permutation`` (activation matching)
and ``cca`` (CCA Merge). Third-party aligners register through
:func:`register_aligner` or the ``autoalign.aligners`` entry-point group.
"""

from .base import AlignProblem, Aligner, Plan, PointPlan, PointwiseAligner, identity_plan, permutation_matrix
from .cca import CCAAligner, cca_transform
from .identity import IdentityAligner
from .mcca import MCCAAligner, mcca_transforms
from .ot import OTAligner
from .zipit import ZipItAligner
from .permutation import PermutationAligner
from .weight_matching import WeightMatchingAligner, weight_matching
from .registry import describe_aligners, get_aligner, list_aligners, register_aligner, reload_plugins

__all__ = [
    "AlignProblem",
    "Aligner",
    "CCAAligner",
    "IdentityAligner",
    "MCCAAligner",
    "OTAligner",
    "PermutationAligner",
    "Plan",
    "PointPlan",
    "PointwiseAligner",
    "WeightMatchingAligner",
    "ZipItAligner",
    "cca_transform",
    "describe_aligners",
    "get_aligner",
    "identity_plan",
    "list_aligners",
    "mcca_transforms",
    "permutation_matrix",
    "register_aligner",
    "weight_matching",
    "reload_plugins",
]
