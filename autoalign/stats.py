"""Streaming feature statistics: one pass over calibration data for all models.

For every merge point with an observable site, and every model ``m``, the pass
accumulates in float64 on the models' device, about a per-model shift ``c_m``
(the first chunk's mean; see :class:`PointStats`)

* ``n`` — the number of samples (batch × spatial positions × replicas × sites),
* ``s_m = Σ (x_m − c_m)`` — shape ``(d,)``,
* ``Q_mm = Σ (x_m − c_m)(x_m − c_m)ᵀ`` — shape ``(d, d)``,
* ``Q_ij = Σ (x_i − c_i)(x_j − c_j)ᵀ`` — only for the model pairs the aligner asks for.

The products behind the sums are taken chunk by chunk in float32 (float64 for
float64 models, or with ``precision="float64"``) on features minus a per-model
shift, and added to float64 accumulators: about twice as fast as float64
products on CPU, with relative error ~1e-7 · √(samples per chunk) — far below
what CCA's default ridge tolerates; exact-recovery work at ``ridge=0`` on
ill-conditioned features wants float64.

Per batch the models run one after another (the reference first) through
traced copies with a tap after every site node: a site's products are taken as
soon as the forward pass computes it, and only the features a later model
pairs with are kept until the batch is done — the reference's alone for
all-to-one aligners (in buffers twice as wide: a later model's chunk is
written next to it, so one product gives that model's square and cross
block). Feature memory is thus the reference's features plus one forward
pass's working set, whatever N; the statistics themselves are ``O(N d²)`` per
point for all-to-one aligners (``O(N² d²)`` for all pairs). Conv maps are
copied feature-major, ``(channels, samples·positions)``, so each chunk's Gram is
one plain matrix product.

These sums are sufficient statistics: under ``torch.distributed`` each process
feeds its shard and the sums are all-reduced, so every process solves the same
plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .errors import AutoalignError, DataError, MergeError, NonFiniteError, OptionError
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

    The moments are taken about a per-model ``shift`` ``c_m`` (a point near the
    mean; zeros when ``None``), so covariances do not cancel catastrophically
    when a feature's mean dwarfs its spread.

    Attributes
    ----------
    n : int
        Number of samples.
    sums : list of Tensor, each (d,)
        ``Σ (x_m − c_m)`` per model.
    squares : list of Tensor, each (d, d) or (d,)
        ``Σ (x_m − c_m)(x_m − c_m)ᵀ`` per model, or only its diagonal
        ``Σ (x_m − c_m)²`` where just variances were collected
        (``self_moments="diagonal"``, see :func:`collect_stats`).
    cross : dict of (i, j) to Tensor (d, d)
        ``Σ (x_i − c_i)(x_j − c_j)ᵀ`` for the collected pairs ``i < j`` or ``i == reference``.
    shift : list of Tensor, each (d,), optional
        ``c_m`` per model; ``None`` means zeros (raw moments).

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import PointStats
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    >>> ps = PointStats(2, [x.sum(0)], [x.T @ x])
    >>> ps.mean(0).tolist(), ps.cov(0).diagonal().tolist()
    ([2.0, 1.0], [1.0, 1.0])
    >>> c = torch.tensor([2.0, 1.0], dtype=torch.float64)  # the same, about a shift
    >>> PointStats(2, [(x - c).sum(0)], [(x - c).T @ (x - c)], shift=[c]).cov(0).diagonal().tolist()
    [1.0, 1.0]
    """

    n: int
    sums: list[torch.Tensor]
    squares: list[torch.Tensor]
    cross: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    shift: list[torch.Tensor] | None = None

    @property
    def dim(self) -> int:
        return int(self.sums[0].numel())

    def mean(self, m: int) -> torch.Tensor:
        """Mean features of model ``m``, shape (d,)."""
        mu = self.sums[m] / self.n
        return mu if self.shift is None else mu + self.shift[m]

    def cov(self, i: int, j: int | None = None) -> torch.Tensor:
        """Covariance of model ``i``'s features with model ``j``'s (default ``i``), shape (d, d).

        ``cov(i, j)[a, b] = E[(x_i,a − μ_i,a)(x_j,b − μ_j,b)]``.
        """
        if j is None or j == i:
            q = self.squares[i]
            if q.dim() == 1:
                raise KeyError(
                    f"only the variances of model {i} were collected (self_moments='diagonal'), not its covariance; "
                    "collect statistics with self_moments='full' (an aligner that needs covariances declares it)"
                )
        elif (i, j) in self.cross:
            q = self.cross[(i, j)]
        elif (j, i) in self.cross:
            q = self.cross[(j, i)].T
        else:
            raise KeyError(f"cross-covariance of models {i} and {j} was not collected")
        j = i if j is None else j
        return q / self.n - torch.outer(self.sums[i] / self.n, self.sums[j] / self.n)

    def var(self, m: int) -> torch.Tensor:
        """Per-feature variance of model ``m``, shape (d,) (available for either kind of ``squares``)."""
        q = self.squares[m]
        mu = self.sums[m] / self.n
        return (q if q.dim() == 1 else torch.diagonal(q)) / self.n - mu * mu

    def std(self, m: int) -> torch.Tensor:
        """Per-feature standard deviation of model ``m``, shape (d,)."""
        return torch.sqrt(torch.clamp(self.var(m), min=0.0))

    def corr(self, i: int, j: int, floor: float = 1e-6) -> torch.Tensor:
        """Correlation matrix between model ``i``'s and model ``j``'s features, (d, d).

        Variances are floored at ``floor`` times their mean (per model), so a
        feature that barely varies (active on one sample, say) gets correlations
        near 0 instead of spurious ±1; dead features get exactly 0.
        """
        c = self.cov(i, j)
        vi = torch.clamp(self.var(i), min=0.0)
        vj = torch.clamp(self.var(j), min=0.0)
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
        """Number of (d, d) blocks held (full ``squares`` + ``cross``), summed over points."""
        return sum(sum(q.dim() == 2 for q in p.squares) + len(p.cross) for p in self.points.values())


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
    gm = trace(model, example_inputs, shapes=False, **trace_options)  # no shapes needed: skip a forward pass
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in node_names if n not in nodes]
    if missing:
        raise MergeError(f"nodes {missing[:3]} of the merge spec are not in the traced model; was the spec made for this architecture?")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(nodes[n] for n in node_names),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


