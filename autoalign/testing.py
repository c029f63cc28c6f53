"""Checks anyone can run: the self-check of a discovered spec.

:func:`check` proves a spec right on a concrete model: it permutes every
non-frozen merge point at random (rotates each pair of a ``rotary`` point by a
random angle), moving every parameter and buffer axis by its role, and verifies
that the network computes the same function.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .aligners import registry as aligner_registry
from .aligners.linalg import pair_rotations
from .apply import transform_state_dict
from .graph import registry as rule_registry
from .graph.discover import find_merge_points
from .graph.registry import ChannelRule
from .spec import MergeSpec
from .trace import Tracer, as_input_tuple, eval_mode
from .trace.common import flat_tensors

__all__ = ["CheckReport", "check", "check_aligner", "permute_model", "random_permutations", "max_output_diff", "isolated_registries"]


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

    Examples
    --------
    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = autoalign.check(net, torch.randn(5, 3))
    >>> report.ok, report.permuted, report.points, report.coverage
    (True, 1, 2, 1.0)
    >>> print(report)  # doctest: +ELLIPSIS
    self-check ok: max |Δ| = ... (tolerance 0.0001); 1/2 merge points permuted; coverage 1.000
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
    """A random permutation ``(P, P^T)`` for every non-frozen merge point; at ``rotary``
    points, which allow no permutation, a rotation of each pair by a random angle.

    ``P`` has shape ``(d, d)``; ``(P x)_i = x_{perm[i]}``.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in spec.points:
        if p.kind == "frozen":
            continue
        if p.kind == "rotary":
            P = pair_rotations(p.dim, p.pairs, torch.rand(len(p.pairs), generator=g, dtype=torch.float64) * 2 * math.pi)
        else:
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


def max_output_diff(a: Any, b: Any) -> tuple[float, float]:
    """Largest absolute difference between two (nested) outputs, and the scale of ``a``."""
    ta, tb = flat_tensors(a), flat_tensors(b)
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
    tracer: Tracer = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    rules: Mapping[Any, ChannelRule] | None = None,
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
    tracer : {"auto", "fx", "export"}, default "auto"
        The front end (:func:`autoalign.trace`), passed to :func:`autoalign.find_merge_points`.
    leaf_modules, autowrap_functions : sequence, optional
        Passed to :func:`autoalign.find_merge_points`.
    rules : mapping, optional
        Per-call channel rules ``{target: rule}``, passed to
        :func:`autoalign.find_merge_points` (unused when ``spec`` is given).

    Returns
    -------
    CheckReport
        ``ok``, the maximum deviation, coverage figures and the spec.

    Examples
    --------
    A small conv net with BatchNorm (any torchvision classifier works the same
    way, e.g. ``check(torchvision.models.resnet18(), torch.randn(2, 3, 32, 32))``):

    >>> import torch, autoalign
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...     torch.nn.Conv2d(8, 8, 3, groups=2), torch.nn.ReLU(),
    ...     torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3))
    >>> report = autoalign.check(net, torch.randn(2, 3, 8, 8))
    >>> report.ok, report.permuted, report.points    # the grouped conv splits points in two
    (True, 4, 5)
    """
    if spec is None:
        spec = find_merge_points(
            model, example_inputs, tracer=tracer, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
            rules=rules,
        )
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


# ----------------------------------------------------------------------------- aligner conformance


class _ConvNet(nn.Module):
    """A small residual conv net with BatchNorm, concatenation and a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.a(x))
        x = torch.cat([torch.relu(self.b(x)), torch.relu(self.c(x))], 1)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(torch.flatten(x, 1))


def _conformance_models(seed: int) -> list[tuple[str, nn.Module, list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    conv = _ConvNet()
    from .examples.zoo import break_symmetry

    break_symmetry(conv, seed=seed)
    return [
        ("mlp", mlp, [torch.randn(64, 6, generator=g) for _ in range(3)]),
        ("convnet", conv, [torch.randn(16, 3, 8, 8, generator=g) for _ in range(3)]),
    ]


def _state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def check_aligner(aligner: Any, *, n_models: int = 3, seed: int = 0, rtol: float = 1e-4, **options: Any) -> None:
    """Run the aligner conformance suite; raise ``AssertionError`` listing every failure.

    For a small MLP and a small residual conv net with BatchNorm and concatenation:

    * ``merge([A] * n)`` computes ``A``'s function (eval mode, no repair);
    * no input model is modified (state bytes and train/eval flags);
    * the result has ``A``'s class and state-dict keys, and finite parameters.

    Parameters
    ----------
    aligner : str, Aligner or Aligner class
        What to check (a registered name, an instance or a class).
    n_models : int, default 3
    seed : int, default 0
    rtol : float, default 1e-4
        Tolerance relative to ``max(1, max |output|)``.
    **options
        Options for the aligner.

    Examples
    --------
    >>> import autoalign.testing
    >>> autoalign.testing.check_aligner("cca")
    """
    from .merge import merge

    failures: list[str] = []
    for label, model, data in _conformance_models(seed):
        model.train()
        models = [model] * n_models
        before = _state_bytes(model)
        try:
            merged = merge(models, data, aligner=aligner, repair=None, **options)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{label}: merge raised {type(exc).__name__}: {exc}")
            continue
        if _state_bytes(model) != before:
            failures.append(f"{label}: an input model was modified")
        if not model.training:
            failures.append(f"{label}: the input model's train/eval mode was not restored")
        if type(merged) is not type(model):
            failures.append(f"{label}: merged model is a {type(merged).__name__}, not a {type(model).__name__}")
        if list(merged.state_dict()) != list(model.state_dict()):
            failures.append(f"{label}: merged state-dict keys differ from the input's")
        bad = [k for k, v in merged.state_dict().items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
        if bad:
            failures.append(f"{label}: non-finite merged tensors {bad[:3]}")
        with torch.no_grad(), eval_mode(model, merged):
            diff, scale = max_output_diff(model(data[0]), merged(data[0]))
        if not diff <= rtol * max(1.0, scale):
            failures.append(f"{label}: merge([A] * {n_models}) differs from A by {diff:.3g} (scale {scale:.3g})")
    if failures:
        raise AssertionError(f"aligner {aligner!r} failed conformance:\n  " + "\n  ".join(failures))


@contextlib.contextmanager
def isolated_registries() -> Iterator[None]:
    """Undo, on exit, every aligner and channel rule registered inside the block.

    For tests (and examples) that register plug-ins without leaving them behind.

    Examples
    --------
    >>> import autoalign
    >>> with isolated_registries():
    ...     @autoalign.register_aligner(name="temporary-example")
    ...     class Temporary(autoalign.aligners.IdentityAligner):
    ...         pass
    ...     "temporary-example" in autoalign.list_aligners()
    True
    >>> "temporary-example" in autoalign.list_aligners()
    False
    """
    aligners, rules = aligner_registry.snapshot(), rule_registry.snapshot()
    try:
        yield
    finally:
        aligner_registry.restore(aligners)
        rule_registry.restore(rules)
