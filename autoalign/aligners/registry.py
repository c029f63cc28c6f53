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
import inspect
import warnings
from typing import Any, TypeVar

from ..errors import OptionError
from ..options import MERGE_ARGUMENTS
from ..vocab import NEEDS, SELF_MOMENTS
from .base import Aligner

__all__ = ["register_aligner", "unregister_aligner", "aligner_class", "snapshot", "restore", "get_aligner", "list_aligners", "describe_aligners", "aligner_options", "reload_plugins", "ENTRY_POINT_GROUP"]

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
    OptionError
        If ``cls`` is not an Aligner subclass, has no name, declares ``needs`` or
        ``self_moments`` outside their vocabularies (:mod:`autoalign.vocab`), does
        not implement ``solve``, or the name is taken and ``replace`` is False.
        (``OptionError`` is a ``TypeError`` and a ``ValueError``, as raised before.)

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
        raise OptionError(f"register_aligner expects an Aligner subclass, got {cls!r}")
    key = name or cls.name
    if not key or not isinstance(key, str):
        raise OptionError(f"{cls.__name__} has no name; set the class attribute `name` or pass name=")
    if cls.needs not in NEEDS:
        raise OptionError(f"aligner {key!r} ({cls.__qualname__}) declares needs={cls.needs!r}; expected one of {NEEDS}")
    if cls.self_moments not in SELF_MOMENTS:
        raise OptionError(
            f"aligner {key!r} ({cls.__qualname__}) declares self_moments={cls.self_moments!r}; expected one of {SELF_MOMENTS}"
        )
    if not callable(getattr(cls, "solve", None)) or cls.solve is Aligner.solve:
        raise OptionError(f"aligner {key!r} ({cls.__qualname__}) does not implement solve(problem)")
    if key in _REGISTRY and _REGISTRY[key] is not cls and not replace:
        raise OptionError(f"an aligner named {key!r} is already registered ({_REGISTRY[key].__qualname__}); pass replace=True")
    _REGISTRY[key] = cls
    return cls


def unregister_aligner(name: str) -> None:
    """Remove the aligner registered under ``name`` (nothing happens for an unknown name).

    Examples
    --------
    >>> import autoalign
    >>> @autoalign.register_aligner(name="gone-example", replace=True)
    ... class Gone(autoalign.aligners.IdentityAligner):
    ...     pass
    >>> unregister_aligner("gone-example"); "gone-example" in autoalign.list_aligners()
    False
    """
    _REGISTRY.pop(name, None)


def aligner_class(name: str) -> type[Aligner]:
    """The class registered under ``name``.

    Raises
    ------
    OptionError
        For an unknown name (as :func:`get_aligner`).
    """
    _load_plugins()
    if name not in _REGISTRY:
        get_aligner(name)  # raises, naming the choices
    return _REGISTRY[name]


def snapshot() -> dict[str, type[Aligner]]:
    """A copy of the registry, for :func:`restore` (e.g. around a test that registers aligners)."""
    return dict(_REGISTRY)


def restore(saved: dict[str, type[Aligner]]) -> None:
    """Put the registry back as :func:`snapshot` saw it."""
    _REGISTRY.clear()
    _REGISTRY.update(saved)


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
    """Scan the ``autoalign.aligners`` entry points again (after installing a plug-in).

    Examples
    --------
    >>> import autoalign
    >>> autoalign.aligners.reload_plugins()
    >>> "cca" in autoalign.list_aligners()
    True
    """
    global _plugins_loaded
    _plugins_loaded = False
    _load_plugins()


def list_aligners(pattern: str | None = None) -> list[str]:
    """Names of the registered aligners (built-in and plug-ins), sorted.

    Parameters
    ----------
    pattern : str, optional
        A shell-style pattern, e.g. ``"*cca*"``.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.list_aligners("*cca")
    ['cca', 'mcca']
    """
    _load_plugins()
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def describe_aligners() -> dict[str, str]:
    """Name → one-line description of every registered aligner.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.aligners.describe_aligners()["identity"]
    'plain weight averaging, no alignment (baseline)'
    """
    _load_plugins()
    return {n: (_REGISTRY[n].description or (_REGISTRY[n].__doc__ or "").strip().split("\n")[0]) for n in sorted(_REGISTRY)}


def aligner_options(cls: type[Aligner] | str) -> list[str] | None:
    """The keyword options an aligner class takes (``None`` when it accepts any).

    Examples
    --------
    >>> import autoalign
    >>> autoalign.aligners.registry.aligner_options("cca")
    ['ridge', 'ridge_mode']
    >>> autoalign.aligners.registry.aligner_options("identity")
    []
    """
    if isinstance(cls, str):
        _load_plugins()
        cls = _REGISTRY[cls]
    init = cls.__init__
    if init is Aligner.__init__:
        return []
    try:
        params = list(inspect.signature(init).parameters.values())[1:]
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _unknown_option_message(name: str, unknown: list[str], valid: list[str]) -> str:
    parts = []
    for u in unknown:
        close = difflib.get_close_matches(u, valid, n=1)
        if close:
            parts.append(f"{u!r} (did you mean {close[0]!r}?)")
            continue
        close = difflib.get_close_matches(u, list(MERGE_ARGUMENTS), n=1)
        parts.append(f"{u!r}" + (f" (did you mean merge()'s argument {close[0]!r}?)" if close else ""))
    what = "option" if len(unknown) == 1 else "options"
    return (
        f"aligner {name!r} has no {what} {', '.join(parts)}; valid options: {', '.join(valid) if valid else 'none'} "
        "(merge() passes keyword arguments it does not know itself to the aligner, so check its own arguments' spelling too)"
    )


def get_aligner(name: str | Aligner | type[Aligner], **options: Any) -> Aligner:
    """An aligner instance by name (or pass an instance or class through).

    Raises
    ------
    OptionError
        For an unknown name (the message lists the choices and the closest
        match), an option the aligner does not take (the message names it and
        lists the valid ones) or an invalid option value. ``OptionError`` is a
        ``TypeError`` and a ``ValueError``, as older versions raised.

    Examples
    --------
    >>> import autoalign
    >>> autoalign.get_aligner("cca", ridge=0.1)
    CCAAligner(ridge=0.1, ridge_mode='relative')
    >>> try:
    ...     autoalign.get_aligner("cca", ridg=0.1)
    ... except autoalign.OptionError as exc:
    ...     print(str(exc)[:73])
    aligner 'cca' has no option 'ridg' (did you mean 'ridge'?); valid options
    """
    if isinstance(name, Aligner):
        if options:
            raise OptionError(
                f"options {sorted(options)} cannot be given together with an aligner instance; "
                f"configure the instance instead, e.g. {type(name).__name__}({', '.join(f'{k}=...' for k in sorted(options))})"
            )
        return name
    if isinstance(name, type) and issubclass(name, Aligner):
        cls, label = name, name.name or name.__name__
    elif not isinstance(name, str):
        raise OptionError(f"aligner must be a name, an Aligner or an Aligner class, got {type(name).__name__}")
    else:
        _load_plugins()
        if name not in _REGISTRY:
            close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"unknown aligner {name!r}; choose one of {', '.join(sorted(_REGISTRY))}.{hint}")
        cls, label = _REGISTRY[name], name
    valid = aligner_options(cls)
    if valid is not None:
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise OptionError(_unknown_option_message(label, unknown, valid))
    try:
        return cls(**options)
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:
        valid_txt = f" (valid options: {', '.join(valid) if valid else 'none'})" if valid is not None else ""
        raise OptionError(f"aligner {label!r}: {exc}{valid_txt}") from None
