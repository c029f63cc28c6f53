"""Feature capture: traced copies of a model with taps at named graph nodes.

The one mechanism by which the library reads features: the statistics pass
(:mod:`autoalign.stats`) and the repair passes (:mod:`autoalign.repair`) both run
a :func:`tapped_module`, a ``torch.fx`` copy of the model whose listed nodes hand
their values to a callback as the forward pass computes them. A tap may also
*replace* the value the rest of the graph sees (REPAIR's per-batch correction).
Submodules are shared with the original model (a BatchNorm that updates its
running statistics in the copy updates the model's), parameters are not copied.

:func:`module_nodes` finds the graph nodes that call a submodule by name, for
taps on a module's output or its input.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch.fx as fx
from torch import nn

from .errors import MergeError
from .trace import trace

__all__ = ["Tap", "tapped_module", "feature_module", "module_nodes"]

#: ``observe(node_name, value)``: called with a tapped node's value.
Observer = Callable[[str, Any], None]


class Tap(nn.Module):
    """Hands a node's value to ``observe(node, value)`` as the forward pass reaches it.

    With ``rewrite`` the tap returns ``rewrite(node, value)`` and every later use
    of the node reads that instead; without, it returns nothing, so the traced
    module frees the value after its last real use.
    """

    def __init__(self, node: str, observe: Observer | None, rewrite: Callable[[str, Any], Any] | None = None) -> None:
        super().__init__()
        self.node = node
        self.observe = observe
        self.rewrite = rewrite

    def forward(self, value: Any) -> Any:
        if self.observe is not None:
            self.observe(self.node, value)
        if self.rewrite is not None:
            return self.rewrite(self.node, value)
        return None


def _nodes_of(gm: fx.GraphModule, names: Sequence[str]) -> dict[str, fx.Node]:
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise MergeError(f"nodes {missing[:3]} of the merge spec are not in the traced model; was the spec made for this architecture?")
    return nodes


def tapped_module(
    model: nn.Module,
    example_inputs: Any,
    node_names: Sequence[str],
    observe: Observer | None,
    *,
    rewrite: Mapping[str, Callable[[str, Any], Any]] | None = None,
    keep_output: bool = False,
    **trace_options: Any,
) -> fx.GraphModule:
    """A traced copy of ``model`` that calls ``observe(name, value)`` right after each named node runs.

    Parameters
    ----------
    model : nn.Module
        The model (not modified; its submodules are shared with the copy).
    example_inputs : tensor or tuple
        Inputs for tracing (only their structure is used).
    node_names : sequence of str
        Graph nodes to tap (as named by :func:`autoalign.trace`).
    observe : callable or None
        ``observe(node_name, value)``.
    rewrite : dict of str to callable, optional
        Per node, ``rewrite(node_name, value)`` whose result replaces the node's
        value for every later use.
    keep_output : bool, default False
        Keep the model's output (for passes that need the whole forward pass, e.g.
        BatchNorm statistics downstream of the last tap). Otherwise the copy
        returns nothing and computes nothing past the last tap.
    **trace_options
        ``leaf_modules`` / ``autowrap_functions`` of :func:`autoalign.trace`.

    Returns
    -------
    fx.GraphModule

    Raises
    ------
    MergeError
        When a named node is not in the traced graph.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    >>> seen = []
    >>> gm = tapped_module(net, torch.randn(2, 3), ["_0"], lambda n, v: seen.append((n, tuple(v.shape))))
    >>> _ = gm(torch.randn(5, 3))
    >>> seen
    [('_0', (5, 4))]
    """
    rewrite = dict(rewrite or {})
    names = list(dict.fromkeys(list(node_names) + list(rewrite)))
    gm = trace(model, example_inputs, shapes=False, **trace_options)  # no shapes needed: skip a forward pass
    nodes = _nodes_of(gm, names)
    taps = []
    for i, name in enumerate(names):
        gm.add_submodule(f"_autoalign_tap_{i}", Tap(name, observe if name in node_names else None, rewrite.get(name)))
        node = nodes[name]
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(f"_autoalign_tap_{i}", (node,))
        if name in rewrite:
            node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
        else:
            taps.append(tap)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not keep_output:
        out.args = (tuple(taps),)
    elif taps:
        # keep the taps alive next to the real output
        out.args = ((out.args[0], tuple(taps)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def feature_module(model: nn.Module, example_inputs: Any, node_names: Sequence[str], **trace_options: Any) -> fx.GraphModule:
    """A traced copy of ``model`` that returns the outputs of the named nodes (a tuple).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    >>> fm = feature_module(net, torch.randn(2, 3), ["_0"])
    >>> tuple(fm(torch.randn(5, 3))[0].shape)
    (5, 4)
    """
    gm = trace(model, example_inputs, shapes=False, **trace_options)
    nodes = _nodes_of(gm, node_names)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(nodes[n] for n in node_names),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def module_nodes(gm: fx.GraphModule, module_name: str) -> list[fx.Node]:
    """The nodes of ``gm`` that call the submodule ``module_name`` (one per call).

    Examples
    --------
    >>> import torch
    >>> from autoalign.trace import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.randn(2, 3))
    >>> [n.name for n in module_nodes(gm, "0")]
    ['_0']
    """
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module_name]
