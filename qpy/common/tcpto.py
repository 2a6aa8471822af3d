"""tcpto — the memory of hosts that did not answer (qmail's tcpto), shared by the
delivery workers.

Written by qpy.remote.session (as `qpyr`); read by qpy-status (root). No program
of its own.

WHAT
    A connection attempt that times out (not one that is refused: that host
    answered) counts against its address; a connection that opens clears it. An
    address with FAILURES timeouts in a row, the last less than SKIP seconds ago,
    is skipped: the delivery moves on to the next one and, when none is left, is
    deferred with that reason. So a dead MX costs one worker timeoutconnect
    seconds now and then, not every delivery timeoutconnect seconds.

FILE
    ROOT/remote/tcpto, one line per address: `ADDRESS COUNT LAST` (LAST in
    seconds since the epoch), at most MAX_ENTRIES, the oldest dropped. Read and
    rewritten under an exclusive flock by each worker; not fsync'd (losing it
    costs one timeout per dead host). No directory: no memory.
"""

from __future__ import annotations

import fcntl
import os
import time

FAILURES = 2                # timeouts in a row before an address is skipped
SKIP = 3600                 # seconds it is skipped after the last one
MAX_ENTRIES = 1000
MAX_FILE = 64 * 1024
NAME = os.path.join("remote", "tcpto")


def _parse(data: bytes) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for line in data.decode("ascii", "replace").splitlines():
        f = line.split()
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit() and len(f[0]) <= 64:
            out[f[0]] = (int(f[1]), int(f[2]))
    return out


def read(root: str) -> dict[str, tuple[int, int]]:
    """{address: (timeouts in a row, last timeout)}; {} when there is no file."""
    try:
        fd = os.open(os.path.join(root, NAME), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        return _parse(f.read(MAX_FILE))


def dead(entries: dict[str, tuple[int, int]], address: str, now: float) -> bool:
    count, last = entries.get(address, (0, 0))
    return count >= FAILURES and now - last < SKIP


def skipped(root: str, address: str) -> bool:
    return dead(read(root), address, time.time())


def record(root: str, address: str, timed_out: bool) -> None:
    """Count a timeout against `address`, or clear it after a connection."""
    path = os.path.join(root, NAME)
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if timed_out else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:         # none yet (nothing to clear), or no remote/ directory
        return
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries = _parse(f.read(MAX_FILE))
        if not timed_out and address not in entries:
            return
        if timed_out:
            count = entries.get(address, (0, 0))[0]
            entries[address] = (count + 1, int(time.time()))
        else:
            del entries[address]
        keep = sorted(entries.items(), key=lambda kv: kv[1][1])[-MAX_ENTRIES:]
        f.seek(0)
        f.truncate()
        # not fsync'd: a lost memory costs one timeout per dead host
        f.write("".join("%s %d %d\n" % (a, c, t) for a, (c, t) in keep).encode())
