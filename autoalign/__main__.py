"""``python -m autoalign``: the ``autoalign`` command line (see :mod:`autoalign.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
