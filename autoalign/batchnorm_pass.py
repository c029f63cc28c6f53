"""The training-mode pass that re-estimates BatchNorm statistics (:func:`autoalign.reset_bn`,
REPAIR's :func:`autoalign.repair.repair_producers`), robust to calibration data sorted by class."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from .calibration import Calibration, class_sorted, class_targets
from .distributed import sync_batchnorm_stats

__all__ = ["batchnorm_pass"]


def batchnorm_pass(
    model: nn.Module, calib: Calibration, *, desc: str, run: Callable[..., Any] | None = None,
    restart: Callable[[], None] | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics in one training-mode pass.

    Every BatchNorm's statistics are reset and re-estimated as the exact average over the
    batches (``momentum=None``, training mode), everything else runs in eval mode; flags and
    momenta are restored, and under ``torch.distributed`` the statistics of all processes are
    combined. In training mode a BatchNorm normalises each batch with that batch's own
    statistics, so the pass assumes batches drawn at random. When the batches' class targets
    show them sorted by class (:func:`~autoalign.calibration.class_sorted`), every layer has
    seen single-class batches with the class signal subtracted, and the running variances
    miss the between-class part (a resnet18 trained on a colour-coded task dropped to chance
    this way): the pass is then run again on the same samples in a fixed random order
    (:meth:`~autoalign.calibration.Calibration.shuffled`), with a warning; data that cannot
    be reordered only gets the warning.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    calib : Calibration
        The calibration data.
    desc : str
        The pass's name (progress bar, warning).
    run : callable, optional
        What to call on each batch's inputs instead of ``model`` (a traced copy sharing its
        submodules, say).
    restart : callable, optional
        Called before the pass is run again (to reset what ``run`` accumulates).

    Returns
    -------
    int
        The number of batches the (last) pass read.

    Examples
    --------
    >>> import warnings, torch
    >>> from autoalign.calibration import Calibration
    >>> from autoalign.batchnorm_pass import batchnorm_pass
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.BatchNorm1d(1))
    >>> _ = net[0].weight.data.fill_(1.0), net[0].bias.data.zero_()
    >>> x, y = torch.tensor([[-1.0]] * 8 + [[1.0]] * 8), torch.tensor([0] * 8 + [1] * 8)
    >>> by_class = Calibration([(x[:8], y[:8]), (x[8:], y[8:])])
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     batchnorm_pass(net, by_class, desc="reset_bn")
    2
    >>> "sorted by class" in str(caught[0].message)
    True
    >>> round(float(net[1].running_var), 2)  # the batches alone: 0.0 (each is constant)
    0.86
    """
    seen, targets = _one_pass(model, calib, desc, run)
    if seen and class_sorted(targets):
        again = calib.shuffled()
        what = (f"{desc}: the calibration batches are sorted by class ({len(targets)} batches); BatchNorm statistics "
                "estimated in training mode from single-class batches miss the differences between classes")
        if again is None:
            warnings.warn(f"{what}. Pass the calibration data in a random order (e.g. DataLoader(shuffle=True) or a "
                          "fixed random permutation of the data set)", stacklevel=3)
        else:
            warnings.warn(f"{what}: estimated again on the same samples in a fixed random order. Pass them shuffled "
                          "to save the pass (num_batches= and aligner='auto' read the first batches too)", stacklevel=3)
            if restart is not None:
                restart()
            seen, _ = _one_pass(model, again, desc, run)
    sync_batchnorm_stats(model)  # under torch.distributed: the statistics of all processes' shards
    return seen


def _one_pass(
    model: nn.Module, calib: Calibration, desc: str, run: Callable[..., Any] | None
) -> tuple[int, list[torch.Tensor]]:
    """The pass of :func:`batchnorm_pass` over one calibration: the number of batches and
    the class targets of those that have them."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    dev = calib.device_for(model)
    seen, targets = 0, []
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for inputs, batch in calib.labelled(dev, desc=desc):
                (run or model)(*inputs)
                seen += 1
                first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else None
                y = class_targets(batch, None if first is None else first.shape[0])
                if y is not None:
                    targets.append(y)
    finally:
        for m, mom in momenta:
            m.momentum = mom
        for m, flag in flags:
            m.training = flag
    return seen, targets
