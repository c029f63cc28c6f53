"""Rules of binary elementwise ops: add/sub (``"add"``) and mul/div (``"mul"``).

Two feature operands identify their coordinates; a parameter operand gets a role
(``"additive"`` or ``"channel"``) along the axis it runs along; a constant that
is the same for every channel restricts the coordinates to permutations.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, Sequence

import torch
import torch.fx as fx

from ..context import UNTRACKED, ParamOrigin, RoleName, RuleContext
from ..registry import ChannelRule, register_channel_rule
from .labels import origin_index

__all__ = ["param_role"]


def _broadcast_full(lab: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    """``lab`` broadcast to ``shape``; an untracked operand becomes a tensor of ``UNTRACKED``."""
    if lab is None:
        return torch.full(tuple(shape), UNTRACKED, dtype=torch.int64)
    return lab.expand(*shape) if tuple(lab.shape) != tuple(shape) else lab


def param_role(
    ctx: RuleContext, lab: torch.Tensor, origin: ParamOrigin, other_shape: Sequence[int], role: RoleName,
    *, out_shape: Sequence[int] | None = None,
) -> bool:
    """Record the role of a parameter combined elementwise with a labelled tensor.

    ``out_shape`` is the shape of the combination (default: the node's output; a
    concatenation passes the parameter operand's own shape, e.g. 4 register tokens of
    a 201-token output). Returns False when the combination cannot be expressed (the
    caller freezes)."""
    out_shape = tuple(ctx.out.shape) if out_shape is None else tuple(out_shape)
    full = _broadcast_full(lab, out_shape)
    idx = origin_index(ctx, origin)
    ndim = len(out_shape)
    idx = idx.reshape((1,) * (ndim - idx.dim()) + tuple(idx.shape)) if idx.dim() < ndim else idx
    vary = ctx.varying_axes(full)
    pshape = ctx.state.param_shapes[origin.key]
    for ax in vary:
        if idx.shape[ax] == 1:
            # the parameter is uniform across these coordinates: a common factor is fine,
            # but a common summand c only moves with M when M 1 = 1 (permutations)
            if role == "additive":
                ctx.restrict(full, "permutation", f"{ctx.describe()}: adds {origin.key}, the same for every channel")
            continue
        # the parameter must run along exactly one of its axes, from 0, with unit steps of that axis
        first = idx.narrow(ax, 0, 1)
        steps = idx - first
        stride_candidates = [p for p in range(len(pshape)) if pshape[p] == idx.shape[ax]]
        found = None
        for p in stride_candidates:
            stride = math.prod(pshape[p + 1 :])
            expect = torch.arange(idx.shape[ax]).reshape([-1 if a == ax else 1 for a in range(ndim)]) * stride
            if torch.equal(steps, expect.expand_as(steps)) and bool(((first // stride) % pshape[p] == 0).all()):
                found = p
                break
        if found is None:
            return False
        vec = ctx.channels(full, ax)
        ctx.role(origin.key, found, role, vec)
        if role == "channel":
            ctx.restrict(vec, "permutation", f"{ctx.describe()}: per-channel factor {origin.key}")
    ctx.touch(origin.key)
    return True


def _is_zero(v: Any) -> bool:
    """Whether ``v`` is a number equal to zero (False for anything that cannot say)."""
    try:
        return bool(v == 0)
    except Exception:  # noqa: BLE001 - anything that is not a plain number
        return False


def elementwise_rule(kind: Literal["add", "mul"]) -> ChannelRule:
    """``kind`` is ``"add"`` (add, sub) or ``"mul"`` (mul, div)."""

    def rule(ctx: RuleContext) -> Any:
        a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
        va, vb = ctx.value(a), ctx.value(b)
        if not isinstance(ctx.out, torch.Tensor):
            return None
        ta, tb = isinstance(va, torch.Tensor), isinstance(vb, torch.Tensor)
        la, lb = ctx.label(a) if ta else None, ctx.label(b) if tb else None
        if not (ta and tb) or (va.dim() == 0 and ctx.origin(a) is None) or (vb.dim() == 0 and ctx.origin(b) is None):
            # a python scalar or 0-d constant: pointwise; adding a nonzero constant to
            # every channel commutes with permutations only (M (x + c 1) != M x + c 1)
            lab, const = (la, vb) if la is not None else (lb, va)
            if kind == "add" and lab is not None and not _is_zero(const):
                ctx.restrict(lab, "permutation", f"{ctx.describe()}: adds a value that is the same for every channel")
            return lab
        out_shape = tuple(ctx.out.shape)
        if la is None and lb is None:
            return None
        if la is not None and lb is not None:
            A, B = _broadcast_full(la, out_shape), _broadcast_full(lb, out_shape)
            ctx.union(A, B)
            if kind == "mul":
                ctx.restrict(torch.cat([A.reshape(-1), B.reshape(-1)]), "permutation", f"{ctx.describe()}: elementwise product of features")
            return torch.where(A > 0, A, B).contiguous()
        lab, other, vother = (la, b, vb) if la is not None else (lb, a, va)
        full = _broadcast_full(lab, out_shape)
        origin = ctx.origin(other)
        role = "additive" if kind == "add" else "channel"
        if origin is not None:
            if param_role(ctx, lab, origin, vother.shape, role):
                return full.contiguous()
            ctx.freeze(full, f"{ctx.describe()}: combined with {origin.key} in a way that no transform can follow")
            return None
        # an untracked tensor: fine if it is uniform across the coordinates
        ndim = len(out_shape)
        shp = (1,) * (ndim - vother.dim()) + tuple(vother.shape)
        if all(shp[ax] == 1 for ax in ctx.varying_axes(full)):
            if kind == "add":
                ctx.restrict(full, "permutation", f"{ctx.describe()}: adds a value that is the same for every channel")
            return full.contiguous()
        ctx.freeze(full, f"{ctx.describe()}: combined with an untracked tensor ({other.name if isinstance(other, fx.Node) else other})")
        return None

    return rule


register_channel_rule(
    (operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract, "add", "sub", "add_", "sub_", "subtract"),
    elementwise_rule("add"),
)
register_channel_rule(
    (operator.mul, operator.truediv, operator.imul, operator.itruediv, torch.mul, torch.div, torch.multiply, torch.true_divide,
     "mul", "div", "mul_", "div_", "multiply", "true_divide"),
    elementwise_rule("mul"),
)


register_channel_rule(torch.rsub, elementwise_rule("add"))
