"""finish — the end of a message in qpy-queue-send: bounces, clean-up, qpy-qrm; and
the delayed-delivery warning (once per message, control/delaywarning hours after it
arrived, at a deferral).

A message settles when none of its deliveries is in flight: the failures it owes
a bounce for are bounced (one bounce per message and failure batch, once no
recipient is still untried), the deliveries it owes a success notice for
(RFC 3461 NOTIFY=SUCCESS) are reported, and a message with nothing left is finished:
qpy-clean removes mess/ID and todo/ID (qpy.common.cleanreq), then state/ID goes.
A bounce or clean-up that fails is tried again after RETRY_LATER seconds or on
SIGALRM. A message named in `queue/rm/` (qpy-qrm) is finished as soon as its
deliveries in flight are in, without bounces.

NOTIFY (RFC 3461): a recipient whose NOTIFY lacks FAILURE (NEVER among them) gets
no bounce (its B record is written and the log says so); one whose NOTIFY lacks
DELAY is left out of the delay warning. A success notice is injected before its
N records are fsync'd, as a bounce before its B records: a crash between the two
sends it once more, never not at all.
"""

from __future__ import annotations

import os
import time

from qpy.common import address, cleanreq, dsnparam
from qpy.common.log import clean, log
from qpy.common.queue import Paths, is_id
from qpy.common.state import DEFERRED, WAITING, MessageState, RecipientState
from qpy.inject.drop import InjectError, inject
from qpy.send import bounce
from qpy.send.intake import Msg, unlink
from qpy.send.schedule import RETRY_LATER

CLEAN_W, CLEAN_R = 5, 6


