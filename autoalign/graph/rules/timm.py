"""Rules for timm's layers that ``torch.fx`` cannot trace (or traces into something
no rule can follow), for use as leaf modules.

* ``Conv2dSame`` (TF "SAME" padding computed from the input's shape: fx fails on
  ``math.ceil`` of a traced size) — a convolution;
* ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``, ``ScaledStdConv2dSame``
  (weight standardisation: the conv's weight is computed from the parameter by a
  ``batch_norm`` over each output filter, so the traced conv's weight is not a
  parameter and its channels froze) — a convolution whose filters are standardised
  over their inputs, which commutes with permutations only, and which must never
  have a BatchNorm folded into its raw weight;
* ``AvgPool2dSame``, ``MaxPool2dSame`` — spatial pooling.

fx does not treat these modules as leaves on its own (they are not in ``torch.nn``):
pass :func:`timm_leaf_modules` as ``leaf_modules``::

    autoalign.check(model, x, leaf_modules=timm_leaf_modules())

The rules are registered lazily by :func:`register_timm_rules`, and only when timm is
already imported, so ``import autoalign`` does not pay for it.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..context import RuleContext
from ..registry import register_channel_rule
from .builtin import spatial_rule
from .producers import conv_like

__all__ = ["register_timm_rules", "timm_leaf_modules"]

_TIMM_DONE = False


def _classes() -> dict[str, list[type[nn.Module]]]:
    import importlib

    def pick(module: str, names: list[str]) -> list[type[nn.Module]]:
        mod = importlib.import_module(f"timm.layers.{module}")
        return [getattr(mod, n) for n in names if hasattr(mod, n)]

    return {
        "conv": pick("conv2d_same", ["Conv2dSame"]),
        "std_conv": pick("std_conv", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"]),
        "pool": pick("pool2d_same", ["AvgPool2dSame", "MaxPool2dSame"]),
    }


def timm_leaf_modules() -> list[type[nn.Module]]:
    """timm's layer classes that have a rule here, to pass as ``leaf_modules`` (empty
    when timm is not installed)."""
    try:
        cls = _classes()
    except Exception:  # noqa: BLE001 - timm is optional
        return []
    register_timm_rules()
    return [c for group in cls.values() for c in group]


def register_timm_rules() -> None:
    """Register the rules of timm's layers (once; only if timm is already imported)."""
    global _TIMM_DONE
    if _TIMM_DONE or "timm" not in sys.modules:
        return
    try:
        cls = _classes()
    except Exception:  # noqa: BLE001 - timm is optional for discovery
        return
    _TIMM_DONE = True
    if cls["conv"]:
        register_channel_rule(tuple(cls["conv"]), _conv_same)
    if cls["std_conv"]:
        register_channel_rule(tuple(cls["std_conv"]), _std_conv)
    if cls["pool"]:
        register_channel_rule(tuple(cls["pool"]), spatial_rule(2))


def _conv_same(ctx: RuleContext) -> Any:
    """``Conv2dSame``: a convolution (the padding it adds depends on the shape only)."""
    m = ctx.module
    return conv_like(ctx, ctx.arg(0, "input"), ctx.module_key("weight"), ctx.module_key("bias"),
                      m.weight.shape, m.groups, False)


def _std_conv(ctx: RuleContext) -> Any:
    """Weight-standardised convolutions: each output filter is normalised over its
    inputs and kernel, then scaled by ``gain`` (per output channel, when present).
    Standardising commutes with permuting inputs or outputs, not with a dense map, so
    both sides are restricted to permutations; a following BatchNorm cannot fold into
    the raw weight."""
    m = ctx.module
    x = ctx.arg(0, "input")
    vec = ctx.channels(ctx.label(x), 1)
    out = conv_like(ctx, x, ctx.module_key("weight"), ctx.module_key("bias"), m.weight.shape, m.groups, False)
    ctx.state.producers.pop(ctx.node.name, None)
    why = f"{ctx.name}: weight-standardised convolution ({type(m).__name__})"
    if vec is not None:
        ctx.restrict(vec, "permutation", why)
    ids = ctx.channels(out, 1) if out is not None else None
    if ids is not None:
        ctx.restrict(ids, "permutation", why)
        gain = ctx.module_key("gain")
        if gain is not None:
            ctx.role(gain, 0, "channel", ids)
    return out