#: Elements per model in one chunk of features (4 MiB in float32): products are
#: taken chunk by chunk so the shifted copies stay small and are reused.
_CHUNK = 1 << 20


def _site_view(value: torch.Tensor, site: Site, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, bool]:
    """One site's features without copying where possible.

    Returns ``(x, channels_first)``: ``x`` has shape ``(samples, d, positions)``
    when ``channels_first`` (a contiguous NC… activation, a free view; its
    chunks are copied feature-major for the products), else ``(…, d)`` with the
    feature axis last.
    """
    if site.kind == "projected":
        assert params is not None and site.weight is not None
        w, b = params[site.weight], params[site.bias] if site.bias else None
        value = torch.nn.functional.linear(value.movedim(site.axis, -1), w.to(value.dtype), None if b is None else b.to(value.dtype))
        axis = value.dim() - 1  # the projection's outputs, then the index picks the point's features
    else:
        axis = site.axis % value.dim()
    r, d = site.index.shape
    if r == 1 and d == value.shape[axis] and bool((site.index[0] == np.arange(d)).all()):
        if axis == 1 and value.dim() >= 3 and value.is_contiguous():
            return value.reshape(value.shape[0], d, -1), True
        return value.movedim(axis, -1), False  # the whole axis in order: no gather
    idx = torch.as_tensor(site.index, device=value.device)
    return value.movedim(axis, -1)[..., idx.reshape(-1)].reshape(-1, d), False  # replicas count as samples


