"""envelope — qmail-queue's envelope format, in one place.

    F sender \\0  (T recipient \\0)*  \\0

It is the envelope on `qpy-queue-inject`'s fd 1, inside drop files and inside the
queue's `todo/` files. `decode` checks every address with the strict parser and
maps every fault to qmail-queue's exit code for it.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

from qpy.common import address
from qpy.common.exits import EXIT_FORMAT, EXIT_READ, EXIT_TOO_LONG

MAX_RECIPIENTS = 100_000    # a bound on one envelope, far past any SMTP session's
MAX_ENVELOPE = MAX_RECIPIENTS * 64



class EnvelopeError(ValueError):
    """A broken envelope; `code` is qmail-queue's exit code for it."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def encode(sender: bytes, recipients: list[bytes]) -> bytes:
    parts = [b"F", sender, b"\0"]
    for r in recipients:
        parts += [b"T", r, b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def _check(addr: bytes, is_sender: bool) -> bytes:
    if len(addr) > address.MAX_ADDRESS:
        raise EnvelopeError(EXIT_TOO_LONG, "address too long")
    if is_sender and addr == b"":
        return addr
    try:
        if is_sender:       # the VERP form `pre@host-@[]` too (qpy.common.address.verp)
            return address.parse_sender(addr, utf8=True, need_domain=False)
        return address.parse_mailbox(addr, utf8=True, need_domain=False)
    except address.AddressError as e:
        raise EnvelopeError(EXIT_FORMAT, "bad address: %s" % e)


def decode(data: bytes) -> tuple[bytes, list[bytes]]:
    """Parse a whole envelope; the data must end exactly at its final NUL."""
    if len(data) > MAX_ENVELOPE:
        raise EnvelopeError(EXIT_FORMAT, "envelope too large")
    if not data:
        raise EnvelopeError(EXIT_READ, "empty envelope")
    if data[0:1] != b"F":
        raise EnvelopeError(EXIT_FORMAT, "envelope does not start with F")
    end = data.find(b"\0")
    if end == -1:
        raise EnvelopeError(EXIT_READ, "envelope truncated in sender")
    sender = _check(data[1:end], True)
    pos = end + 1
    rcpts: list[bytes] = []
    while True:
        if pos >= len(data):
            raise EnvelopeError(EXIT_READ, "envelope truncated")
        kind = data[pos:pos + 1]
        if kind == b"\0":
            if pos + 1 != len(data):
                raise EnvelopeError(EXIT_FORMAT, "bytes after the end of the envelope")
            return sender, rcpts
        if kind != b"T":
            raise EnvelopeError(EXIT_FORMAT, "envelope record is not T")
        end = data.find(b"\0", pos + 1)
        if end == -1:
            raise EnvelopeError(EXIT_READ, "envelope truncated in recipient")
        if len(rcpts) >= MAX_RECIPIENTS:
            raise EnvelopeError(EXIT_FORMAT, "too many recipients")
        rcpts.append(_check(data[pos + 1:end], False))
        pos = end + 1
