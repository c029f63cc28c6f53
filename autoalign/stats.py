"""Streaming feature statistics: one pass over calibration data for all models.

For every merge point with an observable site, and every model ``m``, the pass
accumulates in float64 on the models' device

* ``n`` — the number of samples (batch × spatial positions × replicas × sites),
* ``s_m = Σ x_m`` — shape ``(d,)``,
* ``Q_mm = Σ x_m x_mᵀ`` — shape ``(d, d)``,
* ``Q_ij = Σ x_i x_jᵀ`` — only for the model pairs the aligner asks for.

These sums are sufficient statistics: under ``torch.distributed`` each process
feeds its shard and the sums are all-reduced, so every process solves the same
plan. Memory is ``O(N d²)`` per point for all-to-one aligners.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .errors import DataError, MergeError, NonFiniteError
from .validate import NO_BATCH, batch_error
from .spec import MergePoint, MergeSpec, Site
from .trace import as_input_tuple, eval_mode, trace

__all__ = [
    "PointStats",
    "Stats",
    "all_reduce_moments",
    "collect_stats",
    "default_input_fn",
    "pairs_for",
    "sync_batchnorm_stats",
]


def default_input_fn(batch: Any) -> tuple[Any, ...]:
    """Model inputs from a batch: a tensor, the first element of a tuple/list
    ``(input, target)``, or the ``"input"``/``"image"``/``"x"`` entry of a dict.

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import default_input_fn
    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> default_input_fn((x, y))[0] is x, default_input_fn({"image": x})[0] is x
    (True, True)
    """
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, dict):
        for k in ("input", "inputs", "image", "images", "x", "pixel_values"):
            if k in batch:
                return (batch[k],)
        raise DataError(f"cannot find the model input in a batch dict with keys {sorted(batch)}; pass input_fn=")
    raise DataError(f"cannot use a batch of type {type(batch).__name__} as model input; pass input_fn=")


def iter_model_inputs(
    data: Iterable[Any],
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str,
) -> Iterator[tuple[Any, ...]]:
    """Model inputs of the first ``num_batches`` batches, tensors moved to ``device``.

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import iter_model_inputs
    >>> batches = [(torch.zeros(2, 3), torch.tensor([0, 1]))] * 3
    >>> len(list(iter_model_inputs(batches, num_batches=2, device="cpu")))
    2
    """
    fn = input_fn or default_input_fn
    dev = torch.device(device)
    for seen, batch in enumerate(data):
        if num_batches is not None and seen >= num_batches:
            return
        yield tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in as_input_tuple(fn(batch)))


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
    raise ValueError(f"unknown statistics need {needs!r}; expected 'reference', 'all_pairs', 'self' or 'none'")


@dataclass
class PointStats:
    """Feature statistics of one merge point over all models.

    Attributes
    ----------
    n : int
        Number of samples.
    sums : list of Tensor, each (d,)
        ``Σ x_m`` per model.
    squares : list of Tensor, each (d, d)
        ``Σ x_m x_mᵀ`` per model.
    cross : dict of (i, j) to Tensor (d, d)
        ``Σ x_i x_jᵀ`` for the collected pairs ``i < j`` or ``i == reference``.

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import PointStats
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    >>> ps = PointStats(2, [x.sum(0)], [x.T @ x])
    >>> ps.mean(0).tolist(), ps.cov(0).diagonal().tolist()
    ([2.0, 1.0], [1.0, 1.0])
    """

    n: int
    sums: list[torch.Tensor]
    squares: list[torch.Tensor]
    cross: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.sums[0].numel())

    def mean(self, m: int) -> torch.Tensor:
        """Mean features of model ``m``, shape (d,)."""
        return self.sums[m] / self.n

    def cov(self, i: int, j: int | None = None) -> torch.Tensor:
        """Covariance of model ``i``'s features with model ``j``'s (default ``i``), shape (d, d).

        ``cov(i, j)[a, b] = E[(x_i,a − μ_i,a)(x_j,b − μ_j,b)]``.
        """
        if j is None or j == i:
            q = self.squares[i]
        elif (i, j) in self.cross:
            q = self.cross[(i, j)]
        elif (j, i) in self.cross:
            q = self.cross[(j, i)].T
        else:
            raise KeyError(f"cross-covariance of models {i} and {j} was not collected")
        return q / self.n - torch.outer(self.mean(i), self.mean(j if j is not None else i))

    def std(self, m: int) -> torch.Tensor:
        """Per-feature standard deviation of model ``m``, shape (d,)."""
        return torch.sqrt(torch.clamp(torch.diagonal(self.cov(m)), min=0.0))

    def corr(self, i: int, j: int, floor: float = 1e-6) -> torch.Tensor:
        """Correlation matrix between model ``i``'s and model ``j``'s features, (d, d).

        Variances are floored at ``floor`` times their mean (per model), so a
        feature that barely varies (active on one sample, say) gets correlations
        near 0 instead of spurious ±1; dead features get exactly 0.
        """
        c = self.cov(i, j)
        vi = torch.clamp(torch.diagonal(self.cov(i)), min=0.0)
        vj = torch.clamp(torch.diagonal(self.cov(j)), min=0.0)
        tiny = torch.finfo(torch.float64).tiny
        si = torch.sqrt(vi + floor * vi.mean() + tiny)
        sj = torch.sqrt(vj + floor * vj.mean() + tiny)
        return c / torch.outer(si, sj)


@dataclass
class Stats:
    """Statistics of all merge points (by point name) and what was collected.

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(2)]
    >>> stats = autoalign.merge_with_report(nets, [torch.randn(16, 3)], aligner="cca").stats
    >>> sorted(stats.points), stats["0"].n, stats.pairs
    (['0'], 16, [(0, 1)])
    """

    points: dict[str, PointStats]
    pairs: list[tuple[int, int]]
    n_models: int
    batches: int

    def __getitem__(self, name: str) -> PointStats:
        return self.points[name]

    def get(self, name: str) -> PointStats | None:
        return self.points.get(name)

    def n_blocks(self) -> int:
        """Number of (d, d) blocks held (``squares`` + ``cross``), summed over points."""
        return sum(len(p.squares) + len(p.cross) for p in self.points.values())


def _sites_for(point: MergePoint) -> list[Site]:
    for kind in ("input", "output", "projected"):
        found = [s for s in point.sites if s.kind == kind]
        if found:
            return found
    return []


def feature_module(
    model: nn.Module, example_inputs: Any, node_names: Sequence[str], **trace_options: Any
) -> fx.GraphModule:
    """A traced copy of ``model`` that returns the outputs of the named nodes (a tuple).

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import feature_module
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    >>> fm = feature_module(net, torch.randn(2, 3), ["_0"])
    >>> tuple(fm(torch.randn(5, 3))[0].shape)
    (5, 4)
    """
    gm = trace(model, example_inputs, **trace_options)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in node_names if n not in nodes]
    if missing:
        raise MergeError(f"nodes {missing[:3]} of the merge spec are not in the traced model; was the spec made for this architecture?")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(nodes[n] for n in node_names),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _features(value: torch.Tensor, site: Site, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Samples of a site's features, shape (samples, d), float64."""
    x = value.movedim(site.axis, -1)
    if site.kind == "projected":
        assert params is not None and site.weight is not None
        x = torch.nn.functional.linear(x, params[site.weight], params[site.bias] if site.bias else None)
    r, d = site.index.shape
    if r == 1 and d == x.shape[-1] and bool((site.index[0] == np.arange(d)).all()):
        return x.reshape(-1, d).to(torch.float64)  # the whole axis in order: no gather
    idx = torch.as_tensor(site.index, device=x.device)
    return x[..., idx.reshape(-1)].reshape(-1, d).to(torch.float64)


