"""nonsmtp — qpy-pickup's pass of locally injected mail through control/nonsmtpmilters.

Mail that did not come over SMTP (qpy-sendmail, qpy-inject, forwards by a
user's .qmail) reaches the filters here, in qpy-pickup (uid qpyq), as
Postfix's non_smtpd_milters reach it in cleanup: the filters see a connection
from `localhost [127.0.0.1]`, HELO `localhost`, the envelope, then the message
as injected (pickup's Received: line names the queue id, chosen after them,
and goes on top of what they leave); their edits (headers, body, sender,
recipients) are what the queue gets; macro i is the drop file's name (the
injector's id). Drop files written by qpyd (SMTP: its
filters ran before its 250), qpys (bounces), qpyalias and qpyq (this module's
own bounces) are not filtered.

Why here and not in the injector: the injector runs as the injecting user, so
it could only reach a filter whose socket every local user may open, and a
user who can talk to OpenDKIM directly as an internal client gets anything
signed with the domain's key. Pickup alone (qpyq) needs the socket. The cost:
the injector's exit 0 came first, so a refusal cannot be told to the caller:

  reject (5xx)        a bounce to the envelope sender (to postmaster when the
                      sender is empty) quoting the filter's reply; the drop file
                      is removed once the bounce is durable in drop/.
  tempfail (4xx), or  the drop file stays in drop/ and is tried again
  a filter that       RETRY_SECONDS later (logged each time): nothing is lost,
  fails with          and the message waits for the filter as Postfix's
  default tempfail    deferred mail would.
  discard             logged, the drop file removed.
"""

from __future__ import annotations

import os
import tempfile
import time
import zlib
from typing import BinaryIO

from qpy.common import dropfile, envelope
from qpy.common.control import Control
from qpy.common.filters import Filters, Message, Verdict
from qpy.common.log import clean, log
from qpy.common.milter import Spec
from qpy.common.queue import Paths
from qpy.inject.drop import InjectError, inject

RETRY_SECONDS = 60
COPY = 1 << 20


class Torn(Exception):
    """The drop file's CRC does not match: pickup quarantines it."""


class Held(Exception):
    """Not admitted now (tempfail): the drop file stays for a later try."""


