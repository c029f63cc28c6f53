"""Rotary position embeddings seen as one op: ``x * cos + rotate(x) * sin``.

Rotary embeddings (RoPE; Su et al., "RoFormer", 2021) rotate each pair of query/key
coordinates ``(i, π(i))`` by an angle that depends on the token's position and on the
pair's frequency. Written out, the op is two products of the features with
position tables and a sum::

    x * cos + rotate(x) * sin,    rotate(x)_i = ±x_π(i)  (``rotate_half`` or interleaved)

Op by op, each product multiplies features by a table that varies along the channels,
which allows no transform at all. As a whole the op commutes with every transform that
rotates each pair in its own plane (a 2-D rotation commutes with the position's
rotation of the same plane), so the points through it keep that group: the ``rotary``
kind, with its pairs.

The pass has two halves:

* :func:`rotary_candidates`, before the analysis: every sum of two single-use products
  where one factor is built by a concatenation or stack of a negated slice (how
  ``rotate`` is written). The two products are left unlabelled until the sum.
* :func:`rotary_label`, at the sum, on the real values: the rotated operand is a signed
  pairing ``rotate(x) = J x`` of the other along the last axis (read from the labels,
  signs from the values, ``J`` a ±90° rotation in each pair), the tables are untracked
  and equal on both coordinates of each pair. Then the sum carries ``x``'s coordinates and
  the pairs are recorded; otherwise the caller analyses the three ops one by one, as if
  the pass did not exist.

Nothing here trusts the pattern: the self-check (:func:`autoalign.check`) rotates every
pair of every rotary point at random angles and compares the outputs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .context import RuleContext

__all__ = ["rotary_candidates", "rotary_label"]

_aten = torch.ops.aten
_MULS = {operator.mul, torch.mul, _aten.mul.Tensor, "mul"}
_ADDS = {operator.add, torch.add, _aten.add.Tensor, "add"}
_JOINS = {torch.cat, torch.concat, torch.stack, _aten.cat.default, _aten.stack.default}
_NEGS = {operator.neg, torch.neg, _aten.neg.default, "neg"}
_RESHAPES = {
    torch.flatten, torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
    _aten.flatten.using_ints, "flatten", "view", "reshape",
}


def _is(node: Any, targets: set) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _looks_rotated(node: Any) -> bool:
    """Whether ``node`` is (a reshape of) a concatenation or stack with a negated input."""
    while _is(node, _RESHAPES):
        node = node.args[0]
    if not _is(node, _JOINS) or not node.args or not isinstance(node.args[0], (list, tuple)):
        return False
    return any(_is(a, _NEGS) for a in node.args[0])


def rotary_candidates(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
    """Sums that may be rotary embeddings, with their two products.

    Parameters
    ----------
    gm : fx.GraphModule
        A traced graph (either front end).

    Returns
    -------
    dict of fx.Node to (fx.Node, fx.Node)
        ``{sum: (product, product)}``; each product is used by its sum only, and one
        of their factors looks like ``rotate(x)``.
    """
    out: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for node in gm.graph.nodes:
        if not _is(node, _ADDS) or len(node.args) != 2 or any(k != "alpha" or v != 1 for k, v in node.kwargs.items()):
            continue
        a, b = node.args
        if not (_is(a, _MULS) and _is(b, _MULS)) or a is b or len(a.users) != 1 or len(b.users) != 1:
            continue
        if any(_looks_rotated(f) for m in (a, b) for f in m.args[:2]):
            out[node] = (a, b)
    return out


def _split(ctx: RuleContext, product: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(features, table)`` of a product: one factor tracked, the other an untracked tensor."""
    if len(product.args) != 2 or product.kwargs:
        return None
    tracked = []
    for f in product.args:
        lab = ctx.label(f) if isinstance(f, fx.Node) else None
        tracked.append(isinstance(lab, torch.Tensor) and bool((lab > 0).any()))
    if tracked.count(True) != 1:
        return None
    feat, table = product.args if tracked[0] else product.args[::-1]
    if not isinstance(table, fx.Node) or not isinstance(ctx.state.values.get(table), torch.Tensor):
        return None
    return feat, table


def _pairing(lab_x: torch.Tensor, lab_r: torch.Tensor) -> torch.Tensor | None:
    """The involution ``π`` of the last axis with ``lab_r[..., i] == lab_x[..., π(i)]``
    everywhere, or ``None`` when there is none (or it has a fixed point)."""
    d = lab_x.shape[-1]
    x, r = lab_x.reshape(-1, d), lab_r.reshape(-1, d)
    if not bool((x > 0).all()) or not bool((r > 0).all()):
        return None
    first = {int(v): j for j, v in enumerate(x[0].tolist())}
    if len(first) != d:
        return None
    try:
        pi = torch.tensor([first[int(v)] for v in r[0].tolist()])
    except KeyError:
        return None
    ar = torch.arange(d)
    if not torch.equal(r, x[:, pi]) or not torch.equal(pi[pi], ar) or bool((pi == ar).any()):
        return None
    return pi


def rotary_label(ctx: RuleContext, products: tuple[fx.Node, fx.Node]) -> torch.Tensor | None:
    """The label of a rotary sum (``ctx.node``), recording its coordinate pairs; ``None`` when
    the sum is not a rotary embedding (the caller then analyses its ops one by one).

    Parameters
    ----------
    ctx : RuleContext
        The context of the sum node.
    products : (fx.Node, fx.Node)
        Its two products, from :func:`rotary_candidates` (not yet analysed).
    """
    terms = [_split(ctx, m) for m in products]
    if terms[0] is None or terms[1] is None:
        return None
    values = ctx.state.values
    out = ctx.out
    for (x_node, c_node), (r_node, s_node) in (terms, terms[::-1]):
        x, r = values[x_node], values[r_node]
        lab_x, lab_r = ctx.label(x_node), ctx.label(r_node)
        if not (isinstance(out, torch.Tensor) and x.shape == r.shape == out.shape and lab_x.shape == x.shape):
            return None
        pi = _pairing(lab_x, lab_r)
        if pi is None:
            continue
        d = x.shape[-1]
        xs, rs = x.detach().double().reshape(-1, d), r.detach().double().reshape(-1, d)
        partner = xs[:, pi]
        sign = torch.sign((rs * partner).sum(0))
        if not torch.allclose(rs, sign * partner, rtol=1e-5, atol=1e-6) or not bool((sign[pi] * sign == -1).all()):
            continue  # rotate(x) must be a ±90° rotation of each pair, not a swap
        try:
            tables = [values[t].detach().double().expand(x.shape).reshape(-1, d) for t in (c_node, s_node)]
        except RuntimeError:
            return None
        if not all(torch.allclose(t, t[:, pi], rtol=1e-6, atol=1e-7) for t in tables):
            return None  # a pair whose two coordinates turn at different frequencies
        ids = torch.unique(lab_x.reshape(-1, d), dim=0)
        ctx.rotate_pairs(torch.stack([ids.reshape(-1), ids[:, pi].reshape(-1)], 1),
                         f"{ctx.describe()}: rotary position embedding (coordinate pairs turn together)")
        return lab_x.clone()
    return None
