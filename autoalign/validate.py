"""Input validation for :func:`autoalign.merge`: clear errors that name the problem.

Every check raises a subclass of :class:`~autoalign.MergeError` whose message
names the offending model, parameter, batch or merge point and says what to do:

* :func:`validate_models` — :class:`~autoalign.ModelError` for models that cannot
  be merged with each other, :class:`~autoalign.NonFiniteError` for NaN/Inf
  parameters;
* :func:`validate_options` — :class:`~autoalign.OptionError` for bad merge weights
  or ``num_batches``;
* :func:`check_example` — :class:`~autoalign.DataError` when the first batch
  cannot be fed to the model (before tracing, so the user sees a data error
  rather than a tracing error);
* :func:`check_merged` — the last line of defence: a merged parameter that is
  NaN/Inf (:class:`~autoalign.NonFiniteError`) or tied parameters the merge
  would untie (resolved when possible, :class:`~autoalign.ModelError` otherwise).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, MutableMapping, Sequence

import torch
from torch import nn

from .calibration import batch_error
from .errors import DataError, ModelError, NonFiniteError, OptionError

__all__ = [
    "validate_models",
    "validate_options",
    "check_example",
    "check_merged",
    "tied_groups",
]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that share one tensor (tied parameters or buffers), in
    groups of two or more, in state-dict order.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    >>> net[1].weight = net[0].weight
    >>> tied_groups(net)
    [['0.weight', '1.weight']]
    """
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    return [g for g in by_id.values() if len(g) > 1]