class _Moments:
    """Shifted moments of one merge point, accumulated one model at a time.

    Products are taken in float32 (float64 for float64 models) on features minus
    a per-model shift (the mean of the first chunk seen), so ``cov = Q/n − μμᵀ``
    does not cancel catastrophically even when a feature's mean dwarfs its
    spread; per-chunk products are added to float64 accumulators.
    :meth:`point_stats` hands them, with the shifts, to :class:`PointStats`.

    Models are fed one after another (:meth:`add_model`): a model's shifted
    chunks are kept only while a model processed later still pairs with it,
    so for all-to-one statistics just the reference's features are held.
    With ``diagonal``, each model's own second moments are only its features'
    sums of squares (``squares[m]`` has shape (d,)): no (d, d) self-product.
    """

    def __init__(
        self, n_models: int, d: int, pairs: Sequence[tuple[int, int]], device: torch.device, diagonal: bool = False
    ) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.d = d
        self.diagonal = diagonal
        self.dtype: torch.dtype | None = None
        self.shift: list[torch.Tensor | None] = [None] * n_models
        self.sums = [torch.zeros(d, **z) for _ in range(n_models)]
        self.squares = [torch.zeros(*((d,) if diagonal else (d, d)), **z) for _ in range(n_models)]
        self.cross = {pair: torch.zeros(d, d, **z) for pair in pairs}

    def add_model(
        self,
        m: int,
        x: torch.Tensor,
        channels_first: bool,
        *,
        partners: dict[int, list[torch.Tensor]] | None = None,
        count: bool = False,
        keep: bool = False,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Add one site's features of model ``m``.

        Parameters
        ----------
        m : int
            The model.
        x : Tensor
            ``(samples, d, positions)`` when ``channels_first``, else ``(…, d)``.
        partners : dict of int to list of Tensor, optional
            Shifted chunks of models fed earlier (as returned with ``keep``),
            whose cross products with ``m`` are wanted.
        count : bool
            Count these samples in ``n`` (exactly one model per site does).
        keep : bool
            Return the shifted chunks, for later models' cross products.
        dtype : torch.dtype, optional
            Product precision; by default fixed by the first features seen
            (float64 for float64 features, else float32).

        Returns
        -------
        (Tensor (d,), list of Tensor or None)
            The shifted sum of these features, and the kept chunks.
        """
        d = self.d
        width = x.shape[1] if channels_first else x.shape[-1]
        if width != d:
            raise MergeError(f"a site gives {width} features where its merge point has {d}; is the spec stale?")
        if self.dtype is None:
            self.dtype = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
        dtype = self.dtype
        per = max(1, x[0].numel()) if x.dim() > 1 else 1
        step = max(1, _CHUNK // per)
        total = torch.zeros(d, dtype=torch.float64, device=x.device)
        partners = partners or {}
        kept: list[torch.Tensor] | None = [] if keep else None
        for ci, lo in enumerate(range(0, x.shape[0], step)):
            c = x[lo : lo + step]
            shift = self.shift[m]
            if shift is None:
                shift = self.shift[m] = self._mean(c, channels_first).to(dtype)
            # A kept chunk lives in the first half of a buffer twice as wide; a later model writes its
            # own chunk into the second half, so one product gives its cross block and its square.
            # Conv maps are laid out feature-major, (2d, samples, positions): one plain product over
            # samples × positions, instead of a batch of small per-sample ones.
            wide = 2 * d if keep and not self.diagonal else d
            if channels_first:
                src, centre, shape = c.transpose(0, 1), shift[:, None, None], [wide, c.shape[0], c.shape[2]]
            else:
                src, centre, shape = c, shift, list(c.shape[:-1]) + [wide]
            # (only worth it when the square is wanted in full)
            stacked = None if keep or not partners or self.diagonal else next(iter(partners))
            if stacked is not None:
                buf = partners[stacked][ci]
            else:
                buf = torch.empty(shape, dtype=dtype, device=c.device)
            half = slice(d, 2 * d) if stacked is not None else slice(0, d)
            torch.sub(src, centre, out=buf[half] if channels_first else buf[..., half])
            rows = self._rows(buf, channels_first)  # (2d or d, R) feature-major, else (R, 2d or d)
            y = rows[half] if channels_first else rows[:, half]
            total += y.sum(dim=1 if channels_first else 0)  # of shifted features: no cancellation
            if stacked is not None:
                both = self._gram(rows, y, channels_first)  # (2d, d): [Σ y_k y_mᵀ; Σ y_m y_mᵀ]
                self._add_cross(stacked, m, both[:d])
                self.squares[m].add_(both[d:])
            elif self.diagonal:  # (the faster reduction for each layout, measured)
                self.squares[m].add_(torch.linalg.vector_norm(y, dim=1).square() if channels_first else (y * y).sum(dim=0))
            else:
                self.squares[m].add_(self._gram(y, y, channels_first))
            for k, chunks in partners.items():
                if k != stacked:
                    other = self._rows(chunks[ci], channels_first)
                    other = other[:d] if channels_first else other[:, :d]
                    self._add_cross(k, m, self._gram(other, y, channels_first))
            if count:
                self.n += y.shape[1] if channels_first else y.shape[0]
            if kept is not None:
                kept.append(buf)
        self.sums[m] += total
        return total, kept

    def _add_cross(self, k: int, m: int, q: torch.Tensor) -> None:
        """Add ``q = Σ y_k y_mᵀ`` to the cross block of the pair (k, m), whichever way round it is stored."""
        if (k, m) in self.cross:
            self.cross[(k, m)].add_(q)
        else:
            self.cross[(m, k)].add_(q.T)

    @staticmethod
    def _mean(c: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """The chunk's mean (a shift only needs to be near the mean: computed in the features' dtype)."""
        if channels_first:
            return c.mean(dim=(0, 2))
        return c.reshape(-1, c.shape[-1]).mean(0)

    @staticmethod
    def _rows(buf: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """A chunk buffer as a matrix: ``(features, samples·positions)`` for a conv map's
        feature-major buffer, else ``(rows, features)``."""
        return buf.reshape(buf.shape[0], -1) if channels_first else buf.reshape(-1, buf.shape[-1])

    @staticmethod
    def _gram(a: torch.Tensor, b: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """``Σ a bᵀ`` over samples (and positions): ``a @ bᵀ`` for feature-major matrices, else ``aᵀ @ b``."""
        if channels_first:
            return a @ b.T
        return a.T @ b

    def shifts(self) -> list[torch.Tensor]:
        """The shifts in float64 (zeros for a model not fed yet)."""
        return [torch.zeros_like(s) if c is None else c.to(torch.float64) for s, c in zip(self.sums, self.shift)]

    def recentre(self, new: Sequence[torch.Tensor]) -> None:
        """Express the moments about the shifts ``new`` (float64, one (d,) per model) instead."""
        old = self.shifts()
        n = float(self.n)
        delta = [o - c for o, c in zip(old, new)]

        def moved(q: torch.Tensor, i: int, j: int) -> torch.Tensor:
            # Σ (x_i − c'_i)(x_j − c'_j)ᵀ with x − c' = (x − c) + δ
            return q + torch.outer(self.sums[i], delta[j]) + torch.outer(delta[i], self.sums[j]) + n * torch.outer(delta[i], delta[j])

        if self.diagonal:  # Σ (x − c')² = Σ (x − c)² + 2 δ Σ (x − c) + n δ²
            self.squares = [q + 2.0 * self.sums[m] * delta[m] + n * delta[m] ** 2 for m, q in enumerate(self.squares)]
        else:
            self.squares = [moved(q, m, m) for m, q in enumerate(self.squares)]
        self.cross = {(i, j): moved(q, i, j) for (i, j), q in self.cross.items()}
        self.sums = [s + n * dm for s, dm in zip(self.sums, delta)]
        self.shift = [c.clone() for c in new]

    def point_stats(self) -> "PointStats":
        return PointStats(self.n, self.sums, self.squares, self.cross, self.shifts())


class _Tap(nn.Module):
    """Hands a node's value to ``sink.fn(node, value)`` as the forward reaches it; returns nothing,
    so the traced module frees the value after its last real use."""

    def __init__(self, node: str, sink: "_Sink") -> None:
        super().__init__()
        self.node = node
        self.sink = sink

    def forward(self, value: Any) -> None:
        self.sink.fn(self.node, value)


class _Sink:
    fn: Callable[[str, Any], None]


def _tapped_module(
    model: nn.Module, example_inputs: Any, node_names: Sequence[str], sink: _Sink, **trace_options: Any
) -> fx.GraphModule:
    """A traced copy of ``model`` that calls ``sink.fn(name, value)`` right after each named node
    runs and computes nothing past the last of them."""
    gm = trace(model, example_inputs, shapes=False, **trace_options)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in node_names if n not in nodes]
    if missing:
        raise MergeError(f"nodes {missing[:3]} of the merge spec are not in the traced model; was the spec made for this architecture?")
    taps = []
    for i, name in enumerate(node_names):
        gm.add_submodule(f"_autoalign_tap_{i}", _Tap(name, sink))
        with gm.graph.inserting_after(nodes[name]):
            taps.append(gm.graph.call_module(f"_autoalign_tap_{i}", (nodes[name],)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(taps),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _feed_order(n_models: int, reference: int, pairs: Sequence[tuple[int, int]]) -> tuple[list[int], set[int]]:
    """The order models are run in (the reference first) and the models whose features must be
    kept for a model run after them."""
    order = [reference] + [m for m in range(n_models) if m != reference] if 0 <= reference < n_models else list(range(n_models))
    rank = {m: r for r, m in enumerate(order)}
    keep = {min(i, j, key=rank.__getitem__) for i, j in pairs}
    return order, keep


def product_dtype_for(precision: str | None) -> torch.dtype | None:
    """The product dtype a ``precision`` option asks for.

    Parameters
    ----------
    precision : {None, "float32", "float64"}
        The option of :func:`collect_stats` and :func:`autoalign.merge`.

    Returns
    -------
    torch.dtype or None
        ``torch.float32`` / ``torch.float64``, or None (the features' own precision).

    Raises
    ------
    OptionError
        If ``precision`` is not None, ``"float32"`` or ``"float64"``.
    """
    if precision not in (None, "float32", "float64"):
        raise OptionError(f"precision must be None, 'float32' or 'float64', not {precision!r}")
    return None if precision is None else getattr(torch, precision)


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
    precision: str | None = None,
    self_moments: str = "full",
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
    precision : {None, "float32", "float64"}
        Precision of the per-chunk products (always accumulated in float64).
        Default: float64 for float64 features, float32 otherwise.
    self_moments : {"full", "diagonal"}, default "full"
        Each model's own second moments: the (d, d) covariance, or only the
        variances (``squares[m]`` of shape (d,); ``cov(m)`` then raises, while
        ``var``, ``std`` and ``corr`` work). ``"diagonal"`` skips the (d, d)
        self-products, which for all-to-one statistics are about half of the
        products taken; :func:`autoalign.merge` passes the aligner's
        ``self_moments``.

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
    if self_moments not in ("full", "diagonal"):
        raise OptionError(f"self_moments must be 'full' or 'diagonal', not {self_moments!r}")
    diagonal = self_moments == "diagonal"
    if needs == "none":
        return Stats({}, [], len(models), 0)
    n_models = len(models)
    pairs = pairs_for(needs, n_models, reference)
    wanted = [p for p in spec.points if p.kind != "frozen" and p.sites and (points is None or p.name in points)]
    site_lists = {p.name: _sites_for(p) for p in wanted}
    node_names = sorted({s.node for sites in site_lists.values() for s in sites})
    fn = input_fn or default_input_fn

    moments: dict[str, _Moments] = {}
    batches = 0
    feats_mods: list[fx.GraphModule] = []
    params: list[dict[str, torch.Tensor]] = []
    order, keepers = _feed_order(n_models, reference, pairs)
    first = order[0]
    partners_of = {m: [k for k in order[: order.index(m)] if (k, m) in pairs or (m, k) in pairs] for m in order}
    # node -> the (point, site number, site) it feeds; a node may feed several sites
    taps: dict[str, list[tuple[MergePoint, int, Site]]] = {}
    for p in wanted:
        for si, s in enumerate(site_lists[p.name]):
            taps.setdefault(s.node, []).append((p, si, s))
    sink = _Sink()
    state: dict[str, Any] = {}  # the model being run, and the features kept from earlier models this batch
    kept: dict[tuple[str, int], dict[int, list[torch.Tensor]]] = {}

    def observe(node: str, value: torch.Tensor) -> None:
        m = state["model"]
        for p, si, s in taps[node]:
            x, channels_first = _site_view(value, s, params[m])
            mom = moments.get(p.name)
            if mom is None:
                mom = moments[p.name] = _Moments(n_models, p.dim, pairs, x.device, diagonal)
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

    sink.fn = observe

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
                feats_mods = [_tapped_module(m, ex, node_names, sink, **(trace_options or {})) for m in models]
            if not params:
                params = [dict(m.state_dict()) for m in models]
            state["batch"] = batches
            # one model at a time: its products are taken as each site is computed, and only the
            # features a later model pairs with (the reference's, for all-to-one) are kept
            for m in order:
                state["model"] = m
                try:
                    feats_mods[m](*inputs)
                except AutoalignError:
                    raise
                except Exception as exc:  # noqa: BLE001 - re-raised naming the batch
                    raise DataError(batch_error(models[m], inputs, batches, exc, who=f"model {m}")) from exc
            kept.clear()
            batches += 1
    if _all_reduce_int(batches) == 0:
        raise DataError(NO_BATCH)
    if _distributed():
        # a process whose shard was empty still takes part in the all-reduce, with zeros
        dev = torch.device(device) if device is not None else _device_of(models[0])
        for p in wanted:
            moments.setdefault(p.name, _Moments(n_models, p.dim, pairs, dev, diagonal))
    _all_reduce(moments)
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


def _all_reduce(moments: dict[str, _Moments]) -> None:
    """Sum the statistics over processes when ``torch.distributed`` is initialised.

    Each process's moments are about its own shifts; they are first re-centred
    on the global means (from the all-reduced first moments, which do not
    cancel), so the summed second moments stay well conditioned. Every process
    reduces the same tensors in the same (sorted) order, so the sums — and the
    plans solved from them — are identical on every process.
    """
    if not _distributed():
        return
    import torch.distributed as dist

    for name in sorted(moments):
        mom = moments[name]
        dev = mom.sums[0].device
        c = torch.tensor([float(mom.n)], dtype=torch.float64, device=dev)
        dist.all_reduce(c)
        total = float(c.item())
        old = mom.shifts()
        firsts = [s + mom.n * o for s, o in zip(mom.sums, old)]  # Σ x per model
        for t in firsts:
            dist.all_reduce(t)
        mom.recentre([f / total if total > 0 else torch.zeros_like(f) for f in firsts])
        for t in mom.sums + mom.squares + [mom.cross[k] for k in sorted(mom.cross)]:
            dist.all_reduce(t)
        mom.n = int(round(total))


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
