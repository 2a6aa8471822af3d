"""trigger — qpy-pickup tells qpy-queue-send of new todo/ID at once (a hint).

qmail-queue pokes qmail-send through the named pipe lock/trigger; here qpy-pickup
sends one datagram per committed batch to `queue/trigger/socket` (AF_UNIX
SOCK_DGRAM), which qpy-queue-send binds. The directory is qpys:qpyq 2750 (setgid:
the socket gets group qpyq) and the socket 0620, so only qpyq and root can send.

    b"N " ID (b" " ID)...   these todo/ID were renamed in (at most MAX_IDS of them)
    b"L"                    list todo/: something may be there that no N named

A datagram is a hint, never a fact. The receiver reads at most MAX_DATAGRAM bytes of
each (a longer one is cut, and so refused), and takes the ids of a well-formed N
(each passing qpy.common.queue.is_id) exactly as it takes a name from a listing of
todo/: todo/ID must exist and pass every check of its reader. Anything else is
ignored (logged once). No hint is needed for safety: queue-send lists todo/ at
start and every RESCAN_SECONDS (qpy.common.watch), so a lost one delays mail by at
most that long. To keep the usual delay short anyway, the sender sends without
waiting (MSG_DONTWAIT), and a hint that cannot go (queue-send not running:
ENOENT, ECONNREFUSED; its queue full: EAGAIN) leaves an L owed, sent at the
sender's next turn and retried every RETRY_SECONDS until it goes.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from qpy.common import unixsock
from qpy.common.log import log
from qpy.common.queue import MAX_ID_LEN, is_id

LEAF = "socket"
SOCKET_MODE = 0o620         # qpys reads, group qpyq (the directory's setgid) sends
MAX_IDS = 100               # ids in one N: a pickup batch holds at most 64
MAX_DATAGRAM = 2 + MAX_IDS * (MAX_ID_LEN + 1)
MAX_READS = 64              # datagrams taken per wake-up; the rest wait for the next
RETRY_SECONDS = 1.0
NEW, LIST = b"N ", b"L"
_QUIET = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)   # queue-send down or busy


def directory(root: str) -> str:
    return os.path.join(root, "queue", "trigger")


def parse(data: bytes) -> tuple[list[str], bool] | None:
    """(ids, list wanted) of one datagram; None when it is not well formed."""
    if data == LIST:
        return [], True
    if len(data) > MAX_DATAGRAM or not data.startswith(NEW):
        return None
    words = data[len(NEW):].split(b" ")
    if len(words) > MAX_IDS:
        return None
    ids = [w.decode("ascii") for w in words if w.isascii()]
    if len(ids) != len(words) or not all(is_id(i) for i in ids):
        return None
    return ids, False


class Sender:
    """qpy-pickup's end. new() after each commit; settle() at every loop turn."""

    def __init__(self, root: str):
        self.owed = False           # a hint could not go: an L is owed
        self._next_try = 0.0
        self._warned: set[int] = set()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._dir: unixsock.InDir | None = unixsock.InDir(directory(root))
            self._addr = self._dir.name(LEAF)
        except OSError as e:        # a root made before the trigger: rescans only
            log("warning: no %s (%s): queue-send finds new mail by its rescans"
                % (directory(root), e.strerror))
            self._dir = None

    def new(self, ids: list[str]) -> None:
        """Tell of these todo/ID; when that fails, an L is owed."""
        for at in range(0, len(ids), MAX_IDS):
            if not self._send(NEW + " ".join(ids[at:at + MAX_IDS]).encode()):
                self.owe()
                return

    def owe(self) -> None:
        """Owe an L (at start: journal recovery may have renamed todo/.tmp.ID)."""
        if self._dir is not None:
            self.owed = True

    def settle(self) -> None:
        """Send an owed L when its retry is due."""
        now = time.monotonic()
        if self.owed and now >= self._next_try:
            self.owed = not self._send(LIST)
            self._next_try = now + RETRY_SECONDS

    def timeout(self, t: float) -> float:
        """t, or less when an owed L is due sooner."""
        return min(t, max(0.0, self._next_try - time.monotonic())) if self.owed else t

    def _send(self, data: bytes) -> bool:
        if self._dir is None:
            return False
        try:
            self._sock.sendto(data, socket.MSG_DONTWAIT, self._addr)
            return True
        except OSError as e:
            if e.errno not in _QUIET and e.errno not in self._warned:
                self._warned.add(e.errno)   # once per errno: the log stays small
                log("warning: cannot send to %s: %s" % (self._addr, e.strerror))
            return False

    def close(self) -> None:
        self._sock.close()
        if self._dir is not None:
            os.close(self._dir.fd)
            self._dir = None


class Receiver:
    """qpy-queue-send's end: the hints source of a qpy.common.watch.Watcher."""

    def __init__(self, root: str):
        self.sock = unixsock.bind(directory(root), LEAF, socket.SOCK_DGRAM, SOCKET_MODE)
        self.sock.setblocking(False)
        self._warned = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self) -> tuple[list[str], bool]:
        """The ids hinted since the last call, and whether a listing is wanted."""
        names: list[str] = []
        rescan = False
        for _ in range(MAX_READS):
            try:
                data = self.sock.recv(MAX_DATAGRAM + 1)
            except OSError:             # nothing more (EAGAIN), or nothing to read
                break
            hint = parse(data)
            if hint is None:
                if not self._warned:    # once: a flood of them must not flood the log
                    self._warned = True
                    log("warning: trigger: ignored a malformed hint of %d bytes" % len(data))
                continue
            names.extend(hint[0])
            rescan = rescan or hint[1]
        return names, rescan

    def close(self) -> None:
        self.sock.close()


def listen(root: str) -> Receiver | None:
    """The receiver, or None (logged) when the socket cannot be bound: the caller
    must then watch todo/ another way."""
    try:
        return Receiver(root)
    except OSError as e:
        log("warning: cannot bind %s/%s (%s): todo/ is watched by inotify"
            % (directory(root), LEAF, e.strerror))
        return None
