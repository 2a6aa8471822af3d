"""spawn — the delivery request/result messages between queue-send and the spawners.

queue-send talks to qpy-lspawn and qpy-rspawn over a SOCK_SEQPACKET socketpair
made by qpy-start: one datagram per request, one per result, so no framing can
be confused. A request carries the message as an open, read-only file
descriptor (SCM_RIGHTS), never a path: the spawner and its children need no
access to `queue/mess/` at all.

    request:  b"R" DELIVERY \\0 SENDER \\0 RCPT \\0 RCPT ...      + 1 fd
              b"N" DELIVERY \\0 MAIL-PARAMS \\0 SENDER \\0 (RCPT \\0 RCPT-PARAMS \\0)...
                                                                    + 1 fd
    result:   b"S" DELIVERY \\0 (STATUS TEXT \\0) per recipient, in request order

DELIVERY is a decimal number chosen by queue-send; STATUS is K (delivered),
R (delivered to a peer that does not offer DSN, for a recipient whose NOTIFY
asks for SUCCESS: queue-send sends the `relayed` notice), Z (temporary failure,
retry) or D (permanent failure, bounce); TEXT is printable, at most MAX_TEXT
bytes. The N request carries the DSN parameters (qpy.common.dsnparam's canonical
form, possibly empty) to qpy-rspawn; queue-send sends it only for a message that
has some.
"""

from __future__ import annotations

import array
import socket

from qpy.common import dsnparam

MAX_DATAGRAM = 256 * 1024
MAX_TEXT = 1000
MAX_RCPTS = 100
STATUSES = (b"K", b"R", b"Z", b"D")
MAX_NUMBER = 20             # digits of a delivery number (int() of more is slow, or refused)

# every byte but printable ASCII becomes "_" (one C call, not a Python loop per byte)
_PRINTABLE = bytes(c if 0x20 <= c <= 0x7E else 0x5F for c in range(256))
# Datagrams are read into this one buffer (the programs have no threads): a fresh
# MAX_DATAGRAM-sized bytes per datagram is past malloc's mmap threshold, i.e. an mmap,
# an mremap and a munmap for every request and result.
_BUF = bytearray(MAX_DATAGRAM)
_VIEW = memoryview(_BUF)


class SpawnError(ValueError):
    pass


def _clean(text: bytes) -> bytes:
    return text[:MAX_TEXT].translate(_PRINTABLE)


def receive(sock: socket.socket, ancbufsize: int = 0, flags: int = 0) -> tuple[bytes, list, int]:
    """One datagram of at most MAX_DATAGRAM bytes: (data, ancillary data, flags), as
    socket.recvmsg gives them."""
    n, ancdata, got_flags, _ = sock.recvmsg_into([_BUF], ancbufsize, flags)
    return _VIEW[:n].tobytes(), ancdata, got_flags


class Dsn:
    """The DSN parameters of one request: the message's and each recipient's."""

    __slots__ = ("mail", "rcpt")

    def __init__(self, mail: bytes, rcpt: list[bytes]):
        self.mail = mail
        self.rcpt = rcpt


def send_request(sock: socket.socket, delivery: int, sender: bytes, rcpts: list[bytes],
                 fd: int, dsn: Dsn | None = None) -> None:
    if not rcpts or len(rcpts) > MAX_RCPTS:
        raise SpawnError("bad recipient count")
    if dsn is None:
        data = b"R%d\0%s\0%s\0" % (delivery, sender, b"\0".join(rcpts))
    else:
        data = b"N%d\0%s\0%s\0%s\0" % (delivery, dsn.mail, sender, b"\0".join(
            b"%s\0%s" % pair for pair in zip(rcpts, dsn.rcpt, strict=True)))
    socket.send_fds(sock, [data], [fd])


def recv_request(sock: socket.socket) -> tuple[int, bytes, list[bytes], int] | None:
    """(delivery, sender, recipients, message fd); None at end of file."""
    got = recv_request_dsn(sock)
    return None if got is None else got[:4]


def recv_request_dsn(sock: socket.socket
                     ) -> tuple[int, bytes, list[bytes], int, Dsn | None] | None:
    """recv_request() with the DSN parameters of an N request (None for R)."""
    fds = array.array("i")
    data, ancdata, flags = receive(sock, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
            raise SpawnError("bad request framing")
        if data[:1] not in (b"R", b"N") or not data.endswith(b"\0"):
            raise SpawnError("bad request")
        fields = data[1:-1].split(b"\0")
        dsn = None
        if data[:1] == b"N":
            if len(fields) < 5 or len(fields) % 2 == 0:
                raise SpawnError("bad request fields")
            dsn = Dsn(fields.pop(1), fields[3::2])
            del fields[3::2]
            try:        # what qpy-remote would send on the wire: checked as any input
                dsnparam.mail_params(dsn.mail)
                for p in dsn.rcpt:
                    dsnparam.rcpt_params(p)
            except dsnparam.DsnError as e:
                raise SpawnError("bad DSN parameters: %s" % e)
        if len(fields) < 3 or not fields[0].isdigit() or len(fields[0]) > MAX_NUMBER \
                or len(fields) - 2 > MAX_RCPTS:
            raise SpawnError("bad request fields")
    except SpawnError:
        for fd in fds:
            socket.close(fd)
        raise
    return int(fields[0]), fields[1], fields[2:], fds[0], dsn


def encode_result(delivery: int, results: list[tuple[bytes, bytes]]) -> bytes:
    """The result datagram; results: (status K/Z/D, text) per recipient, in request order."""
    parts = [b"S%d\0" % delivery]
    for status, text in results:
        if status not in STATUSES:
            raise SpawnError("bad status")
        parts.append(status + _clean(text) + b"\0")
    return b"".join(parts)


def send_result(sock: socket.socket, delivery: int, results: list[tuple[bytes, bytes]]) -> None:
    sock.send(encode_result(delivery, results))


def recv_result(sock: socket.socket) -> tuple[int, list[tuple[bytes, bytes]]] | None:
    """(delivery, [(status, text)]); None at end of file."""
    data = receive(sock)[0]
    if not data:
        return None
    return decode_result(data)


def decode_result(data: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(delivery, [(status, text)]) from one result datagram, or SpawnError."""
    if not data.startswith(b"S") or not data.endswith(b"\0"):
        raise SpawnError("bad result")
    fields = data[1:-1].split(b"\0")
    if not fields[0].isdigit() or len(fields[0]) > MAX_NUMBER:
        raise SpawnError("bad result delivery number")
    results = []
    for f in fields[1:]:
        if not f or f[:1] not in STATUSES:
            raise SpawnError("bad result status")
        if len(f) > 1 + MAX_TEXT or _clean(f[1:]) != f[1:]:
            raise SpawnError("bad result text")
        results.append((f[:1], f[1:]))
    return int(fields[0]), results
