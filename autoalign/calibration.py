"""Calibration data: one object that every pass of a merge reads its batches from.

:class:`Calibration` holds the data (a DataLoader or a list of batches), the
function that picks the model inputs out of a batch, the batch limit, the
device and the progress display (:mod:`autoalign.progress`; every pass reports its
batches to it). It is built and checked once, by
:func:`autoalign.merge`; the statistics pass, the repair passes, averaging, the
reference choice and aligner selection all take it and ask it for ready inputs
(:meth:`Calibration.inputs`) or for batches with their class targets
(:meth:`Calibration.labelled`). Under ``torch.distributed`` a process's
calibration data is its shard; the passes reduce what they accumulate
(:mod:`autoalign.distributed`).

The public functions that take ``data`` (:func:`autoalign.collect_stats`,
:func:`autoalign.reset_bn`, ...) accept a :class:`Calibration` as well as raw
batches with ``input_fn=``/``num_batches=``/``device=``
(:meth:`Calibration.coerce`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .distributed import rank_and_world
from .errors import AutoalignError, DataError, OptionError
from .progress import Progress, make_progress
from .trace import as_input_tuple

__all__ = ["Calibration", "default_input_fn", "class_targets", "class_sorted", "batch_error", "describe_inputs", "NO_BATCH"]

#: Message for calibration data that yields no batch.
NO_BATCH = (
    "the calibration data yielded no batch; pass a non-empty DataLoader or list of batches "
    "(check the dataset length, drop_last=, num_batches= and, under torch.distributed, the sampler's shard)"
)


def default_input_fn(batch: Any) -> tuple[Any, ...]:
    """Model inputs from a batch: a tensor, the first element of a tuple/list
    ``(input, target)``, or the ``"input"``/``"image"``/``"x"`` entry of a dict (also
    ``"pixel_values"`` and ``"input_ids"``, as Hugging Face's collators name them; only that
    entry is passed, so an attention mask is not: pass ``input_fn=`` for padded batches).

    Examples
    --------
    >>> import torch
    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    >>> default_input_fn((x, y))[0] is x, default_input_fn({"image": x})[0] is x
    (True, True)
    """
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, dict):
        for k in ("input", "inputs", "image", "images", "x", "pixel_values", "input_ids"):
            if k in batch:
                return (batch[k],)
        raise DataError(f"cannot find the model input in a batch dict with keys {sorted(batch)}; pass input_fn=")
    raise DataError(f"cannot use a batch of type {type(batch).__name__} as model input; pass input_fn=")


def describe_inputs(inputs: Sequence[Any]) -> str:
    """A short description of model inputs for error messages.

    Examples
    --------
    >>> import torch
    >>> describe_inputs((torch.zeros(2, 3), 5))
    'Tensor(shape=(2, 3), dtype=torch.float32), int'
    """
    parts = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            parts.append(f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype})")
        else:
            parts.append(type(t).__name__)
    return ", ".join(parts) if parts else "no inputs"


def _dtype_hint(model: nn.Module, inputs: Sequence[Any]) -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    fin = {t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(dtypes) == 1 and fin and fin != dtypes:
        (dt,) = dtypes
        return f"; the model is {dt} but the batch holds {sorted(map(str, fin))} tensors: convert the data, e.g. input_fn=lambda b: b[0].to({dt})"
    return ""


def batch_error(model: nn.Module, inputs: Sequence[Any], batch: int, exc: BaseException, who: str = "the model") -> str:
    """The message for a batch the model cannot consume.

    Examples
    --------
    >>> import torch
    >>> msg = batch_error(torch.nn.Linear(3, 2), (torch.zeros(1, 5),), 4, RuntimeError("bad shape"))
    >>> print(msg[:83])
    calibration batch 4 cannot be fed to the model (Linear): inputs Tensor(shape=(1, 5)
    >>> "pass input_fn=" in msg
    True
    """
    return (
        f"calibration batch {batch} cannot be fed to {who} ({type(model).__name__}): inputs {describe_inputs(inputs)}; "
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{_dtype_hint(model, inputs)}. "
        "If the batch is not (input, target), a tensor or a dict with an 'input'/'image'/'x' key, "
        "pass input_fn= returning the model's positional inputs"
    )


def class_targets(batch: Any, n: int | None = None) -> torch.Tensor | None:
    """The integer class targets of an ``(input, target)`` batch, shape ``(B,)``, or None.

    ``n``, when given, is the batch size the targets must have.

    Examples
    --------
    >>> import torch
    >>> class_targets((torch.zeros(2, 3), torch.tensor([0, 1]))).tolist(), class_targets(torch.zeros(2, 3))
    ([0, 1], None)
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        y = batch[1]
        if y.dim() == 1 and not y.is_floating_point() and (n is None or y.shape[0] == n):
            return y
    return None


def class_sorted(targets: Sequence[torch.Tensor], min_pairs: int = 32) -> bool:
    """Whether batches' class targets look sorted by class rather than drawn at random.

    Counts the pairs of samples in one batch that share their class and compares the count
    with random batchings of the same labels into batches of the same sizes (32 seeded
    permutations): the batches count as sorted when the fraction of same-class pairs exceeds
    the random one ``q`` by at least a quarter of the way to 1, ``0.25 (1 − q)``, and by five
    standard deviations of the random batchings. A ``DataLoader(shuffle=False)`` over an
    image folder (one folder per class) or a data set stored class by class gives batches of
    one or two classes.

    Parameters
    ----------
    targets : sequence of Tensor
        Per batch, its integer class targets, shape ``(B,)``.
    min_pairs : int, default 32
        Fewer same-batch pairs than this (or fewer than two classes) decide nothing: False.

    Returns
    -------
    bool

    Examples
    --------
    >>> import torch
    >>> y = torch.arange(4).repeat_interleave(16)            # 64 labels, class by class
    >>> mixed = y[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    >>> class_sorted(list(y.split(8))), class_sorted(list(mixed.split(8)))
    (True, False)
    """
    sizes = [int(t.numel()) for t in targets]
    pairs = sum(b * (b - 1) for b in sizes) / 2
    if pairs < min_pairs:
        return False
    _, labels = torch.unique(torch.cat([t.reshape(-1).cpu() for t in targets]), return_inverse=True)
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        return False
    batch_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)) * n_classes

    def same(order: torch.Tensor) -> float:
        counts = torch.bincount(batch_of + order, minlength=len(sizes) * n_classes).to(torch.float64)
        return float((counts * (counts - 1)).sum()) / 2 / pairs

    g = torch.Generator().manual_seed(0)
    random = torch.tensor([same(labels[torch.randperm(len(labels), generator=g)]) for _ in range(32)], dtype=torch.float64)
    q, spread = float(random.mean()), float(random.std())
    excess = same(labels) - q
    return excess >= 0.25 * (1.0 - q) and excess >= 5.0 * spread


