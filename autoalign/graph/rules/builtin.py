"""Registration of the simple ops: pointwise, structural, pooling and resizing.

Activations, dropout and casts pass labels (:func:`~.labels.pointwise`); views,
permutes, slicing and padding move them (:func:`~.labels.structural`); pooling
and resizing act on the spatial axes of each channel.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..context import UNTRACKED, ZERO, RuleContext
from ..registry import ChannelRule, register_channel_rule
from .labels import clean, pointwise, structural, unknown

__all__: list[str] = []


def spatial_rule(k: int) -> ChannelRule:
    """Rule for ops acting on the last ``k`` axes of each channel (pooling, resizing)."""

    def rule(ctx: RuleContext) -> Any:
        lab = ctx.label(ctx.arg(0, "input"))
        if lab is None or not isinstance(ctx.out, torch.Tensor):
            return None
        if lab.dim() < k + 1:
            return unknown(ctx, f"{ctx.describe()}: pooling over all axes")
        lead = lab.shape[: lab.dim() - k]
        mat = lab.reshape(-1, math.prod(lab.shape[lab.dim() - k :]))
        big = torch.iinfo(torch.int64).max
        hi = mat.max(1).values
        lo = torch.where(mat == ZERO, torch.full_like(mat, big), mat).min(1).values
        lo = torch.where(lo == big, hi, lo)
        bad = lo != hi
        if bool(bad.any()):
            ctx.freeze(mat[bad], f"{ctx.describe()}: coordinates vary across the pooled axes")
            hi = hi.clone()
            hi[bad] = UNTRACKED
        out = hi.reshape(*lead, *([1] * k)).expand(*lead, *ctx.out.shape[lab.dim() - k :])
        return clean(out.contiguous())

    return rule


_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Threshold,
)
_POINTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.softplus, F.mish, F.hardtanh, F.softsign, F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.square, torch.clamp, torch.clip, torch.erf,
    torch.nn.functional.threshold, operator.neg, operator.pos, torch.pow, operator.pow, torch.sign,
)
_POINTWISE_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "sqrt", "rsqrt", "abs", "neg", "square", "clamp",
    "clamp_", "clamp_min", "clamp_max", "clip", "erf", "pow", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "to", "type", "type_as", "requires_grad_", "cpu", "cuda", "sign",
)
register_channel_rule(_POINTWISE_MODULES + _POINTWISE_FUNCTIONS + _POINTWISE_METHODS, pointwise)

_STRUCTURAL_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim,
    torch.squeeze, torch.unsqueeze, torch.narrow, torch.roll, torch.flip, torch.chunk, torch.split, torch.tensor_split,
    torch.unbind, torch.t, torch.unflatten, operator.getitem, F.pad, torch.nn.functional.pixel_shuffle,
    torch.nn.functional.pixel_unshuffle, torch.channel_shuffle, torch.native_channel_shuffle, torch.repeat_interleave,
    torch.tile,
)
_STRUCTURAL_METHODS = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "repeat", "narrow", "roll", "flip", "chunk", "split",
    "tensor_split", "unbind", "t", "__getitem__", "repeat_interleave", "tile",
)
_STRUCTURAL_MODULES = (nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.PixelShuffle,
                       nn.PixelUnshuffle, nn.ChannelShuffle)
register_channel_rule(_STRUCTURAL_FUNCTIONS + _STRUCTURAL_METHODS + _STRUCTURAL_MODULES, structural)

for _k, _mods, _fns in (
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.UpsamplingNearest2d,
         nn.UpsamplingBilinear2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)),
):
    register_channel_rule(_mods + _fns, spatial_rule(_k))


def resize_rule(ctx: RuleContext) -> Any:
    """``F.interpolate`` / ``nn.Upsample``: a spatial rule over all axes after the channel axis."""
    lab = ctx.label(ctx.arg(0, "input"))
    if lab is None:
        return None
    return spatial_rule(lab.dim() - 2)(ctx)


register_channel_rule((F.interpolate, F.upsample, nn.Upsample), resize_rule)
