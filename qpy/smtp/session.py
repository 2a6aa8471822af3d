"""session — one SMTP conversation of qpy-smtpd (RFC 5321), on a Channel.

Not a program: qpy-smtpd (smtpd.py) runs it, through secure.SecureSession
which adds STARTTLS and AUTH. What it answers and why is in qpy-smtpd's man
page; the limits that protect the host are in docs/security.md:

    MAX_ERRORS           syntax and sequence errors, then 421 and close
    refused recipients   slowed down, then the session ended (screen.py, HARVEST)
    timeoutsmtpd,        a whole command line, and a whole DATA, each within
    timeoutsession       the first; the whole session within the second (421 4.4.2)
DATA and its limits are in data.py.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qpy.common import address, dsnparam, rewrite
from qpy.common.control import effective_limit
from qpy.common.log import clean, log
from qpy.common.state import LOCAL
from qpy.inject.drop import Drop
from qpy.smtp import ratelimit, screen
from qpy.smtp.channel import Channel, Closed, SessionTimeout, Timeout
from qpy.smtp.command import (
    MAX_DSN_COMMAND,
    CommandError,
    dsn_params,
    line_too_long,
    parse_path_arg,
    parse_size,
    split_line,
)
from qpy.smtp.config import Config
from qpy.smtp.data import DataCommand

if TYPE_CHECKING:
    from qpy.common.filters import Verdict

MAX_ERRORS = 10              # syntax and sequence errors before 421 and close
LAST_WORDS = 5.0             # seconds the 421 of an expired session may take to go out
ERROR_CODES = (500, 501, 502, 503, 555)
NOT_IMPLEMENTED = (b"EXPN", b"TURN", b"ETRN", b"ATRN", b"BDAT", b"STARTTLS", b"AUTH")


class Session(DataCommand):
    """One SMTP conversation. TLS and AUTH add verbs to `verbs`, keywords to
    `extensions` and parameters to `mail_params`; `reset()` forgets all that the
    client said (what STARTTLS requires), `reset_transaction()` only the mail."""

    def __init__(self, cfg: Config, env: Mapping[str, str], channel: Channel):
        self.cfg = cfg
        self.ch = channel
        self.remote_ip = env.get("TCPREMOTEIP", "unknown")
        self.remote_host = env.get("TCPREMOTEHOST", "unknown")
        self.relayclient = env.get("RELAYCLIENT")
        self.listener = env.get("QPY_LISTENER", "smtp")
        self.databytes = effective_limit(cfg.databytes, env.get("DATABYTES"))
        self.tls = False
        self.verbs: dict[bytes, Callable[[bytes], None]] = {
            b"HELO": self.cmd_helo, b"EHLO": self.cmd_ehlo, b"MAIL": self.cmd_mail,
            b"RCPT": self.cmd_rcpt, b"DATA": self.cmd_data, b"RSET": self.cmd_rset,
            b"NOOP": self.cmd_noop, b"VRFY": self.cmd_vrfy, b"HELP": self.cmd_help,
            b"QUIT": self.cmd_quit,
        }
        self.extensions: list[str] = []
        self.mail_params: dict[bytes, Callable[[bytes | None], None]] = {
            b"SIZE": self.param_size, b"BODY": self.param_body, b"SMTPUTF8": self.param_utf8,
        }
        self.messages = 0
        self.rcpt_total = 0
        self.errors = 0
        self.rcpt_errors = 0
        self.closing = False
        self.drop: Drop | None = None
        self.command = b""
        self.filters = None
        if cfg.milters or cfg.milters_problem:
            from qpy.smtp import milters
            self.filters = milters.SessionFilters(cfg.milters, cfg.milters_problem, cfg.me,
                                                  env, "")   # the log names the session
        self.env = env
        self.blocked: tuple[int, str] | None = None     # a DNS blocklist names the client
        self.greeted: Callable[[], None] | None = None  # run once the 220 is out
        self.reset()

    def reset(self) -> None:
        """Forget everything the client told us (after STARTTLS): HELO, AUTH, mail."""
        self.helo: bytes | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.reset_transaction()

    def reset_transaction(self) -> None:
        if getattr(self, "filters", None) is not None:
            self.filters.end()          # an ABORT for filters that saw this MAIL
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []
        self.smtputf8 = False
        self.dsn_mail: dict[bytes, bytes] = {}     # RET, ENVID (qpy.common.dsnparam)
        self.dsn_rcpt: list[bytes] = []            # each recipient's NOTIFY, ORCPT

    def close(self) -> None:
        """Release what the session holds besides rfd/wfd (the TLS layer's socket)."""

    def may_relay(self) -> bool:
        return self.relayclient is not None or self.auth_user is not None

    # -- replies ---------------------------------------------------------------------
    def reply(self, code: int, *lines: str) -> None:
        last = len(lines) - 1       # a one-line reply is the common case: no join
        self.ch.write(("%d %s\r\n" % (code, lines[0]) if not last else "".join(
            "%d%s%s\r\n" % (code, " " if n == last else "-", text)
            for n, text in enumerate(lines))).encode("utf-8", "replace"))
        if code >= 400:
            if code in ERROR_CODES:
                self.errors += 1
            log("refused %s: %d %s" % (clean(self.command, 200), code, lines[-1]))

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> str:
        """Serve until QUIT or the end; returns how it ended (for the log line)."""
        result = "quit"
        try:
            if self.listener == "smtps" and not self.tls:
                self.on_smtps()
                if self.closing:
                    return "no tls"
            if self.cfg.greetdelay and not self.tls and screen.pregreet(self):
                return "pregreet"
            self.blocked = self.cfg.rbls.check(self.remote_ip, self.env)
            if self.filters:
                self.filters.connect()   # a refusal answers every MAIL from now on
            self.reply(220, "%s ESMTP" % self.cfg.greeting)
            if self.greeted is not None:
                self.ch.flush()            # the 220 first: the client waits for it
                self.greeted()
            while not self.closing:
                if self.errors >= MAX_ERRORS:
                    self.reply(421, "4.7.0 %s Too many errors, closing connection" % self.cfg.me)
                    result = "too many errors"
                    break
                self.one_command()
        except SessionTimeout:
            result = "session too long"
            self.ch.session_end = time.monotonic() + LAST_WORDS
            self._last_words(421, "4.4.2 %s Session too long, closing connection" % self.cfg.me)
        except Timeout:
            result = "timeout"
            self._last_words(421, "4.4.2 %s Timeout, closing connection" % self.cfg.me)
        except Closed:
            result = "disconnect"
        except Exception as e:
            result = "error %s" % type(e).__name__
            log("internal error: %s" % clean(traceback.format_exc(limit=3), 600))
            self._last_words(421, "4.3.0 Internal error, closing connection")
        finally:
            if self.drop is not None:
                self.drop.abort()
                self.drop = None
            if self.filters is not None:
                self.filters.quit()
            try:
                self.ch.flush()
            except (Closed, Timeout, OSError):
                pass
            log("end: helo %s messages %d recipients %d result %s"
                % (clean(self.helo or b"-", 100), self.messages, self.rcpt_total, result))
        return result

    def refuse(self, verdict: Verdict) -> None:
        self.reply(verdict.code, *verdict.lines)
        self.closing = verdict.code == 421     # 421 closes (RFC 5321 3.8)

    def _last_words(self, code: int, text: str) -> None:
        try:
            self.reply(code, text)
            self.ch.flush()
        except (Closed, Timeout, OSError):
            pass

    def on_smtps(self) -> None:
        """Implicit TLS listener: the TLS layer replaces this. Without it, refuse."""
        self.reply(421, "4.7.0 TLS not available, closing connection")
        self.closing = True

    def one_command(self) -> None:
        line, too_long = self.ch.read_line(MAX_DSN_COMMAND)
        self.command = line[:80]
        if too_long or line_too_long(line):
            self.command = b"(line too long)"
            self.reply(500, "5.5.2 Line too long")
            return
        try:
            verb, arg = split_line(line)
            self.command = verb[:20]
            handler = self.verbs.get(verb)
            if handler is None:
                if verb in NOT_IMPLEMENTED:
                    raise CommandError(502, "5.5.1 Command not implemented")
                raise CommandError(500, "5.5.1 Command unrecognized")
            handler(arg)
        except CommandError as e:
            if self.command == b"RCPT" and e.code in screen.RCPT_ERROR_CODES:
                screen.recipient_refused(self, e)
                return
            self.reply(e.code, e.text)
        except (Timeout, Closed):
            raise
        except Exception:
            log("internal error in %s: %s" % (clean(self.command),
                                               clean(traceback.format_exc(limit=4), 600)))
            self.reset_transaction()
            self.reply(451, "4.3.0 Internal error, try again later")
            self.errors += 1

    # -- commands ------------------------------------------------------------------------
    def _hello(self, arg: bytes, esmtp: bool) -> bytes:
        name = arg.strip(b" ")
        if not name:
            raise CommandError(501, "5.5.4 Syntax: %s hostname" % ("EHLO" if esmtp else "HELO"))
        self.reset_transaction()
        self.helo = name
        self.esmtp = esmtp
        return name

    def _filter_hello(self) -> bool:
        verdict = self.filters.helo(self.helo or b"", getattr(self, "tls_info", "")) \
            if self.filters else None
        if verdict is not None:
            self.helo = None
            self.refuse(verdict)
        return verdict is None

    def cmd_helo(self, arg: bytes) -> None:
        self._hello(arg, False)
        if self._filter_hello():
            self.reply(250, self.cfg.me)

    def ehlo_keywords(self) -> list[str]:
        size = "SIZE %d" % self.databytes
        return (["PIPELINING", "8BITMIME", size, "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
                + self.extensions)

    def cmd_ehlo(self, arg: bytes) -> None:
        self._hello(arg, True)
        if self._filter_hello():
            self.reply(250, self.cfg.me, *self.ehlo_keywords())

    def cmd_mail(self, arg: bytes) -> None:
        if self.helo is None:
            raise CommandError(503, "5.5.1 Send HELO or EHLO first")
        if self.sender is not None:
            raise CommandError(503, "5.5.1 Nested MAIL command")
        if ratelimit.shared is not None and ratelimit.shared.over("messages", self.remote_ip):
            self.reply(421, "4.7.0 Too many messages from your address (rate limit), "
                            "closing connection")
            self.closing = True
            return
        path, params = parse_path_arg(arg, b"FROM:")
        if params and not self.esmtp:
            raise CommandError(555, "5.5.4 Parameters need EHLO")
        self.smtputf8 = False
        self.dsn_mail = dsn_params(params, dsnparam.MAIL_KEYS)     # RET, ENVID
        for key, value in params.items():
            if key in self.dsn_mail:
                continue
            handler = self.mail_params.get(key)
            if handler is None:
                raise CommandError(555, "5.5.4 Unsupported parameter %s" % clean(key, 20))
            handler(value)
        try:
            sender = address.parse_path(path, utf8=self.smtputf8)
        except address.NeedsUTF8:
            self.smtputf8 = False
            raise CommandError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
        except address.AddressError as e:
            self.smtputf8 = False
            raise CommandError(501, "5.1.7 Bad sender address syntax: %s" % e)
        if sender and self.cfg.bad_sender(sender):
            self.smtputf8 = False
            raise CommandError(553, "5.7.1 Sender address refused by policy")
        if self.filters:
            verdict = self.filters.mail(sender, [k + (b"=" + v if v is not None else b"")
                                                 for k, v in params.items()], self.auth_user)
            if verdict is not None:
                self.filters.end()
                self.smtputf8 = False
                return self.refuse(verdict)
        self.sender = sender
        refusal = self.sender_refusal()
        if refusal is not None:
            self.reset_transaction()
            return self.reply(553, refusal)
        self.reply(250, "2.1.0 Ok")

    def sender_refusal(self) -> str | None:
        """A 553's text for self.sender, or None (secure.py: control/authsenders)."""
        return None

    def param_size(self, value: bytes | None) -> None:
        size = parse_size(value)
        if size > self.databytes:
            raise CommandError(552, "5.3.4 Message size exceeds fixed maximum message size")

    def param_body(self, value: bytes | None) -> None:
        if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
            raise CommandError(501, "5.5.4 BODY is 7BIT or 8BITMIME")

    def param_utf8(self, value: bytes | None) -> None:
        if value is not None:
            raise CommandError(501, "5.5.4 SMTPUTF8 takes no value")
        self.smtputf8 = True

    def cmd_rcpt(self, arg: bytes) -> None:
        if self.sender is None:
            raise CommandError(503, "5.5.1 Need MAIL before RCPT")
        path, params = parse_path_arg(arg, b"TO:")
        if params and not self.esmtp:
            raise CommandError(555, "5.5.4 Parameters need EHLO")
        have = dsn_params(params, dsnparam.RCPT_KEYS)       # NOTIFY, ORCPT
        if len(have) != len(params):
            raise CommandError(555, "5.5.4 Unsupported RCPT parameter")
        if path[1:-1].lower() == b"postmaster":
            rcpt = b"postmaster@" + self.cfg.me.lower().encode("utf-8")
        else:
            try:
                rcpt = address.parse_path(path, utf8=self.smtputf8)
            except address.NeedsUTF8:
                raise CommandError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
            except address.AddressError as e:
                raise CommandError(501, "5.1.3 Bad recipient address syntax: %s" % e)
            if not rcpt:
                raise CommandError(501, "5.1.3 Empty recipient")
        if len(self.recipients) >= self.cfg.maxrcpt:
            raise CommandError(452, "4.5.3 Too many recipients")
        if self.relayclient:    # qmail-smtpd appends RELAYCLIENT's value to each recipient
            try:
                rcpt = rewrite.append_suffix(rcpt, self.relayclient.encode("utf-8", "replace"),
                                             self.smtputf8)
            except address.AddressError as e:
                raise CommandError(553, "5.1.3 Recipient with RELAYCLIENT's suffix: %s" % e)
        route = self.cfg.rewrite.route(rcpt)
        if not self.may_relay():
            # where the mail goes after the percent hack counts too (qmail-smtpd checks
            # only the domain given, and relays through a percenthack domain)
            for domain in {address.domain_part(rcpt), address.domain_part(route.target)}:
                if not self.cfg.in_rcpthosts(domain):
                    raise CommandError(553, "5.7.1 Relaying denied: %s is not a domain of mine"
                                       % clean(domain, 100))
        if self.blocked is not None and not self.may_relay():
            raise CommandError(*self.blocked)
        is_local = self.check_local(route)
        if self.filters:
            verdict = self.filters.rcpt(rcpt, [k + b"=" + v for k, v in have.items()], is_local)
            if verdict is not None:
                return self.refuse(verdict)
        self.recipients.append(rcpt)
        self.dsn_rcpt.append(dsnparam.join_rcpt(have))
        self.rcpt_total += 1
        self.reply(250, "2.1.5 Ok")

    def check_local(self, route: rewrite.Route) -> bool:
        """Refuse an unknown local recipient, by the classification that qpy-queue-send
        and qpy-lspawn will make (qpy.common.rewrite); True when the address is local."""
        if route.channel != LOCAL or self.cfg.acceptunknown:
            return route.channel == LOCAL
        known = self.cfg.recipients.known(route.local)
        if known is None:
            raise CommandError(451, "4.3.0 Cannot check recipients now, try again later")
        if not known:
            raise CommandError(550, "5.1.1 No such user here")
        return True

    def cmd_rset(self, arg: bytes) -> None:
        if arg.strip(b" "):
            raise CommandError(501, "5.5.4 RSET takes no argument")
        self.reset_transaction()
        self.reply(250, "2.0.0 Ok")

    def cmd_noop(self, arg: bytes) -> None:
        self.reply(250, "2.0.0 Ok")

    def cmd_vrfy(self, arg: bytes) -> None:
        self.reply(252, "2.5.0 Cannot VRFY, but send some mail and I will try")

    def cmd_help(self, arg: bytes) -> None:
        self.reply(214, "2.0.0 qpy: see RFC 5321")

    def cmd_quit(self, arg: bytes) -> None:
        self.reply(221, "2.0.0 %s closing connection" % self.cfg.me)
        self.closing = True
