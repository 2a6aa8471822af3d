"""pool — forked workers on socket pairs: the machinery every spawner of qpy shares.

As qmail's spawn.c owns the loop and qmail-lspawn and qmail-rspawn supply only
their policy, this module forks, tracks and reaps workers for qpy-lspawn,
qpy-rspawn and qpy-tcpserver; each decides who a worker is for (its key), what
it does (the child function) and when it has done enough.

    fork(key, serve)    a SOCK_SEQPACKET pair and a fork. In the child: signals
                        back to their defaults, the spawner's setup, then every
                        descriptor of the parent closed but the worker's end of
                        the pair: on fd 0 (fd 1 /dev/null), or with channel_fd=3
                        on fd 3 (fd 0 and 1 /dev/null: qpy-tcpserver puts a
                        client there); fd 2 the log, or /dev/null. Then
                        serve(that socket) and _exit with its code; it never
                        returns into the parent's loop.
    park(w) / unpark    an idle worker, kept by key for the next job (the one
                        idle last is used first: its pages are the warm ones)
    retire(w)           no more work: our end closed, so it reads end of file
                        and exits; reap() collects it
    retire_idle(age)    every idle worker unused for age seconds
    recycle()           new settings: idle workers retired now; stale(w) tells
                        the spawner a busy one is to be retired after its job
    reap()              the workers that exited, with their wait status

A job that carries a descriptor (a message file, a client's connection) goes
to a worker as one datagram with it: socket.send_fds, socket.recv_fds.

In the child the parent's selector is closed and its own sockets (the pairs,
and what the spawner lists in `detach`: its request socket, its listeners) are
detached before its descriptors are closed, so that no Python object there
closes a descriptor number the worker reuses (for a message, or a client).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from qpy.common import children
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import log


class Worker:
    """A forked worker; `job` and the rest are its spawner's to use."""

    def __init__(self, pid: int, key: Hashable, sock: socket.socket):
        self.pid = pid
        self.key = key                  # who it serves (the spawner's identity key)
        self.sock = sock                # our end of its SOCK_SEQPACKET pair
        self.served = 0
        self.idle_since = 0.0
        self.gen = 0                    # Pool.gen at its fork: recycle() makes it stale
        self.job: object = None         # the spawner's record of the work in flight


W = TypeVar("W", bound=Worker)


