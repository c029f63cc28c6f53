"""Registry of aligners by name, with third-party plug-ins via entry points.

Third-party packages add aligners by declaring an entry point in the
``autoalign.aligners`` group that points at an :class:`~autoalign.Aligner`
subclass::

    [project.entry-points."autoalign.aligners"]
    my_aligner = "my_package.module:MyAligner"
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from typing import Any, Callable, TypeVar

from .base import Aligner

__all__ = ["register_aligner", "get_aligner", "list_aligners", "describe_aligners", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "autoalign.aligners"
_REGISTRY: dict[str, type[Aligner]] = {}
_plugins_loaded = False

A = TypeVar("A", bound=type[Aligner])


def register_aligner(cls: A | None = None, *, name: str | None = None, replace: bool = False) -> Any:
    """Register an :class:`Aligner` subclass under ``name`` (default: ``cls.name``).

    Works as ``register_aligner(MyAligner)`` or as a decorator ``@register_aligner``
    / ``@register_aligner(name="x")``.

    Raises
    ------
    TypeError
        If ``cls`` is not an Aligner subclass.
    ValueError
        If the name is empty or taken and ``replace`` is False.

    Examples
    --------
    >>> import autoalign
    >>> @autoalign.register_aligner(name="mine-example", replace=True)
    ... class Mine(autoalign.aligners.IdentityAligner):
    ...     pass
    >>> "mine-example" in autoalign.list_aligners()
    True
    """
    if cls is None:
        return lambda c: register_aligner(c, name=name, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Aligner)):
        raise TypeError(f"register_aligner expects an Aligner subclass, got {cls!r}")
    key = name or cls.name
    if not key:
        raise ValueError(f"{cls.__name__} has no name; set the class attribute `name` or pass name=")
    if key in _REGISTRY and _REGISTRY[key] is not cls and not replace:
        raise ValueError(f"an aligner named {key!r} is already registered ({_REGISTRY[key].__qualname__}); pass replace=True")
    _REGISTRY[key] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            register_aligner(cls, name=ep.name, replace=True)
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the library
            warnings.warn(f"could not load aligner plug-in {ep.name!r} ({ep.value}): {exc}", stacklevel=2)


def reload_plugins() -> None:
    """Scan the ``autoalign.aligners`` entry points again (after installing a plug-in)."""
    global _plugins_loaded
    _plugins_loaded = False
    _load_plugins()


def list_aligners(pattern: str | None = None) -> list[str]:
    """Names of the registered aligners (built-in and plug-ins), sorted.

    Parameters
    ----------
    pattern : str, optional
        A shell-style pattern, e.g. ``"*cca*"``.
    """
    _load_plugins()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def describe_aligners() -> dict[str, str]:
    """Name → one-line description of every registered aligner."""
    _load_plugins()
    return {n: (_REGISTRY[n].description or (_REGISTRY[n].__doc__ or "").strip().split("\n")[0]) for n in sorted(_REGISTRY)}


def get_aligner(name: str | Aligner | type[Aligner], **options: Any) -> Aligner:
    """An aligner instance by name (or pass an instance or class through).

    Raises
    ------
    ValueError
        For an unknown name: the message lists the choices and the closest match.
    TypeError
        For options the aligner does not take.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("cca", ridge=0.1)
    CCAAligner(ridge=0.1, ridge_mode='relative')
    """
    if isinstance(name, Aligner):
        if options:
            raise TypeError("options cannot be given together with an aligner instance")
        return name
    if isinstance(name, type) and issubclass(name, Aligner):
        return name(**options)
    if not isinstance(name, str):
        raise TypeError(f"aligner must be a name, an Aligner or an Aligner class, got {type(name).__name__}")
    _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown aligner {name!r}; choose one of {', '.join(sorted(_REGISTRY))}.{hint}")
    cls = _REGISTRY[name]
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"aligner {name!r}: {exc}") from None
