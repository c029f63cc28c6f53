"""The merge spec itself: :class:`MergeSpec`, the table that discovery writes and every
other part of the library reads (see :mod:`autoalign.spec`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from ..errors import OptionError, SpecError
from ..vocab import FEATURES, KINDS
from .parts import AxisRole, FoldedNorm, MergePoint

__all__ = ["MergeSpec", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = 1


@dataclass
class MergeSpec:
    """Everything the merge engine needs to know about one architecture.

    Attributes
    ----------
    points : list of MergePoint
        The merge points, in topological order of their main producer.
    axes : list of AxisRole
        Every parameter/buffer axis that indexes merge-point coordinates.
    folds : list of FoldedNorm
        BatchNorm layers folded into their producer.
    unused : list of str
        State-dict keys never reached by the traced graph (left untouched).
    model_class : str
        Qualified class name of the model the spec was discovered on.
    aliases : dict of str to str
        Tied parameters: state-dict key → the key the spec describes it under
        (transforms write the same tensor to both).

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(3, 4))
    >>> [(p.name, p.dim, p.kind) for p in spec.points]
    [('0', 8, 'linear'), ('2', 2, 'frozen')]
    """

    points: list[MergePoint]
    axes: list[AxisRole]
    folds: list[FoldedNorm] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    model_class: str = ""
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SpecError(f"duplicate merge point names: {dup}")
        self._by_name = {p.name: i for i, p in enumerate(self.points)}
        for ax in self.axes:
            bad = ax.point_of[(ax.point_of >= len(self.points))]
            if bad.size:
                raise SpecError(f"{ax.tensor} axis {ax.axis} refers to merge point #{int(bad[0])}, which does not exist")
            for p in ax.points():
                loc = ax.local_of[ax.point_of == p]
                if loc.min() < 0 or loc.max() >= self.points[p].dim:
                    raise SpecError(
                        f"{ax.tensor} axis {ax.axis}: coordinate out of range for merge point {self.points[p].name!r}"
                    )

    # ------------------------------------------------------------------ lookup
    def index_of(self, name: str) -> int:
        """Index of the merge point called ``name``.

        Raises
        ------
        KeyError
            With the closest names when there is no such point.
        """
        try:
            return self._by_name[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no merge point named {name!r}{hint}") from None

    def point(self, name: str) -> MergePoint:
        """The merge point called ``name``."""
        return self.points[self.index_of(name)]

    def axes_of(self, point: int | str) -> list[AxisRole]:
        """All parameter axes touching a merge point (by index or name)."""
        i = self.index_of(point) if isinstance(point, str) else point
        return [ax for ax in self.axes if np.any(ax.point_of == i)]

    def tensors_of(self, point: int | str) -> list[str]:
        """State-dict keys with at least one axis in the merge point."""
        return sorted({ax.tensor for ax in self.axes_of(point)})

    @property
    def active_points(self) -> list[int]:
        """Indices of the non-frozen merge points."""
        return [i for i, p in enumerate(self.points) if p.kind != "frozen"]

    # ---------------------------------------------------------------- coverage
    def coverage(self) -> float:
        """Share of feature dimensions that can be aligned.

        ``sum(dim of non-frozen points) / sum(dim of points not on the model's
        inputs/outputs)``; 1.0 for a model with no such point.
        """
        total = sum(p.dim for p in self.points if not p.io)
        active = sum(p.dim for p in self.points if p.kind != "frozen")
        return 1.0 if total == 0 else active / total

    def kind_counts(self) -> dict[str, int]:
        """Number of merge points of each kind."""
        out = {k: 0 for k in reversed(KINDS)}
        for p in self.points:
            out[p.kind] += 1
        return out

    def table(self) -> str:
        """A plain-text table: name, dim, kind, number of tensors touched, reason."""
        rows = [("name", "dim", "kind", "tensors", "reason")]
        for i, p in enumerate(self.points):
            rows.append((p.name, str(p.dim), p.kind, str(len(self.tensors_of(i))), p.reason or ""))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = []
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) if c != 1 else r[c].rjust(widths[c]) for c in range(4)) + "  " + r[4])
        return "\n".join(line.rstrip() for line in lines)

    def observed_at(self, features: str) -> "MergeSpec":
        """The same spec with each point's features observed at ``features``.

        Parameters
        ----------
        features : {"activation", "preactivation"}
            ``"activation"``: the sites as discovered, i.e. the tensors the
            consumers read (after the nonlinearity; on a residual stream every
            read of the stream). ``"preactivation"``: the producers' outputs
            (after a BatchNorm folded into them, before the nonlinearity; on a
            residual stream each branch's output before the addition), for every
            point that has such sites; the others keep theirs.

        Returns
        -------
        MergeSpec
            ``self`` for ``"activation"``, else a new spec (points, axes and folds shared).

        Raises
        ------
        OptionError
            For any other value.

        Examples
        --------
        >>> import torch, autoalign
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(4, 2, 1))
        >>> spec = autoalign.find_merge_points(net, torch.randn(2, 3, 8, 8))
        >>> [(s.node, s.kind) for s in spec.point("0").sites]
        [('_2', 'input'), ('_1', 'output')]
        >>> [(s.node, s.kind) for s in spec.observed_at("preactivation").point("0").sites]
        [('_1', 'output')]
        """
        if features not in FEATURES:
            raise OptionError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "activation":
            return self
        points = []
        for p in self.points:
            outs = tuple(s for s in p.sites if s.kind == "output")
            points.append(replace(p, sites=outs) if outs and p.kind != "frozen" else p)
        return MergeSpec(points, self.axes, self.folds, self.unused, self.model_class, self.aliases)

    # -------------------------------------------------------------------- json
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (see :meth:`to_json`)."""
        return {
            "format": "autoalign.MergeSpec",
            "version": SPEC_FORMAT_VERSION,
            "model_class": self.model_class,
            "points": [p.to_dict() for p in self.points],
            "axes": [a.to_dict() for a in self.axes],
            "folds": [f.to_dict() for f in self.folds],
            "unused": list(self.unused),
            "aliases": dict(self.aliases),
        }

    def to_json(self, **json_kwargs: Any) -> str:
        """Serialise the spec to a JSON string; :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MergeSpec":
        """Build a spec from :meth:`to_dict` output.

        Raises
        ------
        SpecError
            If the dictionary is not a spec of a supported format version.
        """
        if not isinstance(d, Mapping):
            raise SpecError(f"a merge spec must be a JSON object, got {type(d).__name__}")
        if d.get("format") != "autoalign.MergeSpec":
            raise SpecError("not an autoalign merge spec (missing 'format': 'autoalign.MergeSpec')")
        if d.get("version") != SPEC_FORMAT_VERSION:
            raise SpecError(f"unsupported spec version {d.get('version')!r}; this autoalign reads {SPEC_FORMAT_VERSION}")
        try:
            return cls(
                points=[MergePoint.from_dict(p) for p in d["points"]],
                axes=[AxisRole.from_dict(a) for a in d["axes"]],
                folds=[FoldedNorm.from_dict(f) for f in d.get("folds", [])],
                unused=list(d.get("unused", [])),
                model_class=d.get("model_class", ""),
                aliases=dict(d.get("aliases", {})),
            )
        except SpecError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
            raise SpecError(f"malformed merge spec: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "MergeSpec":
        """Read a spec written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"merge spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)
