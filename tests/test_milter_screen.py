"""The cheap checks before filters, with real sockets: DNS blocklists answered by the
test DNS server (control/resolvers), RBLSMTPD from smtprules, the pregreet test,
and per-client rate limits in qpy-tcpserver."""

from __future__ import annotations

import time

import pytest
import qpytest
from milterhelp import Listeners
from remote_peers import DNSServer
from smtphelp import Client

RULES = ('127.0.0.1:allow,RELAYCLIENT=""\n'
         '127.0.0.6:allow,RBLSMTPD="-Go away, said the rules"\n'
         '127.0.0.7:allow,RBLSMTPD=""\n'
         '127.0.0.8:allow,RBLSMTPD="Come back later"\n'
         ':allow\n')


@pytest.fixture
def dnsd():
    d = DNSServer()
    yield d
    d.stop()


@pytest.fixture
def server(qroot):
    ls = Listeners(qroot)
    yield ls.start
    ls.stop()


def rcpt_reply(port: int, source: str, rcpt: bytes = b"postmaster@test.example") -> bytes:
    c = Client(port, source=source)
    try:
        c.hello()
        assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
        return c.cmd(b"RCPT TO:<%s>" % rcpt)
    finally:
        c.close()


def test_dnsbl_refuses_rcpt_with_the_lists_reason(qroot, server, dnsd):
    for last in (5, 6, 7, 8, 1):
        dnsd.add("%d.0.0.127.bl.test" % last, "A", "127.0.0.2")
        dnsd.add("%d.0.0.127.bl.test" % last, "TXT", '"listed: see https://bl.test/%d"' % last)
    dnsd.add("9.0.0.127.codes.test", "A", "127.0.0.4")
    dnsd.add("10.0.0.127.codes.test", "A", "127.0.0.3")
    dnsd.add("11.0.0.127.bl.test", "A", "10.0.0.1")   # not a 127/8 answer: not listed
    qroot.control("resolvers", "127.0.0.1:%d" % dnsd.port)
    qroot.control("rbls", "codes.test=127.0.0.2,127.0.0.3\nbl.test\n")
    qroot.control("smtprules", RULES)
    s = server()
    r = rcpt_reply(s.port, "127.0.0.5")
    assert r.startswith(b"554 5.7.1 Service unavailable; Client host [127.0.0.5] blocked "
                        b"using bl.test; listed: see https://bl.test/5"), r
    assert rcpt_reply(s.port, "127.0.0.9").startswith(b"250")      # 127.0.0.4: not wanted
    assert rcpt_reply(s.port, "127.0.0.10").startswith(b"554 5.7.1")
    assert b"codes.test" in rcpt_reply(s.port, "127.0.0.10")
    assert rcpt_reply(s.port, "127.0.0.11").startswith(b"250")
    assert rcpt_reply(s.port, "127.0.0.1").startswith(b"250")       # relay client
    # RBLSMTPD from the rules, as with ucspi-tcp's rblsmtpd
    assert rcpt_reply(s.port, "127.0.0.6") == b"553 5.7.1 Go away, said the rules\r\n"
    assert rcpt_reply(s.port, "127.0.0.7").startswith(b"250")       # listed, but exempt
    assert rcpt_reply(s.port, "127.0.0.8") == b"451 4.7.1 Come back later\r\n"
    assert s.wait_log("refused RCPT: 554 5.7.1 Service unavailable")


def test_dnsbl_lookup_failure_lists_nobody(qroot, server, dnsd):
    dnsd.servfail.add("5.0.0.127.bl.test")
    qroot.control("resolvers", "127.0.0.1:%d" % dnsd.port)
    qroot.control("rbls", "bl.test\n")
    qroot.control("smtprules", RULES)
    s = server()
    assert rcpt_reply(s.port, "127.0.0.5").startswith(b"250")


def test_pregreet_talker_refused_patient_client_served(qroot, server):
    qroot.control("greetdelay", "2")
    s = server()
    c = Client(s.port)
    assert c.line().startswith(b"220-")
    c.send(b"EHLO bot.example\r\n")                   # before the final 220
    assert c.reply().startswith(b"554 5.5.1")
    assert c.closed()
    assert s.wait_log("pregreet")
    c = Client(s.port)
    start = time.monotonic()
    first = c.line()
    final = c.line()
    assert first.startswith(b"220-") and final.startswith(b"220 ")
    assert time.monotonic() - start >= 1.5
    assert c.cmd(b"EHLO patient.example").startswith(b"250")
    c.close()


def test_rate_limits_connections_and_messages(qroot, server):
    qroot.control("ratelimits", "connections 3\nmessages 2\n")
    s = server()
    got = []
    for _ in range(4):
        c = Client(s.port, source="127.0.0.21")
        got.append(c.reply())
        c.close()
    assert [g[:3] for g in got] == [b"220"] * 3 + [b"421"], got
    assert got[-1].startswith(b"421 4.7.0")
    assert Client(s.port, source="127.0.0.22").reply().startswith(b"220")   # another client
    c = Client(s.port, source="127.0.0.23")
    c.hello()
    for n in range(3):
        r = c.cmd(b"MAIL FROM:<a@b.example>")
        if n < 2:
            assert r.startswith(b"250"), r
            assert c.cmd(b"RSET").startswith(b"250")
        else:
            assert r.startswith(b"421 4.7.0"), r
    c.close()
    assert s.wait_log("rate limit")
    assert qpytest.wait_for(lambda: "127.0.0.21" in s.log(), 5)
