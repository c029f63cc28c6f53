"""Cost of a merge against width d and number of models N: time and peak memory per phase.

For MLPs ``in -> d -> d -> 10`` (random weights, one seed per model: cost does
not depend on training) and random calibration inputs, every ``(d, N, aligner)``
is measured in a fresh subprocess:

* ``autoalign.merge_with_report(..., repair=None)`` — seconds of ``discover``,
  ``statistics``, ``solve``, ``apply`` from ``report.timings`` (best of
  ``--repeats``), and the peak memory of the whole merge;
* ``autoalign.collect_stats`` alone — its peak memory, and the size of the
  statistics it returns (``Stats.n_blocks() · d² · 8`` bytes plus the sums);
* the *floor*: running the N models' forward passes over the same calibration
  batches (no statistics), best of ``--repeats``;
* ``ratio = statistics seconds / floor seconds``.

Peak memory on CPU is the peak resident set size above the level just before the
phase, sampled every millisecond from ``/proc/self/statm`` by a helper thread
(``tracemalloc`` does not see PyTorch's tensor allocations, and
``resource.getrusage`` only gives a process-lifetime maximum). On CUDA it is
``torch.cuda.max_memory_allocated()`` above the level before the phase.

Minor page faults (``getrusage``) are counted for each floor run and each whole
merge run (columns "floor faults k" and "merge faults k", thousands per run). On
CPU they tell the allocator's part of a time: with glibc's default settings,
tensors of tens of MiB are served by fresh ``mmap`` mappings or trimmed heap, so every
touch of a new 4 KiB page faults (about 3 µs each here), and how often that
happens depends on what the process allocated before. Setting
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (recorded in the
command when set) makes glibc keep freed memory, for both sides alike.

Example (docs/results/cost.md; raw results in benchmarks/results/cost/)::

    nice -n 19 python benchmarks/cost.py --widths 128 256 512 1024 --n 2 4 8 \\
        --aligners cca permutation --samples 5000 --threads 1 --out benchmarks/out/cost

Writes ``cost.json``, ``cost.md`` and ``cost.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402

__all__ = ["PeakMemory", "measure", "run_all", "to_markdown", "plot", "main"]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:  # not Linux: fall back to the lifetime maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Hand memory the process freed back to the OS (glibc ``malloc_trim``), so the next
    phase's allocations raise the resident size instead of reusing freed pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then read low
        pass


class PeakMemory:
    """Context manager: peak memory above the level at entry, in bytes (``.peak``).

    CPU: resident set size sampled every ``interval`` seconds by a thread, after freed memory is
    handed back to the OS (``malloc_trim``). CUDA:
    ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.001) -> None:
        self.cuda = str(device).startswith("cuda")
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim()
            self.base = _rss()
            self._max = self.base
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = self._max - self.base


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or None where unavailable."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError):
        return None


