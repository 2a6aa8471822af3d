"""front — what qpy-sendmail and qpy-inject share: names, qualifying, queueing.

Both run once per message from shell loops, so both import only this, the
header code and the drop writer: no `email`, no `socket`, no console-script
wrapper.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix
import sys

from qpy.common import address
from qpy.common.control import Control, ControlError, message_limit
from qpy.common.exits import EXIT_PERM, EXIT_TEMP, permanent
from qpy.common.queue import root_from
from qpy.inject import headers
from qpy.inject.drop import InjectError, inject

HEADER_ROOM = 64 * 1024     # stdin may exceed the limit by this: -t drops Bcc: lines

# Why a front end gives up, and the exit code for it: qmail-inject's two codes, or
# sysexits(3) for sendmail, whose callers (cron, PHP, mailers) look at them.
QMAIL_EXITS = {"usage": EXIT_PERM, "data": EXIT_PERM, "nouser": EXIT_PERM,
               "unavailable": EXIT_PERM, "io": EXIT_TEMP, "temp": EXIT_TEMP}
SYSEXITS = {"usage": 64, "data": 65, "nouser": 67, "unavailable": 69, "io": 74,
            "temp": 75}


class UsageError(ValueError):
    pass


def _arg(a: str) -> bytes:
    return a.encode("utf-8", "surrogateescape")


def options(args: list[str], with_value: tuple[str, ...]) -> tuple[list[tuple[str, bytes]],
                                                                  list[bytes]]:
    """Split a command line: ([(option, value)], operands). An option in with_value
    takes the next argument or the rest of its own (`-fx` or `-f x`); `--` ends options."""
    opts: list[tuple[str, bytes]] = []
    operands: list[bytes] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            operands += [_arg(r) for r in args[i:]]
            break
        if not a.startswith("-") or a == "-":
            operands.append(_arg(a))
        elif a in with_value:
            if i >= len(args):
                raise UsageError("option %s needs an argument" % a)
            opts.append((a, _arg(args[i])))
            i += 1
        elif a[:2] in with_value:
            opts.append((a[:2], _arg(a[2:])))
        else:
            opts.append((a, b""))
    return opts, operands


class Front:
    def __init__(self, program: str, exits: dict[str, int] = QMAIL_EXITS):
        self.program = program
        self.exits = exits
        self.root = root_from()
        self.control = Control(self.root)

    def fail(self, code: int, text: str) -> int:
        sys.stderr.write("%s: fatal: %s\n" % (self.program, text))
        return code

    def user(self, env_names: tuple[str, ...]) -> bytes:
        for name in env_names:
            v = posix.environ.get(name.encode())
            if v:
                return v
        import pwd  # only without those variables: NSS lookups cost more than its import
        return pwd.getpwuid(posix.getuid()).pw_name.encode()

    def host(self, env_names: tuple[str, ...]) -> bytes:
        for name in env_names:
            v = posix.environ.get(name.encode())
            if v:
                return v.decode("utf-8", "surrogateescape").encode("ascii", "replace")
        return self.control.line("defaulthost").encode("ascii", "replace")

    def from_address(self) -> bytes:
        """The caller's address for a missing From: (and sendmail's missing -f):
        QMAILUSER, LOGNAME or USER (else the uid's name) @ QMAILHOST (else
        control/defaulthost), as qmail-inject."""
        return self.user(("QMAILUSER", "LOGNAME", "USER")) + b"@" + self.host(("QMAILHOST",))

    def qualify(self, addr: bytes, is_sender: bool = False) -> bytes:
        """Check an address (a sender may have the VERP form `pre@host-@[]`); add
        @defaulthost to a bare local part."""
        if is_sender and addr.endswith(address.VERP):
            return address.parse_sender(addr, utf8=True)
        addr = address.parse_mailbox(addr, utf8=True, need_domain=False)
        if not address.split(addr)[1]:
            addr += b"@" + self.control.line("defaulthost").encode("ascii", "replace")
        return addr

    def queue(self, message: bytes, sender: bytes | None, recipients: list[bytes],
              full_name: bytes, take_recipients: bool, mail: bytes = b"",
              rcpt: bytes = b"") -> int:
        """Queue the message; sender None: from_address(). Exit code. `mail`, `rcpt`:
        DSN parameters (qpy.common.dsnparam) for the message and for every recipient."""
        # the user's address (an NSS lookup without LOGNAME or USER, and a control
        # file) and idhost only where they are used: the usual `sendmail -f ADDR` of a
        # message with From: and Message-ID: lines needs none of them
        present = headers.names(message)
        from_addr = b""
        if sender is None or b"from" not in present:
            from_addr = self.from_address()
        if sender is None:
            sender = from_addr
        idhost = b""
        if b"message-id" not in present:
            idhost = self.control.line("idhost").encode("ascii", "replace")
        try:
            message, found = headers.complete(message, from_addr, full_name, idhost,
                                              take_recipients)
            # -t and arguments may name one address twice: it gets one copy
            rcpts = list(dict.fromkeys(self.qualify(r) for r in recipients + found))
            if sender:
                sender = self.qualify(sender, is_sender=True)
        except (address.AddressError, headers.HeaderError) as e:
            return self.fail(self.exits["data"], "bad address: %s" % e)
        if not rcpts:
            return self.fail(self.exits["usage"], "no recipients")
        try:
            limit = message_limit(self.control)
        except ControlError as e:
            return self.fail(EXIT_TEMP, str(e))   # malformed: 111 from every front end
        try:
            inject(self.root, message, sender, rcpts, limit, mail, [rcpt] * len(rcpts))
        except InjectError as e:
            why = "temp"
            if e.code == 31:                      # over databytes: the message itself
                why = "data"
            elif permanent(e.code):
                why = "unavailable"
            return self.fail(self.exits[why], "cannot queue the message: %s (#%d)"
                             % (e, e.code))
        return 0

    def read_message(self, dot_ends: bool) -> bytes | int:
        """The message on stdin, or the exit code to leave with."""
        try:
            limit = message_limit(self.control)
        except ControlError as e:   # a protective limit: temporary, never unlimited
            return self.fail(EXIT_TEMP, str(e))   # malformed: 111 from every front end
        try:
            return read_stdin(dot_ends, limit + HEADER_ROOM)
        except OverflowError as e:
            return self.fail(self.exits["data"], str(e))
        except OSError as e:
            return self.fail(self.exits["io"], "cannot read the message: %s" % e.strerror)


def read_stdin(dot_ends: bool, limit: int) -> bytes:
    """The message on stdin; with dot_ends, a line of a single '.' ends it (sendmail).
    OverflowError as soon as it passes limit bytes (it is never read whole)."""
    if not dot_ends:
        data = sys.stdin.buffer.read(limit + 1)
        if len(data) > limit:
            raise OverflowError("message larger than databytes")
        return data
    out = []
    total = 0
    while True:
        # bounded even for one endless line; +2 so that a cut piece is never a lone "."
        line = sys.stdin.buffer.readline(limit - total + 2)
        if not line or line in (b".\n", b".\r\n", b"."):
            break
        total += len(line)
        if total > limit:
            raise OverflowError("message larger than databytes")
        out.append(line)
    return b"".join(out)
