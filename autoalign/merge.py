"""``autoalign.merge``: discover, collect statistics, solve, apply, average, repair."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .aligners import AlignProblem, Aligner, Plan, PointPlan, get_aligner
from .aligners.linalg import is_orthogonal, is_permutation, nearest_orthogonal, nearest_permutation
from .apply import average_state_dicts, folds_needed, transform_state_dict
from .averaging import AVERAGINGS, average_aligned
from .errors import AutoalignError, DataError, MergeError, OptionError
from .select import Selection, heldout_loss, selection_candidates, split_batches
from .graph.discover import find_merge_points
from .validate import NO_BATCH, check_example, check_merged, validate_models, validate_options
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
from .spec import FEATURES, MergeSpec, kind_rank
from .stats import Stats, collect_stats, default_input_fn, product_dtype_for
from .trace import as_input_tuple, eval_mode

__all__ = ["merge", "merge_with_report", "MergeResult", "MergeReport", "PointReport"]

REPAIRS = ("auto", "reset_bn", "repair", None)
BATCHNORMS = ("fold", "transform")
SCHEMES = ("all_to_one", "iterative", "hierarchical")
ITERATIVE_TOL = 1e-3


@dataclass
class PointReport:
    """What happened at one merge point."""

    name: str
    dim: int
    allowed: str
    used: str
    projected: str | None
    score: float | None
    seconds: float
    note: str | None = None


@dataclass
class MergeReport:
    """Summary of a merge: per-point outcomes and where the time went.

    Attributes
    ----------
    aligner : str
        The aligner used (its repr).
    reference : int
        Index of the reference model.
    weights : list of float
        Merge weights (sum to one).
    points : list of PointReport
    timings : dict of str to float
        Seconds spent in ``discover``, ``statistics``, ``solve``, ``apply``, ``repair``.
    repair : str or None
        The repair applied.
    folded_batchnorms : int
        BatchNorm layers folded into their producers.
    scheme : str
        ``"all_to_one"`` or ``"iterative"``.
    iterations : int
        Re-alignment rounds of the iterative scheme (0 for all-to-one).
    plan_change : float or None
        Relative change of the merge matrices in the last round (iterative only).
    repair_notes : dict of str to str
        Modules REPAIR could not fully correct, and why.
    selection : Selection or None
        With ``aligner="auto"`` or ``ridge="auto"``: the candidates, their
        held-out losses and the choice (see :mod:`autoalign.select`).

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> report = autoalign.merge_with_report(nets, [torch.randn(16, 4)], aligner="permutation").report
    >>> report.reference, report.weights, sorted(report.timings)
    (0, [0.5, 0.5], ['apply', 'discover', 'repair', 'solve', 'statistics'])
    >>> print(report.table().splitlines()[0])
    point  dim  allowed  used         projected  score  ms
    """

    aligner: str
    reference: int
    weights: list[float]
    points: list[PointReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    repair: str | None = None
    folded_batchnorms: int = 0
    scheme: str = "all_to_one"
    iterations: int = 0
    plan_change: float | None = None
    repair_notes: dict[str, str] = field(default_factory=dict)
    averaging: str = "uniform"
    averaging_info: dict[str, Any] = field(default_factory=dict)
    selection: Selection | None = None

    def table(self) -> str:
        """A plain-text table of the per-point outcomes."""
        rows = [("point", "dim", "allowed", "used", "projected", "score", "ms")]
        for p in self.points:
            rows.append((p.name, str(p.dim), p.allowed, p.used, p.projected or "", "" if p.score is None else f"{p.score:.3f}", f"{1e3 * p.seconds:.1f}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


@dataclass
class MergeResult:
    """The merged model and everything that produced it.

    Attributes
    ----------
    model : nn.Module
        The merged model (a new module of the inputs' class).
    report : MergeReport
        Per-point outcomes and timings.
    spec : MergeSpec
        The merge points used.
    plan : Plan
        The aligner's transforms (after projection onto each point's kind).
    stats : Stats or None
        The feature statistics (``None`` for data-free aligners).
    repair_targets : dict of str to (Tensor (C,), Tensor (C,)), optional
        Per repaired module, the target per-channel mean and std.

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(3)]
    >>> result = autoalign.merge_with_report(nets, [torch.randn(16, 4)], aligner="cca")
    >>> [pp.kind for pp in result.plan.points.values()], len(result.plan.points["0"].merges)
    (['linear'], 3)
    """

    model: nn.Module
    report: MergeReport
    spec: MergeSpec
    plan: Plan
    stats: Stats | None = None
    repair_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def _example_from(data: Iterable[Any], input_fn: Callable[[Any], Any]) -> tuple[Any, ...]:
    for batch in data:
        inputs = as_input_tuple(input_fn(batch))
        return tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
    raise DataError(NO_BATCH)


def _project(pp: PointPlan, allowed: str) -> PointPlan:
    """Project a point's transforms onto the kind the point allows (recorded in ``projected``)."""
    if allowed == "linear":
        return pp
    if allowed == "permutation":
        if all(is_permutation(m) for m in pp.merges):
            return pp
        merges = [nearest_permutation(m) for m in pp.merges]
        return PointPlan(merges, [m.T.contiguous() for m in merges], "permutation", pp.score, pp.note, "permutation", pp.seconds)
    if allowed == "orthogonal":
        if all(is_orthogonal(m) for m in pp.merges):
            return pp
        merges = [nearest_orthogonal(m) for m in pp.merges]
        return PointPlan(merges, [m.T.contiguous() for m in merges], "orthogonal", pp.score, pp.note, "orthogonal", pp.seconds)
    raise MergeError(f"cannot project onto kind {allowed!r}")


