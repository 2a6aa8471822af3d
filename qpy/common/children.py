"""children — collect exited child processes without blocking."""

from __future__ import annotations

import os
from collections.abc import Iterator


def exited() -> Iterator[tuple[int, int]]:
    """Every child that has exited by now: (pid, wait status); never blocks."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status
