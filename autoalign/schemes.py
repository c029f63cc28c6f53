"""Merge schemes: how the stages of :mod:`autoalign.stages` are composed.

* ``"all_to_one"`` (the CCA Merge paper): collect → solve → apply once, every
  model aligned to the reference; then average → repair.
* ``"iterative"`` (MergeMany, Ainsworth et al. 2023, for statistics-based
  aligners): after all-to-one, re-align every model to the current merged model
  (statistics collected again each round, the maps expressed through it in the
  reference's coordinates) until no merge matrix moves by more than
  :data:`ITERATIVE_TOL` or ``max_iterations`` rounds.
* ``"hierarchical"``: merge pairs, then pairs of merged models, as a binary
  tree, each pair with :func:`merge_pair`.

Aligners whose own solver already iterates over all models (weight matching's
MergeMany) say so in :attr:`autoalign.Aligner.scheme_note`.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from .aligners import Aligner, Plan
from .calibration import Calibration
from .errors import MergeError
from .options import MergeOptions
from .report import MergeReport, MergeResult, PointReport, Timings
from .spec import MergeSpec
from .stages import Applied, apply, average, collect, repair, repair_mode_for, solve, state_dicts
from .stats import Stats
from .validate import check_merged

__all__ = ["SCHEME_FUNCTIONS", "ITERATIVE_TOL", "merge_all_to_one", "merge_iterative", "merge_hierarchical", "merge_pair"]

#: Relative change of the merge matrices below which the iterative scheme stops.
ITERATIVE_TOL = 1e-3


def _buffers(model: nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in model.named_buffers())


def _points(spec: MergeSpec) -> str:
    """What the solve stage works on, for the progress display: ``"12 points"``."""
    n = sum(1 for p in spec.points if p.kind != "frozen")
    return f"{n} point{'s' if n != 1 else ''}"


def merge_all_to_one(
    work: Sequence[nn.Module], calib: Calibration, spec: MergeSpec, al: Aligner, reference: int, w: torch.Tensor,
    opts: MergeOptions, timings: Timings,
) -> MergeResult:
    """Align every model to the reference once, average, repair."""
    with timings.stage("statistics"):
        stats = collect(work, calib, spec, al, reference, opts)
    with timings.stage("solve", _points(spec)):
        sds = state_dicts(work)
        plan = solve(al, spec, sds, reference, w, stats, _buffers(work[0]))
    with timings.stage("apply"):
        applied = apply(sds, spec, plan, w, opts.batchnorm)
    return _finish(work, calib, spec, al, reference, w, opts, timings, sds, plan, applied, stats)


def merge_iterative(
    work: Sequence[nn.Module], calib: Calibration, spec: MergeSpec, al: Aligner, reference: int, w: torch.Tensor,
    opts: MergeOptions, timings: Timings,
) -> MergeResult:
    """All-to-one, then re-align every model to the current merged model until the plan settles."""
    if al.needs != "reference":
        raise MergeError(
            f"scheme='iterative' re-aligns every model to the current merged model, so it needs an aligner that "
            f"aligns to a reference (needs='reference', e.g. cca or permutation); {al.name!r} has needs={al.needs!r}"
            + (f"; {al.scheme_note}" if al.scheme_note else "")
        )
    n = len(work)
    with timings.stage("statistics"):
        stats = collect(work, calib, spec, al, reference, opts)
    with timings.stage("solve", _points(spec)):
        sds = state_dicts(work)
        buffers = _buffers(work[0])
        plan = solve(al, spec, sds, reference, w, stats, buffers)
    with timings.stage("apply"):
        applied = apply(sds, spec, plan, w, opts.batchnorm)
    iterations, change = 0, None
    w_ext = torch.cat([w, torch.zeros(1, dtype=w.dtype)])
    for iterations in range(1, opts.max_iterations + 1):
        round_ = f"round {iterations}/{opts.max_iterations}"
        with timings.stage("statistics", round_):
            current = copy.deepcopy(work[reference])
            current.load_state_dict(applied.merged)
            # the consensus model is repaired like the final one, so its features are not shrunk
            mode = repair_mode_for(current, opts.repair)
            if mode in ("reset_bn", "repair"):
                repair(current, mode, work, applied, spec, plan, w, calib, opts.trace_options, stats)
            stats = collect(list(work) + [current], calib, spec, al, n, opts)
        with timings.stage("solve", f"{round_}, {_points(spec)}"):
            full = solve(al, spec, sds + state_dicts([current]), n, w_ext, stats, buffers)
            new_plan = Plan({name: pp.without_last().rebased(reference) for name, pp in full.points.items()})
            change = new_plan.change_from(plan)
            plan = new_plan
        with timings.stage("apply", round_):
            applied = apply(sds, spec, plan, w, opts.batchnorm)
        del current
        if change <= ITERATIVE_TOL:
            break
    return _finish(work, calib, spec, al, reference, w, opts, timings, sds, plan, applied, stats, iterations, change)


def merge_pair(
    a: nn.Module, b: nn.Module, wa: float, wb: float, calib: Calibration, spec: MergeSpec, al: Aligner,
    opts: MergeOptions, timings: Timings,
) -> MergeResult:
    """Merge two models all-to-one (``a`` is the reference), with weights ``wa : wb``."""
    pair_w = torch.tensor([wa, wb] if wa + wb > 0 else [0.5, 0.5], dtype=torch.float64)
    return merge_all_to_one([a, b], calib, spec, al, 0, pair_w / pair_w.sum(), opts, timings)


def merge_hierarchical(
    work: Sequence[nn.Module], calib: Calibration, spec: MergeSpec, al: Aligner, reference: int, w: torch.Tensor,
    opts: MergeOptions, timings: Timings,
) -> MergeResult:
    """Merge pairs, then pairs of merged models, as a binary tree (the reference leads every pair it is in)."""
    order = [reference] + [i for i in range(len(work)) if i != reference]
    level = [(work[i], float(w[i])) for i in order]
    rounds = pairs = 0
    result: MergeResult | None = None
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level) - 1, 2):
            (a, wa), (b, wb) = level[k], level[k + 1]
            pairs += 1
            with timings.progress.scope(f"pair {pairs}/{len(work) - 1}"):
                result = merge_pair(a, b, wa, wb, calib, spec, al, opts, timings)
            nxt.append((result.model, wa + wb))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        rounds += 1
    assert result is not None
    report = result.report
    report.scheme, report.iterations, report.reference, report.weights = "hierarchical", rounds, reference, w.tolist()
    report.timings = timings
    result.model.train(work[reference].training)
    return MergeResult(result.model, report, spec, result.plan, None, result.repair_targets)


def _finish(
    work: Sequence[nn.Module], calib: Calibration, spec: MergeSpec, al: Aligner, reference: int, w: torch.Tensor,
    opts: MergeOptions, timings: Timings, sds: list[dict[str, torch.Tensor]], plan: Plan, applied: Applied,
    stats: Stats | None, iterations: int = 0, change: float | None = None,
) -> MergeResult:
    """Average (when another averaging is asked for), build the merged model, repair it, report."""
    averaging_info = {}
    if opts.averaging != "uniform" or opts.averaging_options:
        with timings.stage("averaging"):
            averaging_info = average(work[reference], applied, w, calib, opts)
    report = MergeReport(
        repr(al), reference, w.tolist(), scheme=opts.scheme, iterations=iterations, plan_change=change,
        averaging=opts.averaging, averaging_info=averaging_info, folded_batchnorms=len(applied.folds),
    )
    for p in spec.points:
        pp = plan.points.get(p.name)
        if pp is not None:
            report.points.append(PointReport(p.name, p.dim, p.kind, pp.kind, pp.projected, pp.score, pp.seconds, pp.note))
    out = copy.deepcopy(work[reference])
    check_merged(applied.merged, work[reference], spec=spec, inputs=sds)
    out.load_state_dict(applied.merged)
    with timings.stage("repair"):
        mode = repair_mode_for(out, opts.repair)
        targets, report.repair_notes = repair(out, mode, work, applied, spec, plan, w, calib, opts.trace_options, stats)
    report.repair = mode
    report.timings = timings
    out.train(work[reference].training)
    return MergeResult(out, report, spec, plan, stats, targets)


#: Scheme name → the function that runs it.
SCHEME_FUNCTIONS: dict[str, Callable[..., MergeResult]] = {
    "all_to_one": merge_all_to_one,
    "iterative": merge_iterative,
    "hierarchical": merge_hierarchical,
}
