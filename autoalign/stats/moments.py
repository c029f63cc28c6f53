"""Shifted feature moments, accumulated chunk by chunk as the statistics pass
sees each site (see :mod:`autoalign.stats`), and their reduction over processes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..distributed import all_reduce_sum, is_distributed
from ..errors import MergeError
from ..spec import Site
from .results import PointStats

__all__ = ["CHUNK", "Moments", "site_view", "all_reduce"]

#: Elements per model in one chunk of features (4 MiB in float32): products are
#: taken chunk by chunk so the shifted copies stay small and are reused.
CHUNK = 1 << 20


def site_view(
    value: torch.Tensor, site: Site, params: dict[str, torch.Tensor] | None = None,
    projections: dict[tuple[str, str | None, int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, bool]:
    """One site's features without copying where possible.

    Returns ``(x, channels_first)``: ``x`` has shape ``(samples, d, positions)``
    when ``channels_first`` (a contiguous NC… activation, a free view; its
    chunks are copied feature-major for the products), else ``(…, d)`` with the
    feature axis last. ``projections`` caches a ``projected`` site's projection of
    ``value`` for the other sites of the same node and weight (attention heads:
    one fused projection serves every head's point).
    """
    if site.kind == "projected":
        assert params is not None and site.weight is not None
        key = (site.weight, site.bias, site.axis)
        projected = None if projections is None else projections.get(key)
        if projected is None:
            w, b = params[site.weight], params[site.bias] if site.bias else None
            projected = torch.nn.functional.linear(value.movedim(site.axis, -1), w.to(value.dtype), None if b is None else b.to(value.dtype))
            if projections is not None:
                projections[key] = projected
        value = projected
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


class Moments:
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
        step = max(1, CHUNK // per)
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

    def point_stats(self) -> PointStats:
        return PointStats(self.n, self.sums, self.squares, self.cross, self.shifts())


def all_reduce(moments: dict[str, Moments]) -> None:
    """Sum the statistics over processes when ``torch.distributed`` is initialised.

    Each process's moments are about its own shifts; they are first re-centred
    on the global means (from the all-reduced first moments, which do not
    cancel), so the summed second moments stay well conditioned. Every process
    reduces the same tensors in the same (sorted) order, so the sums — and the
    plans solved from them — are identical on every process.
    """
    if not is_distributed():
        return
    for name in sorted(moments):
        mom = moments[name]
        dev = mom.sums[0].device
        c = torch.tensor([float(mom.n)], dtype=torch.float64, device=dev)
        all_reduce_sum([c])
        total = float(c.item())
        old = mom.shifts()
        firsts = [s + mom.n * o for s, o in zip(mom.sums, old)]  # Σ x per model
        all_reduce_sum(firsts)
        mom.recentre([f / total if total > 0 else torch.zeros_like(f) for f in firsts])
        all_reduce_sum(mom.sums + mom.squares + [mom.cross[k] for k in sorted(mom.cross)])
        mom.n = int(round(total))
