"""qpy-clean — remove a finished message's queue files when qpy-queue-send asks.

SYNOPSIS
    qpy-clean        (started by qpy-start; QPY_ROOT names the root)

RUNS AS
    qpyq, the owner of `queue/mess/` and `queue/todo/`: qpy-queue-send (qpys) may
    read mess files but cannot remove them, so it asks here.

READS
    fd 0: requests, one a line: `ID` LF (a message id as qpy.common.queue.is_id);
    the protocol is qpy.common.cleanreq, which qpy-queue-send also imports.

WRITES
    fd 1: one reply line per request, in order: `+` (removed, or was already gone),
    `!` reason (an unlink failed; ask again later), `x` (not a message id: refused).
    Removes `queue/mess/ID`, then `queue/todo/ID`, nothing else. mess/ID goes first:
    a crash between the two leaves a todo/ID without its mess/ID, which
    qpy-queue-send takes for a message finished before the crash and removes; the
    other order would leave an orphan mess/ID that nothing removes (qpy-clean
    cannot read state/, and nothing asks about that ID again). For a message that
    queue-send delivered in its first pass, todo/ID is its only record, so this
    removal is what ends it. The unlinks are not fsync'd: a power cut soon after
    can bring the files back, and the message is then delivered again.

SECURITY
    A request names a message id, never a path: anything but digits is refused,
    so no request can reach outside the queue directories.

EXIT CODES
    0 at end of input; 111 when the root cannot be used.
"""

from __future__ import annotations

import os
import signal
import sys

from qpy.common import cleanreq
from qpy.common.log import clean, log
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, is_id, root_from

PROGRAM = "qpy-clean"


def _remove(directory: str, name: str) -> str | None:
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        pass
    except OSError as e:
        return "%s/%s: %s" % (os.path.basename(directory), name, e.strerror)
    return None


def handle(paths: Paths, request: bytes) -> bytes:
    """One request line (without LF) to its reply line (without LF)."""
    try:
        name = request.decode("ascii")
    except UnicodeDecodeError:
        return cleanreq.REFUSED
    if not is_id(name):
        return cleanreq.REFUSED
    for d in (paths.mess, paths.todo):    # mess first: see WRITES
        err = _remove(d, name)
        if err:
            return cleanreq.FAILED + clean(err).encode()
    return cleanreq.OK


def _serve_one(paths: Paths, line: bytes) -> bytes:
    reply = handle(paths, line)
    if reply == cleanreq.REFUSED:
        log("warning: refused request %r" % clean(line, 60))
    return reply


def main() -> int:
    root = root_from()
    preamble(PROGRAM, root, "qpyq")
    paths = Paths(root)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    try:
        os.chdir(paths.queue)
    except OSError as e:
        log("alert: cannot start: %s: %s" % (paths.queue, e.strerror))
        return 111
    try:
        return cleanreq.serve(0, 1, lambda line: _serve_one(paths, line))
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
