"""Built-in channel rules: how each op relates input and output feature coordinates.

Each rule is small and says only what its op does to coordinates; the connected
components, merge points and kinds are worked out afterwards
(:mod:`autoalign.graph.discover`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..spec import FoldedNorm
from .context import UNTRACKED, ZERO, ParamOrigin, RuleContext
from .registry import register_channel_rule

# ----------------------------------------------------------------------------- helpers


def pointwise(ctx: RuleContext) -> Any:
    """Elementwise op with one feature input (activations, dropout, casts): labels pass."""
    a = ctx.arg(0, "input")
    if not isinstance(a, fx.Node):
        a = ctx.arg(0, "self")
    return ctx.label(a)


def _sub_label(x: Any, state_labels: dict[fx.Node, Any], values: dict[fx.Node, Any]) -> Any:
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


def _run_on_labels(ctx: RuleContext) -> Any:
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


def _has_labels(lab: Any) -> bool:
    if isinstance(lab, torch.Tensor):
        return bool((lab > 0).any())
    if isinstance(lab, (list, tuple)):
        return any(_has_labels(x) for x in lab)
    return False


def _clean(lab: Any) -> Any:
    """Turn all-untracked label tensors back into ``None`` (saves memory and work)."""
    if isinstance(lab, torch.Tensor):
        return lab if bool((lab >= ZERO).any()) else None
    if isinstance(lab, tuple):
        return tuple(_clean(x) for x in lab)
    if isinstance(lab, list):
        return [_clean(x) for x in lab]
    return lab


def _origin_index(ctx: RuleContext, origin: ParamOrigin) -> torch.Tensor:
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
            idx = _origin_index(ctx, origin)
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
    if not _has_labels(ctx.label(a0)):
        return None
    return _clean(_run_on_labels(ctx))


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


def _spatial(k: int):
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
        return _clean(out.contiguous())

    return rule


# ----------------------------------------------------------------------------- producers


def _producer_out(ctx: RuleContext, n: int, groups: int = 1) -> torch.Tensor:
    ids = ctx.fresh(n)
    if groups > 1:
        for g in ids.chunk(groups):
            ctx.group(g)
    return ids


def _linear_like(ctx: RuleContext, x: Any, wkey: str | None, bkey: str | None, out_features: int) -> Any:
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


@register_channel_rule(nn.Linear)
def linear_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.Linear)
    out = _linear_like(ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"), m.out_features)
    ctx.state.output_sites.append((ctx.node.name, -1))
    return out


@register_channel_rule(F.linear)
def linear_function(ctx: RuleContext) -> Any:
    w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    wkey = ctx.param_key(w)
    if wkey is None:
        return unknown(ctx, f"{ctx.describe()}: linear with a weight that is not a parameter")
    bkey = ctx.param_key(b) if isinstance(b, fx.Node) else None
    if isinstance(b, fx.Node) and bkey is None:
        return unknown(ctx, f"{ctx.describe()}: linear with a bias that is not a parameter")
    out = _linear_like(ctx, ctx.arg(0, "input"), wkey, bkey, ctx.value(w).shape[0])
    ctx.state.output_sites.append((ctx.node.name, -1))
    return out


def _conv_like(
    ctx: RuleContext, x: Any, wkey: str | None, bkey: str | None, weight_shape: Sequence[int], groups: int, transposed: bool
) -> Any:
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
        return _clean(ctx.along(vec, ctx.out.shape, 1))
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
    m = ctx.module
    assert isinstance(m, nn.modules.conv._ConvNd)
    return _conv_like(
        ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"), m.weight.shape, m.groups, m.transposed
    )


def _conv_function(transposed: bool):
    def rule(ctx: RuleContext) -> Any:
        w, b = ctx.arg(1, "weight"), ctx.arg(2, "bias")
        wkey = ctx.param_key(w)
        bkey = ctx.param_key(b) if isinstance(b, fx.Node) else None
        if wkey is None or (isinstance(b, fx.Node) and bkey is None):
            return unknown(ctx, f"{ctx.describe()}: convolution whose weight or bias is not a parameter")
        groups = ctx.value(ctx.arg(6, "groups", 1))  # position 6 in conv*d and conv_transpose*d
        return _conv_like(ctx, ctx.arg(0, "input"), wkey, bkey, ctx.value(w).shape, int(groups), transposed)

    return rule


register_channel_rule((F.conv1d, F.conv2d, F.conv3d), _conv_function(False))
register_channel_rule((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), _conv_function(True))


@register_channel_rule(nn.Embedding)
def embedding_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.Embedding)
    ids = ctx.fresh(m.embedding_dim)
    ctx.role(ctx.module_key("weight"), 1, "output", ids)
    return ctx.along(ids, ctx.out.shape, -1)


# ----------------------------------------------------------------------------- normalisation


def _norm_channels(
    ctx: RuleContext, lab: torch.Tensor | None, axis: int, keys: Sequence[str | None], what: str
) -> torch.Tensor | None:
    vec = ctx.channels(lab, axis)
    for k in keys:
        ctx.role(k, 0, "channel", vec)
    ctx.restrict(vec, "permutation", f"{ctx.name}: {what}")
    return vec


@register_channel_rule((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
def batchnorm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    x = ctx.arg(0, "input")
    lab = ctx.label(x)
    keys = {a: ctx.module_key(a) for a in ("weight", "bias", "running_mean", "running_var")}
    for k in keys.values():
        ctx.touch(k)
    ctx.touch(ctx.module_key("num_batches_tracked"))
    if lab is None:
        return None
    vec = ctx.channels(lab, 1)
    prod = ctx.state.producers.get(x.name) if isinstance(x, fx.Node) else None
    foldable = (
        prod is not None
        and len(x.users) == 1
        and keys["running_mean"] is not None
        and keys["running_var"] is not None
        and vec is not None
        and torch.equal(vec, prod[2])
    )
    if foldable:
        wkey, bkey, _ = prod
        ctx.state.folds.append(
            FoldedNorm(
                wkey, bkey, keys["weight"], keys["bias"], keys["running_mean"], keys["running_var"], float(m.eps),
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
    _norm_channels(ctx, lab, 1, list(keys.values()), why)
    return lab


@register_channel_rule(F.batch_norm)
def batchnorm_function(ctx: RuleContext) -> Any:
    lab = ctx.label(ctx.arg(0, "input"))
    keys = []
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        a = ctx.arg(i, name)
        if isinstance(a, fx.Node):
            k = ctx.param_key(a)
            if k is None:
                return unknown(ctx, f"{ctx.describe()}: batch_norm statistics are not parameters/buffers")
            keys.append(k)
    _norm_channels(ctx, lab, 1, keys, "batch_norm (per-channel)")
    return lab


@register_channel_rule((nn.LayerNorm, nn.RMSNorm) if hasattr(nn, "RMSNorm") else nn.LayerNorm)
def layernorm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    lab = ctx.label(ctx.arg(0, "input"))
    keys = [ctx.module_key("weight"), ctx.module_key("bias")]
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    if len(m.normalized_shape) != 1:
        return unknown(ctx, f"{ctx.describe()}: normalisation over several axes")
    _norm_channels(ctx, lab, -1, keys, f"{type(m).__name__} (per-channel affine, statistics over channels)")
    return lab


@register_channel_rule(F.layer_norm)
def layernorm_function(ctx: RuleContext) -> Any:
    lab = ctx.label(ctx.arg(0, "input"))
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    keys = []
    for i, name in ((2, "weight"), (3, "bias")):
        a = ctx.arg(i, name)
        if isinstance(a, fx.Node):
            k = ctx.param_key(a)
            if k is None:
                return unknown(ctx, f"{ctx.describe()}: layer_norm affine is not a parameter")
            keys.append(k)
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    if len(shape) != 1:
        return unknown(ctx, f"{ctx.describe()}: normalisation over several axes")
    _norm_channels(ctx, lab, -1, keys, "layer_norm (per-channel affine, statistics over channels)")
    return lab


def _group_norm(ctx: RuleContext, lab: torch.Tensor | None, groups: int, keys: Sequence[str | None]) -> Any:
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    vec = _norm_channels(ctx, lab, 1, keys, "GroupNorm (per-channel affine, statistics within groups)")
    if vec is not None:
        for part in vec.chunk(groups):
            ctx.group(part)
    return lab


@register_channel_rule(nn.GroupNorm)
def groupnorm_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.GroupNorm)
    return _group_norm(ctx, ctx.label(ctx.arg(0, "input")), m.num_groups, [ctx.module_key("weight"), ctx.module_key("bias")])


@register_channel_rule(F.group_norm)
def groupnorm_function(ctx: RuleContext) -> Any:
    keys = []
    for i, name in ((2, "weight"), (3, "bias")):
        a = ctx.arg(i, name)
        if isinstance(a, fx.Node):
            k = ctx.param_key(a)
            if k is None:
                return unknown(ctx)
            keys.append(k)
    return _group_norm(ctx, ctx.label(ctx.arg(0, "input")), int(ctx.value(ctx.arg(1, "num_groups"))), keys)


@register_channel_rule((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))
def instancenorm_module(ctx: RuleContext) -> Any:
    lab = ctx.label(ctx.arg(0, "input"))
    keys = [ctx.module_key(a) for a in ("weight", "bias", "running_mean", "running_var")]
    for k in keys:
        ctx.touch(k)
    if lab is None:
        return None
    _norm_channels(ctx, lab, 1, keys, "InstanceNorm (per-channel)")
    return lab


@register_channel_rule(nn.PReLU)
def prelu_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.PReLU)
    lab = ctx.label(ctx.arg(0, "input"))
    ctx.touch(ctx.module_key("weight"))
    if m.num_parameters == 1 or lab is None:
        return lab
    axis = 1 if lab.dim() > 1 else 0
    _norm_channels(ctx, lab, axis, [ctx.module_key("weight")], "PReLU with per-channel slopes")
    return lab


# ----------------------------------------------------------------------------- elementwise


def _broadcast_full(lab: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
    if lab is None:
        return torch.full(tuple(shape), UNTRACKED, dtype=torch.int64)
    return lab.expand(*shape) if tuple(lab.shape) != tuple(shape) else lab


def _param_role(ctx: RuleContext, lab: torch.Tensor, origin: ParamOrigin, other_shape: Sequence[int], role: str) -> bool:
    """Record the role of a parameter combined elementwise with a labelled tensor.

    Returns False when the combination cannot be expressed (the caller freezes)."""
    out_shape = tuple(ctx.out.shape)
    full = _broadcast_full(lab, out_shape)
    idx = _origin_index(ctx, origin)
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
    try:
        return bool(v == 0)
    except Exception:  # noqa: BLE001 - anything that is not a plain number
        return False


def _elementwise(kind: str):
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
            if _param_role(ctx, lab, origin, vother.shape, role):
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
    _elementwise("add"),
)
register_channel_rule(
    (operator.mul, operator.truediv, operator.imul, operator.itruediv, torch.mul, torch.div, torch.multiply, torch.true_divide,
     "mul", "div", "mul_", "div_", "multiply", "true_divide"),
    _elementwise("mul"),
)


register_channel_rule(torch.rsub, _elementwise("add"))


# ----------------------------------------------------------------------------- reductions and softmax


def _dims(d: Any, ndim: int) -> list[int] | None:
    if d is None:
        return None
    if isinstance(d, int):
        d = [d]
    return sorted({x % ndim for x in d})


def _reduction(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lab = ctx.label(x)
    if lab is None or not isinstance(ctx.out, torch.Tensor):
        return None
    dims = _dims(ctx.value(ctx.arg(1, "dim")), lab.dim())
    if dims is None or dims == []:
        dims = list(range(lab.dim()))
    vary = set(ctx.varying_axes(lab))
    if vary & set(dims):
        ctx.restrict(lab, "permutation", f"{ctx.describe()}: reduction over feature channels")
        return None
    out = lab.amax(dim=dims, keepdim=True)
    return _clean(out.reshape(ctx.out.shape).contiguous())


register_channel_rule((torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                       "mean", "sum", "amax", "amin", "std", "var", "logsumexp"), _reduction)


def _softmax(ctx: RuleContext) -> Any:
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
                       nn.Softmax, nn.LogSoftmax), _softmax)


def _normalize(ctx: RuleContext) -> Any:
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


# ----------------------------------------------------------------------------- cat / stack


def _cat(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.value(ctx.arg(1, "dim", 0))
    if not isinstance(tensors, (list, tuple)) or not isinstance(ctx.out, torch.Tensor):
        return unknown(ctx)
    labs = [ctx.label(t) if isinstance(t, fx.Node) else None for t in tensors]
    if not any(_has_labels(x) for x in labs):
        return None
    ndim = ctx.out.dim()
    dim = dim % ndim
    # stack inserts a new axis ``dim`` into the output: never a feature axis
    is_stack = ctx.node.target is torch.stack
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
                    if not _param_role(ctx, full, o, vt.shape, "additive"):
                        ctx.freeze(base, f"{ctx.describe()}: concatenated with {o.key} in a way no transform can follow")
                elif isinstance(vt, torch.Tensor):
                    ctx.freeze(base, f"{ctx.describe()}: concatenated with an untracked tensor along a non-feature axis")
        return ctx.along(base, ctx.out.shape, out_ax)
    return _clean(_run_on_labels(ctx))


register_channel_rule((torch.cat, torch.concat, torch.concatenate, torch.stack), _cat)

# ----------------------------------------------------------------------------- attention and matmul

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _bilinear(ctx: RuleContext, la: Any, a_sub: str, lb: Any, b_sub: str, out_sub: str) -> Any:
    """Coordinates through ``einsum(a_sub, b_sub -> out_sub)`` of two label tensors
    (``None`` for an untracked operand; batch axes already broadcast)."""
    if la is None and lb is None:
        return None
    contracted = [c for c in a_sub if c in b_sub and c not in out_sub]
    batch = [c for c in out_sub if c in a_sub and c in b_sub]
    vary_a = {a_sub[i] for i in ctx.varying_axes(la)}
    vary_b = {b_sub[i] for i in ctx.varying_axes(lb)}
    tracked_a = la is not None and bool((la > 0).any())
    tracked_b = lb is not None and bool((lb > 0).any())
    ca, cb = [c for c in contracted if c in vary_a], [c for c in contracted if c in vary_b]
    consumed_a = consumed_b = False
    if ca or cb:
        only_contracted = not (vary_a - set(contracted) - set(batch)) and not (vary_b - set(contracted) - set(batch))
        if set(ca) == set(cb) and tracked_a and tracked_b and only_contracted:
            keep = batch + ca
            ra = _reduce_to(la, a_sub, keep)
            rb = _reduce_to(lb, b_sub, keep)
            ctx.union(ra, rb)
            ctx.restrict(ra, "orthogonal", f"{ctx.describe()}: features contracted with each other (query/key)")
            _group_batches(ctx, ra, keep, batch)
            consumed_a = consumed_b = True
        else:
            if ca and tracked_a:
                ctx.freeze(la, f"{ctx.describe()}: features contracted with an untracked tensor")
                consumed_a = True
            if cb and tracked_b:
                ctx.freeze(lb, f"{ctx.describe()}: features contracted with an untracked tensor")
                consumed_b = True
    pass_a = tracked_a and not consumed_a
    pass_b = tracked_b and not consumed_b
    if pass_a and pass_b:
        ctx.freeze([la, lb], f"{ctx.describe()}: product of two feature tensors")
        return None
    if not (pass_a or pass_b):
        return None
    lab, sub = (la, a_sub) if pass_a else (lb, b_sub)
    keep = [c for c in out_sub if c in sub]
    red = _reduce_to(lab, sub, keep)
    _group_batches(ctx, red, keep, batch)
    shape = [red.shape[keep.index(c)] if c in keep else 1 for c in out_sub]
    return _clean(red.reshape(shape).expand(*ctx.out.shape).contiguous())


def _reduce_to(lab: torch.Tensor, sub: str, keep: Sequence[str]) -> torch.Tensor:
    """Index a label tensor at 0 along letters not in ``keep`` and order axes as ``keep``."""
    idx = tuple(slice(None) if c in keep else 0 for c in sub)
    t = lab[idx]
    remaining = [c for c in sub if c in keep]
    return t.permute([remaining.index(c) for c in keep])


def _group_batches(ctx: RuleContext, red: torch.Tensor, keep: Sequence[str], batch: Sequence[str]) -> None:
    """Coordinates in different slices of a batched product must not mix (attention heads)."""
    bax = [i for i, c in enumerate(keep) if c in batch]
    vary = [i for i in bax if i in ctx.varying_axes(red)]
    if not vary:
        return
    moved = red.movedim(vary, list(range(len(vary))))
    for sl in moved.reshape(-1, *moved.shape[len(vary):]):
        ctx.group(sl)


def _matmul(ctx: RuleContext) -> Any:
    A, B = ctx.arg(0, "input"), ctx.arg(1, "other")
    va, vb = ctx.value(A), ctx.value(B)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.dim() < 2 or vb.dim() < 2:
        return unknown(ctx)
    la, lb = ctx.label(A), ctx.label(B)
    if la is None and lb is None:
        return None
    if ctx.origin(A) is not None or ctx.origin(B) is not None:
        return unknown(ctx, f"{ctx.describe()}: matmul with a parameter (use nn.Linear or F.linear)")
    bshape = torch.broadcast_shapes(va.shape[:-2], vb.shape[:-2])
    nb = len(bshape)
    if la is not None:
        la = la.expand(*bshape, *va.shape[-2:])
    if lb is not None:
        lb = lb.expand(*bshape, *vb.shape[-2:])
    batch = _LETTERS[:nb]
    return _bilinear(ctx, la, batch + "yz", lb, batch + "zw", batch + "yw")


register_channel_rule((torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"), _matmul)


def _einsum(ctx: RuleContext) -> Any:
    eq = ctx.value(ctx.arg(0, "equation"))
    ops = ctx.node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
        return unknown(ctx)
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return unknown(ctx)
    la, lb = ctx.label(ops[0]), ctx.label(ops[1])
    va, vb = ctx.value(ops[0]), ctx.value(ops[1])
    # broadcast size-1 axes of shared letters
    sizes: dict[str, int] = {}
    for sub, v in ((subs[0], va), (subs[1], vb)):
        for c, n in zip(sub, v.shape):
            sizes[c] = max(sizes.get(c, 1), n)
    if la is not None:
        la = la.expand(*[sizes[c] for c in subs[0]])
    if lb is not None:
        lb = lb.expand(*[sizes[c] for c in subs[1]])
    return _bilinear(ctx, la, subs[0], lb, subs[1], out)


register_channel_rule(torch.einsum, _einsum)


def _sdpa(ctx: RuleContext) -> Any:
    """``F.scaled_dot_product_attention(q, k, v)`` = ``softmax(q kᵀ · scale) v``: queries and keys
    are contracted with each other (orthogonal, per head), values pass to the output (per head)."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    vq, vk, vv = ctx.value(q), ctx.value(k), ctx.value(v)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (vq, vk, vv)):
        return unknown(ctx)
    if ctx.value(ctx.node.kwargs.get("enable_gqa", False)):
        return unknown(ctx, f"{ctx.describe()}: grouped-query attention (enable_gqa=True) is not supported")
    lq, lk, lv = ctx.label(q), ctx.label(k), ctx.label(v)
    if lq is None and lk is None and lv is None:
        return None
    if any(ctx.origin(t) is not None for t in (q, k, v)):
        return unknown(ctx, f"{ctx.describe()}: attention on a parameter tensor")
    bshape = torch.broadcast_shapes(vq.shape[:-2], vk.shape[:-2], vv.shape[:-2])
    nb = len(bshape)
    lq = None if lq is None else lq.expand(*bshape, *vq.shape[-2:])
    lk = None if lk is None else lk.expand(*bshape, *vk.shape[-2:])
    lv = None if lv is None else lv.expand(*bshape, *vv.shape[-2:])
    batch = _LETTERS[:nb]
    scores = _bilinear(ctx, lq, batch + "LE", lk, batch + "SE", batch + "LS")
    if scores is not None:
        ctx.freeze(scores, f"{ctx.describe()}: attention scores carry feature coordinates")
    return _bilinear(ctx, None, batch + "LS", lv, batch + "SV", batch + "LV")


