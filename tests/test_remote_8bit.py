"""8-bit messages to peers without 8BITMIME: MIME parts made quoted-printable
(qpy.remote.encode's 7-bit conversion), through the real qpy-rspawn to aiosmtpd
without 8BITMIME and Postfix's smtp-sink -8: binary-ish text (NUL, bare CR, 0xFF,
trailing blanks, a 7 KB line), a multipart labelled 8bit, a message/rfc822 part,
a base64 part and an ASCII part left alone; test_outbound has more cases.
"""

from __future__ import annotations

import base64
import email
import email.policy

import qpytest
import test_remote
from remote_peers import SmtpSink
from test_remote import PEER, Recorder

# test_remote's fixtures: a DNS server, a free port, aiosmtpd peers, qpy-rspawn on a root
dnssrv, port, aiopeer, stack = test_remote.dnssrv, test_remote.port, test_remote.aiopeer, \
    test_remote.stack

pytestmark = qpytest.needs_root

TEXT8 = ("Gr\u00fc\u00dfe aus K\u00f6ln, caf\u00e9 ".encode() * 200 + b"\n"     # one 7 KB line
         + b"binary-ish: \x00\x01\x7f\xff\xfe bare\rCR, trailing blank \n"
         + b".a line with a leading dot\n" + b"x" * 1500 + b"\n")
BLOB = bytes(range(256)) * 8


class Seven(Recorder):
    """A Recorder whose EHLO does not offer 8BITMIME."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [r for r in responses if "8BITMIME" not in r]


def seven_bit(content: bytes) -> None:
    """What a 7-bit peer may receive: ASCII, no line over 998 bytes."""
    assert content.isascii()
    assert max(len(ln) for ln in content.replace(b"\r\n", b"\n").split(b"\n")) <= 998


def parse(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.compat32)


def decoded(part: email.message.Message) -> bytes:
    """The part's body decoded, with the wire's CRLF line ends as the queue's LF."""
    return part.get_payload(decode=True).replace(b"\r\n", b"\n")


def test_plain_8bit_message_made_quoted_printable(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Seven()
    aiopeer(h, enable_SMTPUTF8=False)
    head = b"From: a@test.example\nTo: x@a.test\nSubject: greetings\n"
    res = rs.deliver([b"x@a.test"], msg=head + b"\n" + TEXT8)
    assert res[0][0] == b"K", res
    assert "BODY=8BITMIME" not in h.mail_options[-1]
    content = h.messages[-1][2]
    seven_bit(content)
    assert content.startswith(head.replace(b"\n", b"\r\n"))     # the header as it was
    m = parse(content)
    assert m["Content-Transfer-Encoding"] == "quoted-printable"
    assert m["MIME-Version"] == "1.0"
    assert decoded(m) == TEXT8


def test_multipart_parts_converted_others_untouched(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Seven()
    aiopeer(h, enable_SMTPUTF8=False)
    b64 = base64.encodebytes(BLOB)
    ascii_part = (b"Content-Type: text/plain; charset=us-ascii\n\n"
                  b"seven-bit text stays as it is\n")
    inner = b"Subject: forwarded\nMIME-Version: 1.0\nContent-Type: text/plain\n\n" \
            b"inner caf\xc3\xa9\n"
    msg = (b"From: a@test.example\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/mixed; boundary=\"=-b1\"\n"
           b"Content-Transfer-Encoding: 8bit\n\n"
           b"This is a MIME message.\n"
           b"--=-b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           + TEXT8 + b"\n--=-b1\n" + ascii_part
           + b"\n--=-b1\nContent-Type: application/octet-stream\n"
           b"Content-Transfer-Encoding: base64\n\n" + b64
           + b"\n--=-b1\nContent-Type: message/rfc822\n\n" + inner
           + b"\n--=-b1--\nepilogue\n")
    res = rs.deliver([b"x@a.test"], msg=msg)
    assert res[0][0] == b"K", res
    content = h.messages[-1][2]
    seven_bit(content)
    crlf = content.replace(b"\r\n", b"\n")
    assert ascii_part in crlf and b64 in crlf and b"This is a MIME message.\n" in crlf
    m = parse(content)
    assert m["Content-Transfer-Encoding"] == "7bit"
    text, plain, blob, rfc822 = m.get_payload()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert decoded(text) == TEXT8
    assert decoded(plain) == b"seven-bit text stays as it is\n"
    assert blob.get_payload(decode=True) == BLOB
    fwd = rfc822.get_payload()[0]
    assert fwd["Subject"] == "forwarded"
    assert decoded(fwd) == b"inner caf\xc3\xa9\n"


def test_8bit_peer_gets_the_message_unchanged(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    msg = b"From: a@test.example\nSubject: s\n\n" + b"caf\xc3\xa9 \x00\xff bare\rCR\n" * 50
    res = rs.deliver([b"x@a.test"], msg=msg)
    assert res[0][0] == b"K", res
    assert "BODY=8BITMIME" in h.mail_options[-1]
    assert h.messages[-1][2] == msg.replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def test_what_cannot_be_converted_bounces(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Seven()
    aiopeer(h, enable_SMTPUTF8=False)
    cases = {
        b"8-bit bytes in a header (that needs SMTPUTF8)":
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
            b"--b\nContent-Description: caf\xc3\xa9\n\nbody \xc3\xa9\n--b--\n",
        b"declared base64":
            b"MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n\nAAA\xff\n",
        b"without a boundary":
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed\n\nbody \xc3\xa9\n",
    }
    for why, msg in cases.items():
        res = rs.deliver([b"x@a.test"], msg=msg)
        assert res[0][0] == b"D", res
        assert b"cannot be converted to 7 bits" in res[0][1] and why in res[0][1], res
        assert b"#5.6.3" in res[0][1]
    assert not h.messages


def test_smtp_sink_without_8bitmime_gets_quoted_printable(stack):
    qroot, dnssrv, port, rs = stack
    sink = SmtpSink(PEER, port, "-8")        # Postfix's smtp-sink, no 8BITMIME
    try:
        res = rs.deliver([b"x@a.test"], msg=b"Subject: s\n\n" + TEXT8)
        assert res[0][0] == b"K", res
        got = sink.messages()
        assert len(got) == 1
        body = got[0].partition(b"Subject: s")[2]
        seven_bit(body)
        assert b"Content-Transfer-Encoding: quoted-printable" in body
        assert decoded(parse(b"Subject: s" + body)) == TEXT8 + b"\n"     # the sink adds one
    finally:
        sink.stop()
