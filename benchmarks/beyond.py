"""Issue #8: benchmark answers to the questions the CCA Merge paper left open.

One sub-command per question, all on MNIST MLPs (784-512-512-10 by default, the
models of docs/results/mnist_mlp.md, reused from the checkpoint cache of
``benchmarks/train.py``), N models per merge, several draws of N models, every
draw reported. Each writes ``results.json`` and ``results.md`` under
``<out>/<item>/`` (default ``benchmarks/out/beyond/<item>/``):

``ablation``
    aligners ``cca``, ``lstsq`` (least-squares linear map), ``procrustes`` (best
    orthogonal map) and ``permutation``: is it CCA's correlation criterion or just
    the degrees of freedom of a linear map?
``learned``
    ``averaging="learned"`` (granularity layer / element; objective labels, and
    distillation to the ensemble with the labels withheld from the calibration
    batches) against uniform averaging, on top of ``cca`` and ``permutation``.
``hierarchical``
    ``scheme="hierarchical"`` against ``all_to_one`` and ``iterative`` for N = 4, 8.
``fisher``
    ``averaging="fisher"`` against uniform with ``identity``, ``permutation``, ``cca``
    (Fisher needs per-sample gradients: it runs on its own, smaller calibration
    set, ``--fisher-calibration``, used by both its uniform and Fisher rows).
``finetune``
    a fixed budget of Adam steps on the training set (same batches for every
    start) from the ``cca``, ``permutation`` and ``identity`` merges and from one
    parent (the control); accuracy before and after.
``splits``
    models trained on disjoint class splits and on Dirichlet(α)-skewed class
    splits, merged with every registered aligner, next to each parent and the
    ensemble, on the full test set. Trained with ``benchmarks/train.py``'s
    training loop on a subset of the training set; cached under
    ``<checkpoints>/beyond_splits/``.
``all``
    everything above, one after the other.

Example (the runs of docs/results/beyond.md)::

    nice -n 19 python benchmarks/beyond.py ablation --data-root ../shared/data --threads 1

``--quick`` is a tiny smoke configuration (1 draw, N = 2, small calibration and
test sets, few steps).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.examples.datasets import load_dataset, make_loader  # noqa: E402
from benchmarks.merge_accuracy import accuracy_from_logits, draws_for, logits_of, machine_line  # noqa: E402

ITEMS = ("ablation", "learned", "hierarchical", "fisher", "finetune", "splits")

QUESTIONS = {
    "ablation": "Is it CCA's correlation criterion, or just the extra degrees of freedom of a linear map? "
    "CCA against a least-squares linear map (`lstsq`), the best orthogonal map (`procrustes`) and a permutation.",
    "learned": "Do learned (non-uniform, per-layer or per-element) merging coefficients help on top of the alignment, "
    "with labels, or distilling to the ensemble with the labels withheld?",
    "hierarchical": "Does merging as a pairwise tree (`hierarchical`) beat all-to-one, and re-aligning to the merged "
    "model (`iterative`)?",
    "fisher": "Does Fisher-weighted averaging (Matena & Raffel 2022) improve on uniform averaging once the models are aligned?",
    "finetune": "Does a briefly fine-tuned merged model beat its parents, and is CCA's start better than permutation's "
    "after the same budget?",
    "splits": "How do the aligners do when the models were trained on different class splits (disjoint, or "
    "Dirichlet-skewed), against the parents and the ensemble on the full test set?",
}


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What the experiments share: models, calibration / test / training data.

    ``calib`` is a list of ``(x, y)`` batches (already normalised), ``test`` a list
    of ``(x, y)`` batches, ``train_x`` / ``train_y`` the raw training set (for
    fine-tuning and splits; ``dataset`` names the normalisation for
    :func:`autoalign.examples.datasets.make_loader`, ``None`` infers it).
    """

    models: list[nn.Module]
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    dataset: str | None = None
    device: str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)
    _base: list[torch.Tensor] | None = None

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([y for _, y in self.test]).long()

    def logits(self, model: nn.Module) -> torch.Tensor:
        return logits_of(model, self.test, self.device)

    def accuracy(self, model: nn.Module) -> float:
        return accuracy_from_logits(self.logits(model), self.labels)

    def base_logits(self) -> list[torch.Tensor]:
        if self._base is None:
            self._base = [self.logits(m) for m in self.models]
        return self._base


def _batches(loader: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in loader]


