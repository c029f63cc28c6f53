"""Page faults and time of plain forward passes and statistics passes, alternated in one process.

``benchmarks/cost.py`` measures each configuration in a fresh process and keeps the
best of several runs; this script shows the sequence instead: in one process it
runs ``floor, floor, stats, floor, stats, floor, stats, floor`` (``floor`` = the N
models' plain forward passes over the calibration batches, ``stats`` =
``autoalign.collect_stats`` for an all-to-one aligner) and prints, for each pass,
its seconds and its minor page faults (``getrusage``). With glibc's default malloc
settings the fault count of a pass depends on what the process freed before it
(glibc raises its ``mmap`` threshold when a mapped chunk is freed), which is what
this sequence exposes.

To compare two commits, run the script from a worktree of each: it imports the
``autoalign`` next to it.

Example (the numbers quoted in the Cost section of docs/results.md)::

    python benchmarks/page_faults.py --model resnet20 --width 4 --n 2 --samples 512 --batch 128
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import sys
import time
from typing import Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from benchmarks.cost import MODELS, forward_floor, make_data, make_models  # noqa: E402

SEQUENCE = ("floor", "floor", "stats", "floor", "stats", "floor", "stats", "floor")


def _faults() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def run(model: str, width: float, n: int, samples: int, batch: int, in_features: int = 784) -> list[tuple[str, float, int]]:
    """``(pass, seconds, minor faults)`` for each pass of :data:`SEQUENCE`."""
    models = make_models(width, n, in_features, "cpu", model)
    data = make_data(samples, batch, in_features, "cpu", model)
    spec = autoalign.find_merge_points(models[0], data[0][0])
    out = []
    for name in SEQUENCE:
        before, t0 = _faults(), time.perf_counter()
        if name == "floor":
            forward_floor(models, data)
        else:
            autoalign.collect_stats(models, data, spec, needs="reference", reference=0)
        out.append((name, time.perf_counter() - t0, _faults() - before))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--width", type=float, default=4)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.width, args.n, args.samples, args.batch)
    print(f"autoalign from {pathlib.Path(autoalign.__file__).parent}")
    print(" | ".join(f"{name} {sec:.2f} s / {faults / 1000:.0f}k faults" for name, sec, faults in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
