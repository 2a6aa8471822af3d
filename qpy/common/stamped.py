"""stamped — a cache of values worked out from files, dropped when a file changes.

Name-service lookups parse /etc/passwd and /etc/group on every call; a spawner
that needs them per delivery keeps their answers here instead. Each value is kept
`ttl` seconds, and all are dropped at once when one of the files changes (its
inode, size or mtime) or on clear().
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")
MAX_ENTRIES = 2000          # past this many, the cache starts again empty


class StampedCache:
    def __init__(self, files: list[str], ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.files = files
        self.ttl = ttl
        self.max_entries = max_entries
        self.entries: dict[Hashable, tuple[float, object]] = {}
        self.stamp: list[tuple[int, int, int] | None] = []

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        stamp = [_stamp(f) for f in self.files]
        if stamp != self.stamp:        # a file changed: nothing cached holds
            self.entries.clear()
            self.stamp = stamp
        now = time.monotonic()
        hit = self.entries.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]  # type: ignore[return-value]
        value = compute()              # an exception is not cached
        if len(self.entries) > self.max_entries:
            self.entries.clear()
        self.entries[key] = (now, value)
        return value


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
