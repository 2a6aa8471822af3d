"""session — from a target to a connection ready for MAIL: connect, implicit TLS,
greeting, EHLO, STARTTLS, AUTH.

Used by qpy.remote.transaction (as `qpyr`); no program of its own. The rules are
in qpy-remote's man page (PROTOCOL). What cannot go on is an exception, never a
text to match: Refused (with the status and the reason, and whether it ends the
job or moves on to the next target), TLSHandshakeFailed, PeerError.
"""

from __future__ import annotations

import socket
import time

from qpy.common import tcpto
from qpy.common.control import Control
from qpy.common.resolver import literal
from qpy.remote import dane, tlspolicy
from qpy.remote.route import Target
from qpy.remote.smtpauth import AuthFailed, authenticate, hop_keys
from qpy.remote.tlspolicy import Plan, PolicyError
from qpy.remote.wire import Conn, PeerError, Reply, TLSHandshakeFailed, literal_free, why

Z, D = b"Z", b"D"


class Refused(Exception):
    """No transaction on this target: (status, text). final: settle every open
    recipient with it and stop; else move on to the next target."""

    def __init__(self, status: bytes, text: str, final: bool = False):
        super().__init__(text)
        self.status = status
        self.text = text
        self.final = final


def tls_note(conn: Conn) -> str:
    return " (TLS %s)" % conn.tls if conn.tls else ""


def connect(ctl: Control, t: Target, deadline: float) -> Conn:
    """A TCP connection to the target, or Refused (move on). Its reads and writes end
    at `deadline` (time.monotonic()) at the latest."""
    timeout = min(max(1, ctl.integer("timeoutconnect")), deadline - time.monotonic())
    if timeout <= 0:
        raise Refused(Z, "The delivery ran past its deadline (control/timeoutremotetotal)"
                      " before %s was tried. (#4.4.7)" % t.address)
    if tcpto.skipped(ctl.root, t.address):
        raise Refused(Z, "Sorry, %s timed out %d times in a row lately; it is skipped for"
                      " an hour (tcpto). (#4.4.1)" % (t.address, tcpto.FAILURES))
    try:
        sock = socket.create_connection((t.address, t.port), timeout=timeout,
                                        source_address=source_for(ctl, t.address))
    except TimeoutError as e:
        tcpto.record(ctl.root, t.address, True)
        raise Refused(Z, "Sorry, I wasn't able to establish an SMTP connection to %s: %s."
                      " (#4.4.1)" % (t.address, why(e)))
    except OSError as e:
        raise Refused(Z, "Sorry, I wasn't able to establish an SMTP connection to %s: %s."
                      " (#4.4.1)" % (t.address, why(e)))
    tcpto.record(ctl.root, t.address, False)
    conn = Conn(sock, max(1, ctl.integer("timeoutremote")), t.host)
    conn.deadline = deadline
    return conn


def source_for(ctl: Control, ip: str) -> tuple[str, int] | None:
    """The address of control/outgoingip of the target's family (IPv4 or IPv6), or None
    (the kernel chooses)."""
    v6 = ":" in ip
    for line in ctl.lines("outgoingip"):
        if literal(line) is not None and (":" in line) == v6:
            return literal(line), 0      # type: ignore[return-value]
    return None


def _helo_rows(ctl: Control) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in ctl.lines("helohosts"):
        f = line.split()
        if len(f) == 2:
            rows.setdefault(f[0].lower(), f[1])
    return rows


def helo_name(ctl: Control, domain: str, t: Target) -> bytes:
    """The EHLO name: control/helohosts by the recipient's domain, then by the next hop
    (as control/tlspolicy is looked up), else helohost, else me."""
    rows: dict[str, str] = ctl.derived("helohosts", lambda: _helo_rows(ctl))
    for key in [domain.lower()] + hop_keys(t.hop or t.host, t.port):
        if key in rows:
            return rows[key].encode("ascii", "replace")
    return (ctl.line("helohost") or ctl.line("me")).encode("ascii", "replace")


