"""qpy-queue-inject — put one message into the queue (qmail-queue's interface).

SYNOPSIS
    qpy-queue-inject  < message  1< envelope

RUNS AS
    the caller. It needs no privilege: `queue/drop/` lets anyone create a file.

READS
    fd 0: the message, to end of file. fd 1: the envelope, read after the
    message: `F` sender NUL, `T` recipient NUL for each, then NUL.
    `QPY_ROOT` (default /var/qpy); `control/databytes`.

WRITES
    one drop file in `queue/drop/`: written under a temporary name, renamed to
    its final name, then fsync'd once, which makes the bytes and the rename
    durable together (qpy.inject.drop says why; the injecting user cannot open
    drop/ to fsync it). Exit 0 only after that fsync.

SECURITY
    Addresses pass the strict parser before anything is written; the drop file
    is mode 0640, group qpyq; qpy-pickup checks it all again anyway.

EXIT CODES (qmail-queue(8))
    0 queued; 11 address too long; 31 message refused (larger than control/databytes,
    50 MiB when absent: qpy.common.control.message_limit, the limit qpy-smtpd
    and pickup apply too);
    52 timeout reading input; 53 write error (disk full); 54 cannot read the
    message or envelope; 55 cannot read configuration; 62 trouble in the queue
    directory; 81 internal bug; 91 envelope format error.
"""

# (no __future__ import: a front end; docs/queue.md)

# signal.py wraps these functions in IntEnums: its import (enum, functools,
# collections) costs more than the rest of a run; _signal is the same functions
import _signal as signal
import posix
import sys

from qpy.common import envelope
from qpy.common.control import Control, ControlError, message_limit
from qpy.common.exits import EXIT_BUG, EXIT_CONFIG, EXIT_FORMAT, EXIT_READ, EXIT_TIMEOUT
from qpy.common.queue import root_from
from qpy.inject.drop import Drop, InjectError

INPUT_TIMEOUT = 86400       # qmail-queue's 24 hours; QPY_INJECT_TIMEOUT overrides
READ_BYTES = 64 * 1024



class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _fail(code: int, reason: str) -> int:
    sys.stderr.write("qpy-queue-inject: %s (#%d)\n" % (reason, code))
    return code


def _read_all(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while True:
        data = posix.read(fd, READ_BYTES)
        if not data:
            return b"".join(chunks)
        total += len(data)
        if total > limit:
            raise envelope.EnvelopeError(EXIT_FORMAT, "envelope too large")
        chunks.append(data)


def run(root: str) -> int:
    try:
        limit = message_limit(Control(root))
    except ControlError as e:   # a protective limit: a temporary refusal, never unlimited
        return _fail(EXIT_CONFIG, str(e))
    try:
        drop = Drop(root, limit)
    except InjectError as e:
        return _fail(e.code, "cannot create a file in the queue: %s" % e)
    try:
        while True:
            data = posix.read(0, READ_BYTES)
            if not data:
                break
            drop.write(data)
        env = _read_all(1, envelope.MAX_ENVELOPE)
        e = envelope.decode_all(env)
        drop.commit(e.sender, e.recipients, e.mail, e.rcpt)
    except InjectError as e:
        drop.abort()
        return _fail(e.code, str(e))
    except envelope.EnvelopeError as e:
        drop.abort()
        return _fail(e.code, str(e))
    except _Timeout:
        drop.abort()
        return _fail(EXIT_TIMEOUT, "timeout reading the message or envelope")
    except OSError as e:
        drop.abort()
        return _fail(EXIT_READ, "cannot read input: %s" % e.strerror)
    return 0


def main() -> int:
    signal.signal(signal.SIGALRM, _alarm)
    try:
        timeout = int(posix.environ.get(b"QPY_INJECT_TIMEOUT", INPUT_TIMEOUT))
    except ValueError:
        timeout = INPUT_TIMEOUT
    signal.alarm(max(1, timeout))
    try:
        return run(root_from())
    except Exception as e:  # never a traceback for a caller that expects a code
        return _fail(EXIT_BUG, "internal error: %s" % type(e).__name__)