def collect_stats(
    models: Sequence[nn.Module],
    data: Iterable[Any],
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
) -> Stats:
    """One streaming pass over ``data`` accumulating feature statistics for all models.

    Parameters
    ----------
    models : sequence of nn.Module
        Models of one architecture (not modified; train/eval flags restored).
    data : iterable of batches
        Tensors, ``(input, target)`` tuples/lists or dicts (see ``input_fn``).
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
        Show a tqdm progress bar.

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
    if needs == "none":
        return Stats({}, [], len(models), 0)
    n_models = len(models)
    pairs = pairs_for(needs, n_models, reference)
    wanted = [p for p in spec.points if p.kind != "frozen" and p.sites and (points is None or p.name in points)]
    site_lists = {p.name: _sites_for(p) for p in wanted}
    node_names = sorted({s.node for sites in site_lists.values() for s in sites})
    fn = input_fn or default_input_fn

    sums: dict[str, list[torch.Tensor]] = {}
    squares: dict[str, list[torch.Tensor]] = {}
    cross: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    count: dict[str, int] = {}
    batches = 0
    feats_mods: list[fx.GraphModule] = []
    params: list[dict[str, torch.Tensor]] = []

    it: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        total = num_batches
        try:
            total = min(len(data), num_batches) if num_batches else len(data)  # type: ignore[arg-type]
        except TypeError:
            pass
        it = tqdm(data, total=total, desc="statistics", unit="batch", leave=False)

    with torch.no_grad(), eval_mode(*models):
        for batch in it:
            if num_batches is not None and batches >= num_batches:
                break
            inputs = as_input_tuple(fn(batch))
            dev = torch.device(device) if device is not None else _device_of(models[0])
            inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
            if not feats_mods:
                ex = example_inputs if example_inputs is not None else inputs
                feats_mods = [feature_module(m, ex, node_names, **(trace_options or {})) for m in models]
            if not params:
                params = [dict(m.state_dict()) for m in models]
            outs = []
            for m, fm in enumerate(feats_mods):
                try:
                    vals = fm(*inputs)
                except Exception as exc:  # noqa: BLE001 - re-raised naming the batch
                    raise DataError(batch_error(models[m], inputs, batches, exc, who=f"model {m}")) from exc
                outs.append(dict(zip(node_names, vals)))
            for p in wanted:
                sites = site_lists[p.name]
                xs = [
                    _features(outs[m][sites[0].node], sites[0], params[m]) if len(sites) == 1
                    else torch.cat([_features(outs[m][s.node], s, params[m]) for s in sites])
                    for m in range(n_models)
                ]
                batch_sums = [x.sum(0) for x in xs]
                for m, x in enumerate(xs):
                    # NaN/Inf in any feature reaches the sum (Inf − Inf gives NaN): one cheap check
                    if not bool(torch.isfinite(batch_sums[m]).all()):
                        raise NonFiniteError(
                            f"model {m} has NaN/Inf features at merge point {p.name!r} (node(s) "
                            f"{sorted({s.node for s in sites})}) on calibration batch {batches}; check the data for "
                            "NaN/Inf and the model for overflow (e.g. float16 activations: compute in float32)"
                        )
                if p.name not in sums:
                    d = p.dim
                    z = dict(dtype=torch.float64, device=xs[0].device)
                    sums[p.name] = [torch.zeros(d, **z) for _ in range(n_models)]
                    squares[p.name] = [torch.zeros(d, d, **z) for _ in range(n_models)]
                    cross[p.name] = {pair: torch.zeros(d, d, **z) for pair in pairs}
                    count[p.name] = 0
                for m, x in enumerate(xs):
                    sums[p.name][m] += batch_sums[m]
                    squares[p.name][m] += x.T @ x
                for (i, j), acc in cross[p.name].items():
                    acc += xs[i].T @ xs[j]
                count[p.name] += xs[0].shape[0]
            batches += 1
    if _all_reduce_int(batches) == 0:
        raise DataError(NO_BATCH)
    if _distributed():
        # a process whose shard was empty still takes part in the all-reduce, with zeros
        dev = torch.device(device) if device is not None else _device_of(models[0])
        z = dict(dtype=torch.float64, device=dev)
        for p in wanted:
            if p.name not in sums:
                sums[p.name] = [torch.zeros(p.dim, **z) for _ in range(n_models)]
                squares[p.name] = [torch.zeros(p.dim, p.dim, **z) for _ in range(n_models)]
                cross[p.name] = {pair: torch.zeros(p.dim, p.dim, **z) for pair in pairs}
                count[p.name] = 0
    _all_reduce(sums, squares, cross, count)
    out = {}
    short = []
    for name in sums:
        n = count[name]
        if n < spec.point(name).dim:
            short.append((n / spec.point(name).dim, name, n, spec.point(name).dim))
        out[name] = PointStats(n, sums[name], squares[name], cross[name])
    if short:
        _, name, n, d = min(short)
        warnings.warn(
            f"{len(short)} merge point(s) have fewer samples than features, so their statistics are rank-deficient "
            f"(worst: {name!r}, {n} samples for {d} features); use more calibration data",
            stacklevel=2,
        )
    return Stats(out, pairs, n_models, batches)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _distributed() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _all_reduce_int(value: int) -> int:
    """``value`` summed over processes (itself when not distributed)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item())


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(sums: dict, squares: dict, cross: dict, count: dict) -> None:
    """Sum the statistics over processes when ``torch.distributed`` is initialised.

    Every process reduces the same tensors in the same (sorted) order, so the
    sums — and the plans solved from them — are identical on every process.
    """
    if not _distributed():
        return
    import torch.distributed as dist

    for name in sorted(sums):
        for t in sums[name] + squares[name] + [cross[name][k] for k in sorted(cross[name])]:
            dist.all_reduce(t)
        c = torch.tensor([count[name]], dtype=torch.float64, device=sums[name][0].device)
        dist.all_reduce(c)
        count[name] = int(c.item())


