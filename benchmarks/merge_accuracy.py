"""Merged test accuracy for every method against N, next to the ensemble and the base models.

A *method* is a triple (aligner, scheme, repair):

* aligner — any registered aligner (``--aligners``, default: all of them);
* scheme  — ``all_to_one`` (every model aligned to the reference), ``iterative``
  (re-align to the current merged model until the plan settles) or ``hierarchical``
  (pairwise binary tree) (``--schemes``); ``iterative`` only applies to aligners
  whose class attribute ``needs == "reference"``, the others skip it;
* repair  — ``none``, ``reset_bn`` (re-estimate BatchNorm statistics) or ``repair``
  (REPAIR, Jordan et al. 2023) (``--repairs``; default ``none reset_bn`` for models
  with BatchNorm, ``none`` otherwise).

Example (the MNIST smoke setting of docs/results/mnist_mlp.md)::

    python benchmarks/merge_accuracy.py --dataset mnist --arch mlp --hidden 512 512 \\
        --seeds 0 1 2 3 4 5 6 7 --n 2 4 8 --draws 3 --epochs 5 --data-root ../shared/data \\
        --out benchmarks/out/mnist_mlp

The CIFAR-10 CPU setting of docs/results/cifar10_smallcnn.md::

    nice -n 19 python benchmarks/merge_accuracy.py --dataset cifar10 --arch smallcnn --width 16 \\
        --epochs 3 --train-subset 30000 --seeds 0 1 2 3 4 5 6 7 --n 2 4 8 --draws 3 \\
        --schemes all_to_one iterative --repairs none reset_bn repair \\
        --calibration 2000 --data-root ../shared/data --threads 1 --out benchmarks/out/cifar10_smallcnn

Trains (or reuses cached) base models with ``benchmarks/train.py``, then for each N
and each draw of N distinct models (draws that repeat a previous set of models are
not run twice: with 8 models there is only one draw at N = 8) merges them with every
method and evaluates on the test set. The ensemble is the mean of the N models'
logits. Writes ``results.json`` (rewritten after every row, so a partial run keeps
what it has), ``results.md`` (mean ± std over draws, and every draw) and
``accuracy_vs_n.png``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
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
from autoalign.examples.datasets import load_dataset, make_loader, random_subset  # noqa: E402
from autoalign.repair import has_batchnorm  # noqa: E402
from benchmarks.train import add_reuse_arguments, load_checkpoint, reuse_kwargs, train_models  # noqa: E402

SCHEMES = ("all_to_one", "iterative", "hierarchical")
REPAIRS = ("none", "reset_bn", "repair")
BASELINES = ("base mean", "best base", "ensemble")


# --------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (or platform)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: str, threads: int) -> str:
    """One line naming the machine: CPU model, logical CPUs, torch threads, GPU."""
    line = f"{cpu_name()} ({os.cpu_count()} logical CPUs), {threads} torch thread(s)"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return line + f", {torch.cuda.get_device_name()}"
    return line + ", no GPU"


def scheme_supported() -> bool:
    """Whether ``autoalign.merge`` takes a ``scheme=`` argument."""
    return "scheme" in inspect.signature(autoalign.merge).parameters


#: Options of ``autoalign.merge`` itself that a method variant may set; every other
#: ``key=value`` of a variant goes to the aligner.
MERGE_OPTIONS = ("batchnorm", "features", "reference", "averaging")


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """``"cca:ridge=1e-6,ridge_mode=absolute"`` -> ``("cca", {"ridge": 1e-06, "ridge_mode": "absolute"})``.

    A variant is an aligner name, optionally followed by ``:`` and comma-separated
    ``key=value`` options (numbers are parsed as floats, ``auto`` and words stay strings).
    """
    name, _, rest = label.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"method {label!r}: option {item!r} is not key=value")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return name, options


def aligner_needs(label: str) -> str:
    name, _ = parse_method(label)
    if name == "auto":
        return "reference"
    return getattr(autoalign.get_aligner(name), "needs", "reference")


def methods_for(aligners: Sequence[str], schemes: Sequence[str], repairs: Sequence[str]) -> list[tuple[str, str, str]]:
    """The (aligner, scheme, repair) triples to run; ``iterative`` only for ``needs == "reference"``."""
    out = []
    for name in aligners:
        needs = aligner_needs(name)
        for scheme in schemes:
            if scheme == "iterative" and needs != "reference":
                continue
            for rep in repairs:
                if parse_method(name)[1].get("batchnorm") == "transform" and rep == "none":
                    continue  # the authors' BatchNorm transform needs re-estimated statistics
                out.append((name, scheme, rep))
    return out


def draws_for(n_models: int, n: int, draws: int) -> list[list[int]]:
    """Up to ``draws`` distinct sorted sets of ``n`` model indices.

    Draw ``k`` is ``sorted(random.Random(1000 * n + k).sample(range(n_models), n))``
    (the sets the first MNIST table used); a set already drawn is replaced by a
    fresh one, and there are never more draws than distinct sets.
    """
    total = math.comb(n_models, n)
    chosen: list[list[int]] = []
    k = 0
    while len(chosen) < min(draws, total):
        c = sorted(random.Random(1000 * n + k).sample(range(n_models), n))
        if c not in chosen:
            chosen.append(c)
        k += 1
    return chosen


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def logits_of(model: torch.nn.Module, loader: Any, device: str) -> torch.Tensor:
    """All test logits of one model, on CPU, ``(n_test, classes)``."""
    was = model.training
    model.eval()
    out = [model(x.to(device)).float().cpu() for x, _ in loader]
    model.train(was)
    return torch.cat(out)


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def ensemble_accuracy(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the mean of the models' logits."""
    return accuracy_from_logits(torch.stack(list(logits)).mean(0), labels)


