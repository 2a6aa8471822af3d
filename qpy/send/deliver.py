"""deliver — qpy-queue-send's deliveries: requests out to the spawners, results in.

A due recipient goes to its channel's spawner (qpy.common.spawn) with mess/ID
passed as an fd; remote recipients of one message and domain go in one request
(at most spawn.MAX_RCPTS), except for a VERP sender (`pre@host-@[]`), whose
message goes to each recipient alone with its own return path
(qpy.common.address.verp). At most `conc_domain` (control/concurrencyperdomain)
remote deliveries to one recipient domain run at once: a due recipient over it
waits aside (held, in the order it came) until one of them reports; then the
domain's held entries are started while its slots last, before the heap: each
entry is held once and started once (pushing them all back into the heap at
every report made a backlog of B recipients to one relay cost O(B) a message).
Each result is recorded as
qpy-queue-send's WRITES says: a K for a todo-backed message stays in memory
unless others remain, a deferral or failure is an fsync'd record in state/ID
(persist first). A lost or failing spawner connection raises Lost:
qpy-queue-send exits 111 and qpy-start restarts the group; an unreported
delivery is simply tried again.
"""

from __future__ import annotations

import collections
import heapq
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from qpy.common import address, spawn
from qpy.common.log import clean, log
from qpy.common.state import BOUNCED, DEFERRED, DONE, LOCAL, REMOTE
from qpy.send.intake import Msg
from qpy.send.schedule import EXPIRED, NO_REMOTE, due, dying, next_try

DELIVERED = (b"K", b"R")     # R: relayed to a peer without DSN (qpy.common.spawn)


class Lost(Exception):
    """A spawner or qpy-clean went away: exit so that qpy-start restarts the group."""


@dataclass
class Delivery:
    msgid: str
    channel: str
    indexes: list[int]
    dying: bool
    domain: bytes = b""     # a remote delivery's recipient domain


