"""Shared label helpers: the generic rules every op family builds on.

* :func:`pointwise` — an elementwise op with one feature input: labels pass;
* :func:`structural` — an op that only moves elements: run it on the labels;
* :func:`unknown` — the default for ops without a rule: freeze what they touch;
* :func:`run_on_labels`, :func:`has_labels`, :func:`clean`, :func:`origin_index` —
  small helpers used by the rules of the other modules of this package.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ..context import UNTRACKED, ZERO, ParamOrigin, RuleContext

__all__ = ["pointwise", "structural", "unknown", "run_on_labels", "has_labels", "clean", "origin_index"]


def pointwise(ctx: RuleContext) -> Any:
    """Elementwise op with one feature input (activations, dropout, casts): labels pass."""
    a = ctx.arg(0, "input")
    if not isinstance(a, fx.Node):
        a = ctx.arg(0, "self")
    return ctx.label(a)


def _sub_label(x: Any, state_labels: dict[fx.Node, Any], values: dict[fx.Node, Any]) -> Any:
    """``x`` with every node replaced by its label tensor (untracked tensors by ``UNTRACKED``)."""
    if isinstance(x, fx.Node):
        lab = state_labels.get(x)
        v = values.get(x)
        if lab is None and isinstance(v, torch.Tensor):
            return torch.full(v.shape, UNTRACKED, dtype=torch.int64)
        if lab is None and isinstance(v, (list, tuple)):
            return type(v)(torch.full(t.shape, UNTRACKED, dtype=torch.int64) if isinstance(t, torch.Tensor) else t for t in v)
        if isinstance(lab, torch.Tensor):
            return lab.contiguous()
        if isinstance(lab, (list, tuple)):
            return type(lab)(t.contiguous() if isinstance(t, torch.Tensor) else t for t in lab)
        return lab if lab is not None else v
    if isinstance(x, (list, tuple)):
        return type(x)(_sub_label(y, state_labels, values) for y in x)
    return x


def run_on_labels(ctx: RuleContext) -> Any:
    """Run the node's own op with the data operand (argument 0) replaced by labels."""
    node = ctx.node
    st = ctx.state
    args = list(node.args)
    if not args:
        return None
    first = _sub_label(args[0], st.labels, st.values)
    rest = [ctx.value(a) for a in args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(first, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return ctx.module(first, *rest, **kwargs)
    return node.target(first, *rest, **kwargs)


def has_labels(lab: Any) -> bool:
    """Whether a (nested) label holds at least one coordinate (an entry ``> 0``)."""
    if isinstance(lab, torch.Tensor):
        return bool((lab > 0).any())
    if isinstance(lab, (list, tuple)):
        return any(has_labels(x) for x in lab)
    return False


def clean(lab: Any) -> Any:
    """Turn all-untracked label tensors back into ``None`` (saves memory and work)."""
    if isinstance(lab, torch.Tensor):
        return lab if bool((lab >= ZERO).any()) else None
    if isinstance(lab, tuple):
        return tuple(clean(x) for x in lab)
    if isinstance(lab, list):
        return [clean(x) for x in lab]
    return lab


def origin_index(ctx: RuleContext, origin: ParamOrigin) -> torch.Tensor:
    """Flat element indices of the parameter as seen through ``origin``."""
    if origin.index is not None:
        return origin.index
    shape = ctx.state.param_shapes[origin.key]
    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)


def structural(ctx: RuleContext) -> Any:
    """Ops that only move elements (view, permute, flatten, cat, chunk, getitem, pad ...):
    the same op applied to the label tensor gives the output's labels."""
    a0 = ctx.arg(0)
    origin = ctx.origin(a0)
    if origin is not None and isinstance(ctx.out, torch.Tensor):
        try:
            node = ctx.node
            idx = origin_index(ctx, origin)
            rest = [ctx.value(a) for a in node.args[1:]]
            kwargs = {k: ctx.value(v) for k, v in node.kwargs.items()}
            if node.op == "call_method":
                new = getattr(idx, node.target)(*rest, **kwargs)
            elif node.op == "call_module":
                new = ctx.module(idx, *rest, **kwargs)
            else:
                new = node.target(idx, *rest, **kwargs)
            if isinstance(new, torch.Tensor) and new.shape == ctx.out.shape:
                ctx.state.origins[ctx.node] = ParamOrigin(origin.key, new)
        except Exception:  # noqa: BLE001 - losing the origin is always safe
            pass
    if not has_labels(ctx.label(a0)):
        return None
    return clean(run_on_labels(ctx))


def unknown(ctx: RuleContext, why: str | None = None) -> Any:
    """Default for ops without a rule: freeze every coordinate they touch."""
    labs = ctx.all_ids([ctx.label(a) for a in ctx.node.args] + [ctx.label(v) for v in ctx.node.kwargs.values()])
    labs = [lab for lab in labs if bool((lab > 0).any())]
    if labs:
        reason = why or (
            f"{ctx.describe()}: no channel rule; register one with autoalign.register_channel_rule(...) "
            f"or mark the module a leaf"
        )
        ctx.freeze(labs, reason)
    return None
