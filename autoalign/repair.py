"""Repair after merging: merged models lose activation variance.

``reset_bn`` re-estimates every BatchNorm's running statistics on calibration data
(the merged weights no longer match the averaged statistics).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import MergeError
from .stats import default_input_fn
from .trace import as_input_tuple

__all__ = ["reset_bn", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def reset_bn(
    model: nn.Module,
    data: Iterable[Any],
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``data`` (in place; returns ``model``).

    Statistics are reset and recomputed as the exact average over the batches
    (``momentum=None``); only BatchNorm layers run in training mode, so dropout
    stays off. The model's train/eval flags are restored.

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> _ = autoalign.reset_bn(net, data)
    >>> bool(net[1].num_batches_tracked == 2)
    True
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    fn = input_fn or default_input_fn
    dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        it: Iterable[Any] = data
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(data, desc="reset_bn", unit="batch", leave=False)
        with torch.no_grad():
            for batch in it:
                if num_batches is not None and seen >= num_batches:
                    break
                inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in as_input_tuple(fn(batch)))
                model(*inputs)
                seen += 1
    finally:
        for m, mom in momenta:
            m.momentum = mom
        for m, flag in flags:
            m.training = flag
    if seen == 0:
        raise MergeError("reset_bn: the calibration data yielded no batch")
    return model
