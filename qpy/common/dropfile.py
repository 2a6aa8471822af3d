"""dropfile — the format of a file in `queue/drop/`, in one place.

    header (HEADER_LEN bytes): b"QPYDROP1 PID MSGLEN ENVLEN\\n", fixed-width fields
    the message (MSGLEN bytes)
    the envelope (ENVLEN bytes, qpy.common.envelope)

The header has fixed width so that a writer can stream the message first and
fill in the lengths at the end. A reader trusts nothing: the lengths must add up
to the file's size exactly, which also catches a file that was truncated.
"""

from __future__ import annotations

MAGIC = b"QPYDROP1"
HEADER_FMT = b"QPYDROP1 %010d %015d %010d\n"
HEADER_LEN = len(HEADER_FMT % (0, 0, 0))
TMP_PREFIX = "tmp."


class DropError(ValueError):
    """The drop file is malformed; str(e) says how."""


def header(pid: int, msglen: int, envlen: int) -> bytes:
    return HEADER_FMT % (pid, msglen, envlen)


def parse_header(head: bytes, filesize: int) -> tuple[int, int, int]:
    """(pid, message length, envelope length), checked against the file size."""
    if len(head) != HEADER_LEN:
        raise DropError("short header")
    fields = head[:-1].split(b" ")
    if head[-1:] != b"\n" or len(fields) != 4 or fields[0] != MAGIC:
        raise DropError("bad header")
    if not all(f.isdigit() for f in fields[1:]):
        raise DropError("bad header field")
    pid, msglen, envlen = (int(f) for f in fields[1:])
    if HEADER_LEN + msglen + envlen != filesize:
        raise DropError("lengths do not match the file size")
    return pid, msglen, envlen


def is_final_name(name: str) -> bool:
    """Final drop names are made by qpy.inject: digits and dots only."""
    return 0 < len(name) <= 80 and name.isascii() and \
        all(c.isdigit() or c == "." for c in name) and not name.startswith(".")
