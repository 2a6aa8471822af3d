"""screen — the cheap checks before any filter: DNS blocklists, the pregreet test,
and the brake on refused recipients.

DNS BLOCKLISTS (control/rbls, as ucspi-tcp's rblsmtpd and Postfix's
reject_rbl_client)
    One list a line: `zone` (any 127.0.0.0/8 answer lists the client) or
    `zone=127.0.0.2` (only that answer; several joined by commas). The client's
    address is looked up as reversed octets (IPv4) or nibbles (IPv6) under each
    zone, through control/resolvers when it exists, when the session starts;
    the first list that names it, with its TXT record as the reason, refuses
    every RCPT of the session: `554 5.7.1 Service unavailable; Client host
    [IP] blocked using ZONE; TXT`. Clients that may relay (RELAYCLIENT, AUTH)
    are not refused. An unanswered or failed lookup lists nobody (as
    rblsmtpd): a broken list must not stop mail. RBLSMTPD from the rules file
    overrides, as with rblsmtpd: set and empty, no lookups; starting with `-`,
    the rest is the text of a `553 5.7.1`; any other text, a `451 4.7.1`.

PREGREET (control/greetdelay, seconds, default 0: off; Postfix's postscreen)
    The first greeting line `220-` goes out at once, the final `220 ` line
    after the delay. A client that sends anything in between is a bot that
    does not wait for the greeting (RFC 5321 4.3.1): `554 5.5.1` and the
    connection is closed, logged. Not on the smtps listener (TLS comes first).

HARVEST (refused recipients: 550 unknown user, 553 relaying; Postfix's
smtpd_error_sleep_time and smtpd_hard_error_limit)
    The first RCPT_SOFT_ERRORS are answered at once, each later one after
    RCPT_ERROR_SLEEP seconds times its number past them, and the
    RCPT_HARD_ERRORS-th is followed by 421 4.7.0 and the session's end.
"""

from __future__ import annotations

import ipaddress
import select
import time
from collections.abc import Mapping

from qpy.common.control import Control
from qpy.common.log import clean

RCPT_SOFT_ERRORS = 3         # refused recipients answered at once; then each one waits
RCPT_ERROR_SLEEP = 0.25      # seconds times the refusals past the soft limit (growing)
RCPT_HARD_ERRORS = 10        # refused recipients in one session before 421 and close
RCPT_ERROR_CODES = (550, 553)   # unknown user, not a domain of mine: a harvest's answers
DNS_TIMEOUT = 3           # seconds per query: the client is waiting for its greeting
DNS_LIFETIME = 5
MAX_REASON = 200


class Blocklists:
    def __init__(self, ctl: Control):
        self.lists: list[tuple[str, set[str] | None]] = []
        for line in ctl.lines("rbls"):
            zone, eq, codes = line.partition("=")
            wanted = {c.strip() for c in codes.split(",") if c.strip()} if eq else None
            self.lists.append((zone.strip().strip(".").lower(), wanted))
        self.ctl = ctl
        self._res = None

    def _resolver(self):  # -> dns.resolver.Resolver
        if self._res is None:
            # dnspython only where blocklists are configured: it costs ~50 ms to
            # import, paid per connection by qpy-smtpd under ucspi-tcp
            from qpy.common.resolver import from_control
            self._res = from_control(self.ctl, DNS_TIMEOUT, DNS_LIFETIME)
        return self._res

    @staticmethod
    def reverse(ip: str) -> str | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version == 4:
            return ".".join(reversed(str(addr).split(".")))
        return ".".join(reversed(addr.exploded.replace(":", "")))

    def check(self, ip: str, env: Mapping[str, str]) -> tuple[int, str] | None:
        """(code, text) refusing the session's RCPTs, or None."""
        override = env.get("RBLSMTPD")
        if override is not None:
            if not override:
                return None
            if override.startswith("-"):
                return 553, "5.7.1 " + clean(override[1:], MAX_REASON)
            return 451, "4.7.1 " + clean(override, MAX_REASON)
        rev = self.reverse(ip) if self.lists else None
        if rev is None:
            return None
        import dns.exception
        for zone, wanted in self.lists:
            name = "%s.%s." % (rev, zone)
            try:
                answers = {r.address for r in self._resolver().resolve(name, "A")}
            except (dns.exception.DNSException, OSError):
                continue
            if not any(a.startswith("127.") and (wanted is None or a in wanted)
                       for a in answers):
                continue
            try:
                txt = b" ".join(b"".join(r.strings) for r in
                                self._resolver().resolve(name, "TXT"))
                reason = "; " + clean(txt, MAX_REASON)
            except (dns.exception.DNSException, OSError):
                reason = ""
            return 554, "5.7.1 Service unavailable; Client host [%s] blocked using %s%s" % (
                ip, zone, reason)
        return None


def pregreet(session) -> bool:
    """postscreen's pregreet test on a qpy-smtpd Session: True (answered, closing)
    when the client spoke before the final line of the greeting."""
    session.ch.write(("220-%s ESMTP\r\n" % session.cfg.greeting).encode("utf-8", "replace"))
    session.ch.flush()
    if not _speaks(session.ch.rfd, session.cfg.greetdelay):
        return False
    session.command = b"(pregreet)"
    session.reply(554, "5.5.1 Protocol error: talking before the greeting")
    session.closing = True
    return True


def _speaks(rfd: int, delay: float) -> bool:
    """True when the client sent something (or left) within `delay` seconds."""
    deadline = time.monotonic() + delay
    p = select.poll()
    p.register(rfd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if p.poll(left * 1000):
                return True
        except InterruptedError:
            continue


def recipient_refused(session, e) -> None:  # session: a Session; e: its CommandError
    """Answer a refused RCPT on a qpy-smtpd Session, against directory harvest."""
    session.rcpt_errors += 1
    if session.rcpt_errors > RCPT_SOFT_ERRORS:
        session.ch.flush()
        time.sleep(RCPT_ERROR_SLEEP * (session.rcpt_errors - RCPT_SOFT_ERRORS))
    session.reply(e.code, e.text)
    if session.rcpt_errors >= RCPT_HARD_ERRORS:
        session.reply(421, "4.7.0 %s Too many refused recipients, closing connection"
                      % session.cfg.me)
        session.ch.discard_input()
        session.closing = True
