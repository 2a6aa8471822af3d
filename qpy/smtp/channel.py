"""channel — the byte layer under an SMTP session: buffered lines, DATA, timeouts.

A Channel reads from one descriptor and writes to another (fd 0 and 1 of
`qpy-smtpd`, whether `qpy-tcpserver` or ucspi-tcp's `tcpserver` set them up).
All raw I/O goes through `recv_raw()` and `send_raw()`, so that a TLS layer can
replace exactly those two and nothing else; `pending()` and `discard_input()`
let STARTTLS refuse or drop bytes pipelined before the handshake.

Limits: a command line longer than the caller's limit is discarded as it
arrives (memory stays flat however long it is) and reported as too long; DATA
is handed on in pieces of at most PIECE bytes, never held whole.

Deadlines, not read timeouts (against slowloris): a whole command line must
arrive within `timeout` seconds of the moment it is asked for, and a whole
DATA (from its 354 to its final dot) within `timeout` seconds as well, however
the client trickles its bytes; a write may wait `timeout` seconds for room.
No read or write waits past the session's own end (`session` seconds after
the Channel is made). Timeout is raised for the first, SessionTimeout for the
second.

The DATA rule (against SMTP smuggling): the data ends at `<CR><LF>.<CR><LF>`
and nothing else. A CR or LF that is not part of a CRLF pair anywhere in the
data marks the message bad; it is still read to that real end, so that no
byte of it can be taken for a command.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections.abc import Callable

READ_BYTES = 64 * 1024
PIECE = 64 * 1024           # longest stretch of one DATA line kept before passing it on
OUT_LIMIT = 64 * 1024       # buffered replies past this are written at once
MAX_HOPS = 100              # Received:/Delivered-To: header lines meaning a loop (qmail)


class Timeout(Exception):
    """No input (or no room to write) within the timeout."""


class SessionTimeout(Timeout):
    """The session as a whole has run out of time."""


class Closed(Exception):
    """The client went away."""


class Channel:
    def __init__(self, rfd: int = 0, wfd: int = 1, timeout: float = 1200.0,
                 session: float = 0.0, own_socket: bool = False):
        self.rfd = rfd
        self.wfd = wfd
        # A connection's socket that no other process shares (own_socket: fd 0 and 1
        # of qpy-tcpserver's worker or ucspi-tcp's child) is made non-blocking: a reply
        # is written at once and waits (poll) only when the socket has no room.
        self._try_write = own_socket and _make_nonblocking(wfd)
        self.timeout = timeout
        self.session_end = time.monotonic() + session if session > 0 else float("inf")
        self.inbuf = bytearray()
        self._out: list[bytes] = []
        self._outlen = 0
        self._polls: dict[int, select.poll] = {}
        self.begin()

    # -- deadlines ---------------------------------------------------------------------
    def begin(self) -> None:
        """A unit of input starts (a command line, a whole DATA): it has `timeout`."""
        self.deadline = time.monotonic() + self.timeout

    def read_wait(self) -> float:
        """Seconds a read may still wait; Timeout or SessionTimeout when none."""
        return self._left(self.deadline)

    def write_wait(self) -> float:
        """Seconds a write may wait for room; SessionTimeout when the session is over."""
        return self._left(time.monotonic() + self.timeout)

    def _left(self, deadline: float) -> float:
        left = min(deadline, self.session_end) - time.monotonic()
        if left > 0:
            return left
        raise SessionTimeout() if self.session_end <= deadline else Timeout()

    # -- raw I/O: a TLS layer replaces these two -------------------------------
    def _wait(self, fd: int, event: int, deadline: float) -> None:
        """Until fd is ready for event; Timeout at deadline, SessionTimeout at the end."""
        # one poll object per descriptor and event for the Channel's life
        p = self._polls.get(fd * 8 + event)
        if p is None:
            p = self._polls[fd * 8 + event] = select.poll()
            p.register(fd, event)
        while True:
            try:
                if p.poll(self._left(deadline) * 1000):
                    return
            except InterruptedError:
                continue

    def recv_raw(self, n: int) -> bytes:
        """Up to n bytes; b'' at end of input; raises Timeout."""
        while True:
            self._wait(self.rfd, select.POLLIN, self.deadline)
            try:
                return os.read(self.rfd, n)
            except BlockingIOError:     # a non-blocking socket woke with nothing after all
                continue
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
                    return b""
                raise

    def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        if self._try_write:
            view = view[self._write(view):]
        while view:
            # `timeout` for room from now: it starts again after each write that made
            # progress, never at each wake-up (a client that reads nothing is cut off)
            self._wait(self.wfd, select.POLLOUT, time.monotonic() + self.timeout)
            view = view[self._write(view):]

    def _write(self, view: memoryview) -> int:
        try:
            return os.write(self.wfd, view)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                raise Closed()
            raise

    # -- buffered output: replies wait until we would block on input -------------
    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._outlen += len(data)
        if self._outlen >= OUT_LIMIT:
            self.flush()

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out, self._outlen = [], 0
            self.send_raw(data)

    # -- buffered input ------------------------------------------------------------
    def fill(self) -> None:
        """Read more input (after sending what replies wait); Closed at end of input."""
        self.flush()
        data = self.recv_raw(READ_BYTES)
        if not data:
            raise Closed()
        self.inbuf += data

    def pending(self) -> bool:
        """True when the client has sent bytes we have not consumed yet."""
        return bool(self.inbuf)

    def discard_input(self) -> None:
        del self.inbuf[:]

    def read_line(self, limit: int) -> tuple[bytes, bool]:
        """One line without its LF (and a CR before it): (line, too_long).

        A line longer than `limit` (with its line end) is thrown away as it
        arrives, however long it gets, and returned as (b"", True).
        """
        self.deadline = time.monotonic() + self.timeout      # begin()
        buf = self.inbuf
        too_long = False
        scanned = 0
        while True:
            i = buf.find(b"\n", scanned)
            if i != -1:
                if too_long or i >= limit:
                    del buf[:i + 1]
                    return b"", True
                line = bytes(buf[:i - 1] if i and buf[i - 1] == 0x0D else buf[:i])
                del buf[:i + 1]
                return line, False
            if len(buf) > limit:
                too_long = True
                del buf[:]
            scanned = len(buf)
            self.fill()

    def read_data(self, emit: Callable[[bytes], None]) -> tuple[bool, int]:
        """Read DATA to `<CR><LF>.<CR><LF>`, dot-unstuffed, CRLF turned into LF.

        emit() gets the message in pieces. Returns (bad_line_end, hops): whether a
        bare CR or LF occurred anywhere, and how many Received:/Delivered-To:
        lines the header had.

        Whole buffers at a time, not line by line: what has arrived up to its last
        CRLF is checked and converted with bytes methods (tests/test_channel.py holds
        it to a line-by-line model of the rules).
        """
        self.begin()
        bad = False
        hops = 0
        in_header = True
        line_start = True          # the next byte begins a CRLF-delimited line
        buf = self.inbuf
        while True:
            last = buf.rfind(b"\r\n")
            if last != -1:
                chunk = bytes(buf[:last + 2])          # whole lines, each ending in CRLF
                if line_start and chunk[:3] == b".\r\n":
                    end = 0
                else:
                    end = chunk.find(b"\r\n.\r\n")
                    if end != -1:
                        end += 2                         # where the final dot is
                if end != -1:
                    del buf[:end + 3]    # pipelined commands after the end stay unread
                    chunk = chunk[:end]
                else:
                    del buf[:last + 2]
                if chunk:
                    crlf = chunk.count(b"\r\n")
                    # every CR and every LF in a CRLF pair (pairs cannot overlap)
                    if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
                        bad = True
                    if in_header:
                        hops, in_header = _header_hops(chunk, line_start, hops)
                    if line_start and chunk[:1] == b".":
                        chunk = chunk[1:]
                    emit(chunk.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n"))
                    line_start = True
                if end != -1:
                    return bad, hops
                continue
            elif len(buf) > PIECE:
                # A long line: pass on all but the last byte (it may be the CR of a CRLF).
                piece = bytes(buf[:-1])
                del buf[:-1]
                if line_start and piece[:1] == b".":
                    piece = piece[1:]
                if in_header and line_start:
                    if piece[:13].lower().startswith(HOP_FIELDS):
                        hops += 1
                line_start = False
                if b"\r" in piece or b"\n" in piece:
                    bad = True
                emit(piece)
                continue
            self.fill()


HOP_FIELDS = (b"received:", b"delivered-to:")


def _make_nonblocking(fd: int) -> bool:
    """Make fd non-blocking if it is a socket; whether it is."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        os.set_blocking(fd, False)
    except OSError:
        return False
    return True


def _header_hops(chunk: bytes, line_start: bool, hops: int) -> tuple[int, bool]:
    """Count the hop fields among the header lines of chunk (whole CRLF-ended lines,
    dot-stuffed; the first one continues a long line unless line_start): (hops, whether
    the header goes on past chunk). The header ends at the first empty line."""
    if line_start and chunk[:2] == b"\r\n":
        return hops, False
    blank = chunk.find(b"\r\n\r\n")
    lines = chunk[:blank + 2] if blank != -1 else chunk
    # a line starts after a CRLF (the first one only at a line start); one stuffed dot
    # before the field name is the client's, two are not
    low = (b"\r\n" + lines if line_start else lines).lower()
    hops += (low.count(b"\r\nreceived:") + low.count(b"\r\n.received:")
             + low.count(b"\r\ndelivered-to:") + low.count(b"\r\n.delivered-to:"))
    return hops, blank == -1