def _rebatch(batches: list[Any], seed: int) -> list[Any] | None:
    """The samples of in-memory batches in a fixed random order, cut into batches of the
    same sizes; None unless every batch is a tensor, or a tuple, list or dict of tensors with
    one leading (sample) size, all of one structure."""

    def parts(batch: Any) -> tuple[Any, list[torch.Tensor]] | None:
        if isinstance(batch, torch.Tensor):
            return None, [batch]
        if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
            return type(batch), list(batch)
        if isinstance(batch, dict) and batch and all(isinstance(t, torch.Tensor) for t in batch.values()):
            return tuple(batch), list(batch.values())
        return None

    split = [parts(b) for b in batches]
    if not split or any(p is None for p in split) or len({(p[0], len(p[1])) for p in split}) != 1:  # type: ignore[index]
        return None
    kind, first = split[0]  # type: ignore[misc]
    sizes = []
    for _, tensors in split:  # type: ignore[misc]
        lead = {t.shape[0] if t.dim() else -1 for t in tensors}
        if len(lead) != 1 or -1 in lead:
            return None
        sizes.append(lead.pop())
    try:
        columns = [torch.cat([p[1][i] for p in split]) for i in range(len(first))]  # type: ignore[index]
    except RuntimeError:  # trailing shapes differ between batches
        return None
    order = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))
    columns = [c[order.to(c.device)] for c in columns]
    out: list[Any] = []
    for cut in zip(*(c.split(sizes) for c in columns)):
        if kind is None:
            out.append(cut[0])
        elif isinstance(kind, tuple):
            out.append(dict(zip(kind, cut)))
        else:
            out.append(kind(cut))
    return out


class _Window:
    """The batches ``start <= i < stop`` of a re-iterable (re-iterable itself)."""

    def __init__(self, data: Iterable[Any], start: int, stop: int | None) -> None:
        self.data, self.start, self.stop = data, start, stop

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if self.stop is not None and i >= self.stop:
                return
            if i >= self.start:
                yield batch

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an open-ended window has no length")
        return self.stop - self.start


