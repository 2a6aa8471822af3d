"""data — the DATA command of qpy-smtpd's Session: the checks before 354, the
message streamed into queue/drop/, and the answer after its real end.

Not a program: Session (session.py) inherits DataCommand. The message goes
through qpy.inject.drop, the queue's one door, and is durable before the 250.
A message over the size limit, with a bare CR or LF, or with too many hops is
read to its real end (<CR><LF>.<CR><LF>) and refused, nothing queued, and the
session goes on. A DATA refused before its 354 in an ESMTP session ends the
session (421 4.5.0): a pipelining client may send the text without waiting,
in this read or a later one, and none of it may run as a command.
"""

from __future__ import annotations

from qpy.common import dsnparam, envelope
from qpy.common.exits import permanent
from qpy.common.log import clean, log
from qpy.common.rfcdate import rfc5322_date
from qpy.inject.drop import Drop, InjectError
from qpy.smtp import authres
from qpy.smtp.channel import MAX_HOPS
from qpy.smtp.command import CommandError, received_line


class DataCommand:
    """DATA for Session; uses its cfg, ch, reply(), sender, recipients, databytes."""

    def cmd_data(self, arg: bytes) -> None:
        if self.ch.pending():
            # Bytes after DATA before our 354: not pipelining (RFC 2920 3.1), but an
            # attempt to have message text read as commands. End the session.
            self.reply(554, "5.5.0 Data sent before the 354 reply, closing connection")
            self.ch.discard_input()
            self.closing = True
            return
        try:
            self._data_start(arg)
            verdict = self.filters.data(self.drop.id) if self.filters else None
            if verdict is not None:
                self.refuse(verdict)
                self._refused_data()
                self.reset_transaction()
                return
        except CommandError as e:
            self.reply(e.code, e.text)
            self._refused_data()
            return
        try:
            self._data()
        finally:
            if self.drop is not None:
                self.drop.abort()
                self.drop = None
            self.reset_transaction()

    def _refused_data(self) -> None:
        """After a DATA refused before 354. A client that pipelines may send the
        message text without waiting for 354, in this read or a later one: whatever
        comes next could be that text, so none of it may run as a command.
        Deterministic: in an ESMTP session (PIPELINING offered) the session ends,
        whenever those bytes arrive."""
        if self.drop is not None:
            self.drop.abort()
            self.drop = None
        if self.esmtp and not self.closing:
            self.reply(421, "4.5.0 %s DATA refused, closing connection" % self.cfg.me)
        self.ch.discard_input()
        self.closing = self.closing or self.esmtp

    def _data_start(self, arg: bytes) -> None:
        """The checks before 354; CommandError for a refused DATA."""
        if arg.strip(b" "):
            raise CommandError(501, "5.5.4 DATA takes no argument")
        if self.sender is None:
            raise CommandError(503, "5.5.1 Need MAIL before DATA")
        if not self.recipients:
            raise CommandError(554, "5.5.1 No valid recipients")
        try:
            # through pickup's door when it is open: written once, by the queue
            self.drop = Drop(self.cfg.root, door=True)
        except InjectError as e:
            log("cannot open the queue: %s" % e)
            raise CommandError(451, "4.3.0 Cannot queue the message now, try again later")

    def protocol(self) -> str:
        """`with` word of the Received line (RFC 3848, RFC 6531)."""
        base = "UTF8SMTP" if self.smtputf8 else "ESMTP" if self.esmtp else "SMTP"
        suffix = ("S" if self.tls else "") + ("A" if self.auth_user else "")
        if suffix and base == "SMTP":
            base = "ESMTP"
        return base + suffix

    def _data(self) -> None:
        drop = self.drop
        assert drop is not None
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        # the message's id from the start: the same in this line, the 250 and the logs;
        # with filters the message goes to a spool first and into the drop once they agree
        spool = self.filters.spool() if self.filters else None
        # without filters, forged Authentication-Results go here (with them: milters.py)
        gate = None if spool is not None else authres.HeaderGate(drop.write,
                                                                  self.cfg.me.encode())
        sink = spool.write if gate is None else gate.write
        sink(received_line(self.helo or b"unknown", self.remote_host, self.remote_ip,
                           self.cfg.me, self.protocol(), drop.id, rfc5322_date()))
        size = 0
        limit = self.databytes
        failure: InjectError | None = None

        def emit(piece: bytes) -> None:
            nonlocal size, failure
            size += len(piece)
            if failure is not None or size > limit:
                return
            try:
                sink(piece)
            except (InjectError, OSError) as e:
                failure = e if isinstance(e, InjectError) else InjectError(53, str(e))

        bad, hops = self.ch.read_data(emit)
        if bad:
            raise CommandError(550, "5.6.0 Message refused: bare CR or LF in the data "
                                    "(lines must end with CRLF)")
        if size > limit:
            raise CommandError(552, "5.3.4 Message size exceeds fixed maximum message size")
        if hops >= MAX_HOPS:
            raise CommandError(554, "5.4.6 Too many hops, this message is looping")
        env = envelope.Envelope(self.sender or b"", self.recipients,
                                dsnparam.join_mail(self.dsn_mail), self.dsn_rcpt)
        if gate is not None and failure is None:
            try:
                gate.close()
            except InjectError as e:
                failure = e
            if gate.removed:
                log("removed %d Authentication-Results field(s) claiming %s"
                    % (gate.removed, clean(self.cfg.me)))
        if spool is not None and failure is None:
            try:
                edited = self.filters.finish(self, spool, drop)   # None: answered already
            except InjectError as e:
                failure = e
            else:
                if edited is None:
                    return
                env = env.with_recipients(*edited)
        if failure is None:
            try:
                name = drop.commit(env.sender, env.recipients, env.mail, env.rcpt)
            except InjectError as e:
                failure = e
            else:
                self.messages += 1
                # the 250 out first (unless pipelined commands wait: it goes with
                # their replies): the client waits for it; the log line, and the close
                # of the message's memfd (cmd_data's finally: it frees its pages), can wait
                self.reply(250, "2.0.0 Ok: queued as %s" % name)
                if not self.ch.pending():
                    self.ch.flush()
                log("accepted %s bytes %d from <%s> recipients %d"
                    % (name, size, clean(self.sender or b"", 200), len(self.recipients)))
                return
        reason = clean(str(failure), 200)
        if permanent(failure.code):
            raise CommandError(554, "5.3.0 Message refused: %s" % reason)
        raise CommandError(451, "4.3.0 Message not queued: %s" % reason)
