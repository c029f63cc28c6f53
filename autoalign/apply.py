"""Plans to weights: the one generic place that touches parameters.

Given a :class:`~autoalign.spec.MergeSpec` and, per merge point, a ``merge``
matrix ``M`` (model coordinates → merged coordinates) and an ``unmerge`` matrix
``U`` (merged → model), every parameter axis moves by its role:

* ``output``, ``channel``, ``additive``: ``W <- M W`` along the axis,
* ``input``: ``W <- W U`` along the axis (for each replica after ``flatten``),
* ``folded``: BatchNorm vectors already folded into their producer (left alone).

BatchNorm layers listed in ``spec.folds`` are first folded into their producer
(exact in eval mode), so a dense ``M`` is valid for them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, MutableMapping, Sequence

import torch

from .errors import SpecError
from .spec import AxisRole, FoldedNorm, MergeSpec
from .spec.parts import index_along

__all__ = ["fold_batchnorm", "folds_needed", "transform_state_dict", "average_state_dicts"]

Transform = tuple[torch.Tensor, torch.Tensor]


def fold_points(spec: MergeSpec, fold: FoldedNorm) -> set[int]:
    """Indices of the merge points holding the output rows of a fold's producer."""
    out: set[int] = set()
    for ax in spec.axes:
        if ax.tensor == fold.producer_weight and ax.role == "output":
            out.update(ax.points())
    return out


def folds_needed(spec: MergeSpec, transforms: Sequence[Mapping[str, Transform]]) -> list[FoldedNorm]:
    """The BatchNorm folds a set of transforms needs: those whose merge point gets
    a transform that is not a permutation in at least one model."""
    dense: set[int] = set()
    for tr in transforms:
        for name, (m, _) in tr.items():
            if _as_permutation(m.detach().cpu().double()) is None:
                dense.add(spec.index_of(name))
    return [f for f in spec.folds if fold_points(spec, f) & dense]


def fold_batchnorm(
    state_dict: Mapping[str, torch.Tensor], spec: MergeSpec, folds: Sequence[FoldedNorm] | None = None
) -> dict[str, torch.Tensor]:
    """Fold BatchNorm layers into their producers (a new state dict).

    ``folds`` defaults to all of ``spec.folds``.

    The producer becomes ``W' = diag(s) W`` with ``s = gamma / sqrt(var + eps)``; the
    BatchNorm becomes an identity normalisation (weight 1, running mean 0, running
    variance ``1 - eps``) whose bias holds ``s (b - mean) + beta``; the producer's
    own bias, if any, becomes 0. In eval mode the function is unchanged.

    Examples
    --------
    >>> import copy, torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> _ = torch.nn.init.uniform_(net[1].weight)
    >>> _ = net[1].running_var.uniform_(0.5, 2.0)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> spec = autoalign.find_merge_points(net, x)
    >>> folded = copy.deepcopy(net)
    >>> folded.load_state_dict(autoalign.fold_batchnorm(net.state_dict(), spec))
    <All keys matched successfully>
    >>> folded[1].weight.tolist(), folded[1].running_mean.tolist()
    ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    >>> torch.allclose(net(x), folded(x), atol=1e-5)
    True
    """
    sd = dict(state_dict)
    for f in spec.folds if folds is None else folds:
        try:
            w = sd[f.producer_weight].double()
            mean, var = sd[f.running_mean].double(), sd[f.running_var].double()
        except KeyError as exc:
            raise SpecError(f"BatchNorm fold refers to {exc.args[0]!r}, which is not in the state dict") from None
        gamma = sd[f.weight].double() if f.weight else torch.ones_like(mean)
        beta = sd[f.bias].double() if f.bias else torch.zeros_like(mean)
        b = sd[f.producer_bias].double() if f.producer_bias else torch.zeros_like(mean)
        s = gamma / torch.sqrt(var + f.eps)
        dt = sd[f.producer_weight].dtype
        shape = [1] * w.dim()
        shape[f.producer_axis] = -1
        sd[f.producer_weight] = (w * s.reshape(shape)).to(dt)
        if f.weight:
            sd[f.weight] = torch.ones_like(sd[f.weight])
        offset = s * (b - mean) + beta
        sd[f.running_var] = torch.full_like(sd[f.running_var], 1.0 - f.eps)
        if f.bias:  # the offset goes to the BatchNorm's bias ...
            if f.producer_bias:
                sd[f.producer_bias] = torch.zeros_like(sd[f.producer_bias])
            sd[f.bias] = offset.to(sd[f.bias].dtype)
            sd[f.running_mean] = torch.zeros_like(sd[f.running_mean])
        elif f.producer_bias:  # ... or (affine=False) to the producer's bias ...
            sd[f.producer_bias] = offset.to(sd[f.producer_bias].dtype)
            sd[f.running_mean] = torch.zeros_like(sd[f.running_mean])
        else:  # ... or to the running mean, which the BatchNorm subtracts
            sd[f.running_mean] = (-offset).to(sd[f.running_mean].dtype)
    return sd


