"""Train the zoo models from several seeds, with a checkpoint cache.

Command line (run from the repository root)::

    python benchmarks/train.py --dataset mnist --arch mlp --seeds 0 1 2 3 --epochs 5 \\
        --data-root ../shared/data --device cpu --out checkpoints/

From Python::

    from benchmarks.train import train_models, load_checkpoint
    paths = train_models("mnist", "mlp", [0, 1], epochs=5, data_root="../shared/data")
    model, ckpt = load_checkpoint(paths[0])

CIFAR-10 is trained with the standard augmentation (random crop of the image
zero-padded by 4 pixels, random horizontal flip; ``--no-augment`` turns it off);
``--train-subset 25000`` trains on a fixed random subset of the training set (the
same images for every seed), e.g. for CPU smoke runs::

    python benchmarks/train.py --dataset cifar10 --arch smallcnn --width 16 --epochs 3 \\
        --train-subset 25000 --seeds 0 1 2 3 4 5 6 7 --data-root ../shared/data

``--device`` defaults to ``cuda`` when a GPU is visible, else ``cpu``. Base test
accuracies of the runs reported in docs/results/ are listed there, next to
each table.

The seed sets both the initialisation and the data order / augmentation. Each
checkpoint is a ``dict`` with ``state_dict``, ``config`` (everything needed to
rebuild the model and that determines training), ``seed``, ``test_accuracy``,
``train_seconds`` and a per-epoch ``history``. Its file name carries a hash of the
config, so a second call with the same config and seed reuses it (``force=True`` /
``--force`` retrains).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from autoalign.examples.datasets import load_dataset, make_loader  # noqa: E402
from benchmarks.models import build_model, canonical_arch  # noqa: E402

__all__ = [
    "train_models",
    "evaluate",
    "load_checkpoint",
    "make_config",
    "checkpoint_path",
    "default_hyperparameters",
    "default_device",
    "subset_indices",
    "main",
]

CONFIG_VERSION = 1


# --------------------------------------------------------------------------- configuration


def default_hyperparameters(arch: str, dataset: str) -> dict[str, Any]:
    """Defaults for an architecture / data set pair.

    MLPs use Adam (lr 1e-3, no weight decay); conv nets use SGD with Nesterov
    momentum 0.9, weight decay 5e-4 and lr 0.1 (0.05 for VGG11). All use a linear
    warm-up over the first 5% of the steps then a cosine decay to zero. CIFAR-10
    is augmented (random crop + flip), the others are not.

    Returns
    -------
    dict
        Keys ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``schedule``,
        ``warmup_frac``, ``label_smoothing``, ``augment``.
    """
    a = canonical_arch(arch)
    if a == "mlp":
        hp = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
    else:
        hp = {"optimizer": "sgd", "lr": 0.05 if a == "vgg11" else 0.1, "weight_decay": 5e-4}
    hp.update(
        momentum=0.9,
        schedule="cosine",
        warmup_frac=0.05,
        label_smoothing=0.0,
        augment=dataset.lower().replace("-", "") == "cifar10",
    )
    return hp


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def make_config(
    dataset: str,
    arch: str,
    *,
    epochs: int,
    batch_size: int,
    width: float | None = None,
    arch_kw: dict[str, Any] | None = None,
    train_subset: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """The full training configuration (everything that determines the weights
    except the seed).

    Parameters
    ----------
    dataset, arch : str
        Data set and architecture names.
    epochs, batch_size : int
        Training length and batch size.
    width : float or None
        Generic width knob of :func:`benchmarks.models.build_model`.
    arch_kw : dict or None
        Extra constructor arguments.
    train_subset : int or None
        Train on a fixed random subset of this many training images (the same
        subset for every seed, drawn with a fixed generator); ``None`` uses the
        whole training set. Only recorded in the config when set, so configs
        (and cached checkpoints) without it are unchanged.
    precision : {"fp32", "bf16"}
        ``"bf16"`` trains under ``torch.autocast`` in bfloat16 (weights, optimiser
        state and BatchNorm statistics stay float32); about 2x faster on CPUs with
        AVX-512 BF16. Recorded only when not ``"fp32"``.
    channels_last : bool
        Use the channels-last memory format for conv nets (recorded only when set).
    **overrides
        Any key of :func:`default_hyperparameters`; ``None`` values keep the default.

    Returns
    -------
    dict
        JSON-serialisable configuration.
    """
    a = canonical_arch(arch)
    hp = default_hyperparameters(a, dataset)
    for key, value in overrides.items():
        if key not in hp:
            raise TypeError(f"unknown training option {key!r}; known: {', '.join(sorted(hp))}")
        if value is not None:
            hp[key] = value
    if hp["optimizer"] not in ("sgd", "adam", "adamw"):
        raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {hp['optimizer']!r}")
    if hp["schedule"] not in ("cosine", "onecycle", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'onecycle' or 'constant', got {hp['schedule']!r}")
    config = {
        "version": CONFIG_VERSION,
        "dataset": dataset.lower(),
        "arch": a,
        "width": width,
        "arch_kw": dict(arch_kw or {}),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        **hp,
    }
    if train_subset is not None:
        if int(train_subset) < 1:
            raise ValueError(f"train_subset must be >= 1, got {train_subset!r}")
        config["train_subset"] = int(train_subset)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32":
        config["precision"] = precision
    if channels_last:
        config["channels_last"] = True
    return _jsonable(config)


TRAIN_SUBSET_SEED = 20240101
PRECISIONS = ("fp32", "bf16")


def subset_indices(n_total: int, n_subset: int) -> torch.Tensor:
    """The fixed training subset of ``n_subset`` out of ``n_total`` images (same for every seed)."""
    g = torch.Generator().manual_seed(TRAIN_SUBSET_SEED)
    return torch.randperm(n_total, generator=g)[: min(int(n_subset), n_total)]


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_path(out_dir: str | os.PathLike[str], config: dict[str, Any], seed: int) -> pathlib.Path:
    """``<out_dir>/<dataset>_<arch>_<confighash>_seed<seed>.pt``."""
    name = f"{config['dataset']}_{config['arch']}_{config_hash(config)}_seed{int(seed)}.pt"
    return pathlib.Path(out_dir) / name


# --------------------------------------------------------------------------- training


def evaluate(model: nn.Module, loader: Any, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader``.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping ``(b, C, H, W)`` to ``(b, num_classes)`` logits. Put in
        eval mode for the call; its previous mode is restored.
    loader : iterable of (x, y)
        ``x`` ``(b, C, H, W)``, ``y`` ``(b,)`` int64.
    device : str or torch.device
        Where to run.

    Returns
    -------
    float
        Fraction of correct predictions in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def _lr_factor(step: int, total: int, schedule: str, warmup_frac: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":  # linear up to the peak at 25%, linear down to 0
        peak = max(1, int(0.25 * total))
        return (step + 1) / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
    warm = int(warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters.
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], nesterov=config["momentum"] > 0)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=config["lr"])
    return torch.optim.Adam(groups, lr=config["lr"])


def train_one(
    config: dict[str, Any],
    seed: int,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_loader: Any,
    device: torch.device,
    verbose: bool,
) -> dict[str, Any]:
    """Train one model; returns the checkpoint dict."""
    torch.manual_seed(seed)
    model = build_model(config["arch"], config["dataset"], width=config["width"], **config["arch_kw"]).to(device)
    memory_format = torch.channels_last if config.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    autocast_dtype = torch.bfloat16 if config.get("precision") == "bf16" else None
    loader = make_loader(
        *train_data,
        batch_size=config["batch_size"],
        shuffle=True,
        seed=seed,
        augment=config["augment"],
        dataset=config["dataset"],
        drop_last=len(train_data[1]) > config["batch_size"],
    )
    optimizer = _make_optimizer(model, config)
    total = config["epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total, config["schedule"], config["warmup_frac"])
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    history = []
    start = time.perf_counter()
    for epoch in range(config["epochs"]):
        model.train()
        loss_sum = 0.0
        correct = 0
        seen = 0
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            n = int(y.numel())
            loss_sum += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "seconds": time.perf_counter() - t0,
        }
        history.append(entry)
        if verbose:
            print(
                f"  seed={seed} epoch {epoch + 1}/{config['epochs']} loss={entry['train_loss']:.4f} "
                f"train_acc={entry['train_accuracy']:.4f} ({entry['seconds']:.1f}s)",
                flush=True,
            )
    train_seconds = time.perf_counter() - start
    test_accuracy = evaluate(model, test_loader, device)
    return {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "config": config,
        "seed": int(seed),
        "test_accuracy": float(test_accuracy),
        "train_seconds": float(train_seconds),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "history": history,
        "torch_version": str(torch.__version__),
    }


def _save_atomic(obj: dict[str, Any], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint written by :func:`train_models`.

    Returns
    -------
    model : nn.Module
        In eval mode, on ``map_location``.
    checkpoint : dict
        The stored dict (``state_dict``, ``config``, ``test_accuracy``, ...).
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], cfg["dataset"], width=cfg["width"], **cfg["arch_kw"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt


def _summary(ckpt: dict[str, Any], path: pathlib.Path, status: str) -> str:
    cfg = ckpt["config"]
    return (
        f"{cfg['dataset']}/{cfg['arch']} seed={ckpt['seed']} test_acc={ckpt['test_accuracy']:.4f} "
        f"train_s={ckpt['train_seconds']:.1f} epochs={cfg['epochs']} [{status}] -> {path}"
    )


def train_models(
    dataset: str,
    arch: str,
    seeds: Sequence[int],
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float | None = None,
    device: str | torch.device = "cpu",
    data_root: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "checkpoints",
    width: float | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    schedule: str | None = None,
    warmup_frac: float | None = None,
    label_smoothing: float | None = None,
    augment: bool | None = None,
    train_subset: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    force: bool = False,
    num_threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    **arch_kw: Any,
) -> list[pathlib.Path]:
    """Train (or reuse) one model per seed and return the checkpoint paths.

    Parameters
    ----------
    dataset : str
        ``"digits"``, ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
    arch : str
        ``"mlp"``, ``"smallcnn"``, ``"vgg11"`` or ``"resnet20"``.
    seeds : sequence of int
        One model per seed; the seed sets the initialisation and the data order.
    epochs, batch_size : int
        Training length and batch size.
    lr, optimizer, weight_decay, momentum, schedule, warmup_frac, label_smoothing, augment
        ``None`` keeps :func:`default_hyperparameters`.
    device : str or torch.device
        ``"cpu"`` or ``"cuda"``.
    data_root : str or path-like or None
        Data root (``None``: ``AUTOALIGN_DATA``); unused for ``digits``.
    out_dir : str or path-like
        Checkpoint folder (created if needed).
    width : float or None
        Generic width knob of :func:`benchmarks.models.build_model`.
    train_subset : int or None
        Train on a fixed subset of this many training images (see :func:`make_config`).
    precision, channels_last
        Mixed precision and memory format of training (see :func:`make_config`).
    force : bool
        Retrain even when a checkpoint for the config and seed exists.
    num_threads : int or None
        ``torch.set_num_threads`` for the duration of the call on CPU. ``None``
        uses ``AUTOALIGN_THREADS`` if set, else 1: on the shared 2-core machine
        the intra-op pool is slower with 2 threads as soon as anything else runs.
    cache_dir : str or path-like or None
        Decoded-data cache (CIFAR-10).
    verbose : bool
        Also print one line per epoch.
    **arch_kw
        Extra model constructor arguments (``hidden=[512, 512]``, ``depth=3``,
        ``batchnorm=False``, ...).

    Returns
    -------
    list of pathlib.Path
        Checkpoint paths, in the order of ``seeds``.
    """
    config = make_config(
        dataset,
        arch,
        epochs=epochs,
        batch_size=batch_size,
        width=width,
        arch_kw=arch_kw,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        momentum=momentum,
        schedule=schedule,
        warmup_frac=warmup_frac,
        label_smoothing=label_smoothing,
        augment=augment,
        train_subset=train_subset,
        precision=precision,
        channels_last=channels_last,
    )
    dev = torch.device(device)
    out = pathlib.Path(out_dir)
    paths = [checkpoint_path(out, config, s) for s in seeds]
    todo = [(s, p) for s, p in zip(seeds, paths) if force or not p.is_file()]

    for s, p in zip(seeds, paths):
        if (s, p) not in todo:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            print(_summary(ckpt, p, "cached"), flush=True)
    if not todo:
        return paths

    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        threads = num_threads if num_threads is not None else int(os.environ.get("AUTOALIGN_THREADS", "1"))
        torch.set_num_threads(max(1, threads))
    try:
        train_data = load_dataset(config["dataset"], data_root=data_root, split="train", cache_dir=cache_dir)
        if config.get("train_subset") is not None:
            idx = subset_indices(len(train_data[1]), config["train_subset"])
            train_data = (train_data[0][idx], train_data[1][idx])
        test_data = load_dataset(config["dataset"], data_root=data_root, split="test", cache_dir=cache_dir)
        test_loader = make_loader(*test_data, batch_size=512, shuffle=False, dataset=config["dataset"])
        for s, p in todo:
            ckpt = train_one(config, s, train_data, test_loader, dev, verbose)
            _save_atomic(ckpt, p)
            print(_summary(ckpt, p, "trained"), flush=True)
    finally:
        torch.set_num_threads(old_threads)
    return paths


# --------------------------------------------------------------------------- CLI


def add_reuse_arguments(ap: argparse.ArgumentParser) -> None:
    """The training options a benchmark script needs to find cached checkpoints made with
    non-default settings (the cache key is the whole training config): ``--lr``,
    ``--schedule``, ``--precision``, ``--channels-last``."""
    ap.add_argument("--lr", type=float, default=None, help="training learning rate (default: train.py's)")
    ap.add_argument("--schedule", choices=["cosine", "onecycle", "constant"], default=None, help="training schedule (default: train.py's)")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="training precision")
    ap.add_argument("--channels-last", action="store_true", help="trained channels-last")


def reuse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``train_models`` keyword arguments from :func:`add_reuse_arguments`' options."""
    return {"lr": args.lr, "schedule": args.schedule, "precision": args.precision, "channels_last": args.channels_last}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="digits, mnist, fashion-mnist or cifar10")
    p.add_argument("--arch", required=True, help="mlp, smallcnn, vgg11 or resnet20")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one model per seed (default: 0)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (Adam, MLP), 0.1 / 0.05 (SGD)")
    p.add_argument("--width", type=float, default=None, help="MLP hidden size, SmallCNN width, or width multiplier")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="MLP hidden sizes, e.g. 512 512")
    p.add_argument("--depth", type=int, default=None, help="MLP number of hidden layers of --width")
    p.add_argument("--no-batchnorm", action="store_true", help="VGG11 without BatchNorm")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--schedule", choices=["cosine", "onecycle", "constant"], default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None)
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--data-root", default=None, help="data folder (default: $AUTOALIGN_DATA)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default: $AUTOALIGN_CACHE or ~/.cache/autoalign)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a fixed subset of this many training images")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="bf16: autocast in bfloat16 (about 2x faster on AVX-512 BF16 CPUs)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for conv nets")
    p.add_argument("--device", default=default_device(), help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $AUTOALIGN_THREADS or 1)")
    p.add_argument("--out", default="checkpoints", help="checkpoint folder")
    p.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    p.add_argument("-v", "--verbose", action="store_true", help="print one line per epoch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    arch_kw: dict[str, Any] = {}
    if args.hidden is not None:
        arch_kw["hidden"] = list(args.hidden)
    if args.depth is not None:
        arch_kw["depth"] = args.depth
    if args.no_batchnorm:
        arch_kw["batchnorm"] = False
    width = args.width
    if width is not None and float(width).is_integer():
        width = int(width)
    try:
        train_models(
            args.dataset,
            args.arch,
            args.seeds,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            data_root=args.data_root,
            out_dir=args.out,
            width=width,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            schedule=args.schedule,
            label_smoothing=args.label_smoothing,
            augment=args.augment,
            train_subset=args.train_subset,
            precision=args.precision,
            channels_last=args.channels_last,
            force=args.force,
            num_threads=args.threads,
            cache_dir=args.cache_dir,
            verbose=args.verbose,
            **arch_kw,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
