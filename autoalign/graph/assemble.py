"""Solving the relations recorded by the label analysis into a :class:`MergeSpec`.

Steps 2–4 of the algorithm in :mod:`autoalign.graph.discover`; :func:`assemble`
runs them in order:

2. :func:`_connected_components` — coordinates identified by the rules become one
   component;
3. :func:`_signatures`, :func:`_partition` — components that appear in exactly the
   same tensors and groups form one merge point;
4. :func:`_component_kinds`, :func:`_point_names`, :func:`_axis_roles`,
   :func:`_point_kinds`, :func:`_sites`, :func:`_producers`,
   :func:`_rotary_pairs`, :func:`_merge_points`, :func:`_spec` — each point's kind, name, parameter
   axes, observation sites and producers, and the spec itself.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ..spec import KINDS, AxisRole, MergePoint, MergeSpec, Site, kind_meet, kind_rank, replica_index
from .context import ZERO, LabelState

__all__ = ["assemble"]


@dataclass
class _Partition:
    """Coordinates grouped into components and components into merge points.

    Attributes
    ----------
    comp : ndarray of int
        Component of each coordinate id (index 0 is unused).
    ids : ndarray of int
        The coordinate ids ``1 .. next_id - 1``.
    min_id : ndarray of int
        Smallest coordinate id of each component (its producer order).
    groups : list of list of int
        The components of each merge point, points in producer order.
    comp_point, comp_local : ndarray of int
        Point of each component and its coordinate within the point (``-1``
        for components in no point).
    """

    comp: np.ndarray
    ids: np.ndarray
    min_id: np.ndarray
    groups: list[list[int]]
    comp_point: np.ndarray
    comp_local: np.ndarray

    @property
    def dims(self) -> list[int]:
        """Dimension of each point (its number of components)."""
        return [len(cs) for cs in self.groups]

    def to_points(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Point and coordinate within the point of each label (``-1`` for labels ``<= 0``)."""
        labels = np.asarray(labels)
        ok = labels > 0
        pt = np.full(labels.shape, -1, dtype=np.int64)
        lo = np.full(labels.shape, -1, dtype=np.int64)
        pt[ok] = self.comp_point[self.comp[labels[ok]]]
        lo[ok] = self.comp_local[self.comp[labels[ok]]]
        return pt, lo


def _channel_vector(lab: torch.Tensor, axis: int) -> np.ndarray:
    """The coordinate at each position of ``axis`` (``-1`` where it varies or is untracked)."""
    mat = lab.movedim(axis, -1).reshape(-1, lab.shape[axis])
    big = torch.iinfo(torch.int64).max
    hi = mat.max(0).values
    lo = torch.where(mat == ZERO, torch.full_like(mat, big), mat).min(0).values
    lo = torch.where(lo == big, hi, lo)
    vec = hi.clone()
    vec[(lo != hi) | (vec <= ZERO)] = -1
    return vec.numpy()


