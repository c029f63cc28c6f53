"""The stages of a merge, each one step of the pipeline that :mod:`autoalign.merge` runs:

1. :func:`choose_reference` — the model all others are aligned to;
2. :func:`discover` — the merge points (:func:`autoalign.find_merge_points`);
3. :func:`collect` — feature statistics (:func:`autoalign.collect_stats`);
4. :func:`solve` — the aligner's plan, checked and projected onto each point's kind;
5. :func:`apply` — every model's state dict transformed by the plan, then averaged;
6. :func:`average` — another combination of the aligned models, when asked for;
7. :func:`repair` — the merged model's statistics restored (:mod:`autoalign.repair`).

Schemes (:mod:`autoalign.schemes`) compose them. Every stage takes the
:class:`~autoalign.calibration.Calibration` and the
:class:`~autoalign.options.MergeOptions` rather than their parts.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aligners import AlignProblem, Aligner, Plan
from .apply import average_state_dicts, folds_needed, transform_state_dict
from .averaging import average_aligned
from .calibration import Calibration
from .distributed import all_reduce_sum, collective_device, is_distributed
from .errors import MergeError
from .graph.discover import find_merge_points
from .options import MergeOptions
from .repair import (
    has_batchnorm,
    output_channel_stats,
    repair_producers,
    repair_sites,
    reset_bn,
    restore_batchnorm,
    set_batchnorm_affine,
    site_maps,
)
from .repair_sites import mapped_moments, site_points
from .spec import FoldedNorm, MergeSpec
from .stats import Stats, collect_stats
from .trace import eval_mode
from .validate import check_example

__all__ = ["Applied", "choose_reference", "discover", "collect", "solve", "apply", "average", "repair", "repair_mode_for"]

#: State dicts of one model each.
StateDicts = list[dict[str, torch.Tensor]]


def choose_reference(models: Sequence[nn.Module], calib: Calibration, reference: int | str) -> int:
    """``reference`` itself, or for ``"best"`` the model with the lowest cross-entropy on the
    calibration data.

    Raises
    ------
    MergeError
        For ``"best"`` without ``(input, target)`` batches.
    """
    if not isinstance(reference, str):
        return int(reference)
    losses = [0.0] * len(models)
    with torch.no_grad(), eval_mode(*models):
        for inputs, batch in calib.labelled(calib.device):
            target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else None
            if not isinstance(target, torch.Tensor):
                raise MergeError('reference="best" needs (input, target) batches to compute the calibration loss')
            target = target.to(calib.device) if calib.device is not None else target
            for i, m in enumerate(models):
                losses[i] += float(F.cross_entropy(m(*inputs), target, reduction="sum"))
    total = torch.tensor(losses, dtype=torch.float64, device=collective_device() if is_distributed() else None)
    all_reduce_sum([total])  # under torch.distributed: every process chooses the same reference
    return int(torch.argmin(total.cpu()))


def discover(model: nn.Module, calib: Calibration, opts: MergeOptions) -> MergeSpec:
    """The merge points of ``model`` (or the options' precomputed spec), observed where
    ``opts.features`` says; the first batch is checked on the model before tracing."""
    spec = opts.spec
    if spec is None:
        example = calib.example()
        check_example(model, example)
        spec = find_merge_points(model, example, rules=opts.rules, **opts.trace_options)
    return spec.observed_at(opts.features)


def collect(models: Sequence[nn.Module], calib: Calibration, spec: MergeSpec, al: Aligner, reference: int, opts: MergeOptions) -> Stats | None:
    """The feature statistics the aligner needs (None for a data-free aligner), with the moments
    of the sites the repair stage will read (:func:`repair_measures`) taken in the same pass."""
    if al.needs == "none":
        return None
    return collect_stats(
        models, calib, spec, needs=al.needs, reference=reference, self_moments=self_moments_for(al, spec),
        precision=opts.precision, trace_options=opts.trace_options, modules=repair_measures(models[0], spec, al, opts),
    )


def self_moments_for(al: Aligner, spec: MergeSpec) -> str | dict[str, str]:
    """What the statistics pass collects of each model's own moments: the aligner's
    ``self_moments``, or per point where the aligner's :meth:`~autoalign.aligners.Aligner.self_moments_at` differs."""
    modes = {p.name: al.self_moments_at(p) for p in spec.points if p.kind != "frozen"}
    return al.self_moments if all(mode == al.self_moments for mode in modes.values()) else modes


def repair_measures(model: nn.Module, spec: MergeSpec, al: Aligner, opts: MergeOptions) -> dict[str, str]:
    """The repair sites whose targets the statistics pass can measure, and how: ``"full"``
    moments where a dense merge matrix may map them, ``"diagonal"`` where only permutations can.

    ``"repair"`` reads every producer and BatchNorm site, ``"reset_bn"`` the folded BatchNorms
    (none when the aligner gives permutations, which fold nothing); only sites that are one
    merge point's coordinates (:func:`~autoalign.repair_sites.site_points`) qualify. With no
    repair, nothing is measured from the input models."""
    mode = repair_mode_for(model, opts.repair)
    dense = getattr(al, "kind", "linear") != "permutation"  # an aligner that does not say may give dense maps
    if mode == "repair":
        producers, bns = repair_sites(model, spec)
        names = producers + bns
    elif mode == "reset_bn" and opts.batchnorm == "fold" and dense:
        names = folded_batchnorm_names(spec.folds)
    else:
        return {}
    points, _ = site_points(spec, names)
    kinds = {name: spec.point(pname).kind for name, pname in points.items()}
    return {name: "full" if dense and kind != "permutation" else "diagonal" for name, kind in kinds.items() if kind != "frozen"}


def folded_batchnorm_names(folds: Sequence[FoldedNorm]) -> list[str]:
    """Module names of the affine BatchNorm layers among ``folds`` (sorted)."""
    return sorted({f.running_mean.rsplit(".", 1)[0] for f in folds if f.weight and f.bias})


def state_dicts(models: Sequence[nn.Module]) -> StateDicts:
    """Detached state dicts of the models (no copies)."""
    return [{k: v.detach() for k, v in m.state_dict().items()} for m in models]


def solve(al: Aligner, spec: MergeSpec, sds: StateDicts, reference: int, w: torch.Tensor, stats: Stats | None, buffers: frozenset[str]) -> Plan:
    """Run the aligner, check its plan against the spec and project it onto each point's kind."""
    plan = al.solve(AlignProblem(spec, sds, reference, w, stats, buffers))
    if not isinstance(plan, Plan):
        raise MergeError(f"aligner {al!r} returned {type(plan).__name__}, not a Plan")
    return plan.checked_against(spec, len(sds), repr(al))


class Applied:
    """The plan applied: each model's moved state dict, the folded BatchNorms and the average.

    Attributes
    ----------
    moved : list of dict
        Per model, its state dict in merged coordinates.
    folds : list of FoldedNorm
        BatchNorms folded into their producers.
    merged : dict
        The weighted average of ``moved``.
    """

    def __init__(self, moved: StateDicts, folds: list[FoldedNorm], merged: dict[str, torch.Tensor]) -> None:
        self.moved, self.folds, self.merged = moved, folds, merged

    @property
    def folded_names(self) -> list[str]:
        """Module names of the affine BatchNorm layers among the folds."""
        return folded_batchnorm_names(self.folds)


def apply(sds: StateDicts, spec: MergeSpec, plan: Plan, w: torch.Tensor, batchnorm: str = "fold") -> Applied:
    """Transform every model's state dict by the plan and average.

    ``batchnorm="transform"`` folds nothing: BatchNorm vectors are multiplied by the
    point's matrix like a bias (the authors' formulation; approximate for dense maps)."""
    per_model = [plan.transforms_for(m) for m in range(len(sds))]
    folds = folds_needed(spec, per_model) if batchnorm == "fold" else []
    moved = [transform_state_dict(sds[m], spec, per_model[m], folds=folds) for m in range(len(sds))]
    return Applied(moved, folds, average_state_dicts(moved, w.tolist()))


def average(template: nn.Module, applied: Applied, w: torch.Tensor, calib: Calibration, opts: MergeOptions) -> dict[str, Any]:
    """Replace ``applied.merged`` by the combination ``opts.averaging`` asks for (no-op for the
    plain weighted mean); returns what the averaging reports."""
    if opts.averaging == "uniform" and not opts.averaging_options:
        return {}
    applied.merged, info = average_aligned(
        opts.averaging, template, applied.moved, w.tolist(), calib, options=opts.averaging_options
    )
    return info


def repair_mode_for(model: nn.Module, repair: str | None) -> str | None:
    """The repair to run: ``"auto"`` is ``"reset_bn"`` on a model with BatchNorm, else none."""
    if repair == "auto":
        return "reset_bn" if has_batchnorm(model) else None
    return None if repair in (None, "none") else repair


def repair(
    out: nn.Module,
    mode: str | None,
    models: Sequence[nn.Module],
    applied: Applied,
    spec: MergeSpec,
    plan: Plan,
    w: torch.Tensor,
    calib: Calibration,
    trace_options: dict[str, Any] | None = None,
    stats: Stats | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]] | None, dict[str, str]]:
    """Repair ``out`` in place: ``mode`` ``"reset_bn"`` or ``"repair"``; with no repair,
    folded BatchNorms get their statistics and scale back. Returns (targets, notes).

    Targets come from ``stats.modules`` (the statistics pass) where it measured a site,
    else from a pass of the input models."""
    topts = trace_options or {}
    if mode not in ("reset_bn", "repair"):
        if applied.folds:
            # no repair: the function stays the plain merge, and folded BatchNorms get their
            # statistics and scale back (instead of staying identity layers)
            restore_batchnorm(out, applied.folded_names, calib, trace_options=topts)
        return None, {}
    if mode == "repair":
        producers, bns = repair_sites(out, spec)
        names = producers + bns
        if not names:
            warnings.warn(
                "repair='repair' found no site to correct: REPAIR acts on the outputs of nn.Linear / nn.Conv*d "
                "modules and affine BatchNorms of non-frozen merge points, and this model has none (e.g. GPT-2's "
                "Conv1D layers are not nn.Linear); the merged model is left unrepaired", stacklevel=4,
            )
    else:
        names = applied.folded_names
    targets = _repair_targets(models, applied, spec, plan, w, calib, names, topts, stats)
    if mode == "repair":
        return targets, repair_producers(out, targets, calib, trace_options=topts)
    # a folded BatchNorm has no learned scale left: it gets the aligned models' output
    # statistics as its affine *before* the statistics pass, so every later BatchNorm
    # estimates its statistics on the inputs it will see
    set_batchnorm_affine(out, targets)
    reset_bn(out, calib)
    return targets, {}