class Finishing:
    """Settling and finishing messages, a part of QueueSend: it supplies the
    messages and persist() (qpy.send.intake.Intake) and the bounce addresses (its
    control files)."""

    root: str
    paths: Paths
    rmdir: str
    msgs: dict[str, Msg]
    todo_known: set[str]
    bouncehost: str
    bouncefrom: str
    doublebounce: bytes
    delaywarning: float             # hours; 0: no warnings
    lifetime: int

    def init_finishing(self) -> None:
        self.retrying: set[str] = set()     # messages whose bounce or clean-up failed

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
        if owed and not any(r.state == WAITING for r in st.recipients):
            if not self.send_bounce(m, owed):
                self.later(m, now)
                return
        noticed = [i for i, r in enumerate(st.recipients) if r.notice_owed()]
        if noticed and not self.send_notices(m, noticed):
            self.later(m, now)
            return
        if st.finished():
            self.finish(m, "", now)

    def send_bounce(self, m: Msg, owed: list[int]) -> bool:
        """The bounce for the `owed` recipients; for a VERP sender one per recipient,
        each to that recipient's return path (a failed injection sends those already
        injected again at the retry, as a crash would). A recipient whose NOTIFY
        asks for no failure notice gets none."""
        quiet = [i for i in owed if not dsnparam.wants(m.st.recipients[i].dsn, b"FAILURE")]
        if quiet:
            self.persist(m)
            m.sf.bounced(quiet)      # fsync'd
            _mark_bounced(m.st, quiet)
            log("no bounce msg %s for %s: NOTIFY without FAILURE" % (m.st.id, ",".join(
                clean(m.st.recipients[i].address) for i in quiet)))
            owed = [i for i in owed if i not in quiet]
            if not owed:
                return True
        if address.is_verp(m.st.sender):
            return all(self._bounce(m, [i], address.verp(m.st.sender,
                                                         m.st.recipients[i].address))
                       for i in owed)
        return self._bounce(m, owed, m.st.sender)

    def _bounce(self, m: Msg, owed: list[int], sender: bytes) -> bool:
        st = m.st
        failures = [_entry(st.recipients[i]) for i in owed]
        if st.sender == b"":
            if all(st.recipients[i].address.lower() == self.doublebounce.lower()
                   for i in owed):
                log("triple bounce: discarding bounce/%s" % st.id)
                self.persist(m)
                m.sf.bounced(owed)      # fsync'd
                _mark_bounced(st, owed)
                return True
            to, double = self.doublebounce, True
        else:
            to, double = sender, False
        original, whole = self.original(st.id)
        if whole and dsnparam.headers_only(st.dsn):      # RET=HDRS
            original, whole = bounce.header_of(original), False
        text = bounce.build(self.bouncehost, self.bouncefrom, to, failures, original, whole,
                            st.arrival, double, dsnparam.envid_of(st.dsn))
        if not self.report(text, to, "bounce message"):
            return False
        self.persist(m)
        m.sf.bounced(owed)  # fsync'd; a crash just before it sends the bounce twice
        _mark_bounced(st, owed)
        log("bounce msg %s qp %d" % (st.id, os.getpid()))
        return True

    def warn_if_due(self, m: Msg, now: int) -> None:
        """The delayed-delivery warning, once per message, to a sender that is not <>,
        when a recipient is deferred control/delaywarning hours after arrival.

        It is injected before its W record is fsync'd: a crash between the two sends
        it once more, never not at all."""
        st = m.st
        if self.delaywarning <= 0 or st.warned or st.sender == b"" or m.removing \
                or now - st.arrival < self.delaywarning * 3600:
            return
        delayed = [_entry(r) for r in st.recipients
                   if r.state == DEFERRED and dsnparam.wants(r.dsn, b"DELAY")]
        if not delayed:
            return
        original, _ = self.original(st.id)
        to = st.sender
        if address.is_verp(to):     # the return path of the first recipient delayed
            to = address.verp(to, delayed[0].address)
        text = bounce.build_warning(self.bouncehost, self.bouncefrom, to, delayed,
                                    bounce.header_of(original), st.arrival,
                                    st.arrival + self.lifetime, dsnparam.envid_of(st.dsn))
        if not self.report(text, to, "delay warning"):
            return
        self.persist(m)
        m.sf.warned()       # fsync'd
        st.warned = True
        log("delay warning msg %s qp %d" % (st.id, os.getpid()))

    def send_notices(self, m: Msg, owed: list[int]) -> bool:
        """The success notices (RFC 3461 NOTIFY=SUCCESS) for the `owed` recipients:
        one per message and batch, one per recipient for a VERP sender, none to <>."""
        st = m.st
        if st.sender == b"":
            batches: list[tuple[bytes, list[int]]] = []
        elif address.is_verp(st.sender):
            batches = [(address.verp(st.sender, st.recipients[i].address), [i]) for i in owed]
        else:
            batches = [(st.sender, owed)]
        original, _ = self.original(st.id)
        for to, indexes in batches:
            text = bounce.build_success(
                self.bouncehost, self.bouncefrom, to,
                [(_entry(st.recipients[i]), st.recipients[i].relayed) for i in indexes],
                bounce.header_of(original), st.arrival, dsnparam.envid_of(st.dsn))
            if not self.report(text, to, "success notice"):
                return False
        self.persist(m)
        m.sf.noticed(owed)      # fsync'd; a crash just before it sends the notice twice
        for i in owed:
            st.recipients[i].noticed = True
        log("success notice msg %s qp %d" % (st.id, os.getpid()) if batches
            else "no success notice msg %s: the sender is <>" % st.id)
        return True

    def original(self, msgid: str) -> tuple[bytes, bool]:
        """mess/ID for a report (bounce.read_original), or nothing when unreadable."""
        try:
            return bounce.read_original(os.path.join(self.paths.mess, msgid))
        except OSError:
            return b"", False

    def report(self, text: bytes, to: bytes, what: str) -> bool:
        """Inject a bounce, warning or notice from <>; False (logged) when it failed."""
        try:
            inject(self.root, text, b"", [to])
        except (InjectError, OSError) as e:
            log("warning: trouble injecting %s, will try later: %s" % (what, clean(str(e))))
            return False
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

    def finish(self, m: Msg, why: str, now: float) -> None:
        msgid = m.st.id
        reply = self.clean_request(msgid)
        if reply != cleanreq.OK:
            log("warning: qpy-clean unable to clean up msg %s: %s" % (msgid, clean(reply)))
            if not m.removing:
                self.persist(m)     # its K's wait for the next try on disk, not in memory
            self.later(m, now)
            return
        if not m.backed_by_todo:
            m.sf.remove()       # a crash before this: the next start finishes it again
        if why:
            log(why)
            unlink(os.path.join(self.rmdir, msgid))
        log("end msg %s" % msgid)
        del self.msgs[msgid]
        self.retrying.discard(msgid)

    def clean_request(self, msgid: str) -> bytes:
        """qpy-clean's reply for msgid; raises cleanreq.CleanLost."""
        return cleanreq.ask(CLEAN_W, CLEAN_R, msgid)

    def check_rm(self) -> None:
        """Take qpy-qrm's requests from queue/rm/."""
        try:
            names = os.listdir(self.rmdir)
        except OSError:
            return
        for name in names:
            if not is_id(name):
                if name.startswith(".tmp.") and stale(os.path.join(self.rmdir, name)):
                    unlink(os.path.join(self.rmdir, name))    # a qpy-qrm killed mid-write
                continue
            m = self.msgs.get(name)
            if m is not None:
                if not m.removing:
                    m.removing = True
                    m.retry_at = 0.0
                    self.retrying.discard(name)
                    self.settle(m)
            elif name not in self.todo_known and not any(
                    os.path.lexists(os.path.join(d, name))
                    for d in (self.paths.todo, self.paths.mess, self.paths.state)):
                # nothing left to remove; a mess/ID alone is pickup between writing it
                # and its todo/ID (qpy-qrm accepts that id): the request waits for it
                unlink(os.path.join(self.rmdir, name))


RM_TMP_AGE = 5.0    # seconds; qpy-qrm writes an empty file: its temporary lives for ms


def stale(path: str) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > RM_TMP_AGE
    except OSError:
        return False


def _entry(r: RecipientState) -> bounce.Entry:
    return bounce.Entry(r.address, r.error, r.last_attempt,
                        dsnparam.original_recipient(r.dsn) if r.dsn else "")


def _mark_bounced(st: MessageState, owed: list[int]) -> None:
    for i in owed:
        st.recipients[i].bounce_owed = False
