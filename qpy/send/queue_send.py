"""qpy-queue-send — the scheduler: preprocess new messages, run and retry deliveries, bounce.

SYNOPSIS
    qpy-queue-send      (started by qpy-start; QPY_ROOT names the root)

RUNS AS
    qpys. It can read `mess/` and `todo/` (group qpys) and remove `todo/` entries;
    it owns `state/` and `rm/`; it cannot remove `mess/` files (qpy-clean does) and
    it delivers nothing itself: qpy-lspawn and qpy-rspawn do.

FDS (wired by qpy-start)
    3  SOCK_SEQPACKET to qpy-lspawn: requests out, results in (qpy.common.spawn)
    4  SOCK_SEQPACKET to qpy-rspawn; when fd 4 is not a socket, remote mail waits
    5  requests to qpy-clean (`ID` LF);  6  its replies (`+`, `!reason`, `x`)
    2  the log, one line per event in qmail-log's words

READS
    `todo/ID` (named by qpy-pickup's hints, plus a listing at start, every 60 s and
    when a hint asks for one), `mess/ID` (opened read-only and
    passed to the spawner as an fd), `state/ID`, `rm/ID` (qpy-qrm's requests),
    control: locals, virtualdomains, percenthack, envnoathost (the routing of
    qpy.common.rewrite: docs/addresses.md), concurrencylocal, concurrencyremote,
    concurrencyperdomain (remote deliveries to one recipient domain at once;
    default 10),
    queuelifetime, bouncefrom, bouncehost, doublebounceto, doublebouncehost, me,
    delaywarning (hours, fractions allowed, after which a sender whose message is
    still deferred gets one warning, RFC 3464 Action: delayed; 0: none; default 4).

TRIGGER
    queue-send binds `queue/trigger/socket` (AF_UNIX SOCK_DGRAM, mode 0620 in the
    setgid directory qpys:qpyq 2750: only qpyq and root can send) before its first
    listing of todo/. qpy-pickup sends `N ID...` after each committed batch and `L`
    (list todo/) when an earlier hint could not go (qpy.common.trigger). A hint is
    trusted for nothing: a bounded read, each id checked as a name from a listing is,
    anything else ignored (logged once). When the socket cannot be bound, todo/ is
    watched by inotify instead.

WRITES
    `state/ID` (qpy.common.state), only for a message that outlives its first pass.
    A new message is delivered while todo/ID stays its durable record and its state
    lives in memory ("todo-backed"); a first pass that delivers every recipient
    writes nothing here, and qpy-clean removes mess/ID and todo/ID. The first result
    that must be durable (a deferral, a failure, a bounce, or a delivery that leaves
    other recipients to do) persists the message: state/ID is created with O_EXCL
    holding the head and a K for every recipient delivered so far, in one write and
    one fsync (no directory fsync: a torn or missing head is taken in again from
    todo/ID, which is unlinked only after that fsync). Then that result and every
    later one is appended as one fsync'd record, so a recipient marked done stays
    done across any crash. Bounces go in through `queue/drop/` (qpy.inject.drop)
    with sender <>.

CRASH SAFETY
    A todo-backed message still in memory when queue-send exits (a crash, or SIGTERM
    before its deliveries ran or reported) keeps its todo/ID: the next start takes it
    in again (a second `new msg` line) and delivers it again, at least once. A
    recipient already delivered gets a duplicate only when the exit fell after its
    delivery and before its K was durable; for a K that finished a todo-backed
    message, that is before the clean-up. qpy-clean removes mess/ID before todo/ID;
    a todo/ID without its mess/ID is a message finished before a crash, which
    preprocess removes with a warning. The clean-up's unlinks are not fsync'd: a
    power cut (not a process crash) within the filesystem's commit interval after it
    can bring todo/ID and mess/ID back, and the message is delivered again.

VERP
    A sender of the form `pre@host-@[]` (qmail's VERP, sent by ezmlm and other
    list managers; qpy-sendmail -f and qpy-queue-inject take it) is rewritten per
    recipient `box@dom` to `pre` `box` `=` `dom` `@host` (qpy.common.address.verp),
    so each recipient's delivery, local or remote, goes alone with its own return
    path, never grouped with others of its domain. A failed recipient's bounce
    goes to its own return path, one bounce per recipient; a delay warning to
    the return path of the first recipient delayed.

RECIPIENTS
    Each recipient is routed once, when its message is taken in, by
    qpy.common.rewrite (the code qpy-smtpd's RCPT check uses, so both agree):
    the local part in canonical form, `@envnoathost` added to a bare local part,
    the percent hack for domains in percenthack (`joe%host@gw` is `joe@host`),
    then a domain in locals is local, a virtualdomains hit (`user@domain`, the
    domain, each `.suffix`, then `:prepend`) is local as `prepend-ADDRESS`
    unless its prepend is empty, and the rest is remote (docs/addresses.md).
    A virtualdomains key may hold colons: lines split at the last one.

SCHEDULING
    Every loop pass preprocesses at most TODO_BATCH new messages, reads every result
    that is ready and starts what the concurrency limits allow, so neither a flood
    of new mail nor a backlog of deliveries stalls the other. A temporary failure is
    retried on qmail's schedule: next = birth + (floor(sqrt(age)) + c)^2 with c = 10
    (local) or 20 (remote). At most concurrencyperdomain remote deliveries to one
    recipient domain run at once; a due recipient over it waits aside until one
    of them reports (qmail has no such limit; Postfix's is 20). Past
    queuelifetime a message gets one more attempt; a temporary failure then
    becomes permanent, mess/ID that cannot be opened
    included (the bounce then quotes nothing; for a bounce it is the double bounce
    to doublebounceto). One bounce per message and failure batch, sent when no
    delivery of the message is in flight or untried. A `queue/rm/.tmp.*` older
    than 5 s is a qpy-qrm killed while writing its request: removed.

SIGNALS
    ALRM: everything due now, and queue/rm/ is read.  HUP: control files re-read.
    USR1: a status line.  TERM: no new deliveries; those in flight are waited for
    (at most TERM_WAIT seconds); exit 0. An unreported delivery is simply retried.

EXIT CODES
    0 after SIGTERM; 111 on a lost spawner or qpy-clean connection, or a root that
    cannot be used.
"""

