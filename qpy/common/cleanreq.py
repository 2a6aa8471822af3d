"""cleanreq — the clean-up protocol between qpy-queue-send (asks) and qpy-clean (serves).

qpy-queue-send (qpys) cannot remove `mess/ID` or `todo/ID`; qpy-clean (qpyq) can.
They talk over two pipes that qpy-start wires:

    request     `ID` LF                  one message id (qpy.common.queue.is_id)
    reply       `+` LF                   removed, or already gone
                `!` reason LF            an unlink failed; ask again later
                `x` LF                   not a message id: refused

One reply per request, in order. A request line longer than MAX_REQUEST is refused
once (`x`) and skipped to its end, so no peer makes qpy-clean buffer without bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable

OK = b"+"
FAILED = b"!"
REFUSED = b"x"
MAX_REQUEST = 64          # an id is at most 20 digits; a longer line is refused
MAX_REPLY = 4096


class CleanLost(Exception):
    """qpy-clean's pipes closed or failed."""


def ask(wfd: int, rfd: int, msgid: str) -> bytes:
    """Send one request and return its reply line (without LF); raises CleanLost."""
    try:
        os.write(wfd, msgid.encode("ascii") + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = os.read(rfd, 512)
            if not data:
                raise CleanLost("lost qpy-clean connection")
            reply += data
            if len(reply) > MAX_REPLY:
                raise CleanLost("qpy-clean reply too long")
    except OSError as e:
        raise CleanLost("lost qpy-clean connection: %s" % e.strerror) from None
    return reply.rstrip(b"\n")


def serve(rfd: int, wfd: int, handle: Callable[[bytes], bytes]) -> int:
    """Read requests from rfd until its end; write handle(line)'s reply for each.
    handle gets the line without LF (at most MAX_REQUEST + 1 bytes). Returns 0."""
    buf = b""
    while True:
        nl = buf.find(b"\n")
        if nl == -1:
            if len(buf) > MAX_REQUEST:
                # an endless line: refuse it once, then skip to its end
                os.write(wfd, REFUSED + b"\n")
                buf = b""
                while True:
                    data = os.read(rfd, 4096)
                    if not data:
                        return 0
                    nl = data.find(b"\n")
                    if nl != -1:
                        buf = data[nl + 1:]
                        break
                continue
            data = os.read(rfd, 4096)
            if not data:
                return 0
            buf += data
            continue
        line, buf = buf[:nl], buf[nl + 1:]
        os.write(wfd, handle(line[:MAX_REQUEST + 1]) + b"\n")
