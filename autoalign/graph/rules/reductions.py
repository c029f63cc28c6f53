"""Rules of reductions (mean, sum, amax, ...), softmax and ``F.normalize``.

Reducing over non-feature axes keeps the coordinates; reducing, normalising or
taking a softmax across the feature channels restricts them (to permutations,
or to orthogonal maps for an L2 normalisation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..registry import register_channel_rule
from .labels import clean

__all__: list[str] = []


def reduction_dims(d: Any, ndim: int) -> list[int] | None:
    """Reduction axes ``d`` (int, sequence or None) as sorted non-negative axes of an ``ndim`` tensor."""
    if d is None:
        return None
    if isinstance(d, int):
        d = [d]
    return sorted({x % ndim for x in d})


def reduction_rule(ctx: RuleContext, dim_index: int = 1) -> Any:
    """``mean``/``sum``/``amax``/...: keeps coordinates over non-feature axes, restricts across them."""
    x = ctx.arg(0, "input")
    lab = ctx.label(x)
    if lab is None or not isinstance(ctx.out, torch.Tensor):
        return None
    dims = reduction_dims(ctx.value(ctx.arg(dim_index, "dim")), lab.dim())
    if dims is None or dims == []:
        dims = list(range(lab.dim()))
    vary = set(ctx.varying_axes(lab))
    reduced = sorted(vary & set(dims))
    if reduced and not vary - set(dims):
        # across all the feature axes: the result does not move with a permutation
        ctx.restrict(lab, "permutation", f"{ctx.describe()}: reduction over feature channels")
        return None
    if reduced:
        # the features run along another axis too (ResNeSt's split attention sums its radix
        # branches, shape (B, radix, C, H, W), over dim 1): the reduction combines the
        # slices elementwise, like an add, so their coordinates are identified
        first = lab
        for ax in reduced:
            first = first.narrow(ax, 0, 1)
        slices = lab.movedim(reduced, list(range(len(reduced)))).reshape(-1, *first.movedim(reduced, list(range(len(reduced)))).shape[len(reduced):])
        base = slices[0]
        for other in slices[1:]:
            ctx.union(base, other)
        linear = ctx.node.target in (torch.sum, torch.mean, "sum", "mean") or str(ctx.node.target).startswith(
            ("aten.sum.", "aten.mean.")
        )
        if not linear:
            ctx.restrict(base, "permutation", f"{ctx.describe()}: a nonlinear reduction across feature slices")
        lab = first
    out = lab.amax(dim=dims, keepdim=True)
    return clean(out.reshape(ctx.out.shape).contiguous())


register_channel_rule((torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                       "mean", "sum", "amax", "amin", "std", "var", "logsumexp"), reduction_rule)


def vector_norm_rule(ctx: RuleContext) -> Any:
    """``x.norm(p, dim)`` / ``torch.norm`` / ``torch.linalg.vector_norm`` (``dim`` is argument 2):
    a reduction (ConvNeXt-V2's global response norm takes it over the spatial axes)."""
    return reduction_rule(ctx, dim_index=2)


register_channel_rule(("norm", torch.norm, torch.linalg.vector_norm), vector_norm_rule)


def softmax_rule(ctx: RuleContext) -> Any:
    """Softmax / log-softmax: labels pass; across feature channels it allows permutations only."""
    lab = ctx.label(ctx.arg(0, "input"))
    if lab is None:
        return None
    d = ctx.value(ctx.arg(1, "dim"))
    if d is None and ctx.module is not None:
        d = ctx.module.dim
    if d is None or (d % lab.dim()) in ctx.varying_axes(lab):
        ctx.restrict(lab, "permutation", f"{ctx.describe()}: softmax across feature channels")
    return lab


register_channel_rule((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
                       nn.Softmax, nn.LogSoftmax), softmax_rule)


def _normalize(ctx: RuleContext) -> Any:
    """``F.normalize``: labels pass; an Lp normalisation across channels restricts them
    (orthogonal for ``p=2``, else permutations)."""
    lab = ctx.label(ctx.arg(0, "input"))
    if lab is None:
        return None
    d = ctx.value(ctx.arg(2, "dim", 1))
    p = ctx.value(ctx.arg(1, "p", 2.0))
    if (d % lab.dim()) in ctx.varying_axes(lab):
        kind = "orthogonal" if p == 2 else "permutation"
        ctx.restrict(lab, kind, f"{ctx.describe()}: normalisation across feature channels")
    return lab


register_channel_rule(F.normalize, _normalize)