from __future__ import annotations

import errno
import heapq
import os
import signal
import socket
import stat
import sys
import time

from qpy.common.cleanreq import CleanLost
from qpy.common.control import Control
from qpy.common.log import flush, hold, log
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, root_from
from qpy.common.rewrite import Rewrite
from qpy.common.state import LOCAL, PENDING, REMOTE
from qpy.common.trigger import listen
from qpy.common.wakeup import Wakeup
from qpy.common.watch import Watcher
from qpy.send.deliver import Deliveries, Lost
from qpy.send.finish import CLEAN_R, CLEAN_W, Finishing
from qpy.send.intake import Intake

PROGRAM = "qpy-queue-send"
LOCAL_FD, REMOTE_FD = 3, 4
TODO_BATCH = 16             # new messages preprocessed per loop pass, at most
RM_CHECK_SECONDS = 5.0      # queue/rm/ is also read on every SIGALRM
TERM_WAIT = 60.0            # seconds in-flight deliveries get after SIGTERM
MAX_IDLE = 30.0             # longest sleep of the loop
DELAY_WARNING = 4.0         # hours, when control/delaywarning is unusable
RM_DIR = "rm"


def is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def delay_hours(text: str) -> float:
    """control/delaywarning as hours: a number from 0 (no warnings) up, else 4."""
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not 0 <= hours < 1e6:        # also NaN
        log("warning: control/delaywarning %r is not a number of hours: 4 is used"
            % text[:40])
        return DELAY_WARNING
    return hours


