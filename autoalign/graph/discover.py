"""Discovery of merge points: walk the traced graph with channel labels, then solve.

1. Run the traced graph on the example inputs, node by node, keeping each node's
   real value and computing its label tensor with the node's channel rule.
2. Coordinates identified by the rules (residual adds, concatenations along
   tokens, query/key contractions) are merged by connected components.
3. A merge point is a set of coordinates that appear in exactly the same tensors
   (and the same declared groups): coordinates that always travel together.
4. Each point gets the most general transform kind its constraints allow, a
   readable name, the parameter axes it owns and the tensors where its features
   can be observed.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ..errors import SpecError
from ..spec import KINDS, AxisRole, MergePoint, MergeSpec, Site, replica_index, kind_rank
from ..trace import as_input_tuple, eval_mode, trace
from . import rules  # noqa: F401 - registers the built-in rules
from .context import ZERO, LabelState, ParamOrigin, RuleContext, unique_ids
from .registry import find_rule

__all__ = ["find_merge_points", "discover"]


def _contains_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_tensor(x) for x in v.values())
    return False


def _check_label(node: fx.Node, value: Any, lab: Any) -> Any:
    """Labels must mirror the structure and shapes of the real value."""
    if lab is None:
        return None
    if isinstance(value, torch.Tensor):
        if not isinstance(lab, torch.Tensor) or tuple(lab.shape) != tuple(value.shape) or lab.dtype != torch.int64:
            got = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
            raise SpecError(
                f"{node.format_node()}: channel rule returned a label of shape {got} for an output of shape "
                f"{tuple(value.shape)} (a channel rule bug)"
            )
        return lab
    if isinstance(value, (list, tuple)) and isinstance(lab, (list, tuple)) and len(lab) == len(value):
        return type(lab)(_check_label(node, v, l) for v, l in zip(value, lab))
    return None


def _occurrence(lab: Any, state: LabelState) -> None:
    if isinstance(lab, torch.Tensor):
        ids = unique_ids(lab, state.next_id)
        if ids.numel():
            state.occurrences.append(ids.numpy())
    elif isinstance(lab, (list, tuple)):
        for x in lab:
            _occurrence(x, state)


def analyse(
    gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False, keys: set[str] | None = None
) -> LabelState:
    """Run the label analysis over a traced graph (step 1 above).

    ``keys`` are the state-dict keys of the original model; tensors the tracer
    added (``_tensor_constantN``) are treated as constants, not parameters.
    """
    rules.register_torchvision_rules()
    inputs = list(as_input_tuple(example_inputs))
    state = LabelState(gm, strict=strict)
    canonical: dict[int, str] = {}
    for k, v in gm.state_dict(keep_vars=True).items():
        if keys is not None and k not in keys:
            continue
        state.param_shapes[k] = tuple(v.shape)
        first = canonical.setdefault(id(v), k)
        if first != k:
            state.aliases[k] = first
    interp = fx.Interpreter(gm)
    with torch.no_grad(), eval_mode(gm):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = inputs.pop(0) if inputs else (node.args[0] if node.args else None)
                state.values[node] = value
                state.labels[node] = None
                continue
            if node.op == "get_attr":
                value = interp.fetch_attr(node.target)
                state.values[node] = value
                state.labels[node] = None
                if node.target in state.param_shapes:
                    state.origins[node] = ParamOrigin(node.target)
                    state.touched.add(node.target)
                continue
            if node.op == "output":
                ctx = RuleContext(state, node, None)
                labs = ctx.all_ids([ctx.label(a) for a in node.args])
                ctx.freeze(labs, "model output", io=True)
                continue
            args = fx.node.map_arg(node.args, lambda n: state.values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: state.values[n])
            value = getattr(interp, node.op)(node.target, args, kwargs)
            state.values[node] = value
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                for name, _ in list(mod.named_parameters()) + list(mod.named_buffers()):
                    state.touched.add(f"{node.target}.{name}")
            state.labels[node] = _label_of(state, node, value)
            _occurrence(state.labels[node], state)
    return state


def _label_of(state: LabelState, node: fx.Node, value: Any) -> Any:
    ctx = RuleContext(state, node, value)
    if node.op == "call_function" and node.target is getattr:
        src = node.args[0]
        lab = state.labels.get(src) if isinstance(src, fx.Node) else None
        if isinstance(value, torch.Tensor) and isinstance(lab, torch.Tensor):
            return getattr(lab, node.args[1])
        return None
    rule = find_rule(node.op, node.target, ctx.module)
    if rule is None:
        if not _contains_tensor(value):
            return None
        from .rules import unknown

        return unknown(ctx)
    if not _contains_tensor(value):
        # sizes, flags and other non-tensor results carry no features
        return None
    return _check_label(node, value, rule(ctx))


def _channel_vector(lab: torch.Tensor, axis: int) -> np.ndarray:
    mat = lab.movedim(axis, -1).reshape(-1, lab.shape[axis])
    big = torch.iinfo(torch.int64).max
    hi = mat.max(0).values
    lo = torch.where(mat == ZERO, torch.full_like(mat, big), mat).min(0).values
    lo = torch.where(lo == big, hi, lo)
    vec = hi.clone()
    vec[(lo != hi) | (vec <= ZERO)] = -1
    return vec.numpy()


def assemble(state: LabelState, model: nn.Module | None = None) -> MergeSpec:
    """Solve the recorded relations into a :class:`MergeSpec` (steps 2–4 above)."""
    n_ids = state.next_id
    if state.edges:
        e = np.concatenate(state.edges).astype(np.int64)
        g = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n_ids, n_ids))
    else:
        g = coo_matrix((n_ids, n_ids), dtype=np.int8)
    _, comp = connected_components(g, directed=False)

    ids = np.arange(1, n_ids)
    comps = np.unique(comp[ids])
    # first (smallest) id of each component: the producer order
    min_id = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(min_id, comp[ids], ids)

    # signatures: the set of tensors/groups each component appears in
    sig_pairs = []
    for o, occ in enumerate(state.occurrences):
        c = np.unique(comp[occ])
        sig_pairs.append(np.stack([c, np.full_like(c, o)], 1))
    sigs: dict[int, tuple[int, ...]] = {int(c): () for c in comps}
    if sig_pairs:
        pairs = np.concatenate(sig_pairs)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        splits = np.nonzero(np.diff(pairs[:, 0]))[0] + 1
        for chunk in np.split(pairs, splits):
            sigs[int(chunk[0, 0])] = tuple(chunk[:, 1].tolist())

    by_sig: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for c in sorted(comps.tolist(), key=lambda c: min_id[c]):
        by_sig[sigs[c]].append(c)
    groups = sorted(by_sig.values(), key=lambda cs: min_id[cs[0]])

    comp_point = np.full(comp.max() + 1, -1, dtype=np.int64)
    comp_local = np.full(comp.max() + 1, -1, dtype=np.int64)
    for p, cs in enumerate(groups):
        comp_point[cs] = p
        comp_local[cs] = np.arange(len(cs))

    # kinds
    rank = np.full(comp.max() + 1, kind_rank("linear"), dtype=np.int64)
    reason: dict[int, str] = {}
    io = np.zeros(comp.max() + 1, dtype=bool)
    for arr, kind, why, is_io in state.constraints:
        cs = np.unique(comp[arr])
        r = kind_rank(kind)
        lower = cs[rank[cs] > r]
        rank[lower] = r
        for c in lower.tolist():
            reason[c] = why
        if is_io:
            io[cs] = True

    # names
    starts = [o[0] for o in state.owners]

    def owner(i: int) -> str:
        k = bisect.bisect_right(starts, i) - 1
        return state.owners[k][2]

    base_names = [owner(int(min_id[cs[0]])) for cs in groups]
    counts: dict[str, int] = defaultdict(int)
    for b in base_names:
        counts[b] += 1
    seen: dict[str, int] = defaultdict(int)
    names = []
    for b in base_names:
        if counts[b] > 1:
            names.append(f"{b}[{seen[b]}]")
            seen[b] += 1
        else:
            names.append(b)

    # axis roles
    def to_points(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(labels)
        ok = labels > 0
        pt = np.full(labels.shape, -1, dtype=np.int64)
        lo = np.full(labels.shape, -1, dtype=np.int64)
        pt[ok] = comp_point[comp[labels[ok]]]
        lo[ok] = comp_local[comp[labels[ok]]]
        return pt, lo

    axes: list[AxisRole] = []
    for r in state.roles.values():
        pt, lo = to_points(r.labels.numpy())
        if np.all(pt < 0):
            continue
        axes.append(AxisRole(r.key, r.axis, r.role, pt, lo, r.block))

    # point kinds, with consistency checks on every axis
    p_rank = [min(int(rank[c]) for c in cs) for cs in groups]
    p_reason: list[str | None] = []
    p_io: list[bool] = []
    for p, cs in enumerate(groups):
        worst = min(cs, key=lambda c: rank[c])
        p_reason.append(reason.get(worst) if p_rank[p] < kind_rank("linear") else None)
        p_io.append(bool(io[cs].any()) and p_rank[p] == 0)
    dims = [len(cs) for cs in groups]
    for ax in axes:
        for p in ax.points():
            pos = np.nonzero(ax.point_of == p)[0]
            if replica_index(pos, ax.local_of[pos], dims[p]) is None and p_rank[p] > 0:
                p_rank[p] = 0
                p_reason[p] = f"coordinates occur unevenly along {ax.tensor} axis {ax.axis}"
            if ax.role == "channel" and p_rank[p] > kind_rank("permutation"):
                p_rank[p] = kind_rank("permutation")
                p_reason[p] = f"per-channel tensor {ax.tensor}"

    # sites: consumer inputs first, then producer outputs
    node_by_name = {n.name: n for n in state.gm.graph.nodes}
    sites: list[list[Site]] = [[] for _ in groups]
    site_seen: set[tuple[int, str]] = set()
    candidates = [(n, a, "input") for n, a, _, _ in state.sites] + [(n, a, "output") for n, a in state.output_sites]
    for node_name, axis, site_kind in candidates:
        lab = state.labels.get(node_by_name[node_name])
        if not isinstance(lab, torch.Tensor):
            continue
        axis = axis % lab.dim()
        pt, lo = to_points(_channel_vector(lab, axis))
        for p in np.unique(pt[pt >= 0]).tolist():
            if (p, node_name) in site_seen:
                continue
            pos = np.nonzero(pt == p)[0]
            idx = replica_index(pos, lo[pos], dims[p])
            if idx is not None:
                sites[p].append(Site(node_name, axis, idx, site_kind))
                site_seen.add((p, node_name))

    for node_name, axis, wkey, bkey, rows in state.projected_sites:
        pt, lo = to_points(rows.numpy())
        for p in np.unique(pt[pt >= 0]).tolist():
            if not sites[p] or all(s.kind == "projected" for s in sites[p]):
                pos = np.nonzero(pt == p)[0]
                idx = replica_index(pos, lo[pos], dims[p])
                if idx is not None and (p, node_name + wkey) not in site_seen:
                    sites[p].append(Site(node_name, axis, idx, "projected", wkey, bkey))
                    site_seen.add((p, node_name + wkey))

    # every producer whose coordinates ended up in a point (residual streams have several)
    point_of_id = comp_point[comp[ids]]
    owner_of_id = np.searchsorted(np.asarray(starts), ids, side="right") - 1
    producer_sets: list[dict[str, None]] = [{} for _ in groups]
    for p, o in np.unique(np.stack([point_of_id, owner_of_id], 1), axis=0).tolist():
        if p >= 0:
            producer_sets[p][state.owners[o][2]] = None
    points = []
    for p, cs in enumerate(groups):
        first = owner(int(min_id[cs[0]]))
        producers = tuple([first] + [o for o in producer_sets[p] if o != first])
        points.append(
            MergePoint(
                name=names[p],
                dim=dims[p],
                kind=KINDS[p_rank[p]],
                reason=p_reason[p],
                io=p_io[p],
                producers=producers,
                sites=tuple(sites[p]),
            )
        )

    all_keys = list(state.param_shapes)
    unused = [k for k in all_keys if k not in state.touched]
    cls = type(model) if model is not None else None
    model_class = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else ""
    axes.sort(key=lambda a: (all_keys.index(a.tensor) if a.tensor in all_keys else len(all_keys), a.axis, a.block or ()))
    unused = [k for k in unused if k not in state.aliases]
    return MergeSpec(
        points=points, axes=axes, folds=list(state.folds), unused=unused, model_class=model_class,
        aliases={a: c for a, c in state.aliases.items()},
    )


def discover(gm: fx.GraphModule, example_inputs: Any, *, strict: bool = False, model: nn.Module | None = None) -> MergeSpec:
    """Discover the merge points of an already traced graph."""
    keys = set(model.state_dict(keep_vars=True)) if model is not None else None
    state = analyse(gm, example_inputs, strict=strict, keys=keys)
    return assemble(state, model if model is not None else gm)


def find_merge_points(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    strict: bool = False,
) -> MergeSpec:
    """Trace ``model`` and discover its merge points.

    Parameters
    ----------
    model : nn.Module
        Any model ``torch.fx`` can trace (with the escape hatches below). It is
        not modified.
    example_inputs : Tensor or tuple
        Positional inputs of one forward call; small inputs suffice, e.g. a
        ``(2, 3, 64, 64)`` batch for an image classifier.
    leaf_modules, autowrap_functions : sequence, optional
        Passed to :func:`autoalign.trace`.
    strict : bool, default False
        Raise :class:`autoalign.UnsupportedOpError` at the first op without a
        channel rule that touches features, instead of freezing what it touches.

    Returns
    -------
    MergeSpec
        Merge points (name, dim, kind, reason) and, for every parameter/buffer
        axis, the point and role it belongs to.

    Raises
    ------
    TraceError
        If the model cannot be traced.
    UnsupportedOpError
        With ``strict=True``, for an op without a channel rule.

    Examples
    --------
    A residual block makes the stem's and the block's output channels one merge
    point (the BatchNorm folds into its conv, so the point stays ``linear``); the
    logits are the model's output and stay frozen. Any torchvision classifier works
    the same way, e.g. ``find_merge_points(torchvision.models.resnet18(), x)``.

    >>> import torch, autoalign
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    ...         self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    ...         self.bn = torch.nn.BatchNorm2d(8)
    ...         self.head = torch.nn.Linear(8, 10)
    ...     def forward(self, x):
    ...         x = torch.relu(self.stem(x))
    ...         x = x + torch.relu(self.bn(self.conv(x)))    # a residual block
    ...         return self.head(x.mean((2, 3)))
    >>> spec = autoalign.find_merge_points(Net(), torch.randn(2, 3, 8, 8))
    >>> print(spec.table())
    name  dim  kind    tensors  reason
    stem    8  linear  9
    head   10  frozen  2        model output
    >>> spec.point("stem").producers, len(spec.folds), spec.coverage()
    (('stem', 'conv'), 1, 1.0)
    """
    gm = trace(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    return discover(gm, example_inputs, strict=strict, model=model)
