"""The DSN extension (RFC 3461) end to end: qpy-smtpd's parameters, the queue's
records, qpy-sendmail's -N/-R/-V, bounces and success notices, and qpy-remote
passing the parameters on to a peer that offers DSN (scripted peers, a real
Postfix) and not to one that does not.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import time

import pytest
import test_remote
from qpytest import maildir_messages, needs_root, wait_for
from remote_peers import PrivatePostfix, RawPeer, basic_session
from smtphelp import Client, Listener
from test_door import smtp_system
from test_remote import MSG, PEER
from test_send import Qpy, _queue_owner, bounces, queue_empty, user

from qpy.common import dropfile, dsnparam, envelope, spawn, state

dnssrv, port, stack = test_remote.dnssrv, test_remote.port, test_remote.stack

ME = "test.example"
DSN_EHLO = b"250-peer\r\n250-PIPELINING\r\n250 DSN\r\n"


def drop_envelopes(qroot) -> list[envelope.Envelope]:
    out = []
    for name in sorted(os.listdir(qroot.paths.drop)):
        if dropfile.is_final_name(name):
            with open(os.path.join(qroot.paths.drop, name), "rb") as f:
                data = f.read()
            h = dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data))
            out.append(envelope.decode_all(data[h.length + h.msglen:]))
    return out


def session(port_: int, ehlo: bool = True) -> Client:
    c = Client(port_)
    assert c.reply().startswith(b"220 ")
    assert c.cmd(b"EHLO c.example" if ehlo else b"HELO c.example").startswith(b"250")
    return c


def reports(pw, kind: str) -> list[email.message.Message]:
    """The multipart/report messages in pw's Maildir whose Action is `kind`."""
    return [m for m in bounces(pw) if m.get_payload()[1].get_payload()[1]["Action"] == kind]


# --- qpy-smtpd's parameters ---------------------------------------------------------------
def test_smtpd_advertises_dsn_and_queues_each_parameter(qroot):
    qroot.control("acceptunknown", "1")
    s = Listener(qroot)
    try:
        c = Client(s.port)
        c.reply()
        assert re.search(rb"\r\n250[- ]DSN\r\n", c.cmd(b"EHLO c.example"))
        assert c.cmd(b"MAIL FROM:<a@b.example> ret=hdrs ENVID=QQ+2B1").startswith(b"250 ")
        long_orcpt = b"rfc822;" + b"o" * 420 + b"+40y.example"     # a line past 512 bytes
        for rcpt in (b"<x@test.example> NOTIFY=success,Failure ORCPT=RFC822;X+40y.example",
                     b"<y@test.example> NOTIFY=NEVER", b"<z@test.example>",
                     b"<u@test.example> ORCPT=utf-8;j\\x{F6}rg@y.example NOTIFY=DELAY",
                     b"<w@test.example> ORCPT=" + long_orcpt):
            assert c.cmd(b"RCPT TO:" + rcpt).startswith(b"250 "), rcpt
        assert c.cmd(b"DATA").startswith(b"354")
        assert c.cmd(b"Subject: dsn\r\n\r\nbody\r\n.").startswith(b"250 ")
        c.close()
        [env] = drop_envelopes(qroot)
        assert env.mail == b"RET=HDRS ENVID=QQ+2B1"
        assert env.rcpt == [b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;X@y.example",
                            b"NOTIFY=NEVER", b"",
                            b"NOTIFY=DELAY ORCPT=utf-8;j\\x{F6}rg@y.example",
                            b"ORCPT=rfc822;" + b"o" * 420 + b"@y.example"]
        assert dsnparam.original_recipient(env.rcpt[0]) == "rfc822;X@y.example"
        assert dsnparam.envid_of(env.mail) == "QQ+1"
    finally:
        s.stop()


MAIL_BAD = [b"RET=ALL", b"RET", b"RET=FULL RET=HDRS", b"ENVID=a+2", b"ENVID=a+2b",
            b"ENVID=a+00b", b"ENVID=a+0Ab", b"ENVID=a+20b", b"ENVID", b"ENVID=" + b"e" * 101,
            b"ENVID=" + b"+41" * 34]
