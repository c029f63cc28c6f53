"""Self-check and coverage of every torchvision classifier, as a markdown table.

Usage::

    python benchmarks/coverage.py --out docs/coverage.md

Each model is built randomly initialised (constant-initialised tensors perturbed,
BatchNorm calibrated on random images; see ``autoalign.zoo.torchvision_example``),
its merge points are discovered, and the self-check permutes every non-frozen
point and compares outputs (eval mode, float32).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

import autoalign
from autoalign.zoo import model_family, torchvision_classifiers, torchvision_example


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
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.models or torchvision_classifiers()
    rows = []
    t_all = time.perf_counter()
    for name in names:
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
        rows.append((name, model_family(name), tuple(x.shape[1:]), rep, kc, dt, frozen_reasons))
        print(f"{name:22s} ok={rep.ok} cov={rep.coverage:.3f} |Δ|={rep.max_abs_diff:.2e} {dt:.1f}s", flush=True)
        del model
    total = time.perf_counter() - t_all
    lines = [
        "# Self-check and coverage on torchvision's classifiers",
        "",
        f"Produced by `python benchmarks/coverage.py --out docs/coverage.md` on {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, torchvision {__import__('torchvision').__version__}, "
        f"{cpu_name()} ({torch.get_num_threads()} threads), no GPU. Total wall time {total / 60:.1f} min "
        f"(the `pytest -m zoo` suite does the same checks).",
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
    for name, fam, shape, rep, kc, dt, _ in rows:
        lines.append(
            f"| {name} | {fam} | {'x'.join(map(str, shape))} | {'yes' if rep.ok else '**NO**'} | {rep.max_abs_diff:.1e} | "
            f"{rep.output_scale:.2g} | {rep.points} | {kc['linear']} | {kc['orthogonal']} | {kc['permutation']} | "
            f"{kc['frozen']} | {rep.coverage:.3f} | {dt:.1f} |"
        )
    reasons = [(n, r) for n, *_, r in rows if r]
    if reasons:
        lines += ["", "## Notes per model (frozen points other than inputs/outputs; float64 re-checks)", ""]
        for n, rs in reasons:
            for r in rs:
                lines.append(f"- `{n}`: {r}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
