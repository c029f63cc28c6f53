"""``autoalign.merge``: the merge pipeline.

:func:`merge_with_report` reads as the pipeline: check the options and the
models once (:class:`~autoalign.options.MergeOptions`), read the calibration data
one way (:class:`~autoalign.calibration.Calibration`), choose the reference,
discover the merge points, then run the scheme (:mod:`autoalign.schemes`), which
composes the stages of :mod:`autoalign.stages` — collect → solve (+ project) →
apply → average → repair — each timed by one helper
(:class:`~autoalign.report.Timings`). ``aligner="auto"`` / ``ridge="auto"``
first merges with each candidate on part of the data (:mod:`autoalign.select`).
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .aligners import Aligner, Plan, get_aligner
from .calibration import Calibration
from .errors import AutoalignError, MergeError
from .options import MergeOptions
from .report import MergeReport, MergeResult, PointReport, Timings
from .schemes import SCHEME_FUNCTIONS
from .select import Selection, heldout_loss, selection_candidates, split_batches
from .spec import MergeSpec
from .stages import choose_reference, discover
from .trace import Tracer
from .trace.reuse import reuse_exports
from .validate import validate_models
from .vocab import Averaging, BatchNormMode, Features, Precision, Repair, Scheme

__all__ = ["merge", "merge_with_report", "MergeResult", "MergeReport", "PointReport", "MergeOptions"]


def merge(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    aligner: str | Aligner = "procrustes",
    reference: int | str = 0,
    weights: Sequence[float] | None = None,
    scheme: Scheme = "all_to_one",
    max_iterations: int = 10,
    averaging: Averaging = "uniform",
    averaging_options: dict[str, Any] | None = None,
    repair: Repair | None = "auto",
    batchnorm: BatchNormMode = "fold",
    features: Features = "activation",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    spec: MergeSpec | None = None,
    progress: bool = False,
    tracer: Tracer = "auto",
    leaf_modules: Sequence[Any] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    precision: Precision | None = None,
    rules: Mapping[Any, Callable[..., Any]] | None = None,
    shard: bool = False,
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
    progress : bool or Progress, default False
        Show one progress display for the whole merge on stderr: the running stage
        (``discover``, ``statistics``, ``solve``, ``apply``, ``repair``, ...), the batch
        of each pass over the data (``statistics: batch 5/8, model 2/4``) and, at the
        end, the seconds per stage. Redrawn in place on a terminal, plain lines
        otherwise; only rank 0 draws under ``torch.distributed``. A
        :class:`~autoalign.progress.Progress` (e.g. a
        :class:`~autoalign.progress.LineProgress` on another stream) is used as is.
        Silent by default; the command line turns it on (``--quiet`` turns it off).
    tracer : {"auto", "fx", "export"}, default "auto"
        The front end that turns each model into a graph (see :func:`autoalign.trace`):
        ``torch.fx`` symbolic tracing, ``torch.export`` (for models fx cannot trace,
        e.g. Hugging Face transformers), or fx with export as the fallback.
    leaf_modules, autowrap_functions : sequence, optional
        Tracing escape hatches of symbolic tracing (see :func:`autoalign.trace`).
    precision : {None, "float32", "float64"}, optional
        Precision of the feature products behind the statistics (see
        :func:`autoalign.collect_stats`; always accumulated in float64). Default:
        float64 for float64 models, float32 otherwise. ``"float64"`` costs about
        2× the products and separates features whose correlations with their
        partners tie to within ~1e-5 (e.g. few samples for many features).
    shard : bool, default False
        Under ``torch.distributed``, pass the same (whole) calibration data on every
        process and let each read its share of the batches (see
        :class:`~autoalign.calibration.Calibration`); by default each process
        passes its own shard. Either way the statistics are summed over processes,
        so every process merges identically.
    rules : dict, optional
        Channel rules for this merge only, consulted before the global registry
        (``{target: rule}`` as :func:`autoalign.register_channel_rule` takes; see
        :func:`autoalign.find_merge_points`).
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
    options = {k: v for k, v in locals().items() if k not in ("models", "data", "aligner_options")}
    return run(models, data, MergeOptions.from_kwargs(**options, **aligner_options)).model


def merge_with_report(models: Sequence[nn.Module], data: Iterable[Any], **options: Any) -> MergeResult:
    """Merge models and return the merged model with a report, the spec and the plan.

    Takes the same arguments as :func:`merge` (its signature is :func:`merge`'s).

    Returns
    -------
    MergeResult
        ``model`` (the merged model), ``report`` (per-point outcomes, timings,
        scheme rounds, repair notes), ``spec``, ``plan``, ``stats`` and
        ``repair_targets`` (module name → target (mean, std) when repaired).

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)) for _ in range(2)]
    >>> result = autoalign.merge_with_report(nets, [torch.randn(32, 4)] * 4, aligner="permutation", repair="repair")
    >>> [p.used for p in result.report.points]
    ['permutation']
    >>> sorted(result.repair_targets)
    ['0']
    """
    opts = MergeOptions.from_kwargs(**options)
    return run(models, data, opts)


def run(models: Sequence[nn.Module], data: Iterable[Any] | Calibration, opts: MergeOptions) -> MergeResult:
    """The pipeline behind :func:`merge_with_report`, for callers that hold a
    :class:`~autoalign.options.MergeOptions` (the command line).

    Every stage and calibration pass reports to the calibration's progress display
    (:mod:`autoalign.progress`); the outermost merge on a display ends it with the
    seconds per stage (a caller that opened the display's session itself, as the
    command line does, writes the summary)."""
    validate_models(models, device=opts.device)
    opts.check(len(models))
    calib = opts.calibration(data)
    progress = calib.progress
    with progress.session() as outermost, reuse_exports():  # one torch.export for all the models
        result = _pipeline(models, calib, opts)
        if outermost:
            progress.summary(result.report.timings)
    return result


def _pipeline(models: Sequence[nn.Module], calib: Calibration, opts: MergeOptions) -> MergeResult:
    """Choose the reference, discover, run the scheme (or choose an aligner first)."""
    w = opts.merge_weights(len(models))
    choice = selection_candidates(opts.aligner, opts.aligner_options)
    if choice is not None:
        return _merge_selected(models, calib, choice, opts)
    al = get_aligner(opts.aligner, **opts.aligner_options)
    timings = Timings(progress=calib.progress)
    work = _on_device(models, opts.device)
    if isinstance(opts.reference, str):  # "best": a pass over the data
        with timings.stage("reference"):
            reference = choose_reference(work, calib, opts.reference)
    else:
        reference = choose_reference(work, calib, opts.reference)
    if len(models) == 1:
        warnings.warn("merge got a single model; returning a copy of it", stacklevel=4)
        return MergeResult(copy.deepcopy(models[0]), MergeReport(repr(al), 0, [1.0]), opts.spec or MergeSpec([], []), Plan())
    with timings.stage("discover"):
        spec = discover(work[0], calib, opts)
    return SCHEME_FUNCTIONS[opts.scheme](work, calib, spec, al, reference, w, opts, timings)


def resolved_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in: ``"cuda"`` is the current CUDA device (``cuda:0``
    unless changed), so that a model already there is recognised and not copied.

    Examples
    --------
    >>> resolved_device("cpu")
    device(type='cpu')
    """
    dev = torch.device(device)
    if dev.index is not None or dev.type in ("cpu", "meta"):
        return dev
    current = getattr(torch, dev.type, None)
    index = current.current_device() if current is not None and hasattr(current, "current_device") and current.is_available() else 0
    return torch.device(dev.type, index)


