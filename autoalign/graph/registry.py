"""The registry of channel rules: which rule handles which graph node.

A *channel rule* is a callable ``rule(ctx: RuleContext) -> label`` (see
:class:`autoalign.graph.context.RuleContext`). Rules are registered for

* a module class (``call_module`` nodes; matched exactly, or through a base class
  whose ``forward`` the subclass does not override),
* a function (``call_function`` nodes, e.g. ``torch.nn.functional.linear``),
* a method name (``call_method`` nodes, e.g. ``"view"``).

Rules can also be given for one discovery only, without touching this registry:
``find_merge_points(model, x, rules={MyLayer: my_rule})`` builds a
:class:`RuleTable` with :func:`rule_overrides` and consults it first.

Every target and rule is checked when it is registered (or passed as an
override); a bad one raises :class:`autoalign.OptionError` naming the target.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Union

from torch import nn

from ..errors import OptionError

__all__ = [
    "ChannelRule", "Target", "TargetKind", "RuleTable", "register_channel_rule", "rule_overrides", "find_rule",
    "registered_rules",
    "snapshot",
    "restore",
]

ChannelRule = Callable[[Any], Any]
"""A channel rule: ``rule(ctx: RuleContext) -> label``."""
Target = Union[type, Callable[..., Any], str]
"""What a rule is registered for: a module class, a function or a method name."""
TargetKind = Literal["module", "function", "method"]
"""The table a target belongs to (``call_module``, ``call_function``, ``call_method`` nodes)."""


@dataclass
class RuleTable:
    """Channel rules by target kind, and the lookup of the rule for a graph node.

    The global registry is one table; the ``rules=`` overrides of one discovery
    are another (see :func:`rule_overrides`).

    Attributes
    ----------
    modules : dict
        Rules of module classes (``call_module`` nodes).
    functions : dict
        Rules of functions (``call_function`` nodes).
    methods : dict
        Rules of method names (``call_method`` nodes).
    """

    modules: dict[type, ChannelRule] = field(default_factory=dict)
    functions: dict[Any, ChannelRule] = field(default_factory=dict)
    methods: dict[str, ChannelRule] = field(default_factory=dict)

    def table(self, kind: TargetKind) -> dict[Any, ChannelRule]:
        """The dictionary holding the rules of targets of ``kind``."""
        return {"module": self.modules, "function": self.functions, "method": self.methods}[kind]

    def find(self, op: str, target: Any, module: nn.Module | None = None) -> ChannelRule | None:
        """The rule for a node (``op``/``target`` as in ``torch.fx``), or ``None``.

        A module class matches exactly, or through a base class whose ``forward``
        the subclass does not override.
        """
        if op == "call_module" and module is not None:
            cls = type(module)
            if cls in self.modules:
                return self.modules[cls]
            for base in cls.__mro__[1:]:
                if base in self.modules:
                    # a subclass inherits the rule only if it keeps the base's forward
                    if cls.forward is base.forward:
                        return self.modules[base]
                    return None
            return None
        if op == "call_function":
            try:
                return self.functions.get(target)
            except TypeError:  # unhashable target
                return None
        if op == "call_method":
            return self.methods.get(target)
        return None


_MODULE_RULES: dict[type, ChannelRule] = {}
_FUNCTION_RULES: dict[Any, ChannelRule] = {}
_METHOD_RULES: dict[str, ChannelRule] = {}
_REGISTRY = RuleTable(_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES)


def _name(obj: Any) -> str:
    """A readable name of a target or rule for messages."""
    if isinstance(obj, str):
        return f"method {obj!r}"
    mod = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qual is None:
        return repr(obj)
    return f"{mod}.{qual}" if mod else qual


def _target_kind(target: Any) -> TargetKind:
    """Which table ``target`` belongs to; :class:`OptionError` for anything else."""
    if isinstance(target, str):
        if not target.isidentifier():
            raise OptionError(f"cannot register a channel rule for the method name {target!r}: not a valid method name")
        return "method"
    if inspect.isclass(target):
        if not issubclass(target, nn.Module):
            raise OptionError(f"a class target must be an nn.Module subclass, got {target!r}")
        return "module"
    if isinstance(target, nn.Module):
        cls = type(target)
        raise OptionError(
            f"cannot register a channel rule for a module instance ({cls.__name__}); register it for the class "
            f"{cls.__module__}.{cls.__qualname__} instead"
        )
    if callable(target):
        try:
            hash(target)
        except TypeError:
            raise OptionError(f"cannot register a channel rule for {target!r}: the function is not hashable") from None
        return "function"
    raise OptionError(
        f"cannot register a channel rule for {target!r}: expected a module class, a function or a method name"
    )


def _check_rule(target: Any, rule: Any) -> None:
    """A rule must be callable with one positional argument (the :class:`RuleContext`)."""
    if not callable(rule):
        raise OptionError(
            f"the channel rule for {_name(target)} must be a callable rule(ctx), got {type(rule).__name__} {rule!r}"
        )
    try:
        sig = inspect.signature(rule)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        sig.bind(None)
    except TypeError:
        raise OptionError(
            f"the channel rule {_name(rule)} for {_name(target)} must take one argument (the RuleContext), "
            f"but its signature is {sig}"
        ) from None


def _targets(target: Any) -> tuple[Any, ...]:
    """``target`` as a non-empty tuple of single targets."""
    targets = target if isinstance(target, tuple) else (target,)
    if not targets:
        raise OptionError("cannot register a channel rule for an empty tuple of targets")
    return targets


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
        ``rule(ctx) -> label``, called with one argument (the
        :class:`~autoalign.graph.context.RuleContext`). Omit it to use this
        function as a decorator.
    replace : bool, default False
        Allow replacing an existing rule (otherwise a duplicate is an error).
        Registering the same rule again is always allowed.

    Returns
    -------
    The rule (so the function works as a decorator).

    Raises
    ------
    OptionError
        If a target is not a module class (an ``nn.Module`` subclass), a
        hashable function or a method name; if the rule is not callable with one
        argument; if ``replace`` is not a bool; or if a different rule is already
        registered for a target and ``replace`` is False. Nothing is registered
        then. (:class:`~autoalign.OptionError` is also a ``TypeError`` and a
        ``ValueError``.)

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

    Mistakes are caught at registration:

    >>> autoalign.register_channel_rule(Scale(3), _scale_rule)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    autoalign.errors.OptionError: cannot register a channel rule for a module instance (Scale); ...
    """
    if not isinstance(replace, bool):
        raise OptionError(f"register_channel_rule: replace must be True or False, got {replace!r}")
    targets = _targets(target)
    kinds = [_target_kind(t) for t in targets]
    if rule is None:
        return lambda fn: register_channel_rule(target, fn, replace=replace)
    for t in targets:
        _check_rule(t, rule)
    for t, kind in zip(targets, kinds):
        old = _REGISTRY.table(kind).get(t)
        if old is not None and old is not rule and not replace:
            raise OptionError(
                f"a channel rule for {_name(t)} is already registered ({_name(old)}); pass replace=True to override "
                f"it, or rules={{target: rule}} to find_merge_points to override it for one call"
            )
    for t, kind in zip(targets, kinds):
        _REGISTRY.table(kind)[t] = rule
    return rule


