"""watch — new files in a directory, by inotify hints plus full rescans.

Events are hints only: `wait()` returns when something may have changed,
`names()` gives the names that were renamed into the watched directories since
the last call (so that a caller need not list a big directory to find one new
file), and `rescan_due()` says when the caller must list the whole directory
anyway (at start, after IN_Q_OVERFLOW, and every RESCAN_SECONDS), so an event
the kernel lost can delay a file by at most that long and never strand it.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import time

RESCAN_SECONDS = 60.0
MAX_NAMES = 100_000         # names kept between two calls of names(); past it, a rescan
IN_MOVED_TO, IN_Q_OVERFLOW = 0x80, 0x4000
READ_BYTES = 65536
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _inotify():
    """libc's inotify_init1 and inotify_add_watch, or None (rescans alone then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None


class Watcher:
    def __init__(self, directories: list[str], rescan_seconds: float = RESCAN_SECONDS):
        self.rescan_seconds = rescan_seconds
        self._next_rescan = 0.0            # rescan at start
        self._fd = -1
        self._names: list[str] = []
        calls = _inotify()
        if calls is not None:
            init, add_watch = calls
            # every file that matters arrives by rename (drop files, todo/ID): one
            # event per file, read here with one read(2) and parsed with struct (the
            # pyinotify package built, formatted and dispatched each in Python)
            fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self._fd = fd
            for d in directories:
                if add_watch(fd, os.fsencode(d), IN_MOVED_TO) < 0:
                    err = ctypes.get_errno()
                    self.close()
                    raise OSError(err, "inotify_add_watch %s: %s" % (d, os.strerror(err)))

    def _event(self, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._next_rescan = 0.0
            self._names.clear()         # the rescan finds them all
        elif name and len(self._names) < MAX_NAMES:
            self._names.append(name)
        else:
            self._next_rescan = 0.0     # too many to keep: list the directory instead

    def names(self) -> list[str]:
        """The names renamed into the watched directories since the last call."""
        names, self._names = self._names, []
        return names

    def rescan_due(self) -> bool:
        """True (once) when a full listing is due; the caller must list then."""
        now = time.monotonic()
        if now >= self._next_rescan:
            self._next_rescan = now + self.rescan_seconds
            return True
        return False

    def wait(self, timeout: float, extra_fds: tuple[int, ...] = ()) -> list[int]:
        """Sleep until a hint, a readable extra fd, a due rescan or timeout.

        Returns the extra fds that are readable."""
        until_rescan = max(0.0, self._next_rescan - time.monotonic())
        timeout = min(timeout, until_rescan)
        fds = list(extra_fds) + ([self._fd] if self._fd >= 0 else [])
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return []
        if self._fd in ready:
            self._drain()
        return [fd for fd in ready if fd != self._fd]

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, READ_BYTES)   # whole events only (the kernel's rule)
            except (BlockingIOError, InterruptedError):
                return
            at = 0
            while at + _EVENT.size <= len(data):
                _, mask, _, n = _EVENT.unpack_from(data, at)
                at += _EVENT.size + n
                self._event(mask, os.fsdecode(data[at - n:at].rstrip(b"\0")))
            if len(data) < READ_BYTES - 4096:
                return          # room for more was left: the queue is empty

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
