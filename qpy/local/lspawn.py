"""qpy-lspawn — run local deliveries for qpy-queue-send, each under its recipient's uid.

SYNOPSIS
    qpy-lspawn            (started by qpy-start; fd 0 is a SOCK_SEQPACKET socket)

RUNS AS
    root: the only resident root process, and it does nothing else. In a one-user
    root it runs as that user and delivers only as that user.

WHAT IT DOES
    Reads delivery requests on fd 0 (qpy.common.spawn: delivery number, sender,
    recipients `local@domain`, the message as a read-only fd). A sender or
    recipient holding CR, LF or NUL is refused for good (D, and a log line):
    the address parser lets none in, this is the check before a delivery. For
    each recipient it finds the owner (qpy.common.rewrite.owner: the canonical
    local part looked up in users/assign, the passwd database, then the alias
    user qpyalias; never root) and hands the delivery to a worker
    (qpy.local.worker) that runs as that owner, with the message descriptor as
    queue-send passed it (never reopened: through /proc/self/fd that would be
    with root's access; one not open for reading is refused). A worker is a
    child forked from this process (qpy.common.pool): it starts a new session,
    keeps only its socket (fd 0; fd 1 and 2 are /dev/null), drops to the user's
    groups, gid and uid (qpy.common.privilege.become, which proves root cannot
    be regained), names itself `qpy-local USER` and runs deliveries in-process
    (qpy.local.local), one at a time, answering each with qmail-local's code
    and text. An idle worker of the same identity (user, uid, gid, groups) is
    reused; a new one is forked when none is idle, so as many run as queue-send
    has deliveries in flight. A worker is retired (its socket closed, so it exits)
    after WORKER_IDLE idle seconds, MAX_DELIVERIES deliveries, SIGHUP (a busy one
    after its delivery: later ones get the new settings and groups), or when it
    answers EXIT_RETIRE. The parent answers each request with spawn.send_result
    once every recipient is done: K (code 0), D (100), Z (other codes, crashes, timeouts).

    A delivery that runs longer than `timeoutlocal` (control file, default
    3600 s) plus GRACE seconds gets its worker killed and is reported Z
    (deferred). A worker that dies on a signal takes its whole session with it
    (its programs run in it, in their own process groups), and lspawn is a
    child subreaper, so it reaps whatever they leave behind.

    Control files (defaultdelivery, envnoathost, timeoutlocal) are read at
    start and on SIGHUP. The owner of an address and its supplementary groups
    are looked up here, in the parent, and kept (qpy.local.identity): 60
    seconds, or until /etc/passwd, /etc/group or users/assign changes, or
    SIGHUP. The worker does no name-service work at all. A user added to a
    group through a non-file source (LDAP, sssd) gets it within 60 seconds or
    at once on SIGHUP; a home removed meanwhile makes the worker's own check
    of the home defer.

    End of file on fd 0 or SIGTERM: no new requests; retire the idle workers,
    wait for the deliveries in flight (their results are still sent while the
    socket lasts), then exit 0.

SECURITY
    Never delivers as uid 0. Refuses a message fd that is not a regular file
    owned by the queue user. A worker holds no descriptor but its socket and the
    message at hand when user code runs, and serves one identity only, so it
    never holds another user's mail. It still makes qpy-local's own checks (home
    owned by the user, not writable by group or others) as the user, per
    delivery; only the group lookup moved to the parent. Its answers are parsed
    strictly (qpy.local.worker.decode_result) and must name the delivery it was
    given; anything else retires it.

EXIT CODES
    0 after end of input; 111 when it cannot start (not root, fd 0 not a socket).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass

from qpy.common import address, privilege, spawn, users
from qpy.common.control import Control
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.pool import Pool, Worker
from qpy.common.queue import Paths, root_from
from qpy.common.session import become_subreaper, kill_session
from qpy.common.wakeup import Wakeup
from qpy.local import local as qlocal
from qpy.local import worker
from qpy.local.identity import Identities, Refused, queue_dev, queue_uid, screen

GRACE = 30              # seconds past timeoutlocal before the parent kills a worker
MAX_WORKERS = 2000      # a hard cap; queue-send's concurrencylocal is far lower
MAX_DELIVERIES = 500    # a worker is retired after this many (bounds any slow leak)
WORKER_IDLE = 5.0       # seconds an idle worker is kept for the next delivery
MAX_REPORT = 4000       # bytes of a worker's report kept
STOP_WAIT = 60          # seconds SIGTERM waits for deliveries in flight


@dataclass
class Job:
    delivery: int
    msgfd: int
    results: list[tuple[bytes, bytes] | None]
    pending: int = 0


class LocalWorker(Worker):
    """A qpy.local.worker for one identity (key: user, uid, gid, groups)."""

    def __init__(self, pid: int, key: tuple, sock: socket.socket):
        super().__init__(pid, key, sock)
        self.job: Job | None = None     # the delivery in flight, with its recipient index
        self.index = 0
        self.seq = 0
        self.deadline = 0.0             # of the delivery in flight
        self.killed = False             # we sent SIGKILL (timeout)


class LSpawn:
    def __init__(self, root: str, sock: socket.socket):
        self.root = root
        self.sock = sock
        self.ctl = Control(root)
        self.sel = selectors.DefaultSelector()
        self.pool = Pool(self.sel, keep_stderr=False)
        self.pool.detach.append(sock)
        self.seq = 0
        self.stopping = False
        self.queue_uid = queue_uid(root)
        self.queue_dev = queue_dev(root)    # -1: every Maildir delivery fsyncs new/
        self.ids = Identities(root)
        self._settings()

    def _settings(self) -> None:
        self.ctl.reload()
        self.defaultdelivery = self.ctl.line("defaultdelivery").encode()
        self.envnoathost = self.ctl.line("envnoathost").encode()
        self.timeout = qlocal.timeout_from(self.ctl)

    # ---- requests -------------------------------------------------------------------
    def request(self) -> None:
        try:
            got = spawn.recv_request(self.sock)
        except spawn.SpawnError as e:
            log(f"warning: bad request: {e}")
            return
        except OSError as e:
            log(f"alert: cannot read requests: {e.strerror}")
            self.stop()
            return
        if got is None:
            self.stop()
            return
        delivery, sender, rcpts, msgfd = got
        job = Job(delivery, msgfd, [None] * len(rcpts))
        problem = worker.check_message(msgfd, self.queue_uid)
        for i, rcpt in enumerate(rcpts):
            if problem:
                job.results[i] = (b"Z", problem)
            else:
                try:
                    job.results[i] = self.start(job, i, sender, rcpt)
                except Exception as e:  # a bug must cost one deferral, not the spawner
                    log(f"alert: delivery {delivery}: {type(e).__name__}: {e}")
                    job.results[i] = (b"Z", b"Temporary failure in qpy-lspawn. (#4.3.0)")
        self.maybe_done(job)

    def start(self, job: Job, index: int, sender: bytes, rcpt: bytes) -> tuple[bytes, bytes] | None:
        """Hand one recipient to a worker; a result now when none can run."""
        now = screen(job.delivery, sender, rcpt)
        if now is not None:
            return now
        local, domain = address.split(rcpt)
        try:
            who, groups, key = self.ids.of(local)
        except Refused as e:
            return b"Z", str(e).encode()
        fields = [who.user.encode(), os.fsencode(who.home), local, domain, who.dash, who.ext,
                  sender, self.defaultdelivery, self.envnoathost, b"%d" % self.timeout]
        # the descriptor queue-send passed, never reopened (through /proc that would be
        # with root's access): workers read it by offset (pread), programs get a copy
        for _ in range(2):  # an idle worker may have died just now: then a new one
            w = self._worker(key, who, groups)
            if w is None:
                return b"Z", b"qpy-lspawn unable to start a delivery process. (#4.3.0)"
            self.seq += 1
            try:
                socket.send_fds(w.sock, [worker.encode_request(self.seq, fields)], [job.msgfd])
                break
            except OSError:
                self.retire(w)  # its exit is reaped; it had no delivery of ours
        else:
            return b"Z", b"qpy-lspawn unable to reach a delivery process. (#4.3.0)"
        w.job, w.index, w.seq = job, index, self.seq
        w.deadline = time.monotonic() + self.timeout + GRACE
        w.served += 1
        job.pending += 1
        return None

    def _worker(self, key: tuple, who: users.Recipient, groups: list[int]
                ) -> LocalWorker | None:
        """An idle worker for this identity, or a new one; None when none can start."""
        w = self.pool.unpark(key)
        if w is not None:
            return w  # type: ignore[return-value]
        if len(self.pool.all()) >= MAX_WORKERS:
            # make room: the idle worker unused the longest
            self.pool.retire_idle(0.0, 1, retire=self.retire)
            if len(self.pool.all()) >= MAX_WORKERS:
                return None
        return self.pool.fork(key, lambda sock: self.serve(who, groups, sock),
                              setup=os.setsid, make=LocalWorker)

    def serve(self, who: users.Recipient, groups: list[int], sock: socket.socket) -> int:
        """The worker, in its own session, with only its socket (fd 0): drop to the
        recipient and serve its deliveries."""
        if os.getuid() == 0:
            privilege.become(who.uid, who.gid, groups)  # groups from the parent's cache
        if os.getuid() == 0 or os.geteuid() == 0:
            raise privilege.PrivilegeError("still root")
        privilege.set_title("qpy-local " + who.user)
        os.umask(0o077)  # as qmail-local: new mail and program files private to the user
        os.chdir("/")
        return worker.serve(sock, self.root, who.uid, self.queue_dev)

    # ---- results --------------------------------------------------------------------
    def readable(self, w: LocalWorker) -> None:
        """A worker's answer, or its end of file."""
        try:
            data = w.sock.recv(worker.MAX_RESULT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.retire(w)      # it exited or is exiting: reap() reports its delivery
            return
        if w.job is None:
            log(f"warning: unasked answer from qpy-local {w.pid}: retired")
            self.retire(w)
            return
        code = self._take_answer(w, data)
        if code is None:
            log(f"warning: qpy-local {w.pid}: mangled answer: retired")
            self._report(w, b"Z", b"qpy-local sent a mangled report. (#4.3.0)")
            self.retire(w)
            return
        if code == worker.EXIT_RETIRE or w.served >= MAX_DELIVERIES or self.stopping \
                or self.pool.stale(w):
            self.retire(w)
        else:
            self.pool.park(w)

    def _take_answer(self, w: Worker, data: bytes) -> int | None:
        """Report w's delivery from its answer; its code, or None when the answer does
        not parse or names another delivery (nothing is reported then)."""
        try:
            seq, code, text = worker.decode_result(data)
        except worker.WorkerError:
            return None
        if seq != w.seq:
            return None
        self._report(w, {0: b"K", 100: b"D"}.get(code, b"Z"),
                     text[:MAX_REPORT].strip().replace(b"\n", b" "))
        return code

    def _report(self, w: Worker, letter: bytes, text: bytes) -> None:
        job, w.job = w.job, None
        if job is None:
            return
        job.results[w.index] = (letter, text)
        job.pending -= 1
        self.maybe_done(job)

    def retire(self, w: LocalWorker) -> None:
        """No more work for w: an answer it already sent is taken, then its socket
        closed (so it exits); reap() collects it."""
        if w.sock.fileno() >= 0:
            self.readable_last(w)
        self.pool.retire(w)

    def readable_last(self, w: LocalWorker) -> None:
        """Take an answer already sent before the socket closes (a worker that exited)."""
        if w.job is None:
            return
        try:
            w.sock.setblocking(False)
            data = w.sock.recv(worker.MAX_RESULT)
        except OSError:
            return
        if data:
            self._take_answer(w, data)     # a mangled one: reap() reports the delivery

    def reap(self) -> None:
        # also orphans of deliveries: we are their subreaper (the pool collects them)
        for w, status in self.pool.reap():
            self.retire(w)      # takes an answer it sent before it exited
            self.pool.forget(w)
            if w.job is not None:
                if w.killed:
                    text = b"Delivery timed out; killed."
                elif os.WIFEXITED(status):
                    text = b"qpy-local exited %d. (#4.3.0)" % os.WEXITSTATUS(status)
                else:
                    text = b"qpy-local crashed. (#4.3.0)"
                self._report(w, b"Z", text)
            if not os.WIFEXITED(status):
                kill_session(w.pid)  # its programs must not outlive a killed delivery

    def maybe_done(self, job: Job) -> None:
        if job.pending or any(r is None for r in job.results):
            return
        os.close(job.msgfd)
        results = [r for r in job.results if r is not None]
        try:
            spawn.send_result(self.sock, job.delivery, results)
        except OSError as e:
            log(f"warning: cannot send result {job.delivery}: {e.strerror}")
        for letter, text in results:
            if letter != b"K":
                log(f"delivery {job.delivery}: {letter.decode()} {clean(text)}")

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for w in self.pool.all():
            if w.job is not None and w.deadline <= now and not w.killed:
                w.killed = True
                self.pool.kill(w)       # reap() then clears its session

    # ---- main loop ------------------------------------------------------------------
    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_by = time.monotonic() + STOP_WAIT
            try:
                self.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.pool.retire_idle(0.0, retire=self.retire)

    def _wait(self) -> float | None:
        """How long the loop may sleep: until a deadline or an idle worker's retirement."""
        now = time.monotonic()
        times = [w.deadline for w in self.pool.all() if w.job is not None]
        retirement = self.pool.next_retirement(WORKER_IDLE)
        if retirement is not None:
            times.append(retirement)
        wait = max(0.0, min(times) - now) if times else None
        if self.stopping:
            wait = 1.0 if wait is None else min(wait, 1.0)
        return wait

    def run(self) -> int:
        sigs = Wakeup((signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP))
        self.sel.register(self.sock, selectors.EVENT_READ, "sock")
        self.sel.register(sigs.fd, selectors.EVENT_READ, "wake")
        while not (self.stopping and not self.pool.all()):
            woken = False
            for key, _ in self.sel.select(self._wait()):
                if key.data == "sock":
                    if not self.stopping:
                        self.request()
                elif isinstance(key.data, LocalWorker) and key.data.sock.fileno() >= 0:
                    self.readable(key.data)
                woken = woken or key.data == "wake"
            got = sigs.take_if(woken)
            if signal.SIGCHLD in got:         # else no worker has exited: no wait4
                self.reap()
            for sig in got:
                if sig == signal.SIGTERM:
                    self.stop()
                elif sig == signal.SIGHUP:
                    self._settings()
                    self.ids.clear()
                    # new settings and groups: fresh workers, a busy one after its delivery
                    self.pool.recycle()
            self.kill_overdue()
            self.pool.retire_idle(WORKER_IDLE, retire=self.retire)
            if self.stopping and time.monotonic() > self.stop_by:
                for w in self.pool.all():
                    w.deadline = 0
                    w.killed = w.job is not None
                    self.pool.kill(w)
        return 0


def main(argv: list[str] | None = None) -> int:
    root = root_from()
    privilege.preamble("qpy-lspawn", root, None)
    if os.getuid() != 0 and Paths(root).oneuser() is None:
        sys.stderr.write("qpy-lspawn: must run as root (or in a one-user root)\n")
        return EXIT_TEMP
    try:
        sock = socket.socket(fileno=0)
        if sock.type != socket.SOCK_SEQPACKET:
            raise OSError("not a SOCK_SEQPACKET socket")
    except OSError as e:
        sys.stderr.write(f"qpy-lspawn: fd 0: {e}\n")
        return EXIT_TEMP
    os.chdir("/")
    become_subreaper()
    return LSpawn(root, sock).run()
