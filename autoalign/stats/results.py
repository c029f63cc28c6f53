"""What the statistics pass returns: per merge point, each model's feature moments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["PointStats", "Stats"]


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
    #: Per submodule name, each model's moments of that module's output channels (no
    #: cross terms), where the pass was asked for them (``collect_stats(modules=...)``).
    modules: dict[str, PointStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PointStats:
        return self.points[name]

    def get(self, name: str) -> PointStats | None:
        return self.points.get(name)

    def n_blocks(self) -> int:
        """Number of (d, d) blocks held (full ``squares`` + ``cross``), summed over points."""
        return sum(sum(q.dim() == 2 for q in p.squares) + len(p.cross) for p in self.points.values())
