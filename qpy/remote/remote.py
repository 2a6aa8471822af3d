"""qpy-remote — one SMTP client delivery of one message to one domain's servers.

SYNOPSIS
    qpy-remote HOST SENDER RECIPIENT...  < message

    qmail-remote's interface, for admins and tests. qpy-rspawn does not run
    this program: its workers (qpy.remote.worker, forked from qpy-rspawn, so no
    new interpreter per delivery) call `deliver()` with the message as an open
    fd and a connection cache.

RUNS AS
    qpyr (the preamble drops to it when started as root).

READS
    the message (stdin, or the fd handed over by qpy-rspawn; never a path in
    `queue/mess/`, which qpyr cannot open), `QPY_ROOT`, `control/`: me,
    helohost, locals, ipme, smtproutes, resolvers, timeoutconnect,
    timeoutremote, tlsverify.

WRITES
    stdout: qmail-remote's report, one `\\0`-terminated record per recipient
    (`r` accepted, `h` permanent, `s` temporary refusal, with text) then one
    for the message (`K` delivered, `Z` temporary, `D` permanent). Exit 0;
    111 when the arguments or the root are unusable.

PROTOCOL
    Targets come from qpy.remote.route. A connection failure, or a greeting
    that is not 2xx, moves on to the next target; after that the first
    server that greets decides. EHLO with helohost (HELO if EHLO is refused);
    STARTTLS whenever offered (no certificate check, as opportunistic TLS is,
    except for domains in `control/tlsverify`, which need a verified
    certificate and a matching name, or the delivery is deferred); a
    handshake that fails without verification is retried once in plain
    text. PIPELINING and SIZE when offered. Per-recipient RCPT results; the
    DATA result applies to the accepted ones; 421 at any point defers all
    that is left. The message goes with CRLF line ends, dot-stuffed; bare CR
    and LF become CRLF, a missing final line end is added.

    8-bit data: a message with 8-bit bytes only in its body needs 8BITMIME
    (sent with BODY=8BITMIME); one with a non-ASCII envelope address or 8-bit
    header bytes needs SMTPUTF8. If the peer does not offer what is needed,
    the delivery fails permanently with that reason: qpy does not rewrite
    messages (a MIME downgrade breaks DKIM signatures and there is no
    standard downgrade for UTF-8 addresses).

    Connection reuse (qpy-rspawn's workers only; this program always ends
    with QUIT, as qmail-remote): a transaction that ends with the connection
    between commands (a final reply to the end of DATA, to DATA, or to every
    RCPT; no broken connection, no 421, no unread byte from the server) does
    not QUIT: the connection (socket, TLS state, EHLO keywords, target) is
    kept in a ConnCache under the job's domain, one connection per worker.
    The next job for that domain sends RSET on it and, on 250 within
    RSET_WAIT seconds, runs its transaction there without greeting, EHLO or
    STARTTLS. A refused or unanswered RSET, a broken connection, or a 421
    anywhere before the answer to the message's final dot closes it, and the
    recipients still open go through the targets on fresh connections in
    the same delivery: a dead cached connection costs no deferral. Only a
    connection that breaks after the final dot was sent defers with
    "Possible duplicate!", as on a fresh connection. A job for another
    domain, and a connection idle CONN_IDLE seconds, CONN_MAX_AGE seconds
    after it was opened, or after CONN_MAX_USES transactions, gets QUIT and
    is closed; one that the server closes or speaks on while idle is closed
    at once. A connection opened without a verified certificate is never
    reused for a job that needs one (control/tlsverify).

SECURITY
    Own small client, not smtplib: smtplib bounds a reply line (8192 bytes)
    but not the number of lines of a multi-line reply, has no pipelining and
    no per-recipient control of the transaction. Here every reply is bounded
    (line, lines, bytes), parsing is total, and the server's text is made
    printable and short before it reaches a result, a log or a bounce.
    Addresses pass the strict parser before any I/O (no CR/LF injection).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from qpy.common import address
from qpy.common.control import Control
from qpy.common.log import clean
from qpy.common.privilege import preamble
from qpy.common.queue import root_from
from qpy.remote.route import RouteError, Router, Target

MAX_REPLY_LINE = 2048       # RFC 5321 says 512; be generous, not unbounded
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
MAX_SAID = 300              # bytes of the server's text kept in a result
CHUNK = 64 * 1024
QUIT_WAIT = 2.0             # seconds we wait for the answer to QUIT
CONN_IDLE = 2.0             # seconds a cached connection may sit unused (Postfix's default)
CONN_MAX_AGE = 300.0        # seconds since it was opened (Postfix's reuse time limit)
CONN_MAX_USES = 100         # transactions on one connection
RSET_WAIT = 20.0            # seconds for the RSET that proves a cached connection alive
EXIT_USAGE = 111

K, Z, D = b"K", b"Z", b"D"


class PeerError(Exception):
    """The connection broke: timeout, close, TLS error, or a reply we cannot parse."""


class Closed(Exception):
    """The peer said 421: what is left has been deferred; drop the connection."""


class Stale(Exception):
    """A cached connection that does not serve (421, a refused RSET): go on afresh."""


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


class Conn:
    """One SMTP connection with bounded replies and a timeout on every operation."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock: socket.socket = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        try:        # our writes are whole commands or message blocks: no Nagle delays
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.buf = b""
        self.tls = ""

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise PeerError("write failed: %s" % _why(e))

    def _line(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n", 0, MAX_REPLY_LINE)
            if nl != -1:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line.rstrip(b"\r")
            if len(self.buf) >= MAX_REPLY_LINE:
                raise PeerError("reply line longer than %d bytes" % MAX_REPLY_LINE)
            try:
                data = self.sock.recv(CHUNK)
            except (OSError, ssl.SSLError) as e:
                raise PeerError("read failed: %s" % _why(e))
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

    def command(self, cmd: bytes) -> Reply:
        self.send(cmd + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext, name: str | None) -> None:
        self.buf = b""      # nothing sent before the handshake may count after it
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=name)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise PeerError("TLS handshake failed: %s" % _why(e))
        self.tls = "%s %s" % (self.sock.version(), self.sock.cipher()[0])  # type: ignore

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


