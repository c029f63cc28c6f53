"""Rules of the layers that *produce* feature coordinates: Linear, Conv, Embedding.

A producer creates fresh coordinates for its outputs (the rows of its weight)
and consumes the coordinates of its input (the columns), recording both roles
and a site where the input features can be observed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..registry import ChannelRule, register_channel_rule
from .labels import clean, unknown

__all__ = ["linear_module", "linear_function", "conv_module", "embedding_module"]


def _producer_out(ctx: RuleContext, n: int, groups: int = 1) -> torch.Tensor:
    """``n`` fresh output coordinates, grouped into ``groups`` blocks (grouped convolution)."""
    ids = ctx.fresh(n)
    if groups > 1:
        for g in ids.chunk(groups):
            ctx.group(g)
    return ids


def _linear_like(ctx: RuleContext, x: Any, wkey: str | None, bkey: str | None, out_features: int) -> Any:
    """Record a linear map of the last axis of ``x`` (weight ``wkey``, bias ``bkey``) and
    return the label of its output."""
    lab = ctx.label(x)
    vec = ctx.channels(lab, -1)
    ctx.role(wkey, 1, "input", vec)
    if vec is not None:
        ctx.site(x, -1)
    ids = _producer_out(ctx, out_features)
    ctx.role(wkey, 0, "output", ids)
    ctx.role(bkey, 0, "output", ids)
    ctx.state.producers[ctx.node.name] = (wkey, bkey, ids)
    return ctx.along(ids, ctx.out.shape, -1)


def _token_mixing(ctx: RuleContext, x: Any, wkey: str | None, bkey: str | None) -> Any:
    """A Linear over an axis that is not the feature axis (MLP-Mixer's and gMLP's token
    mixing: ``linear(x.transpose(-1, -2))``): it acts on every channel alike, so the
    channel coordinates pass (a bias, the same for every channel, allows permutations
    only). Returns ``NotImplemented`` when the input's features run along its last axis."""
    lab = ctx.label(x)
    vary = ctx.varying_axes(lab)
    if lab is None or len(vary) != 1 or vary[0] == lab.dim() - 1 or not isinstance(ctx.out, torch.Tensor):
        return NotImplemented
    ctx.touch(wkey)
    ctx.touch(bkey)
    (ax,) = vary
    vec = ctx.channels(lab, ax)
    if bkey is not None:
        ctx.restrict(vec, "permutation", f"{ctx.describe()}: a bias over a non-feature axis, the same for every channel")
    return clean(ctx.along(vec, ctx.out.shape, ax))


