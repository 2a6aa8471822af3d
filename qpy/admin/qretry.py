"""qpy-qretry — retry every deferred delivery now (as `svc -a` on qpy-send).

SYNOPSIS
    qpy-qretry [ROOT]

DESCRIPTION
    Sends SIGALRM to this root's qpy-queue-send (pid in `queue/run/queue-send.pid`,
    checked against the process title so a stale pid file signals nobody else).
    qpy-queue-send then reschedules every deferred recipient for now.

RUNS AS
    root (or the one-user owner): signalling qpys's process needs it.

EXIT CODES
    0 signalled; 111 qpy-queue-send not running or not signalled.
"""

from __future__ import annotations

import sys

from qpy.admin import queueinfo
from qpy.common.exits import EXIT_TEMP
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, root_from


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = root_from(args[:1])
    preamble("qpy-qretry", root, None)
    why = queueinfo.alarm_queue_send(Paths(root))
    if why:
        sys.stderr.write("qpy-qretry: %s\n" % why)
        return EXIT_TEMP
    return 0
