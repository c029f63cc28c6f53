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

from .errors import MergeError, TraceError
from .trace import is_exported, trace
from .trace.export import module_output_nodes

__all__ = ["Tap", "insert_taps", "tapped_module", "module_tapped", "feature_module", "module_nodes"]

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


def _is_tap(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("_autoalign_tap_")


def _nodes_of(gm: fx.GraphModule, names: Sequence[str]) -> dict[str, fx.Node]:
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise MergeError(
            f"nodes {missing[:3]} of the merge spec are not in the traced model; was the spec made for this "
            f"architecture, with the same tracer= (this graph comes from {gm.meta.get('autoalign_frontend', 'torch.fx')})?"
        )
    return nodes


def insert_taps(
    gm: fx.GraphModule,
    taps: Sequence[tuple[fx.Node, Observer | None, Callable[[str, Any], Any] | None]],
    *,
    keep_output: bool = False,
) -> fx.GraphModule:
    """Insert a :class:`Tap` after each given node of ``gm`` (in place; returns ``gm``).

    Parameters
    ----------
    gm : fx.GraphModule
        A traced module.
    taps : sequence of (node, observe, rewrite)
        Per tap, the node, the callback ``observe(node_name, value)`` (or None) and
        ``rewrite(node_name, value)`` whose result every later use of the node reads
        instead (or None).
    keep_output : bool, default False
        Keep the model's output (for passes that need the whole forward pass, e.g.
        BatchNorm statistics downstream of the last tap). Otherwise the module returns
        nothing and computes nothing past the last tap.
    """
    observers = []
    for i, (node, observe, rewrite) in enumerate(taps):
        name = f"_autoalign_tap_{i}"
        gm.add_submodule(name, Tap(node.name, observe, rewrite))
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(name, (node,))
        if rewrite is not None:  # every later use reads the rewritten value; other taps see the raw one
            node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap and not _is_tap(user))
        else:
            observers.append(tap)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not keep_output:
        _plain_outputs(gm)
        out.args = (tuple(observers),)
    elif observers:
        out.args = ((out.args[0], tuple(observers)),)  # keep the taps alive next to the real output
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _plain_outputs(gm: fx.GraphModule) -> None:
    """Let a graph from ``torch.export`` return what its output node lists, as a plain
    tuple (its code otherwise rebuilds the model's output object from a fixed structure)."""
    if is_exported(gm):
        gm.graph.set_codegen(fx.graph.CodeGen())


