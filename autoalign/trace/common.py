"""What both front ends share: input normalisation, eval mode, shape propagation."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError

__all__ = ["as_input_tuple", "eval_mode", "propagate_shapes", "failing_node", "flat_tensors"]


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs to a tuple of positional arguments.

    A single tensor becomes a 1-tuple; a list or tuple is taken as the positional
    arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional arguments, got {type(example_inputs).__name__}"
    )


def flat_tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) model output in a fixed order: lists and tuples in order,
    dicts (and Hugging Face output objects) by sorted key, named tuples by field.

    Examples
    --------
    >>> [t.item() for t in flat_tensors({"b": torch.tensor(2), "a": [torch.tensor(1), None]})]
    [1, 2]
    """
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in flat_tensors(y)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in flat_tensors(x[k])]
    if hasattr(x, "_asdict"):
        return flat_tensors(tuple(x))
    return []


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put modules in eval mode for the duration of the block, then restore every
    submodule's own ``training`` flag."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            try:
                model.eval()
            except NotImplementedError:  # an exported graph (torch.export) refuses eval(): it is already one
                for m in model.modules():
                    m.training = False
        yield
    finally:
        for flags in saved:
            for m, flag in flags:
                m.training = flag


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...], cls: str) -> None:
    """Run ``gm`` once on ``inputs`` so that every node records its output's shape
    (``meta["tensor_meta"]``); :class:`TraceError` naming the first failing node."""
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001
        node = failing_node(gm, inputs)
        raise TraceError(
            f"could not run the traced {cls} on the example inputs at node {node}: "
            f"{type(exc).__name__}: {exc}. Check the example inputs' shapes, or mark the module a leaf."
        ) from exc


def failing_node(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> str:
    """Re-run ``gm`` node by node to name the first node that raises."""
    interp = fx.Interpreter(gm)
    args = iter(inputs)
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        try:
            if node.op == "placeholder":
                env[node] = next(args, None)
                continue
            a = fx.node.map_arg(node.args, lambda n: env[n])
            k = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = getattr(interp, node.op)(node.target, a, k)
        except Exception:  # noqa: BLE001
            return node.format_node() or node.name
    return "<unknown>"
