"""The parts of a merge spec: sites, merge points, axis roles and folded norms
(see :mod:`autoalign.spec`), with their JSON encodings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..errors import SpecError
from ..vocab import KINDS, ROLES

__all__ = ["kind_rank", "kind_meet", "replica_index", "index_along", "dataclass_eq", "Site", "MergePoint", "AxisRole", "FoldedNorm"]

_KIND_RANK = {k: i for i, k in enumerate(KINDS)}


def kind_rank(kind: str) -> int:
    """Rank of a transform kind: 0 for ``frozen`` up to 4 for ``linear`` (``rotary`` is 1,
    ``permutation`` 2; the two are not nested, see :func:`kind_meet`)."""
    try:
        return _KIND_RANK[kind]
    except KeyError:
        raise SpecError(f"unknown transform kind {kind!r}; expected one of {KINDS}") from None


_ROTARY, _PERMUTATION = _KIND_RANK["rotary"], _KIND_RANK["permutation"]


def kind_meet(a: Any, b: Any) -> Any:
    """The rank of the most general kind allowed by both ranks ``a`` and ``b`` (ints or arrays).

    The kinds are subgroups: permutation ⊂ orthogonal ⊂ linear and rotary ⊂ orthogonal, but
    rotations of coordinate pairs and permutations share only the identity, so their meet
    is ``frozen``; every other meet is the lower rank.

    Examples
    --------
    >>> names = {kind_rank(k): k for k in KINDS}
    >>> names[kind_meet(kind_rank("rotary"), kind_rank("orthogonal"))]
    'rotary'
    >>> names[kind_meet(kind_rank("rotary"), kind_rank("permutation"))]
    'frozen'
    """
    low = np.minimum(a, b)
    clash = np.logical_and(low == _ROTARY, np.maximum(a, b) == _PERMUTATION)
    out = np.where(clash, _KIND_RANK["frozen"], low)
    return int(out) if np.ndim(out) == 0 else out


def replica_index(positions: np.ndarray, locals_: np.ndarray, dim: int) -> np.ndarray | None:
    """Arrange axis positions holding coordinates ``0..dim-1`` into a ``(R, dim)`` matrix.

    Row ``r`` holds, for each coordinate ``j``, the position of its ``r``-th
    occurrence (in order along the axis). Returns ``None`` when coordinates occur
    an unequal number of times.
    """
    if positions.size == 0 or positions.size % dim:
        return None
    order = np.lexsort((positions, locals_))  # by local, then by position
    sorted_locals = locals_[order]
    reps = positions.size // dim
    if not np.array_equal(sorted_locals, np.repeat(np.arange(dim), reps)):
        return None
    return positions[order].reshape(dim, reps).T.copy()


def index_along(t: "torch.Tensor", axis: int, block: tuple[int, int, int] | None, index: "torch.Tensor") -> "torch.Tensor":
    """``t`` gathered along ``axis`` by ``index`` (a new tensor); with ``block = (axis', start,
    stop)`` only that slice of ``axis'`` is gathered, the rest copied as is.

    Examples
    --------
    >>> import torch
    >>> index_along(torch.arange(4.0).reshape(2, 2), 1, None, torch.tensor([1, 0])).tolist()
    [[1.0, 0.0], [3.0, 2.0]]
    >>> index_along(torch.arange(4.0).reshape(2, 2), 1, (0, 1, 2), torch.tensor([1, 0])).tolist()
    [[0.0, 1.0], [3.0, 2.0]]
    """
    index = index.to(t.device)
    if block is None:
        return t.index_select(axis, index)
    b_axis, start, stop = block
    t = t.clone()
    part = t.narrow(b_axis, start, stop - start)
    part.copy_(part.index_select(axis, index))
    return t


def dataclass_eq(a: Any, b: Any) -> bool:
    """Field-wise equality of two dataclass instances, numpy arrays compared by value."""
    if type(a) is not type(b):
        return NotImplemented  # type: ignore[return-value]
    for f in fields(a):
        if not f.compare:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@dataclass(frozen=True)
class Site:
    """A tensor in the traced graph where a merge point's features can be observed.

    Attributes
    ----------
    node : str
        Name of the fx node whose output holds the features.
    axis : int
        Feature axis of that output tensor (other axes are treated as samples).
    index : numpy.ndarray of int64, shape (R, dim)
        ``index[r, j]`` is the position along ``axis`` of the ``r``-th replica of
        the point's coordinate ``j`` (``R > 1`` after ``flatten``).
    kind : str
        ``"input"`` for a tensor a consumer reads, ``"output"`` for a producer's
        raw output (used only when a point has no input site), ``"projected"``
        for ``F.linear(x, weight, bias)`` of the node's output ``x`` (projections
        inside attention modules, which no graph node shows).
    weight, bias : str or None
        State-dict keys of the projection of a ``"projected"`` site; ``index``
        then indexes the projection's output features.

    Examples
    --------
    The hidden features of a small MLP are observed where the second Linear
    reads them (the ReLU's output, axis 1):

    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> site = autoalign.find_merge_points(net, torch.randn(5, 3)).point("0").sites[0]
    >>> site.kind, site.axis, site.index.tolist()
    ('input', 1, [[0, 1, 2, 3]])
    """

    node: str
    axis: int
    index: np.ndarray
    kind: str = "input"
    weight: str | None = None
    bias: str | None = None

    __eq__ = dataclass_eq

    def to_dict(self) -> dict[str, Any]:
        d = {"node": self.node, "axis": self.axis, "index": self.index.tolist(), "kind": self.kind}
        if self.weight is not None:
            d["weight"], d["bias"] = self.weight, self.bias
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Site":
        return cls(
            d["node"], int(d["axis"]), np.asarray(d["index"], dtype=np.int64), d.get("kind", "input"),
            d.get("weight"), d.get("bias"),
        )


@dataclass(frozen=True)
class MergePoint:
    """A group of feature coordinates that must share one transform.

    Attributes
    ----------
    name : str
        Stable readable name, from the fx node of its main producer
        (e.g. ``"layer2.0.conv1"``; ``"name[k]"`` when a producer's outputs form
        several points, ``"name/h3"`` for attention head 3).
    dim : int
        Number of coordinates ``d``; transforms of this point are ``(d, d)``.
    kind : str
        Most general transform that keeps the network well-formed: one of
        ``"linear"``, ``"orthogonal"``, ``"permutation"``, ``"rotary"``, ``"frozen"``.
    reason : str or None
        Why the kind is restricted (names the node responsible); ``None`` for
        ``linear`` points.
    io : bool
        True when the point is frozen because it touches the model's inputs or
        outputs (such points are left out of coverage).
    producers : tuple of str
        Nodes that create the point's coordinates.
    sites : tuple of Site
        Tensors where the point's features are observed (consumer inputs first).
    pairs : tuple of (int, int)
        For a ``rotary`` point: the coordinate pairs that rotary position embeddings
        rotate together; its transforms rotate each pair in its plane and keep the
        other coordinates. Empty for every other kind.

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(5, 3))
    >>> hidden, out = spec.points
    >>> hidden.name, hidden.dim, hidden.kind, hidden.producers
    ('0', 4, 'linear', ('0',))
    >>> out.kind, out.reason, out.io
    ('frozen', 'model output', True)
    """

    name: str
    dim: int
    kind: str
    reason: str | None = None
    io: bool = False
    producers: tuple[str, ...] = ()
    sites: tuple[Site, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        extra = {"pairs": [list(p) for p in self.pairs]} if self.pairs else {}
        return {
            "name": self.name,
            "dim": self.dim,
            "kind": self.kind,
            "reason": self.reason,
            "io": self.io,
            "producers": list(self.producers),
            "sites": [s.to_dict() for s in self.sites],
            **extra,
        }

    def __post_init__(self) -> None:
        if bool(self.pairs) != (self.kind == "rotary"):
            raise SpecError(f"merge point {self.name!r}: coordinate pairs belong to rotary points, and every "
                            f"rotary point needs them (kind {self.kind!r}, {len(self.pairs)} pairs)")
        flat = [i for pair in self.pairs for i in pair]
        if len(set(flat)) != len(flat) or any(not 0 <= i < self.dim for i in flat):
            raise SpecError(f"merge point {self.name!r}: rotary pairs must be disjoint coordinates in [0, {self.dim})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MergePoint":
        kind_rank(d["kind"])
        return cls(
            name=d["name"],
            dim=int(d["dim"]),
            kind=d["kind"],
            reason=d.get("reason"),
            io=bool(d.get("io", False)),
            producers=tuple(d.get("producers", ())),
            sites=tuple(Site.from_dict(s) for s in d.get("sites", ())),
            pairs=tuple((int(i), int(j)) for i, j in d.get("pairs", ())),
        )


def encode_runs(point_of: np.ndarray, local_of: np.ndarray) -> list[list[int]]:
    """Run-length encode ``(point_of, local_of)`` as ``[start, length, point, local0, step]``."""
    runs: list[list[int]] = []
    n = point_of.size
    i = 0
    while i < n:
        p, l0 = int(point_of[i]), int(local_of[i])
        if i + 1 < n and point_of[i + 1] == p:
            step = int(local_of[i + 1]) - l0
            if step not in (0, 1):
                step = 0
        else:
            step = 0
        j = i + 1
        while j < n and point_of[j] == p and local_of[j] == l0 + step * (j - i):
            j += 1
        runs.append([i, j - i, p, l0, step])
        i = j
    return runs


def decode_runs(runs: Iterable[Iterable[int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    point_of = np.full(n, -1, dtype=np.int64)
    local_of = np.full(n, -1, dtype=np.int64)
    for start, length, p, l0, step in runs:
        point_of[start : start + length] = p
        local_of[start : start + length] = l0 + step * np.arange(length)
    return point_of, local_of


@dataclass
class AxisRole:
    """How one axis of one parameter or buffer indexes merge-point coordinates.

    Attributes
    ----------
    tensor : str
        State-dict key of the parameter or buffer.
    axis : int
        The axis (non-negative).
    role : str
        One of :data:`ROLES`.
    point_of : numpy.ndarray of int64, shape (n,)
        Merge-point index (into ``MergeSpec.points``) of each position along the
        axis, ``-1`` where the position belongs to no point.
    local_of : numpy.ndarray of int64, shape (n,)
        Coordinate of that point held at each position (``-1`` where none).
    block : tuple of (int, int, int) or None
        ``(other_axis, start, stop)``: the role applies only to that slice of
        another axis (grouped convolutions, fused q/k/v projections).

    Examples
    --------
    The hidden point of a small MLP owns the rows of the first layer and the
    columns of the second:

    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(5, 3))
    >>> [(ax.tensor, ax.axis, ax.role) for ax in spec.axes_of("0")]
    [('0.weight', 0, 'output'), ('0.bias', 0, 'output'), ('2.weight', 1, 'input')]
    >>> ax = spec.axes_of("0")[2]
    >>> ax.point_of.tolist(), ax.local_of.tolist(), ax.index(0, 4).tolist()
    ([0, 0, 0, 0], [0, 1, 2, 3], [[0, 1, 2, 3]])
    """

    tensor: str
    axis: int
    role: str
    point_of: np.ndarray
    local_of: np.ndarray
    block: tuple[int, int, int] | None = None
    _index: dict[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    __eq__ = dataclass_eq

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SpecError(f"{self.tensor} axis {self.axis}: unknown role {self.role!r}; expected one of {ROLES}")
        self.point_of = np.asarray(self.point_of, dtype=np.int64)
        self.local_of = np.asarray(self.local_of, dtype=np.int64)
        if self.point_of.shape != self.local_of.shape or self.point_of.ndim != 1:
            raise SpecError(f"{self.tensor} axis {self.axis}: point_of and local_of must be 1-d of equal length")

    @property
    def size(self) -> int:
        """Length of the axis."""
        return int(self.point_of.size)

    def points(self) -> list[int]:
        """Indices of the merge points this axis touches, sorted."""
        return sorted(int(p) for p in np.unique(self.point_of) if p >= 0)

    def index(self, point: int, dim: int) -> np.ndarray:
        """Positions of ``point``'s coordinates along the axis, shape ``(R, dim)``.

        Raises
        ------
        SpecError
            If the coordinates do not occur an equal number of times.
        """
        if self._index is None:
            self._index = {}
        if point not in self._index:
            pos = np.nonzero(self.point_of == point)[0]
            idx = replica_index(pos, self.local_of[pos], dim)
            if idx is None:
                raise SpecError(
                    f"{self.tensor} axis {self.axis}: coordinates of merge point #{point} do not occur "
                    f"equally often along the axis (dim {dim}); the spec is inconsistent"
                )
            self._index[point] = idx
        return self._index[point]

    def block_of(self, t: "torch.Tensor") -> "torch.Tensor":
        """The part of ``t`` this role covers: ``t`` itself, or a view of its block."""
        if self.block is None:
            return t
        b_axis, start, stop = self.block
        return t.narrow(b_axis, start, stop - start)

    def axis_major(self, t: "torch.Tensor") -> "torch.Tensor":
        """A view of (the block of) ``t`` with this role's axis first."""
        return self.block_of(t).movedim(self.axis, 0)

    def gather(self, t: "torch.Tensor", idx: "torch.Tensor") -> "torch.Tensor":
        """``t``'s slices at a point's positions ``idx`` (shape ``(R, d)``), shape ``(R, d, K)``
        with ``K`` the entries per position (a copy).

        Examples
        --------
        >>> import torch
        >>> ax = AxisRole("w", 0, "output", np.array([0, 0, -1]), np.array([1, 0, -1]))
        >>> ax.gather(torch.arange(6.0).reshape(3, 2), torch.tensor([[1, 0]])).tolist()
        [[[2.0, 3.0], [0.0, 1.0]]]
        """
        r, d = idx.shape
        return self.axis_major(t)[idx.reshape(-1).to(t.device)].reshape(r, d, -1)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tensor": self.tensor,
            "axis": self.axis,
            "role": self.role,
            "size": self.size,
            "runs": encode_runs(self.point_of, self.local_of),
        }
        if self.block is not None:
            d["block"] = list(self.block)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AxisRole":
        point_of, local_of = decode_runs(d["runs"], int(d["size"]))
        block = tuple(int(b) for b in d["block"]) if d.get("block") is not None else None
        return cls(d["tensor"], int(d["axis"]), d["role"], point_of, local_of, block)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FoldedNorm:
    """A BatchNorm folded exactly into the producer (Linear/Conv) right before it.

    Attributes
    ----------
    producer_weight : str
        State-dict key of the producer's weight; its axis 0 is the output axis.
    producer_bias : str or None
        The producer's bias, if it has one.
    weight, bias : str or None
        The BatchNorm affine parameters (``None`` when ``affine=False``).
    running_mean, running_var : str
        The BatchNorm statistics.
    eps : float
        The BatchNorm epsilon.

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(4, 2, 1))
    >>> (fold,) = autoalign.find_merge_points(net, torch.randn(2, 3, 8, 8)).folds
    >>> fold.producer_weight, fold.running_mean, fold.eps
    ('0.weight', '1.running_mean', 1e-05)
    """

    producer_weight: str
    producer_bias: str | None
    weight: str | None
    bias: str | None
    running_mean: str
    running_var: str
    eps: float
    producer_axis: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FoldedNorm":
        return cls(**d)