@dataclass(frozen=True)
class Calibration:
    """Calibration batches and how to read them.

    Parameters
    ----------
    data : re-iterable of batches
        A DataLoader or a list: tensors, ``(input, target)`` pairs or dicts.
    input_fn : callable, optional
        ``input_fn(batch)`` returns the model input (a tensor or a tuple of
        positional arguments). Default: :func:`default_input_fn`.
    num_batches : int, optional
        Read at most this many batches per pass.
    device : torch.device, optional
        Where inputs go (default: where each model's parameters are).
    progress : bool or Progress, default False
        The progress display every pass reports its batches to: a true value shows a
        :class:`~autoalign.progress.LineProgress` on stderr, false the silent
        :class:`~autoalign.progress.Progress` (see :mod:`autoalign.progress`). Stored as
        the display itself, false in a boolean context when silent.
    shard : bool, default False
        Under ``torch.distributed``: every process passes the same (whole) data and
        reads only its share, the batches ``i`` with ``i % world_size == rank``
        (after ``num_batches`` is applied to the whole), so the processes together
        see each batch once. Without it, each process passes its own shard. A no-op
        when not distributed.

    Raises
    ------
    OptionError
        When ``data`` is a one-shot iterator, or ``num_batches`` is not a positive int.

    Examples
    --------
    >>> import torch, autoalign
    >>> calib = autoalign.Calibration([(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))] * 3, num_batches=2)
    >>> [tuple(x.shape) for (x,) in calib.inputs("cpu")]
    [(4, 3), (4, 3)]
    >>> tuple(calib.example()[0].shape)
    (2, 3)
    >>> calib.progress
    Progress()
    """

    data: Iterable[Any]
    input_fn: Callable[[Any], Any] = default_input_fn
    num_batches: int | None = None
    device: torch.device | None = None
    progress: "bool | Progress" = False
    shard: bool = False

    def __post_init__(self) -> None:
        if iter(self.data) is self.data:  # type: ignore[comparison-overlap]
            raise OptionError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
        nb = self.num_batches
        if nb is not None and (isinstance(nb, bool) or not isinstance(nb, int) or nb < 1):
            raise OptionError(f"num_batches must be a positive int or None (all batches), got {nb!r}")
        if self.input_fn is None:
            object.__setattr__(self, "input_fn", default_input_fn)
        if self.device is not None and not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "progress", make_progress(self.progress))

    @classmethod
    def coerce(
        cls,
        data: "Iterable[Any] | Calibration",
        *,
        input_fn: Callable[[Any], Any] | None = None,
        num_batches: int | None = None,
        device: torch.device | str | None = None,
        progress: "bool | Progress" = False,
        shard: bool = False,
    ) -> "Calibration":
        """``data`` itself when it is a :class:`Calibration`, else one built from the arguments.

        Raises
        ------
        OptionError
            When ``data`` is a :class:`Calibration` and an argument asks for something
            else than it holds (say it once, in the Calibration).
        """
        if isinstance(data, Calibration):
            given = {"input_fn": input_fn, "num_batches": num_batches, "device": None if device is None else torch.device(device),
                     "progress": True if progress else None, "shard": shard or None}
            held = {k: bool(getattr(data, k)) if k == "progress" else getattr(data, k) for k in given}
            clash = [k for k, v in given.items() if v is not None and v != held[k]]
            if clash:
                raise OptionError(
                    f"data is a Calibration, which sets {', '.join(clash)} itself; pass "
                    f"{', '.join(f'{k}=' for k in clash)} to the Calibration, not here"
                )
            return data
        return cls(data, input_fn or default_input_fn, num_batches, None if device is None else torch.device(device), progress, shard)

    def device_for(self, model: nn.Module) -> torch.device:
        """Where ``model``'s inputs go: the calibration's device, else where its parameters are."""
        if self.device is not None:
            return self.device
        return next((p.device for p in model.parameters()), torch.device("cpu"))

    def __len__(self) -> int:
        """The number of batches a pass reads (raises TypeError for data without a length)."""
        total = len(self.data)  # type: ignore[arg-type]
        return total if self.num_batches is None else min(total, self.num_batches)

    def batches(self, desc: str | None = None) -> Iterator[Any]:
        """The raw batches of one pass (at most ``num_batches``); the pass, named ``desc``,
        and each batch are reported to :attr:`progress` (counted among this process's
        share with ``shard=True``)."""
        progress = self.progress
        rank, world = rank_and_world() if self.shard else (0, 1)
        total: int | None = None
        if progress:
            try:
                total = len(self)
            except TypeError:
                total = self.num_batches
            if total is not None:
                total = len(range(rank, total, world))  # this process's share
        progress.pass_started(desc, total)
        read = 0
        try:
            for seen, batch in enumerate(self.data):
                if self.num_batches is not None and seen >= self.num_batches:
                    return
                if seen % world == rank:
                    read += 1
                    progress.batch(read)
                    yield batch
        finally:
            progress.pass_finished()

    def inputs_of(self, batch: Any, device: torch.device | str | None) -> tuple[Any, ...]:
        """A batch's model inputs, tensors moved to ``device`` (None: left where they are)."""
        inputs = as_input_tuple(self.input_fn(batch))
        if device is None:
            return inputs
        dev = torch.device(device)
        return tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)

    def inputs(self, device: torch.device | str | None, desc: str | None = None) -> Iterator[tuple[Any, ...]]:
        """The model inputs of one pass, tensors on ``device``."""
        for batch in self.batches(desc):
            yield self.inputs_of(batch, device)

    def labelled(self, device: torch.device | str | None, desc: str | None = None) -> Iterator[tuple[tuple[Any, ...], Any]]:
        """``(inputs, batch)`` per batch of one pass: the ready inputs and the raw batch,
        whose class targets :func:`class_targets` reads."""
        for batch in self.batches(desc):
            yield self.inputs_of(batch, device), batch

    def example(self) -> tuple[Any, ...]:
        """The first batch's inputs cut to two samples (for tracing), on the calibration's device.

        Raises
        ------
        DataError
            When the data yields no batch.
        """
        for batch in self.data:
            inputs = self.inputs_of(batch, self.device)
            return tuple(t[:2] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
        raise DataError(NO_BATCH)

    def window(self, start: int, stop: int | None) -> "Calibration":
        """The same calibration restricted to batches ``start <= i < stop`` (no batch limit)."""
        return replace(self, data=_Window(self.data, start, stop), num_batches=None)

    def shuffled(self, seed: int = 0) -> "Calibration | None":
        """The same samples in a fixed random order (``torch.randperm`` under ``seed``), for
        passes whose result depends on which samples share a batch (BatchNorm in training
        mode: :func:`autoalign.reset_bn`, :func:`autoalign.repair.repair_producers`).

        A list of batches (tensors, or tuples, lists or dicts of tensors) is cut again into
        batches of the same sizes from its first ``num_batches`` batches; a DataLoader over a
        map-style data set is rebuilt over the permuted data set with its batch size, collate
        function and workers (``num_batches`` then reads a random part of all of it).

        Returns
        -------
        Calibration or None
            None when the data cannot be reordered (an iterable data set, a custom batch
            sampler, other batch types, or any other iterable).

        Examples
        --------
        >>> import torch, autoalign
        >>> calib = autoalign.Calibration([(torch.arange(4.0), torch.zeros(4)), (torch.arange(4.0, 8.0), torch.ones(4))])
        >>> [x.tolist() for (x,) in calib.shuffled(seed=0).inputs("cpu")]
        [[4.0, 0.0, 7.0, 3.0], [2.0, 5.0, 1.0, 6.0]]
        """
        data = self.data
        if isinstance(data, torch.utils.data.DataLoader):
            dataset = data.dataset
            if isinstance(dataset, torch.utils.data.IterableDataset) or data.batch_size is None:
                return None
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                return None
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, order), batch_size=data.batch_size, shuffle=False, drop_last=data.drop_last,
                collate_fn=data.collate_fn, num_workers=data.num_workers, pin_memory=data.pin_memory,
                worker_init_fn=data.worker_init_fn,
            )
            return replace(self, data=loader)
        if isinstance(data, (list, tuple)):
            batches = list(data) if self.num_batches is None else list(data)[: self.num_batches]
            again = _rebatch(batches, seed)
            return None if again is None else replace(self, data=again, num_batches=None)
        return None

    def run(self, model: nn.Module, inputs: tuple[Any, ...], batch: int, who: str = "the model", *, named: nn.Module | None = None) -> Any:
        """``model(*inputs)``; any error but the library's is re-raised as a :class:`DataError`
        naming the batch, ``who`` and the class of ``named`` (default ``model``; a traced copy
        names the user's model). The run is reported to :attr:`progress`."""
        self.progress.model_run(who)
        try:
            return model(*inputs)
        except AutoalignError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised naming the batch
            raise DataError(batch_error(named if named is not None else model, inputs, batch, exc, who=who)) from exc
