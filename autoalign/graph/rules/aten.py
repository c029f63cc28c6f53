"""Rules of the core ATen ops that the ``torch.export`` front end produces.

An exported graph calls ``torch.ops.aten.*`` overloads instead of modules and
``torch`` functions (:mod:`autoalign.trace.export`). Most of them take their
arguments in the same positions as the functions whose rules the other modules of
this package define, so this module maps them onto those rules; the few whose
signatures differ (``aten.embedding``, ``aten.addmm``, ``aten.batch_norm``,
``aten.convolution``, ``aten.rms_norm``, ``aten.linalg_vector_norm``,
``aten.constant_pad_nd``) get small adapters here. Parameters are ``get_attr``
nodes under their ``state_dict`` names in both front ends, so producers,
folded BatchNorms and per-channel parameters are recorded exactly as for
``torch.fx`` graphs.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import ChannelRule, register_channel_rule
from . import attention, builtin, concat, elementwise, norms, producers, reductions
from .labels import clean, pointwise, structural, unknown

__all__ = ["aten_overloads"]

aten = torch.ops.aten


def aten_overloads(*names: str) -> tuple[Any, ...]:
    """Every overload of the named ``aten`` ops (``"view"`` → ``aten.view.default``, ...);
    ``"pow.Tensor_Scalar"`` names one overload. Names this torch does not have are skipped."""
    out: list[Any] = []
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(aten, packet_name, None)
        if packet is None:
            continue
        for ov in ([overload] if overload else packet.overloads()):
            if ov == "out" or ov.endswith("_out") or ov.startswith("prim_"):
                continue  # out= variants write into a given tensor; exported graphs do not use them
            op = getattr(packet, ov, None)
            if op is not None:
                out.append(op)
    return tuple(out)


def _register(names: Iterable[str], rule: ChannelRule) -> None:
    register_channel_rule(aten_overloads(*names), rule)


# --------------------------------------------------------------------------- pointwise and structural
_register((
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
    "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "selu_", "celu", "celu_", "softplus", "mish", "mish_", "log_sigmoid", "dropout", "dropout_",
    "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "exp", "sqrt", "rsqrt", "abs", "neg", "square",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "erf", "sign", "pow.Tensor_Scalar", "_to_copy", "to",
    "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "threshold", "logit",
), pointwise)

_register((
    "view", "_unsafe_view", "reshape", "view_as", "reshape_as", "permute", "transpose", "t", "swapaxes", "swapdims",
    "movedim", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "slice", "select",
    "narrow", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "flip", "roll", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
), structural)


def _index(ctx: RuleContext) -> Any:
    """``aten.index.Tensor`` (advanced indexing, ``x[idx]``): moves elements like ``getitem``
    under fx, provided the indices carry no features (else :func:`unknown`). Swin v2 gathers
    its position-bias MLP's per-head outputs this way."""
    indices = ctx.arg(1, "indices")
    if any(ctx.label(i) is not None for i in (indices if isinstance(indices, (list, tuple)) else [indices])):
        return unknown(ctx, f"{ctx.describe()}: indices computed from features")
    return structural(ctx)


_register(("index",), _index)


def _constant(ctx: RuleContext) -> Any:
    """``new_zeros``, ``zeros_like``, ... : a tensor shaped (or typed) like the input, whose values
    do not depend on it; nothing is frozen (Swin's attention mask is built this way)."""
    return None


_register(("new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
           "rand_like", "randn_like"), _constant)


def _constant_pad(ctx: RuleContext) -> Any:
    """``aten.constant_pad_nd`` / ``aten.pad``: zero padding moves labels (pads are exact
    zeros); any other value is :func:`unknown` (a constant no transform can follow)."""
    value = ctx.value(ctx.arg(2, "value", 0))
    mode = ctx.value(ctx.arg(2, "mode", "constant")) if ctx.node.target in aten_overloads("pad") else "constant"
    if ctx.node.target in aten_overloads("pad"):
        value = ctx.value(ctx.arg(3, "value", None)) or 0
    if mode != "constant" or value != 0:
        return unknown(ctx, f"{ctx.describe()}: padding with {mode!r} mode / value {value!r}")
    return structural(ctx)


_register(("constant_pad_nd", "pad"), _constant_pad)

# --------------------------------------------------------------------------- elementwise
_register(("add.Tensor", "add_.Tensor", "add.Scalar", "sub.Tensor", "sub_.Tensor", "sub.Scalar", "rsub"),
          elementwise.elementwise_rule("add"))
