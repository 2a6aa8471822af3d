"""bench/passmilter.py — a pass-through milter for bench/smtp.py --milter.

SYNOPSIS
    python3 bench/passmilter.py PORT

Listens on 127.0.0.1:PORT, negotiates every step with a reply (the most a
filter can ask of qpy: no SMFIP_NO* or SMFIP_NR_* flags), answers continue to
each, and changes nothing: what it measures is the cost of the protocol itself
(qpy's client, the spool, the round trips), not of any filtering.
"""

from __future__ import annotations

import socketserver
import struct
import sys

ANSWERED = set(b"CHMRTLNBE")


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        f = self.request.makefile("rb")
        while True:
            head = f.read(4)
            if len(head) < 4:
                return
            (n,) = struct.unpack(">I", head)
            packet = f.read(n)
            cmd = packet[:1]
            if cmd == b"O":
                self.request.sendall(struct.pack(">IcIII", 13, b"O", 6, 0, 0))
            elif cmd == b"Q" or not cmd:
                return
            elif cmd[0] in ANSWERED:
                self.request.sendall(b"\x00\x00\x00\x01c")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
