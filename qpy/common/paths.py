"""paths — where qpy's own programs are: beside the running launcher."""

from __future__ import annotations

import os
import sys

BINDIR = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else ""


def program(name: str) -> str:
    """Absolute path of the qpy program `name` (e.g. 'qpy-queue-inject')."""
    return os.path.join(BINDIR, name)