_register(("mul.Tensor", "mul_.Tensor", "mul.Scalar", "div.Tensor", "div_.Tensor", "div.Tensor_mode", "div.Scalar"),
          elementwise.elementwise_rule("mul"))

# --------------------------------------------------------------------------- reductions, softmax, products
_register(("mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax", "amin", "std.correction", "std.dim",
           "var.correction", "var.dim", "logsumexp"), reductions.reduction_rule)


def _reduce_all(ctx: RuleContext) -> Any:
    """``aten.var.default`` / ``aten.std.default``: a reduction over every axis."""
    lab = ctx.label(ctx.arg(0))
    if lab is not None and ctx.varying_axes(lab):
        ctx.restrict(lab, "permutation", f"{ctx.describe()}: reduction over feature channels")
    return None


_register(("var.default", "std.default"), _reduce_all)


def _vector_norm(ctx: RuleContext) -> Any:
    """``aten.linalg_vector_norm(x, ord, dim)``: over non-feature axes the coordinates
    stay; across feature channels an L2 norm allows orthogonal maps, other norms
    permutations (the result carries no coordinates)."""
    x = ctx.arg(0)
    lab = ctx.label(x)
    if lab is None or not isinstance(ctx.out, torch.Tensor):
        return None
    order = ctx.value(ctx.arg(1, "ord", 2))
    dims = reductions.reduction_dims(ctx.value(ctx.arg(2, "dim", None)), lab.dim())
    dims = list(range(lab.dim())) if not dims else dims
    if set(ctx.varying_axes(lab)) & set(dims):
        ctx.restrict(lab, "orthogonal" if order == 2 else "permutation", f"{ctx.describe()}: norm across feature channels")
        return None
    return clean(lab.amax(dim=dims, keepdim=True).reshape(ctx.out.shape).contiguous())


_register(("linalg_vector_norm",), _vector_norm)
_register(("softmax.int", "softmax_rule", "log_softmax.int", "_log_softmax"), reductions.softmax_rule)
_register(("matmul", "bmm", "mm"), attention.matmul_rule)
_register(("einsum",), attention.einsum_rule)
_register(("scaled_dot_product_attention",), attention.sdpa_rule)
_register(("cat", "stack"), concat.cat_rule)

# --------------------------------------------------------------------------- pooling and resizing
for _k in (1, 2, 3):
    _register((f"max_pool{_k}d", f"avg_pool{_k}d", f"adaptive_avg_pool{_k}d", f"_adaptive_avg_pool{_k}d"),
              builtin.spatial_rule(_k))
_register(("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d",
           "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d"), builtin.resize_rule)

# --------------------------------------------------------------------------- producers
_register(("linear",), producers.linear_function)
_register(("conv1d", "conv2d", "conv3d"), producers.conv_function_rule(False))
_register(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), producers.conv_function_rule(True))


def _convolution(ctx: RuleContext) -> Any:
    """``aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``."""
    w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    wkey = ctx.param_key(w)
    bkey = ctx.param_key(b) if isinstance(b, fx.Node) else None
    if wkey is None or (isinstance(b, fx.Node) and bkey is None):
        return unknown(ctx, f"{ctx.describe()}: convolution whose weight or bias is not a parameter")
    transposed, groups = bool(ctx.value(ctx.arg(6, "transposed"))), int(ctx.value(ctx.arg(8, "groups")))
    return producers.conv_like(ctx, ctx.arg(0, "input"), wkey, bkey, ctx.value(w).shape, groups, transposed)


_register(("convolution",), _convolution)


def _embedding(ctx: RuleContext) -> Any:
    """``aten.embedding(weight, indices)``: a producer of ``weight.shape[1]`` coordinates
    (the columns of its weight)."""
    w = ctx.arg(0, "weight")
    wkey = ctx.param_key(w)
    if wkey is None or ctx.state.origins[w].index is not None:
        return unknown(ctx, f"{ctx.describe()}: embedding whose table is not a parameter")
    ids = ctx.fresh(ctx.value(w).shape[1])
    ctx.role(wkey, 1, "output", ids)
    return ctx.along(ids, ctx.out.shape, -1)


_register(("embedding",), _embedding)


