"""Module rules on exported graphs: a registered module class seen as one op again.

A ``torch.export`` graph holds ATen ops, not module calls: a module whose class has a
channel rule (``register_channel_rule(MyLayer, rule)``, or a library's activation
module registered as pointwise) is decomposed there into the ops of its ``forward``.
Most decompositions are analysed exactly by the ATen rules, but some are more
restrictive than the module as a whole (GPT-2's ``gelu_new`` is a product of
features plus a constant inside one pointwise nonlinearity), and a user's rule is
what the user asked for. This module finds, for each call of such a module, the
nodes it issued, its one tensor input and its one output, so that the analysis
(:func:`autoalign.graph.analyse.analyse`) applies the module's rule once, at the
output node, instead of the rules of the ops inside.

Only modules outside ``torch.nn`` are lifted: ``torch.nn`` layers map to one ATen op
each, whose rules match theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .registry import ChannelRule, RuleTable, find_rule

__all__ = ["ScopeCall", "ModuleCallNode", "rule_scopes"]


@dataclass
class ScopeCall:
    """One call of a module with a channel rule inside an exported graph.

    Attributes
    ----------
    path : str
        The module's path in the model.
    module : nn.Module
        The model's own submodule.
    rule : callable
        Its channel rule.
    input : fx.Node
        The one tensor that enters the call from outside.
    output : fx.Node
        The one node whose value leaves the call.
    nodes : set of fx.Node
        Every node the call issued.
    """

    path: str
    module: nn.Module
    rule: ChannelRule
    input: fx.Node
    output: fx.Node
    nodes: set[fx.Node] = field(default_factory=set)


class ModuleCallNode:
    """A stand-in ``call_module`` node for a :class:`ScopeCall`, as a module rule expects one:
    named after the call's output node (so taps, producers and sites refer to a real node),
    its target the module path, its one argument the call's input."""

    op = "call_module"

    def __init__(self, call: ScopeCall) -> None:
        self.name = call.output.name
        self.target = call.path
        self.args = (call.input,)
        self.kwargs: dict[str, Any] = {}
        self.meta = call.output.meta
        self.users = call.output.users

    def format_node(self) -> str:
        return f"%{self.name} : call_module[target={self.target}](args = (%{self.args[0].name},))"


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``(call key, module path)`` of every module call ``node`` sits in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(k, str(v[0])) for k, v in stack.items() if isinstance(v, tuple) and v and v[0]]


def _is_torch_nn(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def rule_scopes(gm: fx.GraphModule, model: nn.Module, overrides: RuleTable | None = None) -> dict[fx.Node, ScopeCall]:
    """The calls of ruled modules (outside ``torch.nn``) in an exported graph, by node.

    Parameters
    ----------
    gm : fx.GraphModule
        From :func:`autoalign.trace.export.export_trace`.
    model : nn.Module
        The model it was exported from (its submodules give the classes).
    overrides : RuleTable, optional
        Per-call rules, consulted before the registry.

    Returns
    -------
    dict of fx.Node to ScopeCall
        Every node issued inside such a call (the outermost ruled module wins); calls
        with more than one tensor input or output are left to the ATen rules.
    """
    members: dict[str, list[fx.Node]] = {}
    found: dict[str, tuple[str, nn.Module, ChannelRule]] = {}
    for node in gm.graph.nodes:
        for key, path in _stack(node):
            if key not in found:
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    continue
                rule = None if _is_torch_nn(module) else find_rule("call_module", path, module, overrides)
                if rule is None:
                    continue
                found[key] = (path, module, rule)
            members.setdefault(key, []).append(node)
            break  # the outermost ruled call owns the node
    out: dict[fx.Node, ScopeCall] = {}
    for key, nodes in members.items():
        inside = set(nodes)
        inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
        inputs = [a for a in dict.fromkeys(inputs) if isinstance(a.meta.get("val"), torch.Tensor)]
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue
        path, module, rule = found[key]
        call = ScopeCall(path, module, rule, inputs[0], outputs[0], inside)
        for n in nodes:
            out[n] = call
    return out
