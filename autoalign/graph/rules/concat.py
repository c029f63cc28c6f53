"""Rule of concatenation and stacking (``torch.cat`` / ``torch.stack``).

Concatenating along the feature axis keeps each operand's coordinates side by
side; concatenating along any other axis (tokens) identifies the operands'
feature coordinates, like a residual addition.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..context import RuleContext
from ..registry import register_channel_rule
from .elementwise import param_role
from .labels import clean, has_labels, run_on_labels, unknown

__all__: list[str] = []


def cat_rule(ctx: RuleContext) -> Any:
    """``torch.cat`` / ``torch.stack``: identify operands along a non-feature axis, else move labels."""
    tensors = ctx.arg(0, "tensors")
    dim = ctx.value(ctx.arg(1, "dim", 0))
    if not isinstance(tensors, (list, tuple)) or not isinstance(ctx.out, torch.Tensor):
        return unknown(ctx)
    labs = [ctx.label(t) if isinstance(t, fx.Node) else None for t in tensors]
    if not any(has_labels(x) for x in labs):
        return None
    ndim = ctx.out.dim()
    dim = dim % ndim
    # stack inserts a new axis ``dim`` into the output: never a feature axis
    is_stack = ctx.node.target is torch.stack or str(ctx.node.target).startswith("aten.stack")
    vary = set()
    for lab in labs:
        vary |= set(ctx.varying_axes(lab))
    if (is_stack or dim not in vary) and len(vary) == 1:
        # concatenation along a non-feature axis (tokens): the feature coordinates
        # of all operands are identified, like an add
        (ax,) = vary
        out_ax = ax + 1 if is_stack and dim <= ax else ax
        vecs = [ctx.channels(lab, ax) for lab in labs if lab is not None]
        base = vecs[0]
        for v in vecs[1:]:
            ctx.union(base, v)
        for t, lab in zip(tensors, labs):
            if lab is None:
                o = ctx.origin(t)
                vt = ctx.value(t)
                if o is not None and isinstance(vt, torch.Tensor) and not is_stack:
                    full = ctx.along(base, vt.shape, ax)
                    if not param_role(ctx, full, o, vt.shape, "additive", out_shape=vt.shape):
                        ctx.freeze(base, f"{ctx.describe()}: concatenated with {o.key} in a way no transform can follow")
                elif isinstance(vt, torch.Tensor):
                    ctx.freeze(base, f"{ctx.describe()}: concatenated with an untracked tensor along a non-feature axis")
        return ctx.along(base, ctx.out.shape, out_ax)
    return clean(run_on_labels(ctx))


register_channel_rule((torch.cat, torch.concat, torch.concatenate, torch.stack), cat_rule)
