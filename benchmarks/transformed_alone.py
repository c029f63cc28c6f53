"""How much of a model survives being moved into the reference's coordinates?

A merge averages the reference with the other models *after* each has been
transformed into the reference's coordinates. A permutation commutes with every
elementwise nonlinearity, so a permuted model computes exactly what it did; a dense
map (CCA, Procrustes, ...) does not commute with ReLU, so the transformed model is
only an approximation of itself — and a merge cannot be better than what it averages.
This measures, for two trained models A (reference) and B and each aligner, the test
accuracy of

* ``B moved``: B transformed into A's coordinates, alone (``merge([A, B], weights=(0, 1))``);
* ``merged``: the plain merge (``weights=(1, 1)``);

with each repair mode. Example (the residual BatchNorm CNN of docs/results/batchnorm.md;
output in benchmarks/results/transformed_alone/)::

    python benchmarks/transformed_alone.py --dataset mnist --arch resbn --epochs 1 --seeds 0 1 \\
        --aligners permutation cca procrustes --calibration 2000 --data-root ../shared/data \\
        --checkpoints ~/.cache/autoalign/checkpoints

Prints a Markdown table (and writes it as JSON with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.examples.datasets import load_dataset, make_loader, random_subset  # noqa: E402
from benchmarks.merge_accuracy import machine_line  # noqa: E402
from benchmarks.train import add_reuse_arguments, evaluate, load_checkpoint, reuse_kwargs, train_models  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--arch", default="resbn")
    ap.add_argument("--width", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="A (the reference) and B")
    add_reuse_arguments(ap)
    ap.add_argument("--aligners", nargs="+", default=["permutation", "cca", "procrustes"])
    ap.add_argument("--repairs", nargs="+", default=["none", "reset_bn"], choices=["none", "reset_bn", "repair"])
    ap.add_argument("--calibration", type=int, default=2000, help="training images used as calibration data")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    width = int(args.width) if args.width is not None and float(args.width).is_integer() else args.width
    paths = train_models(args.dataset, args.arch, args.seeds, epochs=args.epochs, data_root=args.data_root,
                         out_dir=args.checkpoints, width=width, num_threads=args.threads, **reuse_kwargs(args))
    (a, ca), (b, cb) = (load_checkpoint(p) for p in paths)
    x, y = load_dataset(args.dataset, data_root=args.data_root, split="train")
    # the calibration images merge_accuracy.py uses (a fixed random subset: CIFAR-10 is stored class by class)
    calib = make_loader(*random_subset(x, y, args.calibration, seed=12345), batch_size=args.batch_size, shuffle=False,
                        dataset=args.dataset)
    xt, yt = load_dataset(args.dataset, data_root=args.data_root, split="test")
    test = make_loader(xt, yt, batch_size=1000, shuffle=False, dataset=args.dataset)
    rows = []
    print(f"A (seed {args.seeds[0]}): {ca['test_accuracy']:.4f}   B (seed {args.seeds[1]}): {cb['test_accuracy']:.4f}")
    print("| aligner | repair | B moved into A's coordinates | merged (1:1) | seconds |")
    print("|---|---|---|---|---|")
    for aligner in args.aligners:
        for repair in args.repairs:
            rep = None if repair == "none" else repair
            t0 = time.perf_counter()
            moved = autoalign.merge([a, b], calib, aligner=aligner, repair=rep, weights=(0, 1))
            merged = autoalign.merge([a, b], calib, aligner=aligner, repair=rep)
            row = {"aligner": aligner, "repair": repair, "b_moved": evaluate(moved, test), "merged": evaluate(merged, test),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"| {aligner} | {repair} | {100 * row['b_moved']:.2f} | {100 * row['merged']:.2f} | {row['seconds']:.0f} |",
                  flush=True)
    print(machine_line("cpu", args.threads))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "a": ca["test_accuracy"],
                                                      "b": cb["test_accuracy"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
