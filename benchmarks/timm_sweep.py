"""Self-check sweep over timm's model zoo: one model per architecture module.

Usage::

    python benchmarks/timm_sweep.py                       # every module, resumable
    python benchmarks/timm_sweep.py --modules resnet,vgg  # a subset
    python benchmarks/timm_sweep.py --resume              # skip modules already in the JSON
    python benchmarks/timm_sweep.py --render              # only rewrite the markdown table

For each ``timm.models`` submodule that registers models, the model with the fewest
parameters is picked (parameter counts are taken on the ``meta`` device, so nothing is
allocated), built randomly initialised (``pretrained=False``, ``num_classes=10``), its
constant tensors perturbed and BatchNorm statistics calibrated on random images (as
:func:`autoalign.examples.zoo.torchvision_example` does), and ``autoalign.check`` is
run on a batch of 2 images of its ``pretrained_cfg`` size (at most 224 px where the
model accepts ``img_size``). Each model runs in a subprocess with a time limit, so one
hang does not stop the sweep. A float32 failure is re-checked with the same spec in
float64 (deep random nets amplify float32 rounding).

Results: ``benchmarks/results/timm/timm_sweep_results.json`` (one row per module) and
the markdown table ``benchmarks/results/timm/timm_sweep_table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback
from typing import Any

if str(pathlib.Path(__file__).resolve().parents[1]) not in sys.path:  # appended: PYTHONPATH still picks autoalign
    sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.coverage import cpu_name  # noqa: E402

RESULTS = pathlib.Path("benchmarks/results/timm/timm_sweep_results.json")
TABLE = pathlib.Path("benchmarks/results/timm/timm_sweep_table.md")
MAX_PARAMS = 200e6  # skip a module's models above this (only vgg's smallest is over 100 M)
MAX_SIDE = 224

CATEGORIES = {
    "pass": "self-check ok in float32",
    "pass_float64": "float32 check fails by rounding only; the same spec passes in float64",
    "trace": "symbolic tracing (torch.fx) failed: TraceError",
    "discovery": "discovery raised (a channel rule or assembly error)",
    "mismatch": "self-check mismatch (outputs differ after permuting, also in float64)",
    "timeout": "over the per-model time limit",
    "build": "model build / forward error (before autoalign runs)",
    "no_model": "no model of the module could be built under the parameter limit",
}


# ----------------------------------------------------------------------------- worker (one module)


def _param_count_meta(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=10)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001 - some models do real work in __init__
        return None


def pick_model(module: str) -> tuple[str | None, int | None, list[str]]:
    """The model of ``module`` with the fewest parameters (counted on the meta device)."""
    import timm

    names = timm.list_models(module=module)
    real = [n for n in names if not n.startswith("test_")]
    names = real or names  # timm's ``test_*`` models are cut-down configs for its CI: prefer real ones
    counts: dict[str, int] = {}
    notes: list[str] = []
    for n in names:
        c = _param_count_meta(n)
        if c is not None:
            counts[n] = c
    if not counts:  # meta construction failed for all: try the names that look smallest, for real
        notes.append("meta-device construction failed for all models; built the one whose name looks smallest")
        for n in sorted(names, key=_size_hint)[:1]:
            try:
                m = timm.create_model(n, pretrained=False, num_classes=10)
                counts[n] = sum(p.numel() for p in m.parameters())
                del m
            except Exception:  # noqa: BLE001
                continue
    small = {n: c for n, c in counts.items() if c <= MAX_PARAMS}
    if not small:
        return None, (min(counts.values()) if counts else None), notes
    best = min(small, key=lambda n: (small[n], n))
    return best, small[best], notes


_HINTS = ("pico", "atto", "femto", "nano", "tiny", "xxs", "xs", "small", "s", "b0", "18", "lite", "t")


def _size_hint(name: str) -> int:
    for i, h in enumerate(_HINTS):
        if re.search(rf"(^|_){h}($|_|\d)", name):
            return i
    return len(_HINTS)


def _input_side(cfg: dict[str, Any]) -> tuple[int, int, int]:
    size = cfg.get("input_size") or (3, 224, 224)
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def build(name: str, seed: int = 0):
    """The model in eval mode, perturbed and BatchNorm-calibrated, and an input batch of 2."""
    import timm
    import torch

    from autoalign.examples.zoo import break_symmetry
    from autoalign.repair import reset_bn

    torch.manual_seed(seed)
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else (cfg or {})
    c, h, w = _input_side(cfg)
    tries: list[tuple[dict[str, Any], int, int]] = []
    if max(h, w) > MAX_SIDE:  # many transformers take img_size; fall back to the native size
        tries.append(({"img_size": MAX_SIDE}, MAX_SIDE, MAX_SIDE))
    tries.append(({}, h, w))
    model = None
    for i, (kw, hh, ww) in enumerate(tries):
        try:
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
            with torch.no_grad():
                model(torch.randn(2, c, hh, ww))
            h, w = hh, ww
            break
        except Exception:  # noqa: BLE001
            if i == len(tries) - 1:
                raise
    model.eval()
    break_symmetry(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:
        reset_bn(model, [torch.randn(4, c, h, w, generator=g) for _ in range(2)])
    x = torch.randn(2, c, h, w, generator=g)
    return model, x


_NODE_TARGET = re.compile(r"(call_module|call_function|call_method)\[target=([^\]]+)\]")
_NODE_CALL = re.compile(r"^%[\w.]+ = (.+?)\(")


def _no_rule_op(reason: str, model=None) -> str:
    """The op a "no channel rule" reason names: a function, ``.method`` or ``name (ModuleClass)``."""
    m = _NODE_TARGET.search(reason)
    if m:
        op, target = m.groups()
        if op == "call_module" and model is not None:
            try:
                sub = model.get_submodule(target)
                return f"{type(sub).__module__}.{type(sub).__qualname__}"
            except Exception:  # noqa: BLE001
                pass
        return target
    m = _NODE_CALL.search(reason)
    return m.group(1) if m else reason[:80]


def _frozen_summary(model, spec) -> tuple[dict[str, int], list[str]]:
    """Frozen non-io points: counts by the op that has no rule, and the distinct reasons (node names stripped)."""
    ops: dict[str, int] = {}
    reasons: dict[str, None] = {}
    for p in spec.points:
        if p.kind != "frozen" or p.io:
            continue
        r = p.reason or ""
        if "no channel rule" in r:
            key = _no_rule_op(r, model)
            ops[key] = ops.get(key, 0) + 1
        short = re.sub(r"%[\w.]+ : \[num_users=\d+\] = ", "", r)
        short = re.sub(r"args = \(.*?\), kwargs = \{.*?\}", "...", short)
        reasons[short[:300]] = None
    return ops, list(reasons)[:12]


_FAILED_IN = re.compile(r"failed inside module '([^']*)'")


def _retry_with_leaves(model, x, exc: BaseException, tries: int = 6) -> dict[str, Any]:
    """The escape hatch a user would take after a TraceError: mark the module it names a
    leaf (its class, so every instance) and check again; repeat while tracing fails."""
    import autoalign
    from autoalign.errors import TraceError

    try:
        from autoalign.graph.rules.timm import timm_leaf_modules
    except ImportError:  # an autoalign without the timm rules
        timm_leaf_modules = list  # noqa: N806
    leaves: list[type] = list(timm_leaf_modules())
    t0 = time.perf_counter()
    for _ in range(tries):
        m = _FAILED_IN.search(str(exc))
        if not m or m.group(1) in ("", "<root>"):
            return {"ok": False, "leaves": [c.__name__ for c in leaves], "error": _first_line(exc)[:300]}
        cls = type(model.get_submodule(m.group(1)))
        if cls in leaves:
            break
        leaves.append(cls)
        try:
            rep = autoalign.check(model, x, leaf_modules=leaves)
        except TraceError as e:
            exc = e
            continue
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "leaves": [c.__name__ for c in leaves], "error": f"{type(e).__name__}: {_first_line(e)}"[:300]}
        ok = rep.ok
        if not ok:
            try:
                ok = autoalign.check(model.double(), x.double(), spec=rep.spec).ok
            finally:
                model.float()
        return {"ok": ok, "ok32": rep.ok, "leaves": [c.__name__ for c in leaves], "coverage": rep.coverage,
                "kinds": rep.spec.kind_counts(), "seconds": round(time.perf_counter() - t0, 1)}
    return {"ok": False, "leaves": [c.__name__ for c in leaves], "error": _first_line(exc)[:300]}


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return (s[0] if s else "")[:500]


def run_module(module: str, threads: int = 1, tracer: str | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import timm

    import autoalign
    from autoalign.errors import TraceError

    row: dict[str, Any] = {"module": module, "timm": timm.__version__, "torch": torch.__version__,
                           "autoalign_root": str(pathlib.Path(autoalign.__file__).resolve().parent.parent)}
    t0 = time.perf_counter()
    name, params, notes = pick_model(module)
    row.update(model=name, params=params, notes=notes, pick_seconds=round(time.perf_counter() - t0, 1))
    if name is None:
        row.update(ok=False, category="no_model", error=f"no model under {MAX_PARAMS:.0e} parameters")
        return row
    t1 = time.perf_counter()
    try:
        model, x = build(name)
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001
        row.update(ok=False, category="build", error_type=type(exc).__name__, error=_first_line(exc),
                   seconds=round(time.perf_counter() - t1, 1))
        return row
    row["params"] = sum(p.numel() for p in model.parameters())
    row["input"] = "x".join(map(str, x.shape[1:]))
    kw = {"tracer": tracer} if tracer else {}
    if tracer:
        row["tracer"] = tracer
    try:
        rep = autoalign.check(model, x, **kw)
    except TraceError as exc:
        row.update(ok=False, category="trace", error_type=type(exc).__name__, error=_first_line(exc),
                   seconds=round(time.perf_counter() - t1, 1))
        row["with_leaves"] = _retry_with_leaves(model, x, exc)
        return row
    except Exception as exc:  # noqa: BLE001
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{pathlib.Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        row.update(ok=False, category="discovery", error_type=type(exc).__name__, error=_first_line(exc),
                   where=where, seconds=round(time.perf_counter() - t1, 1))
        return row
    row.update(
        ok32=rep.ok, diff=rep.max_abs_diff, scale=rep.output_scale, tolerance=rep.tolerance,
        points=rep.points, permuted=rep.permuted, kinds=rep.spec.kind_counts(), coverage=rep.coverage,
    )
    ops, reasons = _frozen_summary(model, rep.spec)
    row.update(no_rule_ops=ops, frozen_reasons=reasons)
    try:  # timm layers that have a rule as leaves (autoalign.graph.rules.timm): what a user gets with them
        from autoalign.graph.rules.timm import timm_leaf_modules

        leaves = tuple(timm_leaf_modules())
        if leaves and any(isinstance(mod, leaves) for mod in model.modules()) and rep.coverage < 1.0:
            rl = autoalign.check(model, x, leaf_modules=list(leaves))
            row["with_timm_leaves"] = {"ok": rl.ok, "coverage": rl.coverage, "kinds": rl.spec.kind_counts()}
    except Exception as exc:  # noqa: BLE001
        row["with_timm_leaves"] = {"ok": False, "error": f"{type(exc).__name__}: {_first_line(exc)}"[:300]}
    ok = rep.ok
    if not rep.ok:
        try:
            rep64 = autoalign.check(model.double(), x.double(), spec=rep.spec)
            row.update(ok64=rep64.ok, diff64=rep64.max_abs_diff, scale64=rep64.output_scale,
                       tolerance64=rep64.tolerance)
            ok = rep64.ok
        except Exception as exc:  # noqa: BLE001
            row.update(ok64=False, error64=f"{type(exc).__name__}: {_first_line(exc)}")
    row["ok"] = ok
    row["category"] = "pass" if rep.ok else ("pass_float64" if ok else "mismatch")
    row["seconds"] = round(time.perf_counter() - t1, 1)
    return row


# ----------------------------------------------------------------------------- driver


def all_modules() -> list[str]:
    from timm.models import list_modules

    return sorted(list_modules())


def load() -> dict[str, dict[str, Any]]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(rows: dict[str, dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(sorted(rows.items())), indent=1) + "\n")


def run_in_subprocess(module: str, timeout: float, threads: int, tracer: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", module, "--threads", str(threads)]
    if tracer:
        cmd += ["--tracer", tracer]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"module": module, "ok": False, "category": "timeout", "error": f"over {timeout:.0f} s",
                "seconds": round(time.perf_counter() - t0, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"module": module, "ok": False, "category": "build", "error_type": f"exit {proc.returncode}",
            "error": " | ".join(tail)[:500], "seconds": round(time.perf_counter() - t0, 1)}


def _commit(root: str | None = None) -> str:
    """The autoalign commit the row was measured with (``+dirty`` when the tree had changes)."""
    here = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "autoalign"], capture_output=True,
                               text=True, check=False).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def write_table(rows: dict[str, dict[str, Any]], out: pathlib.Path = TABLE) -> str:
    """A markdown table of the rows (also written to ``out``); returns the text."""
    lines = [
        "| module | model | params (M) | input | result | max abs Δ | tolerance | points | linear | orthogonal | "
        "permutation | frozen | coverage | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mod in sorted(rows):
        r = rows[mod]
        kc = r.get("kinds") or {}
        cat = r.get("category", "?")
        res = {"pass": "yes", "pass_float64": "yes (float64)"}.get(cat, f"**NO: {cat}**")
        diff = r.get("diff64") if cat == "pass_float64" else r.get("diff")
        tol = r.get("tolerance64") if cat == "pass_float64" else r.get("tolerance")
        params = r.get("params")
        lines.append(
            f"| {mod} | {r.get('model') or ''} | {_fmt(params / 1e6 if params else None, '.2f')} | "
            f"{r.get('input', '')} | {res} | {_fmt(diff, '.1e')} | {_fmt(tol, '.1e')} | {r.get('points', '')} | "
            f"{kc.get('linear', '')} | {kc.get('orthogonal', '')} | {kc.get('permutation', '')} | "
            f"{kc.get('frozen', '')} | {_fmt(r.get('coverage'), '.3f')} | {_fmt(r.get('seconds'), '.1f')} |"
        )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


DOC = pathlib.Path("docs/coverage_timm.md")
ANALYSIS = pathlib.Path("benchmarks/results/timm/analysis.md")
EXPORT = pathlib.Path("benchmarks/results/timm/timm_sweep_export.json")


def _reason_group(r: dict[str, Any]) -> str:
    """A short cause of a failure, for grouping."""
    cat = r.get("category")
    err = r.get("error", "") or ""
    if cat == "trace":
        m = re.search(r"TraceError: (.*?)(\. Mark that|$)", err)
        inner = m.group(1) if m else err
        inner = re.sub(r"failed inside module '[^']*' ", "", inner)
        if "control flow" in inner:
            return "fx: a traced value used in Python control flow (shape- or value-dependent `if`/loop)"
        if "iterate" in inner or "Proxy object cannot be iterated" in inner:
            return "fx: iterating over a traced value"
        return "fx: " + inner[:120]
    if cat == "build":
        return f"model build/forward: {r.get('error_type', '')}: {err[:100]}"
    if cat == "discovery":
        return f"discovery: {r.get('error_type', '')} at {r.get('where', '?')}: {err[:100]}"
    if cat == "mismatch":
        return "self-check mismatch (float32 and float64)"
    return CATEGORIES.get(cat, cat)


def write_doc(rows: dict[str, dict[str, Any]], out: pathlib.Path = DOC) -> None:
    """docs/coverage_timm.md: summary, failures grouped by cause, the per-module table."""
    import timm
    import torch

    n = len(rows)
    ok = [m for m, r in rows.items() if r.get("ok")]
    ok32 = [m for m, r in rows.items() if r.get("category") == "pass"]
    cats: dict[str, list[str]] = {}
    for m, r in sorted(rows.items()):
        cats.setdefault(r.get("category", "?"), []).append(m)
    missing = [m for m in all_modules() if m not in rows]
    dates = sorted({r.get("date", "?") for r in rows.values()})
    machine = sorted({r.get("machine", "?") for r in rows.values()})
    commits = sorted({r.get("commit", "?") for r in rows.values()})
    total = sum(r.get("seconds") or 0 for r in rows.values()) + sum(r.get("pick_seconds") or 0 for r in rows.values())
    L = [
        "# Self-check and coverage on timm's model zoo",
        "",
        f"Produced by `PYTHONPATH=. python benchmarks/timm_sweep.py --resume` then `--doc`, on {', '.join(dates)}; "
        f"timm {timm.__version__}, torch {torch.__version__}; machine: {'; '.join(machine)} (shared with other "
        f"jobs), no GPU; autoalign commit(s) {', '.join(commits)}. Sum of per-module times {total / 60:.1f} min "
        f"(picking the model included). Rows: `benchmarks/results/timm/timm_sweep_results.json`.",
        "",
        "**What is measured.** For every `timm.models` submodule that registers models (an *architecture module*; "
        f"{len(all_modules())} in this timm), the model with the fewest parameters (counted on the meta device; "
        "timm's cut-down `test_*` models excluded) is built randomly initialised with `num_classes=10, "
        "pretrained=False`, in eval mode; constant tensors are perturbed and BatchNorm statistics calibrated on random "
        "images (as for torchvision, `autoalign.examples.zoo`); the input is a batch of 2 at the model's "
        "`pretrained_cfg` size (224 px instead of a larger native size where the model takes `img_size`). "
        "`autoalign.check(model, x)` permutes every non-frozen merge point at random and compares outputs, float32; "
        "a float32 failure is re-checked with the same spec in float64. Each module runs in a subprocess with a "
        "300 s limit. **ok** means max |Δ| ≤ 1e-4 · max(1, max |output|). **coverage** = (sum of dims of non-frozen "
        "points) / (sum of dims of all points not on the model's inputs/outputs).",
        "",
        f"## Summary",
        "",
        f"**{len(ok)} of {n} architecture modules pass ({100 * len(ok) / max(n, 1):.1f} %)**: {len(ok32)} in float32, "
        f"{len(cats.get('pass_float64', []))} only in float64 (float32 rounding amplified by a deep random net). "
        + (f"**Not measured (sweep stopped):** {', '.join(missing)}." if missing else "All modules measured."),
        "",
        "| category | modules | count |",
        "|---|---|---|",
    ]
    for c in ["pass", "pass_float64", "trace", "discovery", "mismatch", "timeout", "build", "no_model"]:
        if c in cats:
            mods = cats[c]
            L.append(f"| {c}: {CATEGORIES[c]} | {', '.join(mods) if not c.startswith('pass') else '…'} | {len(mods)} |")
    covs = sorted((r["coverage"], m) for m, r in rows.items() if r.get("ok") and r.get("coverage") is not None)
    if covs:
        import statistics

        L += ["", f"Coverage of the passing models: median {statistics.median(c for c, _ in covs):.3f}, "
              f"{sum(c >= 0.95 for c, _ in covs)} of {len(covs)} at ≥ 0.95, {sum(c < 0.6 for c, _ in covs)} below 0.6 "
              f"(lowest: {', '.join(f'{m} {c:.2f}' for c, m in covs[:6])})."]
    # failures grouped by cause
    groups: dict[str, list[str]] = {}
    for m, r in sorted(rows.items()):
        if not r.get("ok"):
            groups.setdefault(_reason_group(r), []).append(m)
    if groups:
        L += ["", "## Every failure, grouped by cause", ""]
        for g, mods in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            L.append(f"### {g} ({len(mods)})")
            L.append("")
            for m in mods:
                r = rows[m]
                line = f"- `{m}` (`{r.get('model')}`): "
                if r.get("category") == "mismatch":
                    line += (f"max |Δ| {r.get('diff'):.3g} at output scale {r.get('scale'):.3g} (float32), "
                             f"{r.get('diff64', float('nan')):.3g} in float64; coverage {r.get('coverage', 0):.3f}")
                else:
                    line += f"{r.get('error_type', '')}: {(r.get('error') or '').replace('`', chr(39))[:300]}"
                wl = r.get("with_leaves")
                if wl:
                    if wl.get("ok"):
                        line += (f" — **with `leaf_modules=[{', '.join(wl['leaves'])}]` the check passes**, coverage "
                                 f"{wl['coverage']:.3f}")
                    else:
                        line += f" — marking the failing module a leaf does not help ({wl.get('error', '')[:150]})"
                L.append(line)
            L.append("")
    # frozen points: ops without a channel rule, and the other reasons
    ops: dict[str, list[str]] = {}
    for m, r in sorted(rows.items()):
        for op in (r.get("no_rule_ops") or {}):
            ops.setdefault(op, []).append(m)
    if ops:
        L += ["## Ops without a channel rule (their coordinates are frozen)", ""]
        for op, mods in sorted(ops.items(), key=lambda kv: -len(kv[1])):
            L.append(f"- `{op}`: {', '.join(mods)}")
        L.append("")
    low = [(m, r) for m, r in sorted(rows.items()) if r.get("coverage") is not None and r["coverage"] < 0.95]
    if low:
        L += ["## Models with coverage below 0.95: why points are frozen", "",
              "The distinct reasons of frozen points (node names and arguments shortened; at most 5 per model).", ""]
        for m, r in low:
            L.append(f"- `{m}` (`{r.get('model')}`, coverage {r['coverage']:.3f}):")
            distinct = dict.fromkeys(re.sub(r"\(add_?\d*\)|\(mul_?\d*\)|\(conv2d_?\d*\)", "(…)",
                                            re.sub(r"%[\w.]+", "%…", reason)) for reason in r.get("frozen_reasons", []))
            for reason in list(distinct)[:5]:
                text = reason.replace("`", "'")[:220]
                L.append(f"    - `{text}`")
            wl = r.get("with_timm_leaves")
            if wl and wl.get("coverage") is not None:
                L.append(f"    - with `leaf_modules=timm_leaf_modules()`: ok={wl['ok']}, coverage {wl['coverage']:.3f}")
        L.append("")
    if EXPORT.exists():
        ex = json.loads(EXPORT.read_text())
        trace_mods = sorted(m for m, r in rows.items() if r.get("category") == "trace")
        ex_ok = [m for m in trace_mods if ex.get(m, {}).get("ok")]
        commits = sorted({r.get("commit", "?") for r in ex.values()})
        L += [
            "## The trace failures through the torch.export front end (a separate run, not in the figures above)", "",
            f"Run with `PYTHONPATH=/work/main python benchmarks/timm_sweep.py --modules <the trace failures> --results "
            f"{EXPORT}`: autoalign from the main branch (commit {', '.join(commits)}), whose `check` defaults to "
            "`tracer=\"auto\"` (torch.fx first, then torch.export). That branch does not have this sweep's rule fixes. "
            f"**{len(ex_ok)} of the {len(trace_mods)} fx trace failures pass through it**"
            + (f" (with them, {len([m for m, r in rows.items() if r.get('ok')]) + len(ex_ok)} of {n} modules, "
               f"{100 * (len([m for m, r in rows.items() if r.get('ok')]) + len(ex_ok)) / max(n, 1):.1f} %)." if n else "."),
            "",
            "| module | model | result | coverage | max abs Δ | error |", "|---|---|---|---|---|---|",
        ]
        for m in trace_mods:
            r = ex.get(m)
            if r is None:
                L.append(f"| {m} | | not run | | | |")
                continue
            diff = r.get("diff64") if r.get("category") == "pass_float64" else r.get("diff")
            L.append(f"| {m} | {r.get('model')} | {r.get('category')} | {_fmt(r.get('coverage'), '.3f')} | "
                     f"{_fmt(diff, '.1e')} | {(r.get('error_type') or '')} {(r.get('error') or '').replace('|', '/')[:200]} |")
        L.append("")
    if ANALYSIS.exists():
        L += [ANALYSIS.read_text().strip(), ""]
    L += ["## Per-module results", "", write_table(rows).strip(), ""]
    out.write_text("\n".join(L) + "\n")


def summary(rows: dict[str, dict[str, Any]]) -> str:
    cats: dict[str, list[str]] = {}
    for mod, r in sorted(rows.items()):
        cats.setdefault(r.get("category", "?"), []).append(mod)
    n = len(rows)
    ok = sum(bool(r.get("ok")) for r in rows.values())
    parts = [f"{n} modules, {ok} pass ({100 * ok / max(n, 1):.1f} %)"]
    for c, mods in sorted(cats.items(), key=lambda kv: -len(kv[1])):
        parts.append(f"  {c}: {len(mods)}" + ("" if c.startswith("pass") else f" ({', '.join(mods)})"))
    return "\n".join(parts)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", help="comma-separated timm.models submodules (default: all)")
    ap.add_argument("--resume", action="store_true", help="skip modules already in the results JSON")
    ap.add_argument("--only-failed", action="store_true", help="re-run only modules whose row is not ok")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per module (default 300)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=f"results JSON (default {RESULTS})")
    ap.add_argument("--tracer", help="passed to autoalign.check (an autoalign with front ends: fx, export, auto)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown table from the JSON")
    ap.add_argument("--doc", action="store_true", help="also write docs/coverage_timm.md from the JSON")
    args = ap.parse_args()
    if args.results:
        RESULTS = pathlib.Path(args.results)
    if args.worker:
        row = run_module(args.worker, args.threads, args.tracer)
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = load()
    if args.render or args.doc:
        write_table(rows)
        if args.doc:
            write_doc(rows)
        print(summary(rows))
        return
    mods = args.modules.split(",") if args.modules else all_modules()
    for mod in mods:
        if args.resume and mod in rows:
            continue
        if args.only_failed and rows.get(mod, {}).get("ok"):
            continue
        row = run_in_subprocess(mod, args.timeout, args.threads, args.tracer)
        row["date"] = time.strftime("%Y-%m-%d")
        row["machine"] = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s)"
        row["commit"] = _commit(row.get("autoalign_root"))
        rows = load()  # another process may have written meanwhile
        rows[mod] = row
        save(rows)
        if not args.results:
            write_table(rows)
        print(f"{mod:28s} {row.get('model') or '-':36s} {row['category']:12s} cov={_fmt(row.get('coverage'), '.3f')} "
              f"{_fmt(row.get('seconds'), '.1f')}s {row.get('error_type', '')} {row.get('error', '')[:160]}", flush=True)
    print(summary(load()))


if __name__ == "__main__":
    main()
