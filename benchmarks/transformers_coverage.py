"""Self-check and coverage of tiny Hugging Face transformers through the torch.export front end.

Usage (in an environment with the ``transformers`` extra, e.g. ``make test-transformers``'s
``.venv-tf``)::

    python benchmarks/transformers_coverage.py

For each architecture of :mod:`autoalign.examples.transformers`: whether ``torch.fx``
traces it, the merge points ``torch.export`` gives (counts per kind), coverage, the
self-check's deviation against its tolerance, and seconds for discovery and check (one
thread). Rows go to ``benchmarks/results/export/transformers_coverage.json`` and a
markdown table to stdout.
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import torch

import autoalign
from autoalign.examples.transformers import TINY_TRANSFORMERS, tiny_transformer

OUT = pathlib.Path(__file__).parent / "results" / "export" / "transformers_coverage.json"


def main() -> None:
    import transformers

    torch.set_num_threads(1)
    rows = []
    for name in TINY_TRANSFORMERS:
        model, x = tiny_transformer(name)
        try:
            autoalign.trace(model, x, tracer="fx")
            fx_ok = True
        except autoalign.TraceError:
            fx_ok = False
        t = time.perf_counter()
        spec = autoalign.find_merge_points(model, x, tracer="export")
        t_discover = time.perf_counter() - t
        t = time.perf_counter()
        report = autoalign.check(model, x, spec=spec)
        t_check = time.perf_counter() - t
        frozen = [p for p in spec.points if p.kind == "frozen" and not p.io]
        rows.append({
            "model": type(model).__name__, "fx_traces": fx_ok, "points": len(spec.points), "kinds": spec.kind_counts(),
            "coverage": round(spec.coverage(), 4), "ok": bool(report.ok), "max_abs_diff": float(report.max_abs_diff),
            "tolerance": float(report.tolerance), "output_scale": float(report.output_scale),
            "discover_seconds": round(t_discover, 2), "check_seconds": round(t_check, 2),
            "frozen_hidden": sorted({p.reason.split(":")[-1].strip() for p in frozen}),
        })
    meta = {"command": "python benchmarks/transformers_coverage.py", "machine": platform.processor() or platform.machine(),
            "threads": 1, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print("| model | fx traces | points (linear / orthogonal / permutation / rotary / frozen) | coverage | self-check max abs diff (tolerance) | discover + check s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k = r["kinds"]
        print(f"| {r['model']} | {'yes' if r['fx_traces'] else 'no'} | {r['points']} ({k['linear']} / {k['orthogonal']} / "
              f"{k['permutation']} / {k['rotary']} / {k['frozen']}) | {r['coverage']:.3f} | {'ok' if r['ok'] else 'FAILED'} "
              f"{r['max_abs_diff']:.1e} ({r['tolerance']:.0e}) | {r['discover_seconds']:.1f} + {r['check_seconds']:.1f} |")


if __name__ == "__main__":
    main()
