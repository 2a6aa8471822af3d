"""qpy-rspawn / qpy-remote against real peers on loopback, with DNS from a real server.

Most cases drive the real qpy-rspawn directly: a SOCK_SEQPACKET socketpair end as
its fd 0, a request from qpy.common.spawn with the message as an open fd, the
result read back. Peers: scripted servers, aiosmtpd, smtp-sink, a private Postfix.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import signal
import socket
import subprocess
import time

import psutil
import pytest
import qpytest
from qpytest import wait_for
from remote_peers import DNSServer, PrivatePostfix, RawPeer, SmtpSink, basic_session

from qpy.common import spawn

pytestmark = qpytest.needs_root

PEER = "127.0.0.2"          # the usual receiving peer
DOWN = "127.0.0.3"          # nothing listens there
PEER2 = "127.0.0.4"
MSG = (b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\n"
       b"From: a@test.example\nTo: b@a.test\nSubject: hello\n"
       b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <1@test.example>\n\n"
       b"line one\n.leading dot\n..two dots\n\nlast line\n")


def wire(msg: bytes) -> bytes:
    """What the peer must receive as DATA content (before unstuffing: after it)."""
    return msg.replace(b"\n", b"\r\n")


@pytest.fixture
def dnssrv():
    d = DNSServer()
    yield d
    d.stop()


@pytest.fixture
def port():
    """A port free on every address the peers of these tests use (they share it).

    Below the kernel's ephemeral range, so that no outgoing connection takes it
    between this check and the peer's bind.
    """
    for _ in range(200):
        p = random.randrange(20000, 32000)
        try:
            for host in (PEER, PEER2, DOWN, "::1"):
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(fam, socket.SOCK_STREAM) as s:
                    s.bind((host, p))
        except OSError:
            continue
        return p
    raise RuntimeError("no port free on all test addresses")


@pytest.fixture
def stack(qroot, dnssrv, port):
    """A root that resolves through `dnssrv` and reaches MXs on `port`, and an rspawn."""
    qroot.control("resolvers", "127.0.0.1:%d" % dnssrv.port)
    qroot.control("smtproutes", "::%d" % port)      # MX lookups, peers on this port
    qroot.control("timeoutremote", "3")
    qroot.control("timeoutconnect", "3")
    dnssrv.add("a.test", "MX", "10 mx.a.test.")
    dnssrv.add("mx.a.test", "A", PEER)
    rs = Rspawn(qroot)
    yield qroot, dnssrv, port, rs
    rs.stop()


class Rspawn:
    """The real qpy-rspawn with a socketpair end as fd 0."""

    def __init__(self, qroot):
        self.qroot = qroot
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([qroot.bin("qpy-rspawn")], stdin=b.fileno(),
                                     env=qroot.env(), stderr=subprocess.PIPE)
        b.close()
        self.sock = a
        self.next = 1
        self.dir = qpytest.scratch_dir("msg")

    def send(self, sender: bytes, rcpts: list[bytes], msg: bytes = MSG) -> int:
        path = os.path.join(self.dir, "m%d" % self.next)
        with open(path, "wb") as f:
            f.write(msg)
        fd = os.open(path, os.O_RDONLY)
        try:
            spawn.send_request(self.sock, self.next, sender, rcpts, fd)
        finally:
            os.close(fd)
        self.next += 1
        return self.next - 1

    def result(self, timeout: float = 60) -> tuple[int, list[tuple[bytes, bytes]]]:
        self.sock.settimeout(timeout)
        got = spawn.recv_result(self.sock)
        assert got is not None, "qpy-rspawn closed the socket"
        return got

    def deliver(self, rcpts: list[bytes], msg: bytes = MSG,
                sender: bytes = b"a@test.example") -> list[tuple[bytes, bytes]]:
        n = self.send(sender, rcpts, msg)
        d, res = self.result()
        assert d == n
        assert len(res) == len(rcpts)
        return res

    def stop(self) -> None:
        self.sock.close()           # end of file: rspawn finishes and exits
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        qpytest.remove_tree(self.dir)


class Recorder:
    """aiosmtpd handler: RCPT local parts starting 'temp' get 451, 'bad' 550."""

    def __init__(self, data_reply: str = "250 2.0.0 stored"):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.data_reply = data_reply
        self.mail_options: list[list[str]] = []
        self.peers: list[tuple] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("temp"):
            return "451 4.2.0 try later"
        if address.startswith("bad"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.mail_options.append(list(envelope.mail_options))
        self.peers.append(session.peer)     # the client's (address, port): one per connection
        if self.data_reply.startswith("2"):
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return self.data_reply


@pytest.fixture
def aiopeer(port):
    """Start aiosmtpd peers: aiopeer(handler, host=PEER, **controller options)."""
    from aiosmtpd.controller import Controller
    started = []

    def start(handler, host=PEER, **kw):
        kw.setdefault("enable_SMTPUTF8", True)
        c = Controller(handler, hostname=host, port=port, **kw)
        c.start()
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


@pytest.fixture
def raw(port):
    peers = []

    def start(script, host=PEER):
        p = RawPeer(host, port, script)
        peers.append(p)
        return p
    yield start
    for p in peers:
        p.stop()


# --- delivery to real peers -------------------------------------------------------------

def test_aiosmtpd_byte_exact_two_recipients(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"x@a.test", b"y@a.test"])
    assert [s for s, _ in res] == [b"K", b"K"], res
    assert b"127.0.0.2 accepted message" in res[0][1]
    assert b"250 2.0.0 stored" in res[0][1]
    assert len(h.messages) == 1
    sender, rcpts, content = h.messages[0]
    assert sender == "a@test.example" and rcpts == ["x@a.test", "y@a.test"]
    assert content == wire(MSG)


def test_smtp_sink_byte_exact(stack):
    qroot, dnssrv, port, rs = stack
    sink = SmtpSink(PEER, port)
    try:
        res = rs.deliver([b"x@a.test"])
        assert res[0][0] == b"K", res
        msgs = qpytest.wait_for(sink.messages, 10)
        assert msgs and len(msgs) == 1
        # smtp-sink prepends its own X- headers and appends an empty line
        assert msgs[0].endswith(MSG + b"\n")
    finally:
        sink.stop()


def test_private_postfix_byte_exact(stack):
    qroot, dnssrv, port, rs = stack
    if not os.path.exists("/usr/sbin/postfix"):
        pytest.skip("postfix not installed")
    pf = PrivatePostfix(PEER, port, "a.test")
    try:
        res = rs.deliver([b"x@a.test"])
        assert res[0][0] == b"K", res
        msgs = qpytest.wait_for(pf.messages, 30)
        assert msgs and len(msgs) == 1
        # Postfix adds Return-Path, Delivered-To and its Received line at the top
        assert msgs[0].endswith(MSG)
        assert b"Received: from " in msgs[0][: msgs[0].index(MSG)]
    finally:
        pf.stop()


def test_runs_as_qpyr_and_cannot_read_queue(stack, raw, aiopeer):
    qroot, dnssrv, port, rs = stack
    stall = raw(lambda c: (c.send(b"220 hi\r\n"), c.peer.release.wait(20)))
    n = rs.send(b"a@test.example", [b"x@a.test"])
    spawner = psutil.Process(rs.proc.pid)
    child = qpytest.wait_for(lambda: spawner.children(), 10)
    assert child, "no delivery child"
    qpyr = pwd.getpwnam("qpyr").pw_uid
    assert spawner.uids().real == qpyr and spawner.uids().effective == qpyr
    assert child[0].uids().real == qpyr and child[0].uids().effective == qpyr
    # the worker names itself just after the fork (the pool's start-up hook)
    assert qpytest.wait_for(lambda: child[0].cmdline()[0].startswith("qpy-remote"), 10), \
        child[0].cmdline()
    stall.release.set()
    d, res = rs.result()
    assert d == n and res[0][0] == b"Z"
    # a message file as the queue keeps it (qpyq:qpys 0640 in mess/): qpyr cannot open it,
    # yet delivers it from the fd it is handed
    path = os.path.join(qroot.paths.mess, "1234")
    with open(path, "wb") as f:
        f.write(MSG)
    os.chown(path, pwd.getpwnam("qpyq").pw_uid, os.stat(qroot.paths.mess).st_gid)
    os.chmod(path, 0o640)
    r = subprocess.run(["setpriv", "--reuid", "qpyr", "--regid", "qpyr", "--init-groups", "--",
                        qpytest.PYTHON, "-c", "open(%r, 'rb')" % path], capture_output=True)
    assert r.returncode != 0 and b"PermissionError" in r.stderr
    dnssrv.add("b.test", "A", PEER2)
    h = Recorder()
    aiopeer(h, PEER2)
    fd = os.open(path, os.O_RDONLY)
    spawn.send_request(rs.sock, 99, b"a@test.example", [b"x@b.test"], fd)
    os.close(fd)
    d, res = rs.result()
    assert d == 99 and res[0][0] == b"K", res
    assert h.messages and h.messages[0][2] == wire(MSG)


# --- DNS ----------------------------------------------------------------------------------

def test_mx_preference_first_refuses_second_accepts(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("pref.test", "MX", "10 down.pref.test.", "20 up.pref.test.")
    dnssrv.add("down.pref.test", "A", DOWN)
    dnssrv.add("up.pref.test", "A", PEER)
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"x@pref.test"])
    assert res[0][0] == b"K" and b"127.0.0.2" in res[0][1], res
    assert len(h.messages) == 1


def one_message(c) -> None:
    """A peer that takes one message per connection and then hangs up (no reuse)."""
    c.send(b"220 peer\r\n")
    c.expect(b"EHLO", b"250-peer\r\n250 PIPELINING\r\n")
    c.expect(b"MAIL", b"250 ok\r\n")
    c.expect(b"RCPT", b"250 ok\r\n")
    c.expect(b"DATA", b"354 go\r\n")
    c.data()
    c.send(b"250 queued\r\n")


def test_equal_preferences_spread(stack, raw):
    # The MX is chosen per connection; a cached connection would carry every message
    # to the first choice, so these peers take one message per connection.
    qroot, dnssrv, port, rs = stack
    dnssrv.add("eq.test", "MX", "10 one.eq.test.", "10 two.eq.test.")
    dnssrv.add("one.eq.test", "A", PEER)
    dnssrv.add("two.eq.test", "A", PEER2)
    p1, p2 = raw(one_message, PEER), raw(one_message, PEER2)
    for _ in range(20):
        assert rs.deliver([b"x@eq.test"])[0][0] == b"K"
    # random among equal preferences: both get some (chance of failing: 2 in a million)
    assert p1.connections and p2.connections
    assert sum(t.count(b"\r\n.\r\n") for t in p1.transcripts + p2.transcripts) == 20


def test_a_only_and_aaaa_only_and_cname(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("aonly.test", "A", PEER)
    dnssrv.add("v6only.test", "AAAA", "::1")
    dnssrv.add("alias.test", "CNAME", "a.test.")
    h, h6 = Recorder(), Recorder()
    aiopeer(h, PEER)
    aiopeer(h6, "::1")
    assert rs.deliver([b"x@aonly.test"])[0][0] == b"K"
    res = rs.deliver([b"x@v6only.test"])
    assert res[0][0] == b"K" and b"::1 accepted" in res[0][1], res
    assert rs.deliver([b"x@alias.test"])[0][0] == b"K"
    assert len(h.messages) == 2 and len(h6.messages) == 1


def test_null_mx_and_nxdomain_bounce(stack):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("nullmx.test", "MX", "0 .")
    res = rs.deliver([b"x@nullmx.test", b"y@nowhere.test"])
    assert res[0][0] == b"D" and b"null MX" in res[0][1], res
    # different domains in one request are routed separately
    assert res[1][0] == b"D" and b"couldn't find any host" in res[1][1], res


def test_servfail_defers_then_delivers(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("flaky.test", "MX", "10 mx.a.test.")
    dnssrv.servfail.add("flaky.test")
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"x@flaky.test"])
    assert res[0][0] == b"Z" and b"DNS" in res[0][1], res
    dnssrv.servfail.clear()
    assert rs.deliver([b"x@flaky.test"])[0][0] == b"K"
    assert len(h.messages) == 1


def test_resolvers_file_without_servers_asks_nobody(stack):
    qroot, dnssrv, port, rs = stack
    qroot.control("resolvers", "not-an-address\n")
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z" and b"NoNameservers" in res[0][1], res


def test_mx_pointing_back_at_this_host(stack):
    qroot, dnssrv, port, rs = stack
    # by name (control/me), and by address (127.0.0.1 is on lo; ipme adds one)
    qroot.control("smtproutes", "byname.test:\nbyaddr.test:\nbyipme.test:\n::%d" % port)
    qroot.control("ipme", "192.0.2.77")
    dnssrv.add("byname.test", "MX", "10 test.example.")
    dnssrv.add("byaddr.test", "MX", "10 self.byaddr.test.")
    dnssrv.add("self.byaddr.test", "A", "127.0.0.1")
    dnssrv.add("byipme.test", "MX", "10 self.byipme.test.", "20 other.byipme.test.")
    dnssrv.add("self.byipme.test", "A", "192.0.2.77")
    dnssrv.add("other.byipme.test", "A", DOWN)
    for dom in (b"byname.test", b"byaddr.test", b"byipme.test"):
        res = rs.deliver([b"x@" + dom])
        assert res[0][0] == b"D" and b"#5.4.6" in res[0][1], (dom, res)


# --- peer behaviour ----------------------------------------------------------------------

def test_partial_recipients_and_5xx_rcpt(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"temp1@a.test", b"ok@a.test", b"bad@a.test"])
    assert [s for s, _ in res] == [b"Z", b"K", b"D"], res
    assert b"451 4.2.0 try later" in res[0][1]
    assert b"550 5.1.1 no such user" in res[2][1]
    assert len(h.messages) == 1 and h.messages[0][1] == ["ok@a.test"]


def test_5xx_after_data(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    aiopeer(Recorder("554 5.7.1 content rejected"))
    res = rs.deliver([b"x@a.test", b"temp@a.test"])
    assert res[0][0] == b"D" and b"554 5.7.1 content rejected" in res[0][1], res
    assert res[1][0] == b"Z"


def test_421_greeting_moves_to_next_mx(stack, raw, aiopeer):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("busy.test", "MX", "10 mx1.busy.test.", "20 mx2.busy.test.")
    dnssrv.add("mx1.busy.test", "A", PEER2)
    dnssrv.add("mx2.busy.test", "A", PEER)
    busy = raw(lambda c: c.send(b"421 4.3.2 too busy\r\n"), PEER2)
    h = Recorder()
    aiopeer(h, PEER)
    res = rs.deliver([b"x@busy.test"])
    assert res[0][0] == b"K" and b"127.0.0.2" in res[0][1], res
    assert busy.connections == 1


def test_421_mid_session_defers_the_rest(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        c.send(b"220 hi\r\n")
        c.expect(b"EHLO", b"250 peer\r\n")       # no PIPELINING: one by one
        c.expect(b"MAIL", b"250 ok\r\n")
        c.expect(b"RCPT", b"250 ok\r\n")
        c.expect(b"RCPT", b"421 4.3.0 shutting down\r\n")
    raw(script)
    res = rs.deliver([b"x@a.test", b"y@a.test", b"z@a.test"])
    assert [s for s, _ in res] == [b"Z", b"Z", b"Z"], res
    assert all(b"421" in t for _, t in res)


def test_multiline_replies(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        basic_session(c, greet=b"220-peer welcomes\r\n220-you\r\n220 really\r\n",
                      ehlo=b"250-peer\r\n250-8BITMIME\r\n250-SIZE 1000000\r\n250 PIPELINING\r\n",
                      final=b"250-first line\r\n250-second\r\n250 third\r\n")
    peer = raw(script)
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"K", res
    assert b"250-first line / 250-second / 250 third" in res[0][1]
    got = peer.transcripts[0]
    assert b"MAIL FROM:<a@test.example> SIZE=%d\r\n" % len(MSG) in got
    assert got.index(b"RCPT") < got.index(b"DATA")


def test_helo_fallback_and_size_limit(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        c.send(b"220 old peer\r\n")
        c.expect(b"EHLO", b"502 what?\r\n")
        c.expect(b"HELO test.example", b"250 hi\r\n")
        c.expect(b"MAIL FROM:<a@test.example>\r\n", b"250 ok\r\n")
        c.expect(b"RCPT", b"250 ok\r\n")
        c.expect(b"DATA", b"354 go\r\n")
        c.data()
        c.send(b"250 ok\r\n")
        c.expect(b"QUIT", b"221 bye\r\n")
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    # the connection is kept for reuse; QUIT follows after CONN_IDLE seconds unused
    assert wait_for(lambda: peer.transcripts[0].endswith(b"QUIT\r\n"), 10)
    assert peer.transcripts[0].endswith(b".\r\nQUIT\r\n")
    peer.script = lambda c: basic_session(c, ehlo=b"250-peer\r\n250 SIZE 100\r\n")
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"D" and b"up to 100 bytes" in res[0][1], res


def test_dual_stack_tries_ipv6_then_ipv4(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("dual.test", "AAAA", "::1")      # nothing listens on [::1]:port
    dnssrv.add("dual.test", "A", PEER)
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"x@dual.test"])
    assert res[0][0] == b"K" and b"127.0.0.2 accepted" in res[0][1], res


def test_line_ends_normalised_and_dots_stuffed(stack, raw):
    qroot, dnssrv, port, rs = stack
    peer = raw(basic_session)
    filler = (b"y" * 98 + b"\n") * 661 + b"z" * 96      # the CR of a CRLF ends chunk one
    assert len(filler) == 65535
    msg = b"Subject: x\n\na\r\nb\rc\n.d\r\r\n..e\r" + filler + b"\r\n.dot\nf"
    assert rs.deliver([b"x@a.test"], msg=msg)[0][0] == b"K"
    assert wait_for(lambda: peer.transcripts[0].endswith(b"QUIT\r\n"), 10)  # after CONN_IDLE
    got = peer.transcripts[0]
    data = got[got.index(b"DATA\r\n") + 6: got.rindex(b"QUIT")]
    assert data == (b"Subject: x\r\n\r\na\r\nb\r\nc\r\n..d\r\n\r\n...e\r\n" + filler
                    .replace(b"\n", b"\r\n") + b"\r\n..dot\r\nf\r\n.\r\n")


def test_stall_times_out(stack, raw):
    qroot, dnssrv, port, rs = stack
    peer = raw(lambda c: (c.send(b"220 hi\r\n"), c.line(), c.peer.release.wait(30)))
    res = rs.deliver([b"x@a.test"])
    peer.release.set()
    assert res[0][0] == b"Z" and b"timed out" in res[0][1], res


def test_close_mid_data(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        c.send(b"220 hi\r\n")
        c.expect(b"EHLO", b"250 peer\r\n")
        c.expect(b"MAIL", b"250 ok\r\n")
        c.expect(b"RCPT", b"250 ok\r\n")
        c.expect(b"DATA", b"354 go\r\n")
        c.line()
        c.c.shutdown(socket.SHUT_RDWR)
    raw(script)
    res = rs.deliver([b"x@a.test"], msg=MSG * 3000)
    assert res[0][0] == b"Z" and b"connection died" in res[0][1], res


@pytest.mark.parametrize("greeting", [b"hello there\r\n", b"2\r\n", b"220" + b"x" * (1 << 20)])
def test_garbage_and_huge_replies(stack, raw, greeting):
    qroot, dnssrv, port, rs = stack
    raw(lambda c: (c.send(greeting), c.peer.release.wait(10)))
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z", res
    assert len(res[0][1]) <= spawn.MAX_TEXT
    assert rs.proc.poll() is None


def test_huge_line_in_ehlo_reply_bounded(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        c.send(b"220 hi\r\n")
        c.line()
        c.send(b"250-" + b"A" * (1 << 20) + b"\r\n250 ok\r\n")
        c.peer.release.wait(10)
    raw(script)
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z" and b"longer than" in res[0][1], res


# --- TLS ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selfsigned():
    d = qpytest.scratch_dir("cert")
    key, crt = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "2", "-subj", "/CN=mx.a.test"],
                   check=True, capture_output=True)
    yield crt, key
    qpytest.remove_tree(d)


def test_starttls_self_signed_used(stack, aiopeer, selfsigned):
    import ssl
    qroot, dnssrv, port, rs = stack
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*selfsigned)
    h = Recorder()
    aiopeer(h, tls_context=ctx)
    for _ in range(2):
        res = rs.deliver([b"x@a.test"])
        assert res[0][0] == b"K", res
        assert b"(TLS TLSv1." in res[0][1]
    assert h.messages[0][2] == wire(MSG) and h.messages[1][2] == wire(MSG)
    assert h.peers[0] == h.peers[1]         # the second went over the same TLS connection
    # tlsverify: the self-signed certificate is refused, the delivery deferred. Workers
    # keep the control files they were forked with: SIGHUP retires them.
    qroot.control("tlsverify", "a.test")
    rs.proc.send_signal(signal.SIGHUP)
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z" and b"tlsverify" in res[0][1], res
    assert len(h.messages) == 2


def test_broken_tls_handshake_falls_back_to_plain(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        ehlo = b"250-peer\r\n250 STARTTLS\r\n"
        if c.peer.connections == 1:         # first connection: a handshake that fails
            c.send(b"220 hi\r\n")
            c.expect(b"EHLO", ehlo)
            c.expect(b"STARTTLS", b"220 go ahead\r\n")
            c.send(b"this is not TLS\r\n")
            return
        basic_session(c, ehlo=ehlo)
    peer = raw(script)
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"K" and b"TLS" not in res[0][1], res
    assert peer.connections == 2 and b"STARTTLS" not in peer.transcripts[-1]


def test_tlsverify_without_starttls_defers(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    qroot.control("tlsverify", ".test")
    h = Recorder()
    aiopeer(h)
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z" and b"does not offer STARTTLS" in res[0][1], res
    assert not h.messages


# --- 8-bit and SMTPUTF8 -------------------------------------------------------------------

def test_8bit_converted_for_a_peer_without_8bitmime(stack):
    qroot, dnssrv, port, rs = stack
    body8 = MSG + "caf\u00e9\n".encode()
    sink = SmtpSink(PEER, port, "-8")        # no 8BITMIME
    try:
        res = rs.deliver([b"x@a.test"], msg=body8)
        assert res[0][0] == b"K", res        # quoted-printable (test_outbound has more)
        got = qpytest.wait_for(sink.messages, 10)
        assert got and b"caf=C3=A9" in got[0] and got[0].isascii()
        assert b"Content-Transfer-Encoding: quoted-printable" in got[0]
        assert rs.deliver([b"x@a.test"])[0][0] == b"K"       # 7-bit still goes
    finally:
        sink.stop()


def test_8bit_and_utf8_where_offered(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    body8 = MSG + "caf\u00e9\n".encode()
    assert rs.deliver([b"x@a.test"], msg=body8)[0][0] == b"K"
    assert "BODY=8BITMIME" in h.mail_options[-1]
    res = rs.deliver(["j\u00f6rg@a.test".encode()])
    assert res[0][0] == b"K", res
    assert "SMTPUTF8" in h.mail_options[-1]
    assert h.messages[-1][1] == ["j\u00f6rg@a.test"]


def test_utf8_refused_without_smtputf8(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h, enable_SMTPUTF8=False)
    res = rs.deliver([b"x@a.test"], msg=b"Subject: gr\xc3\xbc\xc3\x9fe\n\nhi\n")
    assert res[0][0] == b"D" and b"SMTPUTF8" in res[0][1], res
    assert not h.messages


# --- rspawn itself ------------------------------------------------------------------------

def test_bad_requests_survived(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    rs.sock.send(b"R77\0a@test.example\0x@a.test\0")          # no fd
    d, res = rs.result()
    assert d == 77 and res[0][0] == b"Z"
    rs.sock.send(b"garbage")
    fd = os.open("/dev/null", os.O_RDONLY)
    spawn.send_request(rs.sock, 78, b"a@test.example", [b"bad address@a.test", b"x@a.test"], fd)
    os.close(fd)
    d, res = rs.result()
    assert d == 78 and res[0][0] == b"D" and res[1][0] == b"K", res
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    assert rs.proc.poll() is None


def restart(stack, concurrency: int) -> Rspawn:
    """A new rspawn (concurrencyremote is read at start) with a long timeoutremote."""
    qroot, rs = stack[0], stack[3]
    qroot.control("concurrencyremote", str(concurrency))
    qroot.control("timeoutremote", "30")
    rs.stop()
    return Rspawn(qroot)


def test_concurrency_bounded(stack, raw):
    rs2 = restart(stack, 2)
    peer = raw(lambda c: (c.send(b"220 hi\r\n"), c.peer.release.wait(30)))
    try:
        for _ in range(5):
            rs2.send(b"a@test.example", [b"x@a.test"])
        spawner = psutil.Process(rs2.proc.pid)
        assert qpytest.wait_for(lambda: peer.connections >= 2, 10)
        time.sleep(0.5)    # give a third child the chance to show up if the bound is broken
        assert len(spawner.children()) == 2 and peer.connections == 2
        peer.release.set()
        got = sorted(rs2.result()[0] for _ in range(5))
        assert got == [1, 2, 3, 4, 5]
    finally:
        peer.release.set()
        rs2.stop()


def test_sigterm_answers_waiting_requests(stack, raw):
    rs2 = restart(stack, 1)
    peer = raw(lambda c: (c.send(b"220 hi\r\n"), c.line(), c.peer.release.wait(30)))
    try:
        rs2.send(b"a@test.example", [b"x@a.test"])
        rs2.send(b"a@test.example", [b"y@a.test"])
        assert qpytest.wait_for(lambda: peer.connections >= 1, 10)
        rs2.proc.terminate()
        d, res = rs2.result()
        assert d == 2 and b"stopping" in res[0][1]
        peer.release.set()
        d, res = rs2.result()
        assert d == 1 and res[0][0] == b"Z"
        assert rs2.proc.wait(20) == 0
    finally:
        peer.release.set()
        rs2.stop()


# --- workers and connection reuse ---------------------------------------------------------

def stuffed(msg: bytes) -> bytes:
    """What a peer reads between DATA and the final dot: CRLF, dot-stuffed, with the dot."""
    return (b"\n" + msg).replace(b"\n.", b"\n..")[1:].replace(b"\n", b"\r\n") + b".\r\n"


def bodies(transcript: bytes) -> list[bytes]:
    """The DATA contents of a connection's transactions, each up to its final dot."""
    out = []
    for part in transcript.split(b"DATA\r\n")[1:]:
        out.append(part[: part.index(b"\r\n.\r\n") + 5])
    return out


