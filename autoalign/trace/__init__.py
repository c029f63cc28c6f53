"""Front ends: models into ``fx.GraphModule`` graphs that discovery, statistics and repair read.

* :mod:`.fx` — ``torch.fx`` symbolic tracing: a graph of modules and functions, no
  example inputs needed, escape hatches for what it cannot trace (``leaf_modules``,
  ``autowrap_functions``);
* :mod:`.export` — ``torch.export`` (non-strict): an ATen-level graph recorded on
  example inputs, for models symbolic tracing cannot handle (Hugging Face
  transformers, data-dependent Python, ``**kwargs`` forwarding).

:func:`trace` picks one: ``tracer="auto"`` (the default) tries ``torch.fx`` first
and falls back to ``torch.export`` when symbolic tracing fails. Both give graphs
whose ``get_attr`` nodes read the model's parameters under their ``state_dict``
names, so the spec, the self-check, statistics, aligners and apply work unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch.fx as fx
from torch import nn

from ..errors import OptionError, TraceError
from .common import as_input_tuple, eval_mode
from .export import export_trace, is_exported
from .fx import fx_trace

__all__ = ["trace", "TRACERS", "Tracer", "as_input_tuple", "eval_mode", "is_exported"]

Tracer = Literal["auto", "fx", "export"]
TRACERS: tuple[str, ...] = ("auto", "fx", "export")


def check_tracer(tracer: Any) -> str:
    """``tracer`` if it names a front end, else :class:`~autoalign.OptionError`."""
    if tracer not in TRACERS:
        raise OptionError(f"tracer must be one of {', '.join(map(repr, TRACERS))}, got {tracer!r}")
    return tracer


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    tracer: Tracer = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    shapes: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` in eval mode into an ``fx.GraphModule`` with shapes propagated.

    Parameters
    ----------
    model : nn.Module
        The model; it is not modified (its train/eval flags are restored).
    example_inputs : Tensor or tuple
        Positional inputs of one forward call, e.g. a ``(2, 3, 64, 64)`` image batch
        or ``(2, 16)`` token ids.
    tracer : {"auto", "fx", "export"}, default "auto"
        The front end: ``"fx"`` symbolic tracing (:func:`autoalign.trace.fx.fx_trace`),
        ``"export"`` ``torch.export`` (:func:`autoalign.trace.export.export_trace`),
        ``"auto"`` symbolic tracing with ``torch.export`` as the fallback when it fails.
    leaf_modules : sequence of module classes or qualified names, optional
        Modules to keep opaque (not traced through), in addition to ``torch.nn``'s
        (symbolic tracing only).
    autowrap_functions : sequence of callables, optional
        Functions to record as single graph nodes instead of tracing into them
        (symbolic tracing only).
    shapes : bool, default True
        Run the graph once on ``example_inputs`` to record every node's output
        shape (``False``: skip that forward pass; nodes get no ``tensor_meta``).

    Returns
    -------
    torch.fx.GraphModule
        Each node's ``meta["tensor_meta"]`` holds the shape and dtype of its output;
        ``gm.meta["autoalign_frontend"]`` says which front end made it.

    Raises
    ------
    TraceError
        If the model cannot be traced (with ``"auto"``: by either front end); the
        message names the module being traced and the escape hatches.
    OptionError
        For an unknown ``tracer``, or leaf modules / autowrapped functions given to
        the export front end (it has no such escape hatch).

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> gm = autoalign.trace(net, torch.randn(2, 4))
    >>> [n.op for n in gm.graph.nodes], gm.meta["autoalign_frontend"]
    (['placeholder', 'call_module', 'call_module', 'output'], 'fx')
    >>> gm = autoalign.trace(net, torch.randn(2, 4), tracer="export")
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ['aten.linear.default', 'aten.relu.default']
    """
    check_tracer(tracer)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if tracer == "export":
        if leaf_modules or autowrap_functions:
            raise OptionError(
                "leaf_modules and autowrap_functions apply to symbolic tracing (tracer='fx' or 'auto'), "
                "not to tracer='export'"
            )
        return export_trace(model, example_inputs, shapes=shapes)
    try:
        return fx_trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                        shapes=shapes)
    except TraceError as fx_error:
        if tracer == "fx":
            raise
        try:
            return export_trace(model, example_inputs, shapes=shapes)
        except TraceError as export_error:
            raise TraceError(f"{fx_error} The torch.export fallback failed too: {export_error}") from export_error
