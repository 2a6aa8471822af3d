"""qpy-qstat — how many messages are in the queue, as qmail-qstat.

SYNOPSIS
    qpy-qstat [ROOT]

DESCRIPTION
    Prints exactly two lines:

        messages in queue: N
        messages in queue but not yet preprocessed: M

    N counts `queue/mess/`, M counts `queue/todo/`; committed files still waiting in
    `queue/drop/` count in both. qpy-queue-send keeps todo/ID through a message's first
    delivery pass (until a result must be recorded in state/ID), so M also counts
    messages in that pass. ROOT is the first argument, else $QPY_ROOT, else
    /var/qpy.

RUNS AS
    any user that can list `queue/mess`, `queue/todo` and `queue/drop` (root, or
    qpyq); it keeps the caller's uid and writes nothing.

EXIT CODES
    0 printed; 111 the queue cannot be read.
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
    preamble("qpy-qstat", root, None)
    try:
        total, todo = queueinfo.counts(Paths(root))
    except OSError as e:
        sys.stderr.write("qpy-qstat: cannot read the queue: %s\n" % e)
        return EXIT_TEMP
    sys.stdout.write("messages in queue: %d\nmessages in queue but not yet preprocessed: %d\n"
                     % (total, todo))
    return 0
