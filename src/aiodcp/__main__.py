"""``python -m aiodcp``: the command-line tool (``aiodcp._cli``)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