def _on_device(models: Sequence[nn.Module], device: torch.device | str | None) -> list[nn.Module]:
    """The models, each copied to ``device`` unless already there."""
    if device is None:
        return list(models)
    dev = resolved_device(device)
    return [m if all(resolved_device(p.device) == dev for p in m.parameters()) else copy.deepcopy(m).to(dev) for m in models]


def _merge_selected(
    models: Sequence[nn.Module], calib: Calibration, choice: tuple[str, list[tuple[str, Any, dict[str, Any]]]], opts: MergeOptions
) -> MergeResult:
    """Merge with every candidate on the first calibration batches, score each merged model
    on the held-out rest, merge again on all batches with the best (see :mod:`autoalign.select`)."""
    option, candidates = choice
    t0 = time.perf_counter()
    progress = calib.progress
    scoring = Timings(progress=progress)  # only for the display
    fit, held = split_batches(calib)
    losses: dict[str, float] = {}
    errors: dict[str, str] = {}
    ensemble = None
    kind = ""
    for k, (label, al, al_opts) in enumerate(candidates, 1):
        with progress.scope(f"{option} {k}/{len(candidates)}: {label}"):
            try:
                res = run(models, fit, opts.replace(aligner=al, aligner_options=al_opts, num_batches=None))
            except AutoalignError as exc:
                losses[label], errors[label] = float("inf"), f"{type(exc).__name__}: {exc}"
                continue
            with scoring.stage("held-out loss"):
                loss, kind, ensemble = heldout_loss(res.model, models, held, ensemble=ensemble)
        losses[label] = loss if loss == loss else float("inf")  # NaN: never chosen
        del res
    finite = {k: v for k, v in losses.items() if v < float("inf")}
    if not finite:
        raise MergeError(f"every {option} candidate failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    best = min(finite, key=lambda k: finite[k])
    _, al, al_opts = next(c for c in candidates if c[0] == best)
    seconds = time.perf_counter() - t0
    with progress.scope(f"chosen: {best}"):
        result = run(models, calib, opts.replace(aligner=al, aligner_options=al_opts))
    result.report.selection = Selection(option, best, losses, kind, len(fit), len(held), errors)
    result.report.timings["selection"] = seconds  # the candidates' merges and scoring
    return result


merge_with_report.__signature__ = inspect.signature(merge).replace(return_annotation="MergeResult")  # type: ignore[attr-defined]
