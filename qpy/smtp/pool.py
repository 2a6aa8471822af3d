"""pool — qpy-tcpserver's pre-forked workers: fork, hand over, idle, retire, reap.

Not a program: the machinery under qpy-tcpserver, kept apart from its policy
(listeners, rules, the per-address and global caps, the ucspi-tcp environment)
so that it can become the one worker pool of qpy.common.

The parent owns a Pool. `hand_over(conn, order)` passes an accepted socket to
an idle worker (or one forked for it) over that worker's Unix socketpair
(SCM_RIGHTS, with `order`: bytes the worker's `serve` gets); a worker writes
DONE back when the connection is over, and the parent counts it idle again
(`on_end` is told, for the caller's accounting). Because the parent alone
hands out connections, it knows at every moment exactly how many run.

Lifetimes: `minimum` workers are kept forked ahead; idle ones beyond that exit
one by one after IDLE_EXIT seconds without work; a worker exits after
`sessions` connections (1: a fresh process for every connection, as qmail);
`recycle()` (SIGHUP) retires the idle ones at once and the busy ones after
their connection, so later connections run in workers forked after it.

In a worker: signals reset (SIGTERM ends the process by SystemExit, SIGPIPE
ignored), every descriptor of the parent's closed (its `in_child` callback
closes the caller's own), then connections are served one at a time until the
parent closes the pair or the worker has served `sessions`. A worker never
returns into the parent's code: it ends with os._exit.
"""

from __future__ import annotations

import array
import gc
import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable

from qpy.common.log import clean, log

IDLE_EXIT = 60.0            # seconds an idle worker beyond the minimum waits before it exits
HANDOVER_BYTES = 64 * 1024  # largest hand-over order
END_WAIT = 0.002            # seconds to wait for a session to end before forking a worker
HANDOVER_TRIES = 3          # workers tried for one connection before giving up on it
KILL_GRACE = 5.0
DONE = b"."                 # worker -> parent: the connection is over, give me the next


class Worker:
    """The parent's view of one worker: its end of the socketpair and whether it serves."""

    def __init__(self, pid: int, chan: socket.socket, gen: int):
        self.pid = pid
        self.chan = chan
        self.gen = gen            # generation it was forked in (recycle(): +1)
        self.busy = False
        self.since = time.monotonic()
        self.client = ""          # the caller's accounting key while busy


