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

__all__ = ["PRODUCER_TYPES", "repair_sites", "site_maps"]

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
    by_tensor: dict[str, list[Any]] = {}
    for ax in spec.axes:
        if ax.axis == 0 and ax.role in ("output", "channel", "folded"):
            by_tensor.setdefault(ax.tensor, []).append(ax)
    maps: list[dict[str, torch.Tensor]] = [{} for _ in transforms]
    mapped, rest = [], []
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
                pname = spec.points[point].name
                for m, tr in enumerate(transforms):
                    if pname in tr:
                        maps[m][name] = tr[pname][0]
                mapped.append(name)
                continue
        rest.append(name)
    return maps, mapped, rest
