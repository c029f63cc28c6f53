"""Models and checkpoints for the command line.

A model is named by a torchvision classifier (``resnet18`` or
``torchvision:resnet18``; built with ``weights=None``, nothing is downloaded) or
by ``module:callable`` (imported like ``python -m`` would, from the working
directory too). Checkpoints are state dicts or dicts with a ``state_dict`` entry.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pathlib
import pickle
import sys
from collections.abc import Mapping
from typing import Any, Callable

from .parser import CLIError

__all__ = ["load_model_target", "inspect_target", "load_checkpoint", "load_into"]


def _torchvision_names() -> list[str]:
    from ..examples.zoo import torchvision_classifiers

    return torchvision_classifiers()


def _unknown_model_message(name: str) -> str:
    names = _torchvision_names()
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        hint = f"did you mean {close[0]}?" if len(close) == 1 else f"did you mean {', '.join(close[:-1])} or {close[-1]}?"
    else:
        from ..examples.zoo import model_family

        examples: dict[str, str] = {}
        for n in sorted(names):
            fam = model_family(n)
            if fam not in examples or (len(n), n) < (len(examples[fam]), examples[fam]):
                examples[fam] = n
        hint = f"no close name; torchvision classifiers include {', '.join(sorted(examples.values()))}."
    return (
        f"{name!r} is not a torchvision classifier: {hint} "
        "For your own model pass module:callable, e.g. mypackage.models:make_net"
    )


def _import_callable(target: str) -> Callable[..., Any]:
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise CLIError(f"expected module:callable (e.g. mypackage.models:make_net), got {target!r}")
    # like `python -m`, let modules in the working directory be found by the console script
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise CLIError(f"cannot import module {mod_name!r} (from {target!r}): {exc}; is it on PYTHONPATH?") from None
        raise CLIError(f"importing {mod_name!r} failed: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{target!r} is a {type(obj).__name__}, not a callable that returns an nn.Module")
    return obj


def _call_factory(target: str, **kwargs: Any) -> Any:
    from torch import nn

    factory = _import_callable(target)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        if kwargs:
            raise CLIError(f"{target}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {exc}") from None
        raise
    if not isinstance(model, nn.Module):
        raise CLIError(f"{target}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _torchvision_name(target: str) -> str | None:
    """The torchvision model name a target refers to, or None for module:callable."""
    if target.startswith("torchvision:"):
        return target.split(":", 1)[1]
    if ":" not in target:
        return target
    return None


def load_model_target(target: str, *, num_classes: int | None = None) -> Any:
    """Build an untrained model from ``torchvision:NAME``, ``NAME`` or ``module:callable``.

    Parameters
    ----------
    target : str
        ``torchvision:NAME`` or ``NAME`` (a torchvision classifier) or
        ``module:callable`` (a function returning an ``nn.Module``).
    num_classes : int, optional
        Passed as ``num_classes=`` to the constructor when given.

    Returns
    -------
    torch.nn.Module
        torchvision models are built with ``weights=None`` (nothing is downloaded);
        ``module:callable`` is called with no arguments (or ``num_classes=``).

    Raises
    ------
    CLIError
        Unknown torchvision name (with the closest names), a module that cannot be
        imported, a missing attribute, or a callable that returns no ``nn.Module``.
    """
    name = _torchvision_name(target)
    if name is None:
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        return _call_factory(target, **kwargs)
    if name not in _torchvision_names():
        raise CLIError(_unknown_model_message(name))
    import torchvision

    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, weights=None, **kwargs)


def inspect_target(target: str, input_shape: tuple[int, ...] | None, seed: int) -> tuple[Any, Any]:
    """The model and example input ``autoalign inspect`` traces.

    Parameters
    ----------
    target : str
        As for :func:`load_model_target`.
    input_shape : tuple of int or None
        Shape of the random example input; required for ``module:callable``,
        optional for torchvision models (default: a small image batch).
    seed : int
        Seed of the example input (and of a torchvision model's initialisation).

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    x : torch.Tensor
        The example input.
    """
    import torch

    name = _torchvision_name(target)
    if name is None:
        if input_shape is None:
            raise CLIError(f"--input-shape is required for {target!r} (e.g. --input-shape 2,3,32,32)")
        model = _call_factory(target)
        model.eval()
        return model, torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    if name not in _torchvision_names():
        raise CLIError(_unknown_model_message(name))
    from ..examples.zoo import torchvision_example

    model, x = torchvision_example(name, seed=seed)
    if input_shape is not None:
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    return model, x


# ----------------------------------------------------------------------------- checkpoints


def _extract_state_dict(obj: Any, path: str) -> dict[str, Any]:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CLIError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            return inner.state_dict()
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    keys = ", ".join(map(repr, list(obj)[:8]))
    raise CLIError(f"checkpoint {path!r} is neither a state dict nor a dict with a 'state_dict' entry (keys: {keys})")


def load_checkpoint(path: str, *, trust: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint.

    Parameters
    ----------
    path : str
        A state dict, or a dict with a ``state_dict`` (or ``model_state_dict``,
        ``model``) entry, as ``benchmarks/train.py`` and ``autoalign merge`` write.
    trust : bool, default False
        Load with full pickle; otherwise with ``weights_only=True``.

    Returns
    -------
    state_dict : dict
        Parameter and buffer tensors by name.
    metadata : dict
        The checkpoint's other entries with plain values (str, int, float, bool),
        e.g. ``arch``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    CLIError
        If it cannot be read or holds no state dict.
    """
    import torch

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist" if not p.exists() else f"checkpoint {path!r} is not a file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise CLIError(f"cannot read checkpoint {path!r}: {exc}") from None
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        detail = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.strip().startswith("WeightsUnpickler error:")), "")
        detail = detail.split(" was not an allowed global")[0]
        raise CLIError(
            f"checkpoint {path!r} holds objects other than tensors and plain data"
            + (f" ({detail.rstrip('.')})" if detail else "")
            + "; if you trust the file, pass --trust-checkpoints to load it with full pickle"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CLIError(f"cannot read checkpoint {path!r}: {exc}") from None
    sd = _extract_state_dict(obj, path)
    meta = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))} if isinstance(obj, Mapping) else {}
    return sd, meta


def load_into(model: Any, sd: dict[str, Any], path: str) -> None:
    """Load a checkpoint's state dict into a model, explaining a mismatch.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture, freshly built.
    sd : dict
        The state dict; a ``module.`` prefix (DataParallel/DDP) is dropped when needed.
    path : str
        The checkpoint's file name, for messages.

    Raises
    ------
    CLIError
        Missing or unexpected keys, or tensors of the wrong size.
    """
    keys = set(model.state_dict())
    if not (keys & set(sd)) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel/DDP
    missing = sorted(keys - set(sd))
    unexpected = sorted(set(sd) - keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise CLIError(f"checkpoint {path!r} does not fit the architecture: {'; '.join(parts)}; check --arch / --num-classes")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise CLIError(f"checkpoint {path!r} does not fit the architecture: {detail}; check --arch / --num-classes") from None
