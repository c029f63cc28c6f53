"""Exception hierarchy of autoalign.

Every error raised on purpose by the library derives from :class:`AutoalignError`,
so callers can catch one base class. Messages name the offending parameter, node
or merge point and say what to do.
"""

from __future__ import annotations

__all__ = [
    "AutoalignError",
    "TraceError",
    "UnsupportedOpError",
    "SpecError",
    "MergeError",
]


class AutoalignError(Exception):
    """Base class of all errors raised by autoalign."""


class TraceError(AutoalignError):
    """The model could not be traced with ``torch.fx``.

    The message names the module or node that failed and suggests the escape
    hatches (``leaf_modules=`` / ``autowrap_functions=``).
    """


class UnsupportedOpError(AutoalignError):
    """A graph node has no channel rule and ``strict=True`` was asked for."""


class SpecError(AutoalignError, ValueError):
    """A merge spec is malformed or does not fit the model it is applied to."""


class MergeError(AutoalignError, ValueError):
    """The models, data or options given to a merge are unusable."""
