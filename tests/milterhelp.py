"""milterhelp — a milter (the filter side), written by hand for the tests.

`ScriptFilter` listens on loopback TCP (or a Unix socket) in a thread of the test
process and speaks the filter side of the milter protocol: it answers option
negotiation with the actions and steps the test gives, records every packet it
gets (command byte, data) per connection, and answers each with what the test's
`script(cmd, data)` returns: a list of raw reply packets (bytes: reply byte +
data), or one of the words 'hang', 'close', 'garbage'. The default script
answers 'c' (continue) to everything that expects an answer.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

from smtphelp import Listener

NEEDS_REPLY = set(b"CHMRTLNBE")   # commands that get an answer (unless NR_ was negotiated)
NR_FLAGS = {ord("C"): 0x1000, ord("H"): 0x2000, ord("M"): 0x4000, ord("R"): 0x8000,
            ord("T"): 0x10000, ord("N"): 0x40000, ord("B"): 0x80000, ord("L"): 0x80}


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def addheader(name: bytes, value: bytes) -> bytes:
    return b"h" + name + b"\0" + value + b"\0"


def insheader(index: int, name: bytes, value: bytes) -> bytes:
    return b"i" + struct.pack(">I", index) + name + b"\0" + value + b"\0"


def chgheader(index: int, name: bytes, value: bytes) -> bytes:
    return b"m" + struct.pack(">I", index) + name + b"\0" + value + b"\0"


class ScriptFilter:
    def __init__(self, script=None, actions: int = 0x1FF, steps: int = 0,
                 version: int = 6, unix: str | None = None, optneg_extra: bytes = b""):
        self.script = script or (lambda cmd, data: [b"c"])
        self.actions, self.steps, self.version = actions, steps, version
        self.optneg_extra = optneg_extra
        self.connections: list[list[tuple[bytes, bytes]]] = []
        self.lock = threading.Lock()
        self.stopping = False
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix)
            os.chmod(unix, 0o666)
            self.endpoint = "unix:" + unix
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.endpoint = "inet:127.0.0.1:%d" % self.sock.getsockname()[1]
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def commands(self, n: int = -1) -> list[tuple[bytes, bytes]]:
        with self.lock:
            return list(self.connections[n]) if self.connections else []

    def all_commands(self) -> list[tuple[bytes, bytes]]:
        with self.lock:
            return [c for conn in self.connections for c in conn]

    def stop(self) -> None:
        self.stopping = True
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket) -> tuple[bytes, bytes] | None:
        head = b""
        while len(head) < 4:
            d = conn.recv(4 - len(head))
            if not d:
                return None
            head += d
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            d = conn.recv(n - len(body))
            if not d:
                return None
            body += d
        return body[:1], body[1:]

    def _serve(self, conn: socket.socket) -> None:
        log: list[tuple[bytes, bytes]] = []
        with self.lock:
            self.connections.append(log)
        try:
            while True:
                got = self._read(conn)
                if got is None:
                    return
                cmd, data = got
                with self.lock:
                    log.append((cmd, data))
                if cmd == b"O":
                    if self.version == 0:       # garbage instead of an answer
                        conn.sendall(b"\xff\xff\xff\xffgarbage")
                        continue
                    words = struct.pack(">III", self.version, self.actions, self.steps)
                    conn.sendall(packet(b"O", words + self.optneg_extra))
                    continue
                if cmd == b"Q":
                    return
                c = cmd[0]
                if c not in NEEDS_REPLY or (c in NR_FLAGS and self.steps & NR_FLAGS[c]):
                    continue
                answer = self.script(cmd, data)
                if answer == "hang":
                    while self._read(conn) is not None:   # never answers; waits for close
                        pass
                    return
                if answer == "close":
                    return
                if answer == "progress":          # SMFIR_PROGRESS every 0.2 s, forever
                    conn.settimeout(0.2)
                    while not self.stopping:
                        try:
                            conn.sendall(packet(b"p"))
                            if not conn.recv(4096):
                                return
                        except TimeoutError:
                            continue
                    return
                if answer == "garbage":
                    conn.sendall(b"\x00\x00\x00\x05Zjunk")
                    continue
                conn.sendall(b"".join(packet(a[:1], a[1:]) for a in answer))
        except OSError:
            return
        finally:
            conn.close()


class Listeners:
    """qpy-tcpserver listeners (IPv4) a test starts, with control/milters naming
    the given filters (each with `opts`, or the whole file `control`)."""

    def __init__(self, qroot):
        self.qroot = qroot
        self.made: list[Listener] = []

    def start(self, *filters, opts: str = "", control: str | None = None) -> Listener:
        if filters or control is not None:
            self.qroot.control("milters", control if control is not None else "\n".join(
                ("%s %s" % (f.endpoint, opts)).strip() for f in filters))
        s = Listener(self.qroot, ipv6=False)
        self.made.append(s)
        return s

    def stop(self) -> None:
        for s in self.made:
            s.stop()
