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
from .errors import MergeError
from .graph.discover import find_merge_points
from .validate import validate_models
from .repair import batchnorm_output_stats, has_batchnorm, reset_bn, set_batchnorm_affine
from .spec import MergeSpec, kind_rank
from .stats import Stats, collect_stats, default_input_fn
from .trace import as_input_tuple, eval_mode

__all__ = ["merge", "merge_with_report", "MergeResult", "MergeReport", "PointReport"]

REPAIRS = ("auto", "reset_bn", None)


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
    """

    aligner: str
    reference: int
    weights: list[float]
    points: list[PointReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    repair: str | None = None
    folded_batchnorms: int = 0

    def table(self) -> str:
        """A plain-text table of the per-point outcomes."""
        rows = [("point", "dim", "allowed", "used", "projected", "score", "ms")]
        for p in self.points:
            rows.append((p.name, str(p.dim), p.allowed, p.used, p.projected or "", "" if p.score is None else f"{p.score:.3f}", f"{1e3 * p.seconds:.1f}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


@dataclass
class MergeResult:
    """The merged model and everything that produced it."""

    model: nn.Module
    report: MergeReport
    spec: MergeSpec
    plan: Plan
    stats: Stats | None = None


def _example_from(data: Iterable[Any], input_fn: Callable[[Any], Any]) -> tuple[Any, ...]:
    for batch in data:
        inputs = as_input_tuple(input_fn(batch))
        return tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
    raise MergeError("the calibration data yielded no batch")


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


def merge_with_report(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    aligner: str | Aligner = "cca",
    reference: int | str = 0,
    weights: Sequence[float] | None = None,
    repair: str | None = "auto",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    spec: MergeSpec | None = None,
    progress: bool = False,
    leaf_modules: Sequence[Any] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    **aligner_options: Any,
) -> MergeResult:
    """Merge models and return the merged model with a report, the spec and the plan.

    Takes the same arguments as :func:`merge`.
    """
    timings: dict[str, float] = {}
    validate_models(models)
    if repair not in REPAIRS and repair != "none":
        raise MergeError(f"repair must be one of {REPAIRS}, got {repair!r}")
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
    al = get_aligner(aligner, **aligner_options)

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
        spec = find_merge_points(work[0], example, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    timings["discover"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = None
    if al.needs != "none":
        stats = collect_stats(
            work, data, spec, needs=al.needs, reference=reference, input_fn=fn, num_batches=num_batches,
            device=device, progress=progress,
            trace_options={"leaf_modules": leaf_modules, "autowrap_functions": autowrap_functions},
        )
    timings["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in work]
    problem = AlignProblem(spec, sds, reference, w, stats)
    plan = al.solve(problem)
    if not isinstance(plan, Plan):
        raise MergeError(f"aligner {al!r} returned {type(plan).__name__}, not a Plan")
    report = MergeReport(repr(al), reference, w.tolist())
    for p in spec.points:
        pp = plan.points.get(p.name)
        if pp is None:
            continue
        if p.kind == "frozen":
            raise MergeError(f"aligner {al!r} returned a transform for frozen merge point {p.name!r}")
        if len(pp.merges) != n or len(pp.unmerges) != n:
            raise MergeError(f"aligner {al!r}: merge point {p.name!r} needs {n} merge and unmerge matrices")
        if kind_rank(pp.kind) > kind_rank(p.kind) or p.kind != "linear":
            pp = _project(pp, p.kind)
            plan.points[p.name] = pp
        report.points.append(PointReport(p.name, p.dim, p.kind, pp.kind, pp.projected, pp.score, pp.seconds, pp.note))
    timings["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_model = [plan.transforms_for(m) for m in range(n)]
    folds = folds_needed(spec, per_model)
    moved = [transform_state_dict(sds[m], spec, per_model[m], folds=folds) for m in range(n)]
    merged_sd = average_state_dicts(moved, w.tolist())
    out = copy.deepcopy(work[reference])
    out.load_state_dict(merged_sd)
    report.folded_batchnorms = len(folds)
    timings["apply"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if repair == "auto":
        repair = "reset_bn" if has_batchnorm(out) else None
    if repair == "reset_bn":
        folded_bns = sorted({f.running_mean.rsplit(".", 1)[0] for f in folds})
        targets = {}
        if folded_bns:
            # the folded BatchNorms lost their learned scale: target the aligned models' statistics
            aligned = []
            for m in range(n):
                mm = copy.deepcopy(work[m])
                mm.load_state_dict(moved[m])
                aligned.append(mm)
            targets = batchnorm_output_stats(
                aligned, folded_bns, data, weights=w.tolist(), input_fn=fn, num_batches=num_batches, device=device
            )
            del aligned
        reset_bn(out, data, input_fn=fn, num_batches=num_batches, device=device, progress=progress)
        set_batchnorm_affine(out, targets)
    report.repair = repair if repair != "none" else None
    timings["repair"] = time.perf_counter() - t0
    report.timings = timings
    out.train(models[reference].training)
    return MergeResult(out, report, spec, plan, stats)


def merge(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    aligner: str | Aligner = "cca",
    reference: int | str = 0,
    weights: Sequence[float] | None = None,
    repair: str | None = "auto",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    spec: MergeSpec | None = None,
    progress: bool = False,
    leaf_modules: Sequence[Any] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
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
    aligner : str or Aligner, default "cca"
        A registered name (see :func:`autoalign.list_aligners`) or an instance.
    reference : int or "best", default 0
        The model all others are aligned to; ``"best"`` picks the one with the
        lowest cross-entropy on the calibration data.
    weights : sequence of float, optional
        Merge weights ``w_m`` (normalised; uniform by default).
    repair : {"auto", "reset_bn", None}, default "auto"
        ``"auto"`` re-estimates BatchNorm statistics when the model has any.
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
        models, data, aligner=aligner, reference=reference, weights=weights, repair=repair,
        num_batches=num_batches, device=device, input_fn=input_fn, spec=spec, progress=progress,
        leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, **aligner_options,
    ).model