@register_channel_rule(nn.Linear)
def linear_module(ctx: RuleContext) -> Any:
    """``nn.Linear``: a producer of ``out_features`` coordinates along the last axis (or,
    applied across a non-feature axis, :func:`_token_mixing`)."""
    m = ctx.module
    assert isinstance(m, nn.Linear)
    mixed = _token_mixing(ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"))
    if mixed is not NotImplemented:
        return mixed
    out = _linear_like(ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"), m.out_features)
    ctx.state.output_sites.append((ctx.node.name, -1))
    return out


_CATS = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def bias_pieces(ctx: RuleContext, b: Any) -> list[tuple[str | None, int, int]] | None:
    """A 1-D bias as ``[(key, start, stop)]`` pieces: one parameter, or a concatenation of
    parameters and zeros (the qkv bias of BEiT, EVA and others: ``cat(q_bias, zeros, v_bias)``;
    ``key`` is ``None`` for zeros, which any map of the output coordinates keeps zero).
    ``None`` when the bias is neither."""
    key = ctx.param_key(b)
    value = ctx.value(b)
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    if key is not None:
        return [(key, 0, value.numel())]
    if not (isinstance(b, fx.Node) and b.op == "call_function" and b.target in _CATS and b.args):
        return None
    dim = b.args[1] if len(b.args) > 1 else b.kwargs.get("dim", 0)
    if dim not in (0, -1) or not isinstance(b.args[0], (list, tuple)):
        return None
    pieces, start = [], 0
    for part in b.args[0]:
        v = ctx.value(part)
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            return None
        k = ctx.param_key(part)
        if k is None and (ctx.label(part) is not None or bool((v != 0).any())):
            return None
        pieces.append((k, start, start + v.numel()))
        start += v.numel()
    return pieces


@register_channel_rule(F.linear)
def linear_function(ctx: RuleContext) -> Any:
    """``F.linear`` whose weight is a parameter and whose bias, if any, a parameter or a
    concatenation of parameters and zeros (:func:`bias_pieces`); else :func:`unknown`."""
    w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    wkey = ctx.param_key(w)
    if wkey is None:
        return unknown(ctx, f"{ctx.describe()}: linear with a weight that is not a parameter")
    pieces = bias_pieces(ctx, b) if isinstance(b, fx.Node) else []
    if pieces is None:
        return unknown(ctx, f"{ctx.describe()}: linear with a bias that is not a parameter (nor parameters and zeros concatenated)")
    keys = [k for k, _, _ in pieces if k is not None]
    mixed = _token_mixing(ctx, ctx.arg(0, "input"), wkey, keys[0] if keys else None)
    if mixed is not NotImplemented:
        for key in keys:
            ctx.touch(key)
        return mixed
    bkey = pieces[0][0] if len(pieces) == 1 else None
    out = _linear_like(ctx, ctx.arg(0, "input"), wkey, bkey, ctx.value(w).shape[0])
    if len(pieces) > 1:
        ids = ctx.state.producers[ctx.node.name][2]
        for key, start, stop in pieces:
            ctx.role(key, 0, "output", ids[start:stop])
    ctx.state.output_sites.append((ctx.node.name, -1))
    return out


def conv_like(
    ctx: RuleContext, x: Any, wkey: str | None, bkey: str | None, weight_shape: Sequence[int], groups: int, transposed: bool
) -> Any:
    """Record a (possibly grouped, depthwise or transposed) convolution along axis 1 and
    return the label of its output."""
    lab = ctx.label(x)
    vec = ctx.channels(lab, 1)
    if transposed:
        cin = weight_shape[0]
        cout = weight_shape[1] * groups
        if groups != 1:
            return unknown(ctx, f"{ctx.describe()}: grouped transposed convolution")
        ctx.role(wkey, 0, "input", vec)
        if vec is not None:
            ctx.site(x, 1)
        ids = ctx.fresh(cout)
        ctx.role(wkey, 1, "output", ids)
        ctx.role(bkey, 0, "output", ids)
        ctx.state.producers[ctx.node.name] = (wkey, bkey, ids)
        ctx.state.producer_axes[ctx.node.name] = 1
        ctx.state.output_sites.append((ctx.node.name, 1))
        return ctx.along(ids, ctx.out.shape, 1)
    cout, cin_g = weight_shape[0], weight_shape[1]
    cin = cin_g * groups
    if groups > 1 and groups == cin and cout == cin:
        # depthwise: output channel c only sees input channel c
        if vec is None:
            ids = ctx.fresh(cout)
            ctx.role(wkey, 0, "output", ids)
            ctx.role(bkey, 0, "output", ids)
            ctx.state.producers[ctx.node.name] = (wkey, bkey, ids)
            return ctx.along(ids, ctx.out.shape, 1)
        ctx.role(wkey, 0, "channel", vec)
        ctx.role(bkey, 0, "channel", vec)
        ctx.restrict(vec, "permutation", f"{ctx.name}: depthwise convolution (per-channel filters)")
        ctx.site(x, 1)
        return clean(ctx.along(vec, ctx.out.shape, 1))
    if vec is not None:
        ctx.site(x, 1)
        if groups == 1:
            ctx.role(wkey, 1, "input", vec)
        else:
            og = cout // groups
            for g, part in enumerate(vec.chunk(groups)):
                ctx.group(part)
                ctx.role(wkey, 1, "input", part, block=(0, g * og, (g + 1) * og))
    ids = _producer_out(ctx, cout, groups)
    ctx.role(wkey, 0, "output", ids)
    ctx.role(bkey, 0, "output", ids)
    ctx.state.producers[ctx.node.name] = (wkey, bkey, ids)
    ctx.state.output_sites.append((ctx.node.name, 1))
    return ctx.along(ids, ctx.out.shape, 1)


@register_channel_rule((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
def conv_module(ctx: RuleContext) -> Any:
    """``nn.Conv*d`` / ``nn.ConvTranspose*d``: see :func:`conv_like`."""
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    return conv_like(
        ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"), m.weight.shape, m.groups, m.transposed
    )


def conv_function_rule(transposed: bool) -> ChannelRule:
    """Rule for ``F.conv*d`` (``transposed=False``) or ``F.conv_transpose*d`` with parameter weights."""
    def rule(ctx: RuleContext) -> Any:
        w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
        wkey = ctx.param_key(w)
        bkey = ctx.param_key(b) if isinstance(b, fx.Node) else None
        if wkey is None or (isinstance(b, fx.Node) and bkey is None):
            return unknown(ctx, f"{ctx.describe()}: convolution whose weight or bias is not a parameter")
        groups = ctx.value(ctx.arg(6, "groups", 1))  # position 6 in conv*d and conv_transpose*d
        return conv_like(ctx, ctx.arg(0, "input"), wkey, bkey, ctx.value(w).shape, int(groups), transposed)

    return rule


register_channel_rule((F.conv1d, F.conv2d, F.conv3d), conv_function_rule(False))
register_channel_rule((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), conv_function_rule(True))


@register_channel_rule(nn.Embedding)
def embedding_module(ctx: RuleContext) -> Any:
    """``nn.Embedding``: a producer of ``embedding_dim`` coordinates (columns of its weight)."""
    m = ctx.module
    assert isinstance(m, nn.Embedding)
    ids = ctx.fresh(m.embedding_dim)
    ctx.role(ctx.module_key("weight"), 1, "output", ids)
    return ctx.along(ids, ctx.out.shape, -1)
