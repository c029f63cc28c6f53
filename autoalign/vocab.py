"""The library's vocabularies: every string option's type and its allowed values.

Each vocabulary is a ``Literal`` type (for annotations and type checkers) and a
tuple of its values (for run-time checks and messages) read from that type, so
the two cannot drift apart. :func:`check_choice` is the one
run-time check; it raises :class:`~autoalign.OptionError` naming the option.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from .errors import OptionError

__all__ = [
    "Needs",
    "NEEDS",
    "SelfMoments",
    "SELF_MOMENTS",
    "Kind",
    "KINDS",
    "Role",
    "ROLES",
    "Features",
    "FEATURES",
    "Scheme",
    "SCHEMES",
    "Repair",
    "REPAIRS",
    "BatchNormMode",
    "BATCHNORMS",
    "Averaging",
    "AVERAGINGS",
    "Precision",
    "PRECISIONS",
    "check_choice",
    "product_dtype_for",
]

#: Which feature statistics an aligner uses: cross-covariances of every model with
#: the reference, of every pair, only each model's own moments, or none (data-free).
Needs = Literal["reference", "all_pairs", "self", "none"]
NEEDS: tuple[str, ...] = get_args(Needs)

#: Each model's own second moments: the full (d, d) covariance or only the variances.
SelfMoments = Literal["full", "diagonal"]
SELF_MOMENTS: tuple[str, ...] = get_args(SelfMoments)

#: Transform kinds from the most restricted to the most general. ``rotary`` (a 2-D rotation
#: on each pair of coordinates that rotary position embeddings rotate together, the
#: identity elsewhere) sits beside ``permutation``, not below it: the two groups share only
#: the identity, so a point restricted to both is frozen (:func:`autoalign.spec.kind_meet`).
Kind = Literal["frozen", "rotary", "permutation", "orthogonal", "linear"]
KINDS: tuple[str, ...] = get_args(Kind)

#: Roles a parameter axis can play.
Role = Literal["output", "input", "channel", "additive", "folded"]
ROLES: tuple[str, ...] = get_args(Role)

#: Where a merge point's features are observed (:meth:`autoalign.MergeSpec.observed_at`).
Features = Literal["activation", "preactivation"]
FEATURES: tuple[str, ...] = get_args(Features)

#: How models are brought together (:mod:`autoalign.schemes`).
Scheme = Literal["all_to_one", "iterative", "hierarchical"]
SCHEMES: tuple[str, ...] = get_args(Scheme)

#: What is done to the merged model after averaging (:mod:`autoalign.repair`).
#: ``None`` (or ``"none"``) is no repair.
Repair = Literal["auto", "reset_bn", "repair", "none"]
REPAIRS: tuple[str, ...] = get_args(Repair)

#: How a BatchNorm at a point with a dense transform is merged.
BatchNormMode = Literal["fold", "transform"]
BATCHNORMS: tuple[str, ...] = get_args(BatchNormMode)

#: How aligned models are combined (:mod:`autoalign.averaging`).
Averaging = Literal["uniform", "fisher", "learned"]
AVERAGINGS: tuple[str, ...] = get_args(Averaging)

#: Precision of the feature products behind the statistics (None: the features' own).
Precision = Literal["float32", "float64"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_choice(option: str, value: Any, choices: tuple[str, ...], *, allow_none: bool = False) -> None:
    """Raise :class:`~autoalign.OptionError` unless ``value`` is one of ``choices``.

    Parameters
    ----------
    option : str
        The option's name, for the message (e.g. ``"scheme"`` or ``"needs of aligner 'x'"``).
    value : Any
        The value given.
    choices : tuple of str
        The allowed values.
    allow_none : bool, default False
        Whether ``None`` is allowed too.

    Examples
    --------
    >>> check_choice("scheme", "iterative", SCHEMES)
    >>> try:
    ...     check_choice("scheme", "iterativ", SCHEMES)
    ... except OptionError as exc:
    ...     print(exc)
    scheme must be one of ('all_to_one', 'iterative', 'hierarchical'), got 'iterativ'
    """
    if value is None and allow_none:
        return
    if not isinstance(value, str) or value not in choices:
        shown = choices + ((None,) if allow_none else ())  # type: ignore[operator]
        raise OptionError(f"{option} must be one of {shown}, got {value!r}")


def product_dtype_for(precision: str | None) -> torch.dtype | None:
    """The product dtype a ``precision`` option asks for.

    Parameters
    ----------
    precision : {None, "float32", "float64"}
        The option of :func:`collect_stats` and :func:`autoalign.merge`.

    Returns
    -------
    torch.dtype or None
        ``torch.float32`` / ``torch.float64``, or None (the features' own precision).

    Raises
    ------
    OptionError
        If ``precision`` is not None, ``"float32"`` or ``"float64"``.
    """
    if precision not in (None, "float32", "float64"):
        raise OptionError(f"precision must be None, 'float32' or 'float64', not {precision!r}")
    return None if precision is None else getattr(torch, precision)