def check_421(r: Reply, ip: str, conn: Conn) -> None:
    """421 at any point: every recipient still open is deferred, and we stop."""
    if r.code == 421:
        raise Refused(Z, "%s closes the session (421).%s %s"
                      % (ip, tls_note(conn), conn.said(r)), final=True)


def ehlo(conn: Conn, helo: bytes, ip: str) -> dict[str, str]:
    """EHLO, or HELO when EHLO is refused: the EHLO keywords ({} after HELO)."""
    r = conn.command(b"EHLO " + helo)
    if r.code // 100 == 2:
        return r.ext()
    check_421(r, ip, conn)
    r = conn.command(b"HELO " + helo)
    if r.code // 100 == 2:
        return {}
    check_421(r, ip, conn)
    raise Refused(Z, "Connected to %s but my name was rejected. %s"
                  % (ip, conn.said(r)), final=True)


def _handshake(ctl: Control, conn: Conn, t: Target, p: Plan) -> None:
    """TLS on `conn` as the plan says; PolicyError when the context cannot be made."""
    ctx = tlspolicy.context(ctl, p)
    name = t.host if p.level == "verify" or literal_free(t.host) else None
    conn.starttls(ctx, name)
    conn.verified = p.level == "verify"
    if p.level == "dane":
        why = dane.verify(conn.peer_chain(), p.tlsa, [t.host])
        if why:
            raise Refused(Z, "TLS to %s, required (dane) by %s: %s. (#4.7.5)"
                          % (t.address, p.why, why))
        conn.verified = True
        conn.tls += " DANE"


def start(ctl: Control, conn: Conn, t: Target, p: Plan, tls: bool = True,
          domain: str = "") -> dict[str, str]:
    """Implicit TLS (smtps), greeting, EHLO, STARTTLS, AUTH as the plan says: the EHLO
    keywords. `tls` False: the retry in clear text after a failed handshake (`may`)."""
    ip = t.address
    need = p.level in tlspolicy.TLS_LEVELS
    try:
        if t.mode == "smtps":
            try:
                _handshake(ctl, conn, t, p)
            except TLSHandshakeFailed as e:
                raise Refused(Z, "TLS to %s port %d (smtps, %s) failed: %s. (#4.7.5)"
                              % (ip, t.port, p.level, e))
        try:
            greet = conn.reply()
        except PeerError as e:
            raise Refused(Z, "Connected to %s but greeting failed: %s. (#4.4.2)" % (ip, e))
        if greet.code // 100 != 2:
            raise Refused(D if greet.code // 100 == 5 else Z,
                          "Connected to %s but greeting failed. %s"
                          % (ip, conn.said(greet)))
        helo = helo_name(ctl, domain, t)
        ext = ehlo(conn, helo, ip)
        if not conn.tls and tls and p.level != "none" and "STARTTLS" in ext:
            r = conn.command(b"STARTTLS")
            if r.code == 220:
                try:
                    _handshake(ctl, conn, t, p)
                except TLSHandshakeFailed as e:
                    if need:
                        raise Refused(Z, "TLS to %s, required (%s) by %s, failed: %s. (#4.7.5)"
                                      % (ip, p.level, p.why, e))
                    raise       # `may`: the caller retries in clear text
                ext = ehlo(conn, helo, ip)
            check_421(r, ip, conn)
        if need and not conn.tls:
            raise Refused(Z, "%s does not offer STARTTLS, required (%s) by %s. (#4.7.5)"
                          % (ip, p.level, p.why))
    except PolicyError as e:
        raise Refused(Z, str(e))
    if p.creds is not None:
        if not conn.tls and not p.creds.cleartext_ok:
            raise Refused(Z, "No TLS to %s: the control/smtpauth credentials are not sent in"
                          " clear text. (#4.7.5)" % ip)
        try:
            authenticate(conn, ext, p.creds, ip)
        except AuthFailed as e:
            raise Refused(Z, str(e))
    return ext