def _connected_components(state: LabelState) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 2: merge the coordinates identified by the rules (the edges) into components.

    Returns
    -------
    comp, ids, comps, min_id
        The component of each id, the ids ``1 ..``, the distinct components and
        the smallest id of each component.
    """
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
    return comp, ids, comps, min_id


def _signatures(state: LabelState, comp: np.ndarray, comps: np.ndarray) -> dict[int, tuple[int, ...]]:
    """Step 3, first half: the set of tensors and groups each component appears in."""
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
    return _joined_by_rotations(state, comp, sigs)


def _joined_by_rotations(state: LabelState, comp: np.ndarray, sigs: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    """Components that rotary embeddings rotate together get the union of their signatures,
    so that each rotated pair lands in one point (``rotate_half`` slices each pair apart;
    those slices feed only the rotary op, which the pair's rotation commutes with)."""
    if not state.rotations:
        return sigs
    links = np.unique(np.concatenate([comp[ids] for ids, _ in state.rotations]), axis=0)
    n = comp.max() + 1
    g = coo_matrix((np.ones(len(links), dtype=np.int8), (links[:, 0], links[:, 1])), shape=(n, n))
    _, cluster = connected_components(g, directed=False)
    joined: dict[int, set[int]] = defaultdict(set)
    for c, sig in sigs.items():
        joined[int(cluster[c])].update(sig)
    linked = set(links.reshape(-1).tolist())
    return {c: tuple(sorted(joined[int(cluster[c])])) if c in linked else sig for c, sig in sigs.items()}


def _partition(
    comp: np.ndarray, ids: np.ndarray, comps: np.ndarray, min_id: np.ndarray, sigs: dict[int, tuple[int, ...]]
) -> _Partition:
    """Step 3, second half: components with the same signature form one merge point.

    Points and the components within a point are ordered by their smallest id.
    """
    by_sig: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for c in sorted(comps.tolist(), key=lambda c: min_id[c]):
        by_sig[sigs[c]].append(c)
    groups = sorted(by_sig.values(), key=lambda cs: min_id[cs[0]])

    comp_point = np.full(comp.max() + 1, -1, dtype=np.int64)
    comp_local = np.full(comp.max() + 1, -1, dtype=np.int64)
    for p, cs in enumerate(groups):
        comp_point[cs] = p
        comp_local[cs] = np.arange(len(cs))
    return _Partition(comp, ids, min_id, groups, comp_point, comp_local)


def _component_kinds(state: LabelState, comp: np.ndarray) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """Step 4 (kinds): the most general kind the constraints on each component allow.

    Returns
    -------
    rank, reason, io
        The kind rank of each component, the reason of the constraint that set
        it (for restricted components) and whether it is a model input/output.
    """
    rank = np.full(comp.max() + 1, kind_rank("linear"), dtype=np.int64)
    reason: dict[int, str] = {}
    io = np.zeros(comp.max() + 1, dtype=bool)
    for arr, kind, why, is_io in state.constraints:
        cs = np.unique(comp[arr])
        met = kind_meet(rank[cs], kind_rank(kind))
        lower = met != rank[cs]
        for c, both in zip(cs[lower].tolist(), (met[lower] == 0).tolist()):
            reason[c] = f"{why}; and {reason[c]}" if both and c in reason else why
        rank[cs] = met
        if is_io:
            io[cs] = True
    return rank, reason, io


def _owner(state: LabelState, starts: list[int], i: int) -> str:
    """The name of the node that created coordinate ``i`` (``starts``: first id of each owner)."""
    k = bisect.bisect_right(starts, i) - 1
    return state.owners[k][2]


def _point_names(state: LabelState, part: _Partition, starts: list[int]) -> list[str]:
    """Step 4 (names): each point is named after the producer of its first coordinate;
    points sharing a producer get ``[0]``, ``[1]``, ... suffixes."""
    base_names = [_owner(state, starts, int(part.min_id[cs[0]])) for cs in part.groups]
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
    return names


def _axis_roles(state: LabelState, part: _Partition) -> list[AxisRole]:
    """Step 4 (parameter axes): the point and coordinate of every recorded parameter axis."""
    axes: list[AxisRole] = []
    for r in state.roles.values():
        pt, lo = part.to_points(r.labels.numpy())
        if np.all(pt < 0):
            continue
        axes.append(AxisRole(r.key, r.axis, r.role, pt, lo, r.block))
    return axes


def _meet_all(ranks: np.ndarray) -> int:
    """The meet (:func:`autoalign.spec.kind_meet`) of a non-empty array of kind ranks."""
    low = int(ranks.min())
    rest = ranks[ranks != low]
    return kind_meet(low, int(rest.min())) if rest.size else low


def _point_kinds(
    part: _Partition, rank: np.ndarray, reason: dict[int, str], io: np.ndarray, axes: list[AxisRole]
) -> tuple[list[int], list[str | None], list[bool]]:
    """Step 4 (kinds): the kind of each point, its most restricted component's, lowered by
    consistency checks on every axis (coordinates occurring unevenly freeze the point,
    per-channel tensors allow permutations only).

    Returns
    -------
    p_rank, p_reason, p_io
        Kind rank, reason and input/output flag of each point.
    """
    groups, dims = part.groups, part.dims
    p_rank = [_meet_all(rank[cs]) for cs in groups]
    p_reason: list[str | None] = []
    p_io: list[bool] = []
    for p, cs in enumerate(groups):
        worst = min(cs, key=lambda c: rank[c])
        why = reason.get(worst)
        if rank[worst] > p_rank[p]:  # rotary and permutation components in one point
            why = "; and ".join(dict.fromkeys(reason[c] for c in cs if c in reason))
        p_reason.append(why if p_rank[p] < kind_rank("linear") else None)
        p_io.append(bool(io[cs].any()) and p_rank[p] == 0)
    for ax in axes:
        for p in ax.points():
            pos = np.nonzero(ax.point_of == p)[0]
            if replica_index(pos, ax.local_of[pos], dims[p]) is None and p_rank[p] > 0:
                p_rank[p] = 0
                p_reason[p] = f"coordinates occur unevenly along {ax.tensor} axis {ax.axis}"
            met = kind_meet(p_rank[p], kind_rank("permutation"))
            if ax.role == "channel" and met != p_rank[p]:
                p_reason[p] = f"per-channel tensor {ax.tensor}" + (f"; and {p_reason[p]}" if met == 0 else "")
                p_rank[p] = met
    return p_rank, p_reason, p_io


def _rotary_pairs(
    state: LabelState, part: _Partition, p_rank: list[int], p_reason: list[str | None]
) -> list[tuple[tuple[int, int], ...]]:
    """Step 4 (rotary points): the coordinate pairs of each ``rotary`` point, from the pairs the
    rotary rule recorded. A point whose pairs overlap, or a pair split across two points,
    freezes (``p_rank`` and ``p_reason`` are updated in place).

    Returns
    -------
    list of tuple of (int, int)
        Per point its sorted local coordinate pairs; empty for points of other kinds.
    """
    found: list[set[tuple[int, int]]] = [set() for _ in part.groups]
    for ids, why in state.rotations:
        pt, lo = part.to_points(ids)
        for (p, q), (i, j) in zip(pt.tolist(), lo.tolist()):
            if p < 0 or q < 0:
                continue
            if p != q:
                for r in (p, q):
                    p_rank[r], p_reason[r] = 0, f"{why}: a rotated pair spans two merge points"
                continue
            found[p].add((min(i, j), max(i, j)))
    out: list[tuple[tuple[int, int], ...]] = []
    for p, pairs in enumerate(found):
        if p_rank[p] != kind_rank("rotary"):
            out.append(())
            continue
        flat = [c for pair in pairs for c in pair]
        if len(set(flat)) != len(flat):
            p_rank[p], p_reason[p] = 0, f"{p_reason[p]}: a coordinate is rotated with two different partners"
            out.append(())
            continue
        out.append(tuple(sorted(pairs)))
    return out


def _sites(state: LabelState, part: _Partition) -> list[list[Site]]:
    """Step 4 (sites): where each point's features can be observed — consumer inputs
    first, then producer outputs, then projections inside opaque ops (only for points
    that have no other site)."""
    dims = part.dims
    node_by_name = {n.name: n for n in state.gm.graph.nodes}
    sites: list[list[Site]] = [[] for _ in part.groups]
    site_seen: set[tuple[int, str]] = set()
    candidates = [(n, a, "input") for n, a, _, _ in state.sites] + [(n, a, "output") for n, a in state.output_sites]
    for node_name, axis, site_kind in candidates:
        lab = state.labels.get(node_by_name[node_name])
        if not isinstance(lab, torch.Tensor):
            continue
        axis = axis % lab.dim()
        pt, lo = part.to_points(_channel_vector(lab, axis))
        for p in np.unique(pt[pt >= 0]).tolist():
            if (p, node_name) in site_seen:
                continue
            pos = np.nonzero(pt == p)[0]
            idx = replica_index(pos, lo[pos], dims[p])
            if idx is not None:
                sites[p].append(Site(node_name, axis, idx, site_kind))
                site_seen.add((p, node_name))

    for node_name, axis, wkey, bkey, rows in state.projected_sites:
        pt, lo = part.to_points(rows.numpy())
        for p in np.unique(pt[pt >= 0]).tolist():
            if not sites[p] or all(s.kind == "projected" for s in sites[p]):
                pos = np.nonzero(pt == p)[0]
                idx = replica_index(pos, lo[pos], dims[p])
                if idx is not None and (p, node_name + wkey) not in site_seen:
                    sites[p].append(Site(node_name, axis, idx, "projected", wkey, bkey))
                    site_seen.add((p, node_name + wkey))
    return sites


def _producers(state: LabelState, part: _Partition, starts: list[int]) -> list[tuple[str, ...]]:
    """Step 4 (producers): every producer whose coordinates ended up in each point
    (residual streams have several), the producer of the first coordinate first."""
    point_of_id = part.comp_point[part.comp[part.ids]]
    owner_of_id = np.searchsorted(np.asarray(starts), part.ids, side="right") - 1
    producer_sets: list[dict[str, None]] = [{} for _ in part.groups]
    for p, o in np.unique(np.stack([point_of_id, owner_of_id], 1), axis=0).tolist():
        if p >= 0:
            producer_sets[p][state.owners[o][2]] = None
    out = []
    for p, cs in enumerate(part.groups):
        first = _owner(state, starts, int(part.min_id[cs[0]]))
        out.append(tuple([first] + [o for o in producer_sets[p] if o != first]))
    return out


def _merge_points(
    part: _Partition,
    names: list[str],
    p_rank: list[int],
    p_reason: list[str | None],
    p_io: list[bool],
    sites: list[list[Site]],
    producers: list[tuple[str, ...]],
    pairs: list[tuple[tuple[int, int], ...]],
) -> list[MergePoint]:
    """Step 4: the :class:`MergePoint` of each point from the per-point results."""
    dims = part.dims
    return [
        MergePoint(
            name=names[p],
            dim=dims[p],
            kind=KINDS[p_rank[p]],
            reason=p_reason[p],
            io=p_io[p],
            producers=producers[p],
            sites=tuple(sites[p]),
            pairs=pairs[p],
        )
        for p in range(len(part.groups))
    ]


def _spec(state: LabelState, model: nn.Module | None, points: list[MergePoint], axes: list[AxisRole]) -> MergeSpec:
    """Step 4 (the spec): points, parameter axes in state-dict order, folds, the
    tensors the graph never reaches, the model class and tied-parameter aliases."""
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


def assemble(state: LabelState, model: nn.Module | None = None) -> MergeSpec:
    """Solve the recorded relations into a :class:`MergeSpec` (steps 2–4 of
    :mod:`autoalign.graph.discover`).

    Parameters
    ----------
    state : LabelState
        The result of :func:`autoalign.graph.analyse.analyse`.
    model : nn.Module, optional
        The model (or traced graph) whose class the spec records.

    Returns
    -------
    MergeSpec
    """
    comp, ids, comps, min_id = _connected_components(state)
    part = _partition(comp, ids, comps, min_id, _signatures(state, comp, comps))
    rank, reason, io = _component_kinds(state, comp)
    starts = [o[0] for o in state.owners]
    names = _point_names(state, part, starts)
    axes = _axis_roles(state, part)
    p_rank, p_reason, p_io = _point_kinds(part, rank, reason, io, axes)
    pairs = _rotary_pairs(state, part, p_rank, p_reason)
    sites = _sites(state, part)
    producers = _producers(state, part, starts)
    points = _merge_points(part, names, p_rank, p_reason, p_io, sites, producers, pairs)
    return _spec(state, model, points, axes)