def merge_one(group: Sequence[torch.nn.Module], calib: Any, aligner: str, scheme: str, repair: str, device: str) -> Any:
    """``autoalign.merge_with_report`` for one method (``aligner`` may be a variant, see
    :func:`parse_method`); ``scheme`` is passed only when it is not the default or the library takes it."""
    name, options = parse_method(aligner)
    kw: dict[str, Any] = {"aligner": name, "repair": None if repair == "none" else repair, "device": device, **options}
    if scheme != "all_to_one" or scheme_supported():
        kw["scheme"] = scheme
    return autoalign.merge_with_report(list(group), calib, **kw)


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace, out: pathlib.Path | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    arch_kw: dict[str, Any] = {}
    if args.hidden:
        arch_kw["hidden"] = tuple(args.hidden)
    width = args.width
    if width is not None and float(width).is_integer():
        width = int(width)
    t0 = time.perf_counter()
    paths = train_models(
        args.dataset, args.arch, args.seeds, epochs=args.epochs, batch_size=args.train_batch_size,
        device=args.device, data_root=args.data_root, out_dir=args.checkpoints, width=width,
        train_subset=args.train_subset, num_threads=args.threads, verbose=True, **reuse_kwargs(args), **arch_kw,
    )
    train_wall = time.perf_counter() - t0
    loaded = [load_checkpoint(p, map_location=args.device) for p in paths]
    models = [m for m, _ in loaded]
    ckpts = [c for _, c in loaded]
    xtr, ytr = load_dataset(args.dataset, data_root=args.data_root, split="train")
    xte, yte = load_dataset(args.dataset, data_root=args.data_root, split="test")
    if args.test_limit:
        xte, yte = xte[: args.test_limit], yte[: args.test_limit]
    xcal, ycal = random_subset(xtr, ytr, args.calibration, seed=12345)
    # augment: the same random crops and flips as training (fixed by the seed, so every
    # pass over the calibration data sees the same images); BatchNorm statistics
    # re-estimated on un-augmented images differ from the ones training left
    calib = make_loader(xcal, ycal, batch_size=args.batch_size, shuffle=False, dataset=args.dataset,
                        augment=args.calibration_augment)
    if args.calibration_augment:
        calib = [(x.clone(), y.clone()) for x, y in calib]  # one fixed draw of the augmentation
    test = make_loader(xte, yte, batch_size=1000, shuffle=False, dataset=args.dataset)
    labels = yte.long()
    base_logits = [logits_of(m, test, args.device) for m in models]
    base_acc = [accuracy_from_logits(lg, labels) for lg in base_logits]
    bn = has_batchnorm(models[0])
    # each base model with its BatchNorm statistics re-estimated on the calibration data:
    # what reset_bn does to a model that needs no alignment (the ceiling of reset_bn rows)
    recal_acc = [
        accuracy_from_logits(logits_of(autoalign.reset_bn(copy.deepcopy(m), calib), test, args.device), labels)
        for m in models
    ] if bn else None

    aligners = args.aligners or autoalign.list_aligners()
    repairs = args.repairs or (["none", "reset_bn"] if bn else ["none"])
    if not bn and "reset_bn" in repairs:
        print("note: the models have no BatchNorm, so reset_bn equals none; it is skipped", flush=True)
        repairs = [r for r in repairs if r != "reset_bn"]
    methods = methods_for(aligners, args.schemes, repairs)
    if "iterative" in args.schemes and not scheme_supported():
        print("note: autoalign.merge takes no scheme= argument yet; iterative rows will record the error", flush=True)

    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]) if args.command is None else args.command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(args.device, args.threads),
        "torch": torch.__version__,
        "autoalign": autoalign.__version__,
        "dataset": args.dataset,
        "arch": args.arch,
        "arch_kw": arch_kw,
        "width": width,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "train_config": ckpts[0]["config"],
        "calibration_samples": len(ycal),
        "test_samples": len(labels),
        "base_accuracy": dict(zip(map(str, args.seeds), base_acc)),
        "base_accuracy_reset_bn": None if recal_acc is None else dict(zip(map(str, args.seeds), recal_acc)),
        "calibration_augment": args.calibration_augment,
        "train_seconds": dict(zip(map(str, args.seeds), [float(c["train_seconds"]) for c in ckpts])),
        "train_wall_seconds": train_wall,
        "methods": [list(m) for m in methods],
        "scheme_argument_supported": scheme_supported(),
        "rows": [],
    }
    rows: list[dict[str, Any]] = result["rows"]

    def save() -> None:
        result["total_wall_seconds"] = time.perf_counter() - t_start
        if out is not None:
            (out / "results.json").write_text(json.dumps(result, indent=1))

    for n in args.n:
        if n > len(models):
            print(f"skipping N={n}: only {len(models)} models", flush=True)
            continue
        for draw, chosen in enumerate(draws_for(len(models), n, args.draws)):
            group = [models[i] for i in chosen]
            common = dict(n=n, draw=draw, models=chosen, seeds=[args.seeds[i] for i in chosen])
            rows.append(dict(common, method="base mean", scheme=None, repair=None,
                             accuracy=statistics.mean(base_acc[i] for i in chosen), seconds=0.0))
            rows.append(dict(common, method="best base", scheme=None, repair=None,
                             accuracy=max(base_acc[i] for i in chosen), seconds=0.0))
            if recal_acc is not None:
                rows.append(dict(common, method="base mean", scheme=None, repair="reset_bn",
                                 accuracy=statistics.mean(recal_acc[i] for i in chosen), seconds=0.0))
            rows.append(dict(common, method="ensemble", scheme=None, repair=None,
                             accuracy=ensemble_accuracy([base_logits[i] for i in chosen], labels), seconds=0.0))
            for name, scheme, rep in methods:
                t0 = time.perf_counter()
                try:
                    res = merge_one(group, calib, name, scheme, rep, args.device)
                except Exception as exc:  # noqa: BLE001 - a method that fails is reported, not fatal
                    dt = time.perf_counter() - t0
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    rows.append(dict(common, method=name, scheme=scheme, repair=rep, accuracy=None, seconds=dt, error=msg))
                    print(f"N={n} draw={draw} {name:15s} {scheme:10s} repair={rep:8s} ERROR {msg}", flush=True)
                    save()
                    continue
                dt = time.perf_counter() - t0
                acc = accuracy_from_logits(logits_of(res.model, test, args.device), labels)
                rows.append(dict(common, method=name, scheme=scheme, repair=rep, accuracy=acc, seconds=dt,
                                 timings=dict(res.report.timings)))
                print(f"N={n} draw={draw} {name:15s} {scheme:10s} repair={rep:8s} acc={acc:.4f} ({dt:.1f}s)", flush=True)
                save()
    save()
    return result


