"""A self-contained demonstration: train small networks from different seeds and merge them.

:func:`run_demo` trains ``N`` small networks from different seeds, merges them
with every registered aligner (with and without each repair that applies) using
training data as calibration data, and reports test accuracies next to the two
reference points of the CCA Merge paper: the base models' mean accuracy and
their ensemble (mean of logits). Everything is measured; nothing is hard-coded.

On scikit-learn's 8x8 digits (the default; no download, no data root) the whole
run takes well under a minute on a laptop CPU::

    python -m autoalign demo
    python -m autoalign demo --dataset mnist --data-root ~/data --epochs 3

Architectures
-------------
``mlp``     ``Flatten → (Linear → ReLU) × len(hidden) → Linear`` (no BatchNorm, so
            repairs "none" and "repair" apply);
``mlp_bn``  the same with ``BatchNorm1d`` after each hidden Linear (BatchNorm
            folds into the Linear before it; ``reset_bn`` and ``repair`` apply);
``cnn_bn``  for CIFAR-10: ``(Conv3x3 → BatchNorm → ReLU → MaxPool) × len(hidden)``,
            global average pooling and a Linear classifier.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .demo_report import DemoResult, DemoRow, format_markdown, format_table, plot_rows

__all__ = ["DemoRow", "DemoResult", "run_demo", "make_mlp", "make_cnn", "train_model", "evaluate", "DEMO_DEFAULTS"]

#: Per-data-set defaults: epochs, batch size, learning rate, hidden widths, calibration batches, architectures.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 30, "batch_size": 32, "lr": 2e-3, "hidden": (64, 64), "calib_batches": None, "archs": ("mlp", "mlp_bn")},
    "mnist": {"epochs": 3, "batch_size": 128, "lr": 1e-3, "hidden": (128, 128), "calib_batches": 100, "archs": ("mlp", "mlp_bn")},
    "fashion-mnist": {"epochs": 3, "batch_size": 128, "lr": 1e-3, "hidden": (128, 128), "calib_batches": 100, "archs": ("mlp", "mlp_bn")},
    "cifar10": {"epochs": 10, "batch_size": 128, "lr": 2e-3, "hidden": (32, 64, 128), "calib_batches": 100, "archs": ("cnn_bn",)},
}


# ----------------------------------------------------------------------------- models


def make_mlp(in_features: int, hidden: Sequence[int], num_classes: int, *, batchnorm: bool = False) -> nn.Sequential:
    """``Flatten → (Linear [→ BatchNorm1d] → ReLU) × len(hidden) → Linear``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def make_cnn(in_channels: int, widths: Sequence[int], num_classes: int) -> nn.Sequential:
    """``(Conv3x3 → BatchNorm2d → ReLU → MaxPool2) × len(widths) → GAP → Linear``."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def _build(arch: str, info: Any, hidden: Sequence[int]) -> nn.Module:
    if arch == "mlp":
        return make_mlp(info.channels * info.height * info.width, hidden, info.num_classes)
    if arch == "mlp_bn":
        return make_mlp(info.channels * info.height * info.width, hidden, info.num_classes, batchnorm=True)
    if arch == "cnn_bn":
        return make_cnn(info.channels, hidden, info.num_classes)
    raise ValueError(f"unknown demo architecture {arch!r}; choose mlp, mlp_bn or cnn_bn")


# ----------------------------------------------------------------------------- train / evaluate


def train_model(
    model: nn.Module,
    loader: Any,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    weight_decay: float = 5e-4,
) -> nn.Module:
    """Train with AdamW and a cosine learning-rate schedule (in place; returns the model in eval mode)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.to(device).eval()
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, loader: Any, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` batches."""
    logits, y = _logits(model, loader, torch.device(device))
    return float((logits.argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- results


def _repairs_for(model: nn.Module) -> list[str | None]:
    """Repairs that change something for this model: None always, the others when they apply."""
    from ..repair import has_batchnorm
    from ..vocab import REPAIRS

    out: list[str | None] = [None]
    for r in REPAIRS:
        if r in (None, "auto", "none"):
            continue
        if r == "reset_bn" and not has_batchnorm(model):
            continue
        out.append(r)
    return out


def run_demo(
    dataset: str = "digits",
    *,
    data_root: str | os.PathLike[str] | None = None,
    n_models: int = 4,
    epochs: int | None = None,
    hidden: Sequence[int] | None = None,
    archs: Sequence[str] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike[str] = "demo_out",
    progress: bool = True,
    device: str | torch.device | None = None,
    calib_batches: int | None = -1,
    aligners: Sequence[str] | None = None,
    threads: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> DemoResult:
    """Train ``n_models`` small networks from different seeds and merge them with every aligner.

    Parameters
    ----------
    dataset : {"digits", "mnist", "fashion-mnist", "cifar10"}, default "digits"
        ``digits`` is scikit-learn's bundled 8x8 digits (1437 train / 360 test images).
    data_root : path, optional
        Data root for the other data sets (default: ``$AUTOALIGN_DATA``); see
        :mod:`autoalign.examples.datasets`.
    n_models : int, default 4
        Models per architecture; model ``i`` uses seed ``seed + i`` for its
        initialisation and data order.
    epochs : int, optional
        Training epochs (default per data set, see :data:`DEMO_DEFAULTS`).
    hidden : sequence of int, optional
        Hidden widths of the MLPs (default ``(64, 64)`` on digits) or channel
        widths of the CNN on CIFAR-10.
    archs : sequence of str, optional
        Architectures to train (default ``("mlp", "mlp_bn")``, ``("cnn_bn",)`` on
        CIFAR-10).
    seed : int, default 0
    out_dir : path, default "demo_out"
        Where the markdown table, the JSON rows and the bar plot are written.
    progress : bool, default True
        Print a line per step (training each model, each merge).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    calib_batches : int or None, default -1
        Calibration batches (of the training batch size) per pass; ``None`` uses
        all training data; ``-1`` the data set's default.
    aligners : sequence of str, optional
        Aligners to run (default: every registered one, :func:`autoalign.list_aligners`).
    threads : int, optional
        CPU threads for torch during the run (restored afterwards). Default: 1
        for the MLPs on a CPU (their matrices are tiny: several threads only add
        synchronisation, up to 20x slower on a busy machine), else unchanged.
    print_fn : callable, default print
        Where the progress lines and the final table go.

    Returns
    -------
    DemoResult
        The rows (base models, ensemble, one per aligner and repair), the
        tables and the paths of the files written.

    Examples
    --------
    >>> from autoalign.examples.demo import run_demo
    >>> result = run_demo(n_models=2, epochs=2, out_dir="/tmp/demo", progress=False)  # doctest: +SKIP
    >>> sorted({r.method for r in result.merge_rows()})  # doctest: +SKIP
    ['cca', 'identity', 'permutation']
    """
    archs_ = tuple(DEMO_DEFAULTS.get(str(dataset).lower(), DEMO_DEFAULTS["digits"])["archs"] if archs is None else archs)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if threads is None and dev.type == "cpu" and all(a.startswith("mlp") for a in archs_):
        threads = 1
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(
            dataset, data_root=data_root, n_models=n_models, epochs=epochs, hidden=hidden, archs=archs, seed=seed,
            out_dir=out_dir, progress=progress, dev=dev, calib_batches=calib_batches, aligners=aligners, print_fn=print_fn,
        )
    finally:
        torch.set_num_threads(old_threads)


def _run_demo(
    dataset: str,
    *,
    data_root: str | os.PathLike[str] | None,
    n_models: int,
    epochs: int | None,
    hidden: Sequence[int] | None,
    archs: Sequence[str] | None,
    seed: int,
    out_dir: str | os.PathLike[str],
    progress: bool,
    dev: torch.device,
    calib_batches: int | None,
    aligners: Sequence[str] | None,
    print_fn: Callable[[str], None],
) -> DemoResult:
    from .. import list_aligners, merge_with_report
    from .datasets import DATASET_INFO, canonical_name, load_dataset, make_loader, random_subset

    t_start = time.perf_counter()
    key = canonical_name(dataset)
    defaults = DEMO_DEFAULTS[key]
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    epochs = defaults["epochs"] if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    hidden = tuple(defaults["hidden"] if hidden is None else hidden)
    archs = tuple(defaults["archs"] if archs is None else archs)
    if key == "cifar10" and any(a.startswith("mlp") for a in archs) and hidden == tuple(defaults["hidden"]):
        hidden = (256, 256)
    calib = defaults["calib_batches"] if calib_batches == -1 else calib_batches
    names = list(list_aligners() if aligners is None else aligners)
    info = DATASET_INFO[key]
    bs = int(defaults["batch_size"])
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            print_fn(msg)

    x_tr, y_tr = load_dataset(key, data_root=data_root, split="train")
    x_te, y_te = load_dataset(key, data_root=data_root, split="test")
    test_loader = make_loader(x_te, y_te, batch_size=512, shuffle=False, dataset=key)
    # a limited calibration takes the first batches: in a fixed random order, so every class is in them
    calib_data = (x_tr, y_tr) if calib is None else random_subset(x_tr, y_tr)
    calib_loader = make_loader(*calib_data, batch_size=bs, shuffle=False, dataset=key)
    n_calib = len(x_tr) if calib is None else min(len(x_tr), calib * bs)
    say(
        f"autoalign demo: {key} ({len(x_tr)} train / {len(x_te)} test images), {n_models} models x {', '.join(archs)}, "
        f"hidden {hidden}, {epochs} epochs, device {dev}, {torch.get_num_threads()} torch thread(s); aligners: {', '.join(names)}"
    )

    rows: list[DemoRow] = []
    base_acc: dict[str, list[float]] = {}
    total_steps = len(archs) * n_models
    step = 0
    for arch in archs:
        models: list[nn.Module] = []
        t_arch = time.perf_counter()
        for i in range(n_models):
            step += 1
            t0 = time.perf_counter()
            torch.manual_seed(seed + i)
            model = _build(arch, info, hidden)
            loader = make_loader(x_tr, y_tr, batch_size=bs, shuffle=True, seed=seed + i, augment=key == "cifar10", dataset=key)
            train_model(model, loader, epochs=epochs, lr=float(defaults["lr"]), device=dev)
            models.append(model)
            acc = evaluate(model, test_loader, dev)
            base_acc.setdefault(arch, []).append(acc)
            say(f"[{step}/{total_steps}] trained {arch} seed {seed + i}: test acc {acc:.4f} ({time.perf_counter() - t0:.1f} s)")
        t_train = time.perf_counter() - t_arch
        accs = base_acc[arch]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(DemoRow(arch, "base", "base models", None, statistics.fmean(accs), std, t_train))
        logits = [_logits(m, test_loader, dev) for m in models]
        ens = torch.stack([lg for lg, _ in logits]).mean(0)
        ens_acc = float((ens.argmax(1) == logits[0][1]).float().mean())
        rows.append(DemoRow(arch, "ensemble", "ensemble", None, ens_acc))
        say(f"    {arch}: base models {statistics.fmean(accs):.4f} ± {std:.4f}, ensemble {ens_acc:.4f}")

        repairs = _repairs_for(models[0])
        combos = [(a, r) for a in names for r in repairs]
        for k, (aligner, repair) in enumerate(combos, start=1):
            t0 = time.perf_counter()
            result = merge_with_report(
                models, calib_loader, aligner=aligner, repair=repair if repair is not None else "none",
                num_batches=calib, device=dev,
            )
            secs = time.perf_counter() - t0
            acc = evaluate(result.model, test_loader, dev)
            if not math.isfinite(acc):
                acc = float("nan")
            rows.append(DemoRow(arch, "merge", aligner, repair, acc, None, secs))
            say(f"    [{k}/{len(combos)}] merged {arch} with {aligner} (repair {repair or 'none'}): test acc {acc:.4f} ({secs:.2f} s)")

    seconds = time.perf_counter() - t_start
    title = (
        f"autoalign demo: {key}, {n_models} models per architecture, {epochs} epochs, seeds {seed}..{seed + n_models - 1}; "
        f"calibration: {n_calib} training images; test: {len(x_te)} images; device {dev}"
    )
    table = format_table(rows)
    markdown = format_markdown(rows, title)
    table_path = out / f"demo_{key}.md"
    table_path.write_text(markdown + f"\nTotal time {seconds:.1f} s.\n")
    config = {
        "dataset": key, "n_models": n_models, "epochs": epochs, "hidden": list(hidden), "archs": list(archs),
        "seed": seed, "device": str(dev), "calibration_images": n_calib, "batch_size": bs, "aligners": names,
        "torch_threads": torch.get_num_threads(),
    }
    json_path = out / f"demo_{key}.json"
    json_path.write_text(json.dumps({"config": config, "rows": [asdict(r) for r in rows], "seconds": seconds}, indent=1))
    plot_path = plot_rows(rows, archs, out / f"demo_{key}.png", title)
    print_fn("")
    print_fn(title)
    print_fn(table)
    print_fn(f"\ntotal {seconds:.1f} s; wrote {table_path}, {json_path}" + (f", {plot_path}" if plot_path else " (no plot: matplotlib missing)"))
    return DemoResult(key, rows, base_acc, table, markdown, plot_path, table_path, json_path, seconds, config)
