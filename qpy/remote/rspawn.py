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
    read-only fd. `control/concurrencyremote` and what qpy.remote.remote reads,
    at start and on SIGHUP.

WRITES
    fd 0: one result datagram per request, one status per recipient
    (K delivered, Z temporary failure, D permanent failure) with the text of
    the remote server, sanitised. stderr: a log line per fault.

HOW
    Deliveries run in workers (qpy.remote.worker): children forked from this
    process, which has already imported everything, each serving one request
    at a time over its own SOCK_SEQPACKET socketpair and reused for the next,
    so that there is no fork per delivery, and each keeping the SMTP
    connection of its last delivery open for a while (qpy.remote.remote,
    "Connection reuse"). A request is forwarded as it came (the request
    datagram and the message fd); the worker answers with one datagram, b"I"
    DOMAIN (the domain whose connection it holds, or none), LF and the result,
    which is checked (spawn.decode_result; it must name the delivery that worker was
    given, with one status per recipient) and then sent on to queue-send.

    A request goes, in this order of preference, to: an idle worker that holds
    a connection for the request's domain (the domain of its first recipient);
    an idle worker that holds none; a new worker, while fewer than
    concurrencyremote run; the idle worker unused the longest, which holds
    another domain's connection (it QUITs that one first). Otherwise it waits
    here, up to MAX_PENDING, beyond which requests are answered Z at once.
    Among idle workers of the first two kinds the one idle the shortest time
    is taken, so that surplus workers reach WORKER_IDLE and go.

    A worker is retired (its end of the pair closed: it QUITs its connection
    and exits) after WORKER_IDLE idle seconds, after MAX_DELIVERIES
    deliveries, on SIGHUP (idle ones at once, busy ones when they answer: new
    forks read the control files again), and on SIGTERM. A worker that dies
    with a delivery in flight gets that delivery answered Z; one that sends
    anything but the answers above, or an answer for another delivery, gets
    its delivery (if any) answered Z, is killed and retired: a worker's
    answer never settles a delivery it was not given. A malformed request is
    logged and answered Z when it names a delivery number.

SIGNALS
    SIGHUP: re-read control files; retire the workers (they hold the old
    ones). SIGTERM, or end of file on fd 0: take no more requests, answer Z to
    those waiting, let running deliveries finish, then exit 0 once every
    worker is gone.

SECURITY
    qpyr cannot open anything in queue/mess/: it only reads the fds it is
    handed. A worker holds its socket, the message fd of its delivery and one
    SMTP connection (qpy.remote.worker, SECURITY), nothing of this process.

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
import time
import traceback

from qpy.common import spawn
from qpy.common.control import Control
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.pool import Pool, Worker
from qpy.common.privilege import preamble, set_title
from qpy.common.queue import root_from
from qpy.common.wakeup import Wakeup
from qpy.remote import worker

MAX_CONCURRENCY = 500       # bound on concurrencyremote, whatever the file says
MAX_PENDING = 5000          # requests waiting for a free worker
MAX_DELIVERIES = 1000       # a worker is retired after this many (bounds any slow leak)
WORKER_IDLE = 10.0          # seconds an idle worker is kept for the next request
SEND_TRIES = 2              # workers a request is offered to before it is answered Z
LOOP_WAIT = 60.0            # longest sleep of the main loop (a safety net)


