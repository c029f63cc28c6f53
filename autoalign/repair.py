"""Repair after merging: merged models lose activation variance.

``reset_bn`` re-estimates every BatchNorm's running statistics on calibration data
(the merged weights no longer match the averaged statistics). A BatchNorm that was
folded into its producer for a dense transform has no learned scale left, so
before the reset its affine is set to the per-channel mean and std that the
aligned models' outputs have there (REPAIR's target, Jordan et al. 2023): the
merged layer then reproduces the average statistics instead of unit variance.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import MergeError
from .stats import default_input_fn, iter_model_inputs
from .trace import eval_mode

__all__ = ["reset_bn", "has_batchnorm", "batchnorm_output_stats", "set_batchnorm_affine"]


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
            for inputs in iter_model_inputs(it, input_fn=fn, num_batches=num_batches, device=dev):
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


def batchnorm_output_stats(
    models: Sequence[nn.Module],
    names: Sequence[str],
    data: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of the outputs of the named BatchNorm layers,
    averaged over ``models`` (with ``weights``); each model runs on its own.

    Returns
    -------
    dict of name to (mean (C,), std (C,)), float64.
    """
    fn = input_fn or default_input_fn
    n = len(models)
    w = [1.0 / n] * n if weights is None else [float(x) / float(sum(weights)) for x in weights]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for wi, model in zip(w, models):
        acc: dict[str, list[Any]] = {}
        hooks = []

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _inp: Any, y: torch.Tensor) -> None:
                y = y.detach().double().movedim(1, -1).reshape(-1, y.shape[1])
                a = acc.setdefault(name, [0, 0.0, 0.0])
                a[0] += y.shape[0]
                a[1] = a[1] + y.sum(0)
                a[2] = a[2] + (y * y).sum(0)

            return hook

        for name in names:
            hooks.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        dev = torch.device(device) if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad(), eval_mode(model):
                for inputs in iter_model_inputs(data, input_fn=fn, num_batches=num_batches, device=dev):
                    model(*inputs)
        finally:
            for h in hooks:
                h.remove()
        for name, (cnt, s, q) in acc.items():
            mean = s / cnt
            std = torch.sqrt(torch.clamp(q / cnt - mean * mean, min=0.0))
            if name in out:
                out[name] = (out[name][0] + wi * mean, out[name][1] + wi * std)
            else:
                out[name] = (wi * mean, wi * std)
    return out


def set_batchnorm_affine(model: nn.Module, targets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each named BatchNorm the affine ``weight = std``, ``bias = mean`` of ``targets``,
    so that (with freshly estimated running statistics) its outputs have those
    per-channel statistics."""
    with torch.no_grad():
        for name, (mean, std) in targets.items():
            bn = model.get_submodule(name)
            bn.weight.copy_(std.to(bn.weight.dtype))
            bn.bias.copy_(mean.to(bn.bias.dtype))
