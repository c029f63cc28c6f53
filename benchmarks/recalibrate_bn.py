"""What re-estimating BatchNorm statistics alone does to a trained model (no merge).

Test accuracy of one cached checkpoint as trained, then after ``autoalign.reset_bn`` on
a fixed random subset of training images, once plain and once with training's
augmentation (random crop with zero padding, flip; one fixed draw). Example (the
ResNet20 ×1 row of docs/results/batchnorm.md)::

    python benchmarks/recalibrate_bn.py ~/.cache/autoalign/checkpoints/cifar10_resnet20_8077fab93382_seed0.pt \\
        --dataset cifar10 --calibration 5000 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
from typing import Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.examples.datasets import load_dataset, make_loader, random_subset  # noqa: E402
from benchmarks.train import evaluate, load_checkpoint  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint written by benchmarks/train.py")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--calibration", type=int, default=5000, help="training images to re-estimate on")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    x, y = load_dataset(args.dataset, data_root=args.data_root, split="train")
    xt, yt = load_dataset(args.dataset, data_root=args.data_root, split="test")
    test = make_loader(xt, yt, batch_size=1000, shuffle=False, dataset=args.dataset)
    xs, ys = random_subset(x, y, args.calibration, seed=12345)  # merge_accuracy.py's calibration images
    print(f"as trained: {100 * evaluate(model, test):.2f} %")
    for augment in (False, True):
        calib = [(a.clone(), b.clone()) for a, b in make_loader(xs, ys, batch_size=args.batch_size, shuffle=False,
                                                                dataset=args.dataset, augment=augment)]
        again = autoalign.reset_bn(copy.deepcopy(model), calib)
        print(f"reset_bn on {len(xs)} {'augmented' if augment else 'plain'} training images: {100 * evaluate(again, test):.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