def _best_reference(models: Sequence[nn.Module], data: Iterable[Any], input_fn: Callable[[Any], Any], num_batches: int | None, device: Any) -> int:
    losses = [0.0] * len(models)
    seen = 0
    with torch.no_grad(), eval_mode(*models):
        for batch in data:
            if num_batches is not None and seen >= num_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
                raise MergeError('reference="best" needs (input, target) batches to compute the calibration loss')
            inputs = as_input_tuple(input_fn(batch))
            inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in inputs)
            target = batch[1].to(device) if device is not None else batch[1]
            for i, m in enumerate(models):
                losses[i] += float(F.cross_entropy(m(*inputs), target, reduction="sum"))
            seen += 1
    return int(min(range(len(models)), key=lambda i: losses[i]))


def _solve_checked(al: Aligner, problem: AlignProblem, spec: MergeSpec, n: int) -> Plan:
    """Run the aligner, check its plan against the spec and project it onto each point's kind."""
    plan = al.solve(problem)
    if not isinstance(plan, Plan):
        raise MergeError(f"aligner {al!r} returned {type(plan).__name__}, not a Plan")
    for p in spec.points:
        pp = plan.points.get(p.name)
        if pp is None:
            continue
        if p.kind == "frozen":
            raise MergeError(f"aligner {al!r} returned a transform for frozen merge point {p.name!r}")
        if len(pp.merges) != n or len(pp.unmerges) != n:
            raise MergeError(f"aligner {al!r}: merge point {p.name!r} needs {n} merge and unmerge matrices")
        if kind_rank(pp.kind) > kind_rank(p.kind) or p.kind != "linear":
            plan.points[p.name] = _project(pp, p.kind)
    return plan


def _drop_last_model(pp: PointPlan) -> PointPlan:
    """The point plan without its last model (the current merged model of the iterative scheme)."""
    return PointPlan(pp.merges[:-1], pp.unmerges[:-1], pp.kind, pp.score, pp.note, pp.projected, pp.seconds)