RCPT_BAD = [b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=SUCCESS,SUCCESS", b"NOTIFY=SOMETIMES",
            b"NOTIFY=", b"NOTIFY", b"NOTIFY=SUCCESS NOTIFY=FAILURE", b"NOTIFY=SUCCESS,",
            b"ORCPT=x400;abc", b"ORCPT=rfc822;a+00b@x.example", b"ORCPT=rfc822;a+2",
            b"ORCPT=rfc822", b"ORCPT=rfc822;", b"ORCPT=rfc822;a+0Db@x.example",
            b"ORCPT=rfc822;a+E9@x.example", b"ORCPT=rfc822;" + b"o" * 494,
            b"ORCPT=utf-8;a\\x{0}b@x.example", b"ORCPT=utf-8;a\\x{D800}b",
            b"ORCPT=utf-8;a\\x{110000}", b"ORCPT=utf-8;a\\xF6b", b"ORCPT=utf-8;a+b"]


def test_smtpd_refuses_each_malformed_dsn_parameter(qroot):
    qroot.control("acceptunknown", "1")
    s = Listener(qroot)
    try:
        for bad in MAIL_BAD:
            c = session(s.port)
            r = c.cmd(b"MAIL FROM:<a@b.example> " + bad)
            assert r.startswith(b"501 5.5.4 "), (bad, r)
            assert c.cmd(b"RCPT TO:<x@test.example>").startswith(b"503"), bad  # no MAIL
            c.close()
        for bad in RCPT_BAD:
            c = session(s.port)
            assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
            r = c.cmd(b"RCPT TO:<x@test.example> " + bad)
            assert r.startswith(b"501 5.5.4 "), (bad, r)
            assert c.cmd(b"DATA").startswith(b"554"), bad        # no recipient was taken
            c.close()
        c = session(s.port)
        assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<x@test.example> XNOTIFY=NEVER").startswith(b"555 5.5.4")
        # a NUL inside a parameter never reaches the parser
        assert c.cmd(b"RCPT TO:<x@test.example> NOTIFY=NE\0VER").startswith(b"500 5.5.2")
        # the extra room is for MAIL and RCPT only, and bounded
        assert c.cmd(b"NOOP " + b"x" * 600) == b"500 5.5.2 Line too long\r\n"
        assert c.cmd(b"RCPT TO:<x@test.example> ORCPT=rfc822;" + b"o" * 1100) \
            == b"500 5.5.2 Line too long\r\n"
        c.close()
        c = session(s.port, ehlo=False)            # HELO: no extensions, no parameters
        assert c.cmd(b"MAIL FROM:<a@b.example> RET=FULL").startswith(b"555 5.5.4")
        assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<x@test.example> NOTIFY=NEVER").startswith(b"555 5.5.4")
        c.close()
        assert drop_envelopes(qroot) == []
    finally:
        s.stop()


def test_envelope_and_state_records_are_strict_and_old_files_read_as_before(tmp_path):
    env = envelope.encode(b"a@b.example", [b"c@d.example"], b"RET=FULL",
                          [b"NOTIFY=NEVER"])
    assert env == b"Fa@b.example\0PRET=FULL\0Tc@d.example\0QNOTIFY=NEVER\0\0"
    old = b"Fa@b.example\0Tc@d.example\0\0"           # qmail's, and qpy's before DSN
    e = envelope.decode_all(old)
    assert (e.sender, e.recipients, e.mail, e.rcpt) == (b"a@b.example", [b"c@d.example"],
                                                       b"", [b""])
    for bad in (b"Fa@b.example\0PRET=FULL\0PRET=FULL\0Tc@d.example\0\0",       # two P
                b"Fa@b.example\0Tc@d.example\0QNOTIFY=NEVER\0QNOTIFY=NEVER\0\0",
                b"Fa@b.example\0Tc@d.example\0QNOTIFY=NEVER,SUCCESS\0\0",
                b"Fa@b.example\0Tc@d.example\0Q\0\0",
                b"Fa@b.example\0Tc@d.example\0QNOTIFY=never\0\0",   # not canonical
                b"Fa@b.example\0Tc@d.example\0QORCPT=rfc822;a b\0\0",
                b"Fa@b.example\0Tc@d.example\0PRET=FULL\0\0",       # P after a T
                b"Fa@b.example\0QNOTIFY=NEVER\0Tc@d.example\0\0",   # Q before any T
                b"Fa@b.example\0Tc@d.example\0QNOTIFY=NEVER"):
        with pytest.raises(envelope.EnvelopeError):
            envelope.decode_all(bad)
    head = (b"QPYSTATE1\t1\t1\t2\t3\t4\nF\ta@b\nR\t0\tL\tc@d\tc@d\n"
            b"R\t1\tR\te@f\te@f\nE\nK\t0\n")
    st = state.decode(head)                           # a file from before DSN
    assert st.dsn == b"" and [r.dsn for r in st.recipients] == [b"", b""]
    assert not st.recipients[0].notice_owed() and not st.recipients[1].relayed
    st = state.decode(head.replace(b"F\ta@b\n", b"F\ta@b\nP\tRET=HDRS\n")
                      .replace(b"e@f\te@f\n", b"e@f\te@f\tNOTIFY=SUCCESS\n")
                      + b"K\t1\tR\n")
    assert st.dsn == b"RET=HDRS" and st.recipients[1].relayed
    assert st.recipients[1].notice_owed() and not st.finished()
    st = state.decode(state.encode_head(st, [0, 1]) + b"N\t1\n")
    assert st.recipients[1].noticed and st.finished()
    with pytest.raises(state.StateError):
        state.decode(head.replace(b"e@f\te@f\n", b"e@f\te@f\tNOTIFY=SOMETIMES\n"))


