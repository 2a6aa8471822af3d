"""qpy-smtpd (run by qpy-tcpserver) with control/milters pointing at hand-written
filters: each stage, each reply, each modification reaches the queue; broken
filters get their default action, with no hang and no traceback on the wire."""

from __future__ import annotations

import os
import time

import pytest
from milterhelp import Listeners, ScriptFilter, addheader, chgheader
from smtphelp import Client, Listener, drops

MSG = b"From: a@b.example\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"


@pytest.fixture
def smtp(qroot):
    ls = Listeners(qroot)
    yield ls.start
    ls.stop()


def send(port: int, msg: bytes = MSG, rcpts=(b"postmaster@test.example",),
         sender: bytes = b"a@b.example") -> list[bytes]:
    """Greeting, EHLO, MAIL, RCPTs, DATA, the message: every reply's text."""
    c = Client(port)
    out = [c.reply(), c.cmd(b"EHLO client.example"), c.cmd(b"MAIL FROM:<%s>" % sender)]
    out += [c.cmd(b"RCPT TO:<%s>" % r) for r in rcpts]
    out.append(c.cmd(b"DATA"))
    if out[-1].startswith(b"354"):
        out.append(c.cmd(msg))
    out.append(c.cmd(b"QUIT"))
    c.close()
    return out


