"""wire — the SMTP client's connection: bounded replies, a timeout on every operation.

Used by qpy-remote and qpy-rspawn's workers (as `qpyr`); no program of its own.

Own small client, not smtplib: smtplib bounds a reply line (8192 bytes) but not
the number of lines of a multi-line reply, has no pipelining and no
per-recipient control of the transaction. Here every reply is bounded (line,
lines, bytes), parsing is total, and the server's text is made printable and
short (Reply.said) before it reaches a result, a log or a bounce.

Every read and write waits at most the connection's `timeout` (control/
timeoutremote) and never past its `deadline` (control/timeoutremotetotal, set
per delivery by qpy.remote.transaction).

Errors are types, never text to match: PeerError for a broken connection, and
its subclass TLSHandshakeFailed for a STARTTLS or implicit-TLS handshake that
failed (the caller decides on a plain-text retry by that type alone).
"""

from __future__ import annotations

import _ssl
import socket
import ssl
import time

from qpy.common import dsn
from qpy.common.log import clean

MAX_REPLY_LINE = 2048       # RFC 5321 says 512; be generous, not unbounded
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
MAX_SAID = 600              # bytes of the server's text kept in a result
CHUNK = 64 * 1024
QUIT_WAIT = 2.0             # seconds we wait for the answer to QUIT
DEADLINE = "the delivery ran past its deadline (control/timeoutremotetotal)"


class PeerError(Exception):
    """The connection broke: timeout, close, TLS error, or a reply we cannot parse."""


class TLSHandshakeFailed(PeerError):
    """The TLS handshake failed; nothing was said inside TLS."""


class Reply:
    def __init__(self, code: int, lines: list[bytes]):
        self.code = code
        self.lines = lines

    def said(self) -> str:
        return clean(b" / ".join(self.lines), MAX_SAID)

    def ext(self) -> dict[str, str]:
        """EHLO keywords (upper case) and their parameters."""
        out = {}
        for line in self.lines[1:]:
            kw, _, param = line[4:].decode("ascii", "replace").strip().partition(" ")
            out[kw.upper()] = param.strip()
        return out


def why(e: BaseException) -> str:
    """A short, printable reason for an OS or TLS error."""
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    return clean(str(e) or type(e).__name__, 200)


class Conn:
    """One SMTP connection with bounded replies and a timeout on every operation."""

    def __init__(self, sock: socket.socket, timeout: float, host: str = ""):
        self.sock: socket.socket = sock
        self.host = host            # the name connected to: what a bounce names
        self.timeout = timeout
        sock.settimeout(timeout)
        self._armed: float | None = timeout     # the socket's timeout now
        try:        # our writes are whole commands or message blocks: no Nagle delays
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.buf = b""
        self.tls = ""
        self.verified = False       # the peer's certificate passed the route's check
        self.deadline: float | None = None  # time.monotonic() by which the delivery ends

    def _arm(self) -> None:
        """The socket's timeout for the next operation: `timeout`, and never past the
        delivery's deadline (a peer that trickles bytes cannot hold us for hours)."""
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise PeerError(DEADLINE)
        if wait != self._armed:     # each settimeout() is an ioctl: only when it changes
            self.sock.settimeout(wait)
            self._armed = wait

    def _failed(self, what: str, e: BaseException) -> PeerError:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return PeerError(DEADLINE)
        return PeerError("%s failed: %s" % (what, why(e)))

    def send(self, data: bytes) -> None:
        self._arm()
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise self._failed("write", e)

    def _line(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n", 0, MAX_REPLY_LINE)
            if nl != -1:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line.rstrip(b"\r")
            if len(self.buf) >= MAX_REPLY_LINE:
                raise PeerError("reply line longer than %d bytes" % MAX_REPLY_LINE)
            self._arm()
            try:
                data = self.sock.recv(CHUNK)
            except (OSError, ssl.SSLError) as e:
                raise self._failed("read", e)
            if not data:
                raise PeerError("connection closed")
            self.buf += data

    def reply(self) -> Reply:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self._line()
            total += len(line)
            if len(lines) >= MAX_REPLY_LINES or total > MAX_REPLY_BYTES:
                raise PeerError("reply too long")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise PeerError("bad reply: %s" % clean(line, 80))
            lines.append(line)
            if line[3:4] != b"-":
                return Reply(int(lines[0][:3]), lines)

    def said(self, r: Reply) -> str:
        """`Remote host HOST said: REPLY`, in qpy.common.dsn's format."""
        return dsn.remote_said(self.host, r.said())

    def command(self, cmd: bytes) -> Reply:
        self.send(cmd + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext, name: str | None) -> None:
        """The TLS handshake (after STARTTLS's 220, or at once for implicit TLS)."""
        self.buf = b""      # nothing sent before the handshake may count after it
        self._arm()
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=name)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._armed = None
            raise TLSHandshakeFailed("TLS handshake failed: %s" % why(e))
        self._armed = None          # a new socket object: set its timeout afresh
        self.tls = "%s %s" % (self.sock.version(), self.sock.cipher()[0])  # type: ignore

    def peer_chain(self) -> list[bytes]:
        """The peer's certificates (DER) as it sent them, its own first; [] outside TLS.

        Python 3.13 has SSLSocket.get_unverified_chain(); 3.11 has it on the
        underlying _ssl object only.
        """
        if not isinstance(self.sock, ssl.SSLSocket):
            return []
        getter = getattr(self.sock, "get_unverified_chain", None) \
            or getattr(getattr(self.sock, "_sslobj", None), "get_unverified_chain", None)
        if getter is None:
            cert = self.sock.getpeercert(binary_form=True)
            return [cert] if cert else []
        der = getattr(_ssl, "ENCODING_DER", 2)    # not re-exported by ssl in 3.11
        return [c if isinstance(c, bytes) else c.public_bytes(der) for c in getter() or []]

    def between_commands(self) -> bool:
        """No byte from the peer is waiting unread: nothing unexpected was said."""
        if self.buf:
            return False
        return not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def end(conn: Conn) -> None:
    """QUIT (its answer waited for QUIT_WAIT seconds at most), then close: the end of a
    connection in good order."""
    conn.timeout, conn.deadline = QUIT_WAIT, None
    try:
        conn.command(b"QUIT")
    except PeerError:
        pass
    conn.close()


def literal_free(host: str) -> bool:
    """True for a host name (SNI and verification need one), False for an address."""
    return not (host.startswith("[") or ":" in host or host.replace(".", "").isdigit())
