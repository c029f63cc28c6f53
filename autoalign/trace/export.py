"""The ``torch.export`` front end, for models ``torch.fx`` cannot trace symbolically.

Data-dependent control flow, ``*args``/``**kwargs`` forwarding and generated code
(Hugging Face transformers, many timm models) defeat ``symbolic_trace``;
``torch.export`` (non-strict) runs the model on the example inputs and records the
ATen ops it executes. :func:`export_trace` turns the exported program into what
discovery consumes: an ``fx.GraphModule`` (``ExportedProgram.module()``) whose
parameters and buffers are the model's own tensors under their ``state_dict``
names, read by ``get_attr`` nodes, with every input dimension left dynamic so the
same graph runs on calibration batches of any size (the batch dimension alone, or
none, where the model's shape arithmetic defeats export's symbolic solver).

Each ATen node keeps the path of the module that issued it
(``meta["autoalign_scope"]``): merge points are named after modules
(``bert.encoder.layer.0.attention.self.query``), not ATen node names, and taps on
a submodule's output (:func:`module_output_nodes`) find the nodes that leave it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError
from .common import as_input_tuple, eval_mode, propagate_shapes
from .reuse import exported_for

__all__ = ["export_trace", "module_output_nodes", "scope_of", "is_exported"]


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Turn off a Hugging Face model's key/value cache while it is exported, then restore it.

    Decoder models return a cache object that is not a pytree when ``use_cache`` is
    on, and a merge never needs it.
    """
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", False) is True and all(cfg is not c for c, _ in configs):
            configs.append((cfg, True))
    try:
        for cfg, _ in configs:
            cfg.use_cache = False
        yield
    finally:
        for cfg, flag in configs:
            cfg.use_cache = flag


def _dynamic_shapes(inputs: tuple[Any, ...], dims: str) -> tuple[Any, ...] | None:
    """Which input dimensions export keeps dynamic: ``"all"`` of them or the ``"batch"``
    (first) one (``Dim.AUTO``: static where the model requires it), or ``"none"``."""
    if dims == "none":
        return None
    auto = torch.export.Dim.AUTO
    return tuple(
        ({d: auto for d in range(x.dim())} if dims == "all" else {0: auto}) if isinstance(x, torch.Tensor) and x.dim()
        else None
        for x in inputs
    )


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``torch.export.export`` with every input dimension dynamic, else the batch dimension
    only (some shape arithmetic, e.g. AlexNet's pooling, defeats the symbolic solver), else
    static shapes; the first error is the one reported."""
    first: Exception | None = None
    for dims in ("all", "batch", "none"):
        try:
            return torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs, dims), strict=False)
        except Exception as exc:  # noqa: BLE001 - re-raised by the caller
            first = first or exc
    assert first is not None
    raise first


def export_trace(model: nn.Module, example_inputs: Any, *, shapes: bool = True) -> fx.GraphModule:
    """Export ``model`` (non-strict ``torch.export``, eval mode) into an ``fx.GraphModule``.

    Parameters
    ----------
    model : nn.Module
        The model; it is not modified (train/eval flags and a Hugging Face config's
        ``use_cache`` are restored).
    example_inputs : Tensor or tuple
        Positional inputs of one forward call, e.g. ``(2, 16)`` token ids; use a batch of
        at least 2 (export specialises dimensions of size 1).
    shapes : bool, default True
        Record every node's output shape (``meta["tensor_meta"]``) with one forward pass.

    Returns
    -------
    torch.fx.GraphModule
        ATen-level graph; ``get_attr`` nodes read the model's own parameters and
        buffers by their ``state_dict`` names; ``meta["autoalign_frontend"] == "export"``.

    Raises
    ------
    TraceError
        If ``torch.export`` fails (the message carries its reason).
    """
    if not hasattr(torch, "export") or not hasattr(torch.export, "Dim") or not hasattr(torch.export.Dim, "AUTO"):
        raise TraceError(f"the torch.export front end needs torch >= 2.6 (this is torch {torch.__version__})")
    inputs = as_input_tuple(example_inputs)
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise TraceError(
            f"could not export {type(model).__name__}: torch.export needs example inputs (tensors), got none"
        )
    cls = type(model).__name__

    def export() -> fx.GraphModule:
        with eval_mode(model), _no_kv_cache(model):
            try:
                ep = _export(model, inputs)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise TraceError(f"could not export {cls} with torch.export: {type(exc).__name__}: {first}") from exc
            gm = ep.module()
        gm.meta["autoalign_frontend"] = "export"
        for node in gm.graph.nodes:
            scope = scope_of(node)
            if scope:
                node.meta["autoalign_scope"] = scope
        return gm

    @contextlib.contextmanager
    def verify() -> Iterator[None]:
        with eval_mode(model), _no_kv_cache(model):
            yield

    gm = exported_for(model, inputs, export, verify)
    if shapes:
        with eval_mode(model):
            propagate_shapes(gm, inputs, cls)
    return gm


def is_exported(gm: nn.Module) -> bool:
    """Whether ``gm`` came from :func:`export_trace`."""
    meta = getattr(gm, "meta", None)
    return isinstance(meta, dict) and meta.get("autoalign_frontend") == "export"


def _stack(node: fx.Node) -> list[str]:
    """The module paths that ``node`` was issued from, outermost first (root excluded)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [str(v[0]) for v in stack.values() if isinstance(v, tuple) and v and v[0]]


def scope_of(node: fx.Node) -> str | None:
    """The path of the innermost module that issued ``node``, or ``None`` at the root."""
    paths = _stack(node)
    return paths[-1] if paths else None


def module_output_nodes(gm: fx.GraphModule, module_name: str) -> list[fx.Node]:
    """The nodes of an exported graph whose values leave submodule ``module_name``.

    One node per call of the module: the last node issued inside the module whose
    value is read outside it (by a node outside its scope or by the graph's output).
    A module that issued no node (never called, or traced away) gives ``[]``.

    Parameters
    ----------
    gm : fx.GraphModule
        From :func:`export_trace`.
    module_name : str
        The module's path, as in ``model.named_modules()``.

    Returns
    -------
    list of fx.Node
    """
    calls: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        keys = [k for k, v in stack.items() if isinstance(v, tuple) and v and str(v[0]) == module_name]
        if not keys:
            continue
        inside = set(keys)
        leaves = any(
            u.op == "output" or not inside & set((u.meta.get("nn_module_stack") or {}).keys()) for u in node.users
        )
        if leaves and isinstance(node.meta.get("val"), torch.Tensor):
            calls[keys[-1]] = node
    return list(calls.values())
