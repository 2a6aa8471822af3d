"""envelope — qmail-queue's envelope format, in one place.

    F sender \\0  [P mail-params \\0]  (T recipient \\0 [Q rcpt-params \\0])*  \\0

It is the envelope on `qpy-queue-inject`'s fd 1, inside drop files and inside the
queue's `todo/` files. `decode` checks every address with the strict parser and
maps every fault to qmail-queue's exit code for it.

The P and Q records carry the DSN parameters (RFC 3461) of the message and of the
recipient before them, in their canonical form (qpy.common.dsnparam): at most one
P, right after F, and at most one Q after each T, never empty. An envelope
without them (qmail's, or one queued before they existed) means no parameters.
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


def encode(sender: bytes, recipients: list[bytes], mail: bytes = b"",
           rcpt: list[bytes] | None = None) -> bytes:
    """`mail`: the message's DSN parameters; `rcpt`: each recipient's (b"": none)."""
    parts = [b"F", sender, b"\0"]
    if mail:
        parts += [b"P", mail, b"\0"]
    for n, r in enumerate(recipients):
        parts += [b"T", r, b"\0"]
        if rcpt and rcpt[n]:
            parts += [b"Q", rcpt[n], b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


class Envelope:
    """A decoded envelope with its DSN parameters (b"" where none were given)."""

    __slots__ = ("sender", "recipients", "mail", "rcpt")

    def __init__(self, sender: bytes, recipients: list[bytes], mail: bytes = b"",
                 rcpt: list[bytes] | None = None):
        self.sender = sender
        self.recipients = recipients
        self.mail = mail
        self.rcpt = rcpt if rcpt is not None else [b""] * len(recipients)

    def encode(self) -> bytes:
        return encode(self.sender, self.recipients, self.mail, self.rcpt)

    def with_recipients(self, sender: bytes, recipients: list[bytes]) -> "Envelope":
        """The envelope a filter left: a recipient it kept keeps its parameters."""
        if recipients == self.recipients:
            return Envelope(sender, recipients, self.mail, self.rcpt)
        kept = dict(zip(self.recipients, self.rcpt, strict=True))
        return Envelope(sender, recipients, self.mail, [kept.get(r, b"") for r in recipients])


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


def _params(data: bytes, pos: int, kind: bytes) -> tuple[bytes, int]:
    """The P or Q record at pos, if there is one: (its parameters, the next pos)."""
    if data[pos:pos + 1] != kind:
        return b"", pos
    from qpy.common import dsnparam  # only for an envelope with DSN: front ends start small
    check = dsnparam.mail_params if kind == b"P" else dsnparam.rcpt_params
    end = data.find(b"\0", pos + 1)
    if end == -1:
        raise EnvelopeError(EXIT_READ, "envelope truncated in DSN parameters")
    value = data[pos + 1:end]
    try:
        if not value:
            raise dsnparam.DsnError("empty")
        check(value)
    except dsnparam.DsnError as e:
        raise EnvelopeError(EXIT_FORMAT, "bad DSN parameters: %s" % e)
    return value, end + 1


def decode(data: bytes) -> tuple[bytes, list[bytes]]:
    """Parse a whole envelope; the data must end exactly at its final NUL."""
    env = decode_all(data)
    return env.sender, env.recipients


def decode_all(data: bytes) -> Envelope:
    """decode() with the DSN parameters."""
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
    mail, pos = _params(data, end + 1, b"P")
    rcpts: list[bytes] = []
    rparams: list[bytes] = []
    while True:
        if pos >= len(data):
            raise EnvelopeError(EXIT_READ, "envelope truncated")
        kind = data[pos:pos + 1]
        if kind == b"\0":
            if pos + 1 != len(data):
                raise EnvelopeError(EXIT_FORMAT, "bytes after the end of the envelope")
            return Envelope(sender, rcpts, mail, rparams)
        if kind != b"T":
            raise EnvelopeError(EXIT_FORMAT, "envelope record is not T")
        end = data.find(b"\0", pos + 1)
        if end == -1:
            raise EnvelopeError(EXIT_READ, "envelope truncated in recipient")
        if len(rcpts) >= MAX_RECIPIENTS:
            raise EnvelopeError(EXIT_FORMAT, "too many recipients")
        rcpts.append(_check(data[pos + 1:end], False))
        value, pos = _params(data, end + 1, b"Q")
        rparams.append(value)