def _as_permutation(mat: torch.Tensor) -> torch.Tensor | None:
    """``perm`` with ``mat == eye[perm]`` when ``mat`` is a permutation matrix, else None."""
    if not bool(((mat == 0) | (mat == 1)).all()):
        return None
    if not (bool((mat.sum(0) == 1).all()) and bool((mat.sum(1) == 1).all())):
        return None
    return mat.argmax(1)


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a dense transform of a ``dtype`` tensor is computed in: float32 for
    float32 and half-precision tensors, float64 for float64 ones. Float32 halves the cost
    of float64 products; on a resnet18 under random dense maps the largest relative
    difference of a transformed tensor was 3.2e-7, a few float32 roundings."""
    return torch.promote_types(dtype, torch.float32)


def _apply_axis(t: torch.Tensor, ax: AxisRole, idx: torch.Tensor, mat: torch.Tensor) -> None:
    """Apply one point's dense matrix along one axis of ``t`` (in place)."""
    view = ax.block_of(t)
    r, d = idx.shape
    mat = mat.to(device=t.device, dtype=t.dtype)
    if r == 1 and d == view.shape[ax.axis] and bool((idx[0] == torch.arange(d)).all()):
        # the point is the whole axis, in order (most layers): one product, no gather or scatter
        if ax.role == "input":
            x = view.movedim(ax.axis, -1)
            x.copy_(x @ mat)
        else:
            x = ax.axis_major(t)
            x.copy_((mat @ x.reshape(d, -1)).reshape(x.shape))
        return
    flat = idx.reshape(-1).to(t.device)
    if ax.role == "input":
        x = view.movedim(ax.axis, -1)
        g = x[..., flat].reshape(*x.shape[:-1], r, d)
        x[..., flat] = (g @ mat).reshape(*x.shape[:-1], r * d)
    else:
        x = ax.axis_major(t)
        x[flat] = torch.einsum("ij,rjk->rik", mat, ax.gather(t, idx)).reshape(r * d, *x.shape[1:])


