"""Built-in channel rules: how each op relates input and output feature coordinates.

Each rule is small and says only what its op does to coordinates; the connected
components, merge points and kinds are worked out afterwards
(:mod:`autoalign.graph.assemble`). One module per op family:

========================  ===================================================
:mod:`.labels`            shared helpers: pointwise, structural, unknown, ...
:mod:`.producers`         Linear, Conv, Embedding (layers that create coordinates)
:mod:`.norms`             BatchNorm (folded or not), LayerNorm, GroupNorm, ...
:mod:`.elementwise`       add/sub, mul/div (with parameters or constants)
:mod:`.reductions`        mean/sum/..., softmax, ``F.normalize``
:mod:`.concat`            ``torch.cat`` / ``torch.stack``
:mod:`.attention`         matmul, einsum, scaled dot-product attention, MHA
:mod:`.builtin`           pointwise/structural ops, pooling and resizing
:mod:`.aten`              the core ATen ops of ``torch.export`` graphs (onto the rules above)
:mod:`.torchvision`       torchvision's opaque functions (registered lazily)
:mod:`.transformers`      Hugging Face's activation modules (registered lazily)
:mod:`.timm`              timm's layers for use as leaf modules (registered lazily)
========================  ===================================================

Importing this package registers the built-in rules, in the order of the
modules above (producers first, the simple ops last).
"""

from __future__ import annotations

# the imports register the rules; their order is the registration order
from . import labels, producers, norms, elementwise, reductions, concat, attention, builtin, aten  # noqa: F401  isort: skip
from .labels import pointwise, structural, unknown
from .timm import register_timm_rules, timm_leaf_modules
from .torchvision import register_torchvision_rules
from .transformers import register_transformers_rules

__all__ = [
    "pointwise", "structural", "unknown", "register_torchvision_rules", "register_transformers_rules", "register_timm_rules",
    "timm_leaf_modules",
]
