"""Self-check and coverage of every torchvision classifier, as a markdown table.

Usage::

    python benchmarks/coverage.py --out docs/coverage.md

Each model is built randomly initialised (constant-initialised tensors perturbed,
BatchNorm calibrated on random images; see ``autoalign.examples.zoo.torchvision_example``),
its merge points are discovered, and the self-check permutes every non-frozen
point and compares outputs (eval mode, float32).

Rows are kept in ``--state`` (default ``benchmarks/out/coverage_rows.json``) so a later run
resumes; the rows of the committed docs/coverage.md are in
``benchmarks/results/coverage/coverage_rows.json``, and ``--render`` rewrites docs/coverage.md
from ``--state``'s default file if present, else from that copy.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import time

import torch

import autoalign
from autoalign.examples.zoo import model_family, torchvision_classifiers, torchvision_example


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/coverage.md")
    ap.add_argument("--models", nargs="*", help="subset of model names (default: all)")
    ap.add_argument("--state", default="benchmarks/out/coverage_rows.json",
                    help="rows measured so far (a later run resumes from them)")
    args = ap.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("AUTOALIGN_THREADS", "2")))
    names = args.models or torchvision_classifiers()
    state = pathlib.Path(args.state)
    done: dict[str, dict] = json.loads(state.read_text()) if state.exists() else {}
    t_all = time.perf_counter()
    for name in names:
        if name in done:
            continue
        t0 = time.perf_counter()
        model, x = torchvision_example(name)
        rep = autoalign.check(model, x)
        rep64 = None
        if not rep.ok:
            rep64 = autoalign.check(model.double(), x.double(), spec=rep.spec)
        dt = time.perf_counter() - t0
        kc = rep.spec.kind_counts()
        frozen_reasons = sorted({p.reason for p in rep.spec.points if p.kind == "frozen" and not p.io})
        if rep64 is not None:
            frozen_reasons.append(
                f"float32 check failed (max |Δ| {rep.max_abs_diff:.3g} at output scale {rep.output_scale:.3g}); "
                f"the same spec in float64: {'ok' if rep64.ok else 'FAILED'}, max |Δ| {rep64.max_abs_diff:.3g}"
            )
        done[name] = dict(
            family=model_family(name), input="x".join(map(str, x.shape[1:])), ok=rep.ok or bool(rep64 and rep64.ok),
            ok32=rep.ok, diff=rep.max_abs_diff, scale=rep.output_scale, points=rep.points, kinds=kc,
            coverage=rep.coverage, seconds=dt, notes=frozen_reasons,
        )
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(done, indent=1))
        print(f"{name:22s} ok={rep.ok} cov={rep.coverage:.3f} |Δ|={rep.max_abs_diff:.2e} {dt:.1f}s", flush=True)
        del model
        write_doc(done, args.out, names)


def write_doc(done: dict[str, dict], out: str, names: list[str]) -> None:
    total = sum(r["seconds"] for r in done.values())
    missing = [n for n in names if n not in done]
    lines = [
        "# Self-check and coverage on torchvision's classifiers",
        "",
        f"Produced by `python benchmarks/coverage.py --out docs/coverage.md` on {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}, "
        f"{cpu_name()} ({torch.get_num_threads()} threads), no GPU, while other jobs shared the 2 cores. "
        f"Sum of per-model times {total / 60:.1f} min (the `pytest -m zoo` suite does the same checks)."
        + (f" **Not yet measured:** {', '.join(missing)}." if missing else ""),
        "",
        f"**Summary:** {len(done)} models; {sum(r['ok32'] for r in done.values())} pass the float32 check; "
        f"{sum(r['ok'] and not r['ok32'] for r in done.values())} fail it only by float32 rounding (deep random nets: "
        f"a permutation changes the summation order) and pass the same spec in float64 to ~1e-12 relative (see the "
        f"notes); {sum(not r['ok'] for r in done.values())} fail. Lowest coverage "
        f"{min((r['coverage'] for r in done.values()), default=1.0):.3f}.",
        "",
        "Each model is randomly initialised (constant-initialised tensors perturbed so that every role is visible "
        "to the check, BatchNorm statistics calibrated on random images), its merge points are discovered, every "
        "non-frozen point is permuted at random and the outputs compared in eval mode, float32. "
        "**ok** means max |Δ| ≤ 1e-4 · max(1, max |output|). **coverage** = (sum of dims of non-frozen points) / "
        "(sum of dims of all points not on the model's inputs/outputs).",
        "",
        "| model | family | input | ok | max abs Δ | max abs output | points | linear | orthogonal | permutation | frozen | coverage | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [n for n in names if n in done]:
        r = done[name]
        kc = r["kinds"]
        ok = "yes" if r["ok32"] else ("yes (float64)" if r["ok"] else "**NO**")
        lines.append(
            f"| {name} | {r['family']} | {r['input']} | {ok} | {r['diff']:.1e} | {r['scale']:.2g} | {r['points']} | "
            f"{kc['linear']} | {kc['orthogonal']} | {kc['permutation']} | {kc['frozen']} | {r['coverage']:.3f} | "
            f"{r['seconds']:.1f} |"
        )
    reasons = [(n, done[n]["notes"]) for n in names if n in done and done[n]["notes"]]
    if reasons:
        lines += ["", "## Notes per model (frozen points other than inputs/outputs; float64 re-checks)", ""]
        for n, rs in reasons:
            for r in rs:
                text = r.replace("`", "'")
                lines.append(f"- `{n}`: `{text}`")  # fx node text is not markdown
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(__import__("sys").argv) > 1 and __import__("sys").argv[1] == "--render":
        src = pathlib.Path("benchmarks/out/coverage_rows.json")
        rows = json.loads((src if src.exists() else pathlib.Path("benchmarks/results/coverage/coverage_rows.json")).read_text())
        write_doc(rows, "docs/coverage.md", torchvision_classifiers())
    else:
        main()
