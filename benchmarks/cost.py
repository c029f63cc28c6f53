"""Cost of a whole merge against the forward floor: time per stage and peak memory.

Two modes, each configuration in a fresh subprocess (``--worker``):

**torchvision mode** (``--torchvision resnet18 resnet50 vgg11_bn mobilenet_v2 vit_b_16``):
N randomly initialised ``torchvision.models`` (10 classes, seeds 0 … N − 1; ViTs get
``image_size``) and ``--batches`` random batches of ``--batch-size`` images of
``--image-size`` pixels. For every ``(model, N, aligner)`` (``--aligners default`` is the
library's default aligner): the floor (every model's forward pass over the same batches),
one whole ``autoalign.merge_with_report`` (default repair unless ``--repair``), its
wall clock, every stage of ``report.timings``, total / floor, and the peak memory of the
floor and of the merge. Example (2 threads, as the issue's reference setting)::

    python benchmarks/cost.py --torchvision resnet18 resnet50 vgg11_bn mobilenet_v2 vit_b_16 \\
        --n 2 4 8 --aligners default permutation --image-size 64 --batches 8 --batch-size 32 \\
        --threads 2 --repeats 1 --out benchmarks/out/cost_torchvision

``--device cuda`` moves models and data to the GPU, passes ``device=`` to the merge, waits
for the GPU around every timing (each stage of ``report.timings`` too) and reads memory
from ``torch.cuda.max_memory_allocated``. ``--timeout`` bounds each configuration; a failed
or timed-out one becomes a row saying so. Results are rewritten after every configuration.

**MLP / small-net mode** (``--model``, ``--widths``): for MLPs ``in -> d -> d -> 10``
(random weights, one seed per model: cost does not depend on training) and random
calibration inputs, every ``(d, N, aligner)`` is measured in a fresh subprocess:

* ``autoalign.merge_with_report(...)`` (repair: ``--repair``, the library's default
  ``auto`` unless set; ``none`` turns it off) — its wall clock and the seconds of every
  stage (``discover``, ``statistics``, ``solve``, ``apply``, ``repair``) from
  ``report.timings`` (best of ``--repeats``), and the peak memory of the whole merge;
* ``autoalign.collect_stats`` alone — its peak memory, and the size of the
  statistics it returns (``Stats.n_blocks() · d² · 8`` bytes plus the sums);
* the *floor*: running the N models' forward passes over the same calibration
  batches (no statistics), best of ``--repeats``;
* ``stats / floor`` and ``total / floor`` (whole merge, every stage, against the floor).

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

Both modes write ``cost.json`` (every raw number, the command, the machine: CPU model,
logical CPUs, torch version, GPU; the date), ``cost.md`` (the table) and
``cost_stages.png`` (stacked stage seconds and the floor against N per model, or against
width per N); the MLP mode also ``cost.png`` (stats / floor, solve, memory against width).
Tables and plots: ``benchmarks/cost_report.py``; measurements: ``benchmarks/cost_measure.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.cost_measure import (  # noqa: E402
    MODELS, TORCHVISION, PeakMemory, forward_floor, make_data, make_models, measure, measure_torchvision,
    resolve_device,
)
from benchmarks.cost_profile import profile_stats  # noqa: E402
from benchmarks.cost_report import kilo, plot, plot_stages, to_markdown, torchvision_markdown  # noqa: E402

__all__ = [
    "PeakMemory", "measure", "measure_torchvision", "profile_stats", "run_all", "run_torchvision",
    "to_markdown", "torchvision_markdown", "plot", "plot_stages", "environment", "main",
    "make_models", "make_data", "forward_floor",
]


def _worker(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run ``cost.py --worker ARGS`` in a fresh process; its last stdout line is the row.

    Returns ``{"error": ...}`` when the worker fails or runs past ``timeout`` seconds.
    """
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                              check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": tail[0][:200], "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _common(args: argparse.Namespace) -> list[str]:
    return ["--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
            "--repair", args.repair]


