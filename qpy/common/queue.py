"""queue — the names of a root's directories, message ids and the queue files.

Layout (owners and modes are data in `queue-layout/layout`):

    queue/drop/         front door: one drop file per injected message
    queue/mess/ID       the message, with pickup's Received: line      (qpyq)
    queue/todo/ID       a new message's envelope, for queue-send        (qpyq)
                        (kept through its first delivery pass)
    queue/state/ID      per-recipient delivery state, from the first    (qpys)
                        result that must be durable
    queue/quarantine/   drop files that failed pickup's checks          (qpyq)
    queue/pickup/       pickup's journal of admitted drop files         (qpyq)

A message id is a decimal number, unique in the queue and stable for the
message's life, and the same string in `250 ... queued as ID`, in the
Received: lines and in every log line: the injector's clock in microseconds
then its pid in ID_PID_DIGITS digits (make_id), chosen when the drop file is
created and given to it as its final name. Pickup keeps that id unless it is
malformed, taken, or its time is not near the drop file's ctime (a local
user chooses drop names); then pickup assigns one of its own and logs both.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix

DEFAULT_ROOT = "/var/qpy"
MAX_ID_LEN = 24
ID_PID_DIGITS = 7          # Linux pids stay below 2**22

# todo/ID: one header line, then the envelope (qpy.common.envelope).
TODO_MAGIC = b"QPYTODO1"


def root_from(argv: list[str] | None = None) -> str:
    """The root: first argument if given (admin tools), else QPY_ROOT, else /var/qpy;
    made absolute and normal as os.path.abspath does."""
    if argv:
        root = argv[0]
    else:
        env = posix.environ.get(b"QPY_ROOT")
        root = env.decode("utf-8", "surrogateescape") if env else DEFAULT_ROOT
    if root[:1] == "/" and "//" not in root and "/." not in root and root[-1:] != "/":
        return root      # already what abspath gives: the front ends need no `os`
    import os.path
    return os.path.abspath(root)


def join(*parts: str) -> str:
    """os.path.join, for the modules every injection imports: this module and
    qpy.common.control, qpy.common.dropfile, qpy.common.durable, qpy.inject.drop and
    the front ends use `posix`, never `os`, whose import (its _collections_abc) costs
    about 1 ms, an eighth of a qpy-sendmail run."""
    path = parts[0]
    for p in parts[1:]:
        if p[:1] == "/":
            path = p
        elif not path or path[-1:] == "/":
            path += p
        else:
            path += "/" + p
    return path


def is_id(name: str) -> bool:
    """True for a well-formed message id (and so a safe queue file name)."""
    return 0 < len(name) <= MAX_ID_LEN and name.isascii() and name.isdigit() \
        and name[0] != "0"


def make_id(usec: int, pid: int) -> str:
    """The id for a message injected at `usec` (microseconds) by process `pid`."""
    return "%d%07d" % (usec, pid % 10 ** ID_PID_DIGITS)


def id_usec(name: str) -> int | None:
    """The injection time (microseconds) of an id made by make_id, else None."""
    if not is_id(name) or len(name) < 16 + ID_PID_DIGITS:
        return None
    return int(name[:-ID_PID_DIGITS])


class DropIds:
    """Pickup's rule for taking a drop file's name as the message's id: made by
    make_id, its time near the file's ctime (set by the rename that gave the name:
    no user chooses it), and not admitted before (the last RECENT ids are kept;
    an id older than the newest one forgotten is not taken)."""

    MAX_AGE = 7200          # seconds an id may be older than its file (a slow DATA)
    RECENT = 100_000

    def __init__(self) -> None:
        self.recent: dict[str, None] = {}     # insertion-ordered: the oldest first
        self.floor = 0

    def wanted(self, name: str, ctime: float) -> str | None:
        usec = id_usec(name)
        if usec is None or not ctime - self.MAX_AGE <= usec / 1e6 <= ctime + 2 \
                or usec <= self.floor or name in self.recent:
            return None
        return name

    def remember(self, msg_id: str) -> None:
        self.recent[msg_id] = None
        if len(self.recent) > self.RECENT:
            old = next(iter(self.recent))
            del self.recent[old]
            self.floor = max(self.floor, id_usec(old) or 0)


class Paths:
    def __init__(self, root: str):
        self.root = root
        self.control = join(root, "control")
        self.users = join(root, "users")
        self.alias = join(root, "alias")
        self.log = join(root, "log")
        self.queue = join(root, "queue")
        self.drop = drop_dir(root)
        self.mess = join(self.queue, "mess")
        self.todo = join(self.queue, "todo")
        self.state = join(self.queue, "state")
        self.quarantine = join(self.queue, "quarantine")
        self.pickup = join(self.queue, "pickup")
        self.run = join(self.queue, "run")

    def oneuser(self) -> str | None:
        """The user name of a one-user root (file ROOT/oneuser), else None."""
        try:
            with open(join(self.root, "oneuser"), "rb") as f:
                name = f.read(256).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        return name or None


def drop_dir(root: str) -> str:
    """Paths(root).drop without the other eleven joins (every injection needs it)."""
    return join(root, "queue", "drop")


class Todo:
    """A decoded todo/ID (a plain class: sendmail imports this module, and typing's
    NamedTuple or dataclasses would add to every injection's start-up)."""

    __slots__ = ("arrival", "uid", "size", "env", "qp")

    def __init__(self, arrival: int, uid: int, size: int, env: bytes, qp: int):
        self.arrival = arrival      # seconds since the epoch
        self.uid = uid              # the injecting uid
        self.size = size            # bytes of mess/ID
        self.env = env              # the envelope (qpy.common.envelope)
        self.qp = qp                # the injecting process (pickup's Received: line); 0: unknown


READ_PIECE = 64 * 1024


def read_small(path: str, limit: int) -> bytes:
    """At most limit + 1 bytes of path, opened without following a link and read in
    pieces: a todo/ID of 80 bytes costs an open, two reads and a close, not the
    buffer of its 6 MB limit (an mmap, mremap and munmap) and the buffered file's
    fstat, ioctl and lseek."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW)
    try:
        parts, total = [], 0
        while total <= limit:
            piece = posix.read(fd, min(READ_PIECE, limit + 1 - total))
            if not piece:
                break
            parts.append(piece)
            total += len(piece)
        return b"".join(parts)
    finally:
        posix.close(fd)


def todo_encode(when: int, uid: int, size: int, env: bytes, qp: int = 0) -> bytes:
    """`QPYTODO1 TIME UID SIZE QP` LF, then the envelope."""
    return b"%s %d %d %d %d\n" % (TODO_MAGIC, when, uid, size, qp) + env


def todo_decode(data: bytes) -> Todo:
    """A todo record; one written before QP joined the header has qp 0."""
    nl = data.find(b"\n", 0, 120)
    if nl == -1:
        raise ValueError("todo file has no header")
    fields = data[:nl].split(b" ")
    if len(fields) not in (4, 5) or fields[0] != TODO_MAGIC \
            or not all(f.isdigit() and len(f) <= 20 for f in fields[1:]):
        raise ValueError("bad todo header")
    qp = int(fields[4]) if len(fields) == 5 else 0
    return Todo(int(fields[1]), int(fields[2]), int(fields[3]), data[nl + 1:], qp)