def test_pass_through_every_stage_with_macros_and_queue_id(qroot, smtp):
    f = ScriptFilter()
    s = smtp(f)
    replies = send(s.port)
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued as "), replies
    queue_id = replies[-2].split()[-1]
    assert len(drops(qroot)) == 1
    kinds = [c for c, _ in f.commands()]
    for k in (b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E"):
        assert k in kinds, (k, kinds)
    macros = b"".join(d for c, d in f.commands() if c == b"D")
    assert b"j\x00test.example\x00" in macros
    assert b"{client_addr}\x00127.0.0.1\x00" in macros
    assert b"{mail_addr}\x00a@b.example\x00" in macros
    assert b"{rcpt_addr}\x00postmaster@test.example\x00" in macros
    assert b"i\x00" + queue_id + b"\x00" in macros       # i is the id of "queued as"
    assert s.wait_log("end: helo client.example messages 1")


def test_end_of_message_edits_reach_the_queue(qroot, smtp):
    mods = [addheader(b"X-Filtered", b"yes"), chgheader(1, b"Subject", b"edited"),
            b"bnew body\r\n", b"+<added@test.example>\0", b"-<postmaster@test.example>\0",
            b"e<changed@b.example>\0", b"c"]
    f = ScriptFilter(lambda cmd, data: mods if cmd == b"E" else [b"c"])
    s = smtp(f)
    replies = send(s.port)
    assert replies[-2].startswith(b"250 "), replies
    (msg, sender, rcpts), = drops(qroot)
    assert b"X-Filtered: yes\n" in msg and b"Subject: edited\n" in msg
    assert msg.endswith(b"\n\nnew body\n") and b"hello" not in msg
    assert msg.startswith(b"Received: from client.example")
    assert sender == b"changed@b.example" and rcpts == [b"added@test.example"]


@pytest.mark.parametrize("stage", [b"C", b"H", b"M", b"R", b"T", b"E"])
def test_reject_at_each_stage(qroot, smtp, stage):
    f = ScriptFilter(lambda cmd, data: [b"y550 5.7.1 filter says no"] if cmd == stage
                     else [b"c"])
    s = smtp(f)
    replies = b"".join(send(s.port))
    assert b"550 5.7.1 filter says no" in replies
    assert drops(qroot) == []
    assert b"Traceback" not in replies


def test_tempfail_at_rcpt_refuses_only_that_recipient(qroot, smtp):
    f = ScriptFilter(lambda cmd, data: [b"t"] if cmd == b"R" and b"bad" in data else [b"c"])
    s = smtp(f)
    replies = send(s.port, rcpts=(b"bad@far.example", b"postmaster@test.example"))
    assert replies[3].startswith(b"451 4.7.1")
    assert replies[-2].startswith(b"250 ")
    (_, _, rcpts), = drops(qroot)
    assert rcpts == [b"postmaster@test.example"]


def test_discard_answers_250_and_queues_nothing(qroot, smtp):
    f = ScriptFilter(lambda cmd, data: [b"d"] if cmd == b"E" else [b"c"])
    s = smtp(f)
    replies = send(s.port)
    assert replies[-2].startswith(b"250 ")
    assert drops(qroot) == []
    assert s.wait_log("discarded")


@pytest.mark.parametrize("behaviour", ["hang", "close", "garbage"])
def test_broken_filter_mid_message_tempfails_without_hanging(qroot, smtp, behaviour):
    f = ScriptFilter(lambda cmd, data: behaviour if cmd == b"B" else [b"c"])
    s = smtp(f, opts="content_timeout=2 command_timeout=2")
    start = time.monotonic()
    replies = send(s.port)
    assert time.monotonic() - start < 10
    assert replies[-2].startswith(b"451 4.7.1"), replies
    assert drops(qroot) == []
    assert s.wait_log("failed at end of message")
    assert b"Traceback" not in b"".join(replies)


def test_default_action_accept_passes_mail_when_filter_is_down(qroot, smtp):
    s = smtp(control="inet:127.0.0.1:1 default_action=accept connect_timeout=2\n")
    replies = send(s.port)
    assert replies[-2].startswith(b"250 "), replies
    assert len(drops(qroot)) == 1
    assert s.wait_log("default_action accept")


def test_malformed_control_milters_tempfails(qroot, smtp):
    s = smtp(control="tcp:nowhere\n")
    replies = send(s.port)
    assert replies[2].startswith(b"451"), replies
    assert drops(qroot) == []


def test_unix_socket_filter_and_foreign_authentication_results_removed(qroot, smtp):
    sockdir = os.path.join(os.path.dirname(qroot.path), "milter")
    os.makedirs(sockdir, mode=0o755)
    f = ScriptFilter(lambda cmd, data: [addheader(b"Authentication-Results",
                                                  b"test.example; dkim=pass"), b"c"]
                     if cmd == b"E" else [b"c"], unix=os.path.join(sockdir, "sock"))
    s = smtp(f)
    msg = (b"Authentication-Results: test.example; dkim=pass (forged)\r\n"
           b"Authentication-Results: other.example; spf=pass\r\n"
           b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    replies = send(s.port, msg)
    assert replies[-2].startswith(b"250 "), replies
    (got, _, _), = drops(qroot)
    assert b"(forged)" not in got
    assert b"Authentication-Results: other.example; spf=pass\n" in got
    assert b"Authentication-Results: test.example; dkim=pass\n" in got
    headers = [h for c, h in f.commands() if c == b"L"]
    assert not any(b"forged" in h for h in headers)   # the filter never saw the forgery


def test_quarantine_is_logged_and_marked(qroot, smtp):
    f = ScriptFilter(lambda cmd, data: [b"qlooks odd\nreally\0", b"c"] if cmd == b"E"
                     else [b"c"])
    s = smtp(f)
    assert send(s.port)[-2].startswith(b"250 ")
    (msg, _, _), = drops(qroot)
    assert msg.startswith(b"X-Qpy-Quarantine: looks odd really\n")
    assert s.wait_log("quarantine requested: looks odd")


def test_foreign_authentication_results_removed_without_filters(qroot):
    s = Listener(qroot, ipv6=False)
    try:
        msg = (b"Authentication-Results: TEST.example;\r\n\tdkim=pass (forged, folded)\r\n"
               b"Authentication-Results: other.example; spf=pass\r\n"
               b"Subject: hi\r\n\r\nAuthentication-Results: test.example; in the body\r\n"
               b".\r\n")
        replies = send(s.port, msg)
        assert replies[-2].startswith(b"250 "), replies
        (got, _, _), = drops(qroot)
        head, body = got.split(b"\n\n", 1)
        assert b"forged" not in head
        assert b"Authentication-Results: other.example; spf=pass\n" in head
        assert body == b"Authentication-Results: test.example; in the body\n"
        assert s.wait_log("removed 1 Authentication-Results")
    finally:
        s.stop()
