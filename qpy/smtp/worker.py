"""worker — qpy-tcpserver's session workers: the parent's policy, and what a worker runs.

SYNOPSIS
    (forked by qpy-tcpserver through qpy.common.pool; never started by hand)

RUNS AS
    qpyd, as qpy-tcpserver, of which it is a fork: nothing to drop, nothing to
    gain. Titled `qpy-smtpd CLIENT-IP` while it serves a session and
    `qpy-smtpd idle` between sessions.

IN THE PARENT (Workers)
    qpy.common.pool forks, parks, retires and reaps the workers; Workers holds
    qpy-tcpserver's policy for them. hand_over(fd, order, client) passes an
    accepted socket to the idle worker that became idle last (or one forked
    for it) over its socketpair (SCM_RIGHTS); the worker is busy (w.job: its
    client) until it writes DONE back, and on_end(client) is told, for
    qpy-tcpserver's per-client count. POOL_MIN workers are kept forked ahead;
    idle ones beyond that exit one by one after IDLE_EXIT seconds without
    work; recycle() (SIGHUP) retires the idle ones at once and the busy ones
    after their session; shutdown() lets sessions finish, then TERMs, then
    KILLs.

WHAT A WORKER HOLDS
    What qpy.common.pool leaves a worker forked with channel_fd=3: fd 0 and 1
    /dev/null, fd 2 the log, fd 3 its end of the SOCK_SEQPACKET pair, and
    nothing else of the parent's: no listening socket, no other worker's pair,
    no other client's connection. During a session it also holds that
    session's connection (on fd 0 and 1, and the descriptor it came on).

WHAT A WORKER DOES
    Waits on fd 3 for one hand-over at a time: a datagram of at most
    HANDOVER_BYTES, the order, carrying the accepted connection: a line
    `FAMILY IP PORT` (the socket's address family and the client's address, as
    accept() gave them to the parent), then JSON {"listener": PROFILE, "env":
    the client rule's variables} (parsed once per worker: the parent sends the
    same few again and again). Per connection: the
    session's environment made afresh (a copy of the one the worker was forked
    with; the process's own is never changed) with the ucspi-tcp one set
    (PROTO=TCP, TCPLOCALIP, TCPLOCALPORT, TCPREMOTEIP, TCPREMOTEPORT,
    TCPREMOTEHOST only with -h, the rule's variables, QPY_LISTENER), the
    connection on fd 0 and 1, qpy-smtpd's Session run in-process (the title
    and the look at users/recipients once the 220 is out: the client does not
    wait for them), then the
    connection shut down and /dev/null back on fd 0 and 1; then DONE. The
    Session, its Channel, TLS socket and Drop are made anew per connection.
    After `sessions` connections (control/smtpdsessions) it exits instead of
    answering; when the parent closes the pair it exits at once, or after
    its session.

SIGNALS (in a worker)
    SIGTERM ends it (SystemExit: the session's clean-up runs); SIGPIPE is
    ignored; SIGHUP, SIGINT and SIGCHLD have their defaults.

EXIT CODES (of a worker)
    0; an exception in a session is logged as `session error` and ends the
    worker (the parent forks another when it needs one).
"""

from __future__ import annotations

import gc
import json
import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable

from qpy.common.log import clean, log, release
from qpy.common.log import name as logname
from qpy.common.pool import Pool, Worker
from qpy.common.privilege import set_title
from qpy.smtp import smtpd

POOL_MIN = 2                # workers kept even when there is no work
IDLE_EXIT = 60.0            # seconds an idle worker beyond POOL_MIN waits before it exits
END_WAIT = 0.002            # seconds to wait for a session to end before forking a worker
HANDOVER_TRIES = 3          # workers tried for one connection before giving up on it
KILL_GRACE = 5.0            # seconds between TERM and KILL at shutdown
HANDOVER_BYTES = 64 * 1024  # largest hand-over order
ORDERS_KEPT = 64            # parsed orders a worker keeps (one per listener and rule)
DONE = b"."                 # worker -> parent: the connection is over, give me the next
IDLE_TITLE = "qpy-smtpd idle"
SESSION_ENV = ("PROTO", "RELAYCLIENT", "QPY_LISTENER")   # set per connection (and TCP*)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)   # an int: IntFlag's & runs in Python


