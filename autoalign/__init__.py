"""autoalign: merge neural networks trained from different seeds into one.

Trace any model with ``torch.fx``, discover its merge points, align the models'
features (CCA Merge and other aligners) and average them into one model of the
same architecture.
"""

from . import aligners
from .aligners import (
    AlignProblem,
    Aligner,
    Plan,
    PointPlan,
    PointwiseAligner,
    ReferenceAligner,
    get_aligner,
    list_aligners,
    register_aligner,
)
from .apply import average_state_dicts, fold_batchnorm, transform_state_dict
from .errors import (
    AutoalignError,
    DataError,
    MergeError,
    ModelError,
    NonFiniteError,
    OptionError,
    SpecError,
    TraceError,
    UnsupportedOpError,
)
from .graph import RuleContext, find_merge_points, register_channel_rule
from .spec import AxisRole, FoldedNorm, MergePoint, MergeSpec, Site
from .testing import CheckReport, check
from .calibration import Calibration
from .merge import MergeReport, MergeResult, merge, merge_with_report
from .options import MergeOptions
from .progress import LineProgress, Progress
from .repair import reset_bn
from .stats import Stats, collect_stats
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "AlignProblem",
    "Aligner",
    "Calibration",
    "LineProgress",
    "MergeOptions",
    "MergeReport",
    "MergeResult",
    "Plan",
    "PointPlan",
    "Progress",
    "PointwiseAligner",
    "ReferenceAligner",
    "Stats",
    "aligners",
    "collect_stats",
    "get_aligner",
    "list_aligners",
    "merge",
    "merge_with_report",
    "register_aligner",
    "reset_bn",
    "AutoalignError",
    "DataError",
    "ModelError",
    "NonFiniteError",
    "OptionError",
    "AxisRole",
    "CheckReport",
    "FoldedNorm",
    "MergeError",
    "MergePoint",
    "MergeSpec",
    "RuleContext",
    "Site",
    "SpecError",
    "TraceError",
    "UnsupportedOpError",
    "average_state_dicts",
    "check",
    "find_merge_points",
    "fold_batchnorm",
    "register_channel_rule",
    "trace",
    "transform_state_dict",
]