class _Recorder:
    """Wraps the socket to keep the last datagram, to name a bad request's delivery."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf: bytearray | None = None
        self.n = 0

    def recvmsg_into(self, bufs: list[bytearray], *args: int) -> tuple:
        got = self.sock.recvmsg_into(bufs, *args)
        self.buf, self.n = bufs[0], got[0]      # copied only when it is bad (last)
        return got

    @property
    def last(self) -> bytes:
        return bytes(self.buf[:self.n]) if self.buf is not None else b""


class RemoteWorker(Worker):
    """A forked qpy.remote.worker; every one serves any domain (the pool key is None)."""

    def __init__(self, pid: int, key: None, sock: socket.socket):
        super().__init__(pid, key, sock)
        self.job: tuple[int, int] | None = None     # (delivery, recipient count) in flight
        self.holds = b""                    # domain of its cached connection, as it last said


def request_domain(rcpts: list[bytes]) -> bytes:
    """The domain a request goes to, as a worker names the connection it holds."""
    return rcpts[0].rpartition(b"@")[2].lower()


class Spawner:
    def __init__(self, root: str, sock: socket.socket):
        self.ctl = Control(root)
        self.sock = sock
        self.rec = _Recorder(sock)
        self.pending: collections.deque = collections.deque()
        self.sel = selectors.DefaultSelector()
        # a worker keeps fd 2 (the log); SIGHUP is ignored there (see child())
        self.pool = Pool(self.sel, keep_stderr=True,
                         child_signals=(signal.SIGCHLD, signal.SIGTERM))
        self.pool.detach.append(sock)
        self.stopping = False

    def concurrency(self) -> int:
        return min(MAX_CONCURRENCY, max(1, self.ctl.integer("concurrencyremote")))

    def answer_z(self, delivery: int, count: int, text: bytes) -> None:
        try:
            spawn.send_result(self.sock, delivery, [(b"Z", text)] * max(1, count))
        except OSError as e:
            log("cannot send result for delivery %d: %s" % (delivery, e.strerror))

    # ---- requests from queue-send ------------------------------------------------------
    def take(self) -> None:
        """Receive one request; on end of file, stop."""
        try:
            req = spawn.recv_request_dsn(self.rec)      # type: ignore[arg-type]
        except spawn.SpawnError as e:
            self.bad_request(str(e))
            return
        except OSError as e:
            log("cannot read requests: %s" % e.strerror)
            self.stop()
            return
        if req is None:
            self.stop()
            return
        if len(self.pending) >= MAX_PENDING:
            os.close(req[3])
            self.answer_z(req[0], len(req[2]), b"qpy-rspawn is busy; try again later. (#4.3.0)")
            return
        self.pending.append(req)

    def bad_request(self, why: str) -> None:
        fields = self.rec.last[1:].split(b"\0") if self.rec.last[:1] in (b"R", b"N") else []
        if fields and fields[0].isdigit() and len(fields[0]) < 20:
            count = min(spawn.MAX_RCPTS, max(1, len(fields) - 3))
            log("bad request for delivery %s: %s" % (fields[0].decode(), why))
            self.answer_z(int(fields[0]), count, b"qpy-rspawn got a bad request: "
                          + why.encode() + b". (#4.3.0)")
        else:
            log("bad request without a delivery number: %s" % why)

    def start(self) -> None:
        """Hand waiting requests, in order, to workers while there are workers to have."""
        while self.pending:
            delivery, sender, rcpts, fd, dsn = self.pending[0]
            for _ in range(SEND_TRIES):
                w = self.pick(request_domain(rcpts))
                if w is None:
                    return                  # it waits for a worker to become free
                try:
                    spawn.send_request(w.sock, delivery, sender, rcpts, fd, dsn)
                    break
                except OSError as e:        # it died just now; it had no delivery of ours
                    log("cannot reach qpy-remote %d: %s" % (w.pid, e.strerror))
                    self.retire(w)
            else:
                w = None
            self.pending.popleft()
            os.close(fd)
            if w is None:
                self.answer_z(delivery, len(rcpts),
                              b"qpy-rspawn unable to reach a delivery process. (#4.3.0)")
                continue
            w.job = (delivery, len(rcpts))
            w.served += 1

    def pick(self, domain: bytes) -> RemoteWorker | None:
        """The worker for a request to `domain` (see HOW), or None: it must wait."""
        for holds in (domain, b""):
            w = self.pool.unpark(None, lambda w, holds=holds: w.holds == holds)
            if w is not None:
                return w  # type: ignore[return-value]
        if len(self.pool) < self.concurrency():
            w = self.fork()
            if w is not None:
                return w
        idle = self.pool.idle_workers()
        if idle:
            self.pool.take(idle[0])     # the connection unused the longest goes
            return idle[0]  # type: ignore[return-value]
        return None

    # ---- workers -----------------------------------------------------------------------
    def fork(self) -> RemoteWorker | None:
        return self.pool.fork(None, self.child, setup=self.child_setup, make=RemoteWorker)

    @staticmethod
    def child_setup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)    # rspawn retires us on SIGHUP
        set_title(worker.IDLE_TITLE)

    def child(self, sock: socket.socket) -> int:
        """The worker process: fd 0 its socket, 1 /dev/null, 2 the log."""
        try:
            return worker.serve(sock, self.ctl)
        except BaseException:
            log("qpy-remote %d crashed: %s"
                % (os.getpid(), clean(traceback.format_exc(), 2000)))
            return EXIT_TEMP

    def readable(self, w: RemoteWorker) -> None:
        """One datagram from a worker, or its end of file."""
        try:
            data, _, flags = spawn.receive(w.sock, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data, flags = b"", 0
        if not data:
            self.retire(w)      # it exited: reap() answers its delivery
        elif flags & socket.MSG_TRUNC:
            self.garbage(w, "answer too long")
        else:
            self.answer(w, data)

    def answer(self, w: RemoteWorker, data: bytes) -> None:
        if data[:1] == b"I":        # the note alone, or the note, LF and the result
            note, nl, data = data.partition(b"\n")
            try:
                w.holds = worker.decode_idle(note)
            except worker.WorkerError as e:
                self.garbage(w, str(e))
                return
            if not nl:
                return
        if w.job is None:
            self.garbage(w, "an answer without a request")
            return
        delivery, count = w.job
        try:
            got, results = spawn.decode_result(data)
            if got != delivery or len(results) != count:
                raise spawn.SpawnError("not the answer to delivery %d" % delivery)
        except spawn.SpawnError as e:
            self.garbage(w, str(e))
            return
        w.job = None
        try:
            spawn.send_result(self.sock, delivery, results)
        except OSError as e:
            log("cannot send result for delivery %d: %s" % (delivery, e.strerror))
        if self.stopping or self.pool.stale(w) or w.served >= MAX_DELIVERIES:
            self.retire(w)
        else:
            self.pool.park(w)

    def garbage(self, w: RemoteWorker, why: str) -> None:
        """A worker that said something wrong: Z for its delivery; killed and retired."""
        log("qpy-remote %d: %s: retired" % (w.pid, clean(why, 200)))
        if w.job is not None:
            delivery, count = w.job
            w.job = None
            self.answer_z(delivery, count, b"qpy-remote sent a mangled report. (#4.3.0)")
        self.pool.kill(w)       # it may not go on delivering what we answered Z
        self.retire(w)

    def retire(self, w: RemoteWorker) -> None:
        """No more work for w: closing our end ends it; reap() collects it."""
        self.pool.retire(w)

    def reap(self) -> None:
        for w, status in self.pool.reap():
            while w.sock.fileno() >= 0:     # what it said before it went still counts
                try:
                    data, _, flags = spawn.receive(w.sock, 0, socket.MSG_DONTWAIT)
                except OSError:
                    break
                if not data or flags & socket.MSG_TRUNC:
                    break
                self.answer(w, data)
            self.pool.forget(w)
            if w.job is not None:
                delivery, count = w.job
                w.job = None
                code = os.waitstatus_to_exitcode(status)
                why = "crashed" if code < 0 else "exited %d" % code
                self.answer_z(delivery, count, b"qpy-remote %s. (#4.3.0)" % why.encode())

    # ---- main loop ---------------------------------------------------------------------
    def stop(self) -> None:
        """No more requests: answer the waiting ones Z, retire the idle workers."""
        if self.stopping:
            return
        self.stopping = True
        self.sel.unregister(self.sock)
        while self.pending:
            delivery, _, rcpts, fd, _ = self.pending.popleft()
            os.close(fd)
            self.answer_z(delivery, len(rcpts), b"qpy-rspawn is stopping. (#4.3.0)")
        self.pool.retire_idle(0.0)

    def hangup(self) -> None:
        """New control files: idle workers go now, busy ones once they answer."""
        self.ctl.reload()
        self.pool.recycle()

    def wait(self) -> float:
        due = self.pool.next_retirement(WORKER_IDLE)
        if due is None:
            return LOOP_WAIT
        return min(LOOP_WAIT, max(0.0, due - time.monotonic()))

    def run(self) -> int:
        sigs = Wakeup((signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM))
        self.sel.register(self.sock, selectors.EVENT_READ, "requests")
        self.sel.register(sigs.fd, selectors.EVENT_READ, "wake")
        while True:
            events = self.sel.select(self.wait())
            # the pipe is read, and children waited for, only when a signal came
            woke = sigs.pending() or any(k.data == "wake" for k, _ in events)
            got = sigs.take() if woke else []
            for sig in got:             # first: a SIGHUP sent before a request applies to it
                if sig == signal.SIGHUP:
                    self.hangup()
                elif sig == signal.SIGTERM:
                    self.stop()
            for key, _ in events:
                if key.data == "requests":
                    if not self.stopping:
                        self.take()
                elif isinstance(key.data, RemoteWorker) and key.data.sock.fileno() >= 0:
                    self.readable(key.data)     # (not retired earlier in this round)
            if signal.SIGCHLD in got:
                self.reap()
            self.pool.retire_idle(WORKER_IDLE)
            self.start()
            if self.stopping and not self.pool.all():
                return 0


def main() -> int:
    root = root_from()
    preamble("qpy-rspawn", root, "qpyr")
    try:
        sock = socket.socket(fileno=0)
    except OSError as e:
        log("fd 0 is not a socket: %s" % e.strerror)
        return EXIT_TEMP
    if sock.type != socket.SOCK_SEQPACKET:
        log("fd 0 is not a SOCK_SEQPACKET socket")
        return EXIT_TEMP
    sock.setblocking(True)
    try:
        return Spawner(root, sock).run()
    except KeyboardInterrupt:
        return EXIT_TEMP
    finally:
        sys.stderr.flush()