class Workers:
    """qpy-tcpserver's session workers, as its parent sees them."""

    def __init__(self, program: str, sel: selectors.BaseSelector, lookup_host: bool,
                 on_end: Callable[[str], None]):
        self.program = program
        self.lookup_host = lookup_host
        self.on_end = on_end            # a session of that client is over
        # a worker's pair on fd 3: fd 0 and 1 are its client's; fd 2 the log
        self.pool = Pool(sel, keep_stderr=True, channel_fd=3,
                         child_signals=(signal.SIGCHLD, signal.SIGHUP, signal.SIGINT,
                                        signal.SIGTERM))
        self.cfg: smtpd.Config | None = None
        self.limit = 40                 # sessions at once (maxsmtpd)
        self.sessions = 100             # sessions per worker (smtpdsessions)
        self.nbusy = 0                  # workers serving a session (w.job: its client)
        self.stopping = False

    def fork(self) -> Worker | None:
        assert self.cfg is not None
        self.cfg.refresh()                # a rebuilt recipient table: read once, here
        sw = SessionWorker(self.program, self.cfg, self.sessions, self.lookup_host)
        w = self.pool.fork(None, sw.run, setup=sw.setup)
        if w is not None:
            log("worker %d started" % (w.pid))
        return w

    def hand_over(self, fd: int, order: bytes, client: str) -> Worker | None:
        """Pass the connection fd to an idle (or new) worker; the worker, or None when
        none took it."""
        if len(order) > HANDOVER_BYTES:
            return None
        pool = self.pool
        for _ in range(HANDOVER_TRIES):
            if not pool.idle:
                self.collect(END_WAIT)
            w = pool.unpark(None) or self.fork()
            if w is None:
                return None
            try:
                socket.send_fds(w.sock, [order], [fd])
            except OSError as e:          # it died while idle: the next one
                log("worker %d: hand-over: %s" % (w.pid, e.strerror))
                self.retire(w)
                continue
            w.job = client                # busy: its client, for per_ip
            self.nbusy += 1
            return w
        return None

    def readable(self, w: Worker) -> None:
        """The worker's pair is readable: its session ended, or the worker did."""
        if self.pool.workers.get(w.pid) is not w:
            return                        # retired earlier in this same round of events
        try:
            data = w.sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                      # it ended (its last session, killed, crashed)
            self.retire(w)
            return
        if w.job is None:
            return                        # not after a session of ours: ignore it
        self._ended(w)
        if self.pool.stale(w) or self.stopping:
            self.retire(w)
        else:
            self.pool.park(w)

    def _ended(self, w: Worker) -> None:
        """w's session is over: the counts."""
        client, w.job = str(w.job), None
        self.nbusy -= 1
        self.on_end(client)

    def retire(self, w: Worker) -> None:
        """Close our end: an idle worker exits at once, a busy one after its session."""
        if w.job is not None:
            self._ended(w)
        self.pool.retire(w)

    def collect(self, wait: float) -> None:
        """Take in session ends before counting sessions or forking: a client that got
        its 221 often connects again before its worker has said it is free; waiting up
        to END_WAIT for that saves a needless fork (and a worker kept for IDLE_EXIT)."""
        busy = [w for w in self.pool.workers.values() if w.job is not None]
        if not busy:
            return
        poll = select.poll()
        for w in busy:
            poll.register(w.sock, select.POLLIN)
        if poll.poll(wait * 1000):
            for w in busy:
                self.readable(w)

    def tend(self) -> None:
        """Keep POOL_MIN workers of the current generation; let the oldest idle one
        beyond them go after IDLE_EXIT seconds without work."""
        pool = self.pool
        if len(pool) > POOL_MIN:
            due = pool.next_retirement(IDLE_EXIT)
            if due is not None and due <= time.monotonic():
                pool.retire_idle(IDLE_EXIT, most=1)
        current = sum(1 for w in pool.workers.values() if not pool.stale(w))
        while not self.stopping and current < min(POOL_MIN, self.limit - self.nbusy):
            w = self.fork()
            if w is None:
                break
            pool.park(w)
            current += 1

    def recycle(self) -> None:
        """Later sessions run in workers forked from now on (after a reload)."""
        self.pool.recycle()

    def reap(self) -> None:
        for w, status in self.pool.reap():
            self.retire(w)
            self.pool.forget(w)
            log("end %d status %d" % (w.pid, os.waitstatus_to_exitcode(status)))

    def shutdown(self, grace: float, other: Callable[[object], None]) -> None:
        """Let busy workers finish for up to grace seconds, then TERM, then KILL them.
        other(data) takes selector events that are not a worker's (the wakeup pipe)."""
        self.stopping = True
        pool = self.pool
        deadline = time.monotonic() + grace
        if self.nbusy:
            log("stopping; waiting for %d sessions" % (self.nbusy))
        for w in list(pool.workers.values()):
            if w.job is None:
                self.retire(w)
        killed = False
        while pool.all():
            self.reap()
            for key, _ in pool.sel.select(0.05):
                if isinstance(key.data, Worker):
                    self.readable(key.data)   # a session ended: that worker exits
                else:
                    other(key.data)
            if not pool.all():
                break
            if time.monotonic() > deadline:
                for w in pool.all():
                    pool.kill(w, signal.SIGKILL if killed else signal.SIGTERM)
                if killed:
                    deadline = time.monotonic() + 3600
                else:
                    killed, deadline = True, time.monotonic() + KILL_GRACE


