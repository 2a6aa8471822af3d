"""dropfile — the format of a file in `queue/drop/`, in one place.

    header (HEADER_LEN bytes): b"QPYDROP2 PID MSGLEN ENVLEN CRC\\n", fixed-width
        fields; CRC is the CRC-32 (zlib.crc32) of the message then the envelope,
        8 hex digits
    the message (MSGLEN bytes)
    the envelope (ENVLEN bytes, qpy.common.envelope)

The header has fixed width so that a writer can stream the message first and
fill in the lengths and the checksum at the end. A reader trusts nothing: the
lengths must add up to the file's size exactly, which also catches a file that
was truncated, and the checksum must match the bytes, which catches a file torn
by a crash before its one fsync returned (never acknowledged: qpy.inject.drop).

Files of the first format, b"QPYDROP1 PID MSGLEN ENVLEN\\n" (V1_HEADER_LEN bytes,
no checksum; their writer fsync'd the data before the rename), are still read:
drop files left by an older qpy are admitted after an upgrade.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import fcntl
import posix
import zlib

MAGIC = b"QPYDROP2"
HEADER_FMT = b"QPYDROP2 %010d %015d %010d %08x\n"
HEADER_LEN = len(HEADER_FMT % (0, 0, 0, 0))
V1_MAGIC = b"QPYDROP1"
V1_HEADER_LEN = len(b"QPYDROP1 %010d %015d %010d\n" % (0, 0, 0))
TMP_PREFIX = "tmp."


class DropError(ValueError):
    """The drop file is malformed; str(e) says how."""


class Header:
    """A parsed header. A plain class: the injectors import this module, and
    `dataclasses` would add about as much start-up time as the interpreter's own."""

    __slots__ = ("pid", "msglen", "envlen", "crc", "length")

    def __init__(self, pid: int, msglen: int, envlen: int, crc: int | None, length: int):
        self.pid = pid
        self.msglen = msglen
        self.envlen = envlen
        self.crc = crc          # None in a QPYDROP1 file
        self.length = length    # of the header itself: the message starts here


def header(pid: int, msglen: int, envlen: int, crc: int) -> bytes:
    return HEADER_FMT % (pid, msglen, envlen, crc)


def build(pid: int, message: bytes, env: bytes) -> bytes:
    """A whole drop file's bytes (for tests and small writers)."""
    return header(pid, len(message), len(env), zlib.crc32(env, zlib.crc32(message))) \
        + message + env


def parse_header(head: bytes, filesize: int) -> Header:
    """The header at the start of `head` (the file's first HEADER_LEN bytes, or all
    of a shorter file), checked against the file size."""
    if head.startswith(V1_MAGIC + b" "):
        head, length, nfields = head[:V1_HEADER_LEN], V1_HEADER_LEN, 4
    else:
        head, length, nfields = head[:HEADER_LEN], HEADER_LEN, 5
    if len(head) != length:
        raise DropError("short header")
    fields = head[:-1].split(b" ")
    if head[-1:] != b"\n" or len(fields) != nfields \
            or fields[0] != (V1_MAGIC if nfields == 4 else MAGIC):
        raise DropError("bad header")
    if not all(f.isdigit() for f in fields[1:4]):
        raise DropError("bad header field")
    crc = None
    if nfields == 5:
        if len(fields[4]) != 8 or fields[4].strip(b"0123456789abcdef"):
            raise DropError("bad header checksum")
        crc = int(fields[4], 16)
    pid, msglen, envlen = (int(f) for f in fields[1:4])
    if length + msglen + envlen != filesize:
        raise DropError("lengths do not match the file size")
    return Header(pid, msglen, envlen, crc, length)


ORPHAN_MIN_AGE = 1.0       # seconds: a younger temporary file is not even opened


def orphaned(dfd: int, name: str, age: float) -> bool:
    """A temporary drop file whose writer is gone: its writer holds a shared flock on
    it from creation to close (qpy.inject.drop), which the kernel drops when the
    writer dies however it dies; nobody else takes a lock on it. Works whatever pid
    namespace the writer ran in, which a pid in the name would not."""
    if age < ORPHAN_MIN_AGE:
        return False
    try:
        fd = posix.open(name, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK
                        | posix.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        posix.close(fd)


def is_final_name(name: str) -> bool:
    """Final drop names are made by qpy.inject: digits and dots only."""
    return 0 < len(name) <= 80 and name.isascii() and \
        all(c.isdigit() or c == "." for c in name) and not name.startswith(".")
