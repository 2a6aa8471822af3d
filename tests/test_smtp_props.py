"""Property tests of the SMTP command and address parsers, the client rules, and a
fixed-seed fuzz run of whole sessions against the real qpy-tcpserver."""

from __future__ import annotations

import os
import random
import re
import socket

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from smtphelp import Client, Listener, drops

from qpy.common import address
from qpy.smtp import authres, command, rules
from qpy.smtp.command import CommandError

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
labels = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
mailboxes = st.builds(lambda local, dom: "%s@%s" % (".".join(local), ".".join(dom)),
                      st.lists(atoms, min_size=1, max_size=3), st.lists(labels, min_size=1,
                                                                        max_size=4))
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(st.binary(max_size=600))
def test_split_line_total(line):
    try:
        verb, arg = command.split_line(line)
    except CommandError as e:
        assert e.code == 500
        assert any(c < 0x20 and c != 9 or c == 0x7F for c in line) or not line.partition(b" ")[0]
        return
    assert verb == verb.upper() and b" " not in verb and verb
    assert line.upper().startswith(verb)


@PROPS
@given(st.binary(max_size=400), st.sampled_from([b"FROM:", b"TO:"]))
def test_path_arg_total(arg, keyword):
    """Any bytes: either a bracketed path and well-formed params, or a CommandError."""
    try:
        path, params = command.parse_path_arg(arg, keyword)
    except CommandError as e:
        assert e.code in (501, 555) and e.text[:2] == "5."
        return
    assert path.startswith(b"<") and path.endswith(b">")
    for key, value in params.items():
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9-]*", key)
        assert value is None or (value and b" " not in value and b"=" not in value)


@PROPS
@given(mailboxes, st.dictionaries(st.sampled_from(["SIZE", "BODY", "SMTPUTF8", "X-Y"]),
                                  st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9]{1,8}\Z")),
                                  max_size=4), st.sampled_from([b"FROM:", b"from: ", b"To:"]))
def test_path_arg_round_trip(box, params, keyword):
    text = b" ".join([b"<%s>" % box.encode()] + [
        k.encode() + (b"=" + v.encode() if v is not None else b"") for k, v in params.items()])
    path, got = command.parse_path_arg(keyword + text, keyword.strip().upper())
    assert path == b"<%s>" % box.encode()
    assert got == {k.encode(): (v.encode() if v is not None else None) for k, v in params.items()}
    assert address.parse_path(path) == address.parse_mailbox(box.encode())


@PROPS
@given(st.binary(max_size=300), st.booleans())
def test_address_parser_total(raw, utf8):
    """parse_path never raises anything but AddressError, and what it returns is clean."""
    try:
        got = address.parse_path(b"<" + raw + b">", utf8=utf8)
    except address.AddressError:
        return
    assert not any(c < 0x20 or c == 0x7F for c in got)
    assert utf8 or all(c < 0x80 for c in got)
    if got:
        assert address.parse_mailbox(got, utf8=utf8) == got     # idempotent


def _dot_string_model(local: bytes, utf8: bool) -> str:
    """The local-part rules one byte at a time (as the parser checked them before its
    bytes.translate fast path): the reason it is refused, or '' when it passes."""
    if not local:
        return "empty local part"
    for atom in local.split(b"."):
        if not atom:
            return "empty atom in local part"
        if any(c not in ATEXT.encode() and not (c >= 0x80 and utf8) for c in atom):
            return "bad character in local part"
    if utf8 and any(c >= 0x80 for c in local):
        try:
            local.decode("utf-8")
        except UnicodeDecodeError:
            return "local part is not UTF-8"
    return ""


