"""How one-to-one are the neurons of two trained models? (CCA Merge paper, Figures 2 and 3.)

For one merge point (layer) of two models trained from different seeds:

* **correlations** — the cross-model correlation matrix ``C[i, j] = corr(x_i, y_j)``
  of reference neuron ``i`` and other-model neuron ``j`` (on calibration data, the
  features autoalign's statistics pass sees at that point); per reference neuron the
  largest and second-largest ``|C[i, :]|`` (top-1, top-2);
* **CCA coefficients** — the CCA merge matrix ``T`` (``get_aligner("cca").solve``)
  maps the other model's features into the reference's coordinates, so row ``i``
  says which of the other model's neurons make up reference neuron ``i``. It is
  first expressed in standardised features (``diag(1/σ_x) T diag(σ_y)``, so that
  feature scales do not count), each row is then divided by its Euclidean norm,
  and per row the largest and second-largest absolute entries are reported.

A permutation would give top-1 = 1 and top-2 = 0 in both views; the paper's point
is that the second-best correlation is often not much below the best, and that
CCA's transform indeed spreads weight over several neurons.

Example::

    python benchmarks/correlation.py --dataset mnist --arch mlp --hidden 512 512 --epochs 5 \\
        --seeds 0 1 --point layers.0 --data-root ../shared/data \\
        --out-png docs/img/correlation_mnist_mlp.png \\
        --out-json benchmarks/results/correlation/correlation_mnist_mlp.json

Writes a two-panel histogram (PNG) and a JSON file with the summary numbers (and
all per-neuron values).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import autoalign  # noqa: E402

__all__ = ["analyse", "top2", "normalised_cca_rows", "summary", "plot", "main"]


def top2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``|a|`` the largest value, the second-largest value, and the argmax column."""
    v, i = torch.topk(a.abs(), k=min(2, a.shape[1]), dim=1)
    second = v[:, 1] if v.shape[1] > 1 else torch.zeros_like(v[:, 0])
    return v[:, 0], second, i[:, 0]


def normalised_cca_rows(t: torch.Tensor, std_ref: torch.Tensor, std_other: torch.Tensor) -> torch.Tensor:
    """``T`` in standardised features (``diag(1/σ_ref) T diag(σ_other)``), rows scaled to unit norm."""
    tiny = torch.finfo(t.dtype).tiny
    ts = t / (std_ref[:, None] + tiny) * std_other[None, :]
    return ts / (ts.norm(dim=1, keepdim=True) + tiny)


def analyse(
    models: Sequence[torch.nn.Module],
    data: Any,
    point: str | None = None,
    *,
    ridge: float = 0.01,
    example_inputs: Any = None,
) -> dict[str, Any]:
    """Correlation and CCA-coefficient analysis of one merge point of two models.

    Parameters
    ----------
    models : two nn.Module
        Same architecture; ``models[0]`` is the reference.
    data : re-iterable of batches
        Calibration data (``(x, y)`` batches or tensors).
    point : str or None
        Merge point name (``autoalign.find_merge_points(...).points``); ``None``
        picks the widest non-frozen point.
    ridge : float
        The ``cca`` aligner's (relative) ridge.

    Returns
    -------
    dict
        ``point``, ``dim``, ``samples``, per-neuron lists ``corr_top1``, ``corr_top2``,
        ``cca_top1``, ``cca_top2``, and ``summary`` (see :func:`summary`).
    """
    if len(models) != 2:
        raise ValueError(f"need exactly two models, got {len(models)}")
    if example_inputs is None:
        batch = next(iter(data))
        example_inputs = autoalign.calibration.default_input_fn(batch)
    spec = autoalign.find_merge_points(models[0], example_inputs)
    candidates = [p for p in spec.points if p.kind != "frozen" and p.sites]
    if not candidates:
        raise ValueError("the model has no alignable merge point")
    if point is None:
        chosen = max(candidates, key=lambda p: p.dim)
    else:
        named = [p for p in candidates if p.name == point]
        if not named:
            raise ValueError(f"no alignable merge point {point!r}; choose one of {[p.name for p in candidates]}")
        chosen = named[0]
    stats = autoalign.collect_stats(list(models), data, spec, needs="reference", reference=0, points=[chosen.name])
    st = stats[chosen.name]
    corr = st.corr(0, 1)
    c1, c2, c_arg = top2(corr)

    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    problem = autoalign.AlignProblem(spec, sds, 0, torch.full((2,), 0.5, dtype=torch.float64), stats)
    plan = autoalign.get_aligner("cca", ridge=ridge).solve(problem)
    t = plan.points[chosen.name].merges[1].to(torch.float64)
    tn = normalised_cca_rows(t, st.std(0), st.std(1))
    t1, t2, t_arg = top2(tn)
    alive = (st.std(0) > 0) & (st.std(1)[c_arg] > 0)
    return {
        "point": chosen.name,
        "dim": chosen.dim,
        "samples": st.n,
        "corr_top1": c1.tolist(),
        "corr_top2": c2.tolist(),
        "cca_top1": t1.tolist(),
        "cca_top2": t2.tolist(),
        "same_argmax": (c_arg == t_arg).tolist(),
        "alive": alive.tolist(),
        "summary": summary(c1, c2, t1, t2, c_arg, t_arg, alive),
    }


