"""Rules of products of two tensors: matmul, einsum, scaled dot-product attention
and ``nn.MultiheadAttention``.

Features contracted with each other (queries with keys) are identified and
restricted to orthogonal maps; coordinates in different slices of a batched
product (attention heads) are grouped so that they do not mix.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..context import RuleContext
from ..registry import register_channel_rule
from .labels import clean, has_labels, unknown

__all__ = ["attention_block", "mha_module"]


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
    return clean(red.reshape(shape).expand(*ctx.out.shape).contiguous())


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


def matmul_rule(ctx: RuleContext) -> Any:
    """``A @ B`` (matmul, bmm): a batched product ``...yz,...zw->...yw`` of the label tensors."""
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


register_channel_rule((torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"), matmul_rule)


def einsum_rule(ctx: RuleContext) -> Any:
    """``torch.einsum`` of two operands without ellipsis; anything else is :func:`unknown`."""
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


register_channel_rule(torch.einsum, einsum_rule)


def sdpa_rule(ctx: RuleContext) -> Any:
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


register_channel_rule(F.scaled_dot_product_attention, sdpa_rule)


def attention_block(
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
    """``nn.MultiheadAttention`` with packed q/k/v weights: head-aware q/k and v points, a fresh
    output projection; masks that carry features are frozen."""
    m = ctx.module
    assert isinstance(m, nn.MultiheadAttention)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return unknown(ctx, f"{ctx.describe()}: MultiheadAttention with separate q/k/v sizes, bias_k or add_zero_attn")
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    for extra in ("key_padding_mask", "attn_mask"):
        a = ctx.node.kwargs.get(extra)
        if isinstance(a, fx.Node) and has_labels(ctx.label(a)):
            ctx.freeze(ctx.label(a), f"{ctx.describe()}: features used as an attention mask")
    vecs = [ctx.channels(ctx.label(t), -1) for t in (q, k, v)]
    for t, vec in zip((q, k, v), vecs):
        if vec is not None:
            ctx.site(t, -1)
    out = attention_block(
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
