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
    `todo/ID` (inotify hints plus a periodic rescan), `mess/ID` (opened read-only and
    passed to the spawner as an fd), `state/ID`, `rm/ID` (qpy-qrm's requests),
    control: locals, virtualdomains, envnoathost, concurrencylocal, concurrencyremote,
    queuelifetime, bouncefrom, bouncehost, doublebounceto, doublebouncehost, me.

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

SCHEDULING
    Every loop pass preprocesses at most TODO_BATCH new messages, reads every result
    that is ready and starts what the concurrency limits allow, so neither a flood
    of new mail nor a backlog of deliveries stalls the other. A temporary failure is
    retried on qmail's schedule: next = birth + (floor(sqrt(age)) + c)^2 with c = 10
    (local) or 20 (remote). Past queuelifetime a message gets one more attempt;
    a temporary failure then becomes permanent. One bounce per message and failure
    batch, sent when no delivery of the message is in flight or untried.

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
import math
import os
import re
import select
import signal
import socket
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from qpy.common import address, envelope, spawn
from qpy.common.control import Control
from qpy.common.log import clean, flush, hold, log
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, is_id, root_from, todo_decode
from qpy.common.state import (
    LOCAL,
    REMOTE,
    MessageState,
    RecipientState,
    StateError,
    StateFile,
    read_state,
)
from qpy.common.watch import Watcher
from qpy.inject.drop import InjectError, inject
from qpy.send import bounce

PROGRAM = "qpy-queue-send"
LOCAL_FD, REMOTE_FD, CLEAN_W, CLEAN_R = 3, 4, 5, 6
TODO_BATCH = 16             # new messages preprocessed per loop pass, at most
MAX_TODO_BYTES = envelope.MAX_ENVELOPE + 100
RM_CHECK_SECONDS = 5.0      # queue/rm/ is also read on every SIGALRM
RETRY_LATER = 123           # a bounce or clean-up that failed is tried again after this
TERM_WAIT = 60.0            # seconds in-flight deliveries get after SIGTERM
MAX_IDLE = 30.0             # longest sleep of the loop
CHANSKIP = {LOCAL: 10, REMOTE: 20}
RM_DIR = "rm"
EXPIRED = "I'm not going to try again; this message has been in the queue too long."
NO_REMOTE = "qpy-rspawn is not running; remote delivery waits in the queue (#4.3.0)"
_QP = re.compile(rb"^Received: \(qpy (\d+) invoked")


class Lost(Exception):
    """A spawner or qpy-clean went away: exit so that qpy-start restarts the group."""


@dataclass
class Msg:
    st: MessageState
    sf: StateFile
    inflight: set[int] = field(default_factory=set)     # recipient indexes in flight
    removing: bool = False
    retry_at: float = 0.0          # when a failed bounce or clean-up is tried again

    @property
    def backed_by_todo(self) -> bool:
        """No state/ID yet: todo/ID is the message's only durable record, and its
        recipients are waiting or done in memory only (see WRITES)."""
        return not self.sf.exists


@dataclass
class Delivery:
    msgid: str
    channel: str
    indexes: list[int]
    dying: bool


def next_try(birth: int, now: int, channel: str, lifetime: int) -> int:
    """qmail's chrysanthemum schedule, with the last try at the end of the lifetime."""
    age = max(0, now - birth)
    nxt = birth + (math.isqrt(age) + CHANSKIP[channel]) ** 2
    end = birth + lifetime
    if now < end < nxt:
        nxt = end
    return nxt


def classify(rcpt: bytes, locals_: set[bytes], vdoms: dict[bytes, bytes],
             noathost: bytes) -> tuple[str, bytes]:
    """(channel, delivery address) by qmail-send's rules (locals, then virtualdomains)."""
    local, domain = address.split(rcpt)
    if not domain:
        rcpt, domain = rcpt + b"@" + noathost, noathost
    if domain.lower() in locals_:
        return LOCAL, rcpt
    low = rcpt.lower()
    at = len(local)
    keys = [low, low[at + 1:]]
    keys += [low[i:] for i in range(at + 1, len(low)) if low[i:i + 1] == b"."]
    keys.append(b"")
    for k in keys:
        if k in vdoms:
            prepend = vdoms[k]
            if not prepend:
                return REMOTE, rcpt
            return LOCAL, prepend + b"-" + rcpt
    return REMOTE, rcpt


def is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class QueueSend:
    def __init__(self, root: str):
        self.root = root
        self.paths = Paths(root)
        self.rmdir = os.path.join(self.paths.queue, RM_DIR)
        self.ctl = Control(root)
        self.msgs: dict[str, Msg] = {}
        self.heaps: dict[str, list[tuple[int, str, int]]] = {LOCAL: [], REMOTE: []}
        self.busy = {LOCAL: 0, REMOTE: 0}
        self.deliveries: dict[int, Delivery] = {}
        self.dnum = 0
        self.todo: deque[str] = deque()
        self.todo_known: set[str] = set()
        self.retrying: set[str] = set()     # messages whose bounce or clean-up failed
        self.bad_todo: set[str] = set()
        self.flags: set[int] = set()
        self.next_rm = 0.0
        self.term_deadline = 0.0
        self.socks: dict[str, socket.socket | None] = {LOCAL: self._sock(LOCAL_FD),
                                                       REMOTE: self._sock(REMOTE_FD)}
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
        self.locals = {d.lower().encode() for d in c.lines("locals")}
        self.vdoms: dict[bytes, bytes] = {}
        for line in c.lines("virtualdomains"):
            key, sep, prepend = line.rpartition(":")
            if sep and key.lower().encode() not in self.vdoms:
                self.vdoms[key.lower().encode()] = prepend.encode()
        self.noathost = c.line("envnoathost").encode()
        self.conc = {LOCAL: c.integer("concurrencylocal"),
                     REMOTE: c.integer("concurrencyremote")}
        self.lifetime = c.integer("queuelifetime")
        me = c.line("me")
        self.bouncehost = c.line("bouncehost") or me
        self.bouncefrom = "%s@%s" % (c.line("bouncefrom"), self.bouncehost)
        dbt = c.line("doublebounceto")
        self.doublebounce = (dbt if "@" in dbt else "%s@%s" % (
            dbt, c.line("doublebouncehost") or me)).encode()

    def load(self) -> None:
        """Read every state file: the queue as the last run left it."""
        for name in sorted(os.listdir(self.paths.state)):
            if not is_id(name):
                continue
            sf = StateFile(self.paths.state, name)
            try:
                sf.repair()
                st = read_state(sf.path)
            except StateError as e:
                if self._torn_head(sf, e):
                    continue
                log("warning: unable to read state/%s: %s" % (name, clean(str(e))))
                continue
            except OSError as e:
                log("warning: unable to read state/%s: %s" % (name, clean(str(e))))
                continue
            self.msgs[name] = m = Msg(st, sf)
            for i, r in enumerate(st.recipients):
                if r.state in ("waiting", "deferred"):
                    heapq.heappush(self.heaps[r.channel], (r.next_try, name, i))
            self.settle(m)

    def _torn_head(self, sf: StateFile, e: Exception) -> bool:
        """A crash tore the head of state/ID while todo/ID still holds the message:
        remove the state file, so that preprocess takes the message in again."""
        if not os.path.lexists(os.path.join(self.paths.todo, sf.msgid)):
            return False        # todo/ID goes only after the head is durable: not torn
        log("warning: state/%s torn (%s): rebuilding it from todo/%s"
            % (sf.msgid, clean(str(e)), sf.msgid))
        sf.remove()
        return True

    def _replaceable(self, sf: StateFile) -> bool:
        """A state/ID that load() could not use is replaced only when its head is torn."""
        try:
            read_state(sf.path)
        except StateError as e:
            return self._torn_head(sf, e)
        except OSError:
            pass
        return False

    # --- preprocessing ------------------------------------------------------------
    def scan_todo(self) -> None:
        try:
            names = os.listdir(self.paths.todo)
        except OSError as e:
            log("alert: unable to opendir todo: %s" % e.strerror)
            return
        for name in sorted(names):
            self.note_todo(name)

    def note_todo(self, name: str) -> None:
        """Queue todo/NAME for preprocessing, unless it is not new."""
        if is_id(name) and name not in self.todo_known and name not in self.bad_todo:
            m = self.msgs.get(name)
            if m is not None and m.backed_by_todo:
                return          # taken in already: todo/ID is its durable record
            self.todo_known.add(name)
            self.todo.append(name)

    def _qp(self, msgid: str) -> int | None:
        """The qp of mess/ID's Received: line (0 when unknown); None: no mess/ID."""
        try:
            with open(os.path.join(self.paths.mess, msgid), "rb") as f:
                m = _QP.match(f.read(200))
        except FileNotFoundError:
            return None
        except OSError:
            return 0
        return int(m.group(1)) if m else 0

    def preprocess(self, msgid: str) -> None:
        self.todo_known.discard(msgid)
        todo_path = os.path.join(self.paths.todo, msgid)
        known = self.msgs.get(msgid)
        if known is not None:
            if not known.backed_by_todo:    # state written before a crash: todo is stale
                self._unlink(todo_path)
            return
        try:
            fd = os.open(todo_path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_TODO_BYTES + 1)
            if len(data) > MAX_TODO_BYTES:
                raise ValueError("todo file too large")
            arrival, uid, size, env = todo_decode(data)
            sender, rcpts = envelope.decode(env)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log("warning: unable to use todo/%s: %s" % (msgid, clean(str(e))))
            self.bad_todo.add(msgid)
            return
        qp = self._qp(msgid)
        if qp is None:
            # qpy-clean removes mess/ID before todo/ID: a crash came between the two
            log("warning: todo/%s has no mess/%s: finished before a crash; removing it"
                % (msgid, msgid))
            self._unlink(todo_path)     # not fsync'd: if it comes back, this runs again
            return
        # no state/ID now: todo/ID stays the durable record until persist() writes one
        sf = StateFile(self.paths.state, msgid, exists=False)
        if os.path.lexists(sf.path) and not self._replaceable(sf):
            log("warning: unable to take in todo/%s: state/%s exists and is unusable"
                % (msgid, msgid))
            return                      # todo/ID stays; the next rescan tries again
        log("new msg %s" % msgid)
        log("info msg %s: bytes %d from <%s> qp %d uid %d" % (msgid, size, clean(sender),
                                                              qp, uid))
        st = MessageState(msgid, arrival, size, uid, qp, sender)
        for r in rcpts:
            channel, daddr = classify(r, self.locals, self.vdoms, self.noathost)
            st.recipients.append(RecipientState(r, channel, daddr))
        self.msgs[msgid] = m = Msg(st, sf)
        for i, r in enumerate(st.recipients):
            heapq.heappush(self.heaps[r.channel], (0, msgid, i))
        self.settle(m)

    def persist(self, m: Msg) -> None:
        """Give a todo-backed message its state/ID, before a record that must be
        durable: the head and a K for each recipient done so far (a todo-backed
        message has no other state in memory), one write and one fsync; only then
        todo/ID goes. Nothing to do when state/ID exists. An OSError ends queue-send
        (111) as a failed append does; todo/ID still holds the message then."""
        if not m.backed_by_todo:
            return
        done = [i for i, r in enumerate(m.st.recipients) if r.state == "done"]
        m.sf.create(m.st, done)     # durable (one fsync) before todo/ID goes
        self._unlink(os.path.join(self.paths.todo, m.st.id))

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log("warning: unable to unlink %s: %s" % (path, e.strerror))

    # --- deliveries ---------------------------------------------------------------
    def status(self) -> None:
        log("status: local %d/%d remote %d/%d%s" % (
            self.busy[LOCAL], self.conc[LOCAL], self.busy[REMOTE], self.conc[REMOTE],
            " exitasap" if self.term_deadline else ""))

    def start_deliveries(self, now: int) -> None:
        for channel in (LOCAL, REMOTE):
            heap = self.heaps[channel]
            while heap and heap[0][0] <= now and self.busy[channel] < self.conc[channel]:
                _, msgid, i = heapq.heappop(heap)
                m = self.msgs.get(msgid)
                if m is None or m.removing or i in m.inflight:
                    continue
                r = m.st.recipients[i]
                if r.state not in ("waiting", "deferred") or r.next_try > now:
                    continue
                self.start(m, channel, i, now)

    def start(self, m: Msg, channel: str, i: int, now: int) -> None:
        st = m.st
        dying = now >= st.arrival + self.lifetime
        indexes = [i]
        if channel == REMOTE:   # one request per message and domain
            dom = address.domain_part(st.recipients[i].delivery_address).lower()
            for j, r in enumerate(st.recipients):
                if len(indexes) >= spawn.MAX_RCPTS:
                    break
                if j != i and r.channel == REMOTE and j not in m.inflight \
                        and r.state in ("waiting", "deferred") and r.next_try <= now \
                        and address.domain_part(r.delivery_address).lower() == dom:
                    indexes.append(j)
        sock = self.socks[channel]
        if sock is None:
            text = NO_REMOTE
            if dying:
                self.fail(m, indexes, text + " " + EXPIRED)
            else:
                nxt = next_try(st.arrival, now, channel, self.lifetime)
                for j in indexes:
                    self.defer(m, j, nxt, text)
            self.settle(m)
            return
        try:
            fd = os.open(os.path.join(self.paths.mess, st.id), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            nxt = next_try(st.arrival, now, channel, self.lifetime)
            for j in indexes:
                self.defer(m, j, nxt, "unable to open the queued message: %s (#4.3.0)"
                           % e.strerror)
            return
        self.dnum += 1
        d = self.dnum
        rcpts = [st.recipients[j].delivery_address for j in indexes]
        try:
            spawn.send_request(sock, d, st.sender, rcpts, fd)
        except OSError as e:
            raise Lost("unable to write to the %s spawner: %s" % (channel, e.strerror))
        finally:
            os.close(fd)
        self.deliveries[d] = Delivery(st.id, channel, indexes, dying)
        m.inflight.update(indexes)
        self.busy[channel] += 1
        log("starting delivery %d: msg %s to %s %s" % (
            d, st.id, channel, ",".join(clean(a) for a in rcpts)))
        self.status()

    def defer(self, m: Msg, i: int, nxt: int, text: str | bytes) -> None:
        r = m.st.recipients[i]
        self.persist(m)
        m.sf.deferred(i, nxt, text)     # fsync'd
        r.state, r.next_try, r.error = "deferred", nxt, clean(text)
        heapq.heappush(self.heaps[r.channel], (nxt, m.st.id, i))

    def fail(self, m: Msg, indexes: list[int], text: str | bytes) -> None:
        self.persist(m)
        for i in indexes:
            r = m.st.recipients[i]
            m.sf.failed(i, text)        # fsync'd
            r.state, r.bounce_owed, r.error = "bounced", True, clean(text, 1000)

    def read_results(self, channel: str) -> None:
        sock = self.socks[channel]
        assert sock is not None
        while True:
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                return
            try:
                res = spawn.recv_result(sock)
            except spawn.SpawnError as e:
                log("warning: %s spawner sent a mangled result: %s" % (channel, e))
                continue
            except OSError as e:
                raise Lost("unable to read from the %s spawner: %s" % (channel, e.strerror))
            if res is None:
                raise Lost("lost %s spawn connection" % channel)
            self.result(*res)

    def result(self, d: int, results: list[tuple[bytes, bytes]]) -> None:
        dl = self.deliveries.pop(d, None)
        if dl is None:
            log("warning: internal error: delivery report out of range (%d)" % d)
            return
        m = self.msgs[dl.msgid]
        self.busy[dl.channel] -= 1
        m.inflight.difference_update(dl.indexes)
        now = int(time.time())
        nxt = next_try(m.st.arrival, now, dl.channel, self.lifetime)
        if len(results) != len(dl.indexes):
            log("delivery %d: report mangled, will defer" % d)
            results = [(b"Z", b"report mangled")] * len(dl.indexes)
        for i, (status, text) in zip(dl.indexes, results, strict=True):
            r = m.st.recipients[i]
            what = clean(text)
            if len(dl.indexes) > 1:
                what = "%s: %s" % (clean(r.delivery_address), what)
            if m.removing:
                log("delivery %d: %s" % (d, "success: " + what if status == b"K"
                                         else "ignored for removed msg: " + what))
                continue
            if status == b"K":
                if not m.backed_by_todo:
                    m.sf.done(i)    # fsync'd: from here on the recipient stays done
                r.state, r.error = "done", ""   # todo-backed: in memory (see below)
                log("delivery %d: success: %s" % (d, what))
            elif status == b"Z" and not dl.dying:
                self.defer(m, i, nxt, text)
                log("delivery %d: deferral: %s" % (d, what))
            else:
                if status == b"Z":
                    text = text + b"/" + EXPIRED.encode()
                    what = what + "/" + EXPIRED
                self.fail(m, [i], text)
                log("delivery %d: failure: %s" % (d, what))
        # Still todo-backed: every result was a K, held in memory. A K that finished
        # the message needs no record (settle has qpy-clean remove it); otherwise other
        # recipients are left, and a crash must not deliver these ones again.
        if m.backed_by_todo and not m.removing and not m.st.finished():
            self.persist(m)
        self.status()
        self.settle(m)

    # --- bounces and the end of a message ------------------------------------------
    def settle(self, m: Msg, now: float | None = None) -> None:
        """Bounce what is owed, and finish the message when nothing is left to do."""
        if m.inflight:
            return
        now = time.time() if now is None else now
        if now < m.retry_at:
            return
        st = m.st
        if m.removing:
            self.finish(m, "remove msg %s by qpy-qrm" % st.id, now)
            return
        owed = [i for i, r in enumerate(st.recipients) if r.bounce_owed]
        if owed and not any(r.state == "waiting" for r in st.recipients):
            if not self.send_bounce(m, owed):
                self.later(m, now)
                return
        if st.finished():
            self.finish(m, "", now)

    def send_bounce(self, m: Msg, owed: list[int]) -> bool:
        st = m.st
        failures = [(st.recipients[i].address, st.recipients[i].error) for i in owed]
        if st.sender == b"":
            if all(st.recipients[i].address.lower() == self.doublebounce.lower()
                   for i in owed):
                log("triple bounce: discarding bounce/%s" % st.id)
                self.persist(m)
                m.sf.bounced(owed)      # fsync'd
                self._mark_bounced(st, owed)
                return True
            to, double = self.doublebounce, True
        else:
            to, double = st.sender, False
        try:
            original, whole = bounce.read_original(os.path.join(self.paths.mess, st.id))
        except OSError:
            original, whole = b"", False
        text = bounce.build(self.bouncehost, self.bouncefrom, to, failures, original, whole,
                            st.arrival, double)
        try:
            inject(self.root, text, b"", [to])
        except (InjectError, OSError) as e:
            log("warning: trouble injecting bounce message, will try later: %s"
                % clean(str(e)))
            return False
        self.persist(m)
        m.sf.bounced(owed)  # fsync'd; a crash just before it sends the bounce twice
        self._mark_bounced(st, owed)
        log("bounce msg %s qp %d" % (st.id, os.getpid()))
        return True

    def later(self, m: Msg, now: float) -> None:
        """A bounce or clean-up failed: try again after RETRY_LATER (or on SIGALRM)."""
        m.retry_at = now + RETRY_LATER
        self.retrying.add(m.st.id)

    def retry_failed(self, now: float) -> None:
        for msgid in [i for i in self.retrying if self.msgs[i].retry_at <= now]:
            self.retrying.discard(msgid)
            m = self.msgs[msgid]
            m.retry_at = 0.0
            self.settle(m)

    @staticmethod
    def _mark_bounced(st: MessageState, owed: list[int]) -> None:
        for i in owed:
            st.recipients[i].bounce_owed = False

    def finish(self, m: Msg, why: str, now: float) -> None:
        msgid = m.st.id
        reply = self.clean_request(msgid)
        if reply != b"+":
            log("warning: qpy-clean unable to clean up msg %s: %s" % (msgid, clean(reply)))
            if not m.removing:
                self.persist(m)     # its K's wait for the next try on disk, not in memory
            self.later(m, now)
            return
        if not m.backed_by_todo:
            m.sf.remove()       # a crash before this: the next start finishes it again
        if why:
            log(why)
            self._unlink(os.path.join(self.rmdir, msgid))
        log("end msg %s" % msgid)
        del self.msgs[msgid]
        self.retrying.discard(msgid)

    def clean_request(self, msgid: str) -> bytes:
        try:
            os.write(CLEAN_W, msgid.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                data = os.read(CLEAN_R, 512)
                if not data:
                    raise Lost("lost qpy-clean connection")
                reply += data
        except OSError as e:
            raise Lost("lost qpy-clean connection: %s" % e.strerror)
        return reply.rstrip(b"\n")

    # --- qpy-qrm ------------------------------------------------------------------
    def check_rm(self) -> None:
        try:
            names = os.listdir(self.rmdir)
        except OSError:
            return
        for name in names:
            if not is_id(name):
                continue
            m = self.msgs.get(name)
            if m is not None:
                if not m.removing:
                    m.removing = True
                    m.retry_at = 0.0
                    self.retrying.discard(name)
                    self.settle(m)
            elif name not in self.todo_known and \
                    not os.path.lexists(os.path.join(self.paths.todo, name)):
                self._unlink(os.path.join(self.rmdir, name))   # nothing left to remove

    # --- the loop -----------------------------------------------------------------
    def retry_all(self) -> None:
        for channel in (LOCAL, REMOTE):
            self.heaps[channel] = []
        for msgid, m in self.msgs.items():
            for i, r in enumerate(m.st.recipients):
                if r.state in ("waiting", "deferred"):
                    r.next_try = 0
                    heapq.heappush(self.heaps[r.channel], (0, msgid, i))
        self.retry_failed(float("inf"))     # failed bounces and clean-ups: now

    def handle_flags(self) -> None:
        flags, self.flags = self.flags, set()
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

    def run(self, wakeup_r: int) -> int:
        watcher = Watcher([self.paths.todo])
        self.load()
        fds = {wakeup_r: None}
        for channel, s in self.socks.items():
            if s is not None:
                fds[s.fileno()] = channel
        while True:
            self.handle_flags()
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
                # new todo/ID by name from inotify: no listing of todo/, which holds
                # every message in its first pass (hundreds under load)
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
                if fd == wakeup_r:
                    self._drain_wakeup(wakeup_r)
                else:
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

    def _drain_wakeup(self, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for b in data:
            self.flags.add(b)


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
    # signals only set flags: the wakeup pipe ends the select() at once
    wr, ww = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(ww)
    for sig in (signal.SIGALRM, signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # qpy-start execs us with these blocked, so that none kills us before this point
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM, signal.SIGHUP,
                                                signal.SIGUSR1, signal.SIGTERM})
    qs = QueueSend(root)
    if qs.socks[REMOTE] is None:
        log("warning: no qpy-rspawn connection: remote mail waits in the queue")
    try:
        hold()
        return qs.run(wr)
    except Lost as e:
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