def summary(c1, c2, t1, t2, c_arg, t_arg, alive) -> dict[str, float]:  # noqa: ANN001 - tensors
    """Means and fractions over the reference neurons that are not dead (non-zero variance)."""
    a = alive.bool()
    m = lambda x: float(x[a].double().mean()) if bool(a.any()) else float("nan")  # noqa: E731
    return {
        "neurons": int(a.numel()),
        "alive_neurons": int(a.sum()),
        "corr_top1_mean": m(c1),
        "corr_top2_mean": m(c2),
        "corr_top2_over_top1_mean": m(c2 / c1.clamp_min(1e-12)),
        "frac_corr_top1_above_0.8": m((c1 > 0.8).double()),
        "frac_corr_top2_above_0.5": m((c2 > 0.5).double()),
        "frac_corr_top2_within_0.1_of_top1": m(((c1 - c2) < 0.1).double()),
        "cca_top1_mean": m(t1),
        "cca_top2_mean": m(t2),
        "cca_top2_over_top1_mean": m(t2 / t1.clamp_min(1e-12)),
        "frac_cca_top1_above_0.9": m((t1 > 0.9).double()),
        "frac_cca_argmax_equals_corr_argmax": m((c_arg == t_arg).double()),
    }


def plot(result: dict[str, Any], path: str | os.PathLike[str], title: str = "") -> None:
    """Two histograms: top-1/top-2 |correlation|, and top-1/top-2 normalised CCA coefficients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = torch.tensor(result["alive"], dtype=torch.bool)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = torch.linspace(0, 1, 41).tolist()
    for ax, key, xlabel in (
        (axes[0], "corr", "|correlation| with the other model's neurons"),
        (axes[1], "cca", "|coefficient| in the normalised CCA merge matrix row"),
    ):
        for rank, colour in (("top1", "tab:blue"), ("top2", "tab:orange")):
            vals = torch.tensor(result[f"{key}_{rank}"])[alive].tolist()
            ax.hist(vals, bins=bins, alpha=0.6, color=colour, label=f"{'largest' if rank == 'top1' else 'second largest'}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reference neurons")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("per neuron: best and second-best match", fontsize=9)
    axes[1].set_title("per neuron: two largest CCA coefficients", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--hidden", type=int, nargs="*", help="hidden sizes for --arch mlp")
    ap.add_argument("--width", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train-subset", type=int, default=None)
    from benchmarks.train import add_reuse_arguments

    add_reuse_arguments(ap)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="the two models (first = reference)")
    ap.add_argument("--point", default=None, help="merge point name (default: the widest)")
    ap.add_argument("--ridge", type=float, default=0.01)
    ap.add_argument("--calibration", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--data-root", default=os.environ.get("AUTOALIGN_DATA"))
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-png", default="benchmarks/out/correlation.png")
    ap.add_argument("--out-json", default="benchmarks/out/correlation.json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from autoalign.examples.datasets import load_dataset, make_loader, random_subset
    from benchmarks.merge_accuracy import machine_line
    from benchmarks.train import load_checkpoint, reuse_kwargs, train_models

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    arch_kw: dict[str, Any] = {"hidden": tuple(args.hidden)} if args.hidden else {}
    width = args.width
    if width is not None and float(width).is_integer():
        width = int(width)
    paths = train_models(
        args.dataset, args.arch, args.seeds, epochs=args.epochs, device=args.device, data_root=args.data_root,
        out_dir=args.checkpoints, width=width, train_subset=args.train_subset, num_threads=args.threads,
        **reuse_kwargs(args), **arch_kw,
    )
    loaded = [load_checkpoint(p, map_location=args.device) for p in paths]
    models = [m for m, _ in loaded]
    xtr, ytr = load_dataset(args.dataset, data_root=args.data_root, split="train")
    calib = make_loader(*random_subset(xtr, ytr, args.calibration, seed=12345), batch_size=args.batch_size, shuffle=False, dataset=args.dataset)
    result = analyse(models, calib, args.point, ridge=args.ridge)
    result.update(
        command="python benchmarks/correlation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d %H:%M %Z"),
        machine=machine_line(args.device, args.threads),
        torch=torch.__version__,
        dataset=args.dataset,
        arch=args.arch,
        seeds=args.seeds,
        base_accuracy=[float(c["test_accuracy"]) for _, c in loaded],
    )
    plot(result, args.out_png, title=f"{args.dataset} / {args.arch}, point {result['point']} (d = {result['dim']}), seeds {args.seeds}")
    pathlib.Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out_json).write_text(json.dumps(result, indent=1))
    print(json.dumps({"point": result["point"], "dim": result["dim"], **result["summary"]}, indent=1))
    print(f"wrote {args.out_png} and {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
