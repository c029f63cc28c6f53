"""The multiply-add bound of a merge's statistics pass, from the merge itself.

A statistics pass runs every model forward over the calibration data and, at every merge
point (and every repair site it measures), takes feature products: per feature vector of
``d`` features, ``d²`` multiply-adds for each ``(d, d)`` block it computes. With
``needs="reference"`` (``procrustes``, ``cca``, ``permutation``, …) the blocks are, per
vector:

* full self-moments: the reference's square, and for every other model one product of
  the reference's and its features stacked against its own, its square and its cross
  block: ``(1 + 2 (N − 1)) d²``;
* variances only (``permutation``; ``procrustes`` at permutation points): the cross
  blocks, ``(N − 1) d²`` (the variances cost ``d`` per vector, not counted);
* a repair site with full moments: every model's square, ``N d²``.

The forward passes' own multiply-adds come from :class:`torch.utils.flop_counter.FlopCounterMode`
(convolutions, matrix products, attention). At equal speed per multiply-add, no pass that
computes those blocks exactly can take less than ``floor · (1 + G / F)``, with ``F`` the N
forward passes' multiply-adds and ``G`` the blocks'; ``statistics / bound`` is then what the
implementation adds (copies, float64 accumulation, tracing, the speed difference between a
convolution and a Gram product).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_macs", "gram_macs", "statistics_bound"]


def forward_macs(model: torch.nn.Module, data: Sequence[Any]) -> int:
    """Multiply-adds of one model's forward passes over ``data`` (a list of input batches)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for x in data:
            model(x[0] if isinstance(x, (tuple, list)) else x)
    return int(counter.get_total_flops()) // 2


def gram_macs(stats: Any, n_models: int) -> dict[str, int]:
    """Multiply-adds of the feature products behind ``stats`` (an :class:`autoalign.stats.Stats`
    of ``needs="reference"``): ``{"points": …, "repair_sites": …}``."""
    points = 0
    for name in stats.points:
        ps = stats[name]
        d = int(ps.sums[0].numel())
        full = ps.squares[0].dim() == 2
        blocks = (1 + 2 * (n_models - 1)) if full else (n_models - 1)
        points += int(ps.n) * d * d * blocks
    sites = 0
    for ps in (stats.modules or {}).values():
        d = int(ps.sums[0].numel())
        if ps.squares[0].dim() == 2:
            sites += int(ps.n) * d * d * n_models
    return {"points": points, "repair_sites": sites}


def statistics_bound(model: torch.nn.Module, data: Sequence[Any], stats: Any, n_models: int) -> dict[str, Any]:
    """The bound's parts for one merge: the multiply-adds and ``bound_over_floor = 1 + G / F``
    (times the N models' forward floor, the bound in seconds)."""
    fwd = forward_macs(model, data) * n_models
    gram = gram_macs(stats, n_models)
    total = gram["points"] + gram["repair_sites"]
    return {
        "forward_macs": fwd,
        "gram_macs_points": gram["points"],
        "gram_macs_repair_sites": gram["repair_sites"],
        "bound_over_floor": 1.0 + total / fwd if fwd else float("nan"),
    }
