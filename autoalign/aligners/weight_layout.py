"""How weight matching indexes a spec's tensors: :class:`WeightLayout` knows which axes of
which tensors hold each active merge point, and moves tensors by permutations
(as index gathers, in the conventions of :func:`autoalign.transform_state_dict`)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from ..spec import AxisRole, MergeSpec
from ..spec.parts import index_along

__all__ = ["WeightLayout", "Key", "Perms"]

#: ``(tensor, axis, block)``: one gather along one axis of one tensor (or block of it).
Key = tuple[str, int, "tuple[int, int, int] | None"]
#: Per active point index, its permutation ``perm`` (shape (d,)).
Perms = dict[int, torch.Tensor]


class WeightLayout:
    """Precomputed indexing of a spec: which tensor axes hold which active point.

    Attributes
    ----------
    active : list of int
        Indices of the non-frozen merge points.
    keys : dict of str to list of key
        Per tensor, its ``(tensor, axis, block)`` gather keys in the order
        :func:`autoalign.transform_state_dict` applies them.
    entries : dict of key to list of AxisRole
        The axis roles behind each key.
    touching : dict of int to list of (AxisRole, Tensor)
        Per active point, the axis roles holding it with the point's positions,
        shape ``(R, d)``.
    tensors : list of str
        The floating-point tensors the objective involves (all but ``exclude``).
    """

    def __init__(self, spec: MergeSpec, sd: dict[str, torch.Tensor], exclude: Collection[str] = ()) -> None:
        skip = frozenset(exclude)
        self.spec = spec
        # rotary points allow no permutation but the identity: fixed, like frozen ones
        self.active = [i for i, p in enumerate(spec.points) if p.kind not in ("frozen", "rotary")]
        act = set(self.active)
        self.keys: dict[str, list[Key]] = {}
        self.entries: dict[Key, list[AxisRole]] = {}
        self.touching: dict[int, list[tuple[AxisRole, torch.Tensor]]] = {i: [] for i in self.active}
        self.index: dict[tuple[int, int], torch.Tensor] = {}
        for ax in spec.axes:
            t = sd.get(ax.tensor)
            if t is None or not torch.is_floating_point(t) or ax.tensor in skip:
                continue
            pts = [p for p in ax.points() if p in act]
            if not pts:
                continue
            key = (ax.tensor, ax.axis, ax.block)
            if key not in self.entries:
                self.entries[key] = []
                self.keys.setdefault(ax.tensor, []).append(key)
            self.entries[key].append(ax)
            for p in pts:
                idx = torch.as_tensor(ax.index(p, spec.points[p].dim))
                self.index[(id(ax), p)] = idx
                self.touching[p].append((ax, idx))
        self.tensors = list(self.keys)
        # an in-place update of one point along one axis commutes with the other gathers of
        # the tensor unless a block restricted to part of that axis cuts through the point
        self.incremental: dict[tuple[int, int], bool] = {}
        for p in self.active:
            for ax, idx in self.touching[p]:
                pos = idx.reshape(-1)
                ok = True
                for key in self.keys[ax.tensor]:
                    blk = key[2]
                    if blk is not None and blk[0] == ax.axis:
                        inside = (pos >= blk[1]) & (pos < blk[2])
                        ok &= bool(inside.all()) or not bool(inside.any())
                self.incremental[(id(ax), p)] = ok
        # points whose similarity depends on a point's permutation: those sharing a tensor with it
        # (itself included when it occurs on two axes of one tensor)
        on_tensor: dict[str, list[tuple[int, int]]] = {}
        for p in self.active:
            for ax, _ in self.touching[p]:
                on_tensor.setdefault(ax.tensor, []).append((id(ax), p))
        self.neighbours: dict[int, set[int]] = {p: set() for p in self.active}
        for occ in on_tensor.values():
            for e1, q in occ:
                for e2, p in occ:
                    if (e1, q) != (e2, p):
                        self.neighbours[q].add(p)

    def gather_index(self, key: Key, perms: Perms, skip: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Index along ``key``'s axis moving every point's coordinates by its permutation.

        Position ``idx[r, i]`` takes the value at ``idx[r, perm[i]]``. ``skip`` is an
        ``(id(axis role), point)`` pair left unpermuted. Returns ``None`` for the identity.
        """
        full: torch.Tensor | None = None
        for ax in self.entries[key]:
            for p in ax.points():
                perm = perms.get(p)
                if perm is None or (id(ax), p) == skip:
                    continue
                idx = self.index[(id(ax), p)]
                if full is None:
                    full = torch.arange(ax.size)
                full[idx.reshape(-1)] = idx[:, perm].reshape(-1)
        return full

    def permuted(self, name: str, t: torch.Tensor, perms: Perms, skip: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` of one model with all current permutations applied (``skip`` excepted)."""
        own = False  # whether ``t`` is a new tensor already (safe to write into)
        for key in self.keys[name]:
            index = self.gather_index(key, perms, skip)
            if index is None:
                continue
            _, axis, block = key
            t = index_along(t, axis, block, index)
            own = True
        return t if own else t.clone()

    def repermute(self, t: torch.Tensor, ax: AxisRole, idx: torch.Tensor, rel: torch.Tensor) -> None:
        """Update a fully permuted tensor in place after one point's permutation changed.

        ``rel = old⁻¹[new]``: coordinate ``i`` now takes what coordinate ``rel[i]`` held.
        """
        x = ax.axis_major(t)
        dst = idx.reshape(-1).to(t.device)
        src = idx[:, rel].reshape(-1).to(t.device)
        x[dst] = x[src].clone()

    def rows(self, ax: AxisRole, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``t``'s slices at the point's coordinates, shape ``(d, R·K)``.

        ``K`` is the number of entries of the (block of the) tensor per position
        along the axis; replicas are laid side by side so that a product of two
        such matrices sums over them.
        """
        r, d = idx.shape
        return ax.gather(t, idx).transpose(0, 1).reshape(d, -1)

    def permute_all(self, sd: dict[str, torch.Tensor], perms: Perms) -> dict[str, torch.Tensor]:
        """All objective tensors of one model, fully permuted."""
        return {k: self.permuted(k, sd[k], perms) for k in self.tensors}
