"""State of the channel-label analysis and the context object handed to channel rules.

Every tensor in the traced graph gets a *label tensor*: an ``int64`` tensor of the
same shape whose entries say which feature coordinate each element belongs to.

* ``id >= 1`` — a coordinate, created by a producer (Conv, Linear, ...);
* ``ZERO = 0`` — an exact zero (padding), compatible with any coordinate;
* ``UNTRACKED = -1`` — a value that no transform touches (inputs, constants,
  outputs of ops that froze their inputs).

Rules relate coordinates: an elementwise ``add`` identifies coordinate ``i`` of one
operand with coordinate ``i`` of the other (an *edge*, later solved by connected
components); a LayerNorm *restricts* its coordinates to permutations; a grouped
convolution *groups* coordinates so that each group becomes its own merge point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..spec import kind_rank

__all__ = ["ZERO", "UNTRACKED", "KindName", "RoleName", "SiteKind", "ParamOrigin", "LabelState", "RuleContext"]

ZERO = 0
UNTRACKED = -1

KindName = Literal["frozen", "rotary", "permutation", "orthogonal", "linear"]
"""A transform kind (:data:`autoalign.spec.KINDS`), from most to least restricted."""
RoleName = Literal["output", "input", "channel", "additive", "folded"]
"""The role of a parameter axis (:data:`autoalign.spec.ROLES`)."""
SiteKind = Literal["input", "output", "projected"]
"""Where features are observed: a consumer's input, a producer's output, or a
projection inside an opaque op (:class:`autoalign.spec.Site`)."""


@dataclass(frozen=True)
class ParamOrigin:
    """A tensor that is a parameter/buffer seen through shape-only ops.

    Attributes
    ----------
    key : str
        State-dict key of the parameter or buffer.
    index : Tensor of int64 or None
        Flat element index into the parameter of each element of the tensor;
        ``None`` when the tensor is the parameter itself.
    """

    key: str
    index: torch.Tensor | None = None


@dataclass
class _Role:
    key: str
    axis: int
    role: RoleName
    labels: torch.Tensor  # (n,) int64
    block: tuple[int, int, int] | None
    node: str


@dataclass
class LabelState:
    """Everything the analysis accumulates while walking the graph."""

    gm: fx.GraphModule
    strict: bool = False
    next_id: int = 1
    owners: list[tuple[int, int, str]] = field(default_factory=list)  # (start, stop, owner)
    edges: list[np.ndarray] = field(default_factory=list)  # each (k, 2)
    constraints: list[tuple[np.ndarray, KindName, str, bool]] = field(default_factory=list)
    occurrences: list[np.ndarray] = field(default_factory=list)
    roles: dict[tuple[str, int, Any], _Role] = field(default_factory=dict)
    sites: list[tuple[str, int, SiteKind, torch.Tensor]] = field(default_factory=list)  # (node, axis, kind, labels)
    folds: list[Any] = field(default_factory=list)
    producers: dict[str, tuple[str, str | None, torch.Tensor]] = field(default_factory=dict)
    producer_axes: dict[str, int] = field(default_factory=dict)  # weight axis of a producer's outputs when not 0
    labels: dict[fx.Node, Any] = field(default_factory=dict)
    values: dict[fx.Node, Any] = field(default_factory=dict)
    origins: dict[fx.Node, ParamOrigin] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    output_sites: list[tuple[str, int]] = field(default_factory=list)
    projected_sites: list[tuple[str, int, str, str | None, torch.Tensor]] = field(default_factory=list)
    rotations: list[tuple[np.ndarray, str]] = field(default_factory=list)  # ((k, 2) coordinate pairs, reason)

    # ------------------------------------------------------------------ ids
    def fresh(self, n: int, owner: str) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + n, dtype=torch.int64)
        self.owners.append((self.next_id, self.next_id + n, owner))
        self.next_id += n
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Identify coordinates elementwise (after broadcasting); zeros and untracked
        entries are skipped here (see :meth:`RuleContext.union`)."""
        a, b = reduce_pair(*torch.broadcast_tensors(a, b))
        mask = (a > 0) & (b > 0) & (a != b)
        if bool(mask.any()):
            key = torch.unique(a[mask] * self.next_id + b[mask])
            pairs = torch.stack([key // self.next_id, key % self.next_id], 1)
            self.edges.append(pairs.numpy())

    def restrict(self, ids: torch.Tensor | np.ndarray, kind: KindName, reason: str, io: bool = False) -> None:
        kind_rank(kind)
        arr = np.unique(np.asarray(ids).reshape(-1))
        arr = arr[arr > 0]
        if arr.size:
            self.constraints.append((arr, kind, reason, io))

    def group(self, ids: torch.Tensor | np.ndarray) -> None:
        arr = np.unique(np.asarray(ids).reshape(-1))
        arr = arr[arr > 0]
        if arr.size:
            self.occurrences.append(arr)


def reduce_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop (narrow to size 1) every axis along which both label tensors are constant.

    Label tensors are mostly constant over batch and spatial axes; reducing them
    first keeps elementwise relations cheap on large activations."""
    for ax in range(a.dim() - 1, -1, -1):
        if a.shape[ax] > 1:
            a0, b0 = a.narrow(ax, 0, 1), b.narrow(ax, 0, 1)
            if bool((a == a0).all()) and bool((b == b0).all()):
                a, b = a0, b0
    return a, b


def unique_ids(lab: torch.Tensor, n_ids: int) -> torch.Tensor:
    """The distinct coordinates (``> 0``) of a label tensor, sorted, without sorting it."""
    vals = lab[lab > ZERO]
    if vals.numel() == 0:
        return vals
    mask = torch.zeros(n_ids + 1, dtype=torch.bool)
    mask[vals] = True
    return mask.nonzero().reshape(-1)


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


class RuleContext:
    """What a channel rule sees of one node and what it may record.

    A rule is a callable ``rule(ctx) -> label`` that returns the label of the
    node's output: an ``int64`` tensor of the output's shape, ``None`` for an
    untracked output, or a tuple/list of those for multiple outputs.

    Attributes
    ----------
    node : torch.fx.Node
        The node being analysed.
    module : nn.Module or None
        The called module for ``call_module`` nodes.
    out : Any
        The node's real output (computed on the example inputs).

    Examples
    --------
    A custom activation kept opaque with ``leaf_modules`` has no rule, so the
    coordinates it touches are frozen; a rule that passes the labels of its
    input through (it acts elementwise) makes the point ``linear`` again:

    >>> import torch, autoalign
    >>> class Swish(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.beta = torch.nn.Parameter(torch.ones(()))
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(self.beta * x)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), Swish(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(5, 3)
    >>> autoalign.find_merge_points(net, x, leaf_modules=[Swish]).point("0").kind
    'frozen'
    >>> seen = []
    >>> @autoalign.register_channel_rule(Swish, replace=True)
    ... def swish_rule(ctx):
    ...     seen.append((ctx.name, type(ctx.module).__name__, tuple(ctx.out.shape)))
    ...     ctx.touch(ctx.module_key("beta"))    # a scalar: no feature axis
    ...     return ctx.label(ctx.arg(0))         # output coordinates = input coordinates
    >>> autoalign.find_merge_points(net, x, leaf_modules=[Swish]).point("0").kind
    'linear'
    >>> seen
    [('1', 'Swish', (5, 4))]
    """

    def __init__(self, state: LabelState, node: fx.Node, out: Any, module: nn.Module | None = None) -> None:
        self.state = state
        self.node = node
        self.out = out
        if module is None and node.op == "call_module":
            module = state.gm.get_submodule(node.target)
        self.module: nn.Module | None = module

    # -------------------------------------------------------------- reading
    @property
    def name(self) -> str:
        """Readable name of the node: the module path for modules, the path of the module
        that issued it for nodes of an exported graph, else the node name."""
        if self.node.op == "call_module":
            return str(self.node.target)
        return self.node.meta.get("autoalign_scope") or self.node.name

    def describe(self) -> str:
        """The node in one short line for messages: ``%name = what(args)``.

        ``what`` is the module path and class for ``call_module`` nodes, the
        qualified function name for ``call_function`` and ``.method`` for
        ``call_method``; arguments are shown by node name, cut at 60 characters.
        """
        n = self.node
        if n.op == "call_module":
            what = f"{n.target} ({type(self.module).__name__})" if self.module is not None else str(n.target)
        elif n.op == "call_function":
            t = n.target
            mod = getattr(t, "__module__", None) or ""
            mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
            name = getattr(t, "__name__", str(t))
            what = f"{mod}.{name}" if mod else name
            if isinstance(t, torch._ops.OpOverload):  # an ATen op of an exported graph
                what = str(t)
            scope = n.meta.get("autoalign_scope")
            if scope:
                what = f"{what} in {scope}"
        elif n.op == "call_method":
            what = f".{n.target}"
        else:
            return f"%{n.name}"
        parts = [str(a) for a in n.args] + [f"{k}={v}" for k, v in n.kwargs.items()]
        args = ", ".join(p if not isinstance(a, fx.Node) else f"%{p}" for p, a in zip(parts, list(n.args) + list(n.kwargs.values())))
        if len(args) > 60:
            args = args[:57] + "..."
        return f"%{n.name} = {what}({args})"

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """The raw argument (an ``fx.Node`` or constant) by position or keyword."""
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        if index < len(self.node.args):
            return self.node.args[index]
        return default

    def value(self, a: Any) -> Any:
        """The real value of an argument (nodes resolved on the example inputs)."""
        return fx.node.map_arg(a, lambda n: self.state.values[n])

    def label(self, a: Any, *, materialize: bool = False) -> Any:
        """Label of an argument: a tensor, ``None`` (untracked) or a nested structure.

        With ``materialize=True`` an untracked tensor argument gets an explicit label
        tensor full of ``UNTRACKED``.
        """
        if isinstance(a, fx.Node):
            lab = self.state.labels.get(a)
            if lab is None and materialize:
                v = self.state.values.get(a)
                if isinstance(v, torch.Tensor):
                    return torch.full(v.shape, UNTRACKED, dtype=torch.int64)
            return lab
        if isinstance(a, (list, tuple)):
            return type(a)(self.label(x, materialize=materialize) for x in a)
        return None

    def origin(self, a: Any) -> ParamOrigin | None:
        """The parameter an argument shows, if it is one seen through shape-only ops."""
        return self.state.origins.get(a) if isinstance(a, fx.Node) else None

    def param_key(self, a: Any) -> str | None:
        """State-dict key when the argument is a parameter/buffer used as it is."""
        o = self.origin(a)
        if o is not None and o.index is None:
            return o.key
        return None

    def module_key(self, attr: str) -> str | None:
        """State-dict key of ``self.module.<attr>`` if that tensor exists."""
        if self.module is None or getattr(self.module, attr, None) is None:
            return None
        return f"{self.node.target}.{attr}"

    # -------------------------------------------------------------- labels
    def fresh(self, n: int, owner: str | None = None) -> torch.Tensor:
        """``n`` new coordinates, ``(n,)`` int64, named after ``owner`` (default: this node)."""
        return self.state.fresh(n, owner or self.name)

    @staticmethod
    def along(vec: torch.Tensor, shape: Sequence[int], axis: int) -> torch.Tensor:
        """A label tensor of ``shape`` holding ``vec`` along ``axis`` and constant elsewhere."""
        ndim = len(shape)
        ax = _axis(axis, ndim)
        view = [1] * ndim
        view[ax] = vec.numel()
        return vec.reshape(view).expand(*shape).contiguous()

    def channels(self, lab: torch.Tensor | None, axis: int, *, why: str = "") -> torch.Tensor | None:
        """The coordinate vector of a label tensor along ``axis``.

        Every slice along the other axes must hold the same coordinate at each
        position (zeros allowed). Positions where that fails are frozen and come
        back as ``UNTRACKED``. Returns ``None`` for an untracked tensor.
        """
        if lab is None:
            return None
        ax = _axis(axis, lab.dim())
        mat = lab.movedim(ax, -1).reshape(-1, lab.shape[ax])
        big = torch.iinfo(torch.int64).max
        hi = mat.max(0).values
        lo = torch.where(mat == ZERO, torch.full_like(mat, big), mat).min(0).values
        lo = torch.where(lo == big, hi, lo)
        vec = hi.clone()
        bad = lo != hi
        if bool(bad.any()):
            self.freeze(mat[:, bad], f"{self.describe()}: {why or 'channels vary along other axes'}")
            vec[bad] = UNTRACKED
        vec[vec == ZERO] = UNTRACKED
        return vec

    def varying_axes(self, lab: torch.Tensor | None) -> list[int]:
        """Axes along which a label tensor is not constant."""
        if lab is None:
            return []
        out = []
        for ax in range(lab.dim()):
            if lab.shape[ax] > 1 and not bool((lab == lab.narrow(ax, 0, 1)).all()):
                out.append(ax)
        return out

    # ------------------------------------------------------------ recording
    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Identify coordinates of two label tensors elementwise (after broadcasting).

        Where one side is a coordinate and the other is untracked, the coordinate
        is frozen (an untracked value would not move with it).
        """
        a, b = torch.broadcast_tensors(a, b)
        lone = ((a > 0) & (b == UNTRACKED)) | ((b > 0) & (a == UNTRACKED))
        if bool(lone.any()):
            self.freeze(torch.cat([a[lone], b[lone]]), f"{self.describe()}: combined with an untracked tensor")
        self.state.union(a, b)

    def _ids(self, ids: Any) -> np.ndarray:
        return unique_ids(torch.as_tensor(ids).reshape(-1), self.state.next_id).numpy()

    def restrict(self, ids: Any, kind: KindName, reason: str) -> None:
        """Allow at most ``kind`` transforms for the given coordinates; ``reason`` names why.
        (The ``rotary`` kind needs its coordinate pairs: :meth:`rotate_pairs`.)"""
        if kind == "rotary":
            from ..errors import SpecError

            raise SpecError(f"{self.describe()}: the rotary kind needs coordinate pairs; use ctx.rotate_pairs(pairs, reason)")
        if ids is None:
            return
        self.state.restrict(self._ids(ids), kind, reason)

    def rotate_pairs(self, pairs: torch.Tensor, reason: str) -> None:
        """Allow only rotations of each coordinate pair in its plane (kind ``rotary``).

        ``pairs`` is an ``(k, 2)`` tensor of coordinate ids, the pairs that rotary position
        embeddings rotate together (:mod:`autoalign.graph.rules.rotary`).
        """
        arr = np.unique(np.sort(pairs.numpy().reshape(-1, 2), 1), axis=0)
        self.state.rotations.append((arr, reason))
        self.state.restrict(arr, "rotary", reason)

    def freeze(self, ids: Any, reason: str, *, io: bool = False) -> None:
        """Freeze coordinates (no transform at all)."""
        if ids is None:
            return
        if isinstance(ids, (list, tuple)):
            for x in ids:
                self.freeze(x, reason, io=io)
            return
        if self.state.strict and not io:
            from ..errors import UnsupportedOpError

            raise UnsupportedOpError(reason)
        self.state.restrict(self._ids(ids), "frozen", reason, io)

    def group(self, ids: Any) -> None:
        """Declare that ``ids`` form a block that must not mix with coordinates outside it."""
        if ids is not None:
            self.state.group(self._ids(ids))

    def role(
        self,
        key: str | None,
        axis: int,
        role: RoleName,
        labels: torch.Tensor | None,
        *,
        block: tuple[int, int, int] | None = None,
    ) -> None:
        """Record that axis ``axis`` of tensor ``key`` holds the coordinates ``labels``.

        A tensor used twice (tied weights) gets its two label vectors identified.
        """
        if key is None or labels is None:
            return
        labels = labels.reshape(-1).to(torch.int64)
        self.state.touched.add(key)
        key = self.state.aliases.get(key, key)
        self.state.touched.add(key)
        slot = (key, axis, block)
        prev = self.state.roles.get(slot)
        if prev is None:
            self.state.roles[slot] = _Role(key, axis, role, labels.clone(), block, self.node.name)
            return
        if prev.labels.shape == labels.shape and {prev.role, role} == {"output", "input"}:
            # a tied weight that produces and consumes the same coordinates (embedding
            # and output layer): W M^T and W M^{-1} agree only for orthogonal M
            self.union(prev.labels, labels)
            self.restrict(torch.cat([prev.labels, labels]), "orthogonal", f"{self.describe()}: {key} is tied (used as producer and consumer)")
            return
        if prev.labels.shape != labels.shape or prev.role != role:
            self.freeze([prev.labels, labels], f"{self.describe()}: {key} is used twice in incompatible ways")
            return
        self.union(prev.labels, labels)

    def site(self, a: Any, axis: int, kind: SiteKind = "input") -> None:
        """Record that the features of argument ``a`` along ``axis`` are observable there."""
        if isinstance(a, fx.Node):
            lab = self.state.labels.get(a)
            if isinstance(lab, torch.Tensor):
                self.state.sites.append((a.name, _axis(axis, lab.dim()), kind, lab))

    def projected_site(self, a: Any, axis: int, weight: str, bias: str | None, labels: torch.Tensor) -> None:
        """Record that ``F.linear(a, weight, bias)`` (features along ``axis`` of ``a``)
        holds the coordinates ``labels`` — for projections inside a leaf module or
        opaque function (attention q/k/v), where no graph node shows them."""
        if isinstance(a, fx.Node):
            lab = self.state.labels.get(a)
            if isinstance(lab, torch.Tensor):
                self.state.projected_sites.append((a.name, _axis(axis, lab.dim()), weight, bias, labels.reshape(-1)))

    def touch(self, key: str | None) -> None:
        """Mark a tensor as reached by the graph (it has no coordinate axes)."""
        if key is not None:
            self.state.touched.add(key)

    def all_ids(self, labels: Iterable[Any]) -> list[torch.Tensor]:
        """Flatten nested labels into a list of label tensors."""
        out: list[torch.Tensor] = []
        for lab in labels:
            if isinstance(lab, torch.Tensor):
                out.append(lab)
            elif isinstance(lab, (list, tuple)):
                out.extend(self.all_ids(lab))
            elif isinstance(lab, dict):
                out.extend(self.all_ids(lab.values()))
        return out
