"""What re-using one exported graph per merge saves (``autoalign.trace.reuse``).

Usage (in an environment with the ``transformers`` extra, e.g. ``make test-transformers``'s
``.venv-tf``)::

    python benchmarks/export_reuse.py [--models llama,gpt2,bert] [--n 4] [--repeats 2]

For each tiny Hugging Face model of :mod:`autoalign.examples.transformers`, merges ``n``
models (seeds 0..n-1) on 4 batches of 16 random inputs with the default aligner, once as
the library does (one ``torch.export`` per merge) and once with the re-use turned off
(every model exported for its statistics pass), and records the merge's wall time, its
stage timings, and how many exports ran. One thread; the best of ``repeats`` runs per
setting. Rows go to ``benchmarks/results/export/export_reuse.json`` and a markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import sys
import time

import torch

import autoalign
from autoalign.examples.transformers import tiny_inputs, tiny_transformer

OUT = pathlib.Path(__file__).parent / "results" / "export" / "export_reuse.json"


def one(name: str, n: int, reuse: bool) -> dict:
    """One merge of ``n`` tiny ``name`` models; export calls counted."""
    export_module = sys.modules["autoalign.trace.export"]
    merge_module = sys.modules["autoalign.merge"]  # (autoalign.merge is the function)
    real, calls = export_module._export, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    models = [tiny_transformer(name, seed=s)[0] for s in range(n)]
    data = [tiny_inputs(name, seed=s, batch=16) for s in range(100, 104)]
    export_module._export = counted
    saved = merge_module.reuse_exports
    if not reuse:
        merge_module.reuse_exports = contextlib.nullcontext
    try:
        t = time.perf_counter()
        result = autoalign.merge_with_report(models, data)
        seconds = time.perf_counter() - t
    finally:
        export_module._export = real
        merge_module.reuse_exports = saved
    timings = {k: round(v, 3) for k, v in result.report.timings.items()}
    return {"model": name, "n": n, "reuse": reuse, "seconds": round(seconds, 3), "exports": len(calls), "timings": timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama,gpt2,bert")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for reuse in (True, False):
            best = min((one(name, args.n, reuse) for _ in range(args.repeats)), key=lambda r: r["seconds"])
            rows.append(best)
            print(json.dumps(best), flush=True)
    import transformers

    meta = {"command": "python benchmarks/export_reuse.py " + " ".join(sys.argv[1:]), "machine": platform.processor()
            or platform.machine(), "threads": 1, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print("| model | N | exports (reuse / none) | merge s (reuse / none) | statistics s (reuse / none) |")
    print("|---|---|---|---|---|")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| {a['model']} | {a['n']} | {a['exports']} / {b['exports']} | {a['seconds']:.1f} / {b['seconds']:.1f} | "
              f"{a['timings']['statistics']:.1f} / {b['timings']['statistics']:.1f} |")


if __name__ == "__main__":
    main()
