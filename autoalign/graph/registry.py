"""The registry of channel rules: which rule handles which graph node.

A *channel rule* is a callable ``rule(ctx: RuleContext) -> label`` (see
:class:`autoalign.graph.context.RuleContext`). Rules are registered for

* a module class (``call_module`` nodes; matched exactly, or through a base class
  whose ``forward`` the subclass does not override),
* a function (``call_function`` nodes, e.g. ``torch.nn.functional.linear``),
* a method name (``call_method`` nodes, e.g. ``"view"``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

from torch import nn

__all__ = ["ChannelRule", "register_channel_rule", "find_rule", "registered_rules"]

ChannelRule = Callable[[Any], Any]
Target = Union[type, Callable[..., Any], str]

_MODULE_RULES: dict[type, ChannelRule] = {}
_FUNCTION_RULES: dict[Any, ChannelRule] = {}
_METHOD_RULES: dict[str, ChannelRule] = {}


def _table(target: Target) -> tuple[dict[Any, ChannelRule], Any]:
    if isinstance(target, str):
        return _METHOD_RULES, target
    if inspect.isclass(target):
        if not issubclass(target, nn.Module):
            raise TypeError(f"a class target must be an nn.Module subclass, got {target!r}")
        return _MODULE_RULES, target
    if callable(target):
        return _FUNCTION_RULES, target
    raise TypeError(f"cannot register a channel rule for {target!r}: expected a module class, a function or a method name")


def register_channel_rule(
    target: Target | tuple[Target, ...],
    rule: Optional[ChannelRule] = None,
    *,
    replace: bool = False,
) -> Any:
    """Register how an op relates its input channels to its output channels.

    Parameters
    ----------
    target : module class, function, method name, or a tuple of them
        What the rule handles: ``MyLayer`` for ``call_module`` nodes of that class,
        ``my_function`` for ``call_function`` nodes, ``"my_method"`` for
        ``call_method`` nodes.
    rule : callable, optional
        ``rule(ctx) -> label``. Omit it to use this function as a decorator.
    replace : bool, default False
        Allow replacing an existing rule (otherwise a duplicate is an error).

    Returns
    -------
    The rule (so the function works as a decorator).

    Raises
    ------
    ValueError
        If a rule is already registered for ``target`` and ``replace`` is False.

    Examples
    --------
    A layer that scales each channel by a learned vector behaves like a per-channel
    op: its coordinates may only be permuted.

    >>> import torch, autoalign
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.s = torch.nn.Parameter(torch.ones(c))
    ...     def forward(self, x):
    ...         return x * self.s
    >>> @autoalign.register_channel_rule(Scale, replace=True)
    ... def _scale_rule(ctx):
    ...     lab = ctx.label(ctx.arg(0))
    ...     vec = ctx.channels(lab, -1)
    ...     ctx.role(ctx.module_key("s"), 0, "channel", vec)
    ...     ctx.restrict(vec, "permutation", f"{ctx.name}: per-channel scale")
    ...     return lab
    """
    if rule is None:
        return lambda fn: register_channel_rule(target, fn, replace=replace)
    targets = target if isinstance(target, tuple) else (target,)
    for t in targets:
        table, key = _table(t)
        if key in table and not replace and table[key] is not rule:
            raise ValueError(f"a channel rule for {t!r} is already registered; pass replace=True to override it")
        table[key] = rule
    return rule


def find_rule(op: str, target: Any, module: nn.Module | None = None) -> ChannelRule | None:
    """The rule for a node (``op``/``target`` as in ``torch.fx``), or ``None``."""
    if op == "call_module" and module is not None:
        cls = type(module)
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
        for base in cls.__mro__[1:]:
            if base in _MODULE_RULES:
                # a subclass inherits the rule only if it keeps the base's forward
                if cls.forward is base.forward:
                    return _MODULE_RULES[base]
                return None
        return None
    if op == "call_function":
        try:
            return _FUNCTION_RULES.get(target)
        except TypeError:  # unhashable target
            return None
    if op == "call_method":
        return _METHOD_RULES.get(target)
    return None


def registered_rules() -> dict[str, list[str]]:
    """Names of the registered targets, by kind (for documentation and debugging)."""
    def fname(f: Any) -> str:
        mod = getattr(f, "__module__", None) or ""
        return f"{mod}.{getattr(f, '__qualname__', getattr(f, '__name__', repr(f)))}".lstrip(".")

    return {
        "modules": sorted(f"{c.__module__}.{c.__qualname__}" for c in _MODULE_RULES),
        "functions": sorted(fname(f) for f in _FUNCTION_RULES),
        "methods": sorted(_METHOD_RULES),
    }
