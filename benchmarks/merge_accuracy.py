"""Merged test accuracy for every aligner, against N, next to the ensemble and the base models.

Example (the MNIST smoke setting of docs/results.md)::

    python benchmarks/merge_accuracy.py --dataset mnist --arch mlp --hidden 512 512 \\
        --seeds 0 1 2 3 4 5 6 7 --n 2 4 8 --draws 3 --epochs 5 --data-root ../shared/data \\
        --out benchmarks/out/mnist_mlp

Trains (or reuses cached) base models with ``benchmarks/train.py``, then for each N
and each draw of N models merges them with every requested aligner (with and
without repair where the model has BatchNorm) and evaluates on the test set.
Writes ``results.json``, ``results.md`` (mean ± std over draws, and every draw)
and ``accuracy_vs_n.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Any, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.datasets import load_dataset, make_loader  # noqa: E402
from autoalign.repair import has_batchnorm  # noqa: E402
from benchmarks.train import evaluate, load_checkpoint, train_models  # noqa: E402


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ensemble_accuracy(models: Sequence[torch.nn.Module], loader: Any, device: str) -> float:
    correct = total = 0
    with torch.no_grad():
        for m in models:
            m.eval()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = torch.stack([m(x) for m in models]).mean(0)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return correct / total


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    arch_kw: dict[str, Any] = {}
    if args.hidden:
        arch_kw["hidden"] = tuple(args.hidden)
    paths = train_models(
        args.dataset, args.arch, args.seeds, epochs=args.epochs, device=args.device, data_root=args.data_root,
        out_dir=args.checkpoints, width=args.width, verbose=True, **arch_kw,
    )
    models = [load_checkpoint(p, map_location=args.device)[0] for p in paths]
    xtr, ytr = load_dataset(args.dataset, data_root=args.data_root, split="train")
    xte, yte = load_dataset(args.dataset, data_root=args.data_root, split="test")
    g = torch.Generator().manual_seed(12345)
    idx = torch.randperm(len(xtr), generator=g)[: args.calibration]
    calib = make_loader(xtr[idx], ytr[idx], batch_size=args.batch_size, shuffle=False, dataset=args.dataset)
    test = make_loader(xte, yte, batch_size=1000, shuffle=False, dataset=args.dataset)
    base_acc = [evaluate(m, test, args.device) for m in models]
    aligners = args.aligners or autoalign.list_aligners()
    repairs: list[str | None] = [None, "reset_bn"] if has_batchnorm(models[0]) else [None]
    rows: list[dict[str, Any]] = []
    for n in args.n:
        if n > len(models):
            print(f"skipping N={n}: only {len(models)} models", flush=True)
            continue
        for draw in range(args.draws):
            rng = random.Random(1000 * n + draw)
            chosen = sorted(rng.sample(range(len(models)), n))
            group = [models[i] for i in chosen]
            base = [base_acc[i] for i in chosen]
            ens = ensemble_accuracy(group, test, args.device)
            rows.append(dict(n=n, draw=draw, models=chosen, method="base mean", repair=None, accuracy=statistics.mean(base), seconds=0.0))
            rows.append(dict(n=n, draw=draw, models=chosen, method="ensemble", repair=None, accuracy=ens, seconds=0.0))
            for name in aligners:
                for rep in repairs:
                    t0 = time.perf_counter()
                    res = autoalign.merge_with_report(group, calib, aligner=name, repair=rep, device=args.device)
                    dt = time.perf_counter() - t0
                    acc = evaluate(res.model, test, args.device)
                    rows.append(dict(n=n, draw=draw, models=chosen, method=name, repair=rep, accuracy=acc, seconds=dt,
                                     timings=res.report.timings))
                    print(f"N={n} draw={draw} {name:12s} repair={rep!s:8s} acc={acc:.4f} ({dt:.1f}s)", flush=True)
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{_cpu()}, {args.threads} threads" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ", no GPU"),
        "torch": torch.__version__,
        "dataset": args.dataset,
        "arch": args.arch,
        "arch_kw": arch_kw,
        "width": args.width,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "calibration_samples": args.calibration,
        "base_accuracy": dict(zip(map(str, args.seeds), base_acc)),
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    ns = sorted({r["n"] for r in rows})
    methods: list[tuple[str, Any]] = []
    for r in rows:
        key = (r["method"], r["repair"])
        if key not in methods:
            methods.append(key)
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}.  ",
        f"Data: {result['dataset']}, {result['calibration_samples']} training images as calibration data; "
        f"accuracy on the full test set. Base models: {result['arch']} {result['arch_kw'] or ''} "
        f"(width {result['width']}), seeds {result['seeds']}, {result['epochs']} epochs; "
        f"their test accuracies: " + ", ".join(f"{a:.4f}" for a in result["base_accuracy"].values()) + ".",
        "",
        "Mean ± std over draws of N models (test accuracy, %):",
        "",
        "| method | repair | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|" + "---|" * len(ns),
    ]
    for method, rep in methods:
        cells = []
        for n in ns:
            accs = [100 * r["accuracy"] for r in rows if r["n"] == n and r["method"] == method and r["repair"] == rep]
            if not accs:
                cells.append("")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}")
        lines.append(f"| {method} | {rep or '—'} | " + " | ".join(cells) + " |")
    lines += ["", "Every draw (test accuracy, %; models = seed indices):", "", "| N | draw | models | method | repair | accuracy | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['draw']} | {r['models']} | {r['method']} | {r['repair'] or '—'} | {100 * r['accuracy']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    keys: list[tuple[str, Any]] = []
    for r in rows:
        if (r["method"], r["repair"]) not in keys:
            keys.append((r["method"], r["repair"]))
    for method, rep in keys:
        ns = sorted({r["n"] for r in rows if r["method"] == method and r["repair"] == rep})
        means = [100 * statistics.mean(r["accuracy"] for r in rows if r["n"] == n and r["method"] == method and r["repair"] == rep) for n in ns]
        label = method + (f" + {rep}" if rep else "")
        ax.plot(ns, means, marker="o", label=label, linestyle="--" if method in ("ensemble", "base mean") else "-")
    ax.set_xlabel("number of merged models N")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['dataset']} / {result['arch']}")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--hidden", type=int, nargs="*", help="hidden sizes for --arch mlp")
    ap.add_argument("--width", type=float, default=None, help="width multiplier for conv archs")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--aligners", nargs="*", help="default: every registered aligner")
    ap.add_argument("--calibration", type=int, default=5000, help="training images used as calibration data")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/merge_accuracy")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(to_markdown(result))
    plot(result, out / "accuracy_vs_n.png")
    print(to_markdown(result))
    print(f"wrote {out}/results.json, results.md, accuracy_vs_n.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