@dataclass(eq=False)
class Cached:
    """A connection after a clean transaction, with what reusing it needs."""
    conn: Conn
    domain: str             # the job's routing key: the recipients' domain, or `host`
    target: Target          # where it goes
    ext: dict[str, str]     # the EHLO keywords (after STARTTLS when it was used)
    verified: bool          # TLS with a verified certificate (control/tlsverify)
    opened: float           # time.monotonic() at connect
    uses: int = 1           # transactions run on it
    last: float = 0.0       # time.monotonic() when its last transaction ended


class ConnCache:
    """At most one idle SMTP connection, kept for the next job to the same domain.

    qpy-rspawn's workers (qpy.remote.worker) keep one across deliveries; qpy-remote
    keeps none. A connection is given back only after a clean transaction and is
    ended (QUIT) once idle CONN_IDLE seconds, CONN_MAX_AGE after it was opened, or
    after CONN_MAX_USES transactions.
    """

    def __init__(self) -> None:
        self.held: Cached | None = None

    def domain(self) -> str:
        return self.held.domain if self.held else ""

    def fileno(self) -> int:
        """The held connection's socket, to watch while idle; -1 when none is held."""
        return self.held.conn.sock.fileno() if self.held else -1

    def deadline(self) -> float | None:
        """time.monotonic() at which the held connection must end; None when none is."""
        h = self.held
        return min(h.last + CONN_IDLE, h.opened + CONN_MAX_AGE) if h else None

    def take(self, domain: str, verify: bool) -> Cached | None:
        """The held connection when it goes to `domain` and is still fit for use."""
        h, deadline = self.held, self.deadline()
        if h is None or deadline is None or h.domain != domain:
            return None
        self.held = None
        if time.monotonic() >= deadline or (verify and not h.verified):
            _end(h.conn)
            return None
        return h

    def keep(self, c: Cached) -> None:
        """Hold `c` for the next job (instead of any other), or QUIT it when it is used up."""
        self.close()
        c.last = time.monotonic()
        if c.uses >= CONN_MAX_USES or c.last - c.opened >= CONN_MAX_AGE:
            _end(c.conn)
            return
        self.held = c

    def retain(self, domains: set[str]) -> None:
        """QUIT the held connection unless it goes to one of `domains`."""
        if self.held and self.held.domain not in domains:
            self.close()

    def close(self) -> None:
        """QUIT and close the held connection, if any."""
        h, self.held = self.held, None
        if h:
            _end(h.conn)

    def drop(self) -> None:
        """Close the held connection without a word: the peer closed it or spoke unasked."""
        h, self.held = self.held, None
        if h:
            h.conn.close()


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    return clean(str(e) or type(e).__name__, 200)


