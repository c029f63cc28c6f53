"""``python benchmarks/cost.py --profile``: where ``collect_stats`` spends its time on an MLP."""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from benchmarks.cost_measure import best_of, make_data, make_models  # noqa: E402

__all__ = ["profile_stats"]


def profile_stats(width: int, n: int, aligner: str = "cca", *, samples: int = 5000, batch: int = 500,
                  in_features: int = 784, device: str = "cpu", top: int = 12) -> str:
    """Where ``collect_stats`` spends its time: a ``torch.profiler`` table of the top
    operators, and micro-benchmarks of one batch's Gram product in float64 (what
    stats.py does) against float32 and against the layer's own forward product."""
    from torch.profiler import ProfilerActivity, profile

    models = make_models(width, n, in_features, device)
    data = make_data(samples, batch, in_features, device)
    spec = autoalign.find_merge_points(models[0], data[0][0])
    al = autoalign.get_aligner(aligner)
    needs, moments = al.needs, al.self_moments
    autoalign.collect_stats(models, data[:1], spec, needs=needs, self_moments=moments)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=acts) as prof:
        autoalign.collect_stats(models, data, spec, needs=needs, self_moments=moments)
    lines = [f"collect_stats, MLP {in_features}-{width}-{width}-10, N={n}, {aligner} ({needs}, self_moments={moments}), "
             f"{samples} samples in batches of {batch}:", "",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)]
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(batch, width, generator=g).to(device)
    x64 = x32.double()
    w = torch.randn(width, width, generator=g).to(device)
    reps = 20

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        sec, _ = best_of(3, lambda: [fn() for _ in range(reps)], device)
        return 1e3 * sec / reps

    acc = torch.zeros(width, width, dtype=torch.float64, device=device)
    rows = {
        "forward product x @ W^T (float32, b x d x d)": timed(lambda: torch.nn.functional.linear(x32, w)),
        "Gram x^T x in float64 (stats.py before float32 products)": timed(lambda: x64.T @ x64),
        "float32 -> float64 copy of x": timed(lambda: x32.to(torch.float64)),
        "Gram x^T x in float32 (stats.py)": timed(lambda: x32.T @ x32),
        "acc += x^T x (float64, temporary)": timed(lambda: acc.add_(x64.T @ x64)),
        "acc.addmm_(x^T, x) (float64, in place)": timed(lambda: acc.addmm_(x64.T, x64)),
        "acc += (x32^T x32).double() (float32 product)": timed(lambda: acc.add_((x32.T @ x32).double())),
    }
    lines += ["", f"One batch (b = {batch}, d = {width}), milliseconds per call:", ""]
    lines += [f"  {v:8.3f} ms  {k}" for k, v in rows.items()]
    return "\n".join(lines)

