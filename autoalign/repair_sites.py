"""Where repair acts, read from the merge spec.

:func:`repair_sites` lists the modules REPAIR corrects (producers of non-frozen merge
points, and BatchNorm layers); :func:`site_maps` says which of them can be measured
*layerwise* — each model's own output mapped into merged coordinates by its merge
matrix — and with which matrices (see :mod:`autoalign.repair`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .spec import MergeSpec
    from .stats import PointStats

__all__ = ["PRODUCER_TYPES", "repair_sites", "site_maps", "site_points", "mapped_moments", "permutation_index"]

#: Module types whose output channels REPAIR corrects by rescaling weight and bias.
PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def repair_sites(model: nn.Module, spec: "MergeSpec") -> tuple[list[str], list[str]]:
    """Where REPAIR acts: producer modules and BatchNorm layers of non-frozen merge points.

    Producers are the ``nn.Linear`` / ``nn.Conv{1,2,3}d`` modules whose output
    channels belong to a merge point that is not frozen, except those feeding a
    BatchNorm that the spec can fold (that BatchNorm is repaired instead).

    Parameters
    ----------
    model : nn.Module
        The (merged) model.
    spec : MergeSpec
        Its merge spec.

    Returns
    -------
    producers : list of str
        Module names of the producers to correct.
    batchnorms : list of str
        Module names of the BatchNorm layers whose affine gets the targets.

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.repair import repair_sites
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
    ...                           torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> repair_sites(net, autoalign.find_merge_points(net, torch.randn(2, 4)))
    (['0'], ['3'])
    """
    live = {i for i, p in enumerate(spec.points) if p.kind != "frozen"}
    touched: dict[str, set[str]] = {}
    for a in spec.axes:
        if a.axis == 0 and any(int(i) in live for i in a.point_of):
            touched.setdefault(a.tensor, set()).add(a.role)
    folded_producers = {f.producer_weight for f in spec.folds}
    producers, bns = [], []
    for name, mod in model.named_modules():
        key = f"{name}.weight"
        key = spec.aliases.get(key, key)
        if isinstance(mod, PRODUCER_TYPES):
            if "output" in touched.get(key, ()) and key not in folded_producers:
                producers.append(name)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and mod.track_running_stats:
            if touched.get(key) or touched.get(f"{name}.running_mean"):
                bns.append(name)
    return producers, bns


def site_maps(
    spec: "MergeSpec",
    names: Sequence[str],
    transforms: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]],
) -> tuple[list[dict[str, torch.Tensor]], list[str], list[str]]:
    """Which repair sites can be measured layerwise, and with which matrices.

    A site (a producer or BatchNorm module) is *mapped* when its output channels are
    exactly one merge point's coordinates in order; then model ``m``'s output there,
    in merged coordinates, is ``P_m y`` with ``P_m`` that point's merge matrix.
    Other sites (channels split over several points, grouped blocks) are measured
    on the aligned models instead.

    Parameters
    ----------
    spec : MergeSpec
        The merge spec.
    names : sequence of str
        Module names of the repair sites.
    transforms : sequence of dict of str to (Tensor (d, d), Tensor (d, d))
        Per model, ``{point: (merge, unmerge)}`` (``Plan.transforms_for``); a point
        missing from it keeps its coordinates.

    Returns
    -------
    maps : list of dict of str to Tensor (d, d)
        Per model, the merge matrix of each mapped site (absent: identity).
    mapped : list of str
        Sites measured layerwise on the original models.
    rest : list of str
        Sites measured on the aligned models.

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.repair import site_maps
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> spec = autoalign.find_merge_points(net, torch.randn(2, 4))
    >>> p = torch.eye(3)[[2, 0, 1]]
    >>> maps, mapped, rest = site_maps(spec, ["0"], [{}, {"0": (p, p.T)}])
    >>> mapped, rest, torch.equal(maps[1]["0"], p), maps[0]
    (['0'], [], True, {})
    """
    points, rest = site_points(spec, names)
    maps: list[dict[str, torch.Tensor]] = [{} for _ in transforms]
    for name, pname in points.items():
        for m, tr in enumerate(transforms):
            if pname in tr:
                maps[m][name] = tr[pname][0]
    return maps, list(points), rest


def site_points(spec: "MergeSpec", names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The sites whose output channels are exactly one merge point's coordinates, in order.

    Returns
    -------
    points : dict of str to str
        Site (module name) → the merge point it is, in the order of ``names``.
    rest : list of str
        The other sites.

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.repair_sites import site_points
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> site_points(autoalign.find_merge_points(net, torch.randn(2, 4)), ["0", "2"])
    ({'0': '0', '2': '2'}, [])
    """
    by_tensor: dict[str, list[Any]] = {}
    for ax in spec.axes:
        if ax.axis == 0 and ax.role in ("output", "channel", "folded"):
            by_tensor.setdefault(ax.tensor, []).append(ax)
    points: dict[str, str] = {}
    rest = []
    for name in names:
        axes = [ax for key in (f"{name}.weight", f"{name}.bias", f"{name}.running_mean")
                for ax in by_tensor.get(spec.aliases.get(key, key), [])]
        point = None
        for ax in axes:
            pts = ax.points()
            if len(pts) != 1 or ax.block is not None:
                break
            dim = spec.points[pts[0]].dim
            if ax.size != dim or not bool((ax.local_of == torch.arange(dim).numpy()).all()):
                break
            if point is not None and point != pts[0]:
                break
            point = pts[0]
        else:
            if point is not None:
                points[name] = spec.points[point].name
                continue
        rest.append(name)
    return points, rest


