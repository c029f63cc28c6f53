"""Checks anyone can run: the self-check of a discovered spec.

:func:`check` proves a spec right on a concrete model: it permutes every
non-frozen merge point at random, moving every parameter and buffer axis by its
role, and verifies that the network computes the same function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .apply import transform_state_dict
from .graph.discover import find_merge_points
from .spec import MergeSpec
from .trace import as_input_tuple, eval_mode

__all__ = ["CheckReport", "check", "permute_model", "random_permutations"]


@dataclass
class CheckReport:
    """Result of :func:`check`.

    Attributes
    ----------
    ok : bool
        True when ``max_abs_diff <= tolerance``.
    max_abs_diff : float
        Largest absolute difference between the outputs of the model and of its
        permuted copy.
    output_scale : float
        Largest absolute output value of the original model.
    tolerance : float
        ``rtol * max(1, output_scale)``.
    coverage : float
        :meth:`MergeSpec.coverage` of the spec.
    points : int
        Number of merge points.
    permuted : int
        Number of points that were permuted (the non-frozen ones).
    spec : MergeSpec
        The spec that was checked.
    """

    ok: bool
    max_abs_diff: float
    output_scale: float
    tolerance: float
    coverage: float
    points: int
    permuted: int
    spec: MergeSpec

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"self-check {status}: max |Δ| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}); "
            f"{self.permuted}/{self.points} merge points permuted; coverage {self.coverage:.3f}"
        )


def random_permutations(spec: MergeSpec, *, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random permutation ``(P, P^T)`` for every non-frozen merge point.

    ``P`` has shape ``(d, d)``; ``(P x)_i = x_{perm[i]}``.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in spec.points:
        if p.kind == "frozen":
            continue
        perm = torch.randperm(p.dim, generator=g)
        P = torch.eye(p.dim, dtype=torch.float64)[perm]
        out[p.name] = (P, P.T.contiguous())
    return out


def permute_model(model: nn.Module, spec: MergeSpec, *, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every non-frozen merge point randomly permuted.

    The copy computes the same function in eval mode (BatchNorm layers the spec
    folds are folded into their producers). ``model`` is not modified.
    """
    sd = transform_state_dict(model.state_dict(), spec, random_permutations(spec, seed=seed))
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


def _flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _flat_tensors(y)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat_tensors(x[k])]
    if hasattr(x, "_asdict"):
        return _flat_tensors(tuple(x))
    return []


def max_output_diff(a: Any, b: Any) -> tuple[float, float]:
    """Largest absolute difference between two (nested) outputs, and the scale of ``a``."""
    ta, tb = _flat_tensors(a), _flat_tensors(b)
    if len(ta) != len(tb):
        raise ValueError("outputs have different structures")
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in ta if x.numel()), default=0.0)
    return diff, scale


def check(
    model: nn.Module,
    example_inputs: Any,
    *,
    seed: int = 0,
    spec: MergeSpec | None = None,
    rtol: float = 1e-4,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
) -> CheckReport:
    """Self-check a model's merge spec by random permutation.

    Parameters
    ----------
    model : nn.Module
        The model (not modified).
    example_inputs : Tensor or tuple
        Inputs for the forward passes.
    seed : int, default 0
        Seed of the random permutations.
    spec : MergeSpec, optional
        The spec to check; discovered from ``model`` when omitted.
    rtol : float, default 1e-4
        Tolerance relative to ``max(1, max |output|)``.
    leaf_modules, autowrap_functions : sequence, optional
        Passed to :func:`autoalign.find_merge_points`.

    Returns
    -------
    CheckReport
        ``ok``, the maximum deviation, coverage figures and the spec.

    Examples
    --------
    >>> import torch, torchvision, autoalign
    >>> report = autoalign.check(torchvision.models.resnet18(), torch.randn(2, 3, 32, 32))
    >>> report.ok
    True
    """
    if spec is None:
        spec = find_merge_points(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    permuted = permute_model(model, spec, seed=seed)
    inputs = as_input_tuple(example_inputs)
    with torch.no_grad(), eval_mode(model, permuted):
        ref = model(*inputs)
        out = permuted(*inputs)
    diff, scale = max_output_diff(ref, out)
    tol = rtol * max(1.0, scale)
    return CheckReport(
        ok=diff <= tol,
        max_abs_diff=diff,
        output_scale=scale,
        tolerance=tol,
        coverage=spec.coverage(),
        points=len(spec.points),
        permuted=len(spec.active_points),
        spec=spec,
    )
