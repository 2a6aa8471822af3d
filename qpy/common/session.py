"""session — what a spawner does about the processes its workers leave behind.

A delivery worker starts its own session and its programs run in it. When the
worker dies on a signal (a timeout kill, a crash), kill_session() ends whatever
is left in that session, and a spawner that is a child subreaper
(become_subreaper) gets those orphans as its own children, so that they are
reaped instead of lingering under init.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_CHILD_SUBREAPER = 36


def kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid` (a delivery worker's session)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read(4096)
            fields = data[data.rfind(b")") + 2:].split()
            if len(fields) > 3 and int(fields[3]) == sid:
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def become_subreaper() -> None:
    """Orphans of deliveries become our children, so that reaping collects them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
