"""Rules of normalisation layers and other per-channel ops (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, PReLU).

Their per-channel parameters move with the channels (role ``"channel"``), which
allows permutations only; a BatchNorm right after the producer that alone feeds
it is folded into that producer instead (a :class:`~autoalign.spec.FoldedNorm`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...spec import FoldedNorm
from ..context import RuleContext
from ..registry import register_channel_rule
from .labels import unknown

__all__ = [
    "batchnorm_module", "batchnorm_like", "batchnorm_function", "layernorm_module", "layernorm_function", "groupnorm_module",
    "groupnorm_function", "instancenorm_module", "prelu_module",
]


def norm_channels(
    ctx: RuleContext, lab: torch.Tensor | None, axis: int, keys: Sequence[str | None], what: str
) -> torch.Tensor | None:
    """Give the per-channel tensors ``keys`` the coordinates along ``axis``, restricted to permutations."""
    vec = ctx.channels(lab, axis)
    for k in keys:
        ctx.role(k, 0, "channel", vec)
    ctx.restrict(vec, "permutation", f"{ctx.name}: {what}")
    return vec


@register_channel_rule((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
def batchnorm_module(ctx: RuleContext) -> Any:
    """``nn.BatchNorm*d``: folded into the producer that alone feeds it, else per-channel."""
    m = ctx.module
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    keys = {a: ctx.module_key(a) for a in ("weight", "bias", "running_mean", "running_var")}
    ctx.touch(ctx.module_key("num_batches_tracked"))
    return batchnorm_like(ctx, ctx.arg(0, "input"), keys, float(m.eps))


_METADATA = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"}


def _data_users(x: fx.Node) -> int:
    """Users of ``x`` that read its values: reads of its shape, ``ndim``, ``dtype`` ...
    (``_assert(x.ndim == 4)`` in timm's ``BatchNormAct2d``) do not count."""
    n = 0
    for u in x.users:
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _METADATA:
            continue
        if u.op == "call_method" and u.target in ("size", "dim"):
            continue
        n += 1
    return n


def batchnorm_like(ctx: RuleContext, x: Any, keys: dict[str, str | None], eps: float) -> Any:
    """A BatchNorm of ``x`` along axis 1 with parameters/buffers ``keys`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``; ``None`` where absent): folded into the producer that
    alone feeds it when it has running statistics, else per-channel (permutations only)."""
    lab = ctx.label(x)
    for k in keys.values():
        ctx.touch(k)
    if lab is None:
        return None
    vec = ctx.channels(lab, 1)
    prod = ctx.state.producers.get(x.name) if isinstance(x, fx.Node) else None
    foldable = (
        prod is not None
        and _data_users(x) == 1
        and keys["running_mean"] is not None
        and keys["running_var"] is not None
        and vec is not None
        and torch.equal(vec, prod[2])
    )
    if foldable:
        wkey, bkey, _ = prod
        ctx.state.folds.append(
            FoldedNorm(
                wkey, bkey, keys["weight"], keys["bias"], keys["running_mean"], keys["running_var"], eps,
                ctx.state.producer_axes.get(x.name, 0),
            )
        )
        # the folded offset lives in the BatchNorm's bias, else the producer's bias, else
        # (affine=False, no producer bias) in the running mean, negated: all transform like a bias
        offset = keys["bias"] or bkey or keys["running_mean"]
        for a in ("weight", "running_mean", "running_var"):
            if keys[a] != offset:
                ctx.role(keys[a], 0, "folded", vec)
        ctx.role(offset, 0, "output", vec)
        # the folded producer's output is this BatchNorm's output: observe it there
        sites = ctx.state.output_sites
        sites[:] = [(ctx.node.name, 1) if n == x.name else (n, a) for n, a in sites]
        return lab
    why = "BatchNorm that cannot be folded into a preceding Linear/Conv (its input is not one used only by it)"
    norm_channels(ctx, lab, 1, list(keys.values()), why)
    return lab


def functional_keys(ctx: RuleContext, args: tuple[tuple[int, str], ...]) -> list[str] | None:
    """State-dict keys of a functional norm's tensor arguments (by position and name); None when
    one of them is a graph value that is not a parameter or buffer."""
    keys = []
    for i, name in args:
        a = ctx.arg(i, name)
        if isinstance(a, fx.Node):
            k = ctx.param_key(a)
            if k is None:
                return None
            keys.append(k)
    return keys


@register_channel_rule(F.batch_norm)
def batchnorm_function(ctx: RuleContext) -> Any:
    """``F.batch_norm`` with parameter/buffer statistics (what tracing through a BatchNorm
    subclass such as timm's ``BatchNormAct2d`` gives): in eval mode folded like
    :func:`batchnorm_module`, else per-channel."""
    names = ("running_mean", "running_var", "weight", "bias")
    raw = [ctx.arg(i, n) for i, n in enumerate(names, start=1)]
    if any(a is not None and not isinstance(a, fx.Node) for a in raw):
        return unknown(ctx, f"{ctx.describe()}: batch_norm statistics are not parameters/buffers")
    keys = {n: (ctx.param_key(a) if isinstance(a, fx.Node) else None) for n, a in zip(names, raw)}
    if any(isinstance(a, fx.Node) and keys[n] is None for n, a in zip(names, raw)):
        return unknown(ctx, f"{ctx.describe()}: batch_norm statistics are not parameters/buffers")
    if ctx.value(ctx.arg(5, "training")):  # batch statistics: nothing to fold
        keys = {**keys, "running_mean": None, "running_var": None}
        for n, a in zip(names, raw):
            ctx.touch(ctx.param_key(a) if isinstance(a, fx.Node) else None)
    eps = ctx.value(ctx.arg(7, "eps"))
    return batchnorm_like(ctx, ctx.arg(0, "input"), keys, float(1e-5 if eps is None else eps))


@register_channel_rule((nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else nn.LayerNorm)
def layernorm_module(ctx: RuleContext) -> Any:
    """``nn.LayerNorm`` / ``nn.RMSNorm`` over the last axis: per-channel affine, permutations only."""
    m = ctx.module
    lab = ctx.label(ctx.arg(0, "input"))
    keys = [ctx.module_key("weight"), ctx.module_key("bias")]
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    if len(m.normalized_shape) != 1:
        return unknown(ctx, f"{ctx.describe()}: normalisation over several axes")
    norm_channels(ctx, lab, -1, keys, f"{type(m).__name__} (per-channel affine, statistics over channels)")
    return lab


@register_channel_rule(F.layer_norm)
def layernorm_function(ctx: RuleContext) -> Any:
    """``F.layer_norm`` over the last axis: per-channel affine, permutations only."""
    lab = ctx.label(ctx.arg(0, "input"))
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    keys = functional_keys(ctx, ((2, "weight"), (3, "bias")))
    if keys is None:
        return unknown(ctx, f"{ctx.describe()}: layer_norm affine is not a parameter")
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    if len(shape) != 1:
        return unknown(ctx, f"{ctx.describe()}: normalisation over several axes")
    norm_channels(ctx, lab, -1, keys, "layer_norm (per-channel affine, statistics over channels)")
    return lab


def _group_norm(ctx: RuleContext, lab: torch.Tensor | None, groups: int, keys: Sequence[str | None]) -> Any:
    """GroupNorm over channel axis 1: per-channel affine, and each group of channels its own block."""
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    vec = norm_channels(ctx, lab, 1, keys, "GroupNorm (per-channel affine, statistics within groups)")
    if vec is not None:
        for part in vec.chunk(groups):
            ctx.group(part)
    return lab


@register_channel_rule(nn.GroupNorm)
def groupnorm_module(ctx: RuleContext) -> Any:
    """``nn.GroupNorm``: see :func:`_group_norm`."""
    m = ctx.module
    assert isinstance(m, nn.GroupNorm)
    return _group_norm(ctx, ctx.label(ctx.arg(0, "input")), m.num_groups, [ctx.module_key("weight"), ctx.module_key("bias")])


@register_channel_rule(F.group_norm)
def groupnorm_function(ctx: RuleContext) -> Any:
    """``F.group_norm``: see :func:`_group_norm`."""
    keys = functional_keys(ctx, ((2, "weight"), (3, "bias")))
    if keys is None:
        return unknown(ctx)
    return _group_norm(ctx, ctx.label(ctx.arg(0, "input")), int(ctx.value(ctx.arg(1, "num_groups"))), keys)


@register_channel_rule((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
def instancenorm_module(ctx: RuleContext) -> Any:
    """``nn.InstanceNorm*d``: per-channel over axis 1, permutations only."""
    lab = ctx.label(ctx.arg(0, "input"))
    keys = [ctx.module_key(a) for a in ("weight", "bias", "running_mean", "running_var")]
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    norm_channels(ctx, lab, 1, keys, "InstanceNorm (per-channel)")
    return lab


@register_channel_rule(nn.PReLU)
def prelu_module(ctx: RuleContext) -> Any:
    """``nn.PReLU``: pointwise with one slope, per-channel with one slope per channel."""
    m = ctx.module
    assert isinstance(m, nn.PReLU)
    lab = ctx.label(ctx.arg(0, "input"))
    ctx.touch(ctx.module_key("weight"))
    if m.num_parameters == 1 or lab is None:
        return lab
    axis = 1 if lab.dim() > 1 else 0
    norm_channels(ctx, lab, axis, [ctx.module_key("weight")], "PReLU with per-channel slopes")
    return lab
