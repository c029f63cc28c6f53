"""Does a refactor change any merged weight? Merge the same trained nets with two checkouts.

Trains three small residual BatchNorm CNNs on scikit-learn's digits (seeded, ~10 s), merges
them with every combination of aligner × repair × scheme below (plus ``batchnorm="transform"``,
``aligner="auto"`` and Fisher averaging) using the ``autoalign`` found at ``--code``, and saves
the merged state dicts; ``--compare`` reports, per configuration, whether two such files are
bit for bit identical.

Usage (the baseline checked out next to the work tree)::

    git worktree add /tmp/aa-base <commit>
    python benchmarks/equivalence.py --code /tmp/aa-base --out /tmp/base.pt
    python benchmarks/equivalence.py --code . --out /tmp/new.pt
    python benchmarks/equivalence.py --compare /tmp/base.pt /tmp/new.pt
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import torch
from torch import nn

ALIGNERS = ("procrustes", "cca", "permutation", "zipit", "weight_matching")
REPAIRS = ("auto", "repair", None)
SCHEMES = ("all_to_one", "iterative", "hierarchical")


class ResBN(nn.Module):
    """Conv-BN stem, one residual block with BatchNorm, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(x + self.b3(self.c3(y)))
        return self.fc(x.mean((2, 3)))


def trained_models(n: int = 3) -> tuple[list[nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``n`` nets trained from seeds ``0..n-1`` (3 epochs of SGD) and 8 calibration batches."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = ResBN()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            for i in range(0, 1500, 50):
                loss = nn.functional.cross_entropy(m(x[i : i + 50]), y[i : i + 50])
                opt.zero_grad()
                loss.backward()
                opt.step()
        models.append(m.eval())
    return models, [(x[i : i + 100], y[i : i + 100]) for i in range(0, 800, 100)]


def run(code: str, out: str) -> None:
    """Merge with the ``autoalign`` under ``code`` and save ``{config: state_dict}`` to ``out``."""
    sys.path.insert(0, code)
    autoalign = importlib.import_module("autoalign")
    print(f"autoalign from {autoalign.__file__}")
    models, data = trained_models()
    merged: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}

    def keep(key: tuple[Any, ...], **kw: Any) -> None:
        merged[key] = {k: v.clone() for k, v in autoalign.merge_with_report(models, data, **kw).model.state_dict().items()}

    for al in ALIGNERS:
        for rep in REPAIRS:
            for scheme in SCHEMES:
                if scheme == "iterative" and al in ("zipit", "weight_matching"):
                    continue  # needs an aligner that aligns to a reference
                keep((al, rep, scheme), aligner=al, repair=rep, scheme=scheme, max_iterations=2)
    keep(("cca", "transform", "repair"), aligner="cca", batchnorm="transform", repair="repair")
    keep(("auto",), aligner="auto")
    keep(("fisher",), aligner="cca", averaging="fisher", repair="repair")
    torch.save(merged, out)
    print(f"{len(merged)} merges saved to {out}")


def compare(a: str, b: str) -> int:
    """Print per configuration whether the two files agree bit for bit; 1 if any differs."""
    left, right = torch.load(a), torch.load(b)
    if left.keys() != right.keys():
        print(f"different configurations: {sorted(set(left) ^ set(right), key=str)}")
        return 1
    differ = 0
    for key in left:
        same = left[key].keys() == right[key].keys() and all(torch.equal(left[key][t], right[key][t]) for t in left[key])
        worst = 0.0 if same else max(
            float((left[key][t].double() - right[key][t].double()).abs().max()) for t in left[key] if left[key][t].is_floating_point()
        )
        differ += not same
        print(f"{str(key):<48} {'identical' if same else f'max |difference| {worst:.3g}'}")
    print(f"{len(left) - differ} of {len(left)} merges identical")
    return int(differ > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", help="folder holding the autoalign package to run")
    parser.add_argument("--out", help="where to save the merged state dicts")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.code and args.out):
        parser.error("give --code and --out, or --compare A B")
    run(args.code, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