class Deliveries:
    """Starting deliveries and taking their results, a part of QueueSend: it
    supplies the messages and persist() (qpy.send.intake.Intake), settle() and
    warn_if_due() (qpy.send.finish.Finishing), the limits (conc, lifetime) and term_deadline."""

    msgs: dict[str, Msg]
    heaps: dict[str, list[tuple[int, str, int]]]
    conc: dict[str, int]
    conc_domain: int
    lifetime: int
    term_deadline: float
    warn_if_due: Callable[[Msg, int], None]

    def init_deliveries(self, socks: dict[str, socket.socket | None]) -> None:
        self.socks = socks
        self.busy = {LOCAL: 0, REMOTE: 0}
        self.deliveries: dict[int, Delivery] = {}
        self.dnum = 0
        self.domain_busy: dict[bytes, int] = {}
        self.held: dict[bytes, collections.deque[tuple[int, str, int]]] = {}  # conc_domain
        self.freed: set[bytes] = set()      # domains with entries held and a slot free

    def release_held(self, domain: bytes) -> None:
        """A slot of `domain` is free: its held entries go first at the next start."""
        if domain in self.held:
            self.freed.add(domain)

    def start_held(self, now: int) -> None:
        """The held entries of the domains with a free slot, oldest first, while the
        domain's and the channel's slots last; one gone stale meanwhile (its message
        removed, its recipient in flight with another of its message's, or no longer
        due: a new heap entry stands for it) is dropped."""
        for dom in list(self.freed):
            q = self.held.get(dom)
            while q and self.busy[REMOTE] < self.conc[REMOTE] \
                    and self.domain_busy.get(dom, 0) < self.conc_domain:
                _, msgid, i = q.popleft()
                m = self.msgs.get(msgid)
                if m is None or m.removing or i in m.inflight \
                        or not due(m.st.recipients[i], now):
                    continue
                self.start(m, REMOTE, i, now)
            if not q:
                self.held.pop(dom, None)
                self.freed.discard(dom)
            elif self.domain_busy.get(dom, 0) >= self.conc_domain:
                self.freed.discard(dom)     # full again: its next report frees it

    def status(self) -> None:
        log("status: local %d/%d remote %d/%d%s" % (
            self.busy[LOCAL], self.conc[LOCAL], self.busy[REMOTE], self.conc[REMOTE],
            " exitasap" if self.term_deadline else ""))

    def start_deliveries(self, now: int) -> None:
        if self.freed:
            self.start_held(now)
        for channel in (LOCAL, REMOTE):
            heap = self.heaps[channel]
            while heap and heap[0][0] <= now and self.busy[channel] < self.conc[channel]:
                _, msgid, i = heapq.heappop(heap)
                m = self.msgs.get(msgid)
                if m is None or m.removing or i in m.inflight:
                    continue
                if not due(m.st.recipients[i], now):
                    continue
                if channel == REMOTE:
                    dom = _domain(m.st.recipients[i].delivery_address)
                    if self.domain_busy.get(dom, 0) >= self.conc_domain:
                        self.held.setdefault(dom, collections.deque()).append((0, msgid, i))
                        continue
                self.start(m, channel, i, now)

    def start(self, m: Msg, channel: str, i: int, now: int) -> None:
        st = m.st
        last = dying(st.arrival, now, self.lifetime)
        indexes = [i]
        dom = _domain(st.recipients[i].delivery_address) if channel == REMOTE else b""
        sender = st.sender
        if address.is_verp(sender):     # each recipient alone, with its return path
            sender = address.verp(sender, st.recipients[i].address)
        elif channel == REMOTE:         # one request per message and domain
            for j, r in enumerate(st.recipients):
                if len(indexes) >= spawn.MAX_RCPTS:
                    break
                if j != i and r.channel == REMOTE and j not in m.inflight \
                        and due(r, now) and _domain(r.delivery_address) == dom:
                    indexes.append(j)
        sock = self.socks[channel]
        if sock is None:
            text = NO_REMOTE
            if last:
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
            text = "unable to open the queued message: %s (#4.3.0)" % e.strerror
            if last:    # past queuelifetime: a bounce (with no message to quote), not a
                self.fail(m, indexes, text + " " + EXPIRED)     # deferral for ever
                self.settle(m)
                return
            nxt = next_try(st.arrival, now, channel, self.lifetime)
            for j in indexes:
                self.defer(m, j, nxt, text)
            return
        self.dnum += 1
        d = self.dnum
        rcpts = [st.recipients[j].delivery_address for j in indexes]
        dsn = None      # the DSN parameters go to qpy-remote, to pass on to a peer
        if channel == REMOTE and (st.dsn or any(st.recipients[j].dsn for j in indexes)):
            dsn = spawn.Dsn(st.dsn, [st.recipients[j].dsn for j in indexes])
        try:
            spawn.send_request(sock, d, sender, rcpts, fd, dsn)
        except OSError as e:
            raise Lost("unable to write to the %s spawner: %s" % (channel, e.strerror))
        finally:
            os.close(fd)
        self.deliveries[d] = Delivery(st.id, channel, indexes, last, dom)
        m.inflight.update(indexes)
        self.busy[channel] += 1
        if channel == REMOTE:
            self.domain_busy[dom] = self.domain_busy.get(dom, 0) + 1
        log("starting delivery %d: msg %s to %s %s" % (
            d, st.id, channel, ",".join(clean(a) for a in rcpts)))
        self.status()

    def defer(self, m: Msg, i: int, nxt: int, text: str | bytes) -> None:
        r = m.st.recipients[i]
        self.persist(m)
        m.sf.deferred(i, nxt, text)     # fsync'd
        r.state, r.next_try, r.error = DEFERRED, nxt, clean(text)
        r.last_attempt = int(time.time())
        heapq.heappush(self.heaps[r.channel], (nxt, m.st.id, i))

    def fail(self, m: Msg, indexes: list[int], text: str | bytes) -> None:
        self.persist(m)
        now = int(time.time())
        for i in indexes:
            r = m.st.recipients[i]
            m.sf.failed(i, text, now)   # fsync'd
            r.state, r.bounce_owed, r.error = BOUNCED, True, clean(text, 1000)
            r.last_attempt = now

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
        if dl.channel == REMOTE:
            left = self.domain_busy.pop(dl.domain, 1) - 1
            if left:
                self.domain_busy[dl.domain] = left
            self.release_held(dl.domain)
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
                log("delivery %d: %s" % (d, "success: " + what if status in DELIVERED
                                         else "ignored for removed msg: " + what))
                continue
            if status in DELIVERED:
                relayed = status == b"R"    # to a peer without DSN: the notice says relayed
                if not m.backed_by_todo:
                    m.sf.done(i, relayed)   # fsync'd: from here on the recipient stays done
                r.state, r.error, r.relayed = DONE, "", relayed  # todo-backed: in memory
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
        self.warn_if_due(m, now)
        self.settle(m)


def _domain(addr: bytes) -> bytes:
    """The recipient domain that groups and limits remote deliveries."""
    return address.domain_part(addr).lower()