def run_all(args: argparse.Namespace, on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """MLP / small-net mode: every ``(aligner, width, N)`` in a fresh subprocess (``--worker``).

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line (:func:`parser`).
    on_row : callable, optional
        Called with the rows so far after each configuration.

    Returns
    -------
    list of dict
        One row per configuration (:func:`benchmarks.cost_measure.measure`).
    """
    rows = []
    for aligner in args.aligners:
        for width in args.widths:
            for n in args.n:
                row = _worker(["--widths", str(width), "--n", str(n), "--aligners", aligner, "--samples", str(args.samples),
                               "--batch", str(args.batch), "--in-features", str(args.in_features), "--model", args.model,
                               *_common(args)], args.timeout)
                if "error" in row:
                    raise RuntimeError(f"worker failed for {aligner} d={width} N={n}: {row['error']}\n{row.get('stderr', '')}")
                t = row["timings"]
                print(
                    f"{aligner:12s} d={width:g} N={n:2d} floor={row['floor_seconds']:7.3f}s total={row['total_seconds']:7.3f}s "
                    f"({row['total_over_floor']:5.2f}x) stats={t.get('statistics', 0):7.3f}s ({row['stats_over_floor']:5.2f}x) "
                    f"solve={t.get('solve', 0):7.3f}s apply={t.get('apply', 0):6.3f}s repair={t.get('repair', 0):6.3f}s "
                    f"stats_mem={row['stats_peak_bytes'] / 2**20:7.1f}MiB merge_mem={row['merge_peak_bytes'] / 2**20:7.1f}MiB "
                    f"faults k floor={kilo(row.get('floor_minor_faults'))} merge={kilo(row.get('merge_minor_faults'))}",
                    flush=True,
                )
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def run_torchvision(args: argparse.Namespace,
                    on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """torchvision mode: every ``(model, N, aligner)`` in a fresh subprocess (``--worker``).

    A configuration that fails (out of memory, an untraceable model) or runs past
    ``--timeout`` becomes a row with ``error`` instead of ending the sweep.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line (:func:`parser`).
    on_row : callable, optional
        Called with the rows so far after each configuration.

    Returns
    -------
    list of dict
        One row per configuration (:func:`benchmarks.cost_measure.measure_torchvision`).
    """
    rows = []
    for name in args.torchvision:
        for n in args.n:
            for aligner in args.aligners:
                row = _worker(["--torchvision", name, "--n", str(n), "--aligners", aligner, "--image-size",
                               str(args.image_size), "--batches", str(args.batches), "--batch-size",
                               str(args.batch_size), *_common(args)], args.timeout)
                if "error" in row:
                    row = {"torchvision": name, "n": n, "aligner": aligner, **row}
                    print(f"{name:14s} N={n:2d} {aligner:12s} FAILED: {row['error']}", flush=True)
                else:
                    stages = " ".join(f"{k}={v:.2f}" for k, v in row["timings"].items())
                    print(f"{name:14s} N={n:2d} {aligner:12s} floor={row['floor_seconds']:.2f}s "
                          f"total={row['total_seconds']:.2f}s ({row['total_over_floor']:.1f}x) {stages} "
                          f"other={row['other_seconds']:.2f} floor_mem={row['floor_peak_bytes'] / 2**20:.0f}MiB "
                          f"merge_mem={row['merge_peak_bytes'] / 2**20:.0f}MiB", flush=True)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def environment(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The command (with any ``MALLOC_*`` variables it ran under), the machine and the date.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line.
    argv : sequence of str or None
        The arguments given to :func:`main` (``sys.argv[1:]`` when None).

    Returns
    -------
    dict
        ``command``, ``date``, ``machine`` (one line), ``cpu``, ``logical_cpus``, ``gpu``,
        ``torch``, ``torchvision``, ``load_average``.
    """
    from benchmarks.merge_accuracy import cpu_name, machine_line

    try:
        import torchvision

        tv_version: str | None = torchvision.__version__
    except ImportError:
        tv_version = None
    # glibc's malloc settings change the result: with its defaults, large tensors get fresh pages
    # (page faults) from batch to batch; the command records any MALLOC_* variables it ran under
    malloc_env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    cuda = str(args.device).startswith("cuda") and torch.cuda.is_available()
    return {
        "command": (malloc_env + " " if malloc_env else "") + "python benchmarks/cost.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(args.device, args.threads),
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "torchvision": tv_version,
        # other work on the machine slows every stage alike but the floor was measured in the same
        # subprocess: the 1-minute load average at the start tells how busy the machine was
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torchvision", nargs="+", metavar="MODEL",
                    help=f"torchvision mode: these torchvision.models builders (e.g. {' '.join(TORCHVISION)})")
    ap.add_argument("--image-size", type=int, default=64, help="torchvision mode: input side (ViTs are built for it)")
    ap.add_argument("--batches", type=int, default=8, help="torchvision mode: calibration batches")
    ap.add_argument("--batch-size", type=int, default=32, help="torchvision mode: images per batch")
    ap.add_argument("--widths", type=float, nargs="+", default=[128, 256, 512, 1024],
                    help="MLP / SmallCNN width d, or ResNet20 / VGG11 width multiplier")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--aligners", nargs="+", default=None,
                    help="aligner names; 'default' is the library's default (default: cca permutation, "
                    "torchvision mode: default permutation)")
    ap.add_argument("--repair", default="auto", help="repair of the merge: auto (the library's default), none, reset_bn, repair")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--in-features", type=int, default=784)
    ap.add_argument("--repeats", type=int, default=None, help="floor / merge repeats (default 2, torchvision mode 1)")
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp",
                    help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed to each configuration's subprocess")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out/cost, "
                    "torchvision mode benchmarks/out/cost_torchvision)")
    ap.add_argument("--profile", action="store_true",
                    help="profile collect_stats for the first width / N / aligner instead of the sweep")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def _write(out: pathlib.Path, result: dict[str, Any], final: bool) -> str:
    """Write cost.json and cost.md (and, when ``final``, the plots); return the table."""
    tv = "image_size" in result
    md = (torchvision_markdown if tv else to_markdown)(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    (out / "cost.md").write_text(md)
    if final:
        if tv:
            plot_stages(result["rows"], out / "cost_stages.png", x_key="n", x_label="N models", panel_key="torchvision")
        else:
            plot(result, out / "cost.png")
            plot_stages(result["rows"], out / "cost_stages.png", x_key="width", x_label="width d", panel_key="n")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one configuration, printing its row as JSON)."""
    args = parser().parse_args(argv)
    tv = bool(args.torchvision)
    args.aligners = args.aligners or (["default", "permutation"] if tv else ["cca", "permutation"])
    args.repeats = args.repeats or (1 if tv else 2)
    torch.set_num_threads(args.threads)
    if args.worker:
        args.device = resolve_device(args.device)
        if tv:
            row = measure_torchvision(args.torchvision[0], args.n[0], args.aligners[0], image_size=args.image_size,
                                      batches=args.batches, batch_size=args.batch_size, repeats=args.repeats,
                                      device=args.device, repair=args.repair)
        else:
            row = measure(args.widths[0], args.n[0], args.aligners[0], samples=args.samples, batch=args.batch,
                          in_features=args.in_features, repeats=args.repeats, device=args.device, model=args.model,
                          repair=args.repair)
        print(json.dumps(row))
        return 0
    out = pathlib.Path(args.out or ("benchmarks/out/cost_torchvision" if tv else "benchmarks/out/cost"))
    if args.profile:
        text = profile_stats(int(args.widths[0]), args.n[0], args.aligners[0], samples=args.samples, batch=args.batch,
                             in_features=args.in_features, device=args.device)
        print(text)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_d{int(args.widths[0])}_n{args.n[0]}_{args.aligners[0]}.txt").write_text(text + "\n")
        return 0
    result = {**environment(args, argv), "device": args.device, "repair": args.repair, "repeats": args.repeats}
    if tv:
        result.update(image_size=args.image_size, batches=args.batches, batch_size=args.batch_size, num_classes=10)
    else:
        result.update(samples=args.samples, batch=args.batch, in_features=args.in_features, model=args.model)

    def on_row(rows: list[dict[str, Any]]) -> None:
        _write(out, {**result, "rows": rows}, final=False)

    rows = (run_torchvision if tv else run_all)(args, on_row)
    md = _write(out, {**result, "rows": rows}, final=True)
    print(md)
    print(f"wrote {out}/cost.json, cost.md, " + ("cost_stages.png" if tv else "cost.png, cost_stages.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
