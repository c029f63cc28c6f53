"""Rules for torchvision's opaque functions (stochastic depth, Swin's windowed
attention and patch-merging padding).

They are registered lazily by :func:`register_torchvision_rules`, and only when
torchvision is already imported, so ``import autoalign`` does not pay for it.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..context import RuleContext
from ..registry import register_channel_rule
from .attention import attention_block
from .labels import has_labels, pointwise, structural, unknown

__all__ = ["register_torchvision_rules"]


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
    """torchvision's ``shifted_window_attention``: a fused q/k/v and output projection
    (see :func:`~.attention.attention_block`), named after the module owning the weights."""
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
    if isinstance(rel, fx.Node) and has_labels(ctx.label(rel)):
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
    out = attention_block(ctx, [vec, vec, vec], keys[0], keys[2], embed, heads, keys[1], keys[3], owner, site_inputs=(x, x, x))
    return ctx.along(out, ctx.out.shape, -1)
