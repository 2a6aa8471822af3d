"""milters — qpy-smtpd's side of control/milters: macros, stages, the message pass.

The filters (qpy.common.filters over qpy.common.milter) are told about the
connection before the greeting, then HELO, MAIL, RCPT and DATA as the client
sends them, each with the macros Postfix sends at that stage. With filters
configured, the DATA is spooled to an unlinked temporary file (never into
queue/drop/ first): after the final dot the filters see the headers and body,
and only then is the message, as edited by them, written into the drop file
and committed, so the 250 comes after every filter's end-of-message answer
and the queue holds what the filters made of the message.

Authentication-Results (RFC 8601 section 5): before the filters see the
message, every Authentication-Results field whose authserv-id is this host's
(`me`, what the filters get as macro `j`) is removed: only a filter of ours
may say what this host checked. The filters' own fields are kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import BinaryIO

from qpy.common.control import Control
from qpy.common.filters import Filters, Message, Verdict, named
from qpy.common.log import clean, log
from qpy.common.milter import Spec
from qpy.inject.drop import Drop
from qpy.smtp import authres


def load_specs(ctl: Control) -> tuple[list[Spec], str]:
    """control/milters as specs, and what is wrong with it ('' when usable): a file
    that cannot be read or parsed must not let mail past the filters."""
    lines, source = ctl.explain("milters")
    if source.startswith("malformed"):
        return [], source
    try:
        return [Spec(ln) for ln in lines], ""     # type: ignore[union-attr]
    except ValueError as e:
        return [], clean(str(e), 200)


def strip_foreign_ar(msg: Message, me: bytes) -> int:
    kept = [f for f in msg.headers if not authres.forged(f[0], f[1], me)]
    removed = len(msg.headers) - len(kept)
    msg.headers = kept
    return removed


class SessionFilters:
    """The filters of one SMTP session."""

    def __init__(self, specs: list[Spec], problem: str, me: str, env: Mapping[str, str],
                 who: str):
        self.filters = Filters(specs, who)
        self.me = me.encode()
        self.who = who
        if problem:
            log("%scontrol/milters unusable (%s): mail tempfailed" % (named(who), problem))
            self.filters.refusal = Verdict("tempfail")
        self.env = env
        self.ip = env.get("TCPREMOTEIP", "")
        name = env.get("TCPREMOTEHOST", "") or "unknown"
        self.conn = {b"j": self.me, b"daemon_name": env.get("QPY_LISTENER", "smtp").encode(),
                     b"v": b"qpy", b"daemon_addr": env.get("TCPLOCALIP", "").encode(),
                     b"daemon_port": env.get("TCPLOCALPORT", "").encode(),
                     b"client_addr": self.ip.encode(), b"client_name": name.encode(),
                     b"client_port": env.get("TCPREMOTEPORT", "").encode(),
                     b"client_ptr": name.encode(),
                     b"_": ("%s [%s]" % (name, self.ip)).encode()}
        self.auth: dict[bytes, bytes] = {}
        self.active = False       # MAIL went to the filters and no end of message yet

    def __bool__(self) -> bool:
        return bool(self.filters) or self.filters.refusal is not None

    def connect(self) -> Verdict | None:
        family = "6" if ":" in self.ip else "4" if self.ip else "U"
        port = self.env.get("TCPREMOTEPORT", "0")
        return self.filters.connect(self.conn[b"client_name"], family,
                                    int(port) if port.isdigit() else 0, self.ip.encode(),
                                    self.conn)

    def helo(self, name: bytes, tls_info: str) -> Verdict | None:
        macros = {}
        if tls_info:     # "TLSv1.3 CIPHER BITS"
            version, cipher, bits = (tls_info.split() + ["", "", ""])[:3]
            macros = {b"tls_version": version.encode(), b"cipher": cipher.encode(),
                      b"cipher_bits": bits.encode()}
        return self.filters.helo(name, macros)

    def mail(self, sender: bytes, params: list[bytes], auth_user: str | None) -> Verdict | None:
        self.end()
        macros = {b"mail_addr": sender, b"mail_host": sender.rpartition(b"@")[2],
                  b"mail_mailer": b"smtp"}
        if auth_user:
            macros.update({b"auth_type": b"PLAIN", b"auth_authen": auth_user.encode()})
        self.active = True
        return self.filters.mail(sender, params, macros)

    def rcpt(self, rcpt: bytes, params: list[bytes], local: bool) -> Verdict | None:
        return self.filters.rcpt(rcpt, params, {
            b"rcpt_addr": rcpt, b"rcpt_host": rcpt.rpartition(b"@")[2],
            b"rcpt_mailer": b"local" if local else b"smtp"})

    def data(self, queue_id: str) -> Verdict | None:
        return self.filters.data({b"i": queue_id.encode()})

    @staticmethod
    def spool() -> BinaryIO:
        return tempfile.TemporaryFile()

    def message(self, spool: BinaryIO, sender: bytes, rcpts: list[bytes],
                queue_id: str) -> tuple[Verdict | None, Message]:
        msg = Message(spool, sender, rcpts)
        removed = strip_foreign_ar(msg, self.me)
        if removed:
            log("%sremoved %d Authentication-Results field(s) claiming %s"
                % (named(self.who), removed, clean(self.me)))
        verdict = self.filters.message(msg, {b"i": queue_id.encode()})
        self.active = False
        if verdict is None and not msg.recipients:
            verdict = Verdict("discard", who="(every recipient removed)")
        return verdict, msg

    def finish(self, session, spool: BinaryIO, drop: Drop) -> tuple[bytes, list[bytes]] | None:
        """The message pass at the final dot: refused or discarded (answered here,
        None), or written into the drop as the filters left it: its envelope."""
        verdict, msg = self.message(spool, session.sender or b"", session.recipients,
                                    drop.id)
        if verdict is not None and verdict.action != "discard":
            session.refuse(verdict)
            return None
        if verdict is not None:
            log("%sdiscarded %s: milter %s" % (named(self.who), drop.id, verdict.who))
            session.reply(250, "2.0.0 Ok: queued as %s" % drop.id)
            return None
        if msg.quarantine is not None:
            # no hold queue yet: the request is logged and marked, the mail goes on
            log("%s%s quarantine requested: %s" % (named(self.who), drop.id,
                                                    clean(msg.quarantine, 200)))
            msg.headers.insert(0, [b"X-Qpy-Quarantine",
                                   b"X-Qpy-Quarantine: " + msg.quarantine.replace(b"\r", b" ")
                                   .replace(b"\n", b" ") + b"\n"])
        msg.write_to(drop.write)
        return msg.sender, msg.recipients

    def end(self) -> None:
        if self.active:
            self.filters.end_message()
            self.active = False

    def quit(self) -> None:
        self.filters.quit()
