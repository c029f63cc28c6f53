"""Small example inputs for torchvision's classifiers (for ``inspect``, tests and docs).

Every classifier in ``torchvision.models`` is built randomly initialised (no
weights are downloaded) with the smallest input its architecture allows, so the
whole zoo can be checked on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["torchvision_classifiers", "torchvision_example", "model_family", "break_symmetry"]

# image sizes where 64x64 does not work, and constructor options that allow smaller inputs
_SIZE = {"inception_v3": 80, "maxvit_t": 224}
_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": {"init_weights": True, "aux_logits": True},
    "googlenet": {"init_weights": True, "aux_logits": True},
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
}
_VIT_SIZE = {"vit_b_16": 32, "vit_b_32": 32, "vit_l_16": 32, "vit_l_32": 32, "vit_h_14": 28}

_FAMILIES = (
    "alexnet", "convnext", "densenet", "efficientnet_v2", "efficientnet", "googlenet", "inception", "maxvit",
    "mnasnet", "mobilenet_v2", "mobilenet_v3", "regnet", "resnext", "resnet", "shufflenet", "squeezenet", "swin",
    "vgg", "vit", "wide_resnet",
)


def torchvision_classifiers() -> list[str]:
    """Names of all classifiers in ``torchvision.models`` (80 with torchvision 0.29)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def model_family(name: str) -> str:
    """The architecture family of a torchvision model name (``"resnet50"`` → ``"resnet"``)."""
    for fam in _FAMILIES:
        if name.startswith(fam):
            return fam
    return name


def break_symmetry(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Perturb every parameter/buffer whose entries are all equal (in place).

    Fresh models initialise BatchNorm/LayerNorm affines and statistics, biases and
    layer scales to constants, which are invariant under any permutation: a
    self-check on such a model could not notice a missing role. Constant tensors
    are multiplied by ``U(0.5, 1.5)`` noise (zeros get ``N(0, 0.02)``). Constants
    near zero (``|c| < 1e-2``: layer scales start at 1e-5 or 1e-6 in ConvNeXt, CaiT,
    EVA, DeiT III) become ``U(0.5, 1.5)``: at their initial size the residual branch
    they scale hardly reaches the output, so a wrong spec inside it would pass.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not torch.is_floating_point(t) or t.numel() < 2:
                continue
            flat = t.reshape(-1)
            if bool((flat == flat[0]).all()):
                if float(flat[0]) == 0.0:
                    t.copy_(0.02 * torch.randn(t.shape, generator=g))
                elif abs(float(flat[0])) < 1e-2:
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.mul_(0.5 + torch.rand(t.shape, generator=g))
    return model


def torchvision_example(name: str, *, batch_size: int = 2, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A randomly initialised torchvision classifier and a small input batch for it.

    Parameters
    ----------
    name : str
        A name from :func:`torchvision_classifiers`, e.g. ``"resnet18"``.
    batch_size : int, default 2
        Batch size of the example input.
    seed : int, default 0
        Seed for the initialisation and the input.

    Returns
    -------
    model : nn.Module
        The model in eval mode, with constant-initialised tensors perturbed
        (:func:`break_symmetry`) so that a self-check can see every role, and
        BatchNorm statistics calibrated on random images.
    inputs : Tensor, shape (batch_size, 3, S, S)
        ``S`` is 64 where the architecture allows it.
    """
    import torchvision

    if name not in torchvision_classifiers():
        import difflib

        close = difflib.get_close_matches(name, torchvision_classifiers(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not a torchvision classifier{hint}")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **_KWARGS.get(name, {}))
    model.eval()
    break_symmetry(model, seed=seed)
    size = _VIT_SIZE.get(name, _SIZE.get(name, 64))
    g = torch.Generator().manual_seed(seed)
    # calibrate BatchNorm statistics on random images, as training would: without it
    # activations drift to huge or vanishing scales and many ReLU units are dead
    from ..repair import reset_bn

    reset_bn(model, [torch.randn(8, 3, size, size, generator=g) for _ in range(2)])
    return model, torch.randn(batch_size, 3, size, size, generator=g)
