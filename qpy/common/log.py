"""log — one line per event on stderr, in qmail-log's words.

Every line starts with the program's name, written here once: the preamble
(qpy.common.privilege) sets it, and no caller writes it again. qpy-start adds
its service name and a timestamp, and the program's name only to a line that
does not start with `qpy-` (a traceback, a library's message). Timestamps are
the collector's job (multilog, journald, or qpy-start). Text from outside is
made printable and bounded before it reaches a log line.
"""

from __future__ import annotations

import os

MAX_LOG_TEXT = 800


def clean(text: bytes | str, limit: int = MAX_LOG_TEXT) -> str:
    """Printable ASCII only, bounded: safe for a log line or a reply."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    head = text[:limit]
    if not (head.isascii() and head.isprintable()):    # the common case needs no copy
        head = "".join(c if " " <= c <= "~" else "_" for c in head)
    return head + ("..." if len(text) > limit else "")


MAX_HELD = 64 * 1024   # bytes of held lines written out at once, at most

_prefix = ""


def name(program: str) -> None:
    """Start every later line with `program: ` (an empty name: nothing)."""
    global _prefix
    _prefix = program + ": " if program else ""

_held: list[bytes] | None = None
_held_bytes = 0


def log(line: str) -> None:
    global _held_bytes
    data = (_prefix + line.replace("\n", " ") + "\n").encode("utf-8", "replace")
    if _held is not None:
        _held.append(data)
        _held_bytes += len(data)
        if _held_bytes >= MAX_HELD:
            flush()
        return
    try:
        os.write(2, data)
    except OSError:
        pass


def hold() -> None:
    """Keep log lines until flush(): a busy loop writes one pass's lines at once (one
    write, one wake-up of the collector, instead of one per line)."""
    global _held
    if _held is None:
        _held = []


def release() -> None:
    """Stop holding; the lines held are dropped: in a child forked while its parent
    held lines (the parent writes them), its own lines go out at once."""
    global _held, _held_bytes
    _held, _held_bytes = None, 0


def flush() -> None:
    """Write the held lines, in order, with one write."""
    global _held_bytes
    if not _held:
        return
    data = b"".join(_held)
    _held.clear()
    _held_bytes = 0
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(2, view):]
    except OSError:
        pass


class Outbox:
    """Lines for a descriptor that must never be waited on (qpy-start's stdout, which
    every service's log passes through): they queue here, up to `limit` bytes (then
    lines are dropped and counted), and go out when select() says it is writable."""

    CHUNK = 4096    # PIPE_BUF: a write this small to a writable pipe never blocks

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.dropped = 0

    def add(self, data: bytes) -> None:
        if len(self.buf) + len(data) > self.limit:
            self.dropped += data.count(b"\n")
            return
        if self.dropped:
            self.buf += b"warning: %d log lines dropped: the log did not keep up\n" \
                % self.dropped
            self.dropped = 0
        self.buf += data

    def flush(self, fd: int) -> None:
        """One write of at most CHUNK bytes (call when fd is writable)."""
        if not self.buf:
            return
        try:
            n = os.write(fd, self.buf[:self.CHUNK])
        except BlockingIOError:
            return
        except OSError:
            n = len(self.buf)      # nowhere to write: nothing to keep it for
        del self.buf[:n]

    def flush_all(self, fd: int) -> None:
        """Everything, waiting as long as fd needs (at exit)."""
        while self.buf:
            try:
                n = os.write(fd, self.buf)
            except OSError:
                n = len(self.buf)
            del self.buf[:n]
