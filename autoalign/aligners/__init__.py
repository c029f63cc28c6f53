"""Aligners: one contract, registered by name.

Built in: ``identity`` (plain averaging), ``permutation`` (activation matching),
``cca`` (CCA Merge), ``mcca`` (multi-view CCA), ``ot`` (OT fusion), ``zipit``
(ZipIt!), ``weight_matching`` (Git Re-Basin), and the ablations ``lstsq``
(least-squares linear map) and ``procrustes`` (orthogonal map). Third-party
aligners register through :func:`register_aligner` or the
``autoalign.aligners`` entry-point group.
"""

from .base import AlignProblem, Aligner, Plan, PointPlan, PointwiseAligner, ReferenceAligner, identity_plan, permutation_matrix
from .cca import CCAAligner, cca_transform
from .identity import IdentityAligner
from .lstsq import LstsqAligner, lstsq_transform
from .mcca import MCCAAligner, mcca_transforms
from .ot import OTAligner
from .zipit import ZipItAligner
from .permutation import PermutationAligner
from .procrustes import ProcrustesAligner, procrustes_transform
from .weight_matching import WeightMatchingAligner, weight_matching
from .registry import describe_aligners, get_aligner, list_aligners, register_aligner, reload_plugins

__all__ = [
    "AlignProblem",
    "Aligner",
    "CCAAligner",
    "IdentityAligner",
    "LstsqAligner",
    "MCCAAligner",
    "OTAligner",
    "PermutationAligner",
    "Plan",
    "PointPlan",
    "PointwiseAligner",
    "ReferenceAligner",
    "ProcrustesAligner",
    "WeightMatchingAligner",
    "ZipItAligner",
    "cca_transform",
    "describe_aligners",
    "get_aligner",
    "identity_plan",
    "list_aligners",
    "lstsq_transform",
    "mcca_transforms",
    "permutation_matrix",
    "procrustes_transform",
    "register_aligner",
    "weight_matching",
    "reload_plugins",
]