def _addmm(ctx: RuleContext) -> Any:
    """``aten.addmm(bias, x, weight)`` = ``bias + x @ weight`` with an ``(in, out)`` weight
    (GPT-2's ``Conv1D``): a producer whose outputs are the weight's columns."""
    bias, x, w = ctx.arg(0, "self"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    wkey = ctx.param_key(w)
    if wkey is None or ctx.state.origins[w].index is not None:
        return attention.matmul_rule(ctx) if ctx.param_key(bias) is None and ctx.label(bias) is None else unknown(ctx)
    bkey = ctx.param_key(bias) if isinstance(bias, fx.Node) else None
    vb = ctx.value(bias)
    if bkey is None or ctx.state.origins[bias].index is not None or vb.dim() != 1:
        return unknown(ctx, f"{ctx.describe()}: addmm whose bias is not a parameter vector")
    if ctx.value(ctx.node.kwargs.get("beta", 1)) != 1 or ctx.value(ctx.node.kwargs.get("alpha", 1)) != 1:
        return unknown(ctx, f"{ctx.describe()}: addmm with beta or alpha other than 1")
    lab = ctx.label(x)
    vec = ctx.channels(lab, -1)
    ctx.role(wkey, 0, "input", vec)
    if vec is not None:
        ctx.site(x, -1)
    ids = ctx.fresh(ctx.value(w).shape[1])
    ctx.role(wkey, 1, "output", ids)
    ctx.role(bkey, 0, "output", ids)
    ctx.state.producers[ctx.node.name] = (wkey, bkey, ids)
    ctx.state.producer_axes[ctx.node.name] = 1
    ctx.state.output_sites.append((ctx.node.name, -1))
    return ctx.along(ids, ctx.out.shape, -1)


_register(("addmm",), _addmm)

# --------------------------------------------------------------------------- normalisation


def _batch_norm(ctx: RuleContext) -> Any:
    """``aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)``:
    folded into the producer that alone feeds it when it normalises with running statistics,
    else per-channel (as the ``nn.BatchNorm*d`` rule)."""
    keys = norms.functional_keys(ctx, ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    if keys is None:
        return unknown(ctx, f"{ctx.describe()}: batch_norm statistics are not parameters/buffers")
    named = dict(zip(("weight", "bias", "running_mean", "running_var"), keys))
    if named["running_mean"] is not None:
        tracked = named["running_mean"].rsplit(".", 1)[0] + ".num_batches_tracked"
        if tracked in ctx.state.param_shapes:
            ctx.touch(tracked)
    if ctx.value(ctx.arg(5, "training")):
        named["running_mean"] = named["running_var"] = None  # batch statistics: nothing to fold
    return norms.batchnorm_like(ctx, ctx.arg(0, "input"), named, float(ctx.value(ctx.arg(7, "eps"))))


_register(("batch_norm",), _batch_norm)
_register(("layer_norm",), norms.layernorm_function)
_register(("group_norm",), norms.groupnorm_function)


def _rms_norm(ctx: RuleContext) -> Any:
    """``aten.rms_norm(input, normalized_shape, weight, eps)`` over the last axis: per-channel
    weight (permutations); without a weight an orthogonal map keeps the norm."""
    lab = ctx.label(ctx.arg(0, "input"))
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    keys = norms.functional_keys(ctx, ((2, "weight"),))
    if keys is None:
        return unknown(ctx, f"{ctx.describe()}: rms_norm weight is not a parameter")
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    if len(shape) != 1:
        return unknown(ctx, f"{ctx.describe()}: normalisation over several axes")
    if not [k for k in keys if k is not None]:  # no weight: x / rms(x) keeps any orthogonal map
        ctx.restrict(ctx.channels(lab, -1), "orthogonal", f"{ctx.name}: rms_norm (statistics over channels)")
        return lab
    norms.norm_channels(ctx, lab, -1, keys, "rms_norm (per-channel weight, statistics over channels)")
    return lab


_register(("rms_norm",), _rms_norm)
if hasattr(F, "rms_norm"):  # the functional form takes the same arguments (fx graphs)
    register_channel_rule(F.rms_norm, _rms_norm)


def _instance_norm(ctx: RuleContext) -> Any:
    """``aten.instance_norm(input, weight, bias, running_mean, running_var, ...)``: per-channel over axis 1."""
    keys = norms.functional_keys(ctx, ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    if keys is None:
        return unknown(ctx)
    for k in keys:
        ctx.touch(k)
    lab = ctx.label(ctx.arg(0, "input"))
    if lab is None:
        return None
    norms.norm_channels(ctx, lab, 1, keys, "instance_norm (per-channel)")
    return lab


_register(("instance_norm",), _instance_norm)