def _faults_during(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    before = _minor_faults()
    out = fn()
    after = _minor_faults()
    return out, None if before is None or after is None else after - before


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best_of(repeats: int, fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


#: Models ``--model`` can build, and what ``--widths`` means for each.
MODELS = {
    "mlp": "MLP in_features-d-d-10 (d = width)",
    "smallcnn": "SmallCNN of width d (channels d, d, 2d, 2d) on 3x32x32 inputs",
    "resnet20": "ResNet20 with width multiplier d (stage widths 16d, 32d, 64d) on 3x32x32 inputs",
    "vgg11": "VGG11 with width multiplier d (64d ... 512d channels) on 3x32x32 inputs",
}


def make_models(width: float, n: int, in_features: int, device: str, model: str = "mlp") -> list[torch.nn.Module]:
    """``n`` models with different random initialisations (see :data:`MODELS` for ``width``)."""
    from benchmarks.models import MLP, ResNet20, SmallCNN, VGG11

    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        if model == "smallcnn":
            m = SmallCNN(3, 10, width=int(width))
        elif model == "resnet20":
            m = ResNet20(10, width_multiplier=width)
        elif model == "vgg11":
            m = VGG11(3, 10, width_multiplier=width, input_size=32)
        else:
            m = MLP(in_features, (int(width), int(width)), 10)
        models.append(m.to(device).eval())
    return models


def make_data(samples: int, batch: int, in_features: int, device: str, model: str = "mlp") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random calibration batches ``(x, y)`` (a list: re-iterable, already on ``device``)."""
    g = torch.Generator().manual_seed(0)
    shape = (in_features,) if model == "mlp" else (3, 32, 32)
    x = torch.randn(samples, *shape, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, samples, batch)]


def forward_floor(models: Sequence[torch.nn.Module], data: Sequence[Any]) -> None:
    """What statistics collection cannot beat: every model's forward pass over every batch."""
    with torch.no_grad():
        for x, _ in data:
            for m in models:
                m(x)


def measure(
    width: float,
    n: int,
    aligner: str,
    *,
    samples: int = 5000,
    batch: int = 500,
    in_features: int = 784,
    repeats: int = 2,
    device: str = "cpu",
    model: str = "mlp",
) -> dict[str, Any]:
    """Time and memory of one ``(width, N, aligner)`` merge (run it in a fresh process for clean memory figures)."""
    models = make_models(width, n, in_features, device, model)
    data = make_data(samples, batch, in_features, device, model)
    forward_floor(models, data[:1])  # warm-up
    spec = autoalign.find_merge_points(models[0], data[0][0])
    al = autoalign.get_aligner(aligner)

    with PeakMemory(device) as mem_stats:  # the statistics merge() collects for this aligner
        stats = autoalign.collect_stats(models, data, spec, needs=al.needs, reference=0, self_moments=al.self_moments)
    stats_bytes = 0
    for p in stats.points.values():
        stats_bytes += sum(t.numel() * t.element_size() for t in [*p.sums, *p.squares, *p.cross.values()])
    n_blocks = stats.n_blocks()
    del stats

    with PeakMemory(device) as mem_merge:
        autoalign.merge_with_report(models, data, aligner=aligner, repair=None, spec=spec)
    # forward floor and merge interleaved, best of each: a machine shared with other jobs
    # slows both alike within a repeat, and the best repeat is the least disturbed
    timings: dict[str, float] = {}
    floors: list[float] = []
    stats_runs: list[float] = []
    floor_faults: list[int | None] = []
    merge_faults: list[int | None] = []
    for _ in range(repeats):
        (sec, _), faults = _faults_during(lambda: _best_of(1, lambda: forward_floor(models, data), device))
        floors.append(sec)
        floor_faults.append(faults)
        res, faults = _faults_during(lambda: autoalign.merge_with_report(models, data, aligner=aligner, repair=None, spec=spec))
        merge_faults.append(faults)
        for k, v in res.report.timings.items():
            timings[k] = min(timings.get(k, float("inf")), float(v))
        stats_runs.append(float(res.report.timings.get("statistics", float("nan"))))
    del res
    floor = min(floors)
    return {
        "model": model,
        "width": width,
        "n": n,
        "aligner": aligner,
        "needs": al.needs,
        "self_moments": al.self_moments,
        "samples": samples,
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "timings": timings,
        "floor_seconds": floor,
        "floor_runs": floors,
        "statistics_runs": stats_runs,
        # minor page faults (getrusage) during each floor run and each whole merge run: on CPU,
        # touching memory the allocator got fresh from the OS costs one per 4 KiB page
        "floor_minor_faults": floor_faults,
        "merge_minor_faults": merge_faults,
        "stats_over_floor": timings.get("statistics", float("nan")) / floor if floor > 0 else float("nan"),
        "stats_peak_bytes": int(mem_stats.peak),
        "merge_peak_bytes": int(mem_merge.peak),
        "stats_result_bytes": int(stats_bytes),
        "stats_blocks": int(n_blocks),
    }


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
        sec, _ = _best_of(3, lambda: [fn() for _ in range(reps)], device)
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


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every ``(aligner, width, N)`` in a fresh subprocess (``--worker``)."""
    rows = []
    for aligner in args.aligners:
        for width in args.widths:
            for n in args.n:
                cmd = [
                    sys.executable, __file__, "--worker", "--widths", str(width), "--n", str(n), "--aligners", aligner,
                    "--samples", str(args.samples), "--batch", str(args.batch), "--in-features", str(args.in_features),
                    "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
                    "--model", args.model,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker failed for {aligner} d={width} N={n}:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                t = row["timings"]
                print(
                    f"{aligner:12s} d={width:g} N={n:2d} stats={t.get('statistics', 0):7.3f}s floor={row['floor_seconds']:7.3f}s "
                    f"ratio={row['stats_over_floor']:5.2f} solve={t.get('solve', 0):7.3f}s apply={t.get('apply', 0):6.3f}s "
                    f"stats_mem={row['stats_peak_bytes'] / 2**20:7.1f}MiB merge_mem={row['merge_peak_bytes'] / 2**20:7.1f}MiB "
                    f"faults k floor={_kilo(row.get('floor_minor_faults'))} merge={_kilo(row.get('merge_minor_faults'))}",
                    flush=True,
                )
                rows.append(row)
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _kilo(runs: Sequence[int | None] | None) -> str:
    """Page faults of each run in thousands, e.g. ``0/131/393`` ("–" where not recorded)."""
    if not runs or any(r is None for r in runs):
        return "–"
    return "/".join(f"{r / 1000:.0f}" for r in runs)


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}.  ",
        (f"Models: MLP {result['in_features']}-d-d-10" if result.get("model", "mlp") == "mlp"
         else f"Models: {MODELS[result['model']]}")
        + f" with random weights; calibration: {result['samples']} random "
        f"inputs in batches of {result['batch']}; times are the best of {result['repeats']} runs; repair off.",
        "",
        "| aligner | d | N | statistics s | forward floor s | stats / floor | solve s | apply s "
        "| stats peak MiB | stats held MiB | merge peak MiB | floor faults k | merge faults k |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["timings"]
        lines.append(
            f"| {r['aligner']} | {r['width']:g} | {r['n']} | {t.get('statistics', 0):.3f} | {r['floor_seconds']:.3f} "
            f"| {r['stats_over_floor']:.2f} | {t.get('solve', 0):.3f} | {t.get('apply', 0):.3f} "
            f"| {_mib(r['stats_peak_bytes'])} | {_mib(r['stats_result_bytes'])} | {_mib(r['merge_peak_bytes'])} "
            f"| {_kilo(r.get('floor_minor_faults'))} | {_kilo(r.get('merge_minor_faults'))} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Three panels against d: statistics/floor ratio, solve seconds, statistics peak memory (per N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    aligners = sorted({r["aligner"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for ai, a in enumerate(aligners):
        for n in sorted({r["n"] for r in rows}):
            sel = sorted((r for r in rows if r["aligner"] == a and r["n"] == n), key=lambda r: r["width"])
            if not sel:
                continue
            ws = [r["width"] for r in sel]
            kw = dict(marker="o", linestyle=styles[ai % len(styles)], label=f"{a}, N={n}")
            axes[0].plot(ws, [r["stats_over_floor"] for r in sel], **kw)
            axes[1].plot(ws, [r["timings"].get("solve", 0) for r in sel], **kw)
            axes[2].plot(ws, [r["stats_peak_bytes"] / 2**20 for r in sel], **kw)
    axes[0].axhline(1.5, color="red", linewidth=0.8, label="1.5× target")
    axes[0].set_ylabel("statistics time / forward-pass time")
    axes[1].set_ylabel("solve seconds")
    axes[2].set_ylabel("statistics peak memory (MiB)")
    for ax in axes:
        ax.set_xlabel("width d")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=float, nargs="+", default=[128, 256, 512, 1024],
                    help="MLP / SmallCNN width d, or ResNet20 / VGG11 width multiplier")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--aligners", nargs="+", default=["cca", "permutation"])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--in-features", type=int, default=784)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp",
                    help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/out/cost")
    ap.add_argument("--profile", action="store_true",
                    help="profile collect_stats for the first width / N / aligner instead of the sweep")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        row = measure(
            args.widths[0], args.n[0], args.aligners[0], samples=args.samples, batch=args.batch,
            in_features=args.in_features, repeats=args.repeats, device=args.device, model=args.model,
        )
        print(json.dumps(row))
        return 0
    if args.profile:
        text = profile_stats(int(args.widths[0]), args.n[0], args.aligners[0], samples=args.samples, batch=args.batch,
                             in_features=args.in_features, device=args.device)
        print(text)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_d{int(args.widths[0])}_n{args.n[0]}_{args.aligners[0]}.txt").write_text(text + "\n")
        return 0
    from benchmarks.merge_accuracy import machine_line

    rows = run_all(args)
    # glibc's malloc settings change the result: with its defaults, large tensors get fresh pages
    # (page faults) from batch to batch; the command records any MALLOC_* variables it ran under
    malloc_env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    result = {
        "command": (malloc_env + " " if malloc_env else "") + "python benchmarks/cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(args.device, args.threads),
        "torch": torch.__version__,
        "samples": args.samples,
        "batch": args.batch,
        "in_features": args.in_features,
        "model": args.model,
        "repeats": args.repeats,
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    (out / "cost.md").write_text(to_markdown(result))
    plot(result, out / "cost.png")
    print(to_markdown(result))
    print(f"wrote {out}/cost.json, cost.md, cost.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
