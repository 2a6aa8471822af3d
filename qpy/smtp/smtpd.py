"""qpy-smtpd — receive mail by SMTP on one connection (qmail-smtpd, done strictly).

SYNOPSIS
    qpy-smtpd                         (fd 0 and 1 are the connection)
    tcpserver -u UID -g GID 0 25 /opt/qpy/bin/qpy-smtpd      (ucspi-tcp)
    qpy-smtpd --as-caller             (qpy-sendmail -bs: stdin/stdout, as the caller)

    qpy-tcpserver runs the same Session in its pre-forked workers, without a
    new interpreter or a fork per connection.

RUNS AS
    qpyd (started as root, it drops to qpyd before reading a byte). With
    --as-caller (only from qpy-sendmail -bs; refused when PROTO or TCPREMOTEIP
    is set, i.e. on a network connection) it keeps the caller's uid, injects as
    the caller and accepts every local recipient (the caller may not read
    users/recipients; the queue bounces what has no owner, as sendmail does).

READS
    the client on fd 0; QPY_ROOT; the ucspi-tcp environment (TCPREMOTEIP,
    TCPREMOTEHOST, TCPLOCALIP, RELAYCLIENT, DATABYTES) and QPY_LISTENER;
    control/: me, smtpgreeting, locals, rcpthosts, morercpthosts,
    virtualdomains, percenthack, envnoathost, badmailfrom, databytes,
    timeoutsmtpd, maxrcpt, acceptunknown, milters; users/recipients (built by
    qpy-newrcpt).

WRITES
    replies on fd 1; accepted messages through qpy.inject.drop (the one door):
    handed to qpy-pickup at queue/door/socket as a sealed memfd, or written to
    queue/drop/ when pickup is not there or the message is over 4 MiB; durably
    in the queue, before it says 250 (`queued as ID`: the id of its Received:
    line, which pickup keeps); one log line per refused command and per session
    on fd 2.

SMTP
    RFC 5321 with PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES, SMTPUTF8.
    RECIPIENTS (docs/addresses.md). The address is parsed strictly and its
    local part put in canonical form (`"joe"@d` is `joe@d`); C0 and C1
    controls, DEL, U+2028 and U+2029 are refused (501 5.1.3). When RELAYCLIENT
    is set its value is appended to the recipient, as qmail-smtpd does. Then
    qpy.common.rewrite routes it exactly as qpy-queue-send will (envnoathost,
    percenthack, locals, virtualdomains with user@domain entries). Without
    RELAYCLIENT or AUTH, the domain as given and the domain after the percent
    hack must both be in rcpthosts (553 5.7.1). A local recipient whose local
    part (after a virtualdomains prepend) is not in users/recipients is
    refused (550 5.1.1) unless acceptunknown. The envelope carries the
    canonical address with the suffix.
    DATA ends at <CR><LF>.<CR><LF> only, and a bare CR or LF anywhere in it
    refuses the message (550 5.6.0) after reading to that end. The size limit
    (control/databytes, 52428800 when absent, qpy.common.control.message_limit;
    a client rule's DATABYTES only lowers it) is advertised as SIZE n, refused at
    MAIL for a larger SIZE= and after the real end of a larger DATA (552 5.3.4,
    nothing queued, the session goes on). A command line over 512 bytes gets
    500 5.5.2; bytes sent before the 354 reply to DATA close the session.

FILTERS
    control/milters lists milters (rspamd, OpenDKIM, OpenDMARC, clamav-milter),
    one `ENDPOINT [default_action=accept|tempfail|reject] [connect_timeout=S]
    [command_timeout=S] [content_timeout=S]` a line (unix:/path,
    inet:host:port, inet6:[addr]:port; Postfix's defaults tempfail, 30, 30,
    300 s). They are told of the connection, HELO, MAIL, RCPT and DATA as they
    come, with Postfix's macros (i = the queue id of "queued as"); with
    filters, DATA is spooled, the filters see it after the final dot, and the
    message they leave (headers, body, envelope) is what is queued, before the
    250. Authentication-Results fields from outside that claim this host's
    authserv-id (me) are removed first. A filter that fails gets its
    default_action, logged. See docs/milter.md.

SECURITY
    Every byte from the client is parsed as bytes with a bound. Addresses pass
    qpy.common.address. No shell, no template, no % formatting of client data.
    Errors never reach the wire as a traceback: an internal error is 451.

EXIT CODES
    0 always once the session has started (the log says how it ended);
    111 when it cannot drop privileges.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qpy.common import address, rewrite
from qpy.common.control import Control, ControlError, effective_limit, message_limit
from qpy.common.exits import permanent
from qpy.common.log import clean, log
from qpy.common.privilege import preamble
from qpy.common.queue import root_from
from qpy.common.rfcdate import rfc5322_date
from qpy.common.state import LOCAL
from qpy.inject.drop import Drop, InjectError
from qpy.smtp import ratelimit, screen
from qpy.smtp.channel import MAX_HOPS, Channel, Closed, Timeout
from qpy.smtp.command import (
    MAX_COMMAND,
    CommandError,
    parse_path_arg,
    parse_size,
    received_line,
    split_line,
)
from qpy.smtp.recipients import RecipientTable

if TYPE_CHECKING:
    from qpy.common.filters import Verdict

PROGRAM = "qpy-smtpd"
MAX_ERRORS = 10              # syntax and sequence errors before 421 and close
ERROR_CODES = (500, 501, 502, 503, 555)
NOT_IMPLEMENTED = (b"EXPN", b"TURN", b"ETRN", b"ATRN", b"BDAT", b"STARTTLS", b"AUTH")


def _domains(values: list[str]) -> set[bytes]:
    return {v.strip().lower().encode("utf-8") for v in values if v.strip()}


class Config:
    """The control files one session needs, read once (in qpy-tcpserver: before fork)."""

    def __init__(self, root: str, acceptunknown: bool = False):
        c = Control(root)
        self.root = root
        self.me = c.line("me")
        self.greeting = c.line("smtpgreeting") or self.me
        self.rewrite = rewrite.Rewrite.from_control(c)   # as qpy-queue-send will route
        self.rcpthosts = _domains(c.lines("rcpthosts") + c.lines("morercpthosts"))
        self.badmailfrom = _domains(c.lines("badmailfrom"))
        self.timeout = max(1, c.integer("timeoutsmtpd"))
        self.unusable = ""        # a malformed limit: every session gets 421 (serve())
        try:
            self.databytes = message_limit(c)
            self.maxrcpt = max(1, c.integer("maxrcpt"))
        except ControlError as e:
            self.databytes, self.maxrcpt, self.unusable = 1, 1, str(e)
        self.acceptunknown = acceptunknown or c.flag("acceptunknown")
        self.recipients = RecipientTable(root)
        self.milters: list = []
        self.milters_problem = ""
        value, source = c.explain("milters")
        if value or source.startswith("malformed"):
            from qpy.smtp import milters  # here: ~15 ms to import, for hosts with filters
            self.milters, self.milters_problem = milters.load_specs(c)
        self.greetdelay = c.integer("greetdelay")
        self.rbls = screen.Blocklists(c)
        self.refresh()

    def refresh(self) -> None:
        """Pick up a rebuilt recipient table (cheap: one stat); log when its state changes."""
        before = getattr(self, "_table_state", "ok")
        self.recipients.refresh()
        self._table_state = self.recipients.state
        if self.recipients.state not in ("ok", before) and not self.acceptunknown:
            log("%s: recipient table %s: %s" % (PROGRAM, self.recipients.state,
                "accepting every local recipient" if self.recipients.state == "missing"
                else "local recipients deferred"))

    def in_rcpthosts(self, domain: bytes) -> bool:
        if domain in self.rcpthosts:
            return True
        pos = domain.find(b".")
        while pos != -1:
            if domain[pos:] in self.rcpthosts:
                return True
            pos = domain.find(b".", pos + 1)
        return False

    def bad_sender(self, sender: bytes) -> bool:
        s = sender.lower()
        return s in self.badmailfrom or b"@" + address.domain_part(s) in self.badmailfrom


class Session:
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
        self.closing = False
        self.drop: Drop | None = None
        self.command = b""
        self.filters = None
        if cfg.milters or cfg.milters_problem:
            from qpy.smtp import milters
            self.filters = milters.SessionFilters(cfg.milters, cfg.milters_problem, cfg.me,
                                                  env, "%s %s" % (PROGRAM, self.remote_ip))
        self.env = env
        self.blocked: tuple[int, str] | None = None     # a DNS blocklist names the client
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

    def close(self) -> None:
        """Release what the session holds besides rfd/wfd (the TLS layer's socket)."""

    def may_relay(self) -> bool:
        return self.relayclient is not None or self.auth_user is not None

    # -- replies ---------------------------------------------------------------------
    def reply(self, code: int, *lines: str) -> None:
        out = []
        for n, text in enumerate(lines):
            sep = " " if n == len(lines) - 1 else "-"
            out.append(("%d%s%s\r\n" % (code, sep, text)).encode("utf-8", "replace"))
        self.ch.write(b"".join(out))
        if code in ERROR_CODES:
            self.errors += 1
        if code >= 400:
            log("%s %s: refused %s: %d %s" % (PROGRAM, self.remote_ip, clean(self.command, 200),
                                              code, lines[-1]))

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
            while not self.closing:
                if self.errors >= MAX_ERRORS:
                    self.reply(421, "4.7.0 %s Too many errors, closing connection" % self.cfg.me)
                    result = "too many errors"
                    break
                self.one_command()
        except Timeout:
            result = "timeout"
            self._last_words(421, "4.4.2 %s Timeout, closing connection" % self.cfg.me)
        except Closed:
            result = "disconnect"
        except Exception as e:
            result = "error %s" % type(e).__name__
            log("%s %s: internal error: %s" % (PROGRAM, self.remote_ip,
                                               clean(traceback.format_exc(limit=3), 600)))
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
            log("%s %s end: helo %s messages %d recipients %d result %s"
                % (PROGRAM, self.remote_ip, clean(self.helo or b"-", 100), self.messages,
                   self.rcpt_total, result))
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
        line, too_long = self.ch.read_line(MAX_COMMAND)
        self.command = line[:80]
        if too_long:
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
            self.reply(e.code, e.text)
        except (Timeout, Closed):
            raise
        except Exception:
            log("%s %s: internal error in %s: %s" % (
                PROGRAM, self.remote_ip, clean(self.command), clean(traceback.format_exc(limit=4),
                                                                    600)))
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
        return (["PIPELINING", "8BITMIME", size, "ENHANCEDSTATUSCODES", "SMTPUTF8"]
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
        for key, value in params.items():
            handler = self.mail_params.get(key)
            if handler is None:
                raise CommandError(555, "5.5.4 Unsupported parameter %s" % clean(key, 20))
            handler(value)
        try:
            sender = address.parse_path(path, utf8=self.smtputf8)
        except address.AddressError as e:
            self.smtputf8 = False
            if "SMTPUTF8" in str(e):
                raise CommandError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
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
        self.reply(250, "2.1.0 Ok")

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
        if params:
            raise CommandError(555, "5.5.4 Unsupported RCPT parameter")
        if path[1:-1].lower() == b"postmaster":
            rcpt = b"postmaster@" + self.cfg.me.lower().encode("utf-8")
        else:
            try:
                rcpt = address.parse_path(path, utf8=self.smtputf8)
            except address.AddressError as e:
                if "SMTPUTF8" in str(e):
                    raise CommandError(553, "5.6.7 Non-ASCII address needs SMTPUTF8")
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
            verdict = self.filters.rcpt(rcpt, [], is_local)
            if verdict is not None:
                return self.refuse(verdict)
        self.recipients.append(rcpt)
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

    def cmd_data(self, arg: bytes) -> None:
        if self.ch.pending():
            # Bytes after DATA before our 354: not pipelining (RFC 2920 3.1), but an
            # attempt to have message text read as commands. End the session.
            self.reply(554, "5.5.0 Data sent before the 354 reply, closing connection")
            self.ch.discard_input()
            self.closing = True
            return
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
            log("%s %s: cannot open the queue: %s" % (PROGRAM, self.remote_ip, e))
            raise CommandError(451, "4.3.0 Cannot queue the message now, try again later")
        try:
            verdict = self.filters.data(self.drop.id) if self.filters else None
            if verdict is not None:
                return self.refuse(verdict)
            self._data()
        finally:
            if self.drop is not None:
                self.drop.abort()
                self.drop = None
            self.reset_transaction()

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
        sink = spool.write if spool is not None else drop.write
        sink(received_line(self.helo or b"unknown", self.remote_host, self.remote_ip,
                           self.cfg.me, self.protocol(), drop.id, rfc5322_date()))
        size = 0
        failure: InjectError | None = None

        def emit(piece: bytes) -> None:
            nonlocal size, failure
            size += len(piece)
            if failure is not None or size > self.databytes:
                return
            try:
                sink(piece)
            except (InjectError, OSError) as e:
                failure = e if isinstance(e, InjectError) else InjectError(53, str(e))

        bad, hops = self.ch.read_data(emit)
        if bad:
            raise CommandError(550, "5.6.0 Message refused: bare CR or LF in the data "
                                    "(lines must end with CRLF)")
        if size > self.databytes:
            raise CommandError(552, "5.3.4 Message size exceeds fixed maximum message size")
        if hops >= MAX_HOPS:
            raise CommandError(554, "5.4.6 Too many hops, this message is looping")
        sender, recipients = self.sender or b"", self.recipients
        if spool is not None and failure is None:
            try:
                edited = self.filters.finish(self, spool, drop)   # None: answered already
            except InjectError as e:
                failure = e
            else:
                if edited is None:
                    return
                sender, recipients = edited
        if failure is None:
            try:
                name = drop.commit(sender, recipients)
            except InjectError as e:
                failure = e
            else:
                self.drop = None
                self.messages += 1
                log("%s %s: accepted %s bytes %d from <%s> recipients %d"
                    % (PROGRAM, self.remote_ip, name, size, clean(self.sender or b"", 200),
                       len(self.recipients)))
                self.reply(250, "2.0.0 Ok: queued as %s" % name)
                return
        reason = clean(str(failure), 200)
        if permanent(failure.code):
            raise CommandError(554, "5.3.0 Message refused: %s" % reason)
        raise CommandError(451, "4.3.0 Message not queued: %s" % reason)

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


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(cfg: Config, env: Mapping[str, str], rfd: int = 0, wfd: int = 1) -> int:
    """Run one session on rfd/wfd (a forked qpy-tcpserver child or qpy-smtpd itself).
    The caller has set SIGTERM to end the session (SystemExit) and SIGPIPE to SIG_IGN:
    main() here, once per worker in qpy-tcpserver (not per session: it costs)."""
    from qpy.smtp.secure import SecureSession  # here: secure.py builds on this module
    if cfg.unusable:
        log("%s: 421 to %s" % (cfg.unusable, env.get("TCPREMOTEIP", "")))
        try:
            os.write(wfd, b"421 4.3.0 Unable to read controls\r\n")
        except OSError:
            pass
        return 0
    # STARTTLS, implicit TLS and AUTH (qpy.smtp.secure); plain SMTP without a cert.
    session = SecureSession(cfg, env, Channel(rfd, wfd, cfg.timeout))
    try:
        session.run()
    finally:
        session.close()   # a qpy-tcpserver worker lives on: keep nothing of this client open
    return 0


def main() -> int:
    root = root_from()
    caller = sys.argv[1:] == ["--as-caller"]
    if caller and ("PROTO" in os.environ or "TCPREMOTEIP" in os.environ):
        sys.stderr.write("%s: --as-caller is for sendmail -bs, not a network connection\n"
                         % PROGRAM)
        return 111
    # --as-caller (qpy-sendmail -bs): the session runs as whoever started it and
    # injects as that user through queue/drop/, as `sendmail -bm` would
    preamble(PROGRAM, root, None if caller else "qpyd", os.environ.get("TCPREMOTEIP", ""))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        # --as-caller: the caller may not read users/recipients; the queue bounces
        # what has no owner, as it does for sendmail
        cfg = Config(root, acceptunknown=caller)
    except Exception as e:
        log("%s: cannot read control files: %s" % (PROGRAM, clean(str(e))))
        try:
            os.write(1, b"421 4.3.0 Unable to read controls\r\n")
        except OSError:
            pass
        return 0
    return serve(cfg, os.environ)
