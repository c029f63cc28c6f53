"""The label analysis: step 1 of the algorithm in :mod:`autoalign.graph.discover`.

The traced graph runs on the example inputs node by node; each node keeps its real
value, and its channel rule computes its label tensor and records the relations
(identified coordinates, constraints, parameter roles, sites) in a
:class:`~autoalign.graph.context.LabelState`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..errors import SpecError
from ..trace import as_input_tuple, eval_mode, is_exported
from .context import LabelState, ParamOrigin, RuleContext, unique_ids
from .registry import ChannelRule, RuleTable, find_rule, rule_overrides
from .rotary import rotary_candidates, rotary_label
from .scopes import ModuleCallNode, ScopeCall, rule_scopes
from .rules import register_timm_rules, register_torchvision_rules, register_transformers_rules  # noqa: F401  registers the built-in rules
from .rules.labels import unknown

__all__ = ["analyse"]


def _contains_tensor(v: Any) -> bool:
    """Whether a (nested) value holds a tensor."""
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_tensor(x) for x in v.values())
    return False


def _check_label(node: fx.Node, value: Any, lab: Any) -> Any:
    """Labels must mirror the structure and shapes of the real value."""
    if lab is None:
        return None
    if isinstance(value, torch.Tensor):
        if not isinstance(lab, torch.Tensor) or tuple(lab.shape) != tuple(value.shape) or lab.dtype != torch.int64:
            got = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
            raise SpecError(
                f"{node.format_node()}: channel rule returned a label of shape {got} for an output of shape "
                f"{tuple(value.shape)} (a channel rule bug)"
            )
        return lab
    if isinstance(value, (list, tuple)) and isinstance(lab, (list, tuple)) and len(lab) == len(value):
        return type(lab)(_check_label(node, v, l) for v, l in zip(value, lab))
    return None


def _occurrence(lab: Any, state: LabelState) -> None:
    """Record the coordinates of each tensor of a (nested) label as one occurrence."""
    if isinstance(lab, torch.Tensor):
        ids = unique_ids(lab, state.next_id)
        if ids.numel():
            state.occurrences.append(ids.numpy())
    elif isinstance(lab, (list, tuple)):
        for x in lab:
            _occurrence(x, state)


def analyse(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    strict: bool = False,
    keys: set[str] | None = None,
    rules: Mapping[Any, ChannelRule] | RuleTable | None = None,
    model: nn.Module | None = None,
) -> LabelState:
    """Run the label analysis over a traced graph (step 1 of :mod:`autoalign.graph.discover`).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The traced model.
    example_inputs : Tensor or tuple
        Positional inputs of one forward call.
    strict : bool, default False
        Raise :class:`~autoalign.UnsupportedOpError` instead of freezing.
    keys : set of str, optional
        The state-dict keys of the original model; tensors the tracer added
        (``_tensor_constantN``) are treated as constants, not parameters.
    rules : mapping, optional
        Per-call channel rules ``{target: rule}``, consulted before the
        registry (see :func:`~autoalign.graph.registry.rule_overrides`).
    model : nn.Module, optional
        The model ``gm`` was traced from. For a graph from ``torch.export`` it gives the
        classes of the modules that issued the ops, so that a module with a channel rule
        is analysed as one op again (:mod:`autoalign.graph.scopes`).

    Returns
    -------
    LabelState
        Labels, values and the recorded relations.
    """
    overrides = rule_overrides(rules)
    register_torchvision_rules()
    register_transformers_rules()
    register_timm_rules()
    inputs = list(as_input_tuple(example_inputs))
    state = LabelState(gm, strict=strict)
    canonical: dict[int, str] = {}
    for k, v in gm.state_dict(keep_vars=True).items():
        if keys is not None and k not in keys:
            continue
        state.param_shapes[k] = tuple(v.shape)
        first = canonical.setdefault(id(v), k)
        if first != k:
            state.aliases[k] = first
    scopes = rule_scopes(gm, model, overrides) if model is not None and is_exported(gm) else {}
    rotary = {n: ms for n, ms in rotary_candidates(gm).items() if n not in scopes}
    deferred = {m for ms in rotary.values() for m in ms}  # analysed at their sum (see .rotary)
    interp = fx.Interpreter(gm)
    with torch.no_grad(), eval_mode(gm):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = inputs.pop(0) if inputs else (node.args[0] if node.args else None)
                state.values[node] = value
                state.labels[node] = None
                continue
            if node.op == "get_attr":
                value = interp.fetch_attr(node.target)
                state.values[node] = value
                state.labels[node] = None
                if node.target in state.param_shapes:
                    state.origins[node] = ParamOrigin(node.target)
                    state.touched.add(node.target)
                continue
            if node.op == "output":
                ctx = RuleContext(state, node, None)
                labs = ctx.all_ids([ctx.label(a) for a in node.args])
                ctx.freeze(labs, "model output", io=True)
                continue
            args = fx.node.map_arg(node.args, lambda n: state.values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: state.values[n])
            value = getattr(interp, node.op)(node.target, args, kwargs)
            state.values[node] = value
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                for name, _ in list(mod.named_parameters()) + list(mod.named_buffers()):
                    state.touched.add(f"{node.target}.{name}")
            call = scopes.get(node)
            if call is not None:  # inside a call of a ruled module: its rule runs once, at the output
                state.labels[node] = _scope_label(state, call, value) if node is call.output else None
            elif node in deferred:
                state.labels[node] = None
            elif node in rotary:
                state.labels[node] = _rotary_or_ops(state, node, value, rotary[node], overrides)
            else:
                state.labels[node] = _label_of(state, node, value, overrides)
            _occurrence(state.labels[node], state)
    return state


def _scope_label(state: LabelState, call: ScopeCall, value: Any) -> Any:
    """The label of a ruled module call's output, from the module's rule (see :mod:`.scopes`)."""
    for name, _ in list(call.module.named_parameters()) + list(call.module.named_buffers()):
        state.touched.add(f"{call.path}.{name}")
    node = ModuleCallNode(call)
    if not _contains_tensor(value):
        return None
    return _check_label(call.output, value, call.rule(RuleContext(state, node, value, module=call.module)))  # type: ignore[arg-type]


def _rotary_or_ops(
    state: LabelState, node: fx.Node, value: Any, products: tuple[fx.Node, fx.Node], overrides: RuleTable | None
) -> Any:
    """The label of a candidate rotary sum: the rotary rule's, or else its two products' rules
    and then its own, as if they had not been deferred."""
    lab = rotary_label(RuleContext(state, node, value), products)
    if lab is not None:
        return lab
    for m in products:
        state.labels[m] = _label_of(state, m, state.values[m], overrides)
        _occurrence(state.labels[m], state)
    return _label_of(state, node, value, overrides)


def _label_of(state: LabelState, node: fx.Node, value: Any, overrides: RuleTable | None) -> Any:
    """The label of one node's output, from its channel rule (overrides first)."""
    ctx = RuleContext(state, node, value)
    if node.op == "call_function" and node.target is getattr:
        src = node.args[0]
        lab = state.labels.get(src) if isinstance(src, fx.Node) else None
        if isinstance(value, torch.Tensor) and isinstance(lab, torch.Tensor):
            return getattr(lab, node.args[1])
        return None
    rule = find_rule(node.op, node.target, ctx.module, overrides)
    if rule is None:
        if not _contains_tensor(value):
            return None
        return unknown(ctx)
    if not _contains_tensor(value):
        # sizes, flags and other non-tensor results carry no features
        return None
    return _check_label(node, value, rule(ctx))
