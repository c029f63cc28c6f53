"""The ``torch.fx`` front end: symbolic tracing into a graph of modules and functions.

The tracer follows torchvision's ``feature_extraction``: modules from ``torch.nn``
(except containers) are leaves, the user can add leaves (``leaf_modules``) and
functions that must stay opaque (``autowrap_functions``), and a failure names the
module that could not be traced.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError
from .common import as_input_tuple, eval_mode, propagate_shapes

__all__ = ["fx_trace"]


class _Tracer(fx.Tracer):
    """fx tracer with user leaves and a record of the module being traced."""

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module] | str],
        autowrap_functions: Sequence[Callable[..., Any]],
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self._aa_stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        self._aa_stack.append(name)
        result = super().call_module(m, forward, args, kwargs)
        self._aa_stack.pop()
        return result


def fx_trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    shapes: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` symbolically in eval mode into an ``fx.GraphModule`` with shapes propagated.

    Parameters
    ----------
    model : nn.Module
        The model; it is not modified (its train/eval flags are restored).
    example_inputs : Tensor or tuple
        Positional inputs of one forward call, e.g. a ``(2, 3, 64, 64)`` image batch.
    leaf_modules : sequence of module classes or qualified names, optional
        Modules to keep opaque (not traced through), in addition to ``torch.nn``'s.
    autowrap_functions : sequence of callables, optional
        Functions to record as single graph nodes instead of tracing into them.
    shapes : bool, default True
        Run the graph once on ``example_inputs`` to record every node's output
        shape (``False``: skip that forward pass; nodes get no ``tensor_meta``).

    Returns
    -------
    torch.fx.GraphModule
        Each node's ``meta["tensor_meta"]`` holds the shape and dtype of its output.

    Raises
    ------
    TraceError
        If symbolic tracing or shape propagation fails; the message names the
        module being traced and the escape hatches.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> gm = fx_trace(net, torch.randn(2, 4))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    tracer = _Tracer(leaf_modules, autowrap_functions)
    cls = type(model).__name__
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            where = tracer._aa_stack[-1] if tracer._aa_stack else "<root>"
            sub = model.get_submodule(where) if where != "<root>" else model
            raise TraceError(
                f"could not trace {cls}: failed inside module {where!r} ({type(sub).__name__}): "
                f"{type(exc).__name__}: {exc}. Mark that module a leaf (leaf_modules=[{type(sub).__name__}]) "
                f"or keep the offending function opaque (autowrap_functions=[...])."
            ) from exc
        gm = fx.GraphModule(tracer.root, graph, cls)
        gm.meta["autoalign_frontend"] = "fx"
        if shapes:
            propagate_shapes(gm, inputs, cls)
    return gm
