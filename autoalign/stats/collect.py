"""The statistics pass: :func:`collect_stats` runs every model once per batch through a
tapped copy (:mod:`autoalign.capture`) and accumulates each merge point's shifted moments
(:mod:`autoalign.stats.moments`); the package docstring (:mod:`autoalign.stats`) gives the
maths, the precision and the memory behaviour."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..calibration import NO_BATCH, Calibration
from ..capture import tapped_module
from ..distributed import all_reduce_count, is_distributed
from ..errors import DataError, NonFiniteError, OptionError
from ..spec import MergePoint, MergeSpec, Site
from ..trace import eval_mode
from ..vocab import NEEDS, SELF_MOMENTS, check_choice, product_dtype_for
from .moments import Moments, all_reduce, site_view
from .results import Stats

__all__ = ["collect_stats", "pairs_for", "sites_for", "feed_order"]


def pairs_for(needs: str, n_models: int, reference: int) -> list[tuple[int, int]]:
    """Model pairs ``(i, j)`` whose cross-covariance an aligner needs.

    ``needs`` is ``"reference"`` (each model with the reference), ``"all_pairs"``
    or ``"none"``/``"self"`` (no cross terms).

    Examples
    --------
    >>> from autoalign.stats import pairs_for
    >>> pairs_for("reference", 3, 0), pairs_for("all_pairs", 3, 0)
    ([(0, 1), (0, 2)], [(0, 1), (0, 2), (1, 2)])
    """
    if needs == "reference":
        return [(reference, m) for m in range(n_models) if m != reference]
    if needs == "all_pairs":
        return [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]
    if needs in ("self", "none"):
        return []
    check_choice("needs", needs, NEEDS)
    return []


def sites_for(point: MergePoint) -> list[Site]:
    """The sites where a point's features are read: its input sites if it has any, else its
    output sites, else its projected ones."""
    for kind in ("input", "output", "projected"):
        found = [s for s in point.sites if s.kind == kind]
        if found:
            return found
    return []


def feed_order(n_models: int, reference: int, pairs: Sequence[tuple[int, int]]) -> tuple[list[int], set[int]]:
    """The order models are run in (the reference first) and the models whose features must be
    kept for a model run after them."""
    order = [reference] + [m for m in range(n_models) if m != reference] if 0 <= reference < n_models else list(range(n_models))
    rank = {m: r for r, m in enumerate(order)}
    keep = {min(i, j, key=rank.__getitem__) for i, j in pairs}
    return order, keep


def collect_stats(
    models: Sequence[nn.Module],
    data: Iterable[Any] | Calibration,
    spec: MergeSpec,
    *,
    needs: str = "reference",
    reference: int = 0,
    points: Sequence[str] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    example_inputs: Any = None,
    trace_options: dict[str, Any] | None = None,
    precision: str | None = None,
    self_moments: str | Mapping[str, str] = "full",
    modules: Mapping[str, str] | None = None,
) -> Stats:
    """One streaming pass over ``data`` accumulating feature statistics for all models.

    Parameters
    ----------
    models : sequence of nn.Module
        Models of one architecture (not modified; train/eval flags restored).
    data : iterable of batches or Calibration
        Tensors, ``(input, target)`` tuples/lists or dicts (see ``input_fn``), or
        a :class:`~autoalign.calibration.Calibration` (then ``input_fn``,
        ``num_batches``, ``device`` and ``progress`` are its own).
    spec : MergeSpec
        The architecture's merge spec (gives the sites of each point).
    needs : {"reference", "all_pairs", "self", "none"}
        Which cross-covariances to accumulate (see :func:`pairs_for`).
    reference : int
        The reference model for ``needs="reference"``.
    points : sequence of str, optional
        Restrict to these merge points (default: every non-frozen point with a site).
    input_fn : callable, optional
        ``input_fn(batch)`` returns the model input (a tensor or a tuple of
        positional arguments). Default: :func:`default_input_fn`.
    num_batches : int, optional
        Stop after this many batches.
    device : torch.device or str, optional
        Where to run the models (default: where their parameters are).
    progress : bool
        Report the pass to the progress display (:mod:`autoalign.progress`).
    precision : {None, "float32", "float64"}
        Precision of the per-chunk products (always accumulated in float64).
        Default: float64 for float64 features, float32 otherwise.
    self_moments : {"full", "diagonal"} or dict of str to {"full", "diagonal"}, default "full"
        Each model's own second moments: the (d, d) covariance, or only the
        variances (``squares[m]`` of shape (d,); ``cov(m)`` then raises, while
        ``var``, ``std`` and ``corr`` work). ``"diagonal"`` skips the (d, d)
        self-products, which for all-to-one statistics are about half of the
        products taken. A dict sets it per merge point (points it does not name
        get ``"full"``); :func:`autoalign.merge` passes what the aligner reads at
        each point (:meth:`~autoalign.aligners.Aligner.self_moments_at`).
    modules : dict of str to {"full", "diagonal"}, optional
        Submodules whose *outputs* get each model's own moments too, in the same
        pass (``Stats.modules``; channels along axis 1, the last axis for
        ``nn.Linear``): the merge asks for the sites its repair stage reads, so
        that repair needs no pass of the input models of its own. A module that
        never runs is left out.

    Returns
    -------
    Stats

    Raises
    ------
    MergeError
        If ``data`` yields no batch, or a batch cannot be fed to the models
        (:class:`~autoalign.DataError`, naming the batch), or features are
        NaN/Inf (:class:`~autoalign.NonFiniteError`, naming the merge point).

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(2)]
    >>> spec = autoalign.find_merge_points(nets[0], torch.randn(2, 3))
    >>> stats = autoalign.collect_stats(nets, [torch.randn(8, 3), torch.randn(8, 3)], spec)
    >>> stats.batches, stats["0"].n, tuple(stats["0"].cov(0, 1).shape)
    (2, 16, (4, 4))
    """
    product_dtype = product_dtype_for(precision)
    diagonal = _diagonal_points(spec, self_moments)
    if needs == "none":
        return Stats({}, [], len(models), 0)
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device, progress=progress)
    n_models = len(models)
    pairs = pairs_for(needs, n_models, reference)
    wanted = [p for p in spec.points if p.kind != "frozen" and p.sites and (points is None or p.name in points)]
    site_lists = {p.name: sites_for(p) for p in wanted}
    node_names = sorted({s.node for sites in site_lists.values() for s in sites})

    moments: dict[str, Moments] = {}
    batches = 0
    feats_mods: list[Any] = []
    params: list[dict[str, torch.Tensor]] = []
    order, keepers = feed_order(n_models, reference, pairs)
    first = order[0]
    partners_of = {m: [k for k in order[: order.index(m)] if (k, m) in pairs or (m, k) in pairs] for m in order}
    # node -> the (point, site number, site) it feeds; a node may feed several sites
    taps: dict[str, list[tuple[MergePoint, int, Site]]] = {}
    for p in wanted:
        for si, s in enumerate(site_lists[p.name]):
            taps.setdefault(s.node, []).append((p, si, s))
    module_modes = dict(modules or {})
    for mode in module_modes.values():
        check_choice("modules", mode, SELF_MOMENTS)
    module_axes = {name: -1 if isinstance(models[0].get_submodule(name), nn.Linear) else 1 for name in module_modes}
    module_moments: dict[str, Moments] = {}
    state: dict[str, Any] = {}  # the model being run, and the features kept from earlier models this batch
    kept: dict[tuple[str, int], dict[int, list[torch.Tensor]]] = {}

    def observe(node: str, value: torch.Tensor) -> None:
        m = state["model"]
        projections: dict[tuple[str, str | None, int], torch.Tensor] = {}  # one projection per weight for this node
        for p, si, s in taps[node]:
            x, channels_first = site_view(value, s, params[m], projections)
            mom = moments.get(p.name)
            if mom is None:
                mom = moments[p.name] = Moments(n_models, p.dim, pairs, x.device, p.name in diagonal)
            held = kept.setdefault((p.name, si), {})
            total, chunks = mom.add_model(
                m, x, channels_first, partners={k: held[k] for k in partners_of[m]},
                count=m == first, keep=m in keepers, dtype=product_dtype,
            )
            if chunks is not None:
                held[m] = chunks
            # NaN/Inf in any feature reaches the sum (Inf − Inf gives NaN): one cheap check
            if not bool(torch.isfinite(total).all()):
                raise NonFiniteError(
                    f"model {m} has NaN/Inf features at merge point {p.name!r} (node {s.node!r}) on "
                    f"calibration batch {state['batch']}; check the data for NaN/Inf and the model for overflow "
                    "(e.g. float16 activations: compute in float32)"
                )

    def observe_module(name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            return
        m = state["model"]
        x, channels_first = module_view(value, module_axes[name])
        mom = module_moments.get(name)
        if mom is None:
            width = x.shape[1] if channels_first else x.shape[-1]
            mom = module_moments[name] = Moments(n_models, width, [], x.device, module_modes[name] == "diagonal")
        mom.add_model(m, x, channels_first, count=m == first, dtype=product_dtype)

    dev = calib.device_for(models[0])
    with torch.no_grad(), eval_mode(*models):
        for inputs in calib.inputs(dev, desc="statistics"):
            if not feats_mods:
                ex = example_inputs if example_inputs is not None else inputs
                feats_mods = [
                    tapped_module(m, ex, node_names, observe, modules=list(module_modes), observe_module=observe_module, **(trace_options or {}))
                    for m in models
                ]
            if not params:
                params = [dict(m.state_dict()) for m in models]
            state["batch"] = batches
            # one model at a time: its products are taken as each site is computed, and only the
            # features a later model pairs with (the reference's, for all-to-one) are kept
            for m in order:
                state["model"] = m
                calib.run(feats_mods[m], inputs, batches, who=f"model {m}", named=models[m])
            kept.clear()
            batches += 1
    if all_reduce_count(batches) == 0:
        raise DataError(NO_BATCH)
    if is_distributed():
        # a process whose shard was empty still takes part in the all-reduce, with zeros
        for p in wanted:
            moments.setdefault(p.name, Moments(n_models, p.dim, pairs, dev, p.name in diagonal))
    all_reduce(moments)
    if is_distributed():  # a process whose shard was empty takes part with zeros
        for name in module_modes:
            width = module_width(models[0].get_submodule(name))
            if width is not None:
                module_moments.setdefault(name, Moments(n_models, width, [], dev, module_modes[name] == "diagonal"))
    all_reduce(module_moments)
    out = {}
    short = []
    for name in (p.name for p in wanted if p.name in moments):  # in spec order
        mom = moments[name]
        n = mom.n
        if n < spec.point(name).dim:
            short.append((n / spec.point(name).dim, name, n, spec.point(name).dim))
        out[name] = mom.point_stats()
    if short:
        _, name, n, d = min(short)
        warnings.warn(
            f"{len(short)} merge point(s) have fewer samples than features, so their statistics are rank-deficient "
            f"(worst: {name!r}, {n} samples for {d} features); use more calibration data",
            stacklevel=2,
        )
    return Stats(out, pairs, n_models, batches, {name: module_moments[name].point_stats() for name in module_modes if name in module_moments})


def _diagonal_points(spec: MergeSpec, self_moments: str | Mapping[str, str]) -> set[str]:
    """Names of the points whose self-moments are variances only; checks the option."""
    if isinstance(self_moments, Mapping):
        names = {p.name for p in spec.points}
        for name, mode in self_moments.items():
            if name not in names:
                raise OptionError(f"self_moments names {name!r}, which is not a merge point of the spec")
            check_choice(f"self_moments[{name!r}]", mode, SELF_MOMENTS)
        return {name for name, mode in self_moments.items() if mode == "diagonal"}
    check_choice("self_moments", self_moments, SELF_MOMENTS)
    return {p.name for p in spec.points} if self_moments == "diagonal" else set()


def module_width(module: nn.Module) -> int | None:
    """The number of output channels of a producer or normalisation module (None if unknown)."""
    for attr in ("out_features", "out_channels", "num_features"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def module_view(value: torch.Tensor, axis: int) -> tuple[torch.Tensor, bool]:
    """A module output as features for :class:`~autoalign.stats.moments.Moments`: ``(samples,
    channels, positions)`` (``channels_first``) for a contiguous map with channels on axis 1,
    else ``(…, channels)``."""
    axis %= value.dim()
    if axis == 1 and value.dim() >= 3 and value.is_contiguous():
        return value.reshape(value.shape[0], value.shape[1], -1), True
    return value.movedim(axis, -1), False
