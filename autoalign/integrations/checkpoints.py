"""Independently trained checkpoints as models: an architecture and a file.

:func:`load_checkpoint_model` is what a FusionBench model-pool entry instantiates
(``_target_: autoalign.integrations.checkpoints.load_checkpoint_model``); it needs no
FusionBench and can be called directly.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from ..cli.models import load_checkpoint, load_into, load_model_target
from ..cli.parser import CLIError
from ..errors import OptionError

__all__ = ["load_checkpoint_model", "build_arch"]


def _dotted_callable(arch: str) -> Callable[..., Any] | None:
    """``pkg.module.fn`` as a callable, or None when ``arch`` has no dot."""
    mod_name, _, attr = arch.rpartition(".")
    if not mod_name:
        return None
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise OptionError(f"arch={arch!r}: cannot import module {mod_name!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise OptionError(f"arch={arch!r}: module {mod_name!r} has no callable {attr!r}")
    return obj


def _plain(value: Any) -> Any:
    """A Hydra ``ListConfig``/``DictConfig`` (constructor kwargs from a config) as a list or dict."""
    if type(value).__name__ in ("ListConfig", "DictConfig"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def build_arch(arch: str, **kwargs: Any) -> nn.Module:
    """An untrained model from an architecture name.

    Parameters
    ----------
    arch : str
        A dotted callable (``mypackage.models.make_net``), ``module:callable``, or a
        torchvision classifier name (``resnet18`` or ``torchvision:resnet18``, built with
        ``weights=None``: nothing is downloaded).
    **kwargs
        Constructor keyword arguments (e.g. ``num_classes=10``).

    Returns
    -------
    nn.Module

    Raises
    ------
    OptionError
        An unknown name, a module that cannot be imported, or a callable that returns no
        ``nn.Module``; the message names ``arch``.

    Examples
    --------
    >>> from autoalign.integrations.checkpoints import build_arch
    >>> type(build_arch("torch.nn.Linear", in_features=3, out_features=2)).__name__
    'Linear'
    >>> build_arch("resnet18", num_classes=3).fc.out_features
    3
    """
    if not isinstance(arch, str) or not arch:
        raise OptionError(f"arch must be a torchvision name or a dotted callable, got {arch!r}")
    if ":" in arch and not arch.startswith("torchvision:"):
        arch_dotted = arch.replace(":", ".", 1)  # module:callable is module.callable
    else:
        arch_dotted = arch
    factory = None if arch_dotted.startswith("torchvision:") else _dotted_callable(arch_dotted)
    try:
        if factory is not None:
            model = factory(**kwargs)
        elif set(kwargs) <= {"num_classes"}:
            model = load_model_target(arch, num_classes=kwargs.get("num_classes"))
        else:
            import torchvision

            name = arch.split(":", 1)[-1]
            if name not in torchvision.models.list_models():
                model = load_model_target(arch)  # raises the message with the closest names
            model = torchvision.models.get_model(name, weights=None, **kwargs)
    except CLIError as exc:
        raise OptionError(f"arch={arch!r}: {exc}") from None
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:
        raise OptionError(f"arch={arch!r} with kwargs {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise OptionError(f"arch={arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_checkpoint_model(arch: str, path: str | None = None, trust: bool = False, **kwargs: Any) -> nn.Module:
    """A model of architecture ``arch`` with the weights of checkpoint ``path``.

    Parameters
    ----------
    arch : str
        As for :func:`build_arch`.
    path : str, optional
        A state dict, or a dict with a ``state_dict`` (or ``model_state_dict``, ``model``)
        entry; ``module.`` prefixes (DataParallel) are dropped. Without it the model keeps its
        initialisation.
    trust : bool, default False
        Load with full pickle instead of ``weights_only=True``.
    **kwargs
        Constructor keyword arguments of ``arch``.

    Returns
    -------
    nn.Module
        In eval mode.

    Raises
    ------
    OptionError
        A bad ``arch``, or a checkpoint that cannot be read or does not fit it.
    FileNotFoundError
        ``path`` is not a file.

    Examples
    --------
    >>> import torch, tempfile, os
    >>> from autoalign.integrations.checkpoints import load_checkpoint_model
    >>> net = torch.nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
    >>> torch.save({"state_dict": net.state_dict()}, path)
    >>> again = load_checkpoint_model("torch.nn.Linear", path, in_features=3, out_features=2)
    >>> bool(torch.equal(again.weight, net.weight))
    True
    """
    model = build_arch(arch, **{k: _plain(v) for k, v in kwargs.items()})
    if path is not None:
        try:
            sd, _ = load_checkpoint(str(path), trust=trust)
            load_into(model, sd, str(path))
        except CLIError as exc:
            raise OptionError(f"path={path!r}: {exc}") from None
    return model.eval()
