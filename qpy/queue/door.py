"""door — qpy-pickup's side of the queue door for qpy-smtpd (qpy.common.door).

Pickup listens on `queue/door/socket` (SOCK_SEQPACKET). A connection is accepted
only from the uids allowed to hand mail in this way (qpyd, and root; in a one-user
root its user), checked with SO_PEERCRED; the directory (qpyq:qpyd 0750) already
keeps everyone else out. Each connection may have one request outstanding: a
datagram b"Q" carrying exactly one descriptor. Anything else (a second request
before the answer, more or fewer descriptors, a truncated control message, a
datagram that is not b"Q") closes the connection and any descriptor it sent.
A request may propose the message's id (b"Q ID", the id qpy-smtpd wrote into its
Received: line); pickup keeps it under the same rules as a drop file's name
(qpy.common.queue.DropIds), else gives its own, and answers with the one it used.
Connections are capped (MAX_CLIENTS); pickup never blocks on one.

The descriptor is only a source of bytes: pickup checks it as it checks a drop file
(qpy-pickup), and in addition that it is sealed against writes, shrinking and growth
(F_GET_SEALS), so that the bytes it copies are the bytes it checked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from qpy.common import door, unixsock
from qpy.common.log import log
from qpy.common.queue import is_id

MAX_CLIENTS = 512
NEEDED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_UCRED = struct.Struct("3i")
_CTRUNC = int(socket.MSG_CTRUNC)   # an int: IntFlag's & runs in Python


class Request:
    """One message handed in: its descriptor, and the connection to answer on."""

    __slots__ = ("conn", "fd", "uid", "want", "answered")

    def __init__(self, conn: socket.socket, fd: int, uid: int, want: str | None):
        self.conn = conn
        self.fd = fd
        self.uid = uid
        self.want = want          # the id its sender proposes (pickup's rules decide)
        self.answered = False


def sealed(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & NEEDED_SEALS == NEEDED_SEALS
    except OSError:
        return False


class Door:
    def __init__(self, root: str | None, allowed_uids: set[int]):
        self.allowed = allowed_uids
        self.listener: socket.socket | None = None
        if root is not None:
            self.listener = unixsock.bind(door.directory(root), door.LEAF,
                                          socket.SOCK_SEQPACKET, 0o666)
            self.listener.listen(64)
            self.listener.setblocking(False)
        self.clients: dict[int, socket.socket] = {}
        self.uids: dict[int, int] = {}
        self.busy: set[int] = set()            # connections with a request unanswered
        self.pending: list[Request] = []

    @classmethod
    def shut(cls) -> Door:
        """A door nobody can knock at (the socket could not be made)."""
        return cls(None, set())

    def fds(self) -> tuple[int, ...]:
        if self.listener is None:
            return ()
        return (self.listener.fileno(), *(fd for fd in self.clients if fd not in self.busy))

    def service(self, ready: list[int]) -> None:
        """Accept what knocks and take the requests that arrived on ready descriptors."""
        for fd in ready:
            if self.listener is not None and fd == self.listener.fileno():
                self._accept()
            elif fd in self.clients and fd not in self.busy:
                self._receive(self.clients[fd])

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log("warning: door: accept: %s" % e.strerror)
                return
            _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
            if uid not in self.allowed or len(self.clients) >= MAX_CLIENTS:
                log("door: refused a connection from uid %d" % uid)
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn.fileno()] = conn
            self.uids[conn.fileno()] = uid

    def _receive(self, conn: socket.socket) -> None:
        try:
            msg, fds, flags, _ = socket.recv_fds(conn, door.MAX_DATAGRAM, 2)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds, flags = b"", [], 0
        verb, _, want = msg.partition(b" ")
        if verb == door.REQUEST and len(fds) == 1 and not flags & _CTRUNC \
                and (not want or is_id(want.decode("ascii", "replace"))):
            self.busy.add(conn.fileno())
            self.pending.append(Request(conn, fds[0], self.uids[conn.fileno()],
                                        want.decode("ascii") if want else None))
            return
        for fd in fds:
            os.close(fd)
        self._drop(conn)            # end of file, or not the protocol

    def take(self, n: int) -> list[Request]:
        got, self.pending = self.pending[:n], self.pending[n:]
        return got

    def answer(self, req: Request, code: bytes, text: str) -> None:
        """Answer a request (once) and let its descriptor go."""
        if req.answered:
            return
        req.answered = True
        fd = req.conn.fileno()
        self.busy.discard(fd)
        data = code + b" " + text.encode("utf-8", "replace")[:door.MAX_DATAGRAM - 2]
        try:
            req.conn.send(data)
        except OSError:             # the client went away: its session says 451 anyway
            self._drop(req.conn)
        os.close(req.fd)            # after the answer: the client waits for that

    def _drop(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        if fd >= 0:
            self.clients.pop(fd, None)
            self.uids.pop(fd, None)
            self.busy.discard(fd)
        conn.close()

    def close(self) -> None:
        for req in self.pending:
            self.answer(req, door.TEMPORARY, "qpy-pickup is stopping")
        for conn in list(self.clients.values()):
            self._drop(conn)
        if self.listener is not None:
            self.listener.close()
