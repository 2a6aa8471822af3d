"""worker — qpy-lspawn's delivery worker: one process per recipient identity, reused.

SYNOPSIS
    (forked by qpy-lspawn; never started by hand)

RUNS AS
    The recipient: qpy-lspawn forks it as root, and the child drops to the
    user's groups, gid and uid (qpy.common.privilege.become, which proves root
    cannot be regained) before serve() runs. A worker serves one identity
    (user, uid, gid, groups) for its whole life.

WHAT IT DOES
    Waits on fd 0, a SOCK_SEQPACKET socket to qpy-lspawn, for one request at a
    time, runs that delivery in-process (qpy.local.local.deliver) and answers it;
    then waits for the next. End of file on fd 0 ends it (exit 0): qpy-lspawn
    retires a worker after IDLE seconds without work or MAX_DELIVERIES deliveries.
    One fork serves many deliveries, where qpy-lspawn used to fork per delivery
    (the fork of a Python process and its copy-on-write faults cost more than a
    Maildir delivery).

    request (qpy-lspawn to worker), one datagram + the message fd (SCM_RIGHTS):
        b"Q" SEQ then, per field, LEN ":" BYTES; the fields are USER HOME LOCAL
        DOMAIN DASH EXT SENDER DEFAULTDELIVERY ENVNOATHOST TIMEOUT
    result (worker to qpy-lspawn), one datagram:
        b"A" SEQ " " CODE " " TEXT      CODE is qmail-local's exit code (0 K, 100 D,
                                        else Z), or EXIT_RETIRE (Z, and the worker exits)

SECURITY
    The worker holds only its socket and, during a delivery, that delivery's
    message fd: the descriptor queue-send passed to qpy-lspawn, never reopened,
    so the worker reads with its sender's access, not root's. Deliveries of one
    message running at once share its file offset, so the worker reads it only
    by offset (pread), and a program gets a sealed copy with its own
    (qpy.local.message.private_copy). Every delivery
    starts from "/" and qpy-local's own checks (home owned by the user, not
    writable by group or others) run again each time. The worker is not
    dumpable (it changed uid), so the user's own processes cannot ptrace it;
    still, qpy-lspawn treats its answers as untrusted input (decode_result).
    A worker that cannot parse a request, or hits an unexpected error in a
    delivery, answers code EXIT_RETIRE (a Z) and exits 111: a fresh fork takes over.

EXIT CODES
    0 at end of file on fd 0; 111 after a request it could not serve.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from qpy.common.exits import EXIT_TEMP
from qpy.local import local as qlocal

MAX_REQUEST = 64 * 1024     # addresses are at most 1,000 bytes; homes and settings short
MAX_RESULT = 4200           # CODE, SEQ and a report of at most qpy-lspawn's MAX_REPORT
FIELDS = 10
EXIT_RETIRE = 120           # result code: Z, and this worker exits after answering


class WorkerError(ValueError):
    """A request or result that does not parse."""


def check_message(fd: int, queue_uid: int) -> bytes | None:
    """Why qpy-lspawn must not hand this message descriptor to a worker, or None:
    it must be a regular file of the queue user, open for reading."""
    try:
        st = os.fstat(fd)
    except OSError:
        return b"qpy-lspawn unable to read message (#4.3.0)"
    if not stat.S_ISREG(st.st_mode) or (queue_uid >= 0 and st.st_uid != queue_uid):
        return b"Sorry, message has wrong type or owner. (#4.3.5)"
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH or flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
        # read only through the descriptor as given: its holder's access, not ours
        return b"Sorry, message descriptor is not open for reading. (#4.3.5)"
    return None


def encode_request(seq: int, fields: list[bytes]) -> bytes:
    if len(fields) != FIELDS:
        raise WorkerError("wrong number of fields")
    return b"Q%d " % seq + b"".join(b"%d:%s" % (len(f), f) for f in fields)


def decode_request(data: bytes) -> tuple[int, list[bytes]]:
    head, sep, rest = data.partition(b" ")
    if not sep or head[:1] != b"Q" or not head[1:].isdigit():
        raise WorkerError("bad request head")
    fields: list[bytes] = []
    pos = 0
    while pos < len(rest):
        colon = rest.find(b":", pos, pos + 8)
        if colon < 0 or not rest[pos:colon].isdigit():
            raise WorkerError("bad field length")
        end = colon + 1 + int(rest[pos:colon])
        if end > len(rest):
            raise WorkerError("field runs past the request")
        fields.append(rest[colon + 1:end])
        pos = end
    if len(fields) != FIELDS:
        raise WorkerError("wrong number of fields")
    return int(head[1:]), fields


def encode_result(seq: int, code: int, text: bytes) -> bytes:
    return b"A%d %d %s" % (seq, code, text[: MAX_RESULT - 32])


def decode_result(data: bytes) -> tuple[int, int, bytes]:
    """(seq, exit code, text) from a worker's datagram: strict, the peer runs as a user."""
    parts = data.split(b" ", 2)
    if len(parts) != 3 or parts[0][:1] != b"A" or not parts[0][1:].isdigit() \
            or len(parts[0]) > 21 or not parts[1].isdigit() or len(parts[1]) > 3:
        raise WorkerError("bad result")
    return int(parts[0][1:]), int(parts[1]), parts[2]


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise WorkerError("request truncated")
    return data, fds


def serve(sock: socket.socket, root: str, uid: int, queue_dev: int) -> int:
    """Deliver requests until end of file; the exit code of the worker. queue_dev: the
    queue's st_dev, looked up by qpy-lspawn (the user may not reach the queue)."""
    while True:
        data, fds = _receive(sock)
        if not data and not fds:
            return 0
        seq = 0
        try:
            seq, f = decode_request(data)
            if len(fds) != 1:
                raise WorkerError("no message fd")
            d = qlocal.Delivery(root=root, user=f[0].decode("utf-8", "replace"), uid=uid,
                                home=os.fsdecode(f[1]), local=f[2], domain=f[3], dash=f[4],
                                ext=f[5], sender=f[6], msgfd=fds[0], defaultdelivery=f[7],
                                envnoathost=f[8], timeout=int(f[9]), queue_dev=queue_dev)
            code, text = qlocal.deliver(d)
        except Exception as e:  # a bug or a bad request: report it, then a fresh fork
            sock.send(encode_result(seq, EXIT_RETIRE, (
                f"qpy-local failed: {type(e).__name__}: {e}").encode("utf-8", "replace")))
            return EXIT_TEMP
        finally:
            for fd in fds:
                os.close(fd)
            os.chdir("/")   # hold no user directory between deliveries
        sock.send(encode_result(seq, code, text.encode("utf-8", "replace")))
