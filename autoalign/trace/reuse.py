"""One exported graph for every model of a merge.

``torch.export`` costs far more than a forward pass (a tiny Llama: 2–3 s; torchvision's
swin_t: minutes), and a merge traces each model once for its statistics, after the
reference once for discovery. The models of a merge share one architecture, so inside
:func:`reuse_exports` the graph exported for the first model serves the others: a copy
of its graph whose ``get_attr`` nodes read the other model's own parameters and buffers
(by the same names). A model is served that way only when its class, parameter and
buffer names, shapes and dtypes, and the inputs' structure match, and when the
retargeted graph computes the model's own outputs on the example inputs (one forward
pass of each, compared to float rounding); otherwise it is exported afresh. So a model
whose forward differs in code paths (a flag set differently) still gets its own graph.
"""

from __future__ import annotations

import contextlib
import copy
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .common import flat_tensors

__all__ = ["reuse_exports", "exported_for"]

_CACHE: ContextVar[dict[Any, fx.GraphModule] | None] = ContextVar("autoalign_export_reuse", default=None)


@contextlib.contextmanager
def reuse_exports() -> Iterator[None]:
    """Within this block, :func:`autoalign.trace.export.export_trace` re-uses a graph exported
    for a model of the same architecture (see the module docstring).

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.trace.reuse import reuse_exports
    >>> a, b = (torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()) for _ in range(2))
    >>> x = torch.randn(2, 3)
    >>> with reuse_exports():
    ...     ga = autoalign.trace(a, x, tracer="export")
    ...     gb = autoalign.trace(b, x, tracer="export")
    >>> torch.equal(gb(x), b(x)), gb.graph is ga.graph
    (True, False)
    """
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


def _key(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return (
        type(model),
        tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors),
        tuple((x.dim(), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in inputs),
    )


def _computes(gm: fx.GraphModule, model: nn.Module, inputs: tuple[Any, ...]) -> bool:
    """Whether ``gm`` gives ``model``'s outputs on ``inputs`` (to float rounding)."""
    try:
        with torch.no_grad():
            want, got = flat_tensors(model(*inputs)), flat_tensors(gm(*inputs))
    except Exception:  # noqa: BLE001 - a graph that cannot run is not the model's
        return False
    if not want or len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            scale = float(a.abs().max()) if a.numel() else 0.0
            if a.numel() and float((a - b).abs().max()) > 1e-5 * max(1.0, scale):
                return False
        elif not torch.equal(a, b):
            return False
    return True


def _retargeted(template: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """A copy of ``template``'s graph reading ``model``'s parameters and buffers."""
    graph = copy.deepcopy(template.graph)
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            root[node.target] = own[node.target] if node.target in own else _attr(template, node.target)
        elif node.op == "call_module":
            root[node.target] = template.get_submodule(node.target)
    gm = fx.GraphModule(root, graph, class_name=type(template).__name__)
    gm.meta.update(template.meta)
    return gm


def _attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def exported_for(
    model: nn.Module, inputs: tuple[Any, ...], export: Callable[[], fx.GraphModule], verify: Callable[[], Any]
) -> fx.GraphModule:
    """``export()``, or inside :func:`reuse_exports` a retargeted copy of an earlier export.

    Parameters
    ----------
    model : nn.Module
        The model to trace.
    inputs : tuple
        Its example inputs.
    export : callable
        Exports ``model`` (called on a miss).
    verify : callable
        A context manager factory under which the model and a retargeted graph are compared
        (eval mode, no key/value cache).
    """
    cache = _CACHE.get()
    if cache is None:
        return export()
    key = _key(model, inputs)
    template = cache.get(key)
    if template is not None:
        gm = _retargeted(template, model)
        with verify():
            if _computes(gm, model, inputs):
                return gm
    gm = export()
    cache.setdefault(key, _retargeted(gm, model))  # a pristine copy: callers insert taps into theirs
    return gm
