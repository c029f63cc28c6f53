"""Rules for Hugging Face transformers' activation modules (``transformers.activations``).

``gelu_new``, ``gelu_fast``, ``quick_gelu`` and their siblings are written out in Python
(``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))``); decomposed into ATen ops by
``torch.export``, the rules see a product of features and an added constant, which allow
only permutations. As modules they are pointwise nonlinearities like ``nn.GELU``, which
autoalign lets dense maps through (the paper's approximation): registered here as
:func:`~.labels.pointwise`, and applied to exported graphs through
:mod:`autoalign.graph.scopes`. Registered lazily by :func:`register_transformers_rules`,
only when transformers is already imported.
"""

from __future__ import annotations

import sys

from ..registry import register_channel_rule
from .labels import pointwise

__all__ = ["register_transformers_rules", "POINTWISE_ACTIVATIONS"]

#: Parameter-free elementwise activation modules of ``transformers.activations``.
POINTWISE_ACTIVATIONS: tuple[str, ...] = (
    "AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation", "GELUActivation", "GELUTanh",
    "LaplaceActivation", "LinearActivation", "MishActivation", "NewGELUActivation", "PytorchGELUTanh",
    "QuickGELUActivation", "ReLUSquaredActivation", "SiLUActivation", "SqrtSoftplusActivation",
)

_DONE = False


def register_transformers_rules() -> None:
    """Register :data:`POINTWISE_ACTIVATIONS` as pointwise (once; only if transformers is
    already imported, so ``import autoalign`` does not pay for it)."""
    global _DONE
    if _DONE or "transformers" not in sys.modules:
        return
    _DONE = True
    try:
        import importlib

        acts = importlib.import_module("transformers.activations")
    except Exception:  # noqa: BLE001 - transformers is optional
        return
    classes = tuple(getattr(acts, name) for name in POINTWISE_ACTIVATIONS if hasattr(acts, name))
    if classes:
        register_channel_rule(classes, pointwise)
