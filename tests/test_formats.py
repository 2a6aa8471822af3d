"""Property tests for the shared formats: envelope, drop file, addresses (in-process)."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpy.common import address, dropfile, envelope
from qpy.common.queue import todo_decode, todo_encode

local = st.from_regex(r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[a-zA-Z0-9_-]{1,10}){0,2}",
                      fullmatch=True)
domain = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,10}){1,3}",
                       fullmatch=True)
mailbox = st.builds(lambda lp, d: (lp + "@" + d).encode(), local, domain)


@given(mailbox | st.just(b""), st.lists(mailbox, max_size=20))
def test_envelope_round_trip(sender, rcpts):
    assert envelope.decode(envelope.encode(sender, rcpts)) == (sender, rcpts)


@given(st.binary(max_size=300))
@settings(max_examples=2000)
def test_envelope_decode_never_crashes(data):
    try:
        sender, rcpts = envelope.decode(data)
    except envelope.EnvelopeError as e:
        assert e.code in (11, 54, 91)
    else:
        assert envelope.decode(envelope.encode(sender, rcpts)) == (sender, rcpts)
        for a in [sender, *rcpts]:
            assert b"\0" not in a and b"\n" not in a and b"\r" not in a


@given(mailbox, st.lists(mailbox, min_size=1, max_size=5), st.integers(0, 200))
def test_envelope_truncation_is_always_detected(sender, rcpts, cut):
    data = envelope.encode(sender, rcpts)
    cut = min(cut, len(data) - 1)
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode(data[:cut])


@given(st.binary(max_size=2000), mailbox, st.lists(mailbox, max_size=5), st.integers(0, 99999))
def test_dropfile_round_trip(msg, sender, rcpts, pid):
    env = envelope.encode(sender, rcpts)
    data = dropfile.build(pid, msg, env)
    h = dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data))
    assert (h.pid, h.msglen, h.envlen, h.length) == (pid, len(msg), len(env),
                                                     dropfile.HEADER_LEN)
    assert h.crc == zlib.crc32(msg + env)
    assert data[h.length:h.length + h.msglen] == msg
    assert envelope.decode(data[h.length + h.msglen:]) == (sender, rcpts)


@given(st.binary(max_size=200), st.integers(0, 99999))
def test_dropfile_v1_still_read(msg, pid):
    env = envelope.encode(b"a@b.example", [b"c@d.example"])
    data = b"QPYDROP1 %010d %015d %010d\n" % (pid, len(msg), len(env)) + msg + env
    h = dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data))
    assert (h.pid, h.msglen, h.envlen, h.crc, h.length) == (
        pid, len(msg), len(env), None, dropfile.V1_HEADER_LEN)
    assert data[h.length:h.length + h.msglen] == msg


@given(st.binary(min_size=0, max_size=dropfile.HEADER_LEN + 10), st.integers(0, 1 << 40))
@settings(max_examples=2000)
def test_dropfile_header_garbage_is_refused_cleanly(head, size):
    try:
        h = dropfile.parse_header(head, size)
    except dropfile.DropError:
        return
    assert h.length + h.msglen + h.envlen == size


@given(st.binary(max_size=10), st.integers(1, 10))
def test_dropfile_size_mismatch_refused(msg, extra):
    env = envelope.encode(b"", [b"a@b.example"])
    data = dropfile.build(1, msg, env)
    with pytest.raises(dropfile.DropError):
        dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data) + extra)
    with pytest.raises(dropfile.DropError):
        dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data) - min(extra, len(data)))


@pytest.mark.parametrize("path,want", [
    (b"<a@b.example>", b"a@b.example"),
    (b"<>", b""),
    (b"<A@B.EXAMPLE>", b"A@b.example"),
    (b'<"quoted local"@b.example>', b'"quoted local"@b.example'),
    (b"<@r1.example,@r2.example:u@d.example>", b"u@d.example"),
    (b"<u@[192.0.2.1]>", b"u@[192.0.2.1]"),
    (b"<u@[IPv6:2001:db8::1]>", b"u@[IPv6:2001:db8::1]"),
])
def test_parse_path_accepts(path, want):
    assert address.parse_path(path) == want


@pytest.mark.parametrize("path", [
    b"a@b.example", b"<a@b.example", b"<() { :;}; echo x@y>", b"<a b@c.example>",
    b"<a@b..example>", b"<a@-b.example>", b"<a\0@b.example>", b"<a\r\n@b.example>",
    b"<\"unterminated@b.example>", b"<a@[300.1.1.1]>", b"<a@[IPv6:zz::1]>", b"<.a@b.example>",
    b"<a.@b.example>", b"<" + b"x" * 65 + b"@b.example>", b"<a@" + b"b" * 64 + b".example>",
    b"<\xc3\xa9@b.example>", b"<a@b.example.>", b"<@x:>",
])
def test_parse_path_refuses(path):
    with pytest.raises(address.AddressError):
        address.parse_path(path)


def test_utf8_addresses_need_smtputf8():
    assert address.parse_path("<é@exämple.org>".encode(), utf8=True) == "é@exämple.org".encode()
    with pytest.raises(address.AddressError):
        address.parse_path(b"<\xff@example.org>", utf8=True)


@given(st.binary(max_size=120))
@settings(max_examples=3000)
def test_parse_path_never_crashes_and_output_is_clean(data):
    for utf8 in (False, True):
        try:
            out = address.parse_path(data, utf8)
        except address.AddressError:
            continue
        assert all(c >= 0x20 and c != 0x7F for c in out)
        assert len(out) <= address.MAX_PATH


@given(st.integers(0, 2**40), st.integers(0, 2**32), st.integers(0, 2**40),
       st.integers(0, 2**31), mailbox, st.lists(mailbox, min_size=1, max_size=5))
def test_todo_record_carries_the_qp(when, uid, size, qp, sender, rcpts):
    env = envelope.encode(sender, rcpts)
    t = todo_decode(todo_encode(when, uid, size, env, qp))
    assert (t.arrival, t.uid, t.size, t.env, t.qp) == (when, uid, size, env, qp)


def test_todo_record_without_qp_still_read():
    """A todo/ID written before the qp joined its header (queue-send reads it after an
    upgrade): qp 0, as the Received: line's qp was 0 when unknown."""
    env = envelope.encode(b"a@x.example", [b"b@y.example"])
    t = todo_decode(b"QPYTODO1 1700000000 0 42\n" + env)
    assert (t.arrival, t.uid, t.size, t.env, t.qp) == (1700000000, 0, 42, env, 0)
    for bad in (b"QPYTODO1 1 2\n", b"QPYTODO1 1 2 3 4 5\n", b"QPYTODO1 1 2 x 4\n",
                b"QPYTODO2 1 2 3 4\n", b"QPYTODO1 1 2 3"):
        with pytest.raises(ValueError):
            todo_decode(bad + env)


@given(st.integers(0, 2**33))
def test_rfc5322_date_reads_back(when):
    """Every date qpy writes (Date:, Received:, bounces) names the same second."""
    import email.utils

    from qpy.common.rfcdate import rfc5322_date
    for local in (False, True):
        text = rfc5322_date(when, local=local)
        assert email.utils.parsedate_to_datetime(text).timestamp() == when, text
    assert rfc5322_date(when, weekday=False) == rfc5322_date(when).split(", ", 1)[1]


def test_log_lines_name_their_program_once(capfd):
    from qpy.common import log
    log.name("qpy-test")
    try:
        log.log("one line\nwith a break")
    finally:
        log.name("")
    log.log("unnamed")
    assert capfd.readouterr().err == "qpy-test: one line with a break\nunnamed\n"
