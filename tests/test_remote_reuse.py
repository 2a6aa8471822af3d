"""A cached connection's next transaction: RSET pipelined with MAIL, RCPT and DATA
when the peer offers PIPELINING (one round trip fewer per message), RSET alone
first when it does not, and the message read once when it fits in one read.

Through the real qpy-rspawn and its workers to scripted peers and aiosmtpd on
loopback (test_remote's fixtures); the peers' own view of the wire is checked.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import qpytest
import test_remote
from remote_peers import basic_session, commands
from test_remote import MSG, Recorder, bodies, stuffed, wire

from qpy.remote import encode

# test_remote's fixtures: a DNS server, a free port, peers, qpy-rspawn on a root
dnssrv, port, aiopeer, raw, stack = test_remote.dnssrv, test_remote.port, \
    test_remote.aiopeer, test_remote.raw, test_remote.stack

pytestmark = qpytest.needs_root


def first_transaction(c, ehlo: bytes = b"250-peer\r\n250 PIPELINING\r\n") -> None:
    """Greeting, EHLO and one clean transaction, each command answered in turn."""
    c.send(b"220 peer\r\n")
    c.expect(b"EHLO", ehlo)
    c.expect(b"MAIL", b"250 ok\r\n")
    while c.line().startswith(b"RCPT"):
        c.send(b"250 ok\r\n")
    c.send(b"354 go\r\n")              # the line that ended the loop was DATA
    c.data()
    c.send(b"250 queued\r\n")


def test_rset_pipelined_with_the_next_transaction(stack, raw):
    """The peer reads RSET, MAIL, both RCPTs and DATA before it answers anything: a
    client that waited for RSET's answer would stall here (and time out)."""
    qroot, dnssrv, port, rs = stack
    groups = []

    def script(c):
        first_transaction(c)
        for _ in range(2):
            group = [c.line() for _ in range(5)]
            groups.append(group)
            c.send(b"250 reset\r\n250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
            c.data()
            c.send(b"250 queued\r\n")
        commands(c)
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    for m in (MSG + b"second\n", MSG + b"third\n"):
        res = rs.deliver([b"x@a.test", b"bad@a.test"], msg=m)
        assert [s for s, _ in res] == [b"K", b"D"], res
        assert b"does not like recipient" in res[1][1] and b"no such user" in res[1][1], res
    assert peer.connections == 1
    for g in groups:
        assert [ln.split(b" ")[0].split(b":")[0] for ln in g] == \
            [b"RSET\r\n", b"MAIL", b"RCPT", b"RCPT", b"DATA\r\n"], g
    assert bodies(peer.transcripts[0]) == [stuffed(m) for m in
                                           (MSG, MSG + b"second\n", MSG + b"third\n")]


def test_every_recipient_refused_mid_pipeline_on_reuse(stack, raw):
    """Both RCPTs refused in the pipelined group: DATA's 354 gets an empty message's
    dot, nothing is delivered, and the connection is still good for the next one."""
    qroot, dnssrv, port, rs = stack
    empty = []

    def script(c):
        first_transaction(c)
        for ln, reply in ((b"RSET", b"250 reset\r\n"), (b"MAIL", b"250 ok\r\n"),
                          (b"RCPT", b"550 no\r\n"), (b"RCPT", b"450 later\r\n")):
            assert c.line().startswith(ln)
            c.send(reply)
        c.expect(b"DATA", b"354 go, for nobody\r\n")
        empty.append(c.data())
        c.send(b"554 no valid recipients\r\n")
        commands(c)
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    res = rs.deliver([b"bad@a.test", b"temp@a.test"])
    assert [s for s, _ in res] == [b"D", b"Z"], res
    assert empty == [b""]
    assert rs.deliver([b"x@a.test"], msg=MSG + b"after\n")[0][0] == b"K"
    assert peer.connections == 1
    t = peer.transcripts[0]
    assert b"RCPT TO:<temp@a.test>\r\nDATA\r\n.\r\nRSET\r\nMAIL" in t
    assert t.endswith(b"DATA\r\n" + stuffed(MSG + b"after\n"))


def _nothing_more(sock: socket.socket, wait: float) -> bool:
    """True when the client sent nothing more within `wait` seconds."""
    time.sleep(wait)
    timeout = sock.gettimeout()
    sock.settimeout(0)          # else Python waits for data before it tries the recv
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)


