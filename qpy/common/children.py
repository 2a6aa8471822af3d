"""children — collect exited child processes without blocking."""

from __future__ import annotations

import os
import signal
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


def fork_exec(path: str, argv: list[str], env: dict[str, str], fdmap: dict[int, int],
              blocked: set[int], ignored: set[int]) -> int:
    """Fork and exec path with exactly fdmap's descriptors (target: source), every
    other one closed, cwd /, the signals in `blocked` blocked and those in `ignored`
    ignored; the child's pid (a child that cannot exec exits 127)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        high = 1000
        # first out of the way, so no dup2 overwrites a source still needed
        for tgt, src in fdmap.items():
            os.dup2(src, high + tgt, inheritable=False)
        for tgt in fdmap:
            os.dup2(high + tgt, tgt, inheritable=True)
        os.closerange(max(fdmap) + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir("/")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)
        os.execve(path, argv, env)
    except BaseException:
        pass
    os._exit(127)