def test_sendmail_N_R_V_reach_the_queue(qroot):
    r = qroot.run("qpy-sendmail", "-N", "success, delay", "-R", "hdrs", "-V", "id+1=x",
                  "-f", "a@b.example", "x@test.example", "y@test.example",
                  input=b"Subject: s\n\nbody\n")
    assert r.returncode == 0, r.stderr
    [env] = drop_envelopes(qroot)
    assert env.mail == b"RET=HDRS ENVID=id+2B1+3Dx"
    assert env.rcpt == [b"NOTIFY=SUCCESS,DELAY"] * 2
    for args in (["-N", "never,success"], ["-R", "some"], ["-V", "a b"], ["-V", "x" * 101]):
        r = qroot.run("qpy-sendmail", *args, "x@test.example", input=b"\n")
        assert r.returncode == 64 and b"qpy-sendmail: -" in r.stderr, (args, r.stderr)
    assert len(drop_envelopes(qroot)) == 1


# --- through the whole path ---------------------------------------------------------------
@needs_root
def test_notify_never_success_and_default_through_smtp(qroot):
    """One message over SMTP: NOTIFY=NEVER to an unknown user (no bounce, logged),
    the default to another unknown user (bounced), NOTIFY=SUCCESS to a real user
    (a success notice, every field checked)."""
    qroot.control("acceptunknown", "1")
    a = user("da", qroot)
    b = user("db", qroot)
    q, smtp_port = smtp_system(qroot)      # qpy-start's own smtpd service
    try:
        c = session(smtp_port)
        for cmd in (b"MAIL FROM:<qtda@test.example> RET=FULL ENVID=env+2B42",
                    b"RCPT TO:<qtdsnnobody1@test.example> NOTIFY=NEVER",
                    b"RCPT TO:<qtdsnnobody2@test.example>",
                    b"RCPT TO:<qtdb@test.example> NOTIFY=SUCCESS,FAILURE "
                    b"ORCPT=rfc822;boss+2Bdb@corp.example"):
            assert c.cmd(cmd).startswith(b"250"), cmd
        assert c.cmd(b"DATA").startswith(b"354")
        assert c.cmd(b"Subject: dsn path\r\n\r\npayload 15\r\n.").startswith(b"250")
        c.close()
        q.wait_log(r"no bounce msg \d+ for qtdsnnobody1@test.example: NOTIFY without FAILURE")
        assert wait_for(lambda: len(bounces(a)) == 2, 30), q.log()
        assert wait_for(lambda: queue_empty(qroot), 30), q.log()
        [bnc] = reports(a, "failed")
        text = bnc.get_payload()[0].get_content()
        assert "qtdsnnobody2@" in text and "qtdsnnobody1" not in text
        [top, blk] = bnc.get_payload()[1].get_payload()
        assert top["Original-Envelope-Id"] == "env+42"
        assert blk["Final-Recipient"] == "rfc822; qtdsnnobody2@test.example"
        assert "Original-Recipient" not in blk           # no ORCPT given for it
        assert bnc.get_payload()[2].get_content_type() == "message/rfc822"   # RET=FULL
        [ok] = reports(a, "delivered")
        assert ok["Subject"] == "Successful Mail Delivery Report"
        assert ok["Return-Path"] == "<>" and ok.get_content_type() == "multipart/report"
        human, status, copy = ok.get_payload()
        assert "<qtdb@test.example>:\nDelivered to the mailbox." in human.get_content()
        [top, blk] = status.get_payload()
        assert top["Original-Envelope-Id"] == "env+42"
        assert top["Reporting-MTA"] == "dns; test.example"
        assert blk["Original-Recipient"] == "rfc822;boss+db@corp.example"
        assert blk["Final-Recipient"] == "rfc822; qtdb@test.example"
        assert blk["Action"] == "delivered" and blk["Status"] == "2.0.0"
        assert copy.get_content_type() == "text/rfc822-headers"
        assert "Subject: dsn path" in copy.get_payload() and "payload 15" not in ok.as_string()
        assert [m["Subject"] for m in maildir_messages(b)] == ["dsn path"]
        assert re.search(r"success notice msg \d+", q.log())
    finally:
        assert q.stop() == 0


