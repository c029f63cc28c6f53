"""The options of a merge, validated once: :class:`MergeOptions`.

:func:`autoalign.merge` builds one from its keyword arguments (the ones it does
not know go to the aligner) and checks it before any work; the command line
builds the same object from its flags. Each option is documented on
:func:`autoalign.merge`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .calibration import Calibration
from .errors import OptionError
from .progress import Progress
from .trace import TRACERS
from .validate import validate_options
from .vocab import AVERAGINGS, BATCHNORMS, FEATURES, REPAIRS, SCHEMES, check_choice, product_dtype_for

__all__ = ["MergeOptions", "MERGE_ARGUMENTS"]


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge but the models and the data.

    Attributes
    ----------
    aligner : str or Aligner
        A registered name, an instance, or ``"auto"``.
    aligner_options : dict
        Hyperparameters of the aligner (e.g. ``{"ridge": 0.1}``).
    reference : int or "best"
    weights : sequence of float, optional
    scheme, max_iterations, averaging, averaging_options, repair, batchnorm, features :
        See :func:`autoalign.merge`.
    num_batches, device, input_fn, progress, shard :
        How calibration data is read (:class:`~autoalign.calibration.Calibration`);
        ``progress`` is the display the whole merge reports to (:mod:`autoalign.progress`).
    spec : MergeSpec, optional
        A precomputed spec.
    tracer : {"auto", "fx", "export"}
        The front end (:func:`autoalign.trace`).
    leaf_modules, autowrap_functions :
        Tracing escape hatches (:func:`autoalign.trace`).
    precision : {None, "float32", "float64"}
    rules : dict, optional
        Channel rules for this merge only (see :func:`autoalign.find_merge_points`).

    Examples
    --------
    >>> import autoalign
    >>> opts = autoalign.MergeOptions.from_kwargs(aligner="cca", ridge=0.1, repair=None)
    >>> opts.aligner_options, opts.repair
    ({'ridge': 0.1}, None)
    >>> opts.check(n_models=2)
    >>> try:
    ...     autoalign.MergeOptions(scheme="tree").check(n_models=2)
    ... except autoalign.OptionError as exc:
    ...     print(exc)
    scheme must be one of ('all_to_one', 'iterative', 'hierarchical'), got 'tree'
    """

    aligner: Any = "procrustes"
    aligner_options: dict[str, Any] = field(default_factory=dict)
    reference: int | str = 0
    weights: Sequence[float] | None = None
    scheme: str = "all_to_one"
    max_iterations: int = 10
    averaging: str = "uniform"
    averaging_options: dict[str, Any] | None = None
    repair: str | None = "auto"
    batchnorm: str = "fold"
    features: str = "activation"
    num_batches: int | None = None
    device: torch.device | str | None = None
    input_fn: Callable[[Any], Any] | None = None
    spec: Any = None
    progress: "bool | Progress" = False
    tracer: str = "auto"
    leaf_modules: Sequence[Any] = ()
    autowrap_functions: Sequence[Callable[..., Any]] = ()
    precision: str | None = None
    shard: bool = False
    rules: Mapping[Any, Callable[..., Any]] | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "MergeOptions":
        """Options from :func:`autoalign.merge`'s keyword arguments; the ones that are not
        merge options are the aligner's."""
        known = {k: v for k, v in kwargs.items() if k in MERGE_ARGUMENTS}
        rest = {k: v for k, v in kwargs.items() if k not in MERGE_ARGUMENTS and k != "aligner_options"}
        return cls(**known, aligner_options={**(kwargs.get("aligner_options") or {}), **rest})

    def replace(self, **changes: Any) -> "MergeOptions":
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)

    @property
    def trace_options(self) -> dict[str, Any]:
        """``tracer``, ``leaf_modules`` and ``autowrap_functions`` for :func:`autoalign.trace`."""
        return {"tracer": self.tracer, "leaf_modules": self.leaf_modules, "autowrap_functions": self.autowrap_functions}

    @property
    def repair_mode(self) -> str | None:
        """``repair`` with ``"none"`` read as None."""
        return None if self.repair in (None, "none") else self.repair

    def check(self, n_models: int) -> None:
        """Raise :class:`~autoalign.OptionError` (a :class:`~autoalign.MergeError`) naming the
        first bad option, before any work.

        Parameters
        ----------
        n_models : int
            The number of models to merge (for ``weights`` and ``reference``).
        """
        validate_options(n_models, weights=self.weights)
        check_choice("repair", self.repair, REPAIRS, allow_none=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("batchnorm", self.batchnorm, BATCHNORMS)
        check_choice("features", self.features, FEATURES)
        check_choice("tracer", self.tracer, TRACERS)
        if self.batchnorm == "transform" and self.repair_mode is None:
            raise OptionError(
                "batchnorm='transform' multiplies BatchNorm running statistics by dense matrices, which leaves "
                "them meaningless (even negative variances); it needs repair='reset_bn' (the authors' choice), "
                "'repair' or 'auto', not repair=None"
            )
        check_choice("averaging", self.averaging, AVERAGINGS)
        product_dtype_for(self.precision)
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise OptionError(f"max_iterations must be a positive int, got {self.max_iterations!r}")
        if isinstance(self.reference, str) and self.reference != "best":
            raise OptionError(f'reference must be a model index or "best", got {self.reference!r}')
        if not isinstance(self.reference, str) and (
            isinstance(self.reference, bool) or not isinstance(self.reference, int) or not 0 <= self.reference < n_models
        ):
            raise OptionError(f"reference must be an index in [0, {n_models}), got {self.reference!r}")

    def merge_weights(self, n_models: int) -> torch.Tensor:
        """The merge weights as a float64 tensor of shape ``(N,)`` summing to one (after
        :meth:`check`, which rejects weights of the wrong length, negative or summing to zero)."""
        if self.weights is None:
            return torch.full((n_models,), 1.0 / n_models, dtype=torch.float64)
        w = torch.as_tensor(list(self.weights), dtype=torch.float64)
        return w / w.sum()

    def calibration(self, data: Iterable[Any]) -> Calibration:
        """The calibration data read as these options say."""
        return Calibration.coerce(
            data, input_fn=self.input_fn, num_batches=self.num_batches, device=self.device, progress=self.progress,
            shard=self.shard,
        )


#: :func:`autoalign.merge`'s own keyword arguments (the others are the aligner's).
MERGE_ARGUMENTS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MergeOptions) if f.name != "aligner_options")
