"""The ``autoalign`` command line.

Subcommands
-----------
``inspect``   discover a model's merge points, print the spec and self-check it.
``aligners``  list the registered aligners.
``merge``     merge checkpoints of one architecture into one.
``demo``      train small models from different seeds and merge them with every aligner.

Run ``autoalign COMMAND --help`` (or ``python -m autoalign COMMAND --help``) for
the options of each. Mistakes in the arguments or inputs are reported as one line
``autoalign: error: ...`` on stderr with exit status 2.

Modules: :mod:`.parser` (the argument parser, option values, :class:`CLIError`),
:mod:`.models` (models by name, checkpoints), :mod:`.data` (calibration data),
:mod:`.commands` (one function per subcommand).
"""

from __future__ import annotations

import sys
from typing import Any

from .commands import COMMANDS
from .data import make_data
from .models import load_checkpoint, load_model_target
from .parser import PROG, CLIError, build_parser, parse_option, parse_shape

__all__ = ["main", "build_parser", "parse_option", "parse_shape", "load_model_target", "load_checkpoint", "make_data"]


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the ``autoalign`` command line; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when ``inspect``'s self-check fails, 2 for usage errors
        (``autoalign: error: ...`` on stderr, no traceback).
    """
    import warnings

    from ..errors import AutoalignError

    def _show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own errors (status 2)
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    previous = warnings.showwarning
    warnings.showwarning = _show  # one line per warning, without source lines
    try:
        return int(COMMANDS[args.command](args))
    except (CLIError, AutoalignError, ValueError, FileNotFoundError) as exc:
        return _error(str(exc).strip() or type(exc).__name__)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