def baseline_rows(ctx: Context, chosen: Sequence[int], common: dict[str, Any]) -> list[dict[str, Any]]:
    """``parent mean`` and ``ensemble`` (mean logits) rows for a group of models."""
    base = ctx.base_logits()
    labels = ctx.labels
    accs = [accuracy_from_logits(base[i], labels) for i in chosen]
    ens = accuracy_from_logits(torch.stack([base[i] for i in chosen]).mean(0), labels)
    return [
        dict(common, method="parent mean", accuracy=statistics.mean(accs), seconds=0.0, parents=accs),
        dict(common, method="ensemble", accuracy=ens, seconds=0.0),
    ]


def merge_row(ctx: Context, group: Sequence[nn.Module], method: str, common: dict[str, Any], data: Any = None,
              keep: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Merge ``group`` with ``autoalign.merge_with_report(**kw)``, evaluate, return a row.

    A failure is recorded in the row (``accuracy=None``, ``error``), not raised. The
    merged model is stored in ``keep[method]`` when ``keep`` is given.
    """
    kw.setdefault("repair", None)
    kw.setdefault("device", ctx.device)
    t0 = time.perf_counter()
    try:
        res = autoalign.merge_with_report(list(group), ctx.calib if data is None else data, **kw)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        print(f"  N={common['n']} draw={common['draw']} {method}: ERROR {msg}", flush=True)
        return dict(common, method=method, accuracy=None, seconds=time.perf_counter() - t0, error=msg)
    dt = time.perf_counter() - t0
    acc = ctx.accuracy(res.model)
    if keep is not None:
        keep[method] = res.model
    row = dict(common, method=method, accuracy=acc, seconds=dt)
    if res.report.iterations:
        row["iterations"] = res.report.iterations
    print(f"  N={common['n']} draw={common['draw']} {method:40s} acc={acc:.4f} ({dt:.1f}s)", flush=True)
    return row


def _groups(ctx: Context, ns: Sequence[int], draws: int) -> list[tuple[int, int, list[int]]]:
    out = []
    for n in ns:
        if n > len(ctx.models):
            print(f"skipping N={n}: only {len(ctx.models)} models", flush=True)
            continue
        for d, chosen in enumerate(draws_for(len(ctx.models), n, draws)):
            out.append((n, d, chosen))
    return out


def _common(item: str, n: int, d: int, chosen: Sequence[int]) -> dict[str, Any]:
    return dict(item=item, n=n, draw=d, models=list(chosen))


# --------------------------------------------------------------------------- items


def run_ablation(ctx: Context, ns: Sequence[int], draws: int,
                 aligners: Sequence[str] = ("cca", "lstsq", "procrustes", "permutation"),
                 save: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
    """Every aligner of ``aligners`` (all-to-one, uniform, no repair) on each draw."""
    rows: list[dict[str, Any]] = []
    for n, d, chosen in _groups(ctx, ns, draws):
        common = _common("ablation", n, d, chosen)
        group = [ctx.models[i] for i in chosen]
        rows += baseline_rows(ctx, chosen, common)
        for spec in aligners:
            name, opts = parse_aligner(spec)
            rows.append(merge_row(ctx, group, spec, common, aligner=name, **opts))
            if save:
                save(rows)
    return rows


def parse_aligner(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lstsq:rcond=0.1,ridge=0"`` → ``("lstsq", {"rcond": 0.1, "ridge": 0.0})`` (values parsed as JSON when
    they can be, else kept as strings)."""
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    return name, opts


def learned_variants(epochs: int, lr: float) -> list[tuple[str, str, dict[str, Any] | None, bool]]:
    """(label, averaging, averaging_options, labels withheld) of the ``learned`` item."""
    out: list[tuple[str, str, dict[str, Any] | None, bool]] = [("uniform", "uniform", None, False)]
    for gran in ("layer", "element"):
        out.append((f"learned {gran} / labels", "learned",
                    {"granularity": gran, "objective": "labels", "epochs": epochs, "lr": lr}, False))
    for gran in ("layer", "element"):
        out.append((f"learned {gran} / distill (no labels)", "learned",
                    {"granularity": gran, "objective": "distill", "epochs": epochs, "lr": lr}, True))
    return out


def run_learned(ctx: Context, ns: Sequence[int], draws: int, aligners: Sequence[str] = ("cca", "permutation"),
                epochs: int = 5, lr: float = 0.05, save: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
    """Uniform against learned coefficients on top of each aligner.

    The distillation rows get calibration batches *without* labels (inputs only),
    so nothing but the parents' predictions guides the coefficients.
    """
    unlabelled = [x for x, _ in ctx.calib]
    rows: list[dict[str, Any]] = []
    for n, d, chosen in _groups(ctx, ns, draws):
        common = _common("learned", n, d, chosen)
        group = [ctx.models[i] for i in chosen]
        rows += baseline_rows(ctx, chosen, common)
        for al in aligners:
            for label, averaging, opts, withheld in learned_variants(epochs, lr):
                rows.append(merge_row(ctx, group, f"{al} / {label}", common, data=unlabelled if withheld else None,
                                      aligner=al, averaging=averaging, averaging_options=opts))
                if save:
                    save(rows)
    return rows


def run_hierarchical(ctx: Context, ns: Sequence[int], draws: int, aligners: Sequence[str] = ("cca", "permutation"),
                     schemes: Sequence[str] = ("all_to_one", "hierarchical", "iterative"),
                     save: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
    """Each scheme with each aligner (``iterative`` only for aligners with ``needs == "reference"``)."""
    rows: list[dict[str, Any]] = []
    for n, d, chosen in _groups(ctx, ns, draws):
        common = _common("hierarchical", n, d, chosen)
        group = [ctx.models[i] for i in chosen]
        rows += baseline_rows(ctx, chosen, common)
        for al in aligners:
            needs = getattr(autoalign.get_aligner(al), "needs", "reference")
            for scheme in schemes:
                if scheme == "iterative" and needs != "reference":
                    continue
                rows.append(merge_row(ctx, group, f"{al} / {scheme}", common, aligner=al, scheme=scheme))
                if save:
                    save(rows)
    return rows


def run_fisher(ctx: Context, ns: Sequence[int], draws: int,
               aligners: Sequence[str] = ("identity", "permutation", "cca"), chunk: int = 100,
               save: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
    """Uniform against Fisher-weighted averaging (true Fisher, labels sampled from the model)."""
    rows: list[dict[str, Any]] = []
    for n, d, chosen in _groups(ctx, ns, draws):
        common = _common("fisher", n, d, chosen)
        group = [ctx.models[i] for i in chosen]
        rows += baseline_rows(ctx, chosen, common)
        for al in aligners:
            rows.append(merge_row(ctx, group, f"{al} / uniform", common, aligner=al))
            rows.append(merge_row(ctx, group, f"{al} / fisher", common, aligner=al, averaging="fisher",
                                  averaging_options={"chunk": chunk}))
            if save:
                save(rows)
    return rows


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
             seed: int, dataset: str | None = None, device: str = "cpu") -> nn.Module:
    """A copy of ``model`` after ``steps`` Adam steps (constant ``lr``) of cross-entropy on ``(x, y)``.

    The batches are a deterministic function of ``seed`` (the same for every start).
    """
    m = copy.deepcopy(model).to(device)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    loader = make_loader(x, y, batch_size=batch_size, shuffle=True, seed=seed, dataset=dataset,
                         drop_last=len(y) > batch_size)
    it = iter(loader)
    for _ in range(steps):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        loss = F.cross_entropy(m(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()


def run_finetune(ctx: Context, ns: Sequence[int], draws: int, aligners: Sequence[str] = ("cca", "permutation", "identity"),
                 steps: int = 200, lr: float = 1e-4, batch_size: int = 128, seed: int = 0,
                 save: Callable[[list], None] | None = None) -> list[dict[str, Any]]:
    """Merged model of each aligner and the group's first parent (the reference; control), before and
    after the same fine-tuning budget."""
    if ctx.train_x is None or ctx.train_y is None:
        raise ValueError("finetune needs the training set in the context")
    rows: list[dict[str, Any]] = []
    for n, d, chosen in _groups(ctx, ns, draws):
        common = _common("finetune", n, d, chosen)
        group = [ctx.models[i] for i in chosen]
        rows += baseline_rows(ctx, chosen, common)
        starts: dict[str, nn.Module] = {}
        for al in aligners:
            rows.append(merge_row(ctx, group, f"{al} merge", common, keep=starts, aligner=al))
        starts["parent"] = group[0]
        rows.append(dict(common, method="reference parent", accuracy=ctx.accuracy(group[0]), seconds=0.0,
                         parent=chosen[0]))
        for name, start in starts.items():
            t0 = time.perf_counter()
            tuned = finetune(start, ctx.train_x, ctx.train_y, steps=steps, lr=lr, batch_size=batch_size,
                             seed=seed + 1000 * n + d, dataset=ctx.dataset, device=ctx.device)
            acc = ctx.accuracy(tuned)
            label = ("reference parent" if name == "parent" else name) + f" + {steps} steps"
            rows.append(dict(common, method=label, accuracy=acc, seconds=time.perf_counter() - t0))
            print(f"  N={n} draw={d} {label:40s} acc={acc:.4f}", flush=True)
        if save:
            save(rows)
    return rows


# --------------------------------------------------------------------------- splits


def class_split_indices(labels: torch.Tensor, groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per group of classes, the indices of the samples whose label is in it (disjoint splits)."""
    return [torch.nonzero(torch.isin(labels, torch.tensor(list(g))), as_tuple=False).flatten() for g in groups]


def class_groups(num_classes: int, n: int, seed: int = 0) -> list[list[int]]:
    """Split the classes into ``n`` groups of (nearly) equal size; ``seed`` 0 keeps the natural order
    (``0-4 | 5-9`` for n = 2), other seeds shuffle the classes first."""
    order = list(range(num_classes))
    if seed:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_classes, generator=g).tolist()
    sizes = [num_classes // n + (1 if i < num_classes % n else 0) for i in range(n)]
    out, start = [], 0
    for s in sizes:
        out.append(sorted(order[start : start + s]))
        start += s
    return out


def dirichlet_split_indices(labels: torch.Tensor, n: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Skewed class split: for every class, proportions ``p ~ Dirichlet(alpha · 1_n)`` and its samples
    (in a random order) cut into ``n`` consecutive pieces of those sizes. Disjoint; covers everything."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
    dist = torch.distributions.Dirichlet(torch.full((n,), float(alpha), dtype=torch.float64))
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        # sample with the generator: Gamma draws via torch's generator-free API are seeded by a fork
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            p = dist.sample()
        cuts = torch.round(torch.cumsum(p, 0) * len(idx)).long().tolist()
        start = 0
        for m in range(n):
            end = len(idx) if m == n - 1 else cuts[m]
            parts[m].append(idx[start:end])
            start = end
    return [torch.cat(p) if p else torch.empty(0, dtype=torch.long) for p in parts]


def _indices_hash(idx: torch.Tensor) -> str:
    return hashlib.sha256(idx.sort().values.numpy().tobytes()).hexdigest()[:10]


def train_on_subset(config: dict[str, Any], seed: int, x: torch.Tensor, y: torch.Tensor, test: Any,
                    device: str = "cpu", cache: pathlib.Path | None = None, tag: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """Train one model of ``config`` (see :func:`benchmarks.train.make_config`) on ``(x, y)`` with the
    training loop of ``benchmarks/train.py``; cached under ``cache`` by config, seed and subset."""
    from benchmarks.models import build_model
    from benchmarks.train import config_hash, train_one

    path = None
    if cache is not None:
        path = cache / f"{tag}_{config_hash(config)}_{hashlib.sha256(y.numpy().tobytes() + x.flatten(1).sum(1).numpy().tobytes()).hexdigest()[:10]}_seed{seed}.pt"
        if path.is_file():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model = build_model(config["arch"], config["dataset"], width=config["width"], **config["arch_kw"])
            model.load_state_dict(ckpt["state_dict"])
            print(f"  cached {path}", flush=True)
            return model.eval(), ckpt
    ckpt = train_one(config, seed, (x, y), test, torch.device(device), False)
    model = build_model(config["arch"], config["dataset"], width=config["width"], **config["arch_kw"])
    model.load_state_dict(ckpt["state_dict"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
    print(f"  trained {tag} seed={seed} on {len(y)} images: test acc {ckpt['test_accuracy']:.4f} "
          f"({ckpt['train_seconds']:.0f}s)", flush=True)
    return model.eval(), ckpt


def split_group_rows(ctx: Context, group: Sequence[nn.Module], common: dict[str, Any], aligners: Sequence[str],
                     save: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Parents, best parent, parent mean, ensemble and every aligner's merge of one split group."""
    labels = ctx.labels
    logits = [ctx.logits(m) for m in group]
    accs = [accuracy_from_logits(lg, labels) for lg in logits]
    rows = [dict(common, method=f"parent {i}", accuracy=a, seconds=0.0) for i, a in enumerate(accs)]
    rows.append(dict(common, method="parent mean", accuracy=statistics.mean(accs), seconds=0.0))
    rows.append(dict(common, method="best parent", accuracy=max(accs), seconds=0.0))
    rows.append(dict(common, method="ensemble", accuracy=accuracy_from_logits(torch.stack(logits).mean(0), labels),
                     seconds=0.0))
    for al in aligners:
        rows.append(merge_row(ctx, group, al, common, aligner=al))
        if save:
            save()
    return rows


def run_splits(ctx: Context, ns: Sequence[int], draws: int | dict[int, int], kinds: Sequence[str] = ("disjoint", "dirichlet"),
               aligners: Sequence[str] | None = None, alpha: float = 0.5, config: dict[str, Any] | None = None,
               cache: pathlib.Path | None = None, num_classes: int = 10,
               save: Callable[[list], None] | None = None,
               trainer: Callable[..., tuple[nn.Module, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Train N models per split (draw ``d``: model seeds ``100 d + m``; disjoint class groups from
    :func:`class_groups` with seed ``d``; Dirichlet proportions with seed ``d``), merge with every aligner."""
    if ctx.train_x is None or ctx.train_y is None:
        raise ValueError("splits needs the training set in the context")
    aligners = list(aligners or autoalign.list_aligners())
    trainer = trainer or train_on_subset
    rows: list[dict[str, Any]] = []
    ytr = ctx.train_y.long()
    for kind in kinds:
        for n in ns:
            for d in range(draws.get(n, 1) if isinstance(draws, dict) else draws):
                if kind == "disjoint":
                    groups = class_groups(num_classes, n, seed=d)
                    parts = class_split_indices(ytr, groups)
                    desc = " / ".join("".join(map(str, g)) if num_classes <= 10 else str(g) for g in groups)
                else:
                    parts = dirichlet_split_indices(ytr, n, alpha, seed=d)
                    counts = [torch.bincount(ytr[p], minlength=num_classes).tolist() for p in parts]
                    desc = "; ".join(f"m{m}: {len(p)} imgs" for m, p in enumerate(parts))
                print(f"splits {kind} N={n} draw={d}: {desc}", flush=True)
                group, ckpts = [], []
                for m, idx in enumerate(parts):
                    model, ck = trainer(config, 100 * d + m, ctx.train_x[idx], ytr[idx], ctx.test, device=ctx.device,
                                        cache=cache, tag=f"{kind}_n{n}_d{d}_m{m}")
                    group.append(model)
                    ckpts.append(ck)
                common = dict(item="splits", kind=kind, n=n, draw=d, models=list(range(n)), split=desc,
                              train_sizes=[len(p) for p in parts])
                if kind == "dirichlet":
                    common["class_counts"] = counts
                rows += split_group_rows(ctx, group, common, aligners, save=(lambda: save(rows)) if save else None)
                if save:
                    save(rows)
    return rows


# --------------------------------------------------------------------------- reporting


def methods_in(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _cell(accs: list[float]) -> str:
    if not accs:
        return ""
    if len(accs) == 1:
        return f"{accs[0]:.2f}"
    return f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"


def summary_table(rows: Sequence[dict[str, Any]], group_key: Callable[[dict[str, Any]], str] = lambda r: f"N={r['n']}") -> list[str]:
    """Method × group (default: N) table of mean ± std over draws, with every draw in brackets."""
    cols: list[str] = []
    for r in rows:
        if group_key(r) not in cols:
            cols.append(group_key(r))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in methods_in(rows):
        cells = []
        for c in cols:
            sel = [r for r in rows if r["method"] == m and group_key(r) == c]
            accs = [100 * r["accuracy"] for r in sel if r.get("accuracy") is not None]
            errs = [r for r in sel if r.get("error")]
            cell = _cell(accs)
            if len(accs) > 1:
                cell += " (" + ", ".join(f"{a:.2f}" for a in accs) + ")"
            if errs:
                cell += (" " if cell else "") + f"error ×{len(errs)}"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def draws_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    extra = "kind" if any("kind" in r for r in rows) else None
    head = "| " + ("kind | " if extra else "") + "N | draw | models | method | accuracy | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = "error" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}"
        models = r.get("split", r["models"])
        lines.append("| " + (f"{r.get('kind', '')} | " if extra else "")
                     + f"{r['n']} | {r['draw']} | {models} | {r['method']} | {acc} | {r['seconds']:.1f} |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    item = result["item"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}; "
        f"whole run {result.get('total_wall_seconds', 0) / 60:.1f} min wall clock.  ",
        result.get("setup", ""),
        "",
    ]
    key = (lambda r: f"{r['kind']} N={r['n']}") if item == "splits" else (lambda r: f"N={r['n']}")
    lines += ["Test accuracy (%), mean ± std over draws (every draw in brackets):", ""] + summary_table(rows, key)
    lines += ["", "Every draw (test accuracy, %; models = indices into the seed list, or the class split; "
              "seconds = merge / fine-tuning wall time):", "", *draws_table(rows)]
    errors = sorted({(r["method"], r["error"]) for r in rows if r.get("error")})
    if errors:
        lines += ["", "Failures:", ""] + [f"- {m}: `{e}`" for m, e in errors]
    return "\n".join(lines) + "\n"


def doc_section(result: dict[str, Any], title: str) -> str:
    """A docs section for one item: question, command, machine, set-up, the draws, the summary table
    (mean ± std and every draw)."""
    rows = result["rows"]
    item = result["item"]
    draws: list[str] = []
    for r in rows:
        key = (f"{r['kind']} " if "kind" in r else "") + f"N={r['n']} draw {r['draw']}: " + (
            f"split {r['split']}" + (f", training images per model {r['train_sizes']}" if "train_sizes" in r else "")
            if "split" in r else f"models {r['models']}")
        if key not in draws:
            draws.append(key)
    key_fn = (lambda r: f"{r['kind']} N={r['n']}") if item == "splits" else (lambda r: f"N={r['n']}")
    lines = [
        f"## {title}", "",
        f"**Question.** {result['question']}", "",
        f"Command: `nice -n 19 {result['command']}`  ",
        f"Machine: {result['machine']}; torch {result['torch']}; {result['date']}; "
        f"whole run {result.get('total_wall_seconds', 0) / 60:.1f} min wall clock (2 cores shared with two other benchmark runs).  ",
        result.get("setup", ""), "",
        "Draws: " + "; ".join(draws) + ".", "",
        "Test accuracy (%), mean ± std over the draws, every draw in brackets (in the order above):", "",
        *summary_table(rows, key_fn),
    ]
    errors = sorted({(r["method"], r["error"]) for r in rows if r.get("error")})
    if errors:
        lines += ["", "Failures:", ""] + [f"- {m}: `{e}`" for m, e in errors]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def _arch_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {"hidden": list(args.hidden)}


def load_context(args: argparse.Namespace, need_models: bool = True, calibration: int | None = None) -> Context:
    """The MNIST context: base models (trained or reused), calibration, test and training data."""
    from benchmarks.train import load_checkpoint, train_models

    models: list[nn.Module] = []
    accs: list[float] = []
    if need_models:
        paths = train_models(args.dataset, "mlp", args.seeds, epochs=args.epochs, device=args.device,
                             data_root=args.data_root, out_dir=args.checkpoints, num_threads=args.threads,
                             **_arch_kw(args))
        loaded = [load_checkpoint(p, map_location=args.device) for p in paths]
        models = [m for m, _ in loaded]
        accs = [float(c["test_accuracy"]) for _, c in loaded]
    xtr, ytr = load_dataset(args.dataset, data_root=args.data_root, split="train")
    xte, yte = load_dataset(args.dataset, data_root=args.data_root, split="test")
    if args.test_limit:
        xte, yte = xte[: args.test_limit], yte[: args.test_limit]
    g = torch.Generator().manual_seed(12345)
    idx = torch.randperm(len(xtr), generator=g)[: calibration or args.calibration]
    calib = _batches(make_loader(xtr[idx], ytr[idx], batch_size=args.batch_size, shuffle=False, dataset=args.dataset))
    test = _batches(make_loader(xte, yte, batch_size=1000, shuffle=False, dataset=args.dataset))
    meta = {"base_accuracy": accs, "calibration_samples": len(idx), "test_samples": len(yte)}
    return Context(models, calib, test, xtr, ytr.long(), args.dataset, args.device, meta)


def _setup_line(args: argparse.Namespace, ctx: Context, extra: str = "") -> str:
    base = ""
    if ctx.meta.get("base_accuracy"):
        base = (f" Base models: 784-{'-'.join(map(str, args.hidden))}-10 ReLU MLPs, seeds {args.seeds}, {args.epochs} epochs "
                f"(Adam, benchmarks/train.py defaults); test accuracies "
                + ", ".join(f"{100 * a:.2f}" for a in ctx.meta["base_accuracy"]) + " %.")
    return (f"Data: {args.dataset}; calibration: {ctx.meta['calibration_samples']} training images (fixed draw, "
            f"batches of {args.batch_size}); accuracy on {ctx.meta['test_samples']} test images; no repair (no BatchNorm); "
            f"reference = first model of each draw.{base} {extra}").strip()


def run_item(item: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = pathlib.Path(args.out) / item
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    ns = args.n or {"hierarchical": [4, 8], "fisher": [2, 4]}.get(item, [2, 4, 8] if item == "ablation" else [2, 4])
    if quick:
        ns = [2] if item != "hierarchical" else [4]
    draws = 1 if quick else (args.draws if args.draws else {"splits": 2, "fisher": 2}.get(item, 3))
    calibration = args.fisher_calibration if item == "fisher" else None
    if quick and item == "fisher":
        calibration = 100
    ctx = load_context(args, need_models=item != "splits", calibration=calibration)
    extra = ""
    if item == "learned":
        extra = (f"Learned averaging: Adam on the coefficient logits, lr {args.learned_lr}, {args.learned_epochs} epochs over "
                 "the calibration batches; the distillation rows get the calibration inputs without labels.")
    elif item == "fisher":
        extra = ("Fisher: diagonal true Fisher (labels sampled from each aligned model), on the same calibration images "
                 "as the statistics; the uniform rows use the same calibration set.")
    elif item == "finetune":
        extra = (f"Fine-tuning: {args.ft_steps} Adam steps, constant lr {args.ft_lr}, batches of {args.ft_batch} from the full "
                 "training set, the same batches for every start of a draw; the parent control is the draw's first model "
                 "(the merge reference).")
    elif item == "hierarchical":
        extra = "Iterative: up to 10 re-alignment rounds (library default), only for aligners that align to a reference."
    result: dict[str, Any] = {
        "item": item,
        "question": QUESTIONS[item],
        "command": args.command_line,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(args.device, args.threads),
        "torch": torch.__version__,
        "autoalign": getattr(autoalign, "__version__", "?"),
        "aligners_registered": autoalign.list_aligners(),
        "meta": ctx.meta,
        "rows": [],
    }

    def save(rows: list[dict[str, Any]]) -> None:
        result["rows"] = rows
        result["total_wall_seconds"] = time.perf_counter() - t_start
        (out / "results.json").write_text(json.dumps(result, indent=1))

    if item == "ablation":
        rows = run_ablation(ctx, ns, draws, save=save, **({"aligners": args.aligners} if args.aligners else {}))
    elif item == "learned":
        rows = run_learned(ctx, ns, draws, epochs=1 if quick else args.learned_epochs, lr=args.learned_lr, save=save)
    elif item == "hierarchical":
        kw: dict[str, Any] = {"aligners": args.aligners} if args.aligners else {}
        if args.schemes:
            kw["schemes"] = args.schemes
        rows = run_hierarchical(ctx, ns, draws, save=save, **kw)
    elif item == "fisher":
        rows = run_fisher(ctx, ns, draws, save=save)
    elif item == "finetune":
        rows = run_finetune(ctx, ns, draws, steps=20 if quick else args.ft_steps, lr=args.ft_lr,
                            batch_size=args.ft_batch, save=save)
    elif item == "splits":
        from benchmarks.train import make_config

        epochs = 1 if quick else args.split_epochs
        config = make_config(args.dataset, "mlp", epochs=epochs, batch_size=128, arch_kw=_arch_kw(args))
        aligners = ["cca", "permutation", "identity"] if quick else None
        extra = (f"Split models: 784-{'-'.join(map(str, args.hidden))}-10 MLPs (10-way head), {epochs} epochs of "
                 f"benchmarks/train.py's training loop (Adam, cosine) on their part of the training set; draw d: model "
                 f"seeds 100d+m; disjoint: the 10 classes cut into N groups (draw 0 in natural order, other draws "
                 f"shuffled first); dirichlet: per class, shares ~ Dirichlet({args.alpha}) over the N models.")
        if not quick and not args.draws:
            draws = {n: (2 if n <= 2 else 1) for n in ns}  # CPU budget: N = 4 merges (mcca, zipit) are slow
        extra += f" Draws per N: {draws}."
        rows = run_splits(ctx, ns, draws, aligners=aligners, alpha=args.alpha, config=config,
                          cache=pathlib.Path(args.checkpoints) / "beyond_splits", save=save)
    else:
        raise ValueError(item)
    result["setup"] = _setup_line(args, ctx, extra)
    save(rows)
    (out / "results.md").write_text(to_markdown(result))
    print(to_markdown(result), flush=True)
    print(f"wrote {out}/results.json, results.md", flush=True)
    return result


TITLES = {
    "ablation": "1. Ablation: CCA against lstsq, procrustes and permutation",
    "learned": "2. Learned merging coefficients",
    "hierarchical": "3. Hierarchical against all-to-one and iterative",
    "fisher": "4. Fisher-weighted averaging",
    "finetune": "5. Post-merge fine-tuning",
    "splits": "6. Models trained on different class splits",
}


def plot_accuracy_vs_n(result: dict[str, Any], path: pathlib.Path, skip: Sequence[str] = (), title: str = "") -> None:
    """Mean ± std test accuracy against N, one line per method (``skip``: methods left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in methods_in(rows):
        if m in skip:
            continue
        ns, means, stds = [], [], []
        for n in sorted({r["n"] for r in rows}):
            accs = [100 * r["accuracy"] for r in rows if r["method"] == m and r["n"] == n and r.get("accuracy") is not None]
            if accs:
                ns.append(n)
                means.append(statistics.mean(accs))
                stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        base = m in ("parent mean", "ensemble")
        ax.errorbar(ns, means, yerr=stds, marker="o", markersize=4, capsize=2, linestyle="--" if base else "-",
                    color="black" if m == "ensemble" else ("grey" if base else None), label=m)
    ax.set_xlabel("number of merged models N")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: pathlib.Path, path: pathlib.Path) -> None:
    """Assemble one markdown file from every ``<out>/<item>/results.json`` that exists."""
    parts = ["# Beyond the paper: answers to issue #8", "",
             "Every table below is generated by `python benchmarks/beyond.py report` from the `results.json` "
             "of the command printed above it.", ""]
    for item in ITEMS:
        f = out / item / "results.json"
        if f.is_file():
            result = json.loads(f.read_text())
            parts.append(doc_section(result, TITLES[item]))
            if item == "ablation":
                img = path.parent / "img" / "beyond_ablation.png"
                plot_accuracy_vs_n(result, img, skip=("lstsq",),
                                   title="MNIST 784-512-512-10, 2,000 calibration images (lstsq, 12-14 %, off the scale)")
                parts.append(f"![ablation: accuracy against N](img/{img.name})\n")
    path.write_text("\n".join(parts))
    print(f"wrote {path}", flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("item", choices=[*ITEMS, "all", "report"], help="report: assemble --report-to from the results")
    ap.add_argument("--report-to", default="benchmarks/out/beyond/report.md")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the base models")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="default per item")
    ap.add_argument("--draws", type=int, default=None, help="default: 3 (2 for fisher and splits)")
    ap.add_argument("--aligners", nargs="+", default=None,
                    help="ablation: aligners to compare, NAME or NAME:key=value,... (default: cca lstsq procrustes permutation); "
                         "hierarchical: aligner names (default: cca permutation)")
    ap.add_argument("--schemes", nargs="+", default=None, help="hierarchical only: schemes to compare")
    ap.add_argument("--calibration", type=int, default=2000)
    ap.add_argument("--fisher-calibration", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=250, help="calibration batch size")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--learned-epochs", type=int, default=5)
    ap.add_argument("--learned-lr", type=float, default=0.05)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--ft-batch", type=int, default=128)
    ap.add_argument("--split-epochs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/out/beyond")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.command_line = "python benchmarks/beyond.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.seeds = args.seeds[:4]
        args.calibration = min(args.calibration, 500)
        args.test_limit = args.test_limit or 2000
    if args.item == "report":
        write_report(pathlib.Path(args.out), pathlib.Path(args.report_to))
        return 0
    items = ITEMS if args.item == "all" else (args.item,)
    for item in items:
        print(f"=== {item}", flush=True)
        run_item(item, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