def _rebase(pp: PointPlan, ref: int) -> PointPlan:
    """Express a point's plan in the reference model's coordinates: ``U_ref M_m`` and ``U_m M_ref``.

    The iterative scheme aligns every model to the merged model; going through it to
    the reference keeps the reference's weights untouched (its maps become the
    identity), so dense (non-permutation) maps, which are exact for no model through
    a nonlinearity, still leave one model exact. Products of permutations
    (orthogonal maps) stay permutations (orthogonal).
    """
    to_ref, from_ref = pp.unmerges[ref], pp.merges[ref]
    eye = torch.eye(to_ref.shape[0], dtype=to_ref.dtype, device=to_ref.device)
    merges = [eye if m == ref else to_ref @ pp.merges[m] for m in range(len(pp.merges))]
    unmerges = [eye if m == ref else pp.unmerges[m] @ from_ref for m in range(len(pp.unmerges))]
    return PointPlan(merges, unmerges, pp.kind, pp.score, pp.note, pp.projected, pp.seconds)


def _plan_change(old: Plan, new: Plan) -> float:
    """Largest relative Frobenius change of any model's merge matrix at any point."""
    change = 0.0
    for name, pp in new.points.items():
        prev = old.points.get(name)
        if prev is None:
            return float("inf")
        for a, b in zip(prev.merges, pp.merges):
            change = max(change, float(torch.linalg.norm(b - a) / torch.linalg.norm(a).clamp_min(1e-12)))
    return change


def _apply_plan(
    sds: list[dict[str, torch.Tensor]], spec: MergeSpec, plan: Plan, w: torch.Tensor, batchnorm: str = "fold"
) -> tuple[list[dict[str, torch.Tensor]], list[Any], dict[str, torch.Tensor]]:
    """Transform every model's state dict by the plan and average: (moved, folds, merged).

    ``batchnorm="transform"`` folds nothing: BatchNorm vectors are multiplied by the
    point's matrix like a bias (the authors' formulation; approximate for dense maps)."""
    per_model = [plan.transforms_for(m) for m in range(len(sds))]
    folds = folds_needed(spec, per_model) if batchnorm == "fold" else []
    moved = [transform_state_dict(sds[m], spec, per_model[m], folds=folds) for m in range(len(sds))]
    return moved, folds, average_state_dicts(moved, w.tolist())


def _repair(
    out: nn.Module,
    repair: str,
    work: Sequence[nn.Module],
    moved: list[dict[str, torch.Tensor]],
    folds: list[Any],
    spec: MergeSpec,
    plan: Plan,
    data: Iterable[Any],
    w: torch.Tensor,
    *,
    input_fn: Callable[[Any], Any],
    num_batches: int | None,
    device: Any,
    progress: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, str]]:
    """Repair ``out`` in place (``"reset_bn"`` or ``"repair"``): (targets, notes)."""
    if repair == "repair":
        producers, bns = repair_sites(out, spec)
        names = producers + bns
    else:
        names = _folded_names(folds)
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    # REPAIR's target: the per-channel statistics each model's own output has there, in
    # merged coordinates (layerwise: an aligned model run end to end drifts under dense maps)
    maps, mapped, rest = site_maps(spec, names, [plan.transforms_for(m) for m in range(len(work))])
    if mapped:
        targets = output_channel_stats(
            work, mapped, data, weights=w.tolist(), input_fn=input_fn, num_batches=num_batches, device=device, maps=maps
        )
    if rest:
        aligned = []
        for m in range(len(work)):
            mm = copy.deepcopy(work[m])
            mm.load_state_dict(moved[m])
            aligned.append(mm)
        targets.update(output_channel_stats(
            aligned, rest, data, weights=w.tolist(), input_fn=input_fn, num_batches=num_batches, device=device
        ))
        del aligned
    notes: dict[str, str] = {}
    if repair == "repair":
        notes = repair_producers(out, targets, data, input_fn=input_fn, num_batches=num_batches, device=device, progress=progress)
    else:
        # a folded BatchNorm has no learned scale left: it gets the aligned models' output
        # statistics as its affine *before* the statistics pass, so every later BatchNorm
        # estimates its statistics on the inputs it will see
        set_batchnorm_affine(out, targets)
        reset_bn(out, data, input_fn=input_fn, num_batches=num_batches, device=device, progress=progress)
    return targets, notes