def scan(fd: int) -> tuple[int, bool, bool]:
    """(size, 8-bit bytes in the header, 8-bit bytes in the body) of the message."""
    size = os.fstat(fd).st_size
    off, head8, body8, in_head, tail = 0, False, False, True, b""
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            break
        off += len(chunk)
        if in_head:
            data = tail + chunk
            end = min((i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i != -1),
                      default=-1)
            if end == -1:
                head8 = head8 or not data.isascii()
                tail = data[-2:]
                continue
            head8 = head8 or not data[:end].isascii()
            body8 = not data[end:].isascii()
            in_head = False
        elif not body8:
            body8 = not chunk.isascii()
    return max(size, off), head8, body8


def smtp_data(fd: int) -> Iterator[bytes]:
    """The message as DATA: CRLF line ends, dot-stuffed, ending with CRLF . CRLF."""
    off, carry, at_start = 0, b"", True
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            break
        off += len(chunk)
        data = carry + chunk
        carry = b""
        if data.endswith(b"\r"):        # maybe half of a CRLF: decide with the next chunk
            data, carry = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            continue
        if at_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        at_start = data.endswith(b"\n")
        yield data.replace(b"\n", b"\r\n")
    if carry:
        at_start = True
        yield b"\r\n"
    yield b".\r\n" if at_start else b"\r\n.\r\n"


def tls_required(ctl: Control, domain: str) -> bool:
    for d in ctl.lines("tlsverify"):
        d = d.lower()
        if domain == d or (d.startswith(".") and domain.endswith(d)):
            return True
    return False