class Pool:
    def __init__(self, program: str, sel: selectors.BaseSelector,
                 serve: Callable[[socket.socket, bytes], None],
                 before_fork: Callable[[], None], in_child: Callable[[], None]):
        self.program = program
        self.sel = sel
        self.serve = serve              # in a worker: one connection and its order
        self.before_fork = before_fork  # in the parent, before each fork
        self.in_child = in_child        # in a new worker: close the caller's descriptors
        self.on_end: Callable[[Worker], None] = lambda w: None
        self.children: set[int] = set()          # forked, not yet reaped
        self.workers: dict[int, Worker] = {}     # with an open socketpair
        self.idle: list[Worker] = []             # oldest first; the newest is used first
        self.nbusy = 0
        self.gen = 0
        self.minimum = 2
        self.limit = 40                          # busy workers at most
        self.sessions = 100                      # connections per worker
        self.stopping = False

    # -- in the parent -------------------------------------------------------------------
    def spawn(self, conn: socket.socket | None) -> Worker | None:
        """Fork one worker (conn: an accepted socket the child must not keep)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.before_fork()
        try:
            pid = os.fork()
        except OSError as e:
            mine.close()
            theirs.close()
            log("cannot fork a worker: %s" % (e.strerror))
            return None
        if pid == 0:
            mine.close()
            self._worker(theirs, conn)    # never returns
        theirs.close()
        w = Worker(pid, mine, self.gen)
        self.children.add(pid)
        self.workers[pid] = w
        self.sel.register(mine, selectors.EVENT_READ, w)
        log("worker %d started" % (pid))
        return w

    def _ended(self, w: Worker) -> None:
        w.busy = False
        self.nbusy -= 1
        self.on_end(w)
        w.client = ""

    def retire(self, w: Worker) -> None:
        """Close our end: an idle worker exits at once, a busy one after its session."""
        if self.workers.pop(w.pid, None) is None:
            return
        self.sel.unregister(w.chan)
        w.chan.close()
        if w.busy:
            self._ended(w)
        if w in self.idle:
            self.idle.remove(w)

    def readable(self, w: Worker) -> None:
        """The worker's pair is readable: its session ended, or the worker did."""
        if self.workers.get(w.pid) is not w:
            return                        # retired earlier in this same round of events
        try:
            data = w.chan.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:                      # it ended (its last session, killed, crashed)
            self.retire(w)
            return
        if not w.busy:
            return                        # not after a session of ours: ignore it
        self._ended(w)
        if w.gen != self.gen or self.stopping:
            self.retire(w)
        else:
            w.since = time.monotonic()
            self.idle.append(w)

    def collect(self, wait: float) -> None:
        """Take in session ends before counting sessions or forking: a client that got
        its 221 often connects again before its worker has said it is free; waiting up
        to END_WAIT for that saves a needless fork (and a worker kept for IDLE_EXIT)."""
        busy = [w for w in self.workers.values() if w.busy]
        if not busy:
            return
        poll = select.poll()
        for w in busy:
            poll.register(w.chan, select.POLLIN)
        if poll.poll(wait * 1000):
            for w in busy:
                self.readable(w)

    def tend(self) -> None:
        """Keep `minimum` workers of the current generation; let the oldest idle one
        beyond them go after IDLE_EXIT seconds without work."""
        now = time.monotonic()
        if len(self.workers) > self.minimum and self.idle and \
                now - self.idle[0].since > IDLE_EXIT:
            self.retire(self.idle[0])
        current = sum(1 for w in self.workers.values() if w.gen == self.gen)
        while not self.stopping and current < min(self.minimum, self.limit - self.nbusy):
            w = self.spawn(None)
            if w is None:
                break
            self.idle.append(w)
            current += 1

    def recycle(self) -> None:
        """Later connections run in workers forked from now on (after a reload)."""
        self.gen += 1
        for w in list(self.idle):
            self.retire(w)

    def hand_over(self, conn: socket.socket, order: bytes, client: str) -> Worker | None:
        """Pass conn to an idle (or new) worker; the worker, or None when none took it."""
        if len(order) > HANDOVER_BYTES:
            return None
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        for _ in range(HANDOVER_TRIES):
            if not self.idle:
                self.collect(END_WAIT)
            w = self.idle.pop() if self.idle else self.spawn(conn)
            if w is None:
                return None
            try:
                w.chan.sendmsg([order], fds)
            except OSError as e:          # it died while idle: the next one
                log("worker %d: hand-over: %s" % (w.pid, e.strerror))
                self.retire(w)
                continue
            w.busy = True
            w.client = client
            self.nbusy += 1
            return w
        return None

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                log("end %d status %d" % (pid,
                                              os.waitstatus_to_exitcode(status)))
            w = self.workers.get(pid)
            if w is not None:
                self.retire(w)

    def shutdown(self, grace: float, other: Callable[[object], None]) -> None:
        """Let busy workers finish for up to grace seconds, then TERM, then KILL them.
        other(data) takes selector events that are not a worker's (the wakeup pipe)."""
        self.stopping = True
        deadline = time.monotonic() + grace
        if self.nbusy:
            log("stopping; waiting for %d sessions" % (self.nbusy))
        for w in list(self.workers.values()):
            if not w.busy:
                self.retire(w)
        killed = False
        while self.children:
            self.reap()
            for key, _ in self.sel.select(0.05):
                if isinstance(key.data, Worker):
                    self.readable(key.data)   # a session ended: that worker exits
                else:
                    other(key.data)
            if not self.children:
                break
            if time.monotonic() > deadline:
                sig = signal.SIGKILL if killed else signal.SIGTERM
                for pid in list(self.children):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if killed:
                    deadline = time.monotonic() + 3600
                else:
                    killed, deadline = True, time.monotonic() + KILL_GRACE

    # -- in a worker -------------------------------------------------------------------
    def _worker(self, chan: socket.socket, conn: socket.socket | None) -> None:
        """The forked worker: serve connections handed over on chan, then exit."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            self.in_child()
            self.sel.close()
            for w in self.workers.values():
                w.chan.close()            # else a sibling never sees its EOF
            if conn is not None:
                conn.close()
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
        except BaseException as e:  # never let a worker return into the parent's loop
            if not isinstance(e, SystemExit):
                log("session error: %s" % (clean(repr(e))))
        finally:
            os._exit(0)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _receive(chan: socket.socket) -> tuple[socket.socket, bytes] | None:
    """The next connection and its order; None when the parent closed our pair."""
    fds = array.array("i")
    msg, ancillary, flags, _ = chan.recvmsg(HANDOVER_BYTES, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not msg or len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        return None
    return socket.socket(fileno=fds[0]), msg
