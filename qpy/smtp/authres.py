"""authres — Authentication-Results fields that claim this host, removed (RFC 8601 §5).

Only this host's own filters may say what this host verified: an
Authentication-Results field that arrives from outside with this host's
authserv-id (control/me, which the filters get as macro `j` and use unless
configured otherwise) is removed before the message is queued or shown to
the filters. Fields with any other authserv-id are left alone.

`HeaderGate` does it for mail that no filter sees: it holds the header
section as it streams in (at most MAX_HEADER bytes; past that the rest is
passed on untouched, as no mail client reads so far), drops the forged
fields, and passes the body on as it comes.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_HEADER = 1024 * 1024
FIELD = b"authentication-results"


def authserv_id(value: bytes) -> bytes:
    """The authserv-id of an Authentication-Results value (before ';', no version)."""
    words = value.split(b";", 1)[0].split()
    return words[0].lower() if words else b""


def forged(name: bytes, raw: bytes, me: bytes) -> bool:
    """True for an Authentication-Results field (raw: its whole lines) claiming me."""
    if name.strip().lower() != FIELD:
        return False
    return authserv_id(raw[raw.index(b":") + 1:].replace(b"\n", b" ")) == me.lower()


def strip(header: bytes, me: bytes) -> tuple[bytes, int]:
    """The header section (LF line ends) without forged fields; how many went."""
    if FIELD not in header.lower():
        return header, 0
    out, removed = [], 0
    fields: list[list[bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    for lines in fields:
        raw = b"".join(lines)
        name, colon, _ = raw.partition(b":")
        if colon and forged(name, raw, me):
            removed += 1
            continue
        out.append(raw)
    return b"".join(out), removed


class HeaderGate:
    """A write() in front of another: the header section is held, cleaned, passed.
    Each piece is searched once for the header's end (a header trickled in a line at
    a time costs its length, not its length times its lines)."""

    def __init__(self, write: Callable[[bytes], None], me: bytes):
        self.write_on = write
        self.me = me
        self.held: list[bytes] | None = []
        self.size = 0
        self.removed = 0

    def write(self, piece: bytes) -> None:
        held = self.held
        if held is None:
            self.write_on(piece)
            return
        if not piece:
            return
        if held and held[-1][-1:] == b"\n" and piece[:1] == b"\n":
            end = self.size - 1            # the blank line began in the last piece
        else:
            end = piece.find(b"\n\n")
            end = -1 if end == -1 else self.size + end
        held.append(piece)
        self.size += len(piece)
        if end == -1 and self.size <= MAX_HEADER:
            return
        data = b"".join(held)
        self.held = None
        if end == -1:
            self.write_on(data)
            return
        header, self.removed = strip(data[:end + 1], self.me)
        self.write_on(header + data[end + 1:])

    def close(self) -> None:
        """The end of the data: whatever is still held (a message without a body)."""
        if self.held:
            data = b"".join(self.held)
            self.held = None
            header, self.removed = strip(data, self.me)
            self.write_on(header)
