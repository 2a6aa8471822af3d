"""qpy-rspawn — run remote deliveries for qpy-queue-send.

SYNOPSIS
    qpy-rspawn          (started by qpy-start; fd 0 is the request socket)

RUNS AS
    qpyr (started as root by qpy-start with a clean environment {QPY_ROOT, PATH};
    the preamble drops to qpyr first thing).

READS
    fd 0: a SOCK_SEQPACKET socket to qpy-queue-send. Each datagram is one
    request of qpy.common.spawn: a delivery number, the sender, up to
    spawn.MAX_RCPTS recipients of one domain, and the message as an open,
    read-only fd. `control/concurrencyremote` (re-read on SIGHUP) and what
    qpy.remote.remote reads.

WRITES
    fd 0: one result datagram per request, one status per recipient
    (K delivered, Z temporary failure, D permanent failure) with the text of
    the remote server, sanitised. stderr: a log line per fault.

HOW
    Each request is delivered in a child forked from this process, which has
    already imported everything (no new interpreter per delivery); the child
    is titled `qpy-remote DOMAIN`, sends its own result datagram (datagrams
    are atomic, so children never interleave) and exits 0. A child that dies
    otherwise gets a Z result from the parent. At most concurrencyremote
    children run; further requests wait here, up to MAX_PENDING, beyond
    which they are answered Z at once. A malformed request is logged and
    answered Z when it names a delivery number.

SIGNALS
    SIGHUP: re-read control files. SIGTERM, or end of file on fd 0: take no
    more requests, answer Z to those waiting, let running deliveries finish,
    then exit 0.

SECURITY
    qpyr cannot open anything in queue/mess/: it only reads the fds it is
    handed. Children hold only their own message fd.

EXIT CODES
    0 after end of input or SIGTERM; 111 when it cannot start.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
import traceback

from qpy.common import children, spawn
from qpy.common.control import Control
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, set_title
from qpy.common.queue import root_from
from qpy.remote import remote

MAX_CONCURRENCY = 500       # bound on concurrencyremote, whatever the file says
MAX_PENDING = 5000          # requests waiting for a free slot
EXIT_TEMP = 111


class _Recorder:
    """Wraps the socket to keep the last datagram, to name a bad request's delivery."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.last = b""

    def recvmsg(self, *args: int) -> tuple:
        got = self.sock.recvmsg(*args)
        self.last = got[0]
        return got


class Spawner:
    def __init__(self, root: str, sock: socket.socket):
        self.ctl = Control(root)
        self.sock = sock
        self.rec = _Recorder(sock)
        self.children: dict[int, tuple[int, int]] = {}   # pid: (delivery, recipient count)
        self.pending: collections.deque = collections.deque()
        self.stopping = False
        self.hup = False

    def concurrency(self) -> int:
        return min(MAX_CONCURRENCY, max(1, self.ctl.integer("concurrencyremote")))

    def answer_z(self, delivery: int, count: int, text: bytes) -> None:
        try:
            spawn.send_result(self.sock, delivery, [(b"Z", text)] * max(1, count))
        except OSError as e:
            log("qpy-rspawn: cannot send result for delivery %d: %s" % (delivery, e.strerror))

    def take(self) -> None:
        """Receive one request; on end of file, stop."""
        try:
            req = spawn.recv_request(self.rec)          # type: ignore[arg-type]
        except spawn.SpawnError as e:
            self.bad_request(str(e))
            return
        except OSError as e:
            log("qpy-rspawn: cannot read requests: %s" % e.strerror)
            self.stopping = True
            return
        if req is None:
            self.stopping = True
            return
        if len(self.pending) >= MAX_PENDING:
            os.close(req[3])
            self.answer_z(req[0], len(req[2]), b"qpy-rspawn is busy; try again later. (#4.3.0)")
            return
        self.pending.append(req)

    def bad_request(self, why: str) -> None:
        fields = self.rec.last[1:].split(b"\0") if self.rec.last.startswith(b"R") else []
        if fields and fields[0].isdigit() and len(fields[0]) < 20:
            count = min(spawn.MAX_RCPTS, max(1, len(fields) - 3))
            log("qpy-rspawn: bad request for delivery %s: %s" % (fields[0].decode(), why))
            self.answer_z(int(fields[0]), count, b"qpy-rspawn got a bad request: "
                          + why.encode() + b". (#4.3.0)")
        else:
            log("qpy-rspawn: bad request without a delivery number: %s" % why)

    def start(self) -> None:
        while self.pending and len(self.children) < self.concurrency():
            delivery, sender, rcpts, fd = self.pending.popleft()
            try:
                pid = os.fork()
            except OSError as e:
                log("qpy-rspawn: cannot fork: %s" % e.strerror)
                self.pending.appendleft((delivery, sender, rcpts, fd))
                return
            if pid == 0:
                self.child(delivery, sender, rcpts, fd)
            os.close(fd)
            self.children[pid] = (delivery, len(rcpts))

    def child(self, delivery: int, sender: bytes, rcpts: list[bytes], fd: int) -> None:
        """One delivery; never returns."""
        code = EXIT_TEMP
        try:
            for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            domain = rcpts[0].rpartition(b"@")[2].decode("utf-8", "replace")
            set_title("qpy-remote %s" % clean(domain, 100))
            for *_, ofd in self.pending:    # only our own message fd stays open
                os.close(ofd)
            results = remote.deliver(self.ctl, sender, rcpts, fd)
            spawn.send_result(self.sock, delivery, results)
            code = 0
        except BaseException:
            log("qpy-rspawn: delivery %d crashed: %s"
                % (delivery, clean(traceback.format_exc(), 2000)))
        finally:
            os._exit(code)

    def reap(self) -> None:
        for pid, status in children.exited():
            delivery, count = self.children.pop(pid, (None, 0))
            if delivery is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                why = "crashed" if code < 0 else "exited %d" % code
                self.answer_z(delivery, count, b"qpy-remote %s. (#4.3.0)" % why.encode())

    def run(self) -> int:
        rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wr)
        signal.signal(signal.SIGCHLD, lambda s, f: None)
        signal.signal(signal.SIGHUP, lambda s, f: setattr(self, "hup", True))
        signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "stopping", True))
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(rd, selectors.EVENT_READ)
        reading = True
        while True:
            if self.hup:
                self.hup = False
                self.ctl.reload()
            if self.stopping and reading:
                sel.unregister(self.sock)
                reading = False
                while self.pending:
                    delivery, _, rcpts, fd = self.pending.popleft()
                    os.close(fd)
                    self.answer_z(delivery, len(rcpts), b"qpy-rspawn is stopping. (#4.3.0)")
            self.reap()
            self.start()
            if not reading and not self.children:
                return 0
            for key, _ in sel.select(timeout=60):
                if key.fileobj is self.sock:
                    self.take()
                else:
                    try:
                        while os.read(rd, 512):
                            pass
                    except BlockingIOError:
                        pass


def main() -> int:
    root = root_from()
    preamble("qpy-rspawn", root, "qpyr")
    try:
        sock = socket.socket(fileno=0)
    except OSError as e:
        log("qpy-rspawn: fd 0 is not a socket: %s" % e.strerror)
        return EXIT_TEMP
    if sock.type != socket.SOCK_SEQPACKET:
        log("qpy-rspawn: fd 0 is not a SOCK_SEQPACKET socket")
        return EXIT_TEMP
    sock.setblocking(True)
    try:
        return Spawner(root, sock).run()
    except KeyboardInterrupt:
        return EXIT_TEMP
    finally:
        sys.stderr.flush()
