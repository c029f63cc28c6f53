"""Merge-point discovery: channel labels propagated through a traced graph."""

from .context import RuleContext
from .discover import discover, find_merge_points
from .registry import register_channel_rule, registered_rules

__all__ = ["RuleContext", "discover", "find_merge_points", "register_channel_rule", "registered_rules"]