def mapped_moments(ps: "PointStats", maps: Sequence[torch.Tensor | None], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """REPAIR's target at a mapped site from each model's moments of its output there.

    Model ``m``'s output in merged coordinates is ``P_m y``: its mean is ``P_m μ_m`` and
    its variances ``diag(P_m C_m P_mᵀ)``. The target is ``(Σ_m w_m P_m μ_m, Σ_m w_m σ_m)``
    (as :func:`autoalign.repair.output_channel_stats` measures it with ``maps``).

    Parameters
    ----------
    ps : PointStats
        The site's moments, per model (full covariances, or variances only).
    maps : sequence of Tensor (C, C) or None
        Per model, the site's merge matrix ``P_m`` (None: identity).
    weights : sequence of float
        Per-model weights (normalised here).

    Returns
    -------
    (Tensor (C,), Tensor (C,)) or None
        Mean and std (float64); None when a dense map meets variances only.

    Examples
    --------
    >>> import torch
    >>> from autoalign.stats import PointStats
    >>> y = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    >>> ps = PointStats(2, [y.sum(0), y.sum(0)], [y.T @ y, y.T @ y])
    >>> swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> mean, std = mapped_moments(ps, [None, swap], [1.0, 1.0])
    >>> mean.tolist(), std.tolist()
    ([2.0, 2.0], [1.5, 1.5])
    """
    total = float(sum(weights))
    mean = std = None
    for m, (wm, pm) in enumerate(zip(weights, maps)):
        mu = ps.mean(m)
        perm = None if pm is None else permutation_index(pm)
        if pm is None or perm is not None:
            var = ps.var(m)
            if perm is not None:
                mu, var = mu[perm.to(mu.device)], var[perm.to(var.device)]
        elif ps.squares[m].dim() == 2:
            p64 = pm.detach().to(device=mu.device, dtype=torch.float64)
            mu, var = p64 @ mu, ((p64 @ ps.cov(m)) * p64).sum(1)
        else:
            return None
        s = torch.sqrt(torch.clamp(var, min=0.0))
        w = float(wm) / total
        mean = w * mu if mean is None else mean + w * mu
        std = w * s if std is None else std + w * s
    if mean is None or std is None:
        return None
    return mean, std


def permutation_index(p: torch.Tensor) -> torch.Tensor | None:
    """``perm`` with ``p = eye[perm]`` when ``p`` is a permutation matrix, else ``None``.

    Examples
    --------
    >>> import torch
    >>> permutation_index(torch.eye(3)[[2, 0, 1]]).tolist(), permutation_index(2 * torch.eye(2))
    ([2, 0, 1], None)
    """
    if p.dim() != 2 or p.shape[0] != p.shape[1]:
        return None
    perm = p.argmax(1)
    if not bool((p == 0).logical_or(p == 1).all()) or not torch.equal(p.sum(1), torch.ones_like(p[:, 0])):
        return None
    if not torch.equal(torch.sort(perm).values, torch.arange(p.shape[0], device=p.device)):
        return None
    return perm.cpu()
