"""tls — the server side of TLS for qpy-smtpd: STARTTLS (RFC 3207) and port 465.

Not a program: qpy-tcpserver calls `server_context(root)` once, before it
forks sessions (qpy-smtpd alone, under ucspi-tcp's tcpserver, calls it once per
connection), and the SMTP session calls `start()` on STARTTLS or, for a
listener with implicit TLS (RFC 8314, port 465), before its greeting.

CERTIFICATE
    ROOT/control/servercert.pem: the certificate chain and the private key in
    one PEM file, owned by qpyd, mode 0400 (qpyd is the only uid that needs
    it). Absent: no TLS, no log line. Unreadable, malformed, not yet valid or
    expired: one log line that says why, and STARTTLS is not offered; the
    session carries on in plaintext. Never a crash.

SECURITY
    TLS 1.2 and newer, Python's default (forward-secret, AEAD) cipher list,
    no compression, no renegotiation, the server's cipher order. On STARTTLS
    the caller must throw away anything the client sent after the STARTTLS
    line in plaintext (the CVE-2011-0411 command injection): `start()` takes
    that leftover and only logs its size. Everything learnt before TLS (HELO,
    transaction, AUTH) is forgotten by the session (RFC 3207 section 4.2).
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import time

from qpy.common.log import log
from qpy.smtp.channel import Channel, Closed, Timeout

CERT_NAME = "servercert.pem"
HANDSHAKE_TIMEOUT = 60.0     # seconds for the whole handshake
EXPIRY_WARNING = 14 * 86400  # log a warning when the certificate ends within this


def cert_path(root: str) -> str:
    return os.path.join(root, "control", CERT_NAME)


def _validity(path: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the first certificate in path, as Unix times."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # not in this Python: the handshake itself will tell
        return None
    info = decode(path)
    return (ssl.cert_time_to_seconds(info["notBefore"]),
            ssl.cert_time_to_seconds(info["notAfter"]))


def server_context(root: str) -> ssl.SSLContext | None:
    """The server context from control/servercert.pem, or None (with a log line why)."""
    path = cert_path(root)
    if not os.path.lexists(path):
        return None
    why = "control/%s" % CERT_NAME
    try:
        with open(path, "rb") as f:     # an unreadable file is told apart from a bad one
            f.read(1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE)
        if hasattr(ssl, "OP_NO_RENEGOTIATION"):
            ctx.options |= ssl.OP_NO_RENEGOTIATION
        ctx.load_cert_chain(path)
        validity = _validity(path)
    except (ssl.SSLError, ValueError) as e:  # before OSError: SSLError is one
        log("tls: cannot use %s (chain and key in one PEM file?): %s; "
            "STARTTLS not offered" % (why, getattr(e, "reason", None) or e))
        return None
    except OSError as e:
        log("tls: cannot read %s: %s; STARTTLS not offered"
            % (why, e.strerror or e))
        return None
    if validity is not None:
        now = time.time()
        not_before, not_after = validity
        if now >= not_after:
            log("tls: certificate in %s expired on %s; STARTTLS not offered"
                % (why, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))))
            return None
        if now < not_before:
            log("tls: certificate in %s is not valid before %s; STARTTLS not offered"
                % (why, time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                time.gmtime(not_before))))
            return None
        if not_after - now < EXPIRY_WARNING:
            log("tls: warning: certificate in %s expires on %s"
                % (why, time.strftime("%Y-%m-%d", time.gmtime(not_after))))
    return ctx


def socket_of(fd: int) -> socket.socket | None:
    """A socket object for fd (0 under ucspi-tcp's tcpserver), or None for a pipe."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.close()
        return None
    return sock


def is_socket(fd: int) -> bool:
    """Whether fd is a socket (TLS needs one; a pipe, as in some tests, cannot)."""
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class HandshakeError(Exception):
    pass


def start(ctx: ssl.SSLContext, sock: socket.socket, leftover: bytes = b"",
          who: str = "", timeout: float = HANDSHAKE_TIMEOUT) -> ssl.SSLSocket:
    """Wrap sock and do the server handshake; leftover is plaintext to discard.

    The caller has already sent `220` (STARTTLS) or nothing at all (implicit
    TLS). It must drop its own read buffer *before* calling, and pass what was
    in it as `leftover`: bytes pipelined after STARTTLS are never executed.
    """
    if leftover:
        log("discarded %d bytes sent after STARTTLS in plaintext from %s"
            % (len(leftover), who or "the client"))
    sock.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
    except (OSError, ssl.SSLError, ValueError) as e:
        raise HandshakeError("TLS handshake failed: %s" % (getattr(e, "reason", None) or e))
    return tls


def describe(tls: ssl.SSLSocket) -> str:
    """`TLSv1.3 TLS_AES_256_GCM_SHA384 256` for logs and the Received: line."""
    cipher = tls.cipher() or ("unknown", "", 0)
    return "%s %s %s" % (tls.version() or "TLS", cipher[0], cipher[2])


def received_comment(tls: ssl.SSLSocket) -> str:
    """`(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256)`."""
    version, cipher, bits = describe(tls).split(" ")
    return "(version=%s cipher=%s bits=%s)" % (version, cipher, bits)


def protocol(base: str, tls: bool, authenticated: bool) -> str:
    """RFC 3848/6531 `with` word: ESMTP -> ESMTPS, ESMTPA, ESMTPSA; UTF8SMTP likewise."""
    if base == "SMTP":
        return base
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def secure_channel(channel: Channel, ctx: ssl.SSLContext, who: str = "") -> ssl.SSLSocket:
    """Turn a plaintext Channel into a TLS one: handshake, then swap its raw I/O.

    Whatever the client pipelined after STARTTLS is dropped here, before the
    handshake, so it can never be read as a command. Raises HandshakeError
    (the session then ends: its stream is no longer plaintext SMTP).
    """
    channel.flush()
    leftover = bytes(channel.inbuf)
    channel.discard_input()
    sock = socket_of(channel.rfd)
    if sock is None:
        raise HandshakeError("not a TCP socket")
    tls = start(ctx, sock, leftover, who, timeout=min(channel.timeout, HANDSHAKE_TIMEOUT))
    tls.settimeout(channel.timeout)

    def recv_raw(n: int) -> bytes:
        if not tls.pending():
            tls.settimeout(channel.read_wait())   # the Channel's deadlines, not per read
        try:
            return tls.recv(n)
        except TimeoutError:
            raise Timeout()
        except (ssl.SSLError, ConnectionError):
            return b""          # a TLS alert or reset ends the session like EOF

    def send_raw(data: bytes) -> None:
        tls.settimeout(channel.write_wait())
        try:
            tls.sendall(data)
        except TimeoutError:
            raise Timeout()
        except (ssl.SSLError, ConnectionError):
            raise Closed()

    channel.recv_raw = recv_raw  # type: ignore[method-assign]
    channel.send_raw = send_raw  # type: ignore[method-assign]
    return tls