register_channel_rule(F.scaled_dot_product_attention, _sdpa)


def _attention_block(
    ctx: RuleContext, in_vecs: Sequence[torch.Tensor | None], wkey: str | None, bkey: str | None, embed: int, heads: int,
    out_wkey: str | None, out_bkey: str | None, prefix: str, site_inputs: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Record a fused q/k/v projection, head-aware, and the output projection.

    ``in_vecs`` are the coordinate vectors of the query, key and value inputs. The
    query/key space of each head is one ``orthogonal`` point, the value space of
    each head one ``linear`` point (attention weights act on tokens only)."""
    hd = embed // heads
    for part, vec in enumerate(in_vecs):
        ctx.role(wkey, 1, "input", vec, block=(0, part * embed, (part + 1) * embed))
    qk = torch.cat([ctx.fresh(hd, f"{prefix}.qk/h{h}") for h in range(heads)])
    v = torch.cat([ctx.fresh(hd, f"{prefix}.v/h{h}") for h in range(heads)])
    for h in range(heads):
        ctx.group(qk[h * hd : (h + 1) * hd])
        ctx.group(v[h * hd : (h + 1) * hd])
    ctx.restrict(qk, "orthogonal", f"{prefix}: attention query/key space (scores are q·k)")
    rows = torch.cat([qk, qk, v])
    if wkey is not None and site_inputs is not None:
        for part, a in enumerate(site_inputs):
            part_rows = torch.full_like(rows, -1)
            part_rows[part * embed : (part + 1) * embed] = rows[part * embed : (part + 1) * embed]
            ctx.projected_site(a, -1, wkey, bkey, part_rows)
    ctx.role(wkey, 0, "output", rows)
    ctx.role(bkey, 0, "output", rows)
    ctx.role(out_wkey, 1, "input", v)
    out = ctx.fresh(embed, f"{prefix}.out_proj" if ctx.node.op == "call_module" else prefix)
    ctx.role(out_wkey, 0, "output", out)
    ctx.role(out_bkey, 0, "output", out)
    return out


@register_channel_rule(nn.MultiheadAttention)
def mha_module(ctx: RuleContext) -> Any:
    m = ctx.module
    assert isinstance(m, nn.MultiheadAttention)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return unknown(ctx, f"{ctx.describe()}: MultiheadAttention with separate q/k/v sizes, bias_k or add_zero_attn")
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    for extra in ("key_padding_mask", "attn_mask"):
        a = ctx.node.kwargs.get(extra)
        if isinstance(a, fx.Node) and _has_labels(ctx.label(a)):
            ctx.freeze(ctx.label(a), f"{ctx.describe()}: features used as an attention mask")
    vecs = [ctx.channels(ctx.label(t), -1) for t in (q, k, v)]
    for t, vec in zip((q, k, v), vecs):
        if vec is not None:
            ctx.site(t, -1)
    out = _attention_block(
        ctx, vecs, ctx.module_key("in_proj_weight"), ctx.module_key("in_proj_bias"), m.embed_dim, m.num_heads,
        f"{ctx.node.target}.out_proj.weight", ctx.module_key("out_proj") and (f"{ctx.node.target}.out_proj.bias" if m.out_proj.bias is not None else None),
        str(ctx.node.target), site_inputs=(q, k, v),
    )
    res = ctx.out
    first = res[0] if isinstance(res, (tuple, list)) else res
    lab = ctx.along(out, first.shape, -1)
    if isinstance(res, (tuple, list)):
        return (lab,) + tuple(None for _ in res[1:])
    return lab


# ----------------------------------------------------------------------------- registration of simple ops

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
    torch.nn.functional.pixel_unshuffle, torch.channel_shuffle, torch.native_channel_shuffle,
)
_STRUCTURAL_METHODS = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim", "squeeze",
    "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "repeat", "narrow", "roll", "flip", "chunk", "split",
    "tensor_split", "unbind", "t", "__getitem__",
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
    register_channel_rule(_mods + _fns, _spatial(_k))


def _resize(ctx: RuleContext) -> Any:
    lab = ctx.label(ctx.arg(0, "input"))
    if lab is None:
        return None
    return _spatial(lab.dim() - 2)(ctx)


register_channel_rule((F.interpolate, F.upsample, nn.Upsample), _resize)


# ----------------------------------------------------------------------------- torchvision specifics


_TORCHVISION_DONE = False


def register_torchvision_rules() -> None:
    """Register rules for torchvision's opaque functions (once; only if torchvision
    is already imported, so ``import autoalign`` does not pay for it)."""
    global _TORCHVISION_DONE
    import sys

    if _TORCHVISION_DONE or "torchvision" not in sys.modules:
        return
    _TORCHVISION_DONE = True
    try:
        import importlib

        sd = importlib.import_module("torchvision.ops.stochastic_depth")
        swin = importlib.import_module("torchvision.models.swin_transformer")
    except Exception:  # noqa: BLE001 - torchvision is optional for discovery
        return
    register_channel_rule(sd.stochastic_depth, pointwise)
    register_channel_rule(swin._patch_merging_pad, structural)
    register_channel_rule(swin.shifted_window_attention, _swin_attention)


def _swin_attention(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    qkv_w, proj_w = ctx.arg(1, "qkv_weight"), ctx.arg(2, "proj_weight")
    rel = ctx.arg(3, "relative_position_bias")
    heads = int(ctx.value(ctx.arg(5, "num_heads")))
    qkv_b = ctx.node.kwargs.get("qkv_bias", ctx.node.args[9] if len(ctx.node.args) > 9 else None)
    proj_b = ctx.node.kwargs.get("proj_bias", ctx.node.args[10] if len(ctx.node.args) > 10 else None)
    logit = ctx.node.kwargs.get("logit_scale", ctx.node.args[11] if len(ctx.node.args) > 11 else None)
    keys = [ctx.param_key(a) if isinstance(a, fx.Node) else None for a in (qkv_w, proj_w, qkv_b, proj_b)]
    if keys[0] is None or keys[1] is None:
        return unknown(ctx, f"{ctx.describe()}: attention weights are not parameters")
    if isinstance(rel, fx.Node) and _has_labels(ctx.label(rel)):
        ctx.freeze(ctx.label(rel), f"{ctx.describe()}: features used as an attention bias")
    if isinstance(logit, fx.Node):
        ctx.touch(ctx.param_key(logit))
    vec = ctx.channels(ctx.label(x), -1)
    if vec is not None:
        ctx.site(x, -1)
    embed = ctx.value(proj_w).shape[0]
    prefix = ctx.node.name
    # name the block after the module that owns the weights: "features.1.0.attn"
    owner = keys[0].rsplit(".", 2)[0] if keys[0].count(".") >= 2 else prefix
    out = _attention_block(ctx, [vec, vec, vec], keys[0], keys[2], embed, heads, keys[1], keys[3], owner, site_inputs=(x, x, x))
    return ctx.along(out, ctx.out.shape, -1)

