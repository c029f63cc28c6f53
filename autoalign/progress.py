"""One progress display for a whole merge: :class:`Progress` (silent) and :class:`LineProgress`.

Every stage of the pipeline is timed by :meth:`autoalign.report.Timings.stage`, and every
pass over the calibration data reads its batches from
:meth:`autoalign.calibration.Calibration.batches`; both report to the one :class:`Progress`
that the merge's :class:`~autoalign.calibration.Calibration` holds, so one object draws:

* ``Progress()``, the null display: every hook does nothing. Library calls get it by
  default (``progress=False``).
* :class:`LineProgress`: one status line on stderr naming the stage, the pass's batch
  and the model being run (``statistics: batch 5/8, model 2/4``), then a summary
  with the seconds per stage. On a terminal the line is redrawn in place; elsewhere
  (a pipe, a log file, CI) it writes plain lines: one when a stage starts, one when a
  pass ends and one every ``interval`` seconds inside a long pass. Under
  ``torch.distributed`` only rank 0 writes.

:func:`make_progress` turns the ``progress=`` option (a bool or a display) into one.
``autoalign merge`` on the command line shows a :class:`LineProgress` unless ``--quiet``.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, TextIO

from .distributed import rank_and_world

__all__ = ["Progress", "LineProgress", "make_progress"]


class Progress:
    """The progress display's interface, and its null implementation: every hook does nothing.

    Stages (:meth:`autoalign.report.Timings.stage`) and calibration passes
    (:meth:`autoalign.calibration.Calibration.batches`) report here; a subclass draws.
    A silent display is false in a boolean context.

    Examples
    --------
    >>> import autoalign
    >>> p = autoalign.Progress()
    >>> bool(p), autoalign.Calibration([1, 2]).progress
    (False, Progress())
    >>> with p.session() as outermost:
    ...     p.stage_started("solve")
    ...     p.stage_finished("solve", 0.1)
    >>> outermost
    False
    """

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        # silent displays are interchangeable (so two Calibrations without progress compare equal)
        return self is other or (type(self) is Progress and type(other) is Progress)

    def __hash__(self) -> int:
        return hash(Progress) if type(self) is Progress else id(self)

    @contextmanager
    def session(self) -> Iterator[bool]:
        """A whole merge (or command); yields whether it is the outermost one, which
        reports the :meth:`summary`. Sessions nest (``aligner="auto"`` merges inside a merge)."""
        yield False

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        """Prefix the status with ``label`` inside the block (``"round 2/10"``, ``"pair 1/3"``)."""
        yield

    def stage_started(self, name: str, detail: str | None = None) -> None:
        """A stage (``discover``, ``statistics``, ``solve``, ...) starts; ``detail`` says more (``"12 points"``)."""

    def stage_finished(self, name: str, seconds: float) -> None:
        """The stage ``name`` ends after ``seconds``."""

    def pass_started(self, desc: str | None, total: int | None) -> None:
        """A pass over the calibration data starts: ``desc`` names it, ``total`` batches (None: unknown)."""

    def batch(self, index: int) -> None:
        """The pass reads its batch number ``index`` (from 1)."""

    def model_run(self, who: str) -> None:
        """A model (``who``) runs on the current batch."""

    def pass_finished(self) -> None:
        """The pass ends."""

    def summary(self, timings: Mapping[str, float]) -> None:
        """The final line: the seconds per stage."""

    def clear(self) -> None:
        """Erase a status line being redrawn, before other output goes to the terminal."""


def make_progress(setting: "bool | Progress | None") -> Progress:
    """The display for a ``progress=`` option: a :class:`Progress` itself, a new
    :class:`LineProgress` (on stderr) for a true value, else the silent one.

    Examples
    --------
    >>> make_progress(False), make_progress(True)
    (Progress(), LineProgress())
    >>> p = make_progress(True)
    >>> make_progress(p) is p
    True
    """
    if isinstance(setting, Progress):
        return setting
    return LineProgress() if setting else Progress()


@dataclass
class _Stage:
    name: str
    detail: str | None
    t0: float
    passes: int = 0


@dataclass
class _Pass:
    desc: str | None
    total: int | None
    number: int
    t0: float
    index: int = 0
    runs: int = 0
    per_batch: int = 0


class LineProgress(Progress):
    """A one-line progress display on stderr (or ``stream``).

    Parameters
    ----------
    stream : text stream, optional
        Where to write (default: ``sys.stderr``, looked up at each write).
    tty : bool, optional
        Redraw one line in place (``\\r``) rather than writing plain lines. Default: whether
        the stream is a terminal.
    interval : float, default 10.0
        Without a terminal: the least number of seconds between two lines inside one pass
        (a pass's last line and each stage's first line are always written).
    refresh : float, default 0.1
        On a terminal: the least number of seconds between two redraws.
    prefix : str, default "autoalign"
        Starts every line.

    Notes
    -----
    Only rank 0 writes under ``torch.distributed``. The status reads
    ``[scope | ]stage[ (detail, pass name, pass k)][: batch i/n[, model k/m]]``: the
    model count is the models run on one batch (known from the second batch on).

    Examples
    --------
    >>> import io, torch, autoalign
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    >>> out = io.StringIO()
    >>> _ = autoalign.merge(nets, [torch.randn(16, 4)] * 3, progress=autoalign.LineProgress(out, tty=False))
    >>> print(out.getvalue(), end="")  # doctest: +ELLIPSIS
    autoalign: discover
    autoalign: statistics
    autoalign: statistics: batch 3/3, model 2/2 (... s)
    autoalign: solve (1 point)
    autoalign: apply
    autoalign: repair
    autoalign: done in ... s: discover ... s, statistics ... s, solve ... s, apply ... s, repair ... s
    """

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, interval: float = 10.0, refresh: float = 0.1,
        prefix: str = "autoalign",
    ) -> None:
        self.stream = stream
        self.tty = tty
        self.interval = interval
        self.refresh = refresh
        self.prefix = prefix
        self._depth = 0
        self._t0 = 0.0
        self._scopes: list[str] = []
        self._stages: list[_Stage] = []
        self._pass: _Pass | None = None
        self._shown = False  # a terminal line is showing, not yet ended
        self._last = float("-inf")  # when the last line or redraw was written

    def __bool__(self) -> bool:
        return True

    # ------------------------------------------------------------------ hooks

    @contextmanager
    def session(self) -> Iterator[bool]:
        outermost = self._depth == 0
        previous = show = None
        if outermost:
            self._t0 = time.perf_counter()
            if self._tty():  # a warning erases the line first, rather than being appended to it
                previous = warnings.showwarning

                def show(*args: Any, **kwargs: Any) -> None:
                    self.clear()
                    previous(*args, **kwargs)

                warnings.showwarning = show
        self._depth += 1
        try:
            yield outermost
        finally:
            self._depth -= 1
            if outermost:
                if show is not None and warnings.showwarning is show:
                    warnings.showwarning = previous
                self._end_line()
                self._scopes, self._stages, self._pass = [], [], None

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        self._scopes.append(label)
        try:
            yield
        finally:
            self._scopes.pop()

    def stage_started(self, name: str, detail: str | None = None) -> None:
        self._stages.append(_Stage(name, detail, time.perf_counter()))
        self._show(force=True)

    def stage_finished(self, name: str, seconds: float) -> None:
        for k in range(len(self._stages) - 1, -1, -1):
            if self._stages[k].name == name:
                del self._stages[k:]
                break

    def pass_started(self, desc: str | None, total: int | None) -> None:
        stage = self._stages[-1] if self._stages else None
        if stage is not None:
            stage.passes += 1
        self._pass = _Pass(desc, total, stage.passes if stage is not None else 1, time.perf_counter())
        if self._tty():
            self._show()

    def batch(self, index: int) -> None:
        p = self._pass
        if p is None:
            return
        p.per_batch, p.index, p.runs = max(p.per_batch, p.runs), index, 0
        self._show()

    def model_run(self, who: str) -> None:
        if self._pass is not None:
            self._pass.runs += 1
            self._show()

    def pass_finished(self) -> None:
        p = self._pass
        if p is None:
            return
        p.per_batch = max(p.per_batch, p.runs)
        p.runs = p.per_batch
        if p.index:
            self._show(force=True, final=not self._tty() or self._depth == 0, suffix=f" ({time.perf_counter() - p.t0:.2f} s)")
        self._pass = None

    def summary(self, timings: Mapping[str, float]) -> None:
        total = time.perf_counter() - self._t0 if self._depth else sum(timings.values())
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        self._write(f"done in {total:.2f} s" + (f": {parts}" if parts else ""), final=True)

    def clear(self) -> None:
        if self._shown and rank_and_world()[0] == 0:
            stream = self._stream()
            stream.write("\r\x1b[K")
            stream.flush()
        self._shown = False

    # ------------------------------------------------------------------ drawing

    def status(self) -> str:
        """The current status line (without the prefix).

        Examples
        --------
        >>> import io
        >>> p = LineProgress(io.StringIO(), tty=False)
        >>> p.stage_started("repair")
        >>> p.pass_started("reset_bn", 8)
        >>> p.batch(3)
        >>> p.status()
        'repair (reset_bn): batch 3/8'
        """
        stage = self._stages[-1] if self._stages else None
        p = self._pass
        extra = [stage.detail] if stage is not None and stage.detail else []
        label = stage.name if stage is not None else (p.desc if p is not None and p.desc else "calibration pass")
        if p is not None:
            if p.desc and p.desc != label:
                extra.append(p.desc)
            if p.number > 1:
                extra.append(f"pass {p.number}")
        text = label + (f" ({', '.join(extra)})" if extra else "")
        if p is not None and p.index:
            text += f": batch {p.index}" + (f"/{p.total}" if p.total else "")
            if p.runs:
                text += f", model {p.runs}" + (f"/{p.per_batch}" if p.per_batch >= p.runs else "")
        return " | ".join(self._scopes + [text])

    def _tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self._stream(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _show(self, *, force: bool = False, final: bool = False, suffix: str = "") -> None:
        """Write the status: always when forced, else at most every ``refresh`` (terminal) or
        ``interval`` (plain lines) seconds."""
        now = time.perf_counter()
        tty = self._tty()
        if not force and now - self._last < (self.refresh if tty else self.interval):
            return
        if tty and not final:
            stage = self._stages[-1] if self._stages else None
            if stage is not None:
                suffix = f"  [{now - stage.t0:.1f} s]"
        self._write(self.status() + suffix, final=final or not tty)

    def _write(self, text: str, *, final: bool) -> None:
        """One line: on a terminal redrawn in place (ended when ``final``), else a plain line."""
        if rank_and_world()[0] != 0:
            return
        stream = self._stream()
        line = f"{self.prefix}: {text}" if self.prefix else text
        if self._tty():
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            if len(line) > width and not final:  # a line that wraps cannot be redrawn
                line = line[: width - 3] + "..."
            stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
            self._shown = not final
        else:
            stream.write(line + "\n")
        stream.flush()
        self._last = time.perf_counter()

    def _end_line(self) -> None:
        """End a terminal line left showing (after an error, say), so later output starts on a new line."""
        if self._shown and rank_and_world()[0] == 0:
            stream = self._stream()
            stream.write("\n")
            stream.flush()
        self._shown = False