def rule_overrides(rules: Mapping[Any, ChannelRule] | RuleTable | None) -> RuleTable | None:
    """Check per-call rule overrides and gather them into a :class:`RuleTable`.

    Parameters
    ----------
    rules : mapping, RuleTable or None
        ``{target: rule}`` with targets as :func:`register_channel_rule` accepts
        them (a module class, a function, a method name, or a tuple of those).
        A :class:`RuleTable` is returned as it is.

    Returns
    -------
    RuleTable or None
        ``None`` when ``rules`` is ``None`` or empty.

    Raises
    ------
    OptionError
        If ``rules`` is not a mapping, or for a bad target or rule (the same
        checks as :func:`register_channel_rule`), or when two entries give a
        target different rules.
    """
    if rules is None or isinstance(rules, RuleTable):
        return rules
    if not isinstance(rules, Mapping):
        raise OptionError(f"rules must be a mapping {{target: rule}}, got {type(rules).__name__}")
    if not rules:
        return None
    out = RuleTable()
    for target, rule in rules.items():
        for t in _targets(target):
            table = out.table(_target_kind(t))
            _check_rule(t, rule)
            if t in table and table[t] is not rule:
                raise OptionError(f"rules gives {_name(t)} two different rules ({_name(table[t])} and {_name(rule)})")
            table[t] = rule
    return out


def find_rule(
    op: str, target: Any, module: nn.Module | None = None, overrides: RuleTable | None = None
) -> ChannelRule | None:
    """The rule for a node (``op``/``target`` as in ``torch.fx``), or ``None``.

    ``overrides`` (from :func:`rule_overrides`) are consulted before the registry.
    """
    if overrides is not None:
        rule = overrides.find(op, target, module)
        if rule is not None:
            return rule
    return _REGISTRY.find(op, target, module)


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


def snapshot() -> tuple[dict[Any, ChannelRule], ...]:
    """A copy of the global rule tables, for :func:`restore` (e.g. around a test that registers rules).

    Examples
    --------
    >>> saved = snapshot()
    >>> restore(saved)
    """
    return (dict(_MODULE_RULES), dict(_FUNCTION_RULES), dict(_METHOD_RULES))


def restore(saved: tuple[dict[Any, ChannelRule], ...]) -> None:
    """Put the global rule tables back as :func:`snapshot` saw them."""
    for table, old in zip((_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES), saved):
        table.clear()
        table.update(old)
