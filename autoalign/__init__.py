"""autoalign: merge neural networks trained from different seeds into one.

Trace any model with ``torch.fx``, discover its merge points, align the models'
features (CCA Merge and other aligners) and average them into one model of the
same architecture.
"""

from .apply import average_state_dicts, fold_batchnorm, transform_state_dict
from .errors import AutoalignError, MergeError, SpecError, TraceError, UnsupportedOpError
from .graph import RuleContext, find_merge_points, register_channel_rule
from .spec import AxisRole, FoldedNorm, MergePoint, MergeSpec, Site
from .testing import CheckReport, check
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "AutoalignError",
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