def workers(rs: Rspawn) -> list[psutil.Process]:
    """rspawn's live workers: one that has exited (a zombie until rspawn reaps it) is
    not one, and psutil cannot read its command line."""
    out = []
    for c in psutil.Process(rs.proc.pid).children():
        try:
            if c.cmdline() and c.cmdline()[0].startswith("qpy-remote"):
                out.append(c)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return out


def test_same_domain_back_to_back_over_one_connection(stack, raw):
    qroot, dnssrv, port, rs = stack
    peer = raw(basic_session)
    msgs = [MSG + b"message %d\n.\n" % i for i in range(3)]
    for m in msgs:
        res = rs.deliver([b"x@a.test"], msg=m)
        assert res[0][0] == b"K" and b"127.0.0.2 accepted message" in res[0][1], res
    assert peer.connections == 1
    t = peer.transcripts[0]
    assert t.count(b"EHLO") == 1 and t.count(b"MAIL FROM") == 3
    # RSET before each transaction on the reused connection, nothing else in between
    assert t.count(b"RSET\r\n") == 2
    assert t.count(b"\r\n.\r\nRSET\r\nMAIL FROM:<a@test.example>") == 2
    assert bodies(t) == [stuffed(m) for m in msgs]


def test_aiosmtpd_reuse_byte_exact(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    msgs = [MSG, MSG + b"second\n", MSG.replace(b"hello", b"third")]
    for m in msgs:
        res = rs.deliver([b"x@a.test", b"y@a.test"], msg=m)
        assert [s for s, _ in res] == [b"K", b"K"], res
    assert [c for _, _, c in h.messages] == [wire(m) for m in msgs]
    assert len(set(h.peers)) == 1, h.peers


def test_idle_connection_gets_quit_after_conn_idle(stack, raw):
    qroot, dnssrv, port, rs = stack
    closed = []

    def script(c):
        basic_session(c)
        closed.append((time.monotonic(), c.f.read(1)))  # after QUIT: the client's close
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    done = time.monotonic()
    assert not peer.transcripts[0].endswith(b"QUIT\r\n")
    assert wait_for(lambda: closed, 10)
    when, rest = closed[0]
    assert peer.transcripts[0].endswith(b".\r\nQUIT\r\n") and rest == b""
    assert 1.5 <= when - done <= 6, when - done      # CONN_IDLE is 2 s


def dying_cache(how: bytes):
    """A peer whose first connection takes one message, then fails as `how` says;
    every later connection is a normal session."""
    def script(c):
        if c.peer.connections > 1:
            basic_session(c)
            return
        c.send(b"220 peer\r\n")
        c.expect(b"EHLO", b"250-peer\r\n250 PIPELINING\r\n")
        c.expect(b"MAIL", b"250 ok\r\n")
        c.expect(b"RCPT", b"250 ok\r\n")
        c.expect(b"DATA", b"354 go\r\n")
        c.data()
        c.send(b"250 queued\r\n")
        if how == b"close":
            return                                  # hang up while the client idles
        if how == b"421 idle":
            c.send(b"421 4.4.2 idle too long\r\n")  # said unasked, then hang up
            time.sleep(0.5)
            return
        if how in (b"421", b"500"):
            c.expect(b"RSET", how + b" no\r\n")
            return
        c.expect(b"RSET", b"250 ok\r\n")
        if how == b"421 mail":
            c.expect(b"MAIL", b"421 4.3.2 going down\r\n")
        else:                                       # close after RSET, before MAIL's reply
            c.line()
        c.c.shutdown(socket.SHUT_RDWR)
    return script


@pytest.mark.parametrize("how", [b"close", b"421 idle", b"421", b"500", b"421 mail",
                                 b"close after rset"])
def test_dead_cached_connection_costs_nothing(stack, raw, how):
    qroot, dnssrv, port, rs = stack
    peer = raw(dying_cache(how))
    first, second = MSG + b"first\n", MSG + b"second\n"
    assert rs.deliver([b"x@a.test"], msg=first)[0][0] == b"K"
    if how in (b"close", b"421 idle"):
        time.sleep(0.3)     # the worker sees it while idle (or else on its RSET)
    res = rs.deliver([b"x@a.test", b"y@a.test"], msg=second)
    assert [s for s, _ in res] == [b"K", b"K"], res
    assert peer.connections == 2
    assert bodies(peer.transcripts[0])[:1] == [stuffed(first)]
    assert bodies(peer.transcripts[1]) == [stuffed(second)]
    assert b"RCPT TO:<y@a.test>" in peer.transcripts[1]


def test_connection_breaks_after_dot_on_reuse_possible_duplicate(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        if c.peer.connections > 1:
            basic_session(c)
            return
        c.send(b"220 peer\r\n")
        c.expect(b"EHLO", b"250 peer\r\n")
        for reply in (b"250 queued\r\n", None):
            c.expect(b"MAIL", b"250 ok\r\n")
            c.expect(b"RCPT", b"250 ok\r\n")
            c.expect(b"DATA", b"354 go\r\n")
            c.data()
            if reply is None:       # took the whole message, then died: maybe delivered
                c.c.shutdown(socket.SHUT_RDWR)
                return
            c.send(reply)
            c.expect(b"RSET", b"250 ok\r\n")
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"Z" and b"Possible duplicate!" in res[0][1], res
    assert peer.connections == 1       # not sent again on a fresh connection


def test_rspawn_prefers_the_worker_holding_the_domain(stack, raw):
    rs2 = restart(stack, 2)
    qroot, dnssrv, port = stack[:3]
    dnssrv.add("b.test", "A", PEER2)
    dnssrv.add("c.test", "AAAA", "::1")
    pa, pb, pc = raw(basic_session), raw(basic_session, PEER2), raw(basic_session, "::1")
    try:
        for dom in (b"a.test", b"b.test", b"a.test", b"b.test", b"a.test"):
            assert rs2.deliver([b"x@" + dom])[0][0] == b"K"
        assert pa.connections == 1 and pb.connections == 1
        assert len(workers(rs2)) == 2
        # concurrency reached, no worker free of a connection: the one idle the shortest
        # (b.test's) QUITs its connection and takes c.test
        assert rs2.deliver([b"x@c.test"])[0][0] == b"K"
        assert wait_for(lambda: pb.transcripts[0].endswith(b"QUIT\r\n"), 5)
        assert not pa.transcripts[0].endswith(b"QUIT\r\n")
        assert rs2.deliver([b"x@a.test"])[0][0] == b"K"
        assert pa.connections == 1 and pc.connections == 1
        assert pa.transcripts[0].count(b"MAIL FROM") == 4
    finally:
        rs2.stop()


def test_worker_killed_mid_delivery(stack, raw):
    qroot, dnssrv, port, rs = stack

    def script(c):
        if c.peer.connections == 1:
            c.send(b"220 hi\r\n")
            c.peer.release.wait(30)
            return
        basic_session(c)
    peer = raw(script)
    n = rs.send(b"a@test.example", [b"x@a.test"])
    assert wait_for(lambda: peer.connections == 1, 10)
    busy = wait_for(lambda: [w for w in workers(rs) if w.cmdline()[0] == "qpy-remote a.test"],
                    10)
    assert busy, [w.cmdline() for w in workers(rs)]
    busy[0].kill()
    d, res = rs.result()
    assert d == n and res[0][0] == b"Z" and b"crashed" in res[0][1], res
    res = rs.deliver([b"x@a.test"])
    assert res[0][0] == b"K", res
    assert busy[0].pid not in [w.pid for w in workers(rs)]
    assert rs.proc.poll() is None


def _gone(p: psutil.Process) -> bool:
    """Exited (a zombie, or reaped already: between two psutil calls it may go)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("garbage", [b"S2\0Dsomeone else's delivery\0", b"S1\0K\0K\0",
                                     b"S1\0Xbad status\0", b"hello", b"I\x01\x02",
                                     b"I" + b"a" * 600, b"S1\0K" + b"x" * 2000 + b"\0",
                                     b"Ia.test\nS2\0Dsomeone else's delivery\0",
                                     b"I\x01\nS1\0Ksent\0"])
def test_worker_garbage_settles_nothing_else(stack, raw, aiopeer, garbage):
    rs2 = restart(stack, 2)
    qroot, dnssrv, port = stack[:3]
    dnssrv.add("b.test", "A", PEER2)
    stall = raw(lambda c: (c.send(b"220 hi\r\n"), c.peer.release.wait(30)))

    def slow(c):                    # b.test: a normal session once the test says so
        c.peer.release.wait(30)
        basic_session(c)
    slowpeer = raw(slow, PEER2)
    try:
        rs2.send(b"a@test.example", [b"x@a.test"])        # delivery 1: stalls
        rs2.send(b"a@test.example", [b"x@b.test"])        # delivery 2: in flight elsewhere
        assert wait_for(lambda: stall.connections == 1 and slowpeer.connections == 1, 10)
        w1 = wait_for(lambda: [w for w in workers(rs2)
                               if w.cmdline()[0] == "qpy-remote a.test"], 10)
        assert w1
        with qpytest.fd_of(w1[0].pid, 0) as fake:
            fake.send(garbage)
        d, res = rs2.result()
        assert d == 1 and res[0][0] == b"Z" and b"mangled" in res[0][1], res
        assert wait_for(lambda: _gone(w1[0]), 10)
        slowpeer.release.set()
        d, res = rs2.result()
        assert d == 2 and res[0][0] == b"K" and b"accepted message" in res[0][1], res
        rs2.sock.settimeout(1)
        with pytest.raises(TimeoutError):           # nothing more: no second answer
            rs2.sock.recv(100)
        assert rs2.deliver([b"x@b.test"])[0][0] == b"K"
    finally:
        stall.release.set()
        slowpeer.release.set()
        rs2.stop()


def test_worker_holds_only_its_own_fds(stack, raw):
    rs2 = restart(stack, 2)
    peer = raw(lambda c: (c.send(b"220 hi\r\n"), c.peer.release.wait(30)))
    try:
        rs2.send(b"a@test.example", [b"x@a.test"])
        rs2.send(b"a@test.example", [b"y@a.test"])
        assert wait_for(lambda: peer.connections == 2, 10)
        spawner_fd0 = os.readlink("/proc/%d/fd/0" % rs2.proc.pid)
        for w in workers(rs2):
            fds = {int(n): os.readlink("/proc/%d/fd/%s" % (w.pid, n))
                   for n in os.listdir("/proc/%d/fd" % w.pid)}
            assert fds[0].startswith("socket:") and fds[0] != spawner_fd0, fds
            assert fds[1] == "/dev/null", fds
            rest = [fds[n] for n in fds if n > 2]
            # the message at hand and the SMTP connection: nothing else
            assert len(rest) == 2, fds
            assert sum(r.startswith(os.path.join(rs2.dir, "m")) for r in rest) == 1, fds
            assert sum(r.startswith("socket:") for r in rest) == 1, fds
    finally:
        peer.release.set()
        rs2.stop()


def test_sighup_retires_idle_workers(stack, raw):
    qroot, dnssrv, port, rs = stack
    peer = raw(basic_session)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    before = [w.pid for w in workers(rs)]
    assert len(before) == 1
    rs.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: peer.transcripts[0].endswith(b"QUIT\r\n"), 5)  # at once
    assert wait_for(lambda: not [w for w in workers(rs) if w.pid in before], 10)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    assert peer.connections == 2


# --- the qpy-remote program ---------------------------------------------------------------

def test_qpy_remote_program(stack, aiopeer):
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    r = qroot.run("qpy-remote", "a.test", "a@test.example", "x@a.test", "bad@a.test",
                  input=MSG)
    assert r.returncode == 0, r.stderr
    recs = r.stdout.split(b"\0")
    assert recs[0] == b"r" + recs[0][1:] and recs[0].startswith(b"r")
    assert recs[1].startswith(b"h") and b"550" in recs[1]
    assert recs[2].startswith(b"K") and recs[3] == b""
    assert h.messages[0][2] == wire(MSG)



# --- the whole system: qpy-start, queue-send, rspawn ---------------------------------------

def test_system_servfail_then_sigalrm_delivers_with_tls(stack, aiopeer, selfsigned):
    import ssl

    from qpytest import maildir_messages
    from test_send import Qpy, sendmail, user
    qroot, dnssrv, port, rs = stack
    rs.stop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*selfsigned)
    h = Recorder()
    aiopeer(h, tls_context=ctx)
    dnssrv.servfail.add("a.test")
    sender = user("ra", qroot)
    q = Qpy(qroot)
    try:
        sendmail(qroot, "qtra@test.example", "x@a.test", "bad@a.test", "temp@a.test")
        q.wait_log(r"delivery \d+: deferral: .*DNS for a.test failed", count=3)
        assert not h.messages
        dnssrv.servfail.clear()
        q.signal(signal.SIGALRM)
        q.wait_log(r"delivery \d+: success: x@a.test: 127.0.0.2 accepted message. \(TLS TLSv1\.\d ")
        assert len(h.messages) == 1 and h.messages[0][1] == ["x@a.test"]
        assert b"Subject: test" in h.messages[0][2]
        # the 5xx recipient bounces to the sender with the peer's text; 4xx stays queued
        bounce = wait_for(lambda: maildir_messages(sender), 30)
        assert bounce, q.log()[-3000:]
        text = bounce[0].as_string()
        assert "bad@a.test" in text and "550 5.1.1 no such user" in text
        r = qroot.run("qpy-qread", qroot.path)
        assert re.search(r"deferred.*temp@a.test.*451 4.2.0 try later", r.stdout.decode()), \
            r.stdout
    finally:
        assert q.stop() == 0
