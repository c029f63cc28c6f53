"""Streaming feature statistics: one pass over calibration data for all models.

For every merge point with an observable site, and every model ``m``, the pass
accumulates in float64 on the models' device, about a per-model shift ``c_m``
(the first chunk's mean; see :class:`PointStats`)

* ``n`` — the number of samples (batch × spatial positions × replicas × sites),
* ``s_m = Σ (x_m − c_m)`` — shape ``(d,)``,
* ``Q_mm = Σ (x_m − c_m)(x_m − c_m)ᵀ`` — shape ``(d, d)``,
* ``Q_ij = Σ (x_i − c_i)(x_j − c_j)ᵀ`` — only for the model pairs the aligner asks for.

The products behind the sums are taken chunk by chunk in float32 (float64 for
float64 models, or with ``precision="float64"``) on features minus a per-model
shift, and added to float64 accumulators: about twice as fast as float64
products on CPU, with relative error ~1e-7 · √(samples per chunk) — far below
what CCA's default ridge tolerates; exact-recovery work at ``ridge=0`` on
ill-conditioned features wants float64.

Per batch the models run one after another (the reference first) through
traced copies with a tap after every site node: a site's products are taken as
soon as the forward pass computes it, and only the features a later model
pairs with are kept until the batch is done — the reference's alone for
all-to-one aligners (in buffers twice as wide: a later model's chunk is
written next to it, so one product gives that model's square and cross
block). Feature memory is thus the reference's features plus one forward
pass's working set, whatever N; the statistics themselves are ``O(N d²)`` per
point for all-to-one aligners (``O(N² d²)`` for all pairs). Conv maps are
copied feature-major, ``(channels, samples·positions)``, so each chunk's Gram is
one plain matrix product.

These sums are sufficient statistics: under ``torch.distributed`` each process
feeds its shard and the sums are all-reduced, so every process solves the same
plan.

The package: :mod:`~autoalign.stats.results` (what the pass returns),
:mod:`~autoalign.stats.moments` (the shifted moments and their reduction over
processes), :mod:`~autoalign.stats.collect` (the pass). Features are read by
the taps of :mod:`autoalign.capture`.
"""

from .collect import collect_stats, feed_order, pairs_for, sites_for
from .results import PointStats, Stats

__all__ = ["PointStats", "Stats", "collect_stats", "pairs_for", "sites_for", "feed_order"]
