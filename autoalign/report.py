"""What a merge returns: the merged model, its report and everything that produced it,
and the one timing helper the pipeline's stages use (which also reports each stage to the
progress display, :mod:`autoalign.progress`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .aligners.base import Plan
from .progress import Progress
from .select import Selection
from .spec import MergeSpec
from .stats import Stats

__all__ = ["PointReport", "MergeReport", "MergeResult", "Timings"]


class Timings(dict):
    """Seconds per stage, accumulated over repeated stages (iterations, pairs).

    Parameters
    ----------
    progress : Progress, optional
        The display each stage is reported to (see :mod:`autoalign.progress`; default:
        the silent one). It is not part of the record: a copy or a pickle drops it.

    Examples
    --------
    >>> t = Timings()
    >>> with t.stage("solve"):
    ...     pass
    >>> with t.stage("solve"):
    ...     pass
    >>> list(t), t["solve"] >= 0
    (['solve'], True)
    >>> import io
    >>> from autoalign.progress import LineProgress
    >>> out = io.StringIO()
    >>> with Timings(progress=LineProgress(out, tty=False)).stage("solve", detail="12 points"):
    ...     pass
    >>> out.getvalue().splitlines()
    ['autoalign: solve (12 points)']
    """

    def __init__(self, *args: Any, progress: Progress | None = None, **kwargs: float) -> None:
        super().__init__(*args, **kwargs)
        self.progress: Progress = progress if progress is not None else Progress()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Timings, (dict(self),))

    @contextmanager
    def stage(self, name: str, detail: str | None = None) -> Iterator[None]:
        """Time the block, add the seconds to ``self[name]`` and report the stage (and
        ``detail``, e.g. ``"12 points"``) to :attr:`progress`."""
        self.progress.stage_started(name, detail)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self[name] = self.get(name, 0.0) + seconds
            self.progress.stage_finished(name, seconds)

    def add(self, other: dict[str, float], skip: tuple[str, ...] = ()) -> None:
        """Add another record's seconds (but the stages in ``skip``)."""
        for k, v in other.items():
            if k not in skip:
                self[k] = self.get(k, 0.0) + v


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
        Seconds spent in ``discover``, ``statistics``, ``solve``, ``apply``, ``repair``
        (and ``reference`` for ``reference="best"``, ``averaging``, ``selection`` when they run).
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