def validate_models(models: Sequence[nn.Module], *, device: torch.device | str | None = None) -> None:
    """Check that models can be merged: one class, the same state-dict keys,
    shapes, dtypes and tied parameters, one device, finite parameters.

    Parameters
    ----------
    models : list or tuple of nn.Module
    device : torch.device or str, optional
        The device the merge computes on; when given, models may live on
        different devices (they are copied there).

    Raises
    ------
    ModelError
        Naming the first model and parameter that differ (or an empty list).
    NonFiniteError
        For a NaN/Inf parameter or a NaN buffer (naming it).

    Examples
    --------
    >>> import torch
    >>> validate_models([torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)])
    >>> try:
    ...     validate_models([torch.nn.Linear(2, 3), torch.nn.Linear(2, 3).double()])
    ... except ModelError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    parameter 'weight' is torch.float64 in models[1] but torch.float32 in models[0]; ...
    """
    if not isinstance(models, (list, tuple)):
        raise ModelError(f"models must be a list or tuple of nn.Module, got {type(models).__name__}")
    if not models:
        raise ModelError("merge needs at least one model, got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
    ref_cls = type(models[0])
    ref_sd = models[0].state_dict()
    ref_ties = tied_groups(models[0])
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not ref_cls:
            raise ModelError(f"models[{i}] is a {type(m).__name__} but models[0] is a {ref_cls.__name__}; merge models of one architecture")
        sd = m.state_dict()
        for k in ref_sd:
            if k not in sd:
                raise ModelError(f"models[{i}] has no parameter {k!r} that models[0] has (the models differ in architecture)")
            if tuple(sd[k].shape) != tuple(ref_sd[k].shape):
                raise ModelError(
                    f"parameter {k!r} has shape {tuple(sd[k].shape)} in models[{i}] but {tuple(ref_sd[k].shape)} in models[0]; "
                    "merge models of one architecture and width"
                )
            if sd[k].dtype != ref_sd[k].dtype:
                raise ModelError(
                    f"parameter {k!r} is {sd[k].dtype} in models[{i}] but {ref_sd[k].dtype} in models[0]; "
                    f"convert the models to one dtype first, e.g. model.to({ref_sd[k].dtype})"
                )
        extra = [k for k in sd if k not in ref_sd]
        if extra:
            raise ModelError(f"models[{i}] has parameter {extra[0]!r} that models[0] lacks (the models differ in architecture)")
        ties = tied_groups(m)
        if ties != ref_ties:
            raise ModelError(
                f"models[{i}] ties parameters {ties} but models[0] ties {ref_ties}; tie the same parameters in every model"
            )
    if device is None:
        devices = {t.device for m in models for t in list(m.parameters()) + list(m.buffers())}
        if len(devices) > 1:
            raise ModelError(
                f"models are on different devices {sorted(map(str, devices))}; move them to one device or pass device="
            )
    for i, m in enumerate(models):
        for k, p in m.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise NonFiniteError(
                    f"parameter {k!r} of models[{i}] contains NaN/Inf; a diverged or corrupted model cannot be merged "
                    "(load a good checkpoint)"
                )
        for k, b in m.named_buffers():
            if b.is_floating_point() and bool(torch.isnan(b).any()):
                raise NonFiniteError(f"buffer {k!r} of models[{i}] contains NaN; load a good checkpoint")


def validate_options(n_models: int, *, weights: Sequence[float] | None = None, num_batches: int | None = None) -> None:
    """Check the merge weights and ``num_batches``.

    Raises
    ------
    OptionError
        For weights of the wrong length, NaN/Inf, negative or summing to zero,
        or ``num_batches`` that is not a positive int.

    Examples
    --------
    >>> validate_options(2, weights=[0.5, 0.5], num_batches=3)
    >>> try:
    ...     validate_options(2, weights=[1.0, float("nan")])
    ... except OptionError as exc:
    ...     print(exc)
    weights must be finite, non-negative and have a positive sum, got [1.0, nan]
    """
    if weights is not None:
        try:
            w = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise OptionError(f"weights must be a sequence of numbers, got {weights!r}") from None
        if len(w) != n_models:
            raise OptionError(f"weights has {len(w)} entries for {n_models} models; give one weight per model")
        if not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
            raise OptionError(f"weights must be finite, non-negative and have a positive sum, got {w}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise OptionError(f"num_batches must be a positive int or None (all batches), got {num_batches!r}")


def check_example(model: nn.Module, inputs: Sequence[Any], *, batch: int = 0) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no grad; flags restored) and
    raise a :class:`~autoalign.DataError` naming the batch if it fails.

    Examples
    --------
    >>> import torch
    >>> check_example(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    >>> try:
    ...     check_example(torch.nn.Linear(3, 2), (torch.randn(2, 5),))
    ... except DataError as exc:
    ...     print(str(exc)[:62])
    calibration batch 0 cannot be fed to the model (Linear): input
    """
    from .trace import eval_mode

    try:
        with torch.no_grad(), eval_mode(model):
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise DataError(batch_error(model, inputs, batch, exc)) from exc


def check_merged(
    merged: MutableMapping[str, torch.Tensor],
    model: nn.Module,
    *,
    spec: Any = None,
    inputs: Sequence[Mapping[str, torch.Tensor]] = (),
) -> None:
    """Check a merged state dict before it is loaded into the merged model.

    * Tied parameters (one tensor under several keys, see :func:`tied_groups`)
      must hold one value: when only some keys of a group are described by
      ``spec`` (the others are aliases the traced graph never reaches), the
      value of the described keys is copied to the others (in place); when
      described keys disagree, a :class:`~autoalign.ModelError` names them.
    * Every floating-point entry must be finite where all ``inputs`` (the
      models' state dicts) are finite; otherwise a
      :class:`~autoalign.NonFiniteError` names it.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> sd = {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}
    >>> try:
    ...     check_merged(sd, net)
    ... except NonFiniteError as exc:
    ...     print(str(exc)[:50])
    merged parameter 'weight' contains NaN/Inf (the in
    """
    described: set[str] = set()
    if spec is not None:
        described = {ax.tensor for ax in spec.axes} | set(spec.aliases) | set(spec.aliases.values())
    for group in tied_groups(model):
        keys = [k for k in group if k in merged]
        if len(keys) < 2:
            continue
        first = merged[keys[0]]
        if all(torch.equal(merged[k], first) for k in keys[1:]):
            continue
        reached = [k for k in keys if k in described] or keys
        value = merged[reached[0]]
        if not all(torch.equal(merged[k], value) for k in reached[1:]):
            raise ModelError(
                f"parameters {reached} are tied (one tensor) but the merge transforms them differently; "
                "untie them before merging or use a permutation aligner"
            )
        for k in keys:
            merged[k] = value
    for k, v in merged.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            continue
        if bool(torch.isfinite(v).all()):
            continue
        if any(k in sd and not bool(torch.isfinite(sd[k]).all()) for sd in inputs):
            continue
        points = []
        if spec is not None:
            points = sorted({spec.points[p].name for ax in spec.axes if ax.tensor == k for p in ax.points()})
        where = f" (transformed at merge point(s) {points})" if points else ""
        raise NonFiniteError(
            f"merged parameter {k!r} contains NaN/Inf (the input models' values are finite){where}; "
            "the aligner produced a non-finite transform: try a larger ridge= or another aligner, and report it"
        )