class NonSmtp:
    def __init__(self, root: str, control: Control, skip_uids: set[int]):
        self.root = root
        self.paths = Paths(root)  # spools: unlinked files in pickup's own directory
        self.control = control
        self.skip_uids = skip_uids | {os.geteuid()}   # and our own bounces
        self.waiting: dict[str, float] = {}     # drop name -> when to try it again
        self.out: BinaryIO | None = None         # the last filtered message, until the next

    def admit(self, name: str, uid: int, fd: int, h: dropfile.Header, env: bytes,
              sender: bytes, rcpts: list[bytes]) -> tuple:
        """(fd, offset, length, CRC to check or None, sender, recipients) of what
        pickup copies: the drop file's message, or what the filters made of it."""
        if not self.applies(name, uid):
            return fd, h.length, h.msglen, h.crc, sender, rcpts
        if self.out is not None:
            self.out.close()
        self.out, size, sender, rcpts = self.run(name, fd, h, env, sender, rcpts)
        return self.out.fileno(), 0, size, None, sender, rcpts

    def _problem(self) -> str:
        """Why control/nonsmtpmilters cannot be used ('' when it can, or is absent)."""
        if self.control.lines("nonsmtpmilters"):
            return ""
        return self.control.explain("nonsmtpmilters")[1].partition("malformed: ")[2]

    def applies(self, name: str, uid: int) -> bool:
        if uid in self.skip_uids or not (self.control.lines("nonsmtpmilters")
                                         or self._problem()):
            return False
        if self.waiting.get(name, 0) > time.monotonic():
            raise Held("waiting")
        return True

    def run(self, name: str, fd: int, h: dropfile.Header, env: bytes,
            sender: bytes, rcpts: list[bytes]) -> tuple[BinaryIO, int, bytes, list[bytes]]:
        spool = tempfile.TemporaryFile(dir=self.paths.pickup)
        try:
            crc, offset, left = 0, h.length, h.msglen
            while left > 0:
                data = os.pread(fd, min(left, COPY), offset)
                if not data:
                    raise Torn("file shrank while being read")
                crc = zlib.crc32(data, crc)
                spool.write(data)
                offset, left = offset + len(data), left - len(data)
            if h.crc is not None and zlib.crc32(env, crc) != h.crc:
                raise Torn("checksum mismatch (torn by a crash before it was acknowledged)")
            msg = Message(spool, sender, rcpts)
            verdict = self._filter(name, msg)
            if verdict is None:
                out = tempfile.TemporaryFile(dir=self.paths.pickup)
                size = msg.write_to(out.write)
                out.flush()
                self.waiting.pop(name, None)
                return out, size, msg.sender, msg.recipients
        finally:
            spool.close()
        self._refused(name, verdict, sender, rcpts)
        raise AssertionError("unreachable")

    def _filter(self, name: str, msg: Message) -> Verdict | None:
        try:
            problem = self._problem()
            specs = [Spec(ln) for ln in self.control.lines("nonsmtpmilters")]
        except ValueError as e:
            problem = str(e)
        if problem:     # a typing error must not let local mail past its filters
            log("control/nonsmtpmilters unusable: %s" % clean(problem))
            return Verdict("tempfail", who="control/nonsmtpmilters")
        fl = Filters(specs, "drop %s" % clean(name))
        local = {b"j": self.control.line("me").encode(), b"daemon_name": b"qpy-pickup",
                 b"client_addr": b"127.0.0.1", b"client_name": b"localhost",
                 b"_": b"localhost [127.0.0.1]"}
        try:
            verdict = fl.connect(b"localhost", "4", 0, b"127.0.0.1", local)
            verdict = verdict or fl.helo(b"localhost", {})
            verdict = verdict or fl.mail(msg.sender, [], {b"mail_addr": msg.sender,
                                                          b"i": name.encode()})
            for r in msg.recipients:
                verdict = verdict or fl.rcpt(r, [], {b"rcpt_addr": r, b"i": name.encode()})
            ids = {b"i": name.encode()}
            verdict = verdict or fl.data(ids) or fl.message(msg, ids)
        finally:
            fl.quit()
        return verdict

    def _refused(self, name: str, verdict: Verdict, sender: bytes, rcpts: list[bytes]) -> None:
        if verdict.action == "discard":
            log("drop %s discarded by milter %s" % (clean(name), verdict.who))
            self._remove(name)
        if verdict.action == "tempfail":
            self.waiting[name] = time.monotonic() + RETRY_SECONDS
            log("drop %s held by milter %s: %s; next try in %d s"
                % (clean(name), verdict.who, verdict.text(), RETRY_SECONDS))
            raise Held(verdict.text())
        self._bounce(name, verdict, sender, rcpts)
        self._remove(name)

    def _remove(self, name: str) -> None:
        """The drop file, handled without admission (bounced or discarded)."""
        try:
            os.unlink(os.path.join(self.paths.drop, name))
        except FileNotFoundError:
            pass
        raise Held("done")

    def _bounce(self, name: str, verdict: Verdict, sender: bytes, rcpts: list[bytes]) -> None:
        me = self.control.line("me").encode()
        to = sender or b"postmaster@" + me
        text = (b"From: MAILER-DAEMON@" + me + b"\nTo: " + to +
                b"\nSubject: failure notice\n\n"
                b"Your message was refused by a mail filter on " + me + b" before it\n"
                b"entered the queue; it was not delivered to:\n\n" +
                b"".join(b"  <" + r + b">\n" for r in rcpts) +
                b"\nThe filter said:\n  " + verdict.text().encode("utf-8", "replace") + b"\n")
        try:
            inject(self.root, text, b"", [to])
        except (InjectError, envelope.EnvelopeError) as e:
            self.waiting[name] = time.monotonic() + RETRY_SECONDS
            log("drop %s refused by milter %s but no bounce (%s): held"
                % (clean(name), verdict.who, clean(str(e))))
            raise Held(str(e))
        log("drop %s refused by milter %s: %s; bounced to <%s>"
            % (clean(name), verdict.who, verdict.text(), clean(to)))
