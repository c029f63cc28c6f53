"""Exception hierarchy of autoalign.

Every error raised on purpose by the library derives from :class:`AutoalignError`,
so callers can catch one base class. Messages name the offending parameter, node
or merge point and say what to do.

::

    AutoalignError
    ├── TraceError                      the model cannot be traced with torch.fx
    ├── UnsupportedOpError              a node has no channel rule (strict=True)
    ├── SpecError (ValueError)          a malformed spec, or one that does not fit the model
    └── MergeError (ValueError)         unusable models, data or options given to a merge
        ├── ModelError                  no models, or models that differ in architecture, shapes, device, dtype
        ├── DataError                   calibration data is empty or cannot be fed to the models
        ├── NonFiniteError              NaN/Inf in parameters, features or a merged parameter
        └── OptionError (TypeError)     unknown or invalid options (aligner name, its options, weights)

:class:`OptionError` is also a :class:`TypeError` (unknown keyword arguments used to
raise ``TypeError``) and, through :class:`MergeError`, a :class:`ValueError`, so
``except TypeError``, ``except ValueError`` and ``except MergeError`` written for
older versions keep working.
"""

from __future__ import annotations

__all__ = [
    "AutoalignError",
    "TraceError",
    "UnsupportedOpError",
    "SpecError",
    "MergeError",
    "ModelError",
    "DataError",
    "NonFiniteError",
    "OptionError",
]


class AutoalignError(Exception):
    """Base class of all errors raised by autoalign.

    Examples
    --------
    >>> import autoalign
    >>> try:
    ...     autoalign.merge([], [])
    ... except autoalign.AutoalignError as exc:
    ...     print(type(exc).__name__)
    ModelError
    """


class TraceError(AutoalignError):
    """The model could not be traced with ``torch.fx``.

    The message names the module or node that failed and suggests the escape
    hatches (``leaf_modules=`` / ``autowrap_functions=``).

    Examples
    --------
    >>> import autoalign
    >>> issubclass(autoalign.TraceError, autoalign.AutoalignError)
    True
    """


class UnsupportedOpError(AutoalignError):
    """A graph node has no channel rule and ``strict=True`` was asked for.

    Examples
    --------
    >>> import autoalign
    >>> issubclass(autoalign.UnsupportedOpError, autoalign.AutoalignError)
    True
    """


class SpecError(AutoalignError, ValueError):
    """A merge spec is malformed or does not fit the model it is applied to.

    Examples
    --------
    >>> import autoalign
    >>> issubclass(autoalign.SpecError, ValueError)
    True
    """


class MergeError(AutoalignError, ValueError):
    """The models, data or options given to a merge are unusable.

    The subclasses :class:`ModelError`, :class:`DataError`,
    :class:`NonFiniteError` and :class:`OptionError` say which.

    Examples
    --------
    >>> import autoalign
    >>> try:
    ...     autoalign.merge([], [])
    ... except autoalign.MergeError as exc:
    ...     print(exc)
    merge needs at least one model, got an empty list
    """


class ModelError(MergeError):
    """The ``models`` argument is unusable: empty, not ``nn.Module``s, or models
    that differ in class, state-dict keys, shapes, devices, dtypes or tied
    parameters.

    The message names the first model and parameter that differ.

    Examples
    --------
    >>> import torch, autoalign
    >>> a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    >>> try:
    ...     autoalign.merge([a, b], [torch.randn(4, 2)])
    ... except autoalign.ModelError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    parameter 'weight' has shape (4, 2) in models[1] but (3, 2) in models[0]; ...
    """


class DataError(MergeError):
    """The calibration data yields no batch, or a batch the models cannot consume.

    The message names the batch and suggests ``input_fn=``.

    Examples
    --------
    >>> import torch, autoalign
    >>> nets = [torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)]
    >>> try:
    ...     autoalign.merge(nets, [])
    ... except autoalign.DataError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    the calibration data yielded no batch; ...
    """


class NonFiniteError(MergeError):
    """NaN or Inf in a model's parameters, in its features at a merge point, or
    in a merged parameter. The message names the parameter or merge point.

    Examples
    --------
    >>> import autoalign
    >>> issubclass(autoalign.NonFiniteError, autoalign.MergeError)
    True
    """


class OptionError(MergeError, TypeError):
    """An unknown or invalid option: an aligner name or aligner option that does
    not exist (the message lists the valid ones), or an invalid value such as
    negative merge weights.

    Also a :class:`TypeError` and a :class:`ValueError` for compatibility.

    Examples
    --------
    >>> import autoalign
    >>> try:
    ...     autoalign.get_aligner("cca", ridg=0.1)
    ... except autoalign.OptionError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    aligner 'cca' has no option 'ridg' (did you mean 'ridge'?); valid options: ridge, ridge_mode...
    """