class Job:
    """One message to the recipients of one domain; results fill in as we go."""

    def __init__(self, ctl: Control, sender: bytes, rcpts: list[bytes], fd: int, domain: str,
                 cache: ConnCache | None = None):
        self.ctl = ctl
        self.cache = cache
        self.reusing = False        # a transaction on a cached connection is running
        self.sender = sender
        self.rcpts = rcpts
        self.fd = fd
        self.domain = domain
        self.results: list[tuple[bytes, bytes] | None] = [None] * len(rcpts)
        self.size, head8, body8 = scan(fd)
        self.utf8 = head8 or address.is_utf8(sender) or any(address.is_utf8(r) for r in rcpts)
        self.eight = body8 or head8
        self.verify = tls_required(ctl, domain)

    def open(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r is None]

    def settle(self, status: bytes, text: str, which: list[int] | None = None) -> None:
        for i in self.open() if which is None else which:
            if self.results[i] is None:
                self.results[i] = (status, text.encode())

    def run(self) -> None:
        if self.cache is not None:
            cached = self.cache.take(self.domain, self.verify)
            if cached is not None and self.reuse(cached):
                return
        try:
            targets = Router(self.ctl).targets(self.domain)
        except RouteError as e:
            self.settle(e.status, e.text)
            return
        last, temp = "", False
        for t in targets:
            outcome = self.session(t, tls=True)
            if outcome is None:
                return
            if outcome == "plain":
                outcome = self.session(t, tls=False)
                if outcome is None:
                    return
            status, last = outcome
            temp = temp or status == Z
        if not temp and last:
            self.settle(D, last)
        self.settle(Z, last or "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)")

    def reuse(self, c: Cached) -> bool:
        """The transaction on a cached connection; False when it is stale: go on afresh.

        RSET first (answered within RSET_WAIT seconds with 250, or the connection
        is stale). A broken connection or a 421 before the answer to the message's
        final dot leaves the recipients still open for a fresh connection; only a
        connection that breaks after the dot settles them (Possible duplicate!).
        """
        conn = c.conn
        self.reusing = True
        try:
            conn.sock.settimeout(min(RSET_WAIT, conn.timeout))
            r = conn.command(b"RSET")
            conn.sock.settimeout(conn.timeout)
            if r.code != 250:
                raise Stale("RSET answered %d" % r.code)
            c.uses += 1
            clean = self.transaction(conn, c.target.address, c.ext)
        except (PeerError, Stale):
            conn.close()
            return not self.open()
        except BaseException:       # e.g. the message cannot be read: deliver() reports it
            conn.close()
            raise
        finally:
            self.reusing = False
        self.release(c, clean)
        return True

    def release(self, c: Cached, clean: bool) -> None:
        """After a transaction: keep the connection for the next job, or end it."""
        if clean and self.cache is not None and c.conn.between_commands():
            self.cache.keep(c)
            return
        if clean:
            _end(c.conn)
        else:
            c.conn.close()

    def session(self, t: Target, tls: bool) -> tuple[bytes, str] | str | None:
        """Deliver through one target. None: the job is settled; else why we move on."""
        timeout = max(1, self.ctl.integer("timeoutconnect"))
        opened = time.monotonic()
        try:
            sock = socket.create_connection((t.address, t.port), timeout=timeout)
        except OSError as e:
            return Z, "Sorry, I wasn't able to establish an SMTP connection to %s: %s. (#4.4.1)" \
                % (t.address, _why(e))
        conn = Conn(sock, max(1, self.ctl.integer("timeoutremote")))
        ours = True             # until release() takes the connection over
        try:
            ext = self.dialogue(conn, t, tls)
            if not isinstance(ext, dict):
                return ext
            clean = self.transaction(conn, t.address, ext)
            ours = False
            self.release(Cached(conn, self.domain, t, ext, self.verify, opened), clean)
            return None
        except Closed:
            return None
        except PeerError as e:
            if conn.tls == "" and tls and "TLS handshake" in str(e) and not self.verify:
                return "plain"
            self.settle(Z, "Connected to %s but connection died: %s.%s (#4.4.2)"
                        % (t.address, e, self._tls_note(conn)))
            return None
        finally:
            if ours:
                conn.close()

    @staticmethod
    def _tls_note(conn: Conn) -> str:
        return " (TLS %s)" % conn.tls if conn.tls else ""

    def dialogue(self, conn: Conn, t: Target,
                 tls: bool) -> dict[str, str] | tuple[bytes, str] | str:
        """Greeting, EHLO, STARTTLS: the EHLO keywords, or why we move on."""
        ip = t.address
        try:
            greet = conn.reply()
        except PeerError as e:
            return Z, "Connected to %s but greeting failed: %s. (#4.4.2)" % (ip, e)
        if greet.code // 100 != 2:
            return (D if greet.code // 100 == 5 else Z), \
                "Connected to %s but greeting failed. Remote host said: %s" % (ip, greet.said())
        helo = (self.ctl.line("helohost") or self.ctl.line("me")).encode("ascii", "replace")
        ext = self._ehlo(conn, helo, ip)
        if tls and "STARTTLS" in ext:
            r = conn.command(b"STARTTLS")
            if r.code == 220:
                ctx = ssl.create_default_context() if self.verify else _no_verify_context()
                try:
                    conn.starttls(ctx, t.host if literal_free(t.host) else None)
                except PeerError as e:
                    if self.verify:
                        return Z, "TLS to %s required by control/tlsverify failed: %s. (#4.7.5)"\
                            % (ip, e)
                    raise
                ext = self._ehlo(conn, helo, ip)
            self._check_421(r, ip, conn)
        if self.verify and not conn.tls:
            return Z, "%s does not offer STARTTLS, required by control/tlsverify. (#4.7.5)" % ip
        return ext

    def _ehlo(self, conn: Conn, helo: bytes, ip: str) -> dict[str, str]:
        r = conn.command(b"EHLO " + helo)
        if r.code // 100 == 2:
            return r.ext()
        self._check_421(r, ip, conn)
        r = conn.command(b"HELO " + helo)
        if r.code // 100 == 2:
            return {}
        self._check_421(r, ip, conn)
        self.settle(Z, "Connected to %s but my name was rejected. Remote host said: %s"
                    % (ip, r.said()))
        raise Closed()

    def _check_421(self, r: Reply, ip: str, conn: Conn) -> None:
        """421 at any point: defer every recipient still open, and stop.

        On a cached connection: stop, and leave the recipients to a fresh one.
        """
        if r.code == 421:
            if self.reusing:
                raise Stale("421")
            self.settle(Z, "%s closes the session (421).%s Remote host said: %s"
                        % (ip, self._tls_note(conn), r.said()))
            raise Closed()

    def transaction(self, conn: Conn, ip: str, ext: dict[str, str]) -> bool:
        """MAIL, RCPT, DATA. True: the connection is clean (between commands) after it."""
        tls = self._tls_note(conn)
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < self.size:
            self.settle(D, "%s takes messages up to %s bytes; this one has %d. (#5.3.4)"
                        % (ip, limit, self.size))
            return True
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % self.size
        if self.utf8:
            if "SMTPUTF8" not in ext:
                self.settle(D, "This message needs SMTPUTF8 (a UTF-8 address or header), which"
                            " %s does not offer; qpy does not downgrade. (#5.6.7)" % ip)
                return True
            params += b" SMTPUTF8"
        if self.eight:
            if "8BITMIME" not in ext and "SMTPUTF8" not in ext:
                self.settle(D, "This message has 8-bit data and %s does not offer 8BITMIME;"
                            " qpy does not convert messages. (#5.6.3)" % ip)
                return True
            params += b" BODY=8BITMIME"
        todo = self.open()
        mail = b"MAIL FROM:<%s>%s\r\n" % (self.sender, params)
        rcpts = [b"RCPT TO:<%s>\r\n" % self.rcpts[i] for i in todo]
        piped = "PIPELINING" in ext
        if piped:
            conn.send(mail + b"".join(rcpts) + b"DATA\r\n")
            r = conn.reply()
        else:
            r = conn.command(mail[:-2])
        if r.code // 100 != 2:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z,
                        "Connected to %s but sender was rejected.%s Remote host said: %s"
                        % (ip, tls, r.said()))
            if piped:                       # the RCPT and DATA replies are still coming
                for _ in rcpts:
                    conn.reply()
                return conn.reply().code != 354     # 354: it waits for data; not clean
            return True
        accepted = []
        for i, cmd in zip(todo, rcpts, strict=True):
            r = conn.reply() if piped else conn.command(cmd[:-2])
            if r.code // 100 == 2:
                accepted.append(i)
                continue
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z,
                        "%s does not like recipient.%s Remote host said: %s"
                        % (ip, tls, r.said()), [i])
        if not accepted and not piped:
            return True
        r = conn.reply() if piped else conn.command(b"DATA")
        if not accepted:
            if r.code == 354:               # a server that wants data for nobody: give it none
                conn.send(b".\r\n")
                conn.reply()
            return True
        if r.code != 354:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z, "%s failed on DATA command.%s"
                        " Remote host said: %s" % (ip, tls, r.said()), accepted)
            return True
        held = b""
        for block in smtp_data(self.fd):     # the short ending goes with the last block
            if len(block) <= 5:
                held += block
                continue
            if held:
                conn.send(held)
            held = block
        conn.send(held)
        try:
            r = conn.reply()
        except PeerError as e:
            self.settle(Z, "Connected to %s but connection died after the message: %s."
                        " Possible duplicate!%s (#4.4.2)" % (ip, e, tls), accepted)
            return False
        if r.code // 100 == 2:
            self.settle(K, "%s accepted message.%s Remote host said: %s"
                        % (ip, tls, r.said()), accepted)
        else:
            self._check_421(r, ip, conn)
            self.settle(D if r.code // 100 == 5 else Z, "%s failed after I sent the message.%s"
                        " Remote host said: %s" % (ip, tls, r.said()), accepted)
        return True