class QueueSend(Intake, Deliveries, Finishing):
    """The loop: new messages in (Intake), deliveries out to the spawners and their
    results back (Deliveries), the end of each message (Finishing), signals."""

    def __init__(self, root: str):
        self.root = root
        self.paths = Paths(root)
        self.rmdir = os.path.join(self.paths.queue, RM_DIR)
        self.ctl = Control(root)
        self.init_intake()
        self.init_finishing()
        self.next_rm = 0.0
        self.term_deadline = 0.0
        self.init_deliveries({LOCAL: self._sock(LOCAL_FD), REMOTE: self._sock(REMOTE_FD)})
        self.reload()

    # --- set-up -------------------------------------------------------------------
    @staticmethod
    def _sock(fd: int) -> socket.socket | None:
        """The spawner socket on fd, or None (qpy-start puts /dev/null there when the
        spawner is not installed)."""
        return socket.socket(fileno=fd) if is_socket(fd) else None

    def reload(self) -> None:
        self.ctl.reload()
        c = self.ctl
        self.rewrite = Rewrite.from_control(c)   # locals, virtualdomains, percenthack
        self.conc = {LOCAL: c.integer("concurrencylocal"),
                     REMOTE: c.integer("concurrencyremote")}
        self.conc_domain = max(1, c.integer("concurrencyperdomain"))
        self.lifetime = c.integer("queuelifetime")
        self.delaywarning = delay_hours(c.line("delaywarning"))
        me = c.line("me")
        self.bouncehost = c.line("bouncehost") or me
        self.bouncefrom = "%s@%s" % (c.line("bouncefrom"), self.bouncehost)
        dbt = c.line("doublebounceto")
        self.doublebounce = (dbt if "@" in dbt else "%s@%s" % (
            dbt, c.line("doublebouncehost") or me)).encode()

    # --- the loop -----------------------------------------------------------------
    def retry_all(self) -> None:
        for channel in (LOCAL, REMOTE):
            self.heaps[channel] = []
        self.held.clear()           # each pending recipient is pushed again below
        self.freed.clear()
        for msgid, m in self.msgs.items():
            for i, r in enumerate(m.st.recipients):
                if r.state in PENDING:
                    r.next_try = 0
                    heapq.heappush(self.heaps[r.channel], (0, msgid, i))
        self.retry_failed(float("inf"))     # failed bounces and clean-ups: now

    def handle_signals(self, flags: list[int]) -> None:
        if signal.SIGHUP in flags:
            self.reload()
            log("info: control files re-read")
        if signal.SIGALRM in flags:
            self.retry_all()
            self.next_rm = 0.0
        if signal.SIGUSR1 in flags:
            self.status()
            log("info: %d messages queued, %d new in todo" % (len(self.msgs), len(self.todo)))
        if signal.SIGTERM in flags and not self.term_deadline:
            self.term_deadline = time.monotonic() + TERM_WAIT
            self.status()

    def run(self, sigs: Wakeup) -> int:
        # qpy-pickup, the one writer of todo/ID, sends their names (qpy.common.trigger),
        # so no inotify watch reads todo/ (pyinotify: ~50 us a message); bound before
        # the first listing, so a name renamed in after it comes as a hint
        hints = listen(self.root)
        watcher = Watcher([] if hints else [self.paths.todo], hints=hints)
        self.load()
        fds = {sigs.fd: None}
        for channel, s in self.socks.items():
            if s is not None:
                fds[s.fileno()] = channel
        ready = [sigs.fd]
        while True:
            self.handle_signals(sigs.take_if(sigs.fd in ready))
            if self.term_deadline:
                if not self.deliveries or time.monotonic() >= self.term_deadline:
                    log("status: exiting")
                    return 0
            now = time.time()
            if not self.term_deadline:
                if now >= self.next_rm:
                    self.next_rm = now + RM_CHECK_SECONDS
                    self.check_rm()
                if watcher.rescan_due():
                    self.scan_todo()
                # new todo/ID by name from the trigger: no listing of todo/, which
                # holds every message in its first pass (hundreds under load)
                for name in watcher.names():
                    self.note_todo(name)
                for _ in range(min(TODO_BATCH, len(self.todo))):
                    self.preprocess(self.todo.popleft())
                self.retry_failed(now)
                self.start_deliveries(int(now))
            timeout = self._timeout(now)
            flush()     # this pass's log lines, in one write, before we sleep
            ready = watcher.wait(timeout, tuple(fds))
            for fd in ready:
                if fd != sigs.fd:
                    self.read_results(fds[fd])

    def _timeout(self, now: float) -> float:
        if self.todo:
            return 0.0
        t = MAX_IDLE
        if self.term_deadline:
            return min(1.0, t)
        for channel in (LOCAL, REMOTE):
            heap = self.heaps[channel]
            if heap and self.busy[channel] < self.conc[channel]:
                t = min(t, heap[0][0] - now)
        for msgid in self.retrying:
            t = min(t, self.msgs[msgid].retry_at - now)
        t = min(t, self.next_rm - now)
        return max(0.0, t)


def main() -> int:
    root = root_from()
    preamble(PROGRAM, root, "qpys")
    paths = Paths(root)
    try:
        os.chdir(paths.queue)
        os.makedirs(os.path.join(paths.queue, RM_DIR), mode=0o700, exist_ok=True)
    except OSError as e:
        log("alert: cannot start: %s: %s" % (paths.queue, e.strerror))
        return 111
    for fd in (CLEAN_W, CLEAN_R):
        try:
            os.fstat(fd)
        except OSError:
            log("alert: cannot start: no qpy-clean connection on fd %d" % fd)
            return 111
    if not is_socket(LOCAL_FD):
        log("alert: cannot start: hath the daemon spawn no fire? (no socket on fd %d)"
            % LOCAL_FD)
        return 111
    # qpy-start execs us with these blocked, so that none kills us before this point
    sigs = Wakeup((signal.SIGALRM, signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM),
                  unblock=True)
    qs = QueueSend(root)
    if qs.socks[REMOTE] is None:
        log("warning: no qpy-rspawn connection: remote mail waits in the queue")
    try:
        hold()
        return qs.run(sigs)
    except (Lost, CleanLost) as e:
        log("alert: oh no! %s! dying..." % e)
        return 111
    except OSError as e:
        if e.errno == errno.ENOSPC:
            log("alert: disk full: %s" % e)
        else:
            log("alert: %s" % e)
        return 111
    finally:
        flush()


if __name__ == "__main__":
    sys.exit(main())
