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

from qpy.inject.front import EXIT_PERM, EXIT_TEMP, Front, read_stdin

IGNORED_WITH_ARG = ("-N", "-B", "-R", "-V", "-X", "-L", "-O", "-p", "-h", "-C", "-q")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    front = Front("qpy-sendmail")
    sender: bytes | None = None
    name = b""
    take = False
    dot_ends = True
    rcpts: list[bytes] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            rcpts += [r.encode("utf-8", "surrogateescape") for r in args[i:]]
            break
        if not a.startswith("-") or a == "-":
            rcpts.append(a.encode("utf-8", "surrogateescape"))
            continue
        if a in ("-f", "-r", "-F") or a in IGNORED_WITH_ARG:
            if i >= len(args):
                return front.fail(EXIT_PERM, "option %s needs an argument" % a)
            val = args[i].encode("utf-8", "surrogateescape")
            i += 1
        elif a[:2] in ("-f", "-r", "-F") and len(a) > 2:
            val = a[2:].encode("utf-8", "surrogateescape")
            a = a[:2]
        else:
            val = b""
        if a in ("-f", "-r"):
            sender = val.strip(b"<>") if val not in (b"<>", b"") else b""
        elif a == "-F":
            name = val
        elif a == "-t":
            take = True
        elif a in ("-i", "-oi"):
            dot_ends = False
        elif a in ("-bs", "-bd", "-bp", "-bi"):
            return front.fail(EXIT_PERM, "%s is not supported; use qpy-smtpd or qpy-qstat" % a)
        # -odi -oem -om -v -bm -U -o* and the IGNORED_WITH_ARG options change nothing here
    try:
        message = read_stdin(dot_ends)
    except OverflowError as e:
        return front.fail(EXIT_PERM, str(e))
    except OSError as e:
        return front.fail(EXIT_TEMP, "cannot read the message: %s" % e.strerror)
    user = front.user(("QMAILUSER", "LOGNAME", "USER"))
    from_addr = user + b"@" + front.host(("QMAILHOST",))
    if sender is None:
        sender = from_addr
    if not name:
        name = (os.environ.get("QMAILNAME") or os.environ.get("NAME") or "").encode(
            "utf-8", "surrogateescape")
    return front.queue(message, sender, rcpts, from_addr, name, take)