def literal_free(host: str) -> bool:
    """True for a host name (SNI and verification need one), False for an address."""
    return not (host.startswith("[") or ":" in host or host.replace(".", "").isdigit())


def _no_verify_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _end(conn: Conn) -> None:
    """QUIT (its answer waited for QUIT_WAIT seconds at most), then close: the end of a
    connection in good order."""
    try:
        conn.sock.settimeout(QUIT_WAIT)
        conn.command(b"QUIT")
    except PeerError:
        pass
    conn.close()


def deliver(ctl: Control, sender: bytes, rcpts: list[bytes], fd: int, host: str = "",
            cache: ConnCache | None = None) -> list[tuple[bytes, bytes]]:
    """Deliver the message on `fd`; (status, text) per recipient, in order.

    Recipients are routed by their domain, or all by `host` when it is given.
    With a `cache`, a connection it holds for a domain is tried first, and the
    last clean connection is left in it; without, every session ends with QUIT.
    """
    rcpts = list(rcpts)
    results: list[tuple[bytes, bytes] | None] = [None] * len(rcpts)
    try:
        sender = address.parse_mailbox(sender, utf8=True) if sender else b""
    except address.AddressError as e:
        return [(D, b"Bad sender address: %s. (#5.1.7)" % str(e).encode())] * len(rcpts)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rcpts):
        try:
            r = address.parse_mailbox(r, utf8=True)
        except address.AddressError as e:
            results[i] = (D, b"Bad recipient address: %s. (#5.1.3)" % str(e).encode())
            continue
        rcpts[i] = r
        dom = host or address.domain_part(r).decode("utf-8", "replace")
        groups.setdefault(dom, []).append(i)
    if cache is not None:
        cache.retain(set(groups))
    for dom, idx in groups.items():
        job = Job(ctl, sender, [rcpts[i] for i in idx], fd, dom, cache)
        try:
            job.run()
        except (PeerError, OSError) as e:      # e.g. the message fd cannot be read
            job.settle(Z, "Unable to deliver: %s. (#4.3.0)" % _why(e))
        for i, res in zip(idx, job.results, strict=True):
            results[i] = res or (Z, b"No result. (#4.3.0)")
    return [r or (Z, b"No result. (#4.3.0)") for r in results]


def report(results: list[tuple[bytes, bytes]]) -> bytes:
    """qmail-remote's output: r/h/s per recipient, then K/Z/D for the message."""
    out = []
    for status, text in results:
        out.append({K: b"r", D: b"h", Z: b"s"}[status] + text + b"\0")
    ok = [t for s, t in results if s == K]
    if ok:
        out.append(K + ok[0] + b"\0")
    elif any(s == Z for s, _ in results):
        out.append(Z + next(t for s, t in results if s == Z) + b"\0")
    else:
        out.append(D + results[0][1] + b"\0")
    return b"".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = root_from()
    preamble("qpy-remote", root, "qpyr", argv[0] if argv else "")
    if len(argv) < 3:
        sys.stderr.write("usage: qpy-remote host sender recip...\n")
        return EXIT_USAGE
    host = argv[0]
    ctl = Control(root)
    args = [os.fsencode(a) for a in argv[1:]]
    fd = 0
    if not stat.S_ISREG(os.fstat(0).st_mode):     # a pipe: deliver() needs to read it twice
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        fd = spool.fileno()
    results = deliver(ctl, args[0], args[1:], fd, host.lower())
    sys.stdout.buffer.write(report(results))
    sys.stdout.flush()
    return 0