def _domain_model(domain: bytes, utf8: bool) -> str:
    """check_domain's rules for a name (no literal) one label at a time: reason or ''."""
    for label in domain.split(b"."):
        if not label or len(label) > address.MAX_LABEL:
            return "bad domain label"
        if label[0] == 0x2D or label[-1] == 0x2D:
            return "domain label starts or ends with a hyphen"
        if any(not (chr(c).isascii() and (chr(c).isalnum() or c == 0x2D))
               and not (c >= 0x80 and utf8) for c in label):
            return "bad character in domain"
    return ""


near_atoms = st.binary(max_size=80) | st.text(alphabet=ATEXT + ".-\x80\xe9 _", max_size=80).map(
    str.encode) | st.text(alphabet="ab-.", max_size=140).map(str.encode)


@PROPS
@given(near_atoms, st.booleans())
def test_local_and_domain_checks_agree_with_the_byte_loop(raw, utf8):
    """The fast path of the local-part and domain checks refuses and passes exactly
    what the byte-by-byte rules do, with the same reason."""
    try:
        address._check_dot_string(raw, utf8)
        got = ""
    except address.AddressError as e:
        got = str(e)
    assert got == _dot_string_model(raw, utf8)
    if raw and not raw.startswith(b"[") and not raw.endswith(b".") \
            and len(raw) <= address.MAX_DOMAIN:
        try:
            out = address.check_domain(raw, utf8)
            got = ""
        except address.AddressError as e:
            got, out = str(e), b""
        want = _domain_model(raw, utf8)
        if want == "" and utf8 and any(c >= 0x80 for c in raw):
            return                          # then its UTF-8 is checked as before
        assert got == want
        if not got:
            assert out == raw.lower()


@PROPS
@given(st.text(alphabet="(){}; :|$`'\"\\<>@x.", max_size=40))
def test_shell_metacharacters_never_slip_through(text):
    try:
        got = address.parse_path(b"<" + text.encode() + b">")
    except address.AddressError:
        return
    if not got:          # <>: the null sender
        return
    local, domain = address.split(got)
    assert domain and (local.startswith(b'"') or b" " not in local)


@PROPS
@given(st.ip_addresses(), st.integers(0, 128))
def test_rules_cidr_and_prefix_agree_with_ipaddress(ip, bits):
    import ipaddress
    assume(ip.version == 4 or ip.ipv4_mapped is None)   # mapped addresses match as IPv4
    bits = min(bits, ip.max_prefixlen)
    net = ipaddress.ip_network("%s/%d" % (ip, bits), strict=False)
    parsed, problems = rules.parse("%s:allow,X=\"1\"\n:deny\n" % net)
    assert problems == []
    assert rules.match(parsed, str(ip)).allow
    other = ipaddress.ip_address(int(net.broadcast_address) + 1) \
        if int(net.broadcast_address) < (2 ** ip.max_prefixlen - 1) else None
    if other is not None:
        assert not rules.match(parsed, str(other)).allow


def test_rules_tcprules_syntax():
    text = ('127.:allow,RELAYCLIENT=""\n::1:allow,RELAYCLIENT="",X=\'a,b\'\n192.0.2.:deny\n'
            '10.1.2.3-7:allow,Y=z\n2001:db8:ab::allow,V6="yes"\n=host.example:deny\n:allow\n')
    parsed, problems = rules.parse(text)
    assert problems == ["line 6: host-name rules need DNS and are not supported"]
    assert rules.match(parsed, "127.0.0.1").env == {"RELAYCLIENT": ""}
    assert rules.match(parsed, "1270.0.0.1") is None    # not an address: no rule at all
    assert rules.match(parsed, "::1").env == {"RELAYCLIENT": "", "X": "a,b"}
    assert not rules.match(parsed, "192.0.2.99").allow
    assert rules.match(parsed, "192.0.20.1").env == {}
    assert rules.match(parsed, "10.1.2.5").env == {"Y": "z"}
    assert rules.match(parsed, "10.1.2.8").env == {}
    assert rules.match(parsed, "2001:db8:ab:0::5").env == {"V6": "yes"}
    assert rules.match(parsed, "2001:db8:abc::5").env == {}
    assert rules.match(parsed, "::ffff:127.0.0.9").env == {"RELAYCLIENT": ""}