def _repair_targets(
    models: Sequence[nn.Module], applied: Applied, spec: MergeSpec, plan: Plan, w: torch.Tensor, calib: Calibration,
    names: list[str], trace_options: dict[str, Any], stats: Stats | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR's targets: the per-channel statistics each model's own output has at a site, in
    merged coordinates (layerwise: an aligned model run end to end drifts under dense maps);
    sites that are not exactly one point's coordinates use the aligned models. Moments the
    statistics pass took (``stats.modules``) are used as they are; only the rest needs a pass."""
    maps, mapped, rest = site_maps(spec, names, [plan.transforms_for(m) for m in range(len(models))])
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    measured = stats.modules if stats is not None else {}
    for name in list(mapped):
        if name in measured:
            found = mapped_moments(measured[name], [maps[m].get(name) for m in range(len(models))], w.tolist())
            if found is not None:
                targets[name] = found
                mapped.remove(name)
    if mapped:
        targets.update(output_channel_stats(models, mapped, calib, weights=w.tolist(), maps=maps, trace_options=trace_options))
    if rest:
        aligned = []
        for m, model in enumerate(models):
            mm = copy.deepcopy(model)
            mm.load_state_dict(applied.moved[m])
            aligned.append(mm)
        targets.update(output_channel_stats(aligned, rest, calib, weights=w.tolist(), trace_options=trace_options))
    return targets

