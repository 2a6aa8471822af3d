"""state — the per-recipient delivery state of one queued message, `queue/state/ID`.

Written only by `qpy-queue-send` (uid qpys); read by it at start and by the admin
tools (`qpy-qread`) through `read_state()`.

FORMAT
    One record a line, fields separated by TAB (no address that passed the strict
    parser holds a TAB, LF or NUL; texts are made printable before they are written).
    The head is written straight into `state/ID`, created with O_EXCL, and fsync'd
    once (no temporary name, no directory fsync; see CRASH SAFETY):

        QPYSTATE1 <TAB> ID <TAB> ARRIVAL <TAB> SIZE <TAB> UID <TAB> QP
        F <TAB> sender
        P <TAB> mail-params                (only when the message has DSN parameters)
        R <TAB> i <TAB> L|R <TAB> address <TAB> delivery address [<TAB> rcpt-params]
                                           (one per recipient; rcpt-params: its DSN ones)
        E                                                             (end of the head)
        K <TAB> i             (one per recipient already delivered, in the same write)

    queue-send creates state/ID only for a message that outlives its first pass
    (the first record that must be durable: a Z, D or B, or a K that leaves other
    recipients to do); until then todo/ID is the message's durable record and its
    state lives in memory. The K lines after `E` are the ones it kept in memory so
    far; they are ordinary records. Then queue-send appends one record per event,
    each fsync'd before it counts:

        K <TAB> i                        recipient i delivered (done; never undone)
        K <TAB> i <TAB> R                delivered to a peer without DSN (relayed)
        N <TAB> i                        the success notice for i is injected
        Z <TAB> i <TAB> NEXT <TAB> text  temporary failure, next try at NEXT
        D <TAB> i <TAB> WHEN <TAB> text  permanent failure at WHEN; a bounce is owed
                                         (older files: `D <TAB> i <TAB> text`)
        B <TAB> i                        the bounce for i is injected (bounced)
        W                                the delayed-delivery warning is injected

    The DSN parameters (P, the sixth R field) are in their canonical form
    (qpy.common.dsnparam, checked when read); a file without them, written before
    they existed, reads as before: no parameters.

    A crash can tear only the last, unsynced record: readers ignore a final line
    without LF, and queue-send cuts it off before appending (`repair()`).

CRASH SAFETY OF THE HEAD
    On ext4, xfs and btrfs (the filesystems qpy supports for its queue) the fsync of
    a new file commits the journal transaction that created its directory entry, so
    one fsync makes both the bytes and the name durable. queue-send unlinks todo/ID
    only after that fsync returned; until then todo/ID holds everything the head
    says. A crash before it leaves state/ID missing, empty, torn inside the head, or
    with the whole head and only some of the K records written with it. A torn head
    whose todo/ID exists is removed (QueueSend.load) and the message read again from
    todo/ID; a whole head is used as it stands and the stale todo/ID removed
    (QueueSend.preprocess). Either way a K written with the head but lost was never
    durable, and that recipient is delivered again. No record is appended before the
    head is durable, so a torn head never hides an appended `K`.

STATE WORDS (per recipient, as `qpy-qread` prints them)
    waiting (not yet tried), deferred (Z: next try, last error), done (K),
    bounced (D or B: failed for good; `bounce_owed` tells D from B).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qpy.common import dsnparam, durable

MAGIC = b"QPYSTATE1"
MAX_STATE_BYTES = 64 * 1024 * 1024     # far past 100,000 recipients with their records
MAX_TEXT = 1000
STATE_MODE = 0o600

LOCAL = "local"
REMOTE = "remote"

# a recipient's state words (what qpy-qread shows, too)
WAITING = "waiting"         # not tried yet
DEFERRED = "deferred"       # failed for now; tried again at next_try
DONE = "done"               # delivered
BOUNCED = "bounced"         # failed for good (bounce_owed until its bounce is injected)
PENDING = (WAITING, DEFERRED)   # still to be tried


class StateError(ValueError):
    """The head of a state file is missing or malformed."""


@dataclass
class RecipientState:
    address: bytes                  # as the sender gave it (what a bounce names)
    channel: str                    # LOCAL or REMOTE
    delivery_address: bytes         # after virtualdomains rewriting (what lspawn gets)
    state: str = WAITING            # WAITING, DEFERRED, DONE or BOUNCED
    next_try: int = 0               # seconds since the epoch; 0: now
    error: str = ""                 # the last failure text
    bounce_owed: bool = False       # failed for good, bounce not yet injected
    last_attempt: int = 0           # when it last failed (0: unknown; kept for a D)
    dsn: bytes = b""                # its DSN parameters (NOTIFY, ORCPT), canonical
    relayed: bool = False           # handed to a peer that does not offer DSN
    noticed: bool = False           # its success notice is injected

    def notice_owed(self) -> bool:
        """Delivered with NOTIFY=SUCCESS, here or to a peer that did not take DSN (a
        peer that did was given NOTIFY and notifies itself: RFC 3461 5.2), and its
        success notice not injected yet."""
        return self.state == DONE and not self.noticed and bool(self.dsn) \
            and (self.channel == LOCAL or self.relayed) \
            and dsnparam.wants(self.dsn, b"SUCCESS")


@dataclass
class MessageState:
    id: str
    arrival: int
    size: int
    uid: int
    qp: int
    sender: bytes
    recipients: list[RecipientState] = field(default_factory=list)
    warned: bool = False            # the delayed-delivery warning went out
    dsn: bytes = b""                # the message's DSN parameters (RET, ENVID), canonical

    def finished(self) -> bool:
        """Every recipient done (its success notice injected, if owed) or bounced with
        the bounce injected."""
        return all((r.state == DONE and not r.notice_owed())
                   or (r.state == BOUNCED and not r.bounce_owed) for r in self.recipients)


def clean_text(text: bytes | str) -> bytes:
    """Printable ASCII, bounded, no TAB: safe inside one record."""
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    return bytes(c if 0x20 <= c <= 0x7E else 0x5F for c in text[:MAX_TEXT])


def encode_head(ms: MessageState, done: Iterable[int] = ()) -> bytes:
    """The head of a state file, then a `K` record for each index in done."""
    lines = [b"\t".join([MAGIC, ms.id.encode(), b"%d" % ms.arrival, b"%d" % ms.size,
                         b"%d" % ms.uid, b"%d" % ms.qp]),
             b"F\t" + ms.sender]
    if ms.dsn:
        lines.append(b"P\t" + ms.dsn)
    for i, r in enumerate(ms.recipients):
        lines.append(b"R\t%d\t%s\t%s\t%s" % (i, b"L" if r.channel == LOCAL else b"R",
                                           r.address, r.delivery_address)
                     + (b"\t" + r.dsn if r.dsn else b""))
    lines.append(b"E")
    lines += [b"K\t%d\tR" % i if ms.recipients[i].relayed else b"K\t%d" % i for i in done]
    return b"\n".join(lines) + b"\n"


def _int(b: bytes) -> int:
    if not b.isdigit() or len(b) > 20:
        raise StateError("bad number")
    return int(b)


def decode(data: bytes) -> MessageState:
    """Parse a whole state file's bytes (a torn last line is ignored)."""
    lines = data.split(b"\n")
    lines.pop()  # the part after the last LF: empty, or a torn record
    if not lines:
        raise StateError("empty state file")
    head = lines[0].split(b"\t")
    if len(head) != 6 or head[0] != MAGIC:
        raise StateError("bad state header")
    if len(lines) < 2 or not lines[1].startswith(b"F\t"):
        raise StateError("no sender record")
    ms = MessageState(head[1].decode("ascii", "replace"), _int(head[2]), _int(head[3]),
                      _int(head[4]), _int(head[5]), lines[1][2:])
    pos = 2
    if len(lines) > 2 and lines[2].startswith(b"P\t"):
        ms.dsn = _dsn(lines[2][2:], dsnparam.mail_params)
        pos = 3
    while pos < len(lines) and lines[pos] != b"E":
        f = lines[pos].split(b"\t")
        if len(f) not in (5, 6) or f[0] != b"R" or _int(f[1]) != len(ms.recipients) \
                or f[2] not in (b"L", b"R"):
            raise StateError("bad recipient record")
        ms.recipients.append(RecipientState(f[3], LOCAL if f[2] == b"L" else REMOTE, f[4],
                                            dsn=_dsn(f[5], dsnparam.rcpt_params)
                                            if len(f) == 6 else b""))
        pos += 1
    if pos >= len(lines):
        raise StateError("state head not complete")
    for line in lines[pos + 1:]:
        f = line.split(b"\t", 3)
        if f == [b"W"]:
            ms.warned = True
            continue
        try:
            r = ms.recipients[_int(f[1])]
        except (IndexError, StateError):
            continue  # an unreadable record counts as never written
        kind = f[0]
        if kind == b"K":
            r.state, r.bounce_owed, r.error = DONE, False, ""
            r.relayed = f[2:] == [b"R"]
        elif kind == b"N":
            r.noticed = True
        elif r.state == DONE:
            continue  # done stays done, whatever follows
        elif kind == b"Z" and len(f) == 4 and f[2].isdigit():
            r.state, r.next_try, r.error = DEFERRED, int(f[2]), f[3].decode("ascii", "replace")
        elif kind == b"D" and len(f) == 4 and f[2].isdigit():
            r.state, r.bounce_owed, r.last_attempt = BOUNCED, True, int(f[2])
            r.error = f[3].decode("ascii", "replace")
        elif kind == b"D" and len(f) == 3:     # written before D records had a time
            r.state, r.bounce_owed = BOUNCED, True
            r.error = f[2].decode("ascii", "replace")
        elif kind == b"B":
            r.state, r.bounce_owed = BOUNCED, False
    return ms


