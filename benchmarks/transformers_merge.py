"""Merging Hugging Face transformers trained from different seeds (issue 20, item 3).

Two tasks, each a tiny model built from its config class (random init by seed, nothing
downloaded):

* ``vit-mnist`` — ``ViTForImageClassification`` on MNIST (28×28, patch 4, hidden 64,
  2 layers, 4 heads), accuracy on the 10,000 test images.
* ``gpt2-chars`` — ``GPT2LMHeadModel`` on characters of real text that is always there
  offline: a fixed, sorted list of the running Python's standard-library ``.py`` files,
  concatenated up to ~1.5 MB; vocabulary = printable ASCII + newline, everything else one
  unknown id; 90/10 train/validation split by position. Perplexity on the validation part
  (non-overlapping windows of the context length).

Subcommands (run from the repository root)::

    python benchmarks/transformers_merge.py train    --task vit-mnist  --seeds 0 1 2 3 --data-root ../shared/data
    python benchmarks/transformers_merge.py train    --task gpt2-chars --seeds 0 1 2 3
    python benchmarks/transformers_merge.py evaluate --task vit-mnist  --seeds 0 1 2 3 --data-root ../shared/data
    python benchmarks/transformers_merge.py merge    --task gpt2-chars --seeds 0 1 2 3 [--aligners cca ...]
                                                      [--option tracer=export ...]
    python benchmarks/transformers_merge.py report   --task vit-mnist

``train`` caches one checkpoint per seed under
``~/.cache/autoalign/checkpoints/<task>_<config-hash>_seed<k>.pt`` (``--checkpoints`` to
change; the hash covers the whole training config) and reuses it when present.
``evaluate`` reports, for every seed, every pair of seeds and the group of all seeds, the
base models, the ensemble (mean of the logits) and plain averaging
(``autoalign.merge(models, calib, aligner="identity")``, or a manual mean of the state
dicts when that raises — the error is recorded). ``merge`` calls
``autoalign.merge(models, calib, aligner=name, **options)`` for every registered aligner
(``autoalign.list_aligners()``; ``--aligners`` to choose) on the same groups, catching and
recording each error (through ``autoalign.merge_with_report``, the same pipeline and arguments,
to keep the per-point report). ``report`` prints the markdown tables of the result files.
``PYTHONPATH`` chooses which autoalign runs (the script puts the repository root after it);
every result file records which one did. Calibration data: ``--calib-batches`` batches of training inputs only
(``pixel_values`` or ``input_ids`` tensors), the same for every merge.

Results: ``benchmarks/results/transformers/<command>_<task>.json`` (``--results-dir``),
with the command line, machine, date, versions, configs and checkpoint paths.
``--toy`` shrinks everything (a few steps, a few hundred examples) for the smoke test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import glob
import hashlib
import itertools
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))  # after PYTHONPATH: it chooses the autoalign

__all__ = [
    "TASKS",
    "task_config",
    "build_model",
    "load_task_data",
    "train_task",
    "evaluate_task",
    "merge_task",
    "main",
]

CONFIG_VERSION = 1
DEFAULT_CHECKPOINTS = pathlib.Path("~/.cache/autoalign/checkpoints").expanduser()
DEFAULT_RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "transformers"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CALIB_SEED = 1234

# Character vocabulary: id 0 = unknown, then newline, then printable ASCII 32..126.
VOCAB = ["\ufffd", "\n"] + [chr(c) for c in range(32, 127)]
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}

TASKS: dict[str, dict[str, Any]] = {
    "vit-mnist": {
        "task": "vit-mnist",
        "version": CONFIG_VERSION,
        "model": {
            "image_size": 28,
            "patch_size": 4,
            "num_channels": 1,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "num_labels": 10,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "epochs": 3,
        "steps": None,  # None: epochs × batches per epoch
        "batch_size": 128,
        "lr": 2e-3,
        "weight_decay": 0.01,
        "warmup_frac": 0.05,
        "bf16": False,  # measured slower than fp32 for this ViT on the 2-core EPYC
        "train_limit": None,
        "eval_limit": None,
        "eval_batch_size": 500,
    },
    "gpt2-chars": {
        "task": "gpt2-chars",
        "version": CONFIG_VERSION,
        "model": {
            "vocab_size": len(VOCAB),
            "n_positions": 128,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "use_cache": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        "text_bytes": 1_500_000,
        "context": 128,
        "steps": 1000,
        "batch_size": 32,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "warmup_frac": 0.05,
        "bf16": True,
        "train_limit": None,
        "eval_limit": None,  # number of validation windows (None: all)
        "eval_batch_size": 64,
    },
}

TOY_OVERRIDES: dict[str, dict[str, Any]] = {
    "vit-mnist": {
        "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "patch_size": 7},
        "steps": 2,
        "batch_size": 16,
        "train_limit": 256,
        "eval_limit": 64,
        "eval_batch_size": 32,
    },
    "gpt2-chars": {
        "model": {"n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2},
        "text_bytes": 20_000,
        "context": 16,
        "steps": 2,
        "batch_size": 8,
        "eval_limit": 16,
        "eval_batch_size": 8,
    },
}


# --------------------------------------------------------------------------- configuration


def task_config(task: str, toy: bool = False) -> dict[str, Any]:
    """The full training config of ``task`` (its hash keys the checkpoint cache)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    config = copy.deepcopy(TASKS[task])
    if toy:
        over = copy.deepcopy(TOY_OVERRIDES[task])
        config["model"].update(over.pop("model", {}))
        config.update(over)
        config["toy"] = True
    return config


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_path(out_dir: str | os.PathLike[str], config: dict[str, Any], seed: int) -> pathlib.Path:
    """``<out_dir>/<task>_<confighash>_seed<seed>.pt``."""
    return pathlib.Path(out_dir).expanduser() / f"{config['task']}_{config_hash(config)}_seed{int(seed)}.pt"


