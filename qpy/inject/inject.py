"""qpy-inject — qmail-inject's interface: a message from a person or a script.

SYNOPSIS
    qpy-inject [-f sender] [-a | -h] [--] [recipient...]

RUNS AS
    the caller; no privilege needed (the message goes through queue/drop/).

READS
    the message on stdin, to end of file; QPY_ROOT; control/defaulthost,
    idhost, databytes; QMAILUSER, QMAILHOST, QMAILNAME (then NAME, LOGNAME,
    USER), QMAILSUSER and QMAILSHOST for the envelope sender, as qmail-inject.

WRITES
    one drop file in queue/drop/, with From:, Date: and Message-ID: added when
    missing. Recipients: the arguments (-a), or with no arguments or -h those
    of To:, Cc: and Bcc: (Bcc: removed), as qmail-inject.

EXIT CODES
    0 queued; 100 permanent; 111 temporary.
"""

# (no __future__ import: a front end; docs/queue.md)

import posix
import sys

from qpy.common.exits import EXIT_PERM
from qpy.inject.front import Front, UsageError, options


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    front = Front("qpy-inject")
    sender: bytes | None = None
    mode = ""
    try:
        opts, rcpts = options(args, ("-f",))
    except UsageError as e:
        return front.fail(EXIT_PERM, str(e))
    for opt, val in opts:
        if opt == "-f":
            sender = val
        elif opt in ("-a", "-h"):
            mode = opt
        else:
            return front.fail(EXIT_PERM, "unknown option %s" % opt)
    take = mode == "-h" or (mode == "" and not rcpts)
    if mode == "-h":
        rcpts = []
    message = front.read_message(False)
    if isinstance(message, int):
        return message
    if sender is None:
        sender = front.user(("QMAILSUSER", "QMAILUSER", "LOGNAME", "USER")) + b"@" + \
            front.host(("QMAILSHOST", "QMAILHOST"))
    name = posix.environ.get(b"QMAILNAME") or posix.environ.get(b"NAME") or b""
    return front.queue(message, sender, rcpts, name, take)