class SessionWorker:
    """One worker's settings, as they were in the parent at its fork."""

    def __init__(self, program: str, cfg: smtpd.Config, sessions: int, lookup_host: bool):
        self.program = program
        self.cfg = cfg
        self.sessions = sessions
        self.lookup_host = lookup_host
        self.base: dict[str, str] = {}
        self.null = -1
        self.orders: dict[bytes, tuple[str, dict[str, str]]] = {}   # order -> parsed

    def setup(self) -> None:
        """In the new worker, before the pool closes the parent's descriptors: its
        signals, its title, the environment to copy for each session; its log lines
        written at once (the parent's held ones are the parent's to write)."""
        release()
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        set_title(IDLE_TITLE)
        self.base = {name: value for name, value in os.environ.items()
                     if not name.startswith("TCP") and name not in SESSION_ENV}

    def run(self, chan: socket.socket) -> int:
        """Serve connections handed over on chan (fd 3) until the last one or end of file."""
        try:
            self.null = os.open(os.devnull, os.O_RDWR)
            gc.freeze()                   # the parent's objects: never scanned, never copied
            for served in range(1, self.sessions + 1):
                got = _receive(chan)
                if got is None:
                    break
                self.serve(*got)
                if served < self.sessions:
                    try:
                        chan.send(DONE)
                    except OSError:   # the parent closed our pair (SIGTERM, SIGHUP)
                        break
        except BaseException as e:  # logged here: the pool would exit 111 without a word
            if not isinstance(e, SystemExit):
                log("session error: %s" % (clean(repr(e))))
        return 0

    def serve(self, fd: int, order: bytes) -> None:
        """One connection: a fresh environment, fd 0/1, qpy-smtpd's session, clean-up."""
        try:
            head, _, body = order.partition(b"\n")
            family, ip, port = head.decode().split(" ")
            # TCP, of the family the parent says: no probe of the descriptor
            conn = socket.socket(int(family), socket.SOCK_STREAM, socket.IPPROTO_TCP,
                                 fileno=fd)
        except (ValueError, OSError):
            os.close(fd)
            return
        try:
            got = self.orders.get(body)
            if got is None:               # the same few orders again and again: parsed once
                parsed = json.loads(body)
                got = (str(parsed["listener"]),
                       {str(k): str(v) for k, v in parsed["env"].items()})
                if len(self.orders) < ORDERS_KEPT:
                    self.orders[body] = got
            profile, rule_env = got
            local = conn.getsockname()
        except (ValueError, KeyError, AttributeError, OSError):   # gone before we looked
            conn.close()
            return
        try:
            # the session's environment: a fresh dict each time, so nothing of the last
            # client's stays; the process's own (putenv, unsetenv per name) is never
            # changed: the session starts no program that would inherit it
            env = dict(self.base)
            env.update(PROTO="TCP", TCPLOCALIP=local[0], TCPLOCALPORT=str(local[1]),
                       TCPREMOTEIP=ip, TCPREMOTEPORT=port,
                       QPY_LISTENER=profile)
            if self.lookup_host:
                try:
                    env["TCPREMOTEHOST"] = socket.gethostbyaddr(ip)[0].lower()
                except OSError:
                    pass
            env.update(rule_env)
            # replies go out in one write per batch already; do not let Nagle hold them
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            smtpd.serve(self.cfg, env, greeted=lambda: self.greeted(ip))
        finally:
            try:                          # the end for the client, whatever still holds a dup
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
            os.dup2(self.null, 0)
            os.dup2(self.null, 1)
            set_title(IDLE_TITLE)
            logname(self.program)

    def greeted(self, ip: str) -> None:
        """After the 220, before the first command: the title, and a rebuilt recipient
        table picked up (a stat; it is first needed at RCPT)."""
        set_title("qpy-smtpd %s" % ip)
        self.cfg.refresh()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _receive(chan: socket.socket) -> tuple[int, bytes] | None:
    """The next connection's descriptor and its order; None when the parent closed our
    pair."""
    msg, fds, flags, _ = socket.recv_fds(chan, HANDOVER_BYTES, 1)
    if not msg or len(fds) != 1 or flags & _TRUNCATED:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0], msg