@needs_root
def test_ret_hdrs_bounce_returns_the_header_only(qroot):
    a = user("da", qroot)
    q = Qpy(qroot)
    try:
        r = qroot.run("qpy-sendmail", "-R", "hdrs", "-N", "failure", "-f", "qtda@test.example",
                      "qtdsnnobody3@test.example",
                      input=b"Subject: hdrs only\nX-Mark: kept\n\nsecret body 77\n")
        assert r.returncode == 0, r.stderr
        [bnc] = wait_for(lambda: bounces(a), 30) or [None]
        assert bnc is not None, q.log()
        human, status, copy = bnc.get_payload()
        assert copy.get_content_type() == "text/rfc822-headers"
        assert "X-Mark: kept" in copy.get_payload()
        assert b"secret body 77" not in bnc.as_bytes()
        assert status.get_payload()[1]["Action"] == "failed"
    finally:
        assert q.stop() == 0


@needs_root
def test_old_format_state_file_in_the_queue_still_delivers(qroot):
    """A state/ID written by the previous version (no P record, five-field R lines,
    an old three-field D record) is read as before: the waiting recipient delivered,
    the failed one bounced, no notice of any kind besides."""
    a = user("da", qroot)
    b = user("db", qroot)
    msgid = "17000000000000001234567"
    p = qroot.paths
    now = int(time.time())
    body = b"Subject: old\n\nold payload\n"
    head = (b"QPYSTATE1\t%s\t%d\t%d\t0\t9\nF\tqtda@test.example\n"
            b"R\t0\tL\tqtdb@test.example\tqtdb@test.example\n"
            b"R\t1\tL\tgone@test.example\tgone@test.example\nE\n"
            b"D\t1\tthe old failure\n") % (msgid.encode(), now, len(body))
    for path, data, owner, mode in ((os.path.join(p.mess, msgid), body, "qpyq", 0o640),
                                    (os.path.join(p.state, msgid), head, "qpys", 0o600)):
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, _queue_owner(owner)[0], _queue_owner("qpys")[1])
        os.chmod(path, mode)
    q = Qpy(qroot)
    try:
        assert wait_for(lambda: maildir_messages(b), 30), q.log()
        # the bounce is a message of its own: in a Maildir, not merely out of the queue
        assert wait_for(lambda: bounces(a), 30), q.log()
        assert wait_for(lambda: queue_empty(qroot), 30), q.log()
        [bnc] = bounces(a)
        assert bnc.get_payload()[1].get_payload()[1]["Action"] == "failed"
        assert "the old failure" in bnc.get_payload()[0].get_content()
        assert "success notice" not in q.log()
    finally:
        assert q.stop() == 0


# --- qpy-remote: passed on to a peer that offers DSN, and only to one -------------------
def send_dsn(rs, rcpts: list[bytes], dsn: spawn.Dsn) -> list[tuple[bytes, bytes]]:
    path = os.path.join(rs.dir, "m%d" % rs.next)
    with open(path, "wb") as f:
        f.write(MSG)
    fd = os.open(path, os.O_RDONLY)
    try:
        spawn.send_request(rs.sock, rs.next, b"a@test.example", rcpts, fd, dsn)
    finally:
        os.close(fd)
    rs.next += 1
    d, res = rs.result()
    assert d == rs.next - 1 and len(res) == len(rcpts)
    return res


def lines_of(transcript: bytes, verb: bytes) -> list[bytes]:
    return [ln for ln in transcript.split(b"\r\n") if ln.upper().startswith(verb)]


