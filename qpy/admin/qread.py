"""qpy-qread — each queued message, its sender, and the state of each recipient.

SYNOPSIS
    qpy-qread [ROOT] [ID...]

DESCRIPTION
    One block per message, oldest first:

        ID  DATE  SIZE bytes  from <SENDER>[  RET=… ENVID=…]
          STATE  local|remote  <ADDRESS>[  NOTIFY=… ORCPT=…][  next TIME: last error]

    STATE is `waiting` (not tried yet), `deferred` (followed by the next try and the
    last error), `done`, or `bounced` (with the failure text). The DSN parameters
    (RFC 3461) a client gave on MAIL and RCPT follow the sender and each recipient, as
    they went on the wire (xtext). The recipients come from
    `queue/state/ID` (qpy.common.state, written by qpy-queue-send). A message without
    state/ID shows its envelope from `queue/todo/ID` with every recipient `waiting` and
    the channel `new`: either queue-send has not read it yet, or it is in its first
    delivery pass (queue-send keeps that pass's results in memory and writes state/ID
    only when one must be durable, so its first attempts, and a success that ends the
    message, never show here). A committed drop file not yet picked up is shown with id
    `drop:NAME`. DATE is the arrival time in UTC. Text from the queue is made printable
    before it is shown. With IDs (as `250 ... queued as ID`, the Received: lines and
    the log show them), only those messages are shown, a drop file named ID too.

RUNS AS
    root or qpys (state/ is qpys-only, mess/ and todo/ are group qpys); keeps the
    caller's uid and writes nothing.

EXIT CODES
    0 listed; 100 an ID given is not in the queue; 111 the queue cannot be read.
"""

from __future__ import annotations

import os
import sys
import time

from qpy.admin import queueinfo
from qpy.common import envelope
from qpy.common.exits import EXIT_PERM, EXIT_TEMP
from qpy.common.log import clean
from qpy.common.privilege import preamble
from qpy.common.queue import Paths, is_id, root_from, todo_decode
from qpy.common.state import StateError, read_state

MAX_TODO_BYTES = 64 * 1024 * 1024


def date(t: float) -> str:
    return time.strftime("%d %b %Y %H:%M:%S GMT", time.gmtime(t))


def _addr(a: bytes) -> str:
    return "<%s>" % clean(a)


def _size(paths: Paths, msgid: str) -> int:
    try:
        return os.stat(os.path.join(paths.mess, msgid)).st_size
    except FileNotFoundError:
        return 0


def _dsn(params: bytes) -> str:
    return "  " + clean(params) if params else ""


def block_from_state(paths: Paths, msgid: str) -> list[str] | None:
    try:
        ms = read_state(os.path.join(paths.state, msgid))
    except FileNotFoundError:
        return None
    out = ["%s  %s  %d bytes  from %s%s" % (msgid, date(ms.arrival),
                                            _size(paths, msgid) or ms.size, _addr(ms.sender),
                                            _dsn(ms.dsn))]
    for r in ms.recipients:
        line = "  %-8s  %-6s  %s%s" % (r.state, r.channel, _addr(r.address), _dsn(r.dsn))
        if r.state == "deferred":
            line += "  next %s: %s" % (date(r.next_try), clean(r.error))
        elif r.state == "bounced":
            line += ": %s" % clean(r.error)
        out.append(line)
    return out


def block_from_todo(paths: Paths, msgid: str) -> list[str] | None:
    try:
        fd = os.open(os.path.join(paths.todo, msgid), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_TODO_BYTES)
    try:
        todo = todo_decode(data)
        env = envelope.decode_all(todo.env)
    except (ValueError, envelope.EnvelopeError) as e:
        return ["%s  (unreadable todo file: %s)" % (msgid, clean(str(e)))]
    size = _size(paths, msgid) or todo.size
    out = ["%s  %s  %d bytes  from %s%s" % (msgid, date(todo.arrival), size, _addr(env.sender),
                                            _dsn(env.mail))]
    out += ["  %-8s  %-6s  %s%s" % ("waiting", "new", _addr(r), _dsn(q))
            for r, q in zip(env.recipients, env.rcpt, strict=True)]
    return out


def listing(paths: Paths, only: set[str] | None = None) -> list[str]:
    out: list[str] = []
    todo = set(queueinfo.ids(paths.todo))
    for msgid in sorted(set(queueinfo.ids(paths.mess)) | todo, key=int):
        if only is not None and msgid not in only:
            continue
        try:
            block = block_from_state(paths, msgid)
        except (StateError, OSError) as e:
            # queue-send writes state/ID (fsync'd) before it removes todo/ID: while
            # todo/ID is there, a state file still being written is not an error
            block = None if msgid in todo else [
                "%s  (unreadable state file: %s)" % (msgid, clean(str(e)))]
        if block is None and msgid in todo:
            block = block_from_todo(paths, msgid)
        if block is None:
            block = ["%s  %d bytes  (no envelope yet)" % (msgid, _size(paths, msgid))]
        out += block
    for name in sorted(queueinfo.drop_names(paths)):
        if only is None or name in only:
            out.append("drop:%s  (not yet picked up)" % name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    has_root = bool(args) and not is_id(args[0])
    root = root_from(args[:1] if has_root else [])
    only = set(args[1:] if has_root else args) or None
    preamble("qpy-qread", root, None)
    try:
        lines = listing(Paths(root), only)
    except OSError as e:
        sys.stderr.write("qpy-qread: cannot read the queue: %s\n" % e)
        return EXIT_TEMP
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    shown = {ln.split()[0].removeprefix("drop:") for ln in lines if ln[:1] != " "}
    missing = sorted((only or set()) - shown)
    for msgid in missing:
        sys.stderr.write("qpy-qread: %s: not in the queue\n" % clean(msgid))
    return EXIT_PERM if missing else 0
