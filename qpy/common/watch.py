"""watch — new files in a directory, by inotify hints plus full rescans.

Events are hints only: `wait()` returns when something may have changed,
`names()` gives the names that were renamed into the watched directories since
the last call (so that a caller need not list a big directory to find one new
file), and `rescan_due()` says when the caller must list the whole directory
anyway (at start, after IN_Q_OVERFLOW, and every RESCAN_SECONDS), so an event
the kernel lost can delay a file by at most that long and never strand it.

Hints may also come from a program (`hints`, e.g. qpy.common.trigger.Receiver: an
object with fileno() and take() -> (names, listing wanted)), in place of inotify or
beside it: its names join the inotify ones, and a listing it asks for is a rescan.
"""

from __future__ import annotations

import select
import time
from typing import Protocol

RESCAN_SECONDS = 60.0
MAX_NAMES = 100_000         # names kept between two calls of names(); past it, a rescan

try:
    import pyinotify
except ImportError:  # no inotify: rescans alone still find every file
    pyinotify = None


class Hints(Protocol):
    def fileno(self) -> int: ...
    def take(self) -> tuple[list[str], bool]: ...


class Watcher:
    def __init__(self, directories: list[str], rescan_seconds: float = RESCAN_SECONDS,
                 hints: Hints | None = None):
        self.rescan_seconds = rescan_seconds
        self._hints = hints
        self._next_rescan = 0.0            # rescan at start
        self._wm = None
        self._notifier = None
        self._fd = -1
        self._names: list[str] = []
        if pyinotify is not None and directories:
            self._wm = pyinotify.WatchManager()
            # every file that matters arrives by rename (drop files, todo/ID): one event
            # per file, where create and close-write added two more, each of them built,
            # formatted and dispatched by pyinotify in Python (~30 us apiece)
            mask = pyinotify.IN_MOVED_TO
            self._notifier = pyinotify.Notifier(self._wm, default_proc_fun=self._event)
            for d in directories:
                self._wm.add_watch(d, mask, quiet=False)
            self._fd = self._wm.get_fd()

    def _event(self, event) -> None:
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self._next_rescan = 0.0
            self._names.clear()         # the rescan finds them all
        elif event.name:
            self._add([event.name])
        else:
            self._next_rescan = 0.0

    def _add(self, names: list[str]) -> None:
        if len(self._names) + len(names) <= MAX_NAMES:
            self._names.extend(names)
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
        own = ([self._fd] if self._fd >= 0 else []) + \
            ([self._hints.fileno()] if self._hints is not None else [])
        try:
            ready, _, _ = select.select(list(extra_fds) + own, [], [], timeout)
        except InterruptedError:
            return []
        if self._fd in ready:
            self._drain()
        if self._hints is not None and self._hints.fileno() in ready:
            names, rescan = self._hints.take()
            self._add(names)
            if rescan:
                self._next_rescan = 0.0
        return [fd for fd in ready if fd not in own]

    def _drain(self) -> None:
        assert self._notifier is not None
        self._notifier.read_events()
        self._notifier.process_events()

    def close(self) -> None:
        if self._wm is not None:
            self._wm.close()
            self._wm = None