class Pool:
    def __init__(self, sel: selectors.BaseSelector, keep_stderr: bool = True,
                 child_signals: Iterable[int] = (signal.SIGCHLD, signal.SIGTERM,
                                                 signal.SIGHUP, signal.SIGPIPE),
                 channel_fd: int = 0):
        if channel_fd not in (0, 3):
            raise ValueError("a worker's socket goes on fd 0 or fd 3")
        self.sel = sel                  # a worker's socket is registered with it as data=w
        self.keep_stderr = keep_stderr
        self.child_signals = tuple(child_signals)
        self.channel_fd = channel_fd
        self.gen = 0
        self.workers: dict[int, Worker] = {}    # by pid: live, given work
        self.leaving: dict[int, Worker] = {}    # retired, not reaped yet
        self.idle: dict[Hashable, list[Worker]] = {}     # by key, oldest first
        self.detach: list[socket.socket] = []   # the parent's sockets, detached in a child

    def __len__(self) -> int:
        return len(self.workers)

    def fork(self, key: Hashable, serve: Callable[[socket.socket], int],
             setup: Callable[[], None] | None = None,
             make: Callable[[int, Hashable, socket.socket], W] = Worker) -> W | None:
        """A new worker for key, or None when no pair or no fork could be had.
        setup runs in the child before its descriptors are cleaned (e.g. setsid);
        make builds the parent's record of it (a spawner's subclass of Worker)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            log("warning: cannot make a socket pair for a worker: %s" % e.strerror)
            return None
        try:
            pid = os.fork()
        except OSError as e:
            log("warning: cannot fork a worker: %s" % e.strerror)
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            self._child(ours, theirs, serve, setup)      # never returns
        theirs.close()
        w = make(pid, key, ours)
        w.gen = self.gen
        self.workers[pid] = w
        self.sel.register(ours, selectors.EVENT_READ, w)
        return w

    def _child(self, ours: socket.socket, theirs: socket.socket,
               serve: Callable[[socket.socket], int], setup: Callable[[], None] | None) -> None:
        code = EXIT_TEMP
        try:
            signal.set_wakeup_fd(-1)
            for sig in self.child_signals:
                signal.signal(sig, signal.SIG_DFL)
            if setup is not None:
                setup()
            # no Python object may close an fd number the worker reuses for a message
            self.sel.close()                # the parent's: a worker has its own loop
            for s in [ours, *self.detach, *(w.sock for w in self.workers.values()),
                      *(w.sock for w in self.leaving.values())]:
                if s.fileno() >= 0:
                    s.detach()
            chan = self.channel_fd
            os.dup2(theirs.detach(), chan)  # also closes whatever was there
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1) if chan else (1,):
                os.dup2(null, fd)
            if not self.keep_stderr:
                os.dup2(null, 2)
            top = os.sysconf("SC_OPEN_MAX")
            os.closerange(3, chan)          # other messages' or clients' fds, the rest
            os.closerange(max(3, chan + 1), top if top > 0 else 65536)
            code = serve(socket.socket(fileno=chan))
        except BaseException:   # never return into the parent's loop
            code = EXIT_TEMP
        finally:
            os._exit(code)

    # ---- idle workers -----------------------------------------------------------------
    def park(self, w: Worker) -> None:
        w.idle_since = time.monotonic()
        self.idle.setdefault(w.key, []).append(w)

    def unpark(self, key: Hashable, test: Callable[[Worker], bool] | None = None
               ) -> Worker | None:
        """The idle worker of key that became idle last (and passes test), taken."""
        if test is None:                # the common case, once per job: no scan
            ws = self.idle.get(key)
            if not ws:
                return None
            w = ws.pop()
            if not ws:
                del self.idle[key]
            return w
        for w in reversed(self.idle.get(key, ())):
            if test is None or test(w):
                self.take(w)
                return w
        return None

    def take(self, w: Worker) -> None:
        """An idle worker taken for a job."""
        ws = self.idle[w.key]
        ws.remove(w)
        if not ws:
            del self.idle[w.key]

    def idle_workers(self) -> list[Worker]:
        """Every idle worker, the one unused the longest first."""
        return sorted((w for ws in self.idle.values() for w in ws),
                      key=lambda w: w.idle_since)

    def next_retirement(self, idle_seconds: float) -> float | None:
        """When the first idle worker is due for retirement (monotonic), or None."""
        times = [ws[0].idle_since for ws in self.idle.values() if ws]
        return min(times) + idle_seconds if times else None

    def retire_idle(self, older_than: float, most: int | None = None,
                    retire: Callable[[Worker], None] | None = None) -> None:
        """Retire idle workers unused for older_than seconds (at most `most`), through
        the spawner's retire when given (it may take a last answer first)."""
        now = time.monotonic()
        first = self.next_retirement(older_than)
        if first is None or first > now:
            return              # the common case, once per loop turn: no sort
        old = [w for w in self.idle_workers() if now - w.idle_since >= older_than]
        for w in old[:most]:
            (retire or self.retire)(w)

    def recycle(self) -> None:
        """New settings: idle workers go now; a busy one is stale(), to be retired by
        its spawner after its job, so that every later job runs in a worker forked
        after this call."""
        self.gen += 1
        for w in self.idle_workers():
            self.retire(w)

    def stale(self, w: Worker) -> bool:
        return w.gen != self.gen

    # ---- the end of a worker -------------------------------------------------------------
    def retire(self, w: Worker) -> None:
        """No more work for w: closing our end ends it (end of file); reap() collects it."""
        if w in self.idle.get(w.key, ()):
            self.take(w)
        if self.workers.pop(w.pid, None) is not None:
            self.leaving[w.pid] = w
        if w.sock.fileno() >= 0:
            self.sel.unregister(w.sock)
            w.sock.close()

    def kill(self, w: Worker, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(w.pid, sig)
        except OSError:
            pass

    def reap(self) -> list[tuple[Worker, int]]:
        """The workers that exited, with their wait status (their sockets still open
        when not retired yet: what they said before they went may be read). Other
        children (orphans of a subreaper) are collected and forgotten."""
        out = []
        for pid, status in children.exited():
            w = self.workers.pop(pid, None) or self.leaving.pop(pid, None)
            if w is not None:
                self.leaving[pid] = w       # retire() then moves nothing
                out.append((w, status))
        return out

    def forget(self, w: Worker) -> None:
        """A reaped worker, retired: gone from every table."""
        self.retire(w)
        self.leaving.pop(w.pid, None)

    def all(self) -> list[Worker]:
        return [*self.workers.values(), *self.leaving.values()]