def _folded_names(folds: Sequence[Any]) -> list[str]:
    """Module names of the affine BatchNorm layers among ``folds``."""
    return sorted({f.running_mean.rsplit(".", 1)[0] for f in folds if f.weight and f.bias})


def _merge_hierarchical(
    work: list[nn.Module],
    data: Iterable[Any],
    al: Aligner,
    spec: MergeSpec,
    reference: int,
    w: torch.Tensor,
    timings: dict[str, float],
    *,
    training: bool,
    **kwargs: Any,
) -> MergeResult:
    """Merge pairs, then pairs of merged models, as a binary tree (the reference leads every pair it is in)."""
    order = [reference] + [i for i in range(len(work)) if i != reference]
    level = [(work[i], float(w[i])) for i in order]
    rounds = 0
    result: MergeResult | None = None
    totals = dict(timings)
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level) - 1, 2):
            (a, wa), (b, wb) = level[k], level[k + 1]
            pair_w = [wa, wb] if wa + wb > 0 else [0.5, 0.5]
            result = merge_with_report([a, b], data, aligner=al, reference=0, weights=pair_w, scheme="all_to_one", spec=spec, **kwargs)
            for key, sec in result.report.timings.items():
                if key != "discover":
                    totals[key] = totals.get(key, 0.0) + sec
            nxt.append((result.model, wa + wb))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        rounds += 1
    assert result is not None
    report = result.report
    report.scheme, report.iterations, report.reference, report.weights = "hierarchical", rounds, reference, w.tolist()
    report.timings = totals
    result.model.train(training)
    return MergeResult(result.model, report, spec, result.plan, None, result.repair_targets)


