"""session — from a target to a connection ready for MAIL: connect, greeting, EHLO,
STARTTLS.

Used by qpy.remote.transaction (as `qpyr`); no program of its own. The rules are
in qpy-remote's man page (PROTOCOL). What cannot go on is an exception, never a
text to match: Refused (with the status and the reason, and whether it ends the
job or moves on to the next target), TLSHandshakeFailed, PeerError.
"""

from __future__ import annotations

import socket
import ssl

from qpy.common.control import Control
from qpy.remote.route import Target
from qpy.remote.wire import Conn, PeerError, Reply, literal_free, why

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


def tls_required(ctl: Control, domain: str) -> bool:
    for d in ctl.lines("tlsverify"):
        d = d.lower()
        if domain == d or (d.startswith(".") and domain.endswith(d)):
            return True
    return False


def no_verify_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(ctl: Control, t: Target) -> Conn:
    """A TCP connection to the target, or Refused (move on)."""
    timeout = max(1, ctl.integer("timeoutconnect"))
    try:
        sock = socket.create_connection((t.address, t.port), timeout=timeout)
    except OSError as e:
        raise Refused(Z, "Sorry, I wasn't able to establish an SMTP connection to %s: %s."
                      " (#4.4.1)" % (t.address, why(e)))
    return Conn(sock, max(1, ctl.integer("timeoutremote")))


def check_421(r: Reply, ip: str, conn: Conn) -> None:
    """421 at any point: every recipient still open is deferred, and we stop."""
    if r.code == 421:
        raise Refused(Z, "%s closes the session (421).%s Remote host said: %s"
                      % (ip, tls_note(conn), r.said()), final=True)


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
    raise Refused(Z, "Connected to %s but my name was rejected. Remote host said: %s"
                  % (ip, r.said()), final=True)


def start(ctl: Control, conn: Conn, t: Target, tls: bool, verify: bool) -> dict[str, str]:
    """Greeting, EHLO, STARTTLS (when `tls` and offered): the EHLO keywords."""
    ip = t.address
    try:
        greet = conn.reply()
    except PeerError as e:
        raise Refused(Z, "Connected to %s but greeting failed: %s. (#4.4.2)" % (ip, e))
    if greet.code // 100 != 2:
        raise Refused(D if greet.code // 100 == 5 else Z,
                      "Connected to %s but greeting failed. Remote host said: %s"
                      % (ip, greet.said()))
    helo = (ctl.line("helohost") or ctl.line("me")).encode("ascii", "replace")
    ext = ehlo(conn, helo, ip)
    if tls and "STARTTLS" in ext:
        r = conn.command(b"STARTTLS")
        if r.code == 220:
            ctx = ssl.create_default_context() if verify else no_verify_context()
            try:
                conn.starttls(ctx, t.host if literal_free(t.host) else None)
            except PeerError as e:
                if verify:
                    raise Refused(Z, "TLS to %s required by control/tlsverify failed: %s."
                                  " (#4.7.5)" % (ip, e))
                raise
            conn.verified = verify
            ext = ehlo(conn, helo, ip)
        check_421(r, ip, conn)
    if verify and not conn.tls:
        raise Refused(Z, "%s does not offer STARTTLS, required by control/tlsverify. (#4.7.5)"
                      % ip)
    return ext
