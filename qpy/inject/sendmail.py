"""qpy-sendmail — the /usr/sbin/sendmail interface that programs call.

SYNOPSIS
    qpy-sendmail [-t] [-i] [-f sender] [-F name] [other flags] [--] [recipient...]
    qpy-sendmail -bp | mailq          qpy-sendmail -bi | -I | newaliases
    qpy-sendmail -bs                  qpy-sendmail -q[ARG]
    qpy-sendmail -bv address...

DESCRIPTION
    The command line is read as sendmail 8 and Postfix's sendmail(1) read it
    (getopt): flags cluster (`-ti` is `-t -i`, `-it` is `-i -t`), an option that
    takes a value takes the rest of its cluster or the next argument (`-oi`,
    `-odb`, `-oem`, `-Am`, `-FCronDaemon`, `-f sender`, `-N never`), `--` ends
    the options. An option this page does not list is an error (exit 64) with
    a one-line message, never silently ignored.

    -f ADDR, -r ADDR  envelope sender (`-f ''` or `-f '<>'`: the null sender;
                      `-f 'pre@host-@[]'`: VERP, see qpy-queue-send(8)).
    -F NAME           full name for the From: line qpy adds when there is none.
    -t                recipients also from To:, Cc:, Bcc: (Bcc: removed); those
                      on the command line are added, as Postfix does.
    -i, -oi           a line of a single dot does not end the message (without
                      it, such a line ends it, as sendmail's default).
    -N DSN            delivery status notifications wanted for every recipient
                      (RFC 3461 NOTIFY, as Postfix's sendmail): `never`, or a
                      comma-separated list of `success`, `delay`, `failure`
                      (any case). Without it: failures and delays, as ever.
    -R RET            `full` or `hdrs`: what of the message a failure notice
                      returns (RFC 3461 RET).
    -V ENVID          an envelope id (printable ASCII, at most 100 characters)
                      that notices quote as Original-Envelope-Id (RFC 3461 ENVID).
                      Each goes with the message to a peer that offers DSN; a bad
                      value is a usage error (exit 64).
    -B TYPE, -L LABEL, -O OPT, -X FILE, -C FILE,
    -h HOPS, -p PROTO, -e MODE, -M MACRO, -d FLAGS, -A ARG, -Q REASON
                      accepted and ignored: its logs go where its services log,
                      its config is the root.
    -o X              -oi as above; every other -o (-odb, -odi, -oem, -om...)
                      is accepted and ignored.
    -v -m -n -c -G -U -x -s -T
                      accepted and ignored.
    -bm               deliver mail (the default): the message on stdin, then
                      qpy-queue-inject's drop file (qpy.inject.drop).
    -bp, `mailq`      list the queue: qpy-qstat's two lines, then qpy-qread's
                      blocks (the ids are those of `250 ... queued as` and the
                      log). Reading the queue needs root, as qmail-qread.
    -bP               qpy-qstat's two lines only.
    -bs               one SMTP session on stdin/stdout: qpy-smtpd --as-caller,
                      run as the caller with RELAYCLIENT set (a local caller may
                      send anywhere), each message injected as the caller.
    -bi, -I, `newaliases`
                      compile /etc/aliases (-oAFILE: another file, sendmail's
                      AliasFile option) into ROOT/users/aliases
                      (qpy.common.aliases), atomically, then run qpy-newrcpt so
                      that SMTP knows the names; needs write access to
                      ROOT/users/ (root). A malformed file or a loop among its
                      names leaves the old table and exits 65.
    -q, -qf, -qR..., -qS..., -qI..., -q30m
                      ask qpy-queue-send to retry every deferred delivery now
                      (qpy-qretry; selections and intervals are not honoured:
                      everything is retried once); qpy-qretry's exit codes.
    -bv               for each address: local or remote, and whether a local
                      one has an owner (user, alias, alias user's .qmail), with
                      nothing sent. Exit 0 when all are deliverable, else 67.
    -bd, -bD, -bt, -bh, -bH, -ba
                      not what qpy does: exit 64 with a line saying what to use.
    Started under the name `mailq` it acts as -bp, as `newaliases` as -bi.

RUNS AS
    the caller; no privilege needed (the message goes through queue/drop/).

READS
    the message on stdin; QPY_ROOT; control/defaulthost, idhost, databytes;
    QMAILUSER, QMAILHOST, QMAILNAME, NAME, LOGNAME, USER.

WRITES
    one drop file in queue/drop/, named by the message's id: the message with
    From:, Date: and Message-ID: added when missing.

SECURITY
    Every address passes the strict parser; nothing from the caller reaches a
    shell. The body's bytes are queued unchanged.

EXIT CODES (sysexits, as sendmail's callers expect)
    0 queued (or the mode's work done)
    64 EX_USAGE       unknown option, missing value, no recipients, unusable mode
    65 EX_DATAERR     a bad address, a message over databytes (qmail's 100)
    67 EX_NOUSER      -bv: an address nobody would take
    69 EX_UNAVAILABLE the queue refused the message for good (qmail-queue 11-40)
    74 EX_IOERR       the message could not be read from stdin
    75 EX_TEMPFAIL    the queue could not take it now (qmail's 111): try again
    -bp, -bi, -q and -bs exit as the program they run (qpy-qread, qpy-qretry:
    0 or 111; newaliases: 0, 65 for a malformed file, 75 when it cannot write).
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix
import sys

from qpy.inject.front import SYSEXITS, Front

WITH_VALUE = "ABCFLMNOQRVXbdefhopr"       # getopt: these take the rest or the next argument
FLAGS = "GIcimnstUvxT"
REFUSED_MODES = {
    "d": "qpy-sendmail -bd: qpy's SMTP listener is qpy-start (qpy-tcpserver), not sendmail",
    "D": "qpy-sendmail -bD: run qpy-start ROOT in the foreground instead",
    "t": "qpy-sendmail -bt: there are no rewriting rules to test; use -bv ADDRESS",
    "h": "qpy-sendmail -bh: there is no host status database; see qpy-qread",
    "H": "qpy-sendmail -bH: there is no host status database; see qpy-qread",
    "a": "qpy-sendmail -ba: ARPANET mode is not supported; use -bs",
}


class Usage(ValueError):
    pass


class Command:
    """What a sendmail command line asks for."""

    def __init__(self) -> None:
        self.mode = "m"
        self.queue_arg: str | None = None
        self.sender: bytes | None = None
        self.name = b""
        self.take = False
        self.dot_ends = True
        self.operands: list[bytes] = []
        self.alias_file = "/etc/aliases"
        self.dsn_mail: dict[bytes, bytes] = {}   # RET, ENVID (qpy.common.dsnparam)
        self.notify = b""


def _b(a: str) -> bytes:
    return a.encode("utf-8", "surrogateescape")


def parse(args: list[str], program: str = "sendmail") -> Command:
    """Read a sendmail command line as getopt would; raise Usage on a bad one."""
    cmd = Command()
    if program == "mailq":
        cmd.mode = "p"
    elif program == "newaliases":
        cmd.mode = "i"
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            cmd.operands += [_b(r) for r in args[i:]]
            break
        if not a.startswith("-") or a == "-":
            cmd.operands.append(_b(a))
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            if c == "q":                 # -q[ARG]: the value is optional, never the next word
                cmd.mode, cmd.queue_arg = "q", a[j:]
                break
            if c in FLAGS:
                if c == "t":
                    cmd.take = True
                elif c == "i":
                    cmd.dot_ends = False
                elif c == "I":
                    cmd.mode = "i"
                continue
            if c not in WITH_VALUE:
                raise Usage("unknown option -%s" % c if c.isprintable() else "unknown option")
            if j < len(a):
                value, j = a[j:], len(a)
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise Usage("option -%s needs a value" % c)
            _option(cmd, c, value)
    return cmd


def _option(cmd: Command, c: str, value: str) -> None:
    if c in ("f", "r"):
        v = _b(value).strip()
        cmd.sender = b"" if v in (b"", b"<>") else v.strip(b"<>")
    elif c == "F":
        cmd.name = _b(value)
    elif c == "o":
        if value == "i":
            cmd.dot_ends = False
        elif value[:1] == "A" and len(value) > 1:     # sendmail 8's AliasFile option
            cmd.alias_file = value[1:].lstrip("=")
    elif c in ("N", "R", "V"):
        from qpy.common import dsnparam  # only when asked: sendmail starts small
        try:
            if c == "N":
                cmd.notify = b"NOTIFY=" + dsnparam.notify_value(_b(value).replace(b" ", b""))
            elif c == "R":
                cmd.dsn_mail[b"RET"] = dsnparam.ret_value(_b(value))
            else:
                cmd.dsn_mail[b"ENVID"] = dsnparam.envid_value(_b(value), encoded=False)
        except dsnparam.DsnError as e:
            raise Usage("-%s: %s" % (c, e))
    elif c == "b":
        if value in REFUSED_MODES:
            raise Usage(REFUSED_MODES[value])
        if value not in ("m", "p", "P", "s", "i", "v"):
            raise Usage("unknown mode -b%s" % value[:20])
        cmd.mode = value
    # the rest of WITH_VALUE is accepted and dropped, as the page says


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    program = sys.argv[0].rpartition("/")[2] if sys.argv else "sendmail"
    try:
        cmd = parse(args, program)
    except Usage as e:
        sys.stderr.write("qpy-sendmail: %s\n" % e)
        return SYSEXITS["usage"]
    if cmd.mode != "m":
        from qpy.inject import modes  # not on the per-message path: it costs imports
        return modes.run(cmd)
    front = Front("qpy-sendmail", SYSEXITS)
    message = front.read_message(cmd.dot_ends)
    if isinstance(message, int):
        return message
    name = cmd.name or posix.environ.get(b"QMAILNAME") or posix.environ.get(b"NAME") or b""
    mail = b""
    if cmd.dsn_mail:
        from qpy.common import dsnparam
        mail = dsnparam.join_mail(cmd.dsn_mail)
    return front.queue(message, cmd.sender, cmd.operands, name, cmd.take, mail, cmd.notify)
