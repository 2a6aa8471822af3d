"""encode — the message as SMTP DATA, and what the message needs of the peer.

Used by qpy-remote and qpy-rspawn's workers (as `qpyr`); no program of its own.
The message is read from an open fd with pread (never a path: qpyr cannot open
queue/mess/), in CHUNK-sized pieces, as many times as a delivery needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

CHUNK = 64 * 1024


def scan(fd: int) -> tuple[int, bool, bool]:
    """(size, 8-bit bytes in the header, 8-bit bytes in the body) of the message."""
    size = os.fstat(fd).st_size
    off, head8, body8, in_head, tail = 0, False, False, True, b""
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            break
        off += len(chunk)
        if in_head:
            data = tail + chunk
            end = min((i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i != -1),
                      default=-1)
            if end == -1:
                head8 = head8 or not data.isascii()
                tail = data[-2:]
                continue
            head8 = head8 or not data[:end].isascii()
            body8 = not data[end:].isascii()
            in_head = False
        elif not body8:
            body8 = not chunk.isascii()
    return max(size, off), head8, body8


def chunks(fd: int) -> Iterator[bytes]:
    """The message on `fd`, from its start, in CHUNK-sized pieces."""
    off = 0
    while True:
        chunk = os.pread(fd, CHUNK, off)
        if not chunk:
            return
        off += len(chunk)
        yield chunk


def smtp_data(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The message as DATA: CRLF line ends, dot-stuffed, ending with CRLF . CRLF."""
    carry, at_start = b"", True
    for chunk in pieces:
        data = carry + chunk
        carry = b""
        if data.endswith(b"\r"):        # maybe half of a CRLF: decide with the next chunk
            data, carry = data[:-1], b"\r"
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            continue
        if at_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        at_start = data.endswith(b"\n")
        yield data.replace(b"\n", b"\r\n")
    if carry:
        at_start = True
        yield b"\r\n"
    yield b".\r\n" if at_start else b"\r\n.\r\n"
