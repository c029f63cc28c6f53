"""Input validation for :func:`autoalign.merge`: clear errors that name the problem."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .errors import MergeError

__all__ = ["validate_models"]


def validate_models(models: Sequence[nn.Module]) -> None:
    """Check that models share one architecture (class, state-dict keys and shapes) and device.

    Raises
    ------
    MergeError
        Naming the first model and parameter that differ.
    """
    if not isinstance(models, (list, tuple)):
        raise MergeError(f"models must be a list or tuple of nn.Module, got {type(models).__name__}")
    if not models:
        raise MergeError("merge needs at least one model, got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise MergeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
    ref_cls = type(models[0])
    ref_sd = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not ref_cls:
            raise MergeError(f"models[{i}] is a {type(m).__name__} but models[0] is a {ref_cls.__name__}")
        sd = m.state_dict()
        for k in ref_sd:
            if k not in sd:
                raise MergeError(f"models[{i}] has no parameter {k!r} (models differ in architecture)")
            if tuple(sd[k].shape) != tuple(ref_sd[k].shape):
                raise MergeError(
                    f"parameter {k!r} has shape {tuple(sd[k].shape)} in models[{i}] but {tuple(ref_sd[k].shape)} in models[0]"
                )
        extra = [k for k in sd if k not in ref_sd]
        if extra:
            raise MergeError(f"models[{i}] has parameter {extra[0]!r} that models[0] lacks")
    devices = {p.device for m in models for p in m.parameters()}
    if len(devices) > 1:
        raise MergeError(f"models are on different devices {sorted(map(str, devices))}; move them to one device or pass device=")
