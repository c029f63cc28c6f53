"""Which BatchNorm targets make a dense merge work? (the diagnostic behind issue 16's fix)

Merges cached checkpoints with ``batchnorm="fold"`` and ``repair=None`` once, then gives
every BatchNorm of the merged model a different affine target and re-estimates the
statistics (``reset_bn``) on the same calibration data:

* ``layerwise``: ``Σ_m w_m P_m μ_m`` and ``Σ_m w_m sqrt(diag(P_m C_m P_mᵀ))`` from each
  original model's own BatchNorm outputs (what ``merge(..., repair="reset_bn")`` now does);
* ``layerwise_diag``: the same, ignoring the channels' covariances (``sqrt((P_m∘P_m) σ_m²)``);
* ``transform``: the authors' ``Σ_m w_m P_m γ_m`` and ``Σ_m w_m P_m β_m``;
* ``reference``: the reference model's own ``γ``, ``β`` (asymmetric in the weights);
* ``library``: ``merge(..., repair="reset_bn")`` itself, for comparison.

Example (the ResNet20 rows of docs/results/batchnorm.md; output in
benchmarks/results/repair_targets/)::

    python benchmarks/repair_targets.py --seeds 0 3 --aligner cca --data-root ../shared/data \\
        --checkpoint-pattern ~/.cache/autoalign/checkpoints/cifar10_resnet20_8077fab93382_seed{}.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
from typing import Any, Sequence

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402
from autoalign.examples.datasets import load_dataset, make_loader, random_subset  # noqa: E402
from autoalign.repair import reset_bn, set_batchnorm_affine  # noqa: E402
from benchmarks.train import evaluate, load_checkpoint  # noqa: E402


def bn_output_moments(model: nn.Module, names: Sequence[str], calib: Sequence[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm: mean (C,) and covariance (C, C) of its output over ``calib`` (eval mode)."""
    acc: dict[str, list[Any]] = {}
    hooks = []
    for n in names:
        def hook(_m: nn.Module, _i: Any, y: torch.Tensor, n: str = n) -> None:
            z = y.detach().double().movedim(1, -1).reshape(-1, y.shape[1])
            a = acc.setdefault(n, [0, 0.0, 0.0])
            a[0] += z.shape[0]
            a[1] = a[1] + z.sum(0)
            a[2] = a[2] + z.T @ z
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for x, _ in calib:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, (c, s, q) in acc.items():
        mu = s / c
        out[n] = (mu, q / c - torch.outer(mu, mu))
    return out


def targets(models: Sequence[nn.Module], result: Any, calib: Sequence[Any]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The target families of the module docstring, per BatchNorm name: (mean, std)."""
    spec, plan = result.spec, result.plan
    names = [n for n, m in models[0].named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    moments = [bn_output_moments(m, names, calib) for m in models]
    w = 1.0 / len(models)
    fam: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {k: {} for k in ("layerwise", "layerwise_diag", "transform", "reference")}
    for n in names:
        ax = next((a for a in spec.axes if a.tensor == f"{n}.bias" and a.axis == 0), None)
        if ax is None or spec.points[int(ax.point_of[0])].name not in plan.points:
            continue
        pp = plan.points[spec.points[int(ax.point_of[0])].name]
        ps = [pp.merges[m].double() for m in range(len(models))]
        bns = [m.get_submodule(n) for m in models]
        mean = sum(w * p @ moments[m][n][0] for m, p in enumerate(ps))
        std = sum(w * torch.sqrt(torch.diagonal(p @ moments[m][n][1] @ p.T).clamp_min(0)) for m, p in enumerate(ps))
        std_d = sum(w * torch.sqrt((p * p) @ torch.diagonal(moments[m][n][1]).clamp_min(0)) for m, p in enumerate(ps))
        fam["layerwise"][n] = (mean, std)
        fam["layerwise_diag"][n] = (mean, std_d)
        fam["transform"][n] = (sum(w * p @ b.bias.detach().double() for p, b in zip(ps, bns)),
                               sum(w * p @ b.weight.detach().double() for p, b in zip(ps, bns)))
        fam["reference"][n] = (bns[0].bias.detach().double(), bns[0].weight.detach().double())
    return fam


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint-pattern", required=True, help="checkpoint path with {} for the seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 3], help="the first is the reference")
    ap.add_argument("--aligner", default="cca")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--calibration", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--no-augment", action="store_true", help="calibrate on plain images (default: training's augmentation, one fixed draw)")
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the accuracies as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [load_checkpoint(os.path.expanduser(args.checkpoint_pattern.format(s)))[0].eval() for s in args.seeds]
    xtr, ytr = load_dataset(args.dataset, data_root=args.data_root, split="train")
    xte, yte = load_dataset(args.dataset, data_root=args.data_root, split="test")
    xcal, ycal = random_subset(xtr, ytr, args.calibration, seed=12345)  # the images merge_accuracy.py uses
    calib = [(x.clone(), y.clone()) for x, y in make_loader(xcal, ycal, batch_size=args.batch_size, shuffle=False,
                                                            dataset=args.dataset, augment=not args.no_augment)]
    test = make_loader(xte, yte, batch_size=1000, shuffle=False, dataset=args.dataset)
    result = autoalign.merge_with_report(models, calib, aligner=args.aligner, repair=None, batchnorm="fold")
    acc = {"none": 100 * evaluate(result.model, test, "cpu")}
    for name, tg in targets(models, result, calib).items():
        m = copy.deepcopy(result.model)
        set_batchnorm_affine(m, tg)
        reset_bn(m, calib)
        acc[name] = 100 * evaluate(m, test, "cpu")
    lib = autoalign.merge(models, calib, aligner=args.aligner, repair="reset_bn")
    acc["library"] = 100 * evaluate(lib, test, "cpu")
    for k, v in acc.items():
        print(f"{k:16s} {v:6.2f} %")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "seeds": args.seeds,
                                                       "aligner": args.aligner, "accuracy": acc}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