def _merge_selected(
    models: Sequence[nn.Module], data: Iterable[Any], choice: tuple[str, list[tuple[str, Any, dict[str, Any]]]], **opts: Any
) -> MergeResult:
    """Merge with every candidate on the first calibration batches, score each merged model
    on the held-out rest, merge again on all batches with the best (see :mod:`autoalign.select`)."""
    option, candidates = choice
    t0 = time.perf_counter()
    fit, held = split_batches(data, opts["num_batches"])
    fn = opts["input_fn"] or default_input_fn
    losses: dict[str, float] = {}
    errors: dict[str, str] = {}
    ensemble = None
    kind = ""
    for label, al, al_opts in candidates:
        try:
            res = merge_with_report(models, fit, aligner=al, **{**opts, "num_batches": None}, **al_opts)
        except AutoalignError as exc:
            losses[label], errors[label] = float("inf"), f"{type(exc).__name__}: {exc}"
            continue
        loss, kind, ensemble = heldout_loss(res.model, models, held, input_fn=fn, device=opts["device"], ensemble=ensemble)
        losses[label] = loss if loss == loss else float("inf")  # NaN: never chosen
        del res
    finite = {k: v for k, v in losses.items() if v < float("inf")}
    if not finite:
        raise MergeError(f"every {option} candidate failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    best = min(finite, key=lambda k: finite[k])
    _, al, al_opts = next(c for c in candidates if c[0] == best)
    seconds = time.perf_counter() - t0
    result = merge_with_report(models, data, aligner=al, **opts, **al_opts)
    result.report.selection = Selection(option, best, losses, kind, len(fit), len(held), errors)
    result.report.timings["selection"] = seconds  # the candidates' merges and scoring
    return result


def merge_with_report(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    aligner: str | Aligner = "procrustes",
    reference: int | str = 0,
    weights: Sequence[float] | None = None,
    scheme: str = "all_to_one",
    max_iterations: int = 10,
    averaging: str = "uniform",
    averaging_options: dict[str, Any] | None = None,
    repair: str | None = "auto",
    batchnorm: str = "fold",
    features: str = "activation",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    spec: MergeSpec | None = None,
    progress: bool = False,
    leaf_modules: Sequence[Any] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    precision: str | None = None,
    **aligner_options: Any,
) -> MergeResult:
    """Merge models and return the merged model with a report, the spec and the plan.

    Takes the same arguments as :func:`merge`.

    Returns
    -------
    MergeResult
        ``model`` (the merged model), ``report`` (per-point outcomes, timings,
        scheme rounds, repair notes), ``spec``, ``plan``, ``stats`` and
        ``repair_targets`` (module name → target (mean, std) when repaired).

    Examples
    --------
    >>> import torch, autoalign
    >>> def mlp(seed):
    ...     torch.manual_seed(seed)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> data = [torch.randn(32, 4) for _ in range(4)]
    >>> result = autoalign.merge_with_report([mlp(0), mlp(1)], data, aligner="permutation", repair="repair")
    >>> [p.used for p in result.report.points]
    ['permutation']
    >>> sorted(result.repair_targets)
    ['0']
    """
    timings: dict[str, float] = {}
    validate_models(models, device=device)
    validate_options(len(models), weights=weights, num_batches=num_batches)
    if repair not in REPAIRS and repair != "none":
        raise MergeError(f"repair must be one of {REPAIRS}, got {repair!r}")
    if scheme not in SCHEMES:
        raise MergeError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if batchnorm not in BATCHNORMS:
        raise MergeError(f"batchnorm must be one of {BATCHNORMS}, got {batchnorm!r}")
    if features not in FEATURES:
        raise OptionError(f"features must be one of {FEATURES}, got {features!r}")
    if batchnorm == "transform" and repair in (None, "none"):
        raise MergeError(
            "batchnorm='transform' multiplies BatchNorm running statistics by dense matrices, which leaves "
            "them meaningless (even negative variances); it needs repair='reset_bn' (the authors' choice), "
            "'repair' or 'auto', not repair=None"
        )
    if averaging not in AVERAGINGS:
        raise MergeError(f"averaging must be one of {AVERAGINGS}, got {averaging!r}")
    product_dtype_for(precision)  # a bad value fails here, before any work
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise MergeError(f"max_iterations must be a positive int, got {max_iterations!r}")
    if iter(data) is data:  # type: ignore[comparison-overlap]
        raise MergeError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    fn = input_fn or default_input_fn
    n = len(models)
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        if w.shape != (n,):
            raise MergeError(f"weights has {w.numel()} entries for {n} models")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise MergeError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
        w = w / w.sum()
    choice = selection_candidates(aligner, aligner_options)
    if choice is not None:
        return _merge_selected(
            models, data, choice, reference=reference, weights=weights, scheme=scheme, max_iterations=max_iterations,
            averaging=averaging, averaging_options=averaging_options, repair=repair, batchnorm=batchnorm,
            features=features, num_batches=num_batches, device=device, input_fn=input_fn, spec=spec, progress=progress,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, precision=precision,
        )
    al = get_aligner(aligner, **aligner_options)
    if scheme == "iterative" and al.needs != "reference":
        raise MergeError(
            f"scheme='iterative' re-aligns every model to the current merged model, so it needs an aligner that "
            f"aligns to a reference (needs='reference', e.g. cca or permutation); {al.name!r} has needs={al.needs!r}"
            + ("; it runs MergeMany itself (its option strategy='merge_many', the default for N > 2)" if al.name == "weight_matching" else "")
        )

    work = list(models)
    if device is not None:
        dev = torch.device(device)
        work = [m if all(p.device == dev for p in m.parameters()) else copy.deepcopy(m).to(dev) for m in models]

    if isinstance(reference, str):
        if reference != "best":
            raise MergeError(f'reference must be a model index or "best", got {reference!r}')
        reference = _best_reference(work, data, fn, num_batches, device)
    if not isinstance(reference, int) or not 0 <= reference < n:
        raise MergeError(f"reference must be an index in [0, {n}), got {reference!r}")

    if n == 1:
        warnings.warn("merge got a single model; returning a copy of it", stacklevel=2)
        out = copy.deepcopy(models[0])
        return MergeResult(out, MergeReport(repr(al), 0, [1.0]), spec or MergeSpec([], []), Plan())

    t0 = time.perf_counter()
    if spec is None:
        example = _example_from(data, fn)
        if device is not None:
            example = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example)
        check_example(work[0], example)
        spec = find_merge_points(work[0], example, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    spec = spec.observed_at(features)
    timings["discover"] = time.perf_counter() - t0

    if scheme == "hierarchical":
        return _merge_hierarchical(
            work, data, al, spec, reference, w, timings, repair=repair, batchnorm=batchnorm, averaging=averaging,
            averaging_options=averaging_options, num_batches=num_batches, device=device, input_fn=input_fn,
            progress=progress, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
            precision=precision, training=models[reference].training,
        )

    t0 = time.perf_counter()
    stats = None
    if al.needs != "none":
        stats = collect_stats(
            work, data, spec, needs=al.needs, reference=reference, input_fn=fn, num_batches=num_batches,
            device=device, progress=progress, self_moments=al.self_moments, precision=precision,
            trace_options={"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions},
        )
    timings["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in work]
    buffers = frozenset(name for name, _ in work[0].named_buffers())
    plan = _solve_checked(al, AlignProblem(spec, sds, reference, w, stats, buffers), spec, n)
    timings["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    moved, folds, merged_sd = _apply_plan(sds, spec, plan, w, batchnorm)
    timings["apply"] = time.perf_counter() - t0

    iterations, change = 0, None
    if scheme == "iterative":
        # MergeMany-style: re-align every model to the current merged model until the plan settles
        timings.setdefault("statistics", 0.0)
        for iterations in range(1, max_iterations + 1):
            t0 = time.perf_counter()
            current = copy.deepcopy(work[reference])
            current.load_state_dict(merged_sd)
            # the consensus model is repaired like the final one, so its features are not shrunk
            cur_repair = ("reset_bn" if has_batchnorm(current) else None) if repair == "auto" else repair
            if cur_repair in ("reset_bn", "repair"):
                _repair(current, cur_repair, work, moved, folds, spec, plan, data, w, input_fn=fn,
                        num_batches=num_batches, device=device)
            stats = collect_stats(
                work + [current], data, spec, needs=al.needs, reference=n, input_fn=fn, num_batches=num_batches,
                device=device, self_moments=al.self_moments, precision=precision,
                trace_options={"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions},
            )
            timings["statistics"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            cur_sd = {k: v.detach() for k, v in current.state_dict().items()}
            w_ext = torch.cat([w, torch.zeros(1, dtype=w.dtype)])
            full = _solve_checked(al, AlignProblem(spec, sds + [cur_sd], n, w_ext, stats, buffers), spec, n + 1)
            new_plan = Plan({name: _rebase(_drop_last_model(pp), reference) for name, pp in full.points.items()})
            change = _plan_change(plan, new_plan)
            plan = new_plan
            timings["solve"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            moved, folds, merged_sd = _apply_plan(sds, spec, plan, w, batchnorm)
            timings["apply"] += time.perf_counter() - t0
            del current
            if change <= ITERATIVE_TOL:
                break

    averaging_info: dict[str, Any] = {}
    if averaging != "uniform" or averaging_options:
        t0 = time.perf_counter()
        merged_sd, averaging_info = average_aligned(
            averaging, work[reference], moved, w.tolist(), data, options=averaging_options, input_fn=fn,
            num_batches=num_batches, device=device,
        )
        timings["averaging"] = time.perf_counter() - t0

    report = MergeReport(
        repr(al), reference, w.tolist(), scheme=scheme, iterations=iterations, plan_change=change,
        averaging=averaging, averaging_info=averaging_info,
    )
    for p in spec.points:
        pp = plan.points.get(p.name)
        if pp is not None:
            report.points.append(PointReport(p.name, p.dim, p.kind, pp.kind, pp.projected, pp.score, pp.seconds, pp.note))
    out = copy.deepcopy(work[reference])
    check_merged(merged_sd, work[reference], spec=spec, inputs=sds)
    out.load_state_dict(merged_sd)
    report.folded_batchnorms = len(folds)

    t0 = time.perf_counter()
    if repair == "auto":
        repair = "reset_bn" if has_batchnorm(out) else None
    repair_targets = None
    if repair in ("reset_bn", "repair"):
        repair_targets, report.repair_notes = _repair(
            out, repair, work, moved, folds, spec, plan, data, w, input_fn=fn, num_batches=num_batches, device=device,
            progress=progress,
        )
    elif folds:
        # no repair: the function stays the plain merge, and folded BatchNorms get their
        # statistics and scale back (instead of staying identity layers)
        restore_batchnorm(out, _folded_names(folds), data, input_fn=fn, num_batches=num_batches, device=device)
    report.repair = repair if repair != "none" else None
    timings["repair"] = time.perf_counter() - t0
    report.timings = timings
    out.train(models[reference].training)
    return MergeResult(out, report, spec, plan, stats, repair_targets)


def merge(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    aligner: str | Aligner = "procrustes",
    reference: int | str = 0,
    weights: Sequence[float] | None = None,
    scheme: str = "all_to_one",
    max_iterations: int = 10,
    averaging: str = "uniform",
    averaging_options: dict[str, Any] | None = None,
    repair: str | None = "auto",
    batchnorm: str = "fold",
    features: str = "activation",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    spec: MergeSpec | None = None,
    progress: bool = False,
    leaf_modules: Sequence[Any] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    precision: str | None = None,
    **aligner_options: Any,
) -> nn.Module:
    """Merge models of one architecture, trained from different seeds, into one.

    Parameters
    ----------
    models : sequence of nn.Module
        ``N >= 1`` models of the same class with identical state-dict keys and
        shapes. They are never modified.
    data : re-iterable of batches
        Calibration data (a DataLoader or a list): tensors, ``(input, target)``
        pairs or dicts. Used for feature statistics and BatchNorm repair.
    aligner : str or Aligner, default "procrustes"
        The default follows the measurements in docs/results.md. On residual
        BatchNorm nets (ResNet20 ×1 on CIFAR-10, a residual CNN on MNIST) the
        dense aligners beat permutation matching once their repair targets are
        measured layerwise: CCA Merge by 3–4 and 11 points on ResNet20 at N = 2 and
        4, by 6 points on the MNIST net at N = 4 (it trails there by 2.5 at
        N = 2); the best orthogonal map fitted to the same cross-covariances
        (``"procrustes"``) ties or beats CCA in every one of those runs (+0.0
        to +3.1) and on the MNIST MLPs without BatchNorm (±0.2). ``"cca"`` is
        the paper's method; ``"auto"`` lets held-out data decide.
        A registered name (see :func:`autoalign.list_aligners`), an instance, or
        ``"auto"``: merge with each of a short list of aligners (``procrustes``,
        ``cca`` and ``permutation``; ``candidates=[...]`` to change it) on 80 % of the calibration
        batches, keep the one whose merged model has the lowest loss on the other
        20 % and merge again with it on all of them (``report.selection`` lists the
        held-out losses; :mod:`autoalign.select`). ``ridge="auto"`` chooses an
        aligner's ridge from ``1e-3 … 10`` the same way.
    reference : int or "best", default 0
        The model all others are aligned to; ``"best"`` picks the one with the
        lowest cross-entropy on the calibration data.
    weights : sequence of float, optional
        Merge weights ``w_m`` (normalised; uniform by default).
    scheme : {"all_to_one", "iterative"}, default "all_to_one"
        ``"all_to_one"`` aligns every model to the reference once (the CCA
        Merge paper). ``"iterative"`` then re-aligns every model to the current
        merged model (statistics collected again each round; the maps are
        expressed through it in the reference's coordinates, so the reference
        keeps its weights) until no merge matrix changes by more than 0.1 %
        (relative Frobenius norm) or ``max_iterations`` rounds — MergeMany
        (Ainsworth et al. 2023) for statistics-based aligners; needs an aligner
        with ``needs="reference"``.
        ``"hierarchical"`` merges pairs, then pairs of merged models, as a
        binary tree (the reference leads; pair weights are the sums of their
        members'; the report's ``iterations`` is the tree depth and ``plan``
        the last pair's); any aligner.
    max_iterations : int, default 10
        Upper bound on the rounds of ``scheme="iterative"``.
    averaging : {"uniform", "fisher", "learned"}, default "uniform"
        How the aligned models are combined (see :mod:`autoalign.averaging`):
        the weighted mean; Fisher-weighted per element (Matena & Raffel 2022);
        or per-layer / per-element coefficients learned on the calibration data.
    averaging_options : dict, optional
        Options of ``"fisher"`` (``labels``, ``chunk``, ``seed``) or
        ``"learned"`` (``granularity``, ``lr``, ``epochs``, ``objective``, ``temperature``).
    repair : {"auto", "reset_bn", "repair", None}, default "auto"
        ``"reset_bn"`` re-estimates BatchNorm statistics (folded BatchNorms get
        the aligned models' output statistics as affine); ``"repair"`` is full
        REPAIR (Jordan et al. 2023): every producer's and BatchNorm's
        per-channel output mean/std are matched to the average of the aligned
        models', folded into weights and biases, so it works without BatchNorm;
        ``"auto"`` is ``"reset_bn"`` when the model has BatchNorm, else None.
        Without repair, folded BatchNorms get the merged channels' statistics
        and std as running statistics and weight (the function is unchanged;
        :func:`autoalign.repair.restore_batchnorm`).
    batchnorm : {"fold", "transform"}, default "fold"
        How a BatchNorm whose point takes a dense (non-permutation) transform is
        merged. ``"fold"`` folds it into its producer, which is exact, transforms
        and averages, and writes the merged per-channel scale and shift back into
        the BatchNorm. ``"transform"`` is the CCA Merge authors' formulation:
        every BatchNorm vector is multiplied by the dense matrix like a bias
        (exact only for permutations), and the statistics are then re-estimated,
        so it needs a repair (``"auto"`` means ``"reset_bn"`` there).
    features : {"activation", "preactivation"}, default "activation"
        Where each point's features are observed for the statistics: where the
        next layers read them (after the nonlinearity; every read of a residual
        stream), or at the producers' outputs (after a folded BatchNorm, before
        the nonlinearity; each residual branch before its addition). See
        :meth:`autoalign.MergeSpec.observed_at`.
    num_batches : int, optional
        Use at most this many calibration batches per pass.
    device : torch.device or str, optional
        Where to compute (models are copied there if needed).
    input_fn : callable, optional
        Picks the model input out of a batch.
    spec : MergeSpec, optional
        A precomputed spec (default: discovered on the first model).
    progress : bool, default False
        Show progress bars.
    leaf_modules, autowrap_functions : sequence, optional
        Tracing escape hatches (see :func:`autoalign.trace`).
    precision : {None, "float32", "float64"}, optional
        Precision of the feature products behind the statistics (see
        :func:`autoalign.collect_stats`; always accumulated in float64). Default:
        float64 for float64 models, float32 otherwise. ``"float64"`` costs about
        2× the products and separates features whose correlations with their
        partners tie to within ~1e-5 (e.g. few samples for many features).
    **aligner_options
        Hyperparameters of the aligner (e.g. ``ridge=0.1`` for ``cca``).

    Returns
    -------
    nn.Module
        A new model of the inputs' class with the same state-dict keys.

    Raises
    ------
    MergeError
        For unusable models, data or options (the message names the problem).

    Examples
    --------
    >>> import torch, autoalign
    >>> def mlp(seed):
    ...     torch.manual_seed(seed)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> data = [torch.randn(32, 4) for _ in range(4)]
    >>> merged = autoalign.merge([mlp(0), mlp(1), mlp(2)], data, aligner="cca")
    >>> type(merged).__name__
    'Sequential'
    """
    return merge_with_report(
        models, data, aligner=aligner, reference=reference, weights=weights, scheme=scheme,
        max_iterations=max_iterations, averaging=averaging, averaging_options=averaging_options, repair=repair,
        batchnorm=batchnorm, features=features, num_batches=num_batches, device=device, input_fn=input_fn, spec=spec,
        progress=progress, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, precision=precision, **aligner_options,
    ).model
