"""VERP senders and per-domain concurrency, through the whole queue: qpy-sendmail,
qpy-start (queue-send, lspawn, rspawn) and real peers on loopback (aiosmtpd, a
scripted server), DNS from the test server.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import qpytest
import test_remote
from qpytest import maildir_messages as maildir
from remote_peers import PeerConn
from test_inject import queue_inject
from test_outbound import remote_root
from test_remote import PEER2, Recorder
from test_send import Qpy, bounces, queue_empty, sendmail, user

from qpy.common import address

pytestmark = qpytest.needs_root

# test_remote's fixtures: a DNS server, a free port, aiosmtpd and scripted peers
dnssrv, port, aiopeer, raw = test_remote.dnssrv, test_remote.port, test_remote.aiopeer, \
    test_remote.raw


def test_verp_rewrite_rule():
    assert address.verp(b"owner-@list.example-@[]", b"joe@x.example") == \
        b"owner-joe=x.example@list.example"
    assert address.verp(b"l-return-7-@h.example-@[]", b'"j d"@x.example') == \
        b'"l-return-7-j d=x.example"@h.example'
    assert address.parse_sender(b"Owner-@LIST.example-@[]") == b"Owner-@list.example-@[]"
    long = b"x" * 60 + b"@y.example"        # the return path's local part over 64 bytes
    assert address.verp(b"owner-@list.example-@[]", long) == b"owner-@list.example"
    assert address.is_verp(b"a-@b.example-@[]") and not address.is_verp(b"-@[]")
    with pytest.raises(address.AddressError):
        address.parse_sender(b"a\n-@b.example-@[]")


def test_verp_sender_one_delivery_per_recipient(qroot, dnssrv, port, aiopeer):
    """Each recipient, remote or local, gets the message alone with its own return
    path; the two remote ones at one domain are not grouped into one transaction."""
    remote_root(qroot, dnssrv, port)
    local = user("vl", qroot)
    h = Recorder()
    aiopeer(h)
    q = Qpy(qroot)
    try:
        sendmail(qroot, "owner-@list.example-@[]", "x@a.test", "y@a.test",
                 "qtvl@test.example", body="list post\n")
        assert qpytest.wait_for(lambda: len(h.messages) == 2 and maildir(local), 30), q.log()
        got = sorted((frm, rcpts) for frm, rcpts, _ in h.messages)
        assert got == [("owner-x=a.test@list.example", ["x@a.test"]),
                       ("owner-y=a.test@list.example", ["y@a.test"])]
        [m] = maildir(local)
        assert m["Return-Path"] == "<owner-qtvl=test.example@list.example>"
        assert not re.search(r"starting delivery \d+: msg \S+ to remote x@a.test,", q.log())
    finally:
        assert q.stop() == 0


def test_verp_through_qmail_queue_interface(qroot, dnssrv, port, aiopeer):
    """ezmlm's way in: qpy-queue-inject (qmail-queue's interface) with the VERP sender in
    the envelope; a VERP sender with a control byte is refused (exit 91, qmail's bad
    envelope)."""
    remote_root(qroot, dnssrv, port)
    h = Recorder()
    aiopeer(h)
    q = Qpy(qroot)
    try:
        r = queue_inject(qroot, b"Subject: post\n\nbody\n",
                         b"Fl-return-7-@lists.example-@[]\0Tx@a.test\0\0")
        assert r.returncode == 0, r.stderr
        assert qpytest.wait_for(lambda: h.messages, 30), q.log()
        assert h.messages[0][0] == "l-return-7-x=a.test@lists.example"
        r = queue_inject(qroot, b"Subject: post\n\nbody\n",
                         b"Fl-ret\x01urn-@lists.example-@[]\0Tx@a.test\0\0")
        assert r.returncode == 91, r
    finally:
        assert q.stop() == 0


def test_verp_bounce_goes_to_the_recipients_return_path(qroot, dnssrv, port, aiopeer):
    remote_root(qroot, dnssrv, port)
    owner = user("vo", qroot, {"default": "./Maildir/\n"})
    aiopeer(Recorder())
    q = Qpy(qroot)
    try:
        sendmail(qroot, "qtvo-@test.example-@[]", "bad1@a.test", "bad2@a.test", "ok@a.test")
        assert qpytest.wait_for(lambda: len(bounces(owner)) == 2, 30), q.log()
        to = sorted(b["To"] for b in bounces(owner))
        assert to == ["qtvo-bad1=a.test@test.example", "qtvo-bad2=a.test@test.example"]
        for b in bounces(owner):
            failed = b["To"].split("-", 1)[1].split("=")[0]
            assert "<%s@a.test>" % failed in b.get_payload()[0].get_content()
    finally:
        assert q.stop() == 0


def test_list_owner_default_forwards_with_verp(qroot, dnssrv, port, aiopeer):
    """qmail-local's rule: a list's .qmail-EXT-owner and -owner-default make its
    forwards go with the VERP sender LOCAL-owner-@DOMAIN-@[] (through a drop file and
    qpy-pickup's envelope check), so each subscriber gets its own return path."""
    remote_root(qroot, dnssrv, port)
    user("vw", qroot, {"list": "&x@a.test\n&y@a.test\n", "list-owner": "./Maildir/\n",
                       "list-owner-default": "./Maildir/\n"})
    h = Recorder()
    aiopeer(h)
    q = Qpy(qroot)
    try:
        sendmail(qroot, "s@test.example", "qtvw-list@test.example", body="to the list\n")
        assert qpytest.wait_for(lambda: len(h.messages) == 2, 30), q.log()
        assert sorted(frm for frm, _, _ in h.messages) == [
            "qtvw-list-owner-x=a.test@test.example", "qtvw-list-owner-y=a.test@test.example"]
    finally:
        assert q.stop() == 0


def holding(peer_release: threading.Event):
    """A peer script that answers DATA's end only once `peer_release` is set."""
    def script(conn: PeerConn) -> None:
        conn.send(b"220 peer ESMTP\r\n")
        while True:
            ln = conn.line().upper()
            if ln.startswith(b"EHLO"):
                conn.send(b"250-peer\r\n250 PIPELINING\r\n")
            elif ln.startswith(b"DATA"):
                conn.send(b"354 go\r\n")
                conn.data()
                peer_release.wait(60)
                conn.send(b"250 queued\r\n")
            elif ln.startswith(b"QUIT"):
                conn.send(b"221 bye\r\n")
                return
            else:
                conn.send(b"250 ok\r\n")
    return script


def test_concurrency_per_domain(qroot, dnssrv, port, raw):
    """concurrencyperdomain 2: five messages to a.test, two in flight at a time,
    while b.test (another peer) is not held up; all five arrive once the peer lets go."""
    remote_root(qroot, dnssrv, port)
    dnssrv.add("b.test", "MX", "10 mx.b.test.")
    dnssrv.add("mx.b.test", "A", PEER2)
    qroot.control("concurrencyperdomain", "2")
    qroot.control("timeoutremote", "60")
    go = threading.Event()
    a = raw(holding(go))
    b = raw(test_remote.basic_session, host=PEER2)
    q = Qpy(qroot)
    try:
        for n in range(5):
            sendmail(qroot, "s@test.example", "r%d@a.test" % n, body="m%d\n" % n)
        assert qpytest.wait_for(lambda: a.connections == 2, 30), q.log()
        sendmail(qroot, "s@test.example", "r@b.test")
        assert qpytest.wait_for(lambda: b"\r\n.\r\n" in b"".join(b.transcripts), 30), q.log()
        time.sleep(1.5)             # queue-send has had many passes to start more
        assert a.connections == 2
        assert sum(t.count(b"\r\nDATA\r\n") for t in a.transcripts) == 2
        go.set()
        assert qpytest.wait_for(
            lambda: sum(t.count(b"\r\n.\r\n") for t in a.transcripts) == 5, 60), q.log()
        assert qpytest.wait_for(lambda: q.log().count("delivery") >= 12, 30), q.log()
        busy = [int(n) for n in re.findall(r"status: local \d+/\d+ remote (\d+)/20", q.log())]
        assert max(busy) == 3, busy         # two to a.test and one to b.test at most
    finally:
        go.set()
        assert q.stop() == 0


def test_held_recipients_start_in_order_and_a_removed_one_is_skipped(qroot, dnssrv, port, raw):
    """concurrencyperdomain 1: of four messages to a.test one is in flight and three
    are held; the second is removed with qpy-qrm while held. Once the peer lets go,
    the third and fourth follow the first over the one connection, in the order they
    came, the removed one never goes, and the queue empties: each held entry is
    started once, and one gone stale is dropped without losing a slot."""
    remote_root(qroot, dnssrv, port)
    qroot.control("concurrencyperdomain", "1")
    qroot.control("timeoutremote", "60")
    go = threading.Event()
    a = raw(holding(go))
    q = Qpy(qroot)
    try:
        for n in range(4):
            sendmail(qroot, "s@test.example", "r%d@a.test" % n, body="m%d\n" % n,
                     headers="Subject: held %d\n" % n)
            if n == 0:
                assert qpytest.wait_for(lambda: a.connections == 1, 30), q.log()
        second = qpytest.wait_for(lambda: _queued_with(qroot, b"Subject: held 1\n"), 30)
        assert second and "msg %s to" % second not in q.log(), q.log()   # held: not started
        r = qroot.run("qpy-qrm", qroot.path, second)
        assert r.returncode == 0, r.stderr
        go.set()
        assert qpytest.wait_for(lambda: queue_empty(qroot), 60), q.log()
        got = b"".join(a.transcripts)
        assert [int(n) for n in re.findall(rb"\r\nm(\d)\r\n\.\r\n", got)] == [0, 2, 3], got
        assert a.connections == 1
    finally:
        go.set()
        assert q.stop() == 0


def _queued_with(qroot, text: bytes) -> str | None:
    """The id of the message in queue/mess/ that has `text`."""
    for name in os.listdir(qroot.paths.mess):
        with open(os.path.join(qroot.paths.mess, name), "rb") as f:
            if text in f.read():
                return name
    return None
