"""secure — STARTTLS, implicit TLS and SMTP AUTH on top of qpy-smtpd's Session.

Not a program: `SecureSession` is the Session (qpy.smtp.session) that
qpy-smtpd and the workers of qpy-tcpserver run. With no certificate and no
checker it behaves exactly as the plain Session (STARTTLS and AUTH then get 502).

    STARTTLS      RFC 3207: 220, drop what was pipelined after it, handshake,
                  forget HELO/AUTH/mail (EHLO again); advertised only before TLS
                  and only with a usable control/servercert.pem (qpy.smtp.tls).
    implicit TLS  QPY_LISTENER=smtps (port 465, RFC 8314): handshake before the
                  greeting.
    AUTH          RFC 4954 PLAIN, LOGIN (qpy.smtp.auth), only under TLS; checked
                  by qpy-authd; success lets the session relay and names the
                  user in the log and the Received: line.
    MAIL          control/tlsrequired: 530 5.7.0 without TLS;
                  control/authsenders: 553 5.7.1 for a sender not the user's.

`load(root)` reads the certificate and those control files; qpy-tcpserver calls
it once before forking workers (and again on SIGHUP), so the key is read once.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.smtp import auth, tls
from qpy.smtp.channel import Channel
from qpy.smtp.command import CommandError
from qpy.smtp.config import Config
from qpy.smtp.session import Session

_SAFE_USER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_@+=")


class Settings:
    def __init__(self, root: str):
        c = Control(root)
        self.ctx: ssl.SSLContext | None = tls.server_context(root)
        self.tlsrequired = c.flag("tlsrequired")
        self.authsenders = c.lines("authsenders")


_settings: dict[str, Settings] = {}


def load(root: str) -> Settings:
    """(Re)read certificate and TLS/AUTH control files for root; kept for the sessions."""
    _settings[root] = Settings(root)
    return _settings[root]


def settings(root: str) -> Settings:
    return _settings.get(root) or load(root)


class SecureSession(Session):
    def __init__(self, cfg: Config, env: Mapping[str, str], channel: Channel):
        super().__init__(cfg, env, channel)
        self.sec = settings(cfg.root)
        # TLS needs a socket (not a pipe, as in some tests); no certificate, no look
        self.ctx = self.sec.ctx if self.sec.ctx is not None and tls.is_socket(channel.rfd) \
            else None
        self.tls_info = ""
        self.tls_sock: ssl.SSLSocket | None = None
        self.auth_failures = 0
        self.verbs[b"AUTH"] = self.cmd_auth
        self.verbs[b"MAIL"] = self.cmd_mail
        self.mail_params[b"AUTH"] = self.param_auth
        if self.ctx is not None:
            self.verbs[b"STARTTLS"] = self.cmd_starttls
        self._advertise()

    def _advertise(self) -> None:
        if not self.tls:
            self.extensions = ["STARTTLS"] if self.ctx is not None else []
        else:
            self.extensions = [auth.ehlo_line()] if auth.offered(self.cfg.root, True) else []

    # -- TLS -----------------------------------------------------------------------
    def _go_tls(self) -> None:
        assert self.ctx is not None
        try:
            sock = tls.secure_channel(self.ch, self.ctx, self.remote_ip)
        except tls.HandshakeError as e:
            log(clean(str(e), 300))
            self.closing = True
            return
        self.tls = True
        self.tls_sock = sock
        self.tls_info = tls.received_comment(sock)
        self.reset()            # RFC 3207 4.2: nothing said before TLS counts
        self._advertise()
        log("TLS %s" % tls.describe(sock))

    def cmd_starttls(self, arg: bytes) -> None:
        if self.tls:
            raise CommandError(503, "5.5.1 TLS already active")
        if arg.strip(b" "):
            raise CommandError(501, "5.5.4 Syntax: STARTTLS")
        self.reply(220, "2.0.0 Ready to start TLS")
        self._go_tls()

    def close(self) -> None:
        if self.tls_sock is not None:
            self.tls_sock.close()     # its own dup of the connection's descriptor
            self.tls_sock = None

    def on_smtps(self) -> None:
        if self.ctx is None:
            super().on_smtps()
            return
        self._go_tls()

    # -- AUTH ------------------------------------------------------------------------
    def _error(self, text: str) -> None:
        self.reply(int(text[:3]), text[4:])

    def _ask(self, challenge: bytes) -> bytes | None:
        self.reply(334, challenge.decode("ascii"))
        line, too_long = self.ch.read_line(auth.MAX_B64 + 2)
        return None if too_long else line

    def cmd_auth(self, arg: bytes) -> None:
        if not self.tls:
            raise CommandError(538, auth.NEED_TLS[4:])
        if not auth.offered(self.cfg.root, True):
            raise CommandError(502, auth.NOT_OFFERED[4:])
        if self.auth_user is not None:
            raise CommandError(503, auth.ALREADY[4:])
        if self.sender is not None:
            raise CommandError(503, auth.IN_TRANSACTION[4:])
        if not self.esmtp:
            raise CommandError(503, "5.5.1 Send EHLO first")
        result = auth.exchange(arg, self._ask)
        if isinstance(result, str):
            self._error(result)
            return
        user, password = result
        answer = auth.check(self.cfg.root, user, password, self.remote_ip)
        if answer == b"Y":
            self.auth_user = user.decode("ascii")
            log("authenticated user %s" % clean(user))
            self._error(auth.OK)
            return
        if answer == b"N":
            self.auth_failures += 1
            if self.auth_failures >= auth.MAX_FAILURES:
                self._error(auth.TOO_MANY)
                self.closing = True
                return
        elif answer == b"L":
            self.closing = True
        self._error(auth.reply_for(answer))

    def param_auth(self, value: bytes | None) -> None:
        """MAIL ... AUTH=<> (RFC 4954 5): accepted and not trusted."""

    # -- MAIL policy -----------------------------------------------------------------
    def cmd_mail(self, arg: bytes) -> None:
        if self.sec.tlsrequired and not self.tls:
            raise CommandError(530, "5.7.0 Must issue a STARTTLS command first")
        super().cmd_mail(arg)

    def sender_refusal(self) -> str | None:
        """control/authsenders: an authenticated user sends as its own addresses only."""
        if (self.auth_user is not None and self.sec.authsenders
                and not auth.sender_allowed(self.sec.authsenders, self.auth_user,
                                            self.sender or b"")):
            return auth.SENDER_REFUSED[4:]
        return None

    def protocol(self) -> str:
        word = super().protocol()
        if self.tls_info:
            word += " " + self.tls_info
        if self.auth_user is not None:
            word += " (authenticated user %s)" % "".join(
                c if c in _SAFE_USER else "?" for c in self.auth_user)
        return word
