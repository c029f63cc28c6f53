"""Repair after merging: merged models lose activation variance.

``reset_bn`` re-estimates every BatchNorm's running statistics on calibration data
(the merged weights no longer match the averaged statistics). A BatchNorm that was
folded into its producer for a dense transform has no learned scale left, so
before the reset (before: every later layer's statistics depend on it) its affine
is set to the per-channel mean and std that the aligned models' outputs have there
(REPAIR's target, Jordan et al. 2023): the merged layer then reproduces the average
statistics instead of unit variance.

Targets are measured *layerwise* (:func:`site_maps`): at each site, every original
model's own output, mapped into merged coordinates by its merge matrix ``P_m``
(``μ_t = Σ_m w_m P_m μ_m``, ``σ_t = Σ_m w_m sqrt(diag(P_m C_m P_mᵀ))``). For
permutations this equals running the aligned models; for dense maps it does not: an
aligned model applies ``P⁻¹`` after ``relu(P z)``, which is not ``z``, so its deeper
features drift (a CCA-aligned ResNet20 alone is far from the original), and targets
measured on it carried that drift into the merged model (ResNet20 on CIFAR-10, CCA,
N = 2: 43 % with drifted targets, 75 % with layerwise ones; docs/results.md).

Without repair, :func:`restore_batchnorm` writes a folded BatchNorm's scale and
statistics back from one eval-mode pass, keeping the merged function.

``repair="repair"`` (:func:`repair_producers`) is full REPAIR: at every
producer (Linear/Conv) of a non-frozen merge point and every BatchNorm, the
merged model's per-channel output mean and std are matched to the weighted
average of the aligned models' (:func:`output_channel_stats`), and the
correction is folded into the producer's weight and bias (or the BatchNorm's
affine), so it works with and without BatchNorm.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import MergeError
from .repair_sites import permutation_index, repair_sites, site_maps
from .calibration import Calibration
from .batchnorm_pass import batchnorm_pass
from .capture import module_tapped
from .distributed import all_reduce_moments
from .trace import eval_mode

__all__ = [
    "reset_bn",
    "restore_batchnorm",
    "has_batchnorm",
    "output_channel_stats",
    "set_batchnorm_affine",
    "repair_producers",
    "repair_sites",
    "site_maps",
]



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
    stays off. The model's train/eval flags are restored. Under
    ``torch.distributed`` the statistics of all processes' shards are combined
    (:func:`autoalign.distributed.sync_batchnorm_stats`).

    Training mode normalises each batch with its own statistics, so the batches must be
    random draws: batches sorted by class (a ``DataLoader(shuffle=False)`` over an image
    folder) are detected from their class targets and the pass is run again on the same
    samples in a fixed random order, with a warning (:func:`autoalign.batchnorm_pass.batchnorm_pass`).

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    >>> _ = autoalign.reset_bn(net, data)
    >>> bool(net[1].num_batches_tracked == 2)
    True
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()):
        return model
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device, progress=progress)
    if batchnorm_pass(model, calib, desc="reset_bn") == 0:
        raise MergeError("reset_bn: the calibration data yielded no batch")
    return model


def _channel_moments(
    model: nn.Module,
    taps: dict[str, tuple[str, int]],
    calib: Calibration,
    *,
    maps: dict[str, torch.Tensor] | None = None,
    trace_options: dict[str, Any] | None = None,
    desc: str = "moments",
) -> dict[str, list[Any]]:
    """One eval-mode pass of ``model`` over the calibration data, read by taps
    (:func:`autoalign.capture.module_tapped`): per named submodule, ``[count, Σ y, Σ y²]``
    per channel of its ``"input"`` or ``"output"`` (channels along the given axis), summed over
    all processes under ``torch.distributed``. Submodules that never run are left out. An
    output named in ``maps`` is multiplied by that ``(C, C)`` matrix first (``y ← P y``)."""
    acc: dict[str, list[Any]] = {}
    outputs: dict[str, Callable[[Any], None]] = {}
    inputs: dict[str, Callable[[Any], None]] = {}
    for name, (where, axis) in taps.items():
        pm = (maps or {}).get(name) if where == "output" else None
        if pm is None:
            fn = lambda y, name=name, axis=axis: _accumulate(acc, name, _per_channel(y, axis))  # noqa: E731
        elif (perm := permutation_index(pm)) is not None:  # a gather, not a (C, C) product
            fn = lambda y, name=name, axis=axis, perm=perm: _accumulate(acc, name, _per_channel(y, axis)[:, perm.to(y.device)])  # noqa: E731
        else:
            pt = pm.detach().to(torch.float64).T
            fn = lambda y, name=name, axis=axis, pt=pt: _accumulate(acc, name, _per_channel(y, axis) @ pt.to(y.device))  # noqa: E731
        (inputs if where == "input" else outputs)[name] = fn
    gm, _ = module_tapped(model, outputs=outputs, inputs=inputs, **(trace_options or {}))
    dev = calib.device_for(model)
    with torch.no_grad(), eval_mode(model):
        for inputs_ in calib.inputs(dev, desc=desc):
            gm(*inputs_)
    all_reduce_moments(acc)  # under torch.distributed: the moments of all processes' shards
    return acc


def restore_batchnorm(
    model: nn.Module,
    names: Sequence[str],
    data: Iterable[Any],
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    trace_options: dict[str, Any] | None = None,
) -> list[str]:
    """Give folded BatchNorm layers back a per-channel scale and statistics, keeping the function.

    A BatchNorm folded into its producer (:func:`autoalign.fold_batchnorm`) is an
    identity normalisation: weight 1, running statistics (0, 1 − eps). In eval mode
    that is exact, but the layer says nothing about the features it normalises, and
    anything that re-estimates its statistics (fine-tuning, a later ``reset_bn``)
    would normalise every channel to unit variance. This sets, from one eval-mode
    pass of ``model`` over ``data``, each named BatchNorm's running mean ``μ`` and
    running variance ``v`` to the per-channel statistics of its input, its weight
    to ``sqrt(v + eps)`` (the channel's std) and adds ``μ`` to its bias: the eval
    function is unchanged up to float rounding, and re-estimating the statistics
    on the same data gives them back.

    Parameters
    ----------
    model : nn.Module
        The merged model (modified in place; train/eval flags restored).
    names : sequence of str
        Module names of folded, affine BatchNorm layers (others are skipped).
    data : iterable of batches
        Calibration data.

    Returns
    -------
    list of str
        The names of the layers that were restored (those that ran on the data).

    Examples
    --------
    >>> import torch, autoalign
    >>> from autoalign.repair import restore_batchnorm
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> spec = autoalign.find_merge_points(net, torch.randn(2, 3, 8, 8))
    >>> _ = net.load_state_dict(autoalign.fold_batchnorm(net.state_dict(), spec))
    >>> x = torch.randn(16, 3, 8, 8)
    >>> before = net(x)
    >>> restore_batchnorm(net, ["1"], [x])
    ['1']
    >>> torch.allclose(net(x), before, atol=1e-5), bool((net[1].weight != 1).all())
    (True, True)
    """
    bns = {}
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and mod.track_running_stats:
            bns[name] = mod
    if not bns:
        return []
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device)
    acc = _channel_moments(model, {name: ("input", 1) for name in bns}, calib, trace_options=trace_options, desc="restore BatchNorm")
    done = []
    with torch.no_grad():
        for name, mod in bns.items():
            if name not in acc:
                continue
            cnt, s, q = acc[name]
            mean = s / cnt
            var = torch.clamp(q / cnt - mean * mean, min=0.0)
            dt = mod.running_mean.dtype
            mod.running_mean.copy_(mean.to(dt))
            mod.running_var.copy_(var.to(dt))
            mod.weight.copy_(torch.sqrt(var.to(dt).to(torch.float64) + mod.eps).to(mod.weight.dtype))
            mod.bias.copy_((mod.bias.to(torch.float64) + mean.to(mod.bias.device)).to(mod.bias.dtype))
            done.append(name)
    return done


def channel_axis(module: nn.Module) -> int:
    """The channel axis of a module's output: last for ``nn.Linear``, 1 otherwise (conv, BatchNorm)."""
    return -1 if isinstance(module, nn.Linear) else 1


def _per_channel(y: torch.Tensor, axis: int) -> torch.Tensor:
    """``y`` as (samples, channels) in float64."""
    c = y.shape[axis]
    return y.detach().to(torch.float64).movedim(axis, -1).reshape(-1, c)


def _accumulate(acc: dict[str, list[Any]], name: str, y2: torch.Tensor) -> None:
    """Add a (samples, channels) batch to ``acc[name] = [count, Σ y, Σ y²]``."""
    a = acc.setdefault(name, [0, 0.0, 0.0])
    a[0] += y2.shape[0]
    a[1] = a[1] + y2.sum(0)
    a[2] = a[2] + (y2 * y2).sum(0)


def output_channel_stats(
    models: Sequence[nn.Module],
    names: Sequence[str],
    data: Iterable[Any],
    *,
    weights: Sequence[float] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    maps: Sequence[dict[str, torch.Tensor]] | None = None,
    trace_options: dict[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of the outputs of the named submodules, averaged
    over ``models`` with ``weights`` (REPAIR's target: ``Σ_m w_m μ_m`` and
    ``Σ_m w_m σ_m``). Each model runs on its own, in eval mode.

    Parameters
    ----------
    models : sequence of nn.Module
        Models of one architecture (not modified).
    names : sequence of str
        Submodule names (``nn.Linear`` outputs use the last axis as channels,
        other modules axis 1). Modules that never run are left out of the result.
    data : iterable of batches
        Calibration data.
    weights : sequence of float, optional
        Per-model weights (normalised; uniform by default).
    maps : sequence of dict of str to Tensor (C, C), optional
        Per model, matrices applied to the named outputs before their moments are
        taken (``y ← P y``: the output in merged coordinates, see :func:`site_maps`).
    trace_options : dict, optional
        ``leaf_modules`` / ``autowrap_functions`` for tracing the models: outputs
        are read by taps in a traced copy (:mod:`autoalign.capture`), so the models
        must be traceable, as for merging.

    Returns
    -------
    dict of str to (Tensor (C,), Tensor (C,))
        Mean and std per module, float64.

    Examples
    --------
    >>> import torch
    >>> from autoalign.repair import output_channel_stats
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.zero_(), net[0].bias.copy_(torch.tensor([1.0, -2.0]))
    >>> mean, std = output_channel_stats([net], ["0"], [torch.randn(5, 3)])["0"]
    >>> mean.tolist(), std.tolist()
    ([1.0, -2.0], [0.0, 0.0])
    """
    n = len(models)
    w = [1.0 / n] * n if weights is None else [float(x) / float(sum(weights)) for x in weights]
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (wi, model) in enumerate(zip(w, models)):
        taps = {name: ("output", channel_axis(model.get_submodule(name))) for name in names}
        acc = _channel_moments(
            model, taps, calib, maps=maps[k] if maps is not None else None, trace_options=trace_options, desc=f"repair targets, model {k + 1}/{n}"
        )
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
            if bn.weight is None or bn.bias is None:
                continue  # affine=False: it normalises to unit variance, as the unmerged models did
            bn.weight.copy_(std.to(bn.weight.dtype))
            bn.bias.copy_(mean.to(bn.bias.dtype))


def repair_producers(
    model: nn.Module,
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data: Iterable[Any],
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    eps: float = 1e-12,
    trace_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """REPAIR (Jordan et al., ICLR 2023): give every named module's output the
    per-channel mean and std of ``targets``, folded into the model (in place).

    BatchNorm layers named in ``targets`` get the target as their affine
    (``weight = σ_t``, ``bias = μ_t``) and freshly estimated running statistics.
    Producers (``nn.Linear`` / ``nn.Conv*d``) are corrected in one pass over
    ``data``: a tap (:mod:`autoalign.capture`) replaces each producer's output ``y`` by
    ``(y − μ_b) / σ_b · σ_t + μ_t`` with the batch's statistics (like BatchNorm
    in training mode, so every later layer sees already corrected inputs) while
    accumulating ``μ̂, σ̂`` of ``y`` over all batches; then
    ``W ← W · σ_t/σ̂`` and ``b ← (b − μ̂) · σ_t/σ̂ + μ_t`` per output channel.
    A producer without bias can only be rescaled (its mean is left). A channel
    that is constant on the data (``σ̂ ≈ 0``) keeps its scale and is only shifted.
    Like :func:`reset_bn`, the pass normalises with batch statistics, so batches sorted by class
    are detected and the pass is run again on the samples in a random order.

    Parameters
    ----------
    model : nn.Module
        The merged model (modified in place; train/eval flags restored).
    targets : dict of str to (Tensor (C,), Tensor (C,))
        Target mean and std per module name (see :func:`output_channel_stats`).
    data : iterable of batches
        Calibration data.
    eps : float
        Added to variances before taking square roots.
    trace_options : dict, optional
        ``leaf_modules`` / ``autowrap_functions`` for tracing the model (the
        correction is applied by taps in a traced copy, :mod:`autoalign.capture`,
        which shares the model's submodules).

    Returns
    -------
    dict of str to str
        Notes per module that could not be fully corrected (e.g. no bias, never ran).

    Examples
    --------
    >>> import torch
    >>> from autoalign.repair import repair_producers, output_channel_stats
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> x = torch.randn(64, 3)
    >>> target = {"0": (torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]))}
    >>> repair_producers(net, target, [x])
    {}
    >>> mean, std = output_channel_stats([net], ["0"], [x])["0"]
    >>> [round(v, 3) for v in mean.tolist() + std.tolist()]
    [1.0, 2.0, 0.5, 3.0]
    """
    notes: dict[str, str] = {}
    bn_targets = {k: v for k, v in targets.items() if isinstance(model.get_submodule(k), nn.modules.batchnorm._BatchNorm)}
    prod_targets = {k: v for k, v in targets.items() if k not in bn_targets}
    set_batchnorm_affine(model, bn_targets)
    acc: dict[str, list[Any]] = {}

    def correction(name: str, axis: int, mean_t: torch.Tensor, std_t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def correct(y: torch.Tensor) -> torch.Tensor:
            y2 = _per_channel(y, axis)
            _accumulate(acc, name, y2)
            mb = y2.mean(0)
            sb = torch.sqrt(torch.clamp(y2.var(0, unbiased=False), min=0.0) + eps)
            mt, st = mean_t.to(y2), std_t.to(y2)
            scale = torch.where(sb > 1e-6 * (1.0 + st), st / sb, torch.ones_like(sb))
            shape = [1] * y.dim()
            shape[axis] = -1
            z = (y.to(torch.float64) - mb.reshape(shape)) * scale.reshape(shape) + mt.reshape(shape)
            return z.to(y.dtype)

        return correct

    corrections = {
        name: correction(name, channel_axis(model.get_submodule(name)), mt, st) for name, (mt, st) in prod_targets.items()
    }
    calib = Calibration.coerce(data, input_fn=input_fn, num_batches=num_batches, device=device, progress=progress)
    gm, _ = module_tapped(model, rewrite_outputs=corrections, keep_output=True, **(trace_options or {}))
    seen = batchnorm_pass(model, calib, desc="repair", run=gm, restart=acc.clear)
    if seen == 0:
        raise MergeError("repair: the calibration data yielded no batch")
    all_reduce_moments(acc)
    with torch.no_grad():
        for name, (mt, st) in prod_targets.items():
            if name not in acc:
                notes[name] = "never ran on the calibration data; left as is"
                continue
            mod = model.get_submodule(name)
            cnt, s, q = acc[name]
            mean = s / cnt
            std = torch.sqrt(torch.clamp(q / cnt - mean * mean, min=0.0) + eps)
            mt64, st64 = mt.to(mean), st.to(mean)
            scale = torch.where(std > 1e-6 * (1.0 + st64), st64 / std, torch.ones_like(std))
            w = mod.weight
            shape = [-1] + [1] * (w.dim() - 1)
            w.copy_((w.to(torch.float64) * scale.to(w.device).reshape(shape)).to(w.dtype))
            if mod.bias is not None:
                b = (mod.bias.to(torch.float64) - mean.to(w.device)) * scale.to(w.device) + mt64.to(w.device)
                mod.bias.copy_(b.to(mod.bias.dtype))
            else:
                notes[name] = "no bias: std matched, mean left as is"
    return notes
