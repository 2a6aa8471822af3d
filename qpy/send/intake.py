"""intake — how a message enters qpy-queue-send's memory and what keeps it durable.

A message lives in one of two ways (see qpy-queue-send's WRITES and CRASH SAFETY):

    todo-backed     taken in from `todo/ID`; no `state/ID`; its recipients' states
                    are in memory only, and todo/ID is its durable record.
    state-backed    `state/ID` exists (qpy.common.state); every result is an
                    fsync'd record there; todo/ID is gone.

A message moves from the first to the second once (persist), at its first result
that must be durable; this module is the one place that knows both. It reads
state/ at start (load), takes new todo/ID in (note_todo, preprocess) and checks
a todo/ID against a torn or unusable state/ID.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from dataclasses import dataclass, field

from qpy.common import envelope
from qpy.common.log import clean, log
from qpy.common.queue import Paths, is_id, read_small, todo_decode
from qpy.common.rewrite import Rewrite
from qpy.common.state import (
    DONE,
    LOCAL,
    PENDING,
    REMOTE,
    MessageState,
    RecipientState,
    StateError,
    StateFile,
    read_state,
)

MAX_TODO_BYTES = envelope.MAX_ENVELOPE + 120


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
        recipients are waiting or done in memory only."""
        return not self.sf.exists


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log("warning: unable to unlink %s: %s" % (path, e.strerror))


def _exists(path: str) -> bool:
    """False only when path is certainly missing (any other error: assume it is there)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


class Intake:
    """The messages in memory, and their lifecycle from todo/ID or state/ID, a part
    of QueueSend: it supplies settle() (qpy.send.finish.Finishing) and the routing
    (qpy.common.rewrite: locals, virtualdomains, percenthack, envnoathost)."""

    paths: Paths
    rewrite: Rewrite

    def init_intake(self) -> None:
        self.msgs: dict[str, Msg] = {}
        self.heaps: dict[str, list[tuple[int, str, int]]] = {LOCAL: [], REMOTE: []}
        self.todo: deque[str] = deque()
        self.todo_known: set[str] = set()
        self.bad_todo: set[str] = set()

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
                if r.state in PENDING:
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

    def preprocess(self, msgid: str) -> None:
        self.todo_known.discard(msgid)
        todo_path = os.path.join(self.paths.todo, msgid)
        known = self.msgs.get(msgid)
        if known is not None:
            if not known.backed_by_todo:    # state written before a crash: todo is stale
                unlink(todo_path)
            return
        try:
            data = read_small(todo_path, MAX_TODO_BYTES)
            if len(data) > MAX_TODO_BYTES:
                raise ValueError("todo file too large")
            todo = todo_decode(data)
            env = envelope.decode_all(todo.env)
            sender = env.sender
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log("warning: unable to use todo/%s: %s" % (msgid, clean(str(e))))
            self.bad_todo.add(msgid)
            return
        if not _exists(os.path.join(self.paths.mess, msgid)):
            # qpy-clean removes mess/ID before todo/ID: a crash came between the two
            log("warning: todo/%s has no mess/%s: finished before a crash; removing it"
                % (msgid, msgid))
            unlink(todo_path)       # not fsync'd: if it comes back, this runs again
            return
        # no state/ID now: todo/ID stays the durable record until persist() writes one
        sf = StateFile(self.paths.state, msgid, exists=False)
        if os.path.lexists(sf.path) and not self._replaceable(sf):
            log("warning: unable to take in todo/%s: state/%s exists and is unusable"
                % (msgid, msgid))
            return                      # todo/ID stays; the next rescan tries again
        log("new msg %s" % msgid)
        log("info msg %s: bytes %d from <%s> qp %d uid %d" % (
            msgid, todo.size, clean(sender), todo.qp, todo.uid))
        st = MessageState(msgid, todo.arrival, todo.size, todo.uid, todo.qp, sender,
                          dsn=env.mail)
        for r, dsn in zip(env.recipients, env.rcpt, strict=True):
            route = self.rewrite.route(r)   # the classification qpy-smtpd's RCPT check made
            st.recipients.append(RecipientState(r, route.channel, route.address, dsn=dsn))
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
        done = [i for i, r in enumerate(m.st.recipients) if r.state == DONE]
        m.sf.create(m.st, done)     # durable (one fsync) before todo/ID goes
        unlink(os.path.join(self.paths.todo, m.st.id))
