"""qpy-sendmail — the /usr/sbin/sendmail interface that scripts call.

SYNOPSIS
    qpy-sendmail [-f sender] [-F name] [-t] [-i|-oi] [-odi|-oem|-om|-o*|-v|-N x|-B x]
                 [--] recipient...

RUNS AS
    the caller; no privilege needed (the message goes through queue/drop/).

READS
    the message on stdin (without -i/-oi a line with a single dot ends it);
    QPY_ROOT; control/defaulthost, idhost, databytes; QMAILUSER, QMAILHOST,
    QMAILNAME, NAME, LOGNAME, USER.

WRITES
    one drop file in queue/drop/ (qpy.inject.drop): the message with From:,
    Date: and Message-ID: added when missing; with -t the recipients are taken
    from To:, Cc: and Bcc:, and Bcc: is removed.

SECURITY
    Every address passes the strict parser; nothing from the caller reaches a
    shell. The body's bytes are queued unchanged.

EXIT CODES
    0 queued; 100 permanent (bad usage, bad address, message refused);
    111 temporary (the queue could not take it; try again).
"""

from __future__ import annotations

import os
import sys

from qpy.inject.front import EXIT_PERM, Front, UsageError, options

IGNORED_WITH_ARG = ("-N", "-B", "-R", "-V", "-X", "-L", "-O", "-p", "-h", "-C", "-q")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    front = Front("qpy-sendmail")
    sender: bytes | None = None
    name = b""
    take = False
    dot_ends = True
    try:
        opts, rcpts = options(args, ("-f", "-r", "-F") + IGNORED_WITH_ARG)
    except UsageError as e:
        return front.fail(EXIT_PERM, str(e))
    for opt, val in opts:
        if opt in ("-f", "-r"):
            sender = val.strip(b"<>") if val not in (b"<>", b"") else b""
        elif opt == "-F":
            name = val
        elif opt == "-t":
            take = True
        elif opt in ("-i", "-oi"):
            dot_ends = False
        elif opt in ("-bs", "-bd", "-bp", "-bi"):
            return front.fail(EXIT_PERM, "%s is not supported; use qpy-smtpd or qpy-qstat" % opt)
        # -odi -oem -om -v -bm -U -o* and the IGNORED_WITH_ARG options change nothing here
    message = front.read_message(dot_ends)
    if isinstance(message, int):
        return message
    user = front.user(("QMAILUSER", "LOGNAME", "USER"))
    from_addr = user + b"@" + front.host(("QMAILHOST",))
    if sender is None:
        sender = from_addr
    if not name:
        name = (os.environ.get("QMAILNAME") or os.environ.get("NAME") or "").encode(
            "utf-8", "surrogateescape")
    return front.queue(message, sender, rcpts, from_addr, name, take)