@needs_root
def test_remote_passes_dsn_to_a_peer_that_offers_it_on_each_reused_connection(stack):
    qroot, dnssrv_, port_, rs = stack
    peer = RawPeer(PEER, port_, lambda c: basic_session(c, ehlo=DSN_EHLO))
    try:
        dsn = spawn.Dsn(b"RET=HDRS ENVID=a+2Bb", [b"NOTIFY=SUCCESS ORCPT=rfc822;o+2Bx@y.example",
                                                  b""])
        for _ in range(2):          # the second one on the cached connection
            res = send_dsn(rs, [b"x@a.test", b"y@a.test"], dsn)
            assert [s for s, _ in res] == [b"K", b"K"], res    # the peer notifies, not us
        assert peer.connections == 1
        got = peer.transcripts[0]
        assert lines_of(got, b"MAIL") == [b"MAIL FROM:<a@test.example> RET=HDRS ENVID=a+2Bb"] * 2
        assert lines_of(got, b"RCPT") == [
            b"RCPT TO:<x@a.test> NOTIFY=SUCCESS ORCPT=rfc822;o+2Bx@y.example",
            b"RCPT TO:<y@a.test>"] * 2
    finally:
        peer.stop()


@needs_root
def test_remote_sends_no_dsn_to_a_peer_without_it_and_reports_relayed(stack):
    qroot, dnssrv_, port_, rs = stack
    peer = RawPeer(PEER, port_, lambda c: basic_session(c))
    try:
        dsn = spawn.Dsn(b"ENVID=e1", [b"NOTIFY=SUCCESS,FAILURE", b"NOTIFY=FAILURE",
                                      b"NOTIFY=NEVER"])
        res = send_dsn(rs, [b"x@a.test", b"y@a.test", b"z@a.test"], dsn)
        assert [s for s, _ in res] == [b"R", b"K", b"K"], res
        got = wait_for(lambda: peer.transcripts and b"QUIT" in peer.transcripts[0]
                       and peer.transcripts[0])
        assert lines_of(got, b"MAIL") == [b"MAIL FROM:<a@test.example>"]
        assert lines_of(got, b"RCPT") == [b"RCPT TO:<x@a.test>", b"RCPT TO:<y@a.test>",
                                          b"RCPT TO:<z@a.test>"]
        assert b"NOTIFY" not in got and b"ENVID" not in got
    finally:
        peer.stop()


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/sbin/postfix"), reason="postfix not installed")
def test_remote_to_real_postfix_which_reports_success_itself(stack):
    """Postfix offers DSN: it gets NOTIFY/ORCPT/RET/ENVID, and its own success notice
    (in its queue, on its way to our sender) quotes our ENVID and ORCPT."""
    qroot, dnssrv_, port_, rs = stack
    pf = PrivatePostfix(PEER, port_, "a.test")
    try:
        dsn = spawn.Dsn(b"RET=HDRS ENVID=pf+2Benv",
                        [b"NOTIFY=SUCCESS ORCPT=rfc822;o+2Bx@y.example"])
        res = send_dsn(rs, [b"x@a.test"], dsn)
        assert res[0][0] == b"K", res
        m = wait_for(lambda: re.search(r"sender delivery status notification: (\w+)", pf.log()),
                     30)
        assert m, pf.log()
        out = subprocess.run(["postcat", "-c", pf.conf, "-q", m.group(1)], capture_output=True,
                             timeout=30).stdout.decode("utf-8", "replace")
        assert "Original-Envelope-Id: pf+env" in out, out
        assert re.search(r"Original-Recipient: rfc822; ?o\+x@y\.example", out), out
        assert "Action: delivered" in out
    finally:
        pf.stop()


@needs_root
def test_success_to_a_peer_without_dsn_gives_a_relayed_notice(qroot, dnssrv, port):
    qroot.control("resolvers", "127.0.0.1:%d" % dnssrv.port)
    qroot.control("smtproutes", "::%d" % port)
    qroot.control("timeoutremote", "5")
    dnssrv.add("a.test", "MX", "10 mx.a.test.")
    dnssrv.add("mx.a.test", "A", PEER)
    a = user("da", qroot)
    peer = RawPeer(PEER, port, lambda c: basic_session(c))
    q = Qpy(qroot)
    try:
        r = qroot.run("qpy-sendmail", "-N", "success", "-V", "rel1", "-f", "qtda@test.example",
                      "far@a.test", input=b"Subject: relayed\n\nbody\n")
        assert r.returncode == 0, r.stderr
        [notice] = wait_for(lambda: bounces(a), 30) or [None]
        assert notice is not None, q.log()
        [top, blk] = notice.get_payload()[1].get_payload()
        assert top["Original-Envelope-Id"] == "rel1"
        assert blk["Final-Recipient"] == "rfc822; far@a.test"
        assert blk["Action"] == "relayed" and blk["Status"] == "2.0.0"
        assert b"NOTIFY" not in peer.transcripts[0]
        assert wait_for(lambda: queue_empty(qroot), 30), q.log()
    finally:
        peer.stop()
        assert q.stop() == 0
