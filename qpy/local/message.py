"""message — how qpy-local reads the message it was handed: by offset only.

The descriptor a worker gets is the one queue-send passed to qpy-lspawn (never
reopened), and deliveries of one message running at once in different workers
share its open file description, hence its offset. So the header is read here
with pread, and a program, which reads its stdin by offset, gets a private copy.
"""

from __future__ import annotations

import fcntl
import os

CHUNK = 64 * 1024
MAX_HEADER_SCAN = 16 * 1024 * 1024  # the loop check reads at most this much header
MAX_HOPS = 100                      # Received:/Delivered-To: lines; more: a loop (5.4.6)


def looping(msgfd: int, dtline: bytes) -> str | None:
    """Why the message is looping, or None: its header holds exactly our Delivered-To
    line, or more than MAX_HOPS Received:/Delivered-To: lines (a forward fan-out or a
    loop through other hosts that the exact check misses). Read by offset (pread):
    the descriptor's offset may be shared."""
    hops, off, carry = 0, 0, b""
    while off <= MAX_HEADER_SCAN:
        chunk = os.pread(msgfd, CHUNK, off)
        off += len(chunk)
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop() if chunk else b""
        for line in lines:
            if line in (b"", b"\r"):
                return None                      # the end of the header
            if line + b"\n" == dtline:
                return "This message is looping: it already has my Delivered-To line. (#5.4.6)"
            if line[:13].lower().startswith((b"received:", b"delivered-to:")):
                hops += 1
                if hops > MAX_HOPS:
                    return ("This message is looping: it has more than %d Received: and "
                            "Delivered-To: lines. (#5.4.6)" % MAX_HOPS)
        if not chunk or len(carry) > MAX_HEADER_SCAN:
            return None
    return None


def private_copy(msgfd: int) -> int:
    """A sealed, read-only copy of the message with its own offset, for a program's
    stdin: the descriptor qpy-lspawn passed may be shared by deliveries running at
    once (the same open file description), and a program reads by offset."""
    fd = os.memfd_create("qpy-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        off, size = 0, os.fstat(msgfd).st_size
        while off < size:
            n = os.sendfile(fd, msgfd, off, size - off)
            if n == 0:
                break
            off += n
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
