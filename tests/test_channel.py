"""The DATA reader (qpy.smtp.channel.Channel.read_data) against a line-by-line model.

read_data splits what it has read at CRLF and hands the message on in pieces, never
holding it whole; the model below takes the whole input and applies the rules one
CRLF-delimited line at a time, as RFC 5321 states them: the data ends at
<CRLF>.<CRLF> and nothing else, a leading dot is removed, CRLF becomes LF, a CR or LF
outside a CRLF pair marks the message bad, and Received:/Delivered-To: lines in the
header are counted. Both must agree on every input and every way it is cut into reads:
this is the code that stands between a client and SMTP smuggling.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpy.smtp.channel import PIECE, Channel, Closed

PROPS = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def model(data: bytes) -> tuple[bytes, bool, int, bytes] | None:
    """(message, bad, hops, bytes left after the end) or None: no end in data."""
    out, bad, hops, header = [], False, 0, True
    pos = 0
    while True:
        nl = data.find(b"\r\n", pos)
        if nl == -1:
            return None
        line, pos = data[pos:nl], nl + 2
        if line == b".":
            return b"".join(out), bad, hops, data[pos:]
        if line[:1] == b".":
            line = line[1:]
        if header:
            if not line:
                header = False
            elif line[:13].lower().startswith((b"received:", b"delivered-to:")):
                hops += 1
        bad = bad or b"\r" in line or b"\n" in line
        out.append(line + b"\n")


class Fed(Channel):
    """A Channel reading from a list of chunks instead of a descriptor."""

    def __init__(self, chunks: list[bytes]):
        super().__init__(-1, -1, 1.0)
        self.chunks = chunks

    def recv_raw(self, n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def flush(self) -> None:
        pass


def run(chunks: list[bytes]) -> tuple[bytes, bool, int, bytes] | None:
    ch = Fed(list(chunks))
    got: list[bytes] = []
    try:
        bad, hops = ch.read_data(got.append)
    except Closed:
        return None
    return b"".join(got), bad, hops, bytes(ch.inbuf) + b"".join(ch.chunks)


pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.\r\n", b"\n.\n",
                          b"\r\n.", b".\r\n", b"Received: x", b"DELIVERED-TO: y", b"a",
                          b"body text", b"\r\n\r\n", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n"])


@PROPS
@given(st.lists(pieces, max_size=40), st.lists(st.integers(1, 12), max_size=10))
def test_read_data_agrees_with_the_line_model(parts, cuts):
    data = b"".join(parts)
    chunks, pos = [], 0
    for c in cuts:                      # the same bytes, read in arbitrary pieces
        chunks.append(data[pos:pos + c])
        pos += c
    chunks.append(data[pos:])
    chunks = [c for c in chunks if c]
    want = model(data)
    got = run(chunks)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert got[:3] == want[:3]
        assert got[3] == want[3]          # pipelined commands after the end stay unread


def test_long_line_passes_through_in_pieces():
    """A line longer than PIECE is handed on in pieces; its dot rule and the end still
    hold (the line-start state crosses the piece boundary)."""
    line = b"." + b"x" * (PIECE * 2 + 7)
    data = b"Subject: s\r\n\r\n" + line + b"\r\n..\r\n.\r\nQUIT\r\n"
    assert run([data[i:i + 4096] for i in range(0, len(data), 4096)]) == model(data)
    got = run([data])
    assert got is not None and got[0].endswith(b"x\n.\n") and got[3] == b"QUIT\r\n"


SAMPLE = (b"Received: from a\r\n.Delivered-To: b\r\nSubject: s\r\n\r\n..stuffed\r\n.\r\r\n"
          b"bare\nLF\r\n\r\n.x\r\n.\r\nMAIL FROM:<a@b>\r\n")


def test_every_cut_of_the_end_and_of_crlf():
    """The reader works on whole buffers: a CRLF, a stuffed dot or the final
    <CRLF>.<CRLF> cut between two reads at any byte, or the input read one byte at a
    time, gives what the line model gives."""
    want = model(SAMPLE)
    assert want is not None and want[1] and want[2] == 2 and want[3] == b"MAIL FROM:<a@b>\r\n"
    for cut in range(1, len(SAMPLE)):
        assert run([SAMPLE[:cut], SAMPLE[cut:]]) == want, cut
    assert run([SAMPLE[i:i + 1] for i in range(len(SAMPLE))]) == want


def test_clean_message_in_one_read():
    data = b"Subject: s\r\n\r\nline\r\n..dot\r\n.\r\n"
    assert run([data]) == (b"Subject: s\n\nline\n.dot\n", False, 0, b"")
    assert run([b".\r\n"]) == (b"", False, 0, b"")


def test_line_at_the_command_limit():
    """read_line: a line of exactly `limit` bytes with its CRLF is a line; one byte more
    is too long, and the line after it is read as it should be, in one read or in
    one-byte reads."""
    limit = 20
    exact = b"x" * (limit - 2) + b"\r\n"
    over = b"y" * (limit - 1) + b"\r\n"
    data = exact + over + b"NOOP\r\n"
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        ch = Fed(list(chunks))
        assert ch.read_line(limit) == (b"x" * (limit - 2), False)
        assert ch.read_line(limit) == (b"", True)
        assert ch.read_line(limit) == (b"NOOP", False)