def tapped_module(
    model: nn.Module,
    example_inputs: Any,
    node_names: Sequence[str],
    observe: Observer,
    *,
    modules: Sequence[str] = (),
    observe_module: Observer | None = None,
    **trace_options: Any,
) -> fx.GraphModule:
    """A traced copy of ``model`` that calls ``observe(name, value)`` right after each named node
    runs (and ``observe_module(module_name, output)`` after each call of a named submodule)
    and computes nothing past the last of them.

    Parameters
    ----------
    model : nn.Module
        The model (not modified; its submodules are shared with the copy).
    example_inputs : tensor or tuple
        Inputs for tracing (only their structure is used).
    node_names : sequence of str
        Graph nodes to tap (as named by :func:`autoalign.trace`).
    observe : callable
        ``observe(node_name, value)``.
    modules : sequence of str, optional
        Submodules whose outputs are tapped too (every call; a module that is not in
        the graph, e.g. inside a leaf module, is never observed).
    observe_module : callable, optional
        ``observe_module(module_name, output)``; required with ``modules``.
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
    gm = trace(model, example_inputs, shapes=False, **trace_options)  # no shapes needed: skip a forward pass
    nodes = _nodes_of(gm, node_names)
    taps: list[tuple[fx.Node, Observer | None, Callable[[str, Any], Any] | None]] = [(nodes[name], observe, None) for name in node_names]
    if modules and observe_module is None:
        raise MergeError("tapped_module: modules given without observe_module")
    for module in modules:
        taps.extend((node, lambda _n, v, module=module: observe_module(module, v), None) for node in module_nodes(gm, module))
    return insert_taps(gm, taps)


def module_tapped(
    model: nn.Module,
    *,
    outputs: Mapping[str, Callable[[Any], None]] | None = None,
    inputs: Mapping[str, Callable[[Any], None]] | None = None,
    rewrite_outputs: Mapping[str, Callable[[Any], Any]] | None = None,
    keep_output: bool = False,
    **trace_options: Any,
) -> tuple[fx.GraphModule, set[str]]:
    """A traced copy of ``model`` with taps on submodules' outputs and inputs, by module name.

    Every call of a named submodule is tapped (a module called twice is observed twice).

    Parameters
    ----------
    model : nn.Module
        The model (not modified; its submodules are shared with the copy, so a
        BatchNorm in training mode updates the model's running statistics).
    outputs, inputs : dict of str to callable, optional
        Per module name, ``fn(value)`` called with each output (or first input).
    rewrite_outputs : dict of str to callable, optional
        Per module name, ``fn(value)`` whose result replaces the module's output for
        the rest of the forward pass.
    keep_output : bool, default False
        Run the whole forward pass (see :func:`insert_taps`).

    Returns
    -------
    (fx.GraphModule, set of str)
        The copy, and the names of the modules that appear in its graph (a module
        that does not, e.g. inside a leaf module, is never observed).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> seen = []
    >>> gm, found = module_tapped(net, inputs={"2": lambda x: seen.append(tuple(x.shape))})
    >>> _ = gm(torch.randn(5, 3)); seen, found
    ([(5, 4)], {'2'})
    """
    outputs, inputs, rewrite_outputs = dict(outputs or {}), dict(inputs or {}), dict(rewrite_outputs or {})
    if trace_options.get("tracer", "auto") == "export":
        return _hooked(model, outputs, inputs, rewrite_outputs, keep_output)
    try:
        gm = trace(model, (), shapes=False, **{**trace_options, "tracer": "fx"})
    except TraceError:
        if trace_options.get("tracer", "auto") == "fx":
            raise
        return _hooked(model, outputs, inputs, rewrite_outputs, keep_output)
    taps: list[tuple[fx.Node, Observer | None, Callable[[str, Any], Any] | None]] = []
    found = set()
    for name in dict.fromkeys([*outputs, *inputs, *rewrite_outputs]):
        for node in module_nodes(gm, name):
            found.add(name)
            if name in inputs and node.args and isinstance(node.args[0], fx.Node):
                taps.append((node.args[0], lambda _n, v, fn=inputs[name]: fn(v), None))
            if name in outputs:
                taps.append((node, lambda _n, v, fn=outputs[name]: fn(v), None))
            if name in rewrite_outputs:
                taps.append((node, None, lambda _n, v, fn=rewrite_outputs[name]: fn(v)))
    return insert_taps(gm, taps, keep_output=keep_output), found


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
    _plain_outputs(gm)
    out.args = (tuple(nodes[n] for n in node_names),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class _Hooked(nn.Module):
    """The model itself with taps on submodules by forward hooks, present only during a call.

    What :func:`module_tapped` gives for models that only ``torch.export`` can trace: an
    exported graph has no module calls to tap and runs in eval mode only, while hooks
    see every call of the real modules, in training mode too (BatchNorm statistics).
    """

    def __init__(
        self, model: nn.Module, outputs: dict[str, Callable[[Any], None]], inputs: dict[str, Callable[[Any], None]],
        rewrite_outputs: dict[str, Callable[[Any], Any]], keep_output: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.taps = (outputs, inputs, rewrite_outputs)
        self.keep_output = keep_output

    def forward(self, *args: Any) -> Any:
        outputs, inputs, rewrite_outputs = self.taps
        handles = []
        try:
            for name, fn in inputs.items():
                handles.append(self.model.get_submodule(name).register_forward_pre_hook(
                    lambda _m, a, fn=fn: fn(a[0]) and None))
            for name, fn in outputs.items():
                handles.append(self.model.get_submodule(name).register_forward_hook(
                    lambda _m, _a, out, fn=fn: fn(out) and None))
            for name, fn in rewrite_outputs.items():
                handles.append(self.model.get_submodule(name).register_forward_hook(
                    lambda _m, _a, out, fn=fn: fn(out)))
            out = self.model(*args)
        finally:
            for h in handles:
                h.remove()
        return out if self.keep_output else None


def _hooked(
    model: nn.Module, outputs: dict[str, Callable[[Any], None]], inputs: dict[str, Callable[[Any], None]],
    rewrite_outputs: dict[str, Callable[[Any], Any]], keep_output: bool,
) -> tuple[nn.Module, set[str]]:
    """:func:`module_tapped` by forward hooks (see :class:`_Hooked`)."""
    names = dict(model.named_modules())
    found = {n for n in [*outputs, *inputs, *rewrite_outputs] if n in names}
    keep = lambda d: {k: v for k, v in d.items() if k in found}  # noqa: E731
    return _Hooked(model, keep(outputs), keep(inputs), keep(rewrite_outputs), keep_output), found


def module_nodes(gm: fx.GraphModule, module_name: str) -> list[fx.Node]:
    """The nodes of ``gm`` that call the submodule ``module_name`` (one per call); in a
    graph from ``torch.export``, the nodes whose values leave it
    (:func:`autoalign.trace.export.module_output_nodes`).

    Examples
    --------
    >>> import torch
    >>> from autoalign.trace import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.randn(2, 3))
    >>> [n.name for n in module_nodes(gm, "0")]
    ['_0']
    """
    if is_exported(gm):
        return module_output_nodes(gm, module_name)
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module_name]