# -- fuzzing whole sessions ------------------------------------------------------------------

REPLY = re.compile(rb"\A[2-5][0-9][0-9][ -][\x20-\x7e]*\r\n\Z")
PIECES = [b"HELO x", b"EHLO y", b"MAIL FROM:<a@b.example>", b"MAIL FROM:<>",
          b"RCPT TO:<postmaster@test.example>", b"RCPT TO:<x@elsewhere.example>", b"DATA",
          b"RSET", b"NOOP", b"VRFY a", b"QUIT", b"Subject: x", b".", b"..", b"", b"\r", b"\n",
          b"\r\n.\r\n", b"\n.\n", b"\0", b"\xff\xfe", b"MAIL FROM:<", b"RCPT TO:<\"a>b\"@c>",
          b"SIZE=99999999999999999999999", b" " * 600, b"BDAT 10 LAST", b"STARTTLS"]


# a few seconds in CI; QPY_FUZZ_SESSIONS=100000 for a long run
FUZZ_SESSIONS = int(os.environ.get("QPY_FUZZ_SESSIONS", "600"))


def _fuzz_input(rnd: random.Random) -> bytes:
    out = [b"EHLO fuzz\r\n"] if rnd.random() < 0.8 else []
    for _ in range(rnd.randint(1, 40)):
        piece = rnd.choice(PIECES)
        if rnd.random() < 0.2:
            piece = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 30)))
        out.append(piece + rnd.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b""]))
    return b"".join(out)


@pytest.mark.slow
def test_fuzz_sessions_fixed_seed(qroot):
    """Random sessions: every reply well-formed, no traceback, the server stays up."""
    qroot.control("timeoutsmtpd", "2")
    s = Listener(qroot, ipv6=False)
    rnd = random.Random(20240101)
    try:
        for _ in range(FUZZ_SESSIONS):
            c = Client(s.port, timeout=10)
            try:
                c.send(_fuzz_input(rnd))
                c.sock.shutdown(socket.SHUT_WR)
                while True:
                    try:
                        line = c.line()
                    except (EOFError, OSError):
                        break
                    assert REPLY.match(line), line
            finally:
                c.close()
        assert s.proc.poll() is None
        assert s.wait_idle()
        log = s.log()
        assert "Traceback" not in log and "internal error" not in log
        for msg, _sender, rcpts in drops(qroot):
            assert rcpts and b"\r" not in msg
    finally:
        s.stop()


ar_parts = st.sampled_from([b"\n", b"\n\n", b"Authentication-Results: me.example; dkim=pass\n",
                            b"Authentication-Results: other; spf=pass\n", b"\tfolded\n",
                            b"Subject: s\n", b"body", b"a", b"\r"])


@PROPS
@given(st.lists(ar_parts, max_size=30), st.lists(st.integers(0, 9), max_size=12))
def test_header_gate_same_in_any_pieces(parts, cuts):
    """authres.HeaderGate finds the header's end and removes the fields claiming this
    host alike however the message is cut into writes (the blank line split between
    two pieces among them)."""
    data = b"".join(parts)

    def gate(pieces: list[bytes]) -> tuple[bytes, int]:
        out: list[bytes] = []
        g = authres.HeaderGate(out.append, b"me.example")
        for p in pieces:
            g.write(p)
        g.close()
        return b"".join(out), g.removed

    pieces, pos = [], 0
    for c in cuts:
        pieces.append(data[pos:pos + c])
        pos += c
    pieces.append(data[pos:])
    end = data.find(b"\n\n")
    header = data[:end + 1] if end != -1 else data
    want = authres.strip(header, b"me.example")
    assert gate(pieces) == (want[0] + (data[end + 1:] if end != -1 else b""), want[1])
    assert gate([data]) == gate(pieces)
