"""Discovery of merge points: walk the traced graph with channel labels, then solve.

1. Run the traced graph on the example inputs, node by node, keeping each node's
   real value and computing its label tensor with the node's channel rule.
2. Coordinates identified by the rules (residual adds, concatenations along
   tokens, query/key contractions) are merged by connected components.
3. A merge point is a set of coordinates that appear in exactly the same tensors
   (and the same declared groups): coordinates that always travel together.
4. Each point gets the most general transform kind its constraints allow, a
   readable name, the parameter axes it owns and the tensors where its features
   can be observed.

Step 1 is :func:`autoalign.graph.analyse.analyse`; steps 2–4 are
:func:`autoalign.graph.assemble.assemble`. This module ties them to tracing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch.fx as fx
from torch import nn

from ..spec import MergeSpec
from ..trace import Tracer, trace
from .analyse import analyse
from .assemble import assemble
from .registry import ChannelRule, RuleTable, rule_overrides

__all__ = ["find_merge_points", "discover", "analyse", "assemble"]


def discover(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    strict: bool = False,
    model: nn.Module | None = None,
    rules: Mapping[Any, ChannelRule] | RuleTable | None = None,
) -> MergeSpec:
    """Discover the merge points of an already traced graph.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The traced model (:func:`autoalign.trace`).
    example_inputs : Tensor or tuple
        Positional inputs of one forward call.
    strict : bool, default False
        As in :func:`find_merge_points`.
    model : nn.Module, optional
        The model ``gm`` was traced from: its state-dict keys tell parameters from
        constants the tracer added, and its class is recorded in the spec.
    rules : mapping, optional
        Per-call channel rules, as in :func:`find_merge_points`.

    Returns
    -------
    MergeSpec
    """
    keys = set(model.state_dict(keep_vars=True)) if model is not None else None
    state = analyse(gm, example_inputs, strict=strict, keys=keys, rules=rules, model=model)
    if model is not None:
        _model_aliases(state, gm, model)
    return assemble(state, model if model is not None else gm)


def _model_aliases(state: Any, gm: fx.GraphModule, model: nn.Module) -> None:
    """Add the model's other names of the tensors the graph uses as aliases.

    A submodule registered twice (CoaT's ``cpe1`` is also ``serial_blocks1.0.cpe``)
    gives one tensor several state-dict keys, but the traced graph holds only the path
    it called; without the other keys, loading a transformed state dict would put the
    untransformed copies back."""
    gm_sd = gm.state_dict(keep_vars=True)
    by_id: dict[int, str] = {}
    for k in state.param_shapes:
        v = gm_sd.get(k)
        if v is not None:
            by_id.setdefault(id(v), state.aliases.get(k, k))
    for k, v in model.state_dict(keep_vars=True).items():
        if k not in state.param_shapes and k not in state.aliases and id(v) in by_id:
            state.aliases[k] = by_id[id(v)]


def find_merge_points(
    model: nn.Module,
    example_inputs: Any,
    *,
    tracer: Tracer = "auto",
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    strict: bool = False,
    rules: Mapping[Any, ChannelRule] | None = None,
) -> MergeSpec:
    """Trace ``model`` and discover its merge points.

    Parameters
    ----------
    model : nn.Module
        Any model ``torch.fx`` can trace (with the escape hatches below). It is
        not modified.
    example_inputs : Tensor or tuple
        Positional inputs of one forward call; small inputs suffice, e.g. a
        ``(2, 3, 64, 64)`` batch for an image classifier.
    tracer : {"auto", "fx", "export"}, default "auto"
        The front end (:func:`autoalign.trace`): ``torch.fx`` symbolic tracing,
        ``torch.export`` (Hugging Face transformers and other models fx cannot
        trace), or fx with export as the fallback.
    leaf_modules, autowrap_functions : sequence, optional
        Passed to :func:`autoalign.trace`.
    strict : bool, default False
        Raise :class:`autoalign.UnsupportedOpError` at the first op without a
        channel rule that touches features, instead of freezing what it touches.
    rules : mapping, optional
        Channel rules for this call only, ``{target: rule}`` with targets as
        :func:`autoalign.register_channel_rule` accepts them (a module class, a
        function, a method name, or a tuple of those). They are consulted before
        the registered rules, which they leave untouched.

    Returns
    -------
    MergeSpec
        Merge points (name, dim, kind, reason) and, for every parameter/buffer
        axis, the point and role it belongs to.

    Raises
    ------
    TraceError
        If the model cannot be traced.
    UnsupportedOpError
        With ``strict=True``, for an op without a channel rule.
    OptionError
        For a bad target or rule in ``rules``.

    Examples
    --------
    A residual block makes the stem's and the block's output channels one merge
    point (the BatchNorm folds into its conv, so the point stays ``linear``); the
    logits are the model's output and stay frozen. Any torchvision classifier works
    the same way, e.g. ``find_merge_points(torchvision.models.resnet18(), x)``.

    >>> import torch, autoalign
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    ...         self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    ...         self.bn = torch.nn.BatchNorm2d(8)
    ...         self.head = torch.nn.Linear(8, 10)
    ...     def forward(self, x):
    ...         x = torch.relu(self.stem(x))
    ...         x = x + torch.relu(self.bn(self.conv(x)))    # a residual block
    ...         return self.head(x.mean((2, 3)))
    >>> spec = autoalign.find_merge_points(Net(), torch.randn(2, 3, 8, 8))
    >>> print(spec.table())
    name  dim  kind    tensors  reason
    stem    8  linear  9
    head   10  frozen  2        model output
    >>> spec.point("stem").producers, len(spec.folds), spec.coverage()
    (('stem', 'conv'), 1, 1.0)
    """
    overrides = rule_overrides(rules)  # checked before tracing
    gm = trace(model, example_inputs, tracer=tracer, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    return discover(gm, example_inputs, strict=strict, model=model, rules=overrides)