def _gather_index(ax: AxisRole, idx: torch.Tensor, src: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
    """Compose a permutation of one point into a full index along the axis.

    ``src[j]`` is the point coordinate whose values move to coordinate ``j``.
    """
    full = torch.arange(ax.size) if current is None else current
    new = full.clone()
    new[idx.reshape(-1)] = full[idx[:, src].reshape(-1)]
    return new


def transform_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: MergeSpec,
    transforms: Mapping[str, Transform],
    *,
    folds: Sequence[FoldedNorm] | None = None,
) -> dict[str, torch.Tensor]:
    """Move one model's weights into merged coordinates.

    Parameters
    ----------
    state_dict : mapping of str to Tensor
        The model's state dict (not modified).
    spec : MergeSpec
        The architecture's merge spec.
    transforms : mapping of point name to (merge, unmerge)
        ``merge`` has shape ``(d, d)`` and maps the model's coordinates into the
        merged ones; ``unmerge`` has shape ``(d, d)`` and maps back (for a single
        model, ``unmerge = merge^{-1}``). Points not listed are left as they are.
    folds : sequence of FoldedNorm, optional
        BatchNorm layers to fold into their producers first (default: those whose
        point gets a transform that is not a permutation). A BatchNorm that is not
        folded has its vectors permuted like any per-channel tensor; when several
        models are merged, pass the same ``folds`` for all of them (see
        :func:`folds_needed`).

    Returns
    -------
    dict of str to Tensor
        A new state dict, BatchNorm folded where the spec says so, every listed
        point's axes transformed, dtypes preserved.

    Raises
    ------
    SpecError
        If a transform names an unknown or frozen point, or has the wrong shape.

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(5, 3))
    >>> P = torch.eye(4)[[2, 0, 3, 1]]
    >>> sd = autoalign.transform_state_dict(net.state_dict(), spec, {"0": (P, P.T)})
    >>> torch.equal(sd["0.weight"], P @ net.state_dict()["0.weight"])
    True
    """
    mats: dict[int, Transform] = {}
    perms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (m, u) in transforms.items():
        i = spec.index_of(name)
        p = spec.points[i]
        if p.kind == "frozen":
            raise SpecError(f"merge point {name!r} is frozen ({p.reason}); it takes no transform")
        for what, t in (("merge", m), ("unmerge", u)):
            if tuple(t.shape) != (p.dim, p.dim):
                raise SpecError(f"{what} matrix of merge point {name!r} has shape {tuple(t.shape)}, expected ({p.dim}, {p.dim})")
        # dense maps stay where the plan was solved (e.g. the GPU) and meet each tensor on its device
        mats[i] = (m.detach().to(torch.float64), u.detach().to(torch.float64))
        pm, pu = _as_permutation(mats[i][0].cpu()), _as_permutation(mats[i][1].cpu())
        if pm is not None and pu is not None:
            # (P x)_i = x[pm[i]]; (g U)[..., j] = g[..., k] with U[k, j] = 1
            perms[i] = (pm, mats[i][1].cpu().argmax(0))
    if folds is None:
        folds = folds_needed(spec, [transforms])
    sd = fold_batchnorm(state_dict, spec, folds) if folds else dict(state_dict)
    folded_keys = {k for f in folds for k in (f.weight, f.running_mean, f.running_var) if k}
    work: dict[str, torch.Tensor] = {}
    # permutations are gathered with one index per (tensor, axis, block); dense
    # transforms are applied on the tensor's device, in float32 for float32 (and
    # half-precision) tensors, in float64 for float64 ones (product_dtype)
    gathers: dict[tuple[str, int, tuple[int, int, int] | None], torch.Tensor] = {}
    for ax in spec.axes:
        if ax.role == "folded" and ax.tensor in folded_keys:
            continue
        for p in ax.points():
            if p not in mats:
                continue
            if ax.tensor not in sd:
                raise SpecError(f"the spec names {ax.tensor!r}, which is not in the state dict")
            if sd[ax.tensor].shape[ax.axis] != ax.size:
                raise SpecError(
                    f"{ax.tensor} axis {ax.axis} has size {sd[ax.tensor].shape[ax.axis]} but the spec expects {ax.size}"
                )
            idx = torch.as_tensor(ax.index(p, spec.points[p].dim))
            if p in perms:
                src = perms[p][1] if ax.role == "input" else perms[p][0]
                key = (ax.tensor, ax.axis, ax.block)
                gathers[key] = _gather_index(ax, idx, src, gathers.get(key))
                continue
            if ax.tensor not in work:
                work[ax.tensor] = sd[ax.tensor].detach().to(product_dtype(sd[ax.tensor].dtype), copy=True)
            m, u = mats[p]
            _apply_axis(work[ax.tensor], ax, idx, u if ax.role == "input" else m)
    for k, v in work.items():
        sd[k] = v.to(dtype=state_dict[k].dtype, device=state_dict[k].device)
    for (k, axis, block), index in gathers.items():
        sd[k] = index_along(sd[k], axis, block, index)
    for alias, canonical in spec.aliases.items():
        if alias in sd and canonical in sd:
            sd[alias] = sd[canonical]
    return _with_metadata(sd, state_dict)


def _with_metadata(sd: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Keep ``like``'s key order and its ``_metadata`` (module versions that some
    modules' ``_load_from_state_dict`` need, e.g. torchvision's MNASNet)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict((k, sd[k]) for k in like if k in sd)
    meta = getattr(like, "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts with identical keys and shapes.

    Floating-point tensors are averaged with ``weights`` (uniform by default,
    normalised to sum to one); integer tensors (e.g. ``num_batches_tracked``) are
    taken from the first state dict.

    Parameters
    ----------
    state_dicts : sequence of mapping of str to Tensor
        At least one state dict; all with the keys and shapes of the first.
    weights : sequence of float, optional
        One non-negative weight per state dict (normalised here).

    Returns
    -------
    dict of str to Tensor
        A new state dict with the first one's key order and dtypes.

    Raises
    ------
    ValueError
        For an empty list or a wrong number of weights.

    Examples
    --------
    >>> import torch, autoalign
    >>> a = {"w": torch.tensor([0.0, 2.0]), "steps": torch.tensor(3)}
    >>> b = {"w": torch.tensor([2.0, 4.0]), "steps": torch.tensor(5)}
    >>> dict(autoalign.average_state_dicts([a, b]))
    {'w': tensor([1., 3.]), 'steps': tensor(3)}
    >>> autoalign.average_state_dicts([a, b], weights=[3, 1])["w"]
    tensor([0.5000, 2.5000])
    """
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    n = len(state_dicts)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n,):
        raise ValueError(f"weights has {w.numel()} entries for {n} state dicts")
    w = w / w.sum()
    out: MutableMapping[str, torch.Tensor] = {}
    for k, v0 in state_dicts[0].items():
        if torch.is_floating_point(v0):
            acc = torch.zeros(v0.shape, dtype=torch.float64, device=v0.device)
            for wi, sd in zip(w.tolist(), state_dicts):
                acc.add_(sd[k].detach(), alpha=wi)  # promoted to float64 in the kernel: no temporaries
            out[k] = acc.to(v0.dtype)
        else:
            out[k] = v0.clone()
    return _with_metadata(out, state_dicts[0])
