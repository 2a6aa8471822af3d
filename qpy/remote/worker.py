"""worker — qpy-rspawn's delivery worker: remote deliveries one at a time, reused.

SYNOPSIS
    (forked by qpy-rspawn; never started by hand)

RUNS AS
    qpyr, as qpy-rspawn, of which it is a fork: nothing to drop, nothing to gain.

WHAT IT DOES
    Waits on fd 0, a SOCK_SEQPACKET socket to qpy-rspawn, for one request at a
    time: qpy.common.spawn's request datagram with the message fd (SCM_RIGHTS),
    as queue-send sent it. It runs the delivery in-process
    (qpy.remote.transaction.deliver) with its connection cache, titled
    `qpy-remote DOMAIN`, and answers with one datagram (one send, one wakeup of
    qpy-rspawn):

        b"I" DOMAIN     the domain of the SMTP connection it now holds, at most
                        MAX_DOMAIN bytes of printable, non-space characters;
                        b"I" alone: it holds none
        b"\n"
        b"S" ...        qpy.common.spawn's result for that delivery

    Then it waits again, titled `qpy-remote idle`, in select() on its socket and
    on the held connection, with a timeout at the connection's end of life
    (qpy.remote.conncache.ConnCache: CONN_IDLE seconds unused, CONN_MAX_AGE seconds
    old). An expired connection gets QUIT and is closed; one that the server
    closes, or speaks on unasked (a 421 before it hangs up), is closed at once;
    either way the worker then sends b"I" alone so that qpy-rspawn stops counting on
    it. End of file on fd 0 ends the worker: QUIT on the held connection, exit
    0. qpy-rspawn retires a worker after WORKER_IDLE idle seconds, after
    MAX_DELIVERIES deliveries, on SIGHUP and on SIGTERM, by closing its end.

    One fork serves many deliveries, where qpy-rspawn used to fork per delivery
    (a Python fork and its copy-on-write faults cost about 1.5 ms of CPU), and
    one connection serves many messages to a domain, where each used to pay for
    a TCP handshake, the greeting, EHLO, maybe STARTTLS, and QUIT.

SIGNALS
    SIGHUP is ignored (qpy-rspawn decides when workers go); SIGTERM ends it at
    once (its delivery, if any, is answered Z by qpy-rspawn).

SECURITY
    A worker holds fd 0 (its socket), fd 1 (/dev/null), fd 2 (the log), the
    message fd of the delivery at hand and at most one SMTP connection: not
    queue-send's socket, not another message's fd (qpy-rspawn closes everything
    else after the fork). qpy-rspawn parses its answers strictly
    (qpy.common.spawn.decode_result, decode_idle here) and accepts a result
    only for the delivery this worker was given.

EXIT CODES
    0 at end of file on fd 0; 111 after a request it could not read or a
    delivery that crashed (qpy-rspawn answers that delivery Z).
"""

from __future__ import annotations

import os
import select
import socket
import time

from qpy.common import spawn
from qpy.common.control import Control
from qpy.common.log import clean
from qpy.common.privilege import set_title
from qpy.remote.conncache import ConnCache
from qpy.remote.transaction import deliver

MAX_DOMAIN = 512            # bytes of a domain in b"I"; a longer one is reported as none
IDLE_TITLE = "qpy-remote idle"


class WorkerError(ValueError):
    """An answer from a worker that does not parse."""


def _printable(domain: bytes) -> bool:
    return all(c > 0x20 and c != 0x7F for c in domain)


def encode_idle(domain: str) -> bytes:
    """b"I" and the domain of the held connection (nothing when none, or unusable)."""
    raw = domain.encode("utf-8", "replace")
    if len(raw) > MAX_DOMAIN or not _printable(raw):
        raw = b""
    return b"I" + raw


def decode_idle(data: bytes) -> bytes:
    """The domain in a worker's b"I" datagram (b"": none held), or WorkerError."""
    if data[:1] != b"I" or len(data) > 1 + MAX_DOMAIN or not _printable(data[1:]):
        raise WorkerError("bad idle note")
    return data[1:]


def wait_for_request(sock: socket.socket, cache: ConnCache) -> None:
    """Until something is waiting on `sock`; meanwhile end the held connection in time."""
    while True:
        held = cache.fileno()
        deadline = cache.deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sock] + ([held] if held >= 0 else []), [], [], timeout)
        if held >= 0 and held in ready:
            cache.drop()        # closed by the server, or a word unasked: not reusable
        elif deadline is not None and time.monotonic() >= deadline:
            cache.close()       # QUIT: idle too long, or too old
        elif sock in ready:
            return
        else:
            continue
        try:
            sock.send(encode_idle(""))
        except OSError:         # qpy-rspawn retired us meanwhile: its end of file follows
            return


def serve(sock: socket.socket, ctl: Control) -> int:
    """Deliver requests until end of file on `sock`; the worker's exit code."""
    cache = ConnCache()
    try:
        while True:
            set_title(IDLE_TITLE)
            wait_for_request(sock, cache)
            try:
                req = spawn.recv_request_dsn(sock)  # SpawnError: qpy-rspawn answers Z
            except ConnectionResetError:        # it closed our pair with a note unread
                req = None
            if req is None:
                return 0
            delivery, sender, rcpts, fd, dsn = req
            try:
                set_title("qpy-remote %s" % clean(rcpts[0].rpartition(b"@")[2], 100))
                results = deliver(ctl, sender, rcpts, fd, cache=cache, dsn=dsn)
            finally:
                os.close(fd)
            sock.send(encode_idle(cache.domain()) + b"\n"
                      + spawn.encode_result(delivery, results))
    finally:
        cache.close()
