"""qpy-qrm — remove queued messages, through the queue core, without a bounce.

SYNOPSIS
    qpy-qrm [ROOT] ID...

DESCRIPTION
    For each ID (as `new msg ID` in the log and `qpy-qread` show it) writes an empty
    file `queue/rm/ID` (durably), then sends SIGALRM to this root's qpy-queue-send
    (pid in `queue/run/queue-send.pid`). qpy-queue-send drops the message with no
    bounce, has qpy-clean remove its files, and logs `remove msg ID by qpy-qrm`. Never
    touches `mess/`, `todo/` or `state/` itself: only the queue core removes mail,
    so an in-flight delivery is never cut from under it. When qpy-queue-send is not
    running the request waits in `queue/rm/` for its next start.

    ROOT: the first argument when it is not a message id, else $QPY_ROOT, else /var/qpy.

RUNS AS
    root (queue/rm/ is qpys's); keeps the caller's uid.

EXIT CODES
    0 every request written and queue-send signalled; 100 an ID is malformed or
    not in the queue; 111 a request could not be written, or queue-send not signalled
    (the request stays and is acted on at its next start).
"""

from __future__ import annotations

import os
import sys

from qpy.admin import queueinfo
from qpy.common import durable
from qpy.common.exits import EXIT_TEMP, EXIT_USAGE
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, is_id, root_from

RM_DIR = "rm"
RM_MODE = 0o600


def queued(paths: Paths, msgid: str) -> bool:
    return any(os.path.lexists(os.path.join(d, msgid))
               for d in (paths.mess, paths.todo, paths.state))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    has_root = bool(args) and not is_id(args[0])
    root = root_from(args[:1] if has_root else [])
    ids = args[1:] if has_root else args
    preamble("qpy-qrm", root, None)
    if not ids:
        sys.stderr.write("usage: qpy-qrm [ROOT] ID...\n")
        return EXIT_USAGE
    paths = Paths(root)
    rmdir = os.path.join(paths.queue, RM_DIR)
    code = 0
    written = 0
    for msgid in ids:
        if not is_id(msgid) or not queued(paths, msgid):
            sys.stderr.write("qpy-qrm: no message %r in %s\n" % (msgid[:40], paths.queue))
            code = max(code, EXIT_USAGE)
            continue
        try:
            # durable: temp name, fsync, rename, fsync dir — the request survives a crash
            durable.write_file(rmdir, msgid, b"", mode=RM_MODE)
        except OSError as e:
            sys.stderr.write("qpy-qrm: cannot write %s/%s: %s\n" % (rmdir, msgid, e.strerror))
            code = EXIT_TEMP
            continue
        written += 1
        sys.stdout.write("qpy-qrm: removal of msg %s requested\n" % msgid)
    if written:
        why = queueinfo.alarm_queue_send(paths)
        if why:
            sys.stderr.write("qpy-qrm: %s; removal happens at its next start\n" % why)
            code = code or EXIT_TEMP
    return code
