"""Where a statistics pass spends its time beyond the forward passes, timed part by part.

``torch.profiler`` (``benchmarks/cost.py --profile``) inflates small operations — at
MLP sizes a 13 µs elementwise product shows as ~200 µs — so this script times the
parts directly instead, each the best of ``--repeats`` runs in one process:

* ``floor``: the N models' plain forward passes over the calibration batches;
* ``tapped forward``: the traced copies ``collect_stats`` runs, with taps that do nothing
  (they stop after the last merge point, so they may skip the head);
* ``per-site work``: ``_Moments.add_model`` on one batch's features of each point,
  repeated for every batch, for an all-to-one pass of N models (shifted copies,
  sums, products, float64 accumulation);
* ``Gram products``: the (d, d) products of that work alone (N − 1 cross blocks per
  point with ``--self-moments diagonal``, N squares and N − 1 cross blocks with ``full``);
* ``tracing``: building the N tapped copies (once per ``collect_stats`` call);
* ``collect_stats``: the whole pass.

MLPs only (the per-site work is timed on stand-in features of the point's width).

Example (the numbers quoted in the Cost section of docs/results.md)::

    python benchmarks/stats_breakdown.py --width 256 --n 2 --self-moments diagonal
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
import autoalign.stats as stats_mod  # noqa: E402
from benchmarks.cost import forward_floor, make_data, make_models  # noqa: E402


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * min(times)


def run(
    width: int, n: int, *, self_moments: str = "diagonal", samples: int = 5000, batch: int = 500,
    in_features: int = 784, repeats: int = 5,
) -> list[tuple[str, float]]:
    """``(part, milliseconds)`` for each part listed in the module docstring."""
    models = make_models(width, n, in_features, "cpu", "mlp")
    data = make_data(samples, batch, in_features, "cpu", "mlp")
    spec = autoalign.find_merge_points(models[0], data[0][0])
    points = [p for p in spec.points if p.kind != "frozen" and p.sites]
    nodes = sorted({s.node for p in points for s in stats_mod._sites_for(p)})
    sink = stats_mod._Sink()
    sink.fn = lambda name, value: None
    tapped = [stats_mod._tapped_module(m, data[0][0], nodes, sink) for m in models]
    diagonal = self_moments == "diagonal"
    pairs = stats_mod.pairs_for("reference", n, 0)
    feats = {p.name: torch.relu(torch.randn(batch, p.dim, generator=torch.Generator().manual_seed(0))) for p in points}

    def per_site(products_only: bool) -> None:
        moments = {p.name: stats_mod._Moments(n, p.dim, pairs, torch.device("cpu"), diagonal) for p in points}
        for _ in data:
            for p in points:
                x = feats[p.name]
                if products_only:
                    for _m in range(n - 1 if diagonal else 2 * n - 1):
                        x.T @ x
                    continue
                _, kept = moments[p.name].add_model(0, x, False, count=True, keep=True)
                for m in range(1, n):
                    moments[p.name].add_model(m, x, False, partners={0: kept})

    with torch.no_grad():
        return [
            ("floor", _best_ms(lambda: forward_floor(models, data), repeats)),
            ("tapped forward", _best_ms(lambda: [t(x) for x, _ in data for t in tapped], repeats)),
            ("per-site work", _best_ms(lambda: per_site(False), repeats)),
            ("Gram products", _best_ms(lambda: per_site(True), repeats)),
            ("tracing", _best_ms(lambda: [stats_mod._tapped_module(m, data[0][0], nodes, sink) for m in models], repeats)),
            ("collect_stats", _best_ms(
                lambda: autoalign.collect_stats(models, data, spec, needs="reference", self_moments=self_moments), repeats
            )),
        ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--self-moments", choices=("full", "diagonal"), default="diagonal")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.width, args.n, self_moments=args.self_moments, samples=args.samples, batch=args.batch,
               repeats=args.repeats)
    floor = rows[0][1]
    print(f"MLP 784-{args.width}-{args.width}-10, N={args.n}, self_moments={args.self_moments}, "
          f"{args.samples} samples in batches of {args.batch}, best of {args.repeats}, {args.threads} thread(s):")
    for name, ms in rows:
        print(f"  {name:<16} {ms:9.1f} ms  ({ms / floor:.2f} x floor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