# --------------------------------------------------------------------------- reporting


def method_keys(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    keys: list[tuple[str, Any, Any]] = []
    for r in rows:
        k = (r["method"], r.get("scheme"), r.get("repair"))
        if k not in keys:
            keys.append(k)
    return keys


def summarise(rows: Sequence[dict[str, Any]], key: tuple[str, Any, Any], n: int) -> tuple[list[float], list[str]]:
    """Accuracies (in %) of the successful rows of one method at one N, and the errors."""
    sel = [r for r in rows if r["n"] == n and (r["method"], r.get("scheme"), r.get("repair")) == key]
    return [100 * r["accuracy"] for r in sel if r.get("accuracy") is not None], [r["error"] for r in sel if r.get("error")]


def _cell(accs: list[float], errors: list[str]) -> str:
    if not accs:
        return "error" if errors else ""
    if len(accs) == 1:
        return f"{accs[0]:.2f}"
    return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"


def header(result: dict[str, Any]) -> list[str]:
    cfg = result.get("train_config", {})
    subset = result.get("train_subset")
    aug = cfg.get("augment")
    return [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}.  ",
        f"Data: {result['dataset']}; calibration: {result['calibration_samples']} training images"
        + (" (with training's augmentation, one fixed draw)" if result.get("calibration_augment") else "") + "; "
        f"accuracy on {result.get('test_samples', 'all')} test images. "
        f"Base models: {result['arch']} {result['arch_kw'] or ''}(width {result['width']}), seeds {result['seeds']}, "
        f"{result['epochs']} epochs on {subset if subset else 'all'} training images"
        + (f", {cfg.get('optimizer')} lr {cfg.get('lr')}, batch {cfg.get('batch_size')}" if cfg else "")
        + (", augmentation: random crop (padding 4 on 32×32) + horizontal flip" if aug and result["dataset"] == "cifar10" else "")
        + (", no augmentation" if aug is False else "")
        + "; their test accuracies: " + ", ".join(f"{100 * a:.2f}" for a in result["base_accuracy"].values()) + " %"
        + ("; with BatchNorm statistics re-estimated on the calibration data: "
           + ", ".join(f"{100 * a:.2f}" for a in result["base_accuracy_reset_bn"].values()) + " %"
           if result.get("base_accuracy_reset_bn") else "")
        + (f"; training took {sum(result['train_seconds'].values()) / 60:.1f} min in all" if result.get("train_seconds") else "")
        + (f"; whole run {result['total_wall_seconds'] / 60:.1f} min wall clock" if result.get("total_wall_seconds") else "")
        + ".",
    ]


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    ns = sorted({r["n"] for r in rows})
    draws = {n: len({tuple(r["models"]) for r in rows if r["n"] == n}) for n in ns}
    lines = header(result) + [
        "",
        "Mean ± std over draws of N models (test accuracy, %; draws per N: "
        + ", ".join(f"N={n}: {draws[n]}" for n in ns) + "):",
        "",
        "| aligner | scheme | repair | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|---|---|" + "---|" * len(ns),
    ]
    for key in method_keys(rows):
        cells = [_cell(*summarise(rows, key, n)) for n in ns]
        lines.append(f"| {key[0]} | {key[1] or '—'} | {key[2] or '—'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every draw (test accuracy, %; models = indices into the seed list; seconds = merge wall time):",
        "",
        "| N | draw | models | aligner | scheme | repair | accuracy | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "error" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}"
        lines.append(
            f"| {r['n']} | {r['draw']} | {r['models']} | {r['method']} | {r.get('scheme') or '—'} | {r.get('repair') or '—'} "
            f"| {acc} | {r['seconds']:.1f} |"
        )
    errors = sorted({(r["method"], r.get("scheme"), r.get("repair"), r["error"]) for r in rows if r.get("error")})
    if errors:
        lines += ["", "Methods that failed:", ""]
        lines += [f"- {m} / {s} / {rp}: `{e}`" for m, s, rp, e in errors]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^v<>ph*"
    for i, key in enumerate(method_keys(rows)):
        ns, means, stds = [], [], []
        for n in sorted({r["n"] for r in rows}):
            accs, _ = summarise(rows, key, n)
            if accs:
                ns.append(n)
                means.append(statistics.mean(accs))
                stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        if not ns:
            continue
        method, scheme, rep = key
        label = method if method in BASELINES else f"{method} / {scheme} / {rep}"
        style = "--" if method in BASELINES else ("-" if scheme == "all_to_one" else ":")
        ax.errorbar(ns, means, yerr=stds, marker=markers[i % len(markers)], markersize=4, capsize=2,
                    linestyle=style, label=label, color="black" if method in BASELINES else None)
    ax.set_xlabel("number of merged models N")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['dataset']} / {result['arch']} (width {result['width']})")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(to_markdown(result))
    plot(result, out / "accuracy_vs_n.png")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--hidden", type=int, nargs="*", help="hidden sizes for --arch mlp")
    ap.add_argument("--width", type=float, default=None, help="MLP width, SmallCNN width or VGG/ResNet width multiplier")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    add_reuse_arguments(ap)
    ap.add_argument("--train-batch-size", type=int, default=128)
    ap.add_argument("--train-subset", type=int, default=None, help="train on a fixed subset of this many images")
    ap.add_argument("--aligners", nargs="*", help="default: every registered aligner; a variant sets options, "
                    "e.g. cca:ridge=auto or cca:ridge=1e-6,ridge_mode=absolute,batchnorm=transform "
                    "(merge options: " + ", ".join(MERGE_OPTIONS) + "; the others go to the aligner)")
    ap.add_argument("--schemes", nargs="+", default=["all_to_one"], choices=SCHEMES,
                    help="default all_to_one; iterative only applies to aligners with needs == 'reference'")
    ap.add_argument("--repairs", nargs="+", default=None, choices=REPAIRS,
                    help="default: none reset_bn with BatchNorm, none without")
    ap.add_argument("--calibration", type=int, default=5000, help="training images used as calibration data")
    ap.add_argument("--batch-size", type=int, default=500, help="calibration batch size")
    ap.add_argument("--calibration-augment", action="store_true",
                    help="calibration images with training's augmentation (one fixed draw of crops and flips)")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and merging)")
    ap.add_argument("--out", default="benchmarks/out/merge_accuracy")
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is not None and args.command is None:
        args.command = "python benchmarks/merge_accuracy.py " + " ".join(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args, out)
    write_outputs(result, out)
    print(to_markdown(result))
    print(f"wrote {out}/results.json, results.md, accuracy_vs_n.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