def _dsn(value: bytes, check: Callable[[bytes], dict]) -> bytes:
    try:
        if not value:
            raise dsnparam.DsnError("empty")
        check(value)
    except dsnparam.DsnError as e:
        raise StateError("bad DSN parameters: %s" % e)
    return value


def read_state(path: str) -> MessageState:
    """Read `queue/state/ID`; raises OSError or StateError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise StateError("state file too large")
    return decode(data)


class StateFile:
    """queue-send's writer for one state file.

    exists is False for a message whose state/ID is not created yet (todo/ID is its
    durable record): every append is refused until create() has made the file.
    """

    def __init__(self, directory: str, msgid: str, exists: bool = True):
        self.directory = directory
        self.path = os.path.join(directory, msgid)
        self.msgid = msgid
        self.exists = exists

    def create(self, ms: MessageState, done: Iterable[int] = ()) -> None:
        """Write the head, and a K record for each index in done, into a new state/ID
        with one write and one fsync; raises FileExistsError if it exists."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     STATE_MODE)
        try:
            durable.write_all(fd, encode_head(ms, done))
            # durable: one fsync commits the bytes (head and K records) and the new
            # directory entry (ext4, xfs, btrfs); no temp+rename+dir fsync, as a torn
            # head is dropped and the message read again from todo/ID, which goes
            # only after this returns (CRASH SAFETY above)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.remove()
            raise
        os.close(fd)
        self.exists = True

    def repair(self) -> None:
        """Cut off a torn last record so that the next append starts on a line."""
        fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            tail = os.pread(fd, min(size, MAX_TEXT * 2 + 64), max(0, size - MAX_TEXT * 2 - 64))
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            if cut == -1:
                return
            os.ftruncate(fd, size - (len(tail) - cut - 1))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, records: bytes) -> None:
        if not self.exists:
            # a programming error: the record would be lost with a todo-backed message
            raise RuntimeError("state/%s: record appended before the file was created"
                               % self.msgid)
        # durable: the records are fsync'd before append_line returns; only then they count
        durable.append_line(self.path, records)

    def done(self, i: int, relayed: bool = False) -> None:
        self._append(b"K\t%d\tR\n" % i if relayed else b"K\t%d\n" % i)

    def noticed(self, indexes: list[int]) -> None:
        # one write, one fsync for the whole batch of a success notice
        self._append(b"".join(b"N\t%d\n" % i for i in indexes))

    def deferred(self, i: int, next_try: int, text: bytes | str) -> None:
        self._append(b"Z\t%d\t%d\t%s\n" % (i, next_try, clean_text(text)))

    def failed(self, i: int, text: bytes | str, when: int | None = None) -> None:
        """A D record; `when` the failed attempt (default: now)."""
        when = int(time.time()) if when is None else when
        self._append(b"D\t%d\t%d\t%s\n" % (i, when, clean_text(text)))

    def warned(self) -> None:
        self._append(b"W\n")

    def bounced(self, indexes: list[int]) -> None:
        # one write, one fsync for the whole batch of a bounce
        self._append(b"".join(b"B\t%d\n" % i for i in indexes))

    def remove(self) -> None:
        """Unlink state/ID; a missing file (a todo-backed message) is fine."""
        self.exists = False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