def build_model(config: dict[str, Any], seed: int | None = None) -> nn.Module:
    """A randomly initialised HF model of the task (``seed`` seeds the init)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    if config["task"] == "vit-mnist":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**config["model"]))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**config["model"]))


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: ``.logits``, a tensor, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


# --------------------------------------------------------------------------- data


def stdlib_files(limit_bytes: int) -> list[pathlib.Path]:
    """The sorted top-level ``.py`` files of the running Python's stdlib, up to ~``limit_bytes``."""
    import sysconfig

    files = sorted(pathlib.Path(p) for p in glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    chosen, total = [], 0
    for f in files:
        if total >= limit_bytes:
            break
        chosen.append(f)
        total += f.stat().st_size
    return chosen


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor([CHAR_TO_ID.get(c, 0) for c in text], dtype=torch.long)


def load_text(config: dict[str, Any]) -> dict[str, Any]:
    files = stdlib_files(int(config["text_bytes"]))
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    ids = encode_text(text)
    cut = int(0.9 * len(ids))
    return {
        "train": ids[:cut],
        "val": ids[cut:],
        "info": {
            "files": [f.name for f in files],
            "stdlib": str(files[0].parent) if files else None,
            "characters": len(ids),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "unknown_fraction": float((ids == 0).float().mean()) if len(ids) else 0.0,
            "train_characters": cut,
            "val_characters": len(ids) - cut,
        },
    }


def load_task_data(config: dict[str, Any], data_root: str | None = None) -> dict[str, Any]:
    """``{"train": ..., "val": ..., "info": ...}``: MNIST tensors or encoded text."""
    if config["task"] == "gpt2-chars":
        return load_text(config)
    from autoalign.examples.datasets import load_dataset

    out: dict[str, Any] = {}
    for split, key in (("train", "train"), ("test", "val")):
        x, y = load_dataset("mnist", data_root=data_root, split=split)
        limit = config["train_limit"] if key == "train" else config["eval_limit"]
        if limit:
            x, y = x[:limit], y[:limit]
        out[key] = ((x - MNIST_MEAN) / MNIST_STD, y)
    out["info"] = {"dataset": "MNIST", "train_examples": len(out["train"][1]), "val_examples": len(out["val"][1]), "val_split": "test (10,000)"}
    return out


def val_batches(config: dict[str, Any], data: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches ``(input, target)``: MNIST test images / validation text windows."""
    bs = int(config["eval_batch_size"])
    if config["task"] == "vit-mnist":
        x, y = data["val"]
        return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]
    T = int(config["context"])
    ids = data["val"]
    n = (len(ids) - 1) // T
    if config["eval_limit"]:
        n = min(n, int(config["eval_limit"]))
    inp = ids[: n * T].view(n, T)
    tgt = ids[1 : n * T + 1].view(n, T)
    return [(inp[i : i + bs], tgt[i : i + bs]) for i in range(0, n, bs)]


def calibration_batches(config: dict[str, Any], data: dict[str, Any], n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` batches of training inputs only (fixed draw, the same for every merge)."""
    g = torch.Generator().manual_seed(CALIB_SEED)
    bs = int(config["batch_size"])
    if config["task"] == "vit-mnist":
        x = data["train"][0]
        idx = torch.randperm(len(x), generator=g)[: n_batches * bs]
        return [x[idx[i : i + bs]] for i in range(0, len(idx), bs)]
    T = int(config["context"])
    ids = data["train"]
    starts = torch.randint(0, len(ids) - T, (n_batches * bs,), generator=g)
    seqs = torch.stack([ids[s : s + T] for s in starts.tolist()])
    return [seqs[i : i + bs] for i in range(0, len(seqs), bs)]


# --------------------------------------------------------------------------- training


def _lr_factor(step: int, total: int, warmup_frac: float) -> float:
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _train_batches(config: dict[str, Any], data: dict[str, Any], seed: int):
    """(total steps, iterator of (input, target)) — the seed sets the data order."""
    g = torch.Generator().manual_seed(int(seed))
    bs = int(config["batch_size"])
    if config["task"] == "vit-mnist":
        x, y = data["train"]
        per_epoch = len(y) // bs
        total = int(config["steps"]) if config["steps"] else per_epoch * int(config["epochs"])

        def gen():
            step = 0
            while True:
                perm = torch.randperm(len(y), generator=g)
                for i in range(per_epoch):
                    if step >= total:
                        return
                    idx = perm[i * bs : (i + 1) * bs]
                    yield x[idx], y[idx]
                    step += 1

        return total, gen()
    T = int(config["context"])
    ids = data["train"]
    total = int(config["steps"])

    def gen_text():
        for _ in range(total):
            starts = torch.randint(0, len(ids) - T - 1, (bs,), generator=g)
            off = starts[:, None] + torch.arange(T + 1)[None, :]
            chunk = ids[off]
            yield chunk[:, :-1], chunk[:, 1:]

    return total, gen_text()


def _loss(config: dict[str, Any], logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def train_one(config: dict[str, Any], data: dict[str, Any], seed: int, log_every: int = 100) -> dict[str, Any]:
    """Train one model from ``seed``; returns the checkpoint dict."""
    model = build_model(config, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}], lr=config["lr"]
    )
    total, batches = _train_batches(config, data, seed)
    history, t0, running = [], time.time(), []
    for step, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = config["lr"] * _lr_factor(step, total, config["warmup_frac"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(config["bf16"])):
            logits = logits_of(model(x))
        loss = _loss(config, logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == total:
            history.append({"step": step + 1, "train_loss": sum(running) / len(running), "seconds": round(time.time() - t0, 1)})
            running = []
            print(f"  seed {seed} step {step + 1}/{total} loss {history[-1]['train_loss']:.4f} ({history[-1]['seconds']} s)", flush=True)
    seconds = time.time() - t0
    model.eval()
    metrics = metrics_of(config, model_logits(model, val_batches(config, data)), val_batches(config, data))
    return {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": config,
        "seed": int(seed),
        "metrics": metrics,
        "train_seconds": seconds,
        "history": history,
        "torch": torch.__version__,
    }


def _save_atomic(obj: dict[str, Any], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def train_task(
    config: dict[str, Any], seeds: Sequence[int], checkpoints: str | os.PathLike[str], data: dict[str, Any] | None = None,
    data_root: str | None = None, force: bool = False,
) -> list[pathlib.Path]:
    """Train (or reuse) one checkpoint per seed; returns their paths."""
    paths = []
    for seed in seeds:
        path = checkpoint_path(checkpoints, config, seed)
        if path.exists() and not force:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            print(f"cached  {path}  {ckpt['metrics']}", flush=True)
        else:
            if data is None:
                data = load_task_data(config, data_root)
            print(f"training {config['task']} seed {seed} -> {path}", flush=True)
            ckpt = train_one(config, data, seed)
            _save_atomic(ckpt, path)
            print(f"trained {path}  {ckpt['metrics']}  {ckpt['train_seconds']:.0f} s", flush=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def model_logits(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        return [logits_of(model(x)).float() for x, _ in batches]
    finally:
        model.train(was)


def metrics_of(config: dict[str, Any], logits: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Accuracy and loss (ViT) or perplexity, loss and next-character accuracy (GPT-2)."""
    nll, correct, count = 0.0, 0, 0
    for lg, (_, y) in zip(logits, batches):
        lg2 = lg.reshape(-1, lg.shape[-1])
        y2 = y.reshape(-1)
        nll += float(F.cross_entropy(lg2, y2, reduction="sum"))
        correct += int((lg2.argmax(-1) == y2).sum())
        count += int(y2.numel())
    loss = nll / max(count, 1)
    if config["task"] == "vit-mnist":
        return {"accuracy": correct / max(count, 1), "loss": loss}
    return {"perplexity": math.exp(loss), "loss": loss, "char_accuracy": correct / max(count, 1)}


def groups_of(seeds: Sequence[int], sizes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Every pair of seeds (and every group of each size in ``sizes``; default: 2 and all)."""
    seeds = list(seeds)
    sizes = sorted(set(sizes)) if sizes else sorted({2, len(seeds)})
    out: list[tuple[int, ...]] = []
    for k in sizes:
        if 2 <= k <= len(seeds):
            out.extend(itertools.combinations(seeds, k))
    return out


def _error_record(exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc)[:4000], "traceback_tail": "".join(tb)[-3000:]}


def _manual_average(models: Sequence[nn.Module]) -> nn.Module:
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    avg = {}
    for k, v in sds[0].items():
        avg[k] = torch.stack([sd[k].float() for sd in sds]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
    merged.load_state_dict(avg)
    return merged


def _load_models(config, seeds, checkpoints):
    models, paths, base_ckpt_metrics = {}, {}, {}
    for s in seeds:
        p = checkpoint_path(checkpoints, config, s)
        if not p.exists():
            raise FileNotFoundError(f"no checkpoint for seed {s}: {p} (run the train subcommand first)")
        models[s], ck = load_model(p)
        paths[s] = str(p)
        base_ckpt_metrics[s] = ck["metrics"]
    return models, paths


def _try_merge(models, calib, aligner, options) -> tuple[nn.Module | None, dict[str, Any]]:
    import autoalign

    t0 = time.time()
    try:  # merge_with_report: autoalign.merge's pipeline and arguments, plus what happened per point
        result = autoalign.merge_with_report(list(models), calib, aligner=aligner, **options)
    except Exception as exc:  # noqa: BLE001 — recorded, the benchmark goes on
        return None, {"ok": False, "seconds": round(time.time() - t0, 2), "error": _error_record(exc)}
    rec: dict[str, Any] = {"ok": True, "seconds": round(time.time() - t0, 2)}
    try:
        rep = result.report
        rec["points"] = [
            {"name": p.name, "dim": p.dim, "allowed": p.allowed, "used": p.used, "note": p.note} for p in rep.points
        ]
        rec["repair"] = rep.repair
    except Exception:  # noqa: BLE001 — the report is extra
        pass
    return result.model, rec


def evaluate_task(
    config: dict[str, Any], seeds: Sequence[int], checkpoints: str | os.PathLike[str], data: dict[str, Any],
    calib_batches: int = 8, sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Base models, ensembles (mean of logits) and plain averaging for every group."""
    models, paths = _load_models(config, seeds, checkpoints)
    batches = val_batches(config, data)
    calib = calibration_batches(config, data, calib_batches)
    logits = {s: model_logits(m, batches) for s, m in models.items()}
    base = {str(s): metrics_of(config, logits[s], batches) for s in seeds}
    rows = []
    for group in groups_of(seeds, sizes):
        ens = [torch.stack([logits[s][i] for s in group]).mean(0) for i in range(len(batches))]
        merged, rec = _try_merge([models[s] for s in group], calib, "identity", {})
        avg: dict[str, Any] = {"autoalign_identity": rec}
        if merged is None:
            merged = _manual_average([models[s] for s in group])
            avg["method"] = "manual state-dict mean (autoalign.merge(aligner='identity') raised)"
        else:
            avg["method"] = "autoalign.merge(aligner='identity')"
        avg["metrics"] = metrics_of(config, model_logits(merged, batches), batches)
        preds = {s: torch.cat([lg.reshape(-1, lg.shape[-1]).argmax(-1) for lg in logits[s]]) for s in group}
        disagree = [float((preds[a] != preds[b]).float().mean()) for a, b in itertools.combinations(group, 2)]
        rows.append({
            "seeds": list(group),
            "base": {str(s): base[str(s)] for s in group},
            "disagreement": sum(disagree) / len(disagree),  # mean over pairs: fraction of argmax predictions that differ
            "ensemble": metrics_of(config, ens, batches),
            "plain_average": avg,
        })
        print(f"  {group}: ensemble {rows[-1]['ensemble']}  average {avg['metrics']} ({avg['method']})", flush=True)
    return {"checkpoints": {str(s): p for s, p in paths.items()}, "reference": reference_metrics(config, data), "base": base, "groups": rows}


def reference_metrics(config: dict[str, Any], data: dict[str, Any]) -> dict[str, float]:
    """What "above chance" means: uniform guessing, and (text) the train-set character unigram."""
    if config["task"] == "vit-mnist":
        counts = torch.bincount(data["train"][1], minlength=10).float()
        return {"chance_accuracy": 0.1, "majority_class_accuracy": float((data["val"][1] == counts.argmax()).float().mean())}
    n = int(config["model"]["vocab_size"])
    p = (torch.bincount(data["train"], minlength=n).double() + 1) / (len(data["train"]) + n)
    nll = float(-p.log()[data["val"][1:]].mean())  # the targets scored by val_batches, up to the window cut
    return {"uniform_perplexity": float(n), "unigram_perplexity": math.exp(nll)}


def merge_task(
    config: dict[str, Any], seeds: Sequence[int], checkpoints: str | os.PathLike[str], data: dict[str, Any],
    aligners: Sequence[str] | None = None, options: dict[str, Any] | None = None, calib_batches: int = 8,
    sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``autoalign.merge`` with each aligner on every group; errors are recorded per call."""
    import autoalign

    options = dict(options or {})
    names = list(aligners) if aligners else autoalign.list_aligners()
    models, paths = _load_models(config, seeds, checkpoints)
    batches = val_batches(config, data)
    calib = calibration_batches(config, data, calib_batches)
    base = {str(s): metrics_of(config, model_logits(m, batches), batches) for s, m in models.items()}
    rows: list[dict[str, Any]] = []
    seen: dict[str, tuple[list[int], str]] = {}
    for group in groups_of(seeds, sizes):
        for name in names:
            merged, rec = _try_merge([models[s] for s in group], calib, name, options)
            if merged is not None:
                try:
                    rec["metrics"] = metrics_of(config, model_logits(merged, batches), batches)
                except Exception as exc:  # noqa: BLE001
                    rec["ok"] = False
                    rec["error"] = _error_record(exc)
                    rec["error"]["stage"] = "evaluating the merged model"
            if not rec["ok"]:  # one copy of each distinct traceback per file
                tail = rec["error"]["traceback_tail"]
                if tail in seen:
                    rec["error"]["traceback_tail"] = f"same as seeds {seen[tail][0]} aligner {seen[tail][1]}"
                else:
                    seen[tail] = (list(group), name)
            rows.append({"seeds": list(group), "aligner": name, **rec})
            msg = rec.get("metrics") or f"{rec['error']['type']}: {rec['error']['message'][:160]}"
            print(f"  {group} {name}: {msg}", flush=True)
    return {"checkpoints": {str(s): p for s, p in paths.items()}, "aligners": names, "options": {k: repr(v) for k, v in options.items()}, "base": base, "merges": rows}


# --------------------------------------------------------------------------- report


def _fmt(config_task: str, m: dict[str, float] | None) -> str:
    if not m:
        return "—"
    return f"{100 * m['accuracy']:.2f}" if config_task == "vit-mnist" else f"{m['perplexity']:.3f}"


def report_markdown(results_dir: str | os.PathLike[str], task: str, toy: bool = False) -> str:
    """Markdown tables of the ``evaluate`` (and ``merge``) result files of ``task``."""
    res = pathlib.Path(results_dir)
    suffix = "_toy" if toy else ""
    unit = "test accuracy (%)" if task == "vit-mnist" else "validation perplexity"
    lines: list[str] = []
    ev_path = res / f"evaluate_{task}{suffix}.json"
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else None
    better = max if task == "vit-mnist" else min
    key = "accuracy" if task == "vit-mnist" else "perplexity"
    if ev:
        lines += [f"{task}, {unit}; `{ev['command']}` ({ev['date']})", ""]
        lines += ["| seed | " + " | ".join(ev["base"]) + " |", "|---|" + "---|" * len(ev["base"])]
        lines += ["| base | " + " | ".join(_fmt(task, m) for m in ev["base"].values()) + " |", ""]
        lines += ["| seeds | base (each) | disagreement | ensemble (mean of logits) | plain average | averaging by |", "|---|---|---|---|---|---|"]
        for g in ev["groups"]:
            avg = g["plain_average"]
            how = "autoalign identity" if avg["autoalign_identity"]["ok"] else "manual mean (autoalign raised)"
            lines.append(
                f"| {' '.join(map(str, g['seeds']))} | {' / '.join(_fmt(task, m) for m in g['base'].values())} | "
                f"{100 * g.get('disagreement', float('nan')):.1f} % | "
                f"{_fmt(task, g['ensemble'])} | {_fmt(task, avg['metrics'])} | {how} |"
            )
        lines.append("")
    for mpath in sorted(res.glob(f"merge_{task}{suffix}*.json")):
        mr = json.loads(mpath.read_text())
        groups = sorted({tuple(r["seeds"]) for r in mr["merges"]}, key=lambda g: (len(g), g))
        lines += [f"`{mpath.name}`: `{mr['command']}` ({mr['date']}; autoalign from `{mr.get('autoalign', {}).get('file')}`)", ""]
        lines += ["| aligner | " + " | ".join(" ".join(map(str, g)) for g in groups) + " |", "|---|" + "---|" * len(groups)]
        if ev:  # reference rows from the evaluate file
            by_group = {tuple(g["seeds"]): g for g in ev["groups"]}
            refs = [
                ("*best base*", lambda g: better(g["base"].values(), key=lambda m: m[key])),
                ("*ensemble*", lambda g: g["ensemble"]),
                ("*plain average*", lambda g: g["plain_average"]["metrics"]),
            ]
            for label, pick in refs:
                lines.append(f"| {label} | " + " | ".join(_fmt(task, pick(by_group[g])) if g in by_group else "—" for g in groups) + " |")
        for name in mr["aligners"]:
            cells = []
            for g in groups:
                (r,) = [r for r in mr["merges"] if r["aligner"] == name and tuple(r["seeds"]) == g]
                cells.append(_fmt(task, r.get("metrics")) if r["ok"] else f"error: {r['error']['type']}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def autoalign_source(module: Any) -> dict[str, Any]:
    """Which autoalign ran: its file, and the git commit and uncommitted diff of its checkout."""
    import subprocess

    root = pathlib.Path(module.__file__).resolve().parent.parent
    info: dict[str, Any] = {"file": module.__file__, "version": getattr(module, "__version__", None)}
    try:
        git = ["git", "-C", str(root)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30).stdout.strip()
        diff = subprocess.run([*git, "diff", "HEAD", "--", "autoalign"], capture_output=True, timeout=30).stdout
        untracked = subprocess.run([*git, "ls-files", "--others", "--exclude-standard", "--", "autoalign"], capture_output=True, text=True, timeout=30).stdout.split()
        info["uncommitted_diff_sha256"] = hashlib.sha256(diff).hexdigest() if diff else None
        info["untracked_files"] = untracked
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _parse_option(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    if raw.lower() == "none":
        return key, None
    return key, raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "evaluate", "merge", "report"])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="group sizes to evaluate/merge (default: 2 and all seeds)")
    p.add_argument("--data-root", default=None, help="data folder (default: $AUTOALIGN_DATA); MNIST only")
    p.add_argument("--checkpoints", default=str(DEFAULT_CHECKPOINTS))
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--aligners", nargs="+", default=None, help="merge: aligner names (default: autoalign.list_aligners())")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="merge: extra autoalign.merge keyword (repeatable)")
    p.add_argument("--toy", action="store_true", help="tiny models, a few steps (smoke tests)")
    p.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    p.add_argument("--tag", default=None, help="suffix of the result file name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        print(report_markdown(args.results_dir, args.task, toy=args.toy))
        return 0
    torch.set_num_threads(max(1, args.threads))
    config = task_config(args.task, toy=args.toy)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    data = load_task_data(config, args.data_root)
    record: dict[str, Any] = {
        "command": "python benchmarks/transformers_merge.py " + " ".join(argv_list),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(args.threads),
        "task": args.task,
        "config": config,
        "config_hash": config_hash(config),
        "seeds": list(args.seeds),
        "data": data["info"],
    }
    if args.command != "train":
        import autoalign

        record["autoalign"] = autoalign_source(autoalign)
    if args.command == "train":
        paths = train_task(config, args.seeds, args.checkpoints, data=data, data_root=args.data_root, force=args.force)
        record["checkpoints"] = {}
        for s, p in zip(args.seeds, paths):
            ck = torch.load(p, map_location="cpu", weights_only=False)
            record["checkpoints"][str(s)] = {"path": str(p), "metrics": ck["metrics"], "train_seconds": ck["train_seconds"], "history": ck["history"]}
    elif args.command == "evaluate":
        record["calib_batches"] = args.calib_batches
        record.update(evaluate_task(config, args.seeds, args.checkpoints, data, args.calib_batches, args.sizes))
    else:
        record["calib_batches"] = args.calib_batches
        options = dict(_parse_option(o) for o in args.option)
        record.update(merge_task(config, args.seeds, args.checkpoints, data, args.aligners, options, args.calib_batches, args.sizes))
    record["seconds"] = round(time.time() - t0, 1)
    out = pathlib.Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.command}_{args.task}{'_toy' if args.toy else ''}{'_' + args.tag if args.tag else ''}.json"
    (out / name).write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out / name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