def test_without_pipelining_rset_waits_for_its_answer(stack, raw):
    """A peer that does not offer PIPELINING gets RSET alone, and MAIL only after
    RSET's answer (RFC 2920 is not assumed). The script reads the raw socket, not a
    buffered file, so nothing the client sent early can hide in a buffer."""
    qroot, dnssrv, port, rs = stack
    seen = []

    def script(c):
        s = c.c

        def line() -> bytes:
            out = b""
            while not out.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    raise EOFError
                out += b
            return out
        s.sendall(b"220 peer\r\n")
        for _ in range(2):
            cmds = []
            while True:
                ln = line()
                cmds.append(ln)
                if ln.upper().startswith(b"EHLO"):
                    s.sendall(b"250 peer\r\n")
                elif ln.upper().startswith(b"RSET"):
                    seen.append(_nothing_more(s, 0.5))
                    s.sendall(b"250 reset\r\n")
                elif ln.upper().startswith(b"DATA"):
                    s.sendall(b"354 go\r\n")
                    while line() != b".\r\n":
                        pass
                    s.sendall(b"250 queued\r\n")
                    break
                else:
                    s.sendall(b"250 ok\r\n")
        seen.append(b"QUIT" in line().upper())
        s.sendall(b"221 bye\r\n")
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    assert rs.deliver([b"x@a.test"], msg=MSG + b"second\n")[0][0] == b"K"
    assert peer.connections == 1
    assert qpytest.wait_for(lambda: len(seen) == 2, 10)     # QUIT after CONN_IDLE
    assert seen == [True, True], seen


def test_peer_closes_after_rset_answer_goes_afresh(stack, raw):
    """RSET answered 250 inside the pipelined group, then the peer hangs up before
    MAIL's answer: the recipients go over a fresh connection, once."""
    qroot, dnssrv, port, rs = stack

    def script(c):
        if c.peer.connections > 1:
            basic_session(c)
            return
        first_transaction(c)
        assert c.line().startswith(b"RSET")
        c.send(b"250 reset\r\n")
        c.c.shutdown(socket.SHUT_RDWR)
    peer = raw(script)
    assert rs.deliver([b"x@a.test"])[0][0] == b"K"
    res = rs.deliver([b"x@a.test", b"y@a.test"], msg=MSG + b"second\n")
    assert [s for s, _ in res] == [b"K", b"K"], res
    assert peer.connections == 2
    assert bodies(peer.transcripts[1]) == [stuffed(MSG + b"second\n")]


@pytest.mark.parametrize("size", [encode.CHUNK - 1, encode.CHUNK, encode.CHUNK + 1,
                                  3 * encode.CHUNK + 7])
def test_message_sizes_around_one_read_byte_exact(stack, aiopeer, size):
    """Messages of one read (kept by scan()) and of more (read again in chunks) reach
    aiosmtpd byte for byte, twice over one connection."""
    qroot, dnssrv, port, rs = stack
    h = Recorder()
    aiopeer(h)
    head = MSG
    line = b".dot first, then text " * 3 + b"\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 1] + b"\n"
    msg = head + body
    assert len(msg) == size
    for _ in range(2):
        assert rs.deliver([b"x@a.test"], msg=msg)[0][0] == b"K"
    assert [c for _, _, c in h.messages] == [wire(msg)] * 2
    assert len(set(h.peers)) == 1


@pytest.mark.parametrize("size", [0, 1, encode.CHUNK - 1, encode.CHUNK, encode.CHUNK + 1,
                                  2 * encode.CHUNK])
def test_scan_keeps_a_message_of_one_read(tmp_path, size):
    data = (b"Subject: x\n\n" + b"\xc3\xa9" * size)[:size]
    path = os.path.join(tmp_path, "m")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got_size, head8, body8, whole = encode.scan(fd)
        assert got_size == size
        assert whole == (data if 0 < size <= encode.CHUNK else None)
        assert b"".join(encode.chunks(fd)) == data
        assert not head8 and body8 == (size > len(b"Subject: x\n\n"))
    finally:
        os.close(fd)