def all_reduce_moments(acc: dict[str, list[Any]]) -> None:
    """Sum per-channel moments ``{name: [count, Σ y, Σ y²]}`` over processes, in place.

    A no-op unless ``torch.distributed`` is initialised. Every process must hold
    the same names (every process feeds at least one batch). Used to make
    statistics that repair code accumulates on each process's shard global.

    Examples
    --------
    >>> import torch
    >>> acc = {"bn": [4, torch.ones(3), torch.ones(3)]}
    >>> all_reduce_moments(acc)  # not distributed: unchanged
    >>> acc["bn"][0]
    4
    """
    if not _distributed():
        return
    import torch.distributed as dist

    for name in sorted(acc):
        cnt, s, q = acc[name]
        s = torch.as_tensor(s, dtype=torch.float64).clone()
        q = torch.as_tensor(q, dtype=torch.float64).clone()
        c = torch.tensor([float(cnt)], dtype=torch.float64, device=s.device)
        for t in (c, s, q):
            dist.all_reduce(t)
        acc[name] = [int(c.item()), s, q]


def sync_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Make BatchNorm running statistics estimated by :func:`autoalign.reset_bn`
    on each process's shard equal to those of one pass over all shards.

    ``reset_bn`` (``momentum=None``) leaves every BatchNorm with the average of
    its per-batch means and variances over the ``k`` batches it saw
    (``num_batches_tracked``). Averaging over processes weighted by ``k`` gives
    exactly the single-process average over all batches. A no-op unless
    ``torch.distributed`` is initialised; returns ``model``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.BatchNorm1d(3)
    >>> sync_batchnorm_stats(net) is net  # not distributed: unchanged
    True
    """
    if not _distributed():
        return model
    import torch.distributed as dist

    for _, bn in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.running_mean is not None):
            continue
        k = float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 1.0
        mean = bn.running_mean.detach().to(torch.float64) * k
        var = bn.running_var.detach().to(torch.float64) * k
        kt = torch.tensor([k], dtype=torch.float64, device=mean.device)
        for t in (kt, mean, var):
            dist.all_reduce(t)
        total = float(kt.item())
        if total <= 0:
            continue
        with torch.no_grad():
            bn.running_mean.copy_((mean / total).to(bn.running_mean.dtype))
            bn.running_var.copy_((var / total).to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(int(round(total)))
    return model
