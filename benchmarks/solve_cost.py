"""Cost of one aligner's solve at width d for N models, next to the LAPACK steps it is made of.

For each width ``d`` a synthetic merge point with N models is built from random features
(``--samples`` rows, a shared latent part so that the models correlate), its statistics are
collected by :func:`autoalign.collect_stats` on a one-layer model, and ``Aligner.solve`` is
timed (best of ``--repeats``). Next to it, the float64 primitives one CCA solve per model is
made of at that width: ``eigh``, ``svd``, a matrix product.

Example (docs/results/cost.md)::

    python benchmarks/solve_cost.py --widths 512 1024 2048 --n 8 --aligners cca procrustes \\
        --threads 2 --out benchmarks/out/solve_cost

Writes ``solve_cost.json`` and ``solve_cost.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.aligners import AlignProblem  # noqa: E402

__all__ = ["best_of", "primitives", "solve_seconds", "main"]


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def primitives(d: int, repeats: int) -> dict[str, float]:
    """Seconds of float64 ``eigh``, ``svd`` and a product of (d, d) matrices on this machine."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    s = a @ a.T / d
    return {
        "eigh": best_of(lambda: torch.linalg.eigh(s), repeats),
        "svd": best_of(lambda: torch.linalg.svd(a), repeats),
        "matmul": best_of(lambda: a @ a, repeats),
    }


def solve_seconds(d: int, n_models: int, aligner: str, samples: int, repeats: int) -> float:
    """Seconds of ``aligner``'s solve of one width-``d`` point for ``n_models`` models."""
    g = torch.Generator().manual_seed(0)
    nets = []
    for m in range(n_models):
        net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))
        with torch.no_grad():
            net[0].weight.copy_(torch.linalg.qr(torch.randn(d, d, generator=g))[0] + 0.3 * torch.randn(d, d, generator=g) / d**0.5)
        nets.append(net.eval())
    data = [torch.randn(min(samples, 2048), d, generator=g) for _ in range(max(1, samples // 2048))]
    spec = autoalign.find_merge_points(nets[0], data[0][:2])
    al = autoalign.get_aligner(aligner)
    stats = autoalign.collect_stats(nets, data, spec, needs=al.needs, self_moments=al.self_moments)
    sds = [{k: v.detach() for k, v in net.state_dict().items()} for net in nets]
    w = torch.full((n_models,), 1.0 / n_models, dtype=torch.float64)
    problem = AlignProblem(spec, sds, 0, w, stats, frozenset())
    return best_of(lambda: al.solve(problem), repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--aligners", nargs="+", default=["cca"])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out/solve_cost"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.widths:
        prim = primitives(d, args.repeats)
        for aligner in args.aligners:
            sec = solve_seconds(d, args.n, aligner, args.samples, args.repeats)
            rows.append({"d": d, "n": args.n, "aligner": aligner, "solve_s": sec, "per_model_s": sec / (args.n - 1), **prim})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    meta = {
        "command": "python " + " ".join(sys.argv), "cpu": cpu, "threads": args.threads, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    (args.out / "solve_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"`{meta['command']}` — {cpu}, {args.threads} threads, torch {torch.__version__}, {meta['date']}", "",
        "| d | N | aligner | solve s | per model s | eigh s | svd s | matmul s |", "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['d']} | {r['n']} | {r['aligner']} | {r['solve_s']:.3f} | {r['per_model_s']:.3f} | {r['eigh']:.3f} | {r['svd']:.3f} | {r['matmul']:.3f} |"
        for r in rows
    ]
    (args.out / "solve_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
