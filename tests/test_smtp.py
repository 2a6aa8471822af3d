"""The SMTP service: qpy-tcpserver, qpy-smtpd, qpy-newrcpt — over real sockets.

Messages are checked where qpy-smtpd leaves them: complete drop files in
queue/drop/ (no pickup runs here), with the envelope decoded by the queue's
own reader. Uids and memory are read from the real processes with psutil.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import qpytest
from qpytest import needs_root, wait_for
from smtphelp import Client, Listener, UcspiListener, drop_names, drops

from qpy.smtp.tcpserver import ADMISSIONS_KEPT
from qpy.smtp.worker import POOL_MIN

ME = "test.example"
MSG = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def server(qroot):
    s = Listener(qroot)
    try:
        yield s
    finally:
        s.stop()


def session(port: int, *cmds: bytes, host: str = "127.0.0.1",
            source: str | None = None) -> list[bytes]:
    """Greeting, EHLO, then each command; the replies (first line each)."""
    c = Client(port, host, source)
    try:
        c.hello()
        return [c.cmd(x) for x in cmds]
    finally:
        c.close()


def codes(replies: list[bytes]) -> list[int]:
    return [int(r[:3]) for r in replies]


def mail(c: Client, sender: bytes = b"a@b.example",
         rcpts: tuple[bytes, ...] = (b"postmaster@test.example",)) -> None:
    assert c.cmd(b"MAIL FROM:<%s>" % sender).startswith(b"250")
    for r in rcpts:
        assert c.cmd(b"RCPT TO:<%s>" % r).startswith(b"250"), r
    assert c.cmd(b"DATA").startswith(b"354")


# -- clients that exist in the wild ---------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_smtplib_queues_message(server, qroot, host):
    with smtplib.SMTP(host, server.port, timeout=30) as s:
        code, caps = s.ehlo("client.example")
        assert code == 250
        for kw in (b"PIPELINING", b"8BITMIME", b"SIZE", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"):
            assert kw in caps
        refused = s.sendmail("alice@client.example", ["postmaster@test.example"],
                             b"Subject: one\r\n\r\nline 1\r\n.dot line\r\n")
        assert refused == {}
    (msg, sender, rcpts), = drops(qroot)
    assert sender == b"alice@client.example" and rcpts == [b"postmaster@test.example"]
    received, _, rest = msg.partition(b";\n\t")
    assert received.startswith(b"Received: from client.example (unknown [%s])\n\tby %s (qpy) "
                               b"with ESMTP id " % (host.encode(), ME.encode()))
    assert rest.split(b"\n", 1)[1] == b"Subject: one\n\nline 1\n.dot line\n"
    assert "accepted" in server.log()


@pytest.mark.parametrize("pipeline", [False, True])
def test_swaks(server, qroot, pipeline):
    args = ["swaks", "--server", "127.0.0.1", "--port", str(server.port), "--from",
            "s@example.org", "--to", "postmaster@test.example", "--helo", "swaks.example"]
    if pipeline:
        args.append("--pipeline")
    r = subprocess.run(args, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:]
    (msg, sender, rcpts), = drops(qroot)
    assert sender == b"s@example.org" and b"from swaks.example" in msg


# -- relaying, recipients, senders ----------------------------------------------------------

def test_relay_rules_by_client_address(qroot):
    qroot.control("smtprules", '127.0.0.2:allow\n127.0.0.3:deny\n127.:allow,RELAYCLIENT=""\n'
                               ':allow\n')
    s = Listener(qroot)
    try:
        mail_from = b"MAIL FROM:<a@b.example>"
        stranger = session(s.port, mail_from, b"RCPT TO:<x@elsewhere.example>",
                           b"RCPT TO:<u@[IPv6:2001:db8::1]>", source="127.0.0.2")
        assert stranger[1].startswith(b"553 5.7.1 ") and stranger[2].startswith(b"553 5.7.1 ")
        relay = session(s.port, mail_from, b"RCPT TO:<x@elsewhere.example>",
                        b"RCPT TO:<u@[IPv6:2001:db8::1]>", b"RCPT TO:<u@[192.0.2.1]>")
        assert codes(relay) == [250, 250, 250, 250]
        denied = Client(s.port, source="127.0.0.3")
        assert denied.closed() and denied.buf == b""
        assert s.wait_log("deny 127.0.0.3")
        # SIGHUP re-reads the rules: now 127.0.0.1 is a stranger too, and 127.0.0.3 is
        # let in (qpy-tcpserver keeps what the rules said of an address until then)
        qroot.control("smtprules", ":allow\n")
        s.proc.send_signal(1)
        assert s.wait_log("control files re-read")
        again = session(s.port, mail_from, b"RCPT TO:<x@elsewhere.example>")
        assert again[1].startswith(b"553 5.7.1 ")
        let_in = session(s.port, mail_from, b"RCPT TO:<postmaster@test.example>",
                         source="127.0.0.3")
        assert codes(let_in) == [250, 250]
    finally:
        s.stop()


def test_admissions_kept_stay_bounded(qroot):
    """qpy-tcpserver keeps what the rules said of each client address, at most
    ADMISSIONS_KEPT addresses: then it forgets them all and starts again, and the rules
    still decide every connection."""
    qroot.control("smtprules", "127.1.:deny\n:allow\n")
    s = Listener(qroot)
    try:
        for n in range(ADMISSIONS_KEPT + 1):       # one address more than it keeps
            c = Client(s.port, source="127.1.%d.%d" % (n // 200, n % 200 + 1))
            assert c.closed() and c.buf == b"", n  # denied: closed without a greeting
            c.close()
        assert s.wait_log("info: %d client addresses' admissions forgotten"
                          % ADMISSIONS_KEPT)
        denied = Client(s.port, source="127.1.0.1")             # still denied
        assert denied.closed() and denied.buf == b""
        denied.close()
        allowed = Client(s.port, source="127.0.0.9")
        assert allowed.reply().startswith(b"220 ")
        allowed.close()
    finally:
        s.stop()


def test_unknown_local_recipient_refused_for_everyone(server, qroot):
    # 127.0.0.1 is a relay client (default rules); the check applies anyway
    r = session(server.port, b"MAIL FROM:<a@b.example>", b"RCPT TO:<nosuchuser@test.example>",
                b"RCPT TO:<NoSuchUser@TEST.example>", b"RCPT TO:<postmaster@test.example>",
                b"RCPT TO:<Postmaster>", b'RCPT TO:<"no such"@test.example>')
    assert r[1] == b"550 5.1.1 No such user here\r\n"
    assert codes(r) == [250, 550, 550, 250, 250, 550]
    qroot.control("acceptunknown", "")
    server.proc.send_signal(1)
    assert server.wait_log("control files re-read")
    r = session(server.port, b"MAIL FROM:<a@b.example>", b"RCPT TO:<nosuchuser@test.example>")
    assert codes(r) == [250, 250]


@needs_root
def test_newrcpt_table_from_users_assign_and_dotqmail(qroot):
    home = os.path.join(os.path.dirname(qroot.path), "home-smtp1")
    pw = qpytest.make_user("smtp1", home)
    for name in (".qmail-list", ".qmail-ext-default", ".qmail-p:d"):
        open(os.path.join(home, name), "w").close()
    open(os.path.join(qroot.paths.alias, ".qmail-sales"), "w").close()
    assign = os.path.join(qroot.paths.users, "assign")
    with open(assign, "rb") as f:
        lines = [ln for ln in f.read().splitlines() if ln != b"."]
    entry = (pw.pw_name.encode(), pw.pw_uid, pw.pw_gid, home.encode())
    # with a dash, an assigned address is valid as far as that home has a .qmail file
    # for its extension (else delivery would bounce it as unknown): shop-42 is
    # .qmail-ext-42, found by .qmail-ext-default; club-1 is .qmail-none-1, not there
    lines += [b"+shop-:%s:%d:%d:%s:-:ext-:" % entry, b"+club-:%s:%d:%d:%s:-:none-:" % entry,
              b"=boss:%s:%d:%d:%s:::" % entry, b"."]
    with open(assign, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    r = qroot.run("qpy-newrcpt", qroot.path)
    assert r.returncode == 0, r.stderr
    table = os.path.join(qroot.paths.users, "recipients")
    st = os.stat(table)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, pwd.getpwnam("qpyd").pw_gid, 0o640)
    s = Listener(qroot)
    try:
        u = pw.pw_name.encode()
        good = [u, u + b"-list", u + b"-ext-anything", u + b"-p.d", b"sales", b"shop-42", b"boss"]
        bad = [u + b"-nolist", u + b"-ext", b"salesx", b"shop", b"bosses", b"club-1"]
        cmds = [b"MAIL FROM:<a@b.example>"] + [b"RCPT TO:<%s@test.example>" % x
                                               for x in good + bad]
        assert codes(session(s.port, *cmds)) == [250] + [250] * len(good) + [550] * len(bad)
        # the table is re-read when qpy-newrcpt rewrites it: no restart, no SIGHUP
        open(os.path.join(home, ".qmail-nolist"), "w").close()
        assert qroot.run("qpy-newrcpt", qroot.path).returncode == 0
        r = session(s.port, b"MAIL FROM:<a@b.example>", b"RCPT TO:<%s-nolist@test.example>" % u)
        assert codes(r) == [250, 250]
    finally:
        s.stop()


def test_badmailfrom(server, qroot):
    qroot.control("badmailfrom", "spammer@bad.example\n@worse.example\n")
    server.proc.send_signal(1)
    assert server.wait_log("control files re-read")
    r = session(server.port, b"MAIL FROM:<Spammer@BAD.example>", b"MAIL FROM:<x@worse.example>",
                b"MAIL FROM:<ok@bad.example>")
    assert r[0] == b"553 5.7.1 Sender address refused by policy\r\n"
    assert codes(r) == [553, 553, 250]


# -- smuggling and bad input, exact replies, queue checked ---------------------------------

SMUGGLED = (b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<postmaster@test.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")
BARE = b"550 5.6.0 Message refused: bare CR or LF in the data (lines must end with CRLF)\r\n"


@pytest.mark.parametrize("data", [
    b"Subject: a\r\n\r\nbody\n.\n" + SMUGGLED,
    b"Subject: a\r\n\r\nbody\r.\r" + SMUGGLED,
    b"Subject: a\r\n\r\nbody\n.\r\n" + SMUGGLED,
    b"Subject: a\r\n\r\nbody\r\n.\n" + SMUGGLED,
    b"Subject: a\r\n\r\nbody\r\r\n.\r\r\n" + SMUGGLED,
    b"Subject: bare\rcr\r\n\r\nbody\r\n",
    b"Subject: bare\nlf\r\n\r\nbody\r\n",
    b"Subject: a\r\n\r\nbody with a bare \n in it\r\n",
], ids=["lf.lf", "cr.cr", "lf.crlf", "crlf.lf", "crcrlf", "cr-header", "lf-header", "lf-body"])
def test_smuggling_refused_and_nothing_queued(server, qroot, data):
    c = Client(server.port)
    c.hello()
    mail(c)
    c.send(data + b".\r\n")
    assert c.reply() == BARE
    assert c.cmd(b"NOOP") == b"250 2.0.0 Ok\r\n"     # the session goes on, in step
    assert c.cmd(b"QUIT").startswith(b"221 ")
    assert drops(qroot) == []


def test_nul_bytes(server, qroot):
    # NUL in a command is refused; in the data it is kept byte for byte (8BITMIME, as qmail)
    r = session(server.port, b"NOOP\0x", b"MAIL FROM:<a@b\0.example>")
    assert r[0] == b"500 5.5.2 Syntax error: control character in command\r\n"
    assert codes(r) == [500, 500]
    c = Client(server.port)
    c.hello()
    mail(c)
    c.send(b"Subject: nul\r\n\r\na\0b\r\n.\r\n")
    assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
    (msg, _, _), = drops(qroot)
    assert msg.endswith(b"\nSubject: nul\n\na\0b\n")


def test_long_command_line_and_line_over_998_in_data(server, qroot):
    c = Client(server.port)
    c.hello()
    c.send(b"NOOP " + b"x" * 100_000 + b"\r\n")
    assert c.reply() == b"500 5.5.2 Line too long\r\n"
    assert c.cmd(b"NOOP" + b" x" * 253).startswith(b"250")          # 510 bytes + CRLF: fine
    assert c.cmd(b"NOOP" + b" x" * 254) == b"500 5.5.2 Line too long\r\n"
    mail(c)
    long_line = b"y" * 5000
    c.send(b"Subject: long\r\n\r\n" + long_line + b"\r\n..z\r\n.\r\n")
    assert c.reply().startswith(b"250 ")
    (msg, _, _), = drops(qroot)
    assert msg.endswith(b"\n\n" + long_line + b"\n.z\n")            # intact, unstuffed


def _rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def test_16mb_without_line_end_memory_flat(server, qroot):
    c = Client(server.port)
    c.hello()
    child, = server.sessions()
    before = _rss(child)
    chunk = b"A" * (1 << 20)
    peak = 0
    for _ in range(16):
        c.send(chunk)
        peak = max(peak, _rss(child))
    c.send(b"\r\n")
    assert c.reply() == b"500 5.5.2 Line too long\r\n"
    peak = max(peak, _rss(child))
    assert peak - before < 8 << 20, (before, peak)
    # the same in DATA, past databytes: read to the end, refused, memory flat
    qroot.control("databytes", "1000000")
    server.proc.send_signal(1)
    assert server.wait_log("control files re-read")
    c2 = Client(server.port)
    c2.hello()
    child2, = [p for p in server.sessions() if p.pid != child.pid]
    mail(c2)
    before = _rss(child2)
    for _ in range(16):
        c2.send(chunk)
        peak = max(peak, _rss(child2))
    c2.send(b"\r\n.\r\n")
    assert c2.reply() == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert max(peak, _rss(child2)) - before < 8 << 20
    assert c2.cmd(b"QUIT").startswith(b"221")
    c.close()
    assert server.wait_idle()
    assert drops(qroot) == [] and drop_names(qroot) == []


def test_size_param_and_databytes(server, qroot):
    qroot.control("databytes", "1000")
    server.proc.send_signal(1)
    assert server.wait_log("control files re-read")
    c = Client(server.port)
    assert c.reply().startswith(b"220")
    assert b"250-SIZE 1000\r\n" in c.cmd(b"EHLO x")
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=1001") == \
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=999 BODY=8BITMIME").startswith(b"250")
    assert c.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(b"x" * 2000 + b"\r\n.\r\n")
    assert c.reply().startswith(b"552 5.3.4 ")
    mail(c)                                    # the session goes on
    c.send(MSG + b".\r\n")
    assert c.reply().startswith(b"250 ")
    assert len(drops(qroot)) == 1


@pytest.mark.parametrize("sender,reply", [
    (b"<() { :;}; echo x@y>", b"501 5.1.7 "),
    (b"<;sleep 5;>", b"501 5.1.7 "),
    (b"<a|b>", b"501 5.1.7 "),
    (b"<$(id)@x.example>", b"501 5.1.7 "),
    (b"<a@b.example", b"501 5.5.4 "),
    (b"a@b.example", b"501 5.5.4 "),
    (b"<a@b.example>X", b"501 5.5.4 "),
    (b"<a@b.example> FOO=1", b"555 5.5.4 "),
    (b"<a@b.example> SIZE=1\rB", b"500 5.5.2 "),
    (b"<j\xc3\xb6rg@b.example>", b"553 5.6.7 "),
    (b"<\"john doe\"@b.example>", b"250 2.1.0 "),
    (b"<\"a>b\"@b.example>", b"250 2.1.0 "),
    (b"<`id`@b.example>", b"250 2.1.0 "),
    (b"<@hop.example:a@b.example>", b"250 2.1.0 "),
    (b"<>", b"250 2.1.0 "),
])
def test_sender_syntax(server, qroot, sender, reply):
    c = Client(server.port)
    c.hello()
    c.send(b"MAIL FROM:" + sender + b"\r\n")
    assert c.reply().startswith(reply)
    c.close()


def test_recipient_syntax_and_literals(server, qroot):
    r = session(server.port, b"MAIL FROM:<a@b.example>",
                b"RCPT TO:<${run{touch /tmp/p}}@test.example>", b"RCPT TO:<${run{x}}@test.example>",
                b"RCPT TO:<u@[IPv6:::1]>", b"RCPT TO:<u@[IPv6:zz]>", b"RCPT TO:<u@[1.2.3.999]>",
                b"RCPT TO:<>", b"RCPT TO:<u@b.example> XFOO=NEVER",
                b"RCPT TO:<\xe2\x82\xac@b.example>", b'RCPT TO:<"a b"@b.example>')
    assert codes(r) == [250, 501, 550, 250, 501, 501, 501, 555, 553, 250]
    assert r[4].startswith(b"501 5.1.3 ") and r[8].startswith(b"553 5.6.7 ")
    assert not os.path.exists("/tmp/p")


def test_smtputf8(server, qroot):
    c = Client(server.port)
    c.hello()
    assert c.cmd("MAIL FROM:<jörg@bü.example> SMTPUTF8".encode()).startswith(b"250")
    assert c.cmd("RCPT TO:<josé@empfänger.example>".encode()).startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    c.send("Subject: ü\r\n\r\nÜ\r\n.\r\n".encode() + b"")
    assert c.reply().startswith(b"250 ")
    (msg, sender, rcpts), = drops(qroot)
    assert sender == "jörg@bü.example".encode() and rcpts == ["josé@empfänger.example".encode()]
    assert b" with UTF8SMTP id " in msg
    # HELO (not EHLO): no parameters at all
    r = session(server.port, b"HELO x", b"MAIL FROM:<a@b.example> SMTPUTF8")
    assert codes(r) == [250, 555]


def test_sequence_errors_and_verbs(server, qroot):
    c = Client(server.port)
    assert c.reply().startswith(b"220 test.example ESMTP")
    assert c.cmd(b"MAIL FROM:<a@b.example>") == b"503 5.5.1 Send HELO or EHLO first\r\n"
    assert c.cmd(b"HELO") .startswith(b"501 5.5.4 ")
    assert c.cmd(b"HELO client").startswith(b"250 ")
    assert c.cmd(b"RCPT TO:<postmaster@test.example>") == b"503 5.5.1 Need MAIL before RCPT\r\n"
    assert c.cmd(b"DATA") == b"503 5.5.1 Need MAIL before DATA\r\n"
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    assert c.cmd(b"MAIL FROM:<a@b.example>") == b"503 5.5.1 Nested MAIL command\r\n"
    assert c.cmd(b"DATA") == b"554 5.5.1 No valid recipients\r\n"
    assert c.cmd(b"RSET") == b"250 2.0.0 Ok\r\n"
    assert c.cmd(b"VRFY postmaster").startswith(b"252 ")
    assert c.cmd(b"EXPN staff") == b"502 5.5.1 Command not implemented\r\n"
    assert c.cmd(b"HELP").startswith(b"214 ")
    assert c.cmd(b"FOO") == b"500 5.5.1 Command unrecognized\r\n"
    assert c.cmd(b"noop").startswith(b"250")
    assert c.cmd(b"QUIT") == b"221 2.0.0 test.example closing connection\r\n"
    assert c.closed()


def test_too_many_errors_then_421(server, qroot):
    c = Client(server.port)
    c.hello()
    for _ in range(9):
        assert c.cmd(b"BOGUS").startswith(b"500")
    c.send(b"BOGUS\r\n")
    assert c.reply().startswith(b"500")
    assert c.reply() == b"421 4.7.0 test.example Too many errors, closing connection\r\n"
    assert c.closed()


def test_10000_recipients(server, qroot):
    """10,000 pipelined RCPTs of one valid address: 100 taken (maxrcpt), then 452;
    10,000 unknown ones: test_attack_smtp.py (finding 8, cut off after 10)."""
    c = Client(server.port)
    c.hello()
    n = 10_000
    cmds = b"MAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<postmaster@test.example>\r\n" * n
    sender = threading.Thread(target=c.send, args=(cmds,))
    sender.start()
    got = [c.reply() for _ in range(n + 1)]
    sender.join()
    assert [int(r[:3]) for r in got[:101]] == [250] * 101
    assert set(got[101:]) == {b"452 4.5.3 Too many recipients\r\n"}
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.reply().startswith(b"250 ")
    (_, _, rcpts), = drops(qroot)
    assert len(rcpts) == 100


def test_pipelining_and_data_before_354(server, qroot):
    c = Client(server.port)
    c.hello()
    # a proper pipelined group (RFC 2920), DATA last
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@test.example>\r\n"
           b"RCPT TO:<postmaster@test.example>\r\nDATA\r\n")
    assert codes([c.reply() for _ in range(4)]) == [250, 550, 250, 354]
    c.send(MSG + b".\r\nNOOP\r\n")
    assert c.reply().startswith(b"250 2.0.0 Ok: queued")
    assert c.reply().startswith(b"250 2.0.0 Ok")
    # message text sent before our 354: the session ends, nothing is read as a command
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<postmaster@test.example>\r\nDATA\r\n"
           + SMUGGLED + b".\r\n")
    replies = [c.reply() for _ in range(3)]
    assert replies[2] == b"554 5.5.0 Data sent before the 354 reply, closing connection\r\n"
    assert c.closed()
    assert len(drops(qroot)) == 1


def test_stall_mid_data_times_out(server, qroot):
    qroot.control("timeoutsmtpd", "2")
    server.proc.send_signal(1)
    assert server.wait_log("control files re-read")
    c = Client(server.port)
    c.hello()
    mail(c)
    c.send(b"Subject: stalled\r\n\r\nhalf a mess")
    assert c.reply() == b"421 4.4.2 test.example Timeout, closing connection\r\n"
    assert c.closed()
    assert server.wait_idle()
    assert drop_names(qroot) == []
    assert "result timeout" in server.log()


def test_disconnect_mid_data_leaves_nothing(server, qroot):
    c = Client(server.port)
    c.hello()
    mail(c)
    c.send(b"Subject: cut\r\n\r\n" + b"z" * 200_000)
    c.close()
    assert server.wait_idle()
    assert drop_names(qroot) == []
    assert server.wait_log("result disconnect")


# -- the server process ----------------------------------------------------------------

@needs_root
def test_processes_run_as_qpyd_with_titles(server, qroot):
    qpyd = pwd.getpwnam("qpyd").pw_uid
    parent = psutil.Process(server.proc.pid)
    c = Client(server.port)
    c.hello()
    child, = server.sessions()
    assert parent.uids() == (qpyd, qpyd, qpyd) and child.uids() == (qpyd, qpyd, qpyd)
    assert parent.cmdline()[0].startswith("qpy-tcpserver")
    assert child.cmdline()[0].startswith("qpy-smtpd 127.0.0.1")
    c.close()


def _fd_targets(pid: int) -> dict[int, str]:
    return {int(n): os.readlink("/proc/%d/fd/%s" % (pid, n)) for n in os.listdir(
        "/proc/%d/fd" % pid)}


@needs_root
def test_session_worker_holds_only_its_client(server, qroot):
    """Three sessions at once, and an idle worker beside them: each session worker
    runs as qpyd and holds its own client (on fd 0 and 1), its one socketpair to
    the parent, /dev/null and the log: no listening socket (IPv4 and IPv6 here),
    no other session's connection, no other worker's pair. An idle worker, and
    one forked ahead that never served, holds no client and /dev/null on fd 0
    and 1 (before the shared pool, a fresh worker kept the log on fd 1)."""
    qpyd = pwd.getpwnam("qpyd")
    log = os.path.realpath(server.logpath)
    clients = [Client(server.port) for _ in range(4)]
    for c in clients:
        c.hello()
    assert wait_for(lambda: len(server.sessions()) == 4, 20)
    gone = clients.pop()                              # its worker: idle after a session
    assert gone.cmd(b"QUIT").startswith(b"221")
    gone.close()
    assert wait_for(lambda: len(server.sessions()) == 3, 20)
    assert len(server.workers()) > 3
    ports = {c.sock.getsockname()[1] for c in clients}
    seen = set()
    for p in server.workers():
        assert p.uids() == (qpyd.pw_uid,) * 3 and p.gids() == (qpyd.pw_gid,) * 3
        inet = p.net_connections("inet")
        unix = p.net_connections("unix")
        fds = _fd_targets(p.pid)
        assert len(unix) == 1, unix                   # its own pair, no sibling's
        assert all(c.status != psutil.CONN_LISTEN for c in inet), inet
        assert fds[2] == log
        if p in server.sessions():
            conn, = inet                              # one client: its own
            assert conn.status == psutil.CONN_ESTABLISHED
            assert conn.laddr.port == server.port and conn.raddr.port in ports
            seen.add(conn.raddr.port)
            client_sock = fds[0]
            assert fds[1] == client_sock and fds[conn.fd] == client_sock
            allowed = {client_sock, fds[unix[0].fd], "/dev/null", log}
        else:
            assert inet == [], inet
            assert fds[0] == fds[1] == "/dev/null"
            allowed = {fds[unix[0].fd], "/dev/null", log}
        assert set(fds.values()) <= allowed, fds
    assert seen == ports                              # every client in one worker
    # workers forked ahead, never used (after SIGHUP: the busy ones are stale)
    before = {p.pid for p in server.workers()}
    server.proc.send_signal(signal.SIGHUP)
    assert server.wait_log("control files re-read")

    def new_workers() -> list:
        return [p for p in server.workers() if p.pid not in before]
    assert wait_for(lambda: len(new_workers()) >= POOL_MIN, 20)
    fresh = new_workers()
    for p in fresh:
        fds = _fd_targets(p.pid)
        unix = p.net_connections("unix")
        assert p.net_connections("inet") == [] and len(unix) == 1
        assert fds[0] == fds[1] == "/dev/null" and fds[2] == log
        assert set(fds.values()) == {fds[unix[0].fd], "/dev/null", log}, fds
    for c in clients:
        assert c.cmd(b"QUIT").startswith(b"221")
        c.close()


def test_maxsmtpd_and_200_concurrent(qroot):
    qroot.control("maxsmtpd", "20")
    s = Listener(qroot, ipv6=False)
    try:
        parent = psutil.Process(s.proc.pid)

        def own_fds() -> int:     # all but sockets: the listener, workers' pairs, clients
            return parent.num_fds() - len(parent.net_connections("all"))

        def clients_held() -> list:
            return [c for c in parent.net_connections("inet") if c.status != psutil.CONN_LISTEN]
        assert wait_for(lambda: len(s.workers()) >= POOL_MIN, 20)   # settled: ready ones forked
        fds_before = own_fds()
        clients = [Client(s.port) for _ in range(200)]
        greetings = [c.reply() for c in clients]
        assert sum(g.startswith(b"220 ") for g in greetings) == 20
        busy = [g for g in greetings if not g.startswith(b"220 ")]
        assert set(busy) == {b"421 4.3.2 Too many connections, try again later\r\n"}
        kids = s.sessions()
        assert len(kids) == 20
        if qpytest.IS_ROOT:
            qpyd = pwd.getpwnam("qpyd").pw_uid
            assert {p.uids().real for p in kids + [parent]} == {qpyd}
        for c in clients:
            c.close()
        assert s.wait_idle()
        assert wait_for(lambda: not clients_held(), 10), clients_held()
        assert own_fds() == fds_before
        assert s.log().count("busy 127.0.0.1") == 180
    finally:
        s.stop()
    assert s.proc.returncode == 0


def _connect(port: int, source: str) -> Client:
    """A greeted client; a 421 (the parent has not yet heard its worker is free) is retried."""
    for _ in range(200):
        c = Client(port, source=source)
        if c.reply().startswith(b"220 "):
            return c
        c.close()
        time.sleep(0.05)
    raise AssertionError("no session from %s" % source)


def test_worker_forgets_the_last_client(qroot):
    """A pooled worker serves a relay client, then a stranger, then the relay
    client again: nothing of one session's environment or state reaches the next."""
    qroot.control("maxsmtpd", "1")      # one worker: every session below runs in it
    qroot.control("smtprules", '127.0.0.2:allow\n127.:allow,RELAYCLIENT="",DATABYTES="100"\n')
    s = Listener(qroot, ipv6=False)
    try:
        for _ in range(2):
            relay = _connect(s.port, "127.0.0.1")
            assert b"250-SIZE 100\r\n" in relay.cmd(b"EHLO relay.example")
            assert relay.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
            assert relay.cmd(b"RCPT TO:<x@elsewhere.example>").startswith(b"250")
            assert relay.cmd(b"QUIT").startswith(b"221")
            relay.close()
            stranger = _connect(s.port, "127.0.0.2")
            ehlo = stranger.cmd(b"EHLO stranger.example")
            assert b"SIZE 100\r\n" not in ehlo and b"SIZE" in ehlo
            assert stranger.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
            assert stranger.cmd(b"RCPT TO:<x@elsewhere.example>").startswith(b"553 5.7.1 ")
            assert stranger.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
            assert stranger.cmd(b"DATA").startswith(b"354")
            assert stranger.cmd(b"Subject: long\r\n\r\n" + b"x" * 300 + b"\r\n.").startswith(
                b"250 ")
            assert stranger.cmd(b"QUIT").startswith(b"221")
            stranger.close()
        bodies = [body for body, _, _ in drops(qroot)]
        assert len(bodies) == 2
        for body in bodies:
            received = body.split(b";", 1)[0]      # Received: from HELO (HOST [IP]) by ...
            assert b"stranger.example" in received and b"127.0.0.2" in received, body[:300]
            assert b"relay.example" not in received and b"127.0.0.1" not in received
        pids = set(re.findall(r"pid (\d+) from 127\.0\.0\.[12] ", s.log()))
        assert len(pids) == 1, s.log()      # the same worker served all four
    finally:
        s.stop()


def test_workers_replaced_and_recycled(qroot):
    """A killed worker is replaced; SIGHUP ends idle workers at once and a busy
    one after its session, which it finishes."""
    s = Listener(qroot, ipv6=False)
    try:
        idle = wait_for(lambda: len(s.workers()) >= POOL_MIN and s.workers(), 20)
        assert idle and not s.sessions()
        victim = idle[0].pid
        os.kill(victim, signal.SIGKILL)
        assert s.wait_log("end %d status -9" % victim)
        for _ in range(3):
            assert codes(session(s.port, b"MAIL FROM:<a@b.example>",
                                 b"RCPT TO:<postmaster@test.example>")) == [250, 250]
        assert wait_for(lambda: len(s.workers()) >= POOL_MIN and not s.sessions(), 20)
        assert victim not in {p.pid for p in s.workers()}

        c = Client(s.port)
        c.hello()
        busy, = s.sessions()
        before = {p.pid for p in s.workers()}
        s.proc.send_signal(signal.SIGHUP)
        assert s.wait_log("control files re-read")
        assert wait_for(lambda: {p.pid for p in s.workers()} & before == {busy.pid}, 20)
        assert c.cmd(b"NOOP").startswith(b"250")      # its session goes on
        assert c.cmd(b"QUIT").startswith(b"221")
        c.close()
        assert wait_for(lambda: not {p.pid for p in s.workers()} & before, 20)
        assert s.wait_log("end %d status 0" % busy.pid)
        assert codes(session(s.port, b"NOOP")) == [250]
    finally:
        s.stop()
    assert s.proc.returncode == 0


def _send_many(port: int, n: int, workers: int | None = None) -> list:
    """n smtplib sessions, `workers` at a time (all at once by default)."""
    def one(i: int):
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
                return smtp.sendmail("c%d@client.example" % i, ["postmaster@test.example"],
                                     b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
        except Exception as e:  # reported by the caller's comparison, with its index
            return repr(e)
    with ThreadPoolExecutor(max_workers=workers or n) as pool:
        return list(pool.map(one, range(n)))


def test_200_concurrent_sessions_all_queued(qroot):
    qroot.control("maxsmtpd", "200")
    s = Listener(qroot, ipv6=False)
    try:
        assert _send_many(s.port, 200) == [{}] * 200
        assert s.wait_idle()
        senders = sorted(sender for _, sender, _ in drops(qroot))
        assert senders == sorted(b"c%d@client.example" % i for i in range(200))
        assert s.sessions() == []
    finally:
        s.stop()


def test_sigterm_lets_sessions_finish(server, qroot):
    c = Client(server.port)
    c.hello()
    mail(c)
    server.proc.terminate()
    assert server.wait_log("waiting for 1 sessions")
    with pytest.raises(OSError):      # no longer accepting
        Client(server.port, timeout=2).reply()
    c.send(MSG + b".\r\n")
    assert c.reply().startswith(b"250 ")
    c.cmd(b"QUIT")
    assert server.proc.wait(timeout=30) == 0
    assert len(drops(qroot)) == 1


# -- the same qpy-smtpd under Debian's ucspi-tcp tcpserver ------------------------------------

def test_under_ucspi_tcpserver(qroot):
    if not shutil.which("tcpserver"):
        pytest.skip("ucspi-tcp not installed")
    s = UcspiListener(qroot, rules='127.0.0.2:allow\n127.:allow,RELAYCLIENT=""\n', limit=40)
    try:
        with smtplib.SMTP("127.0.0.1", s.port, timeout=30) as smtp:
            assert smtp.sendmail("u@client.example", ["x@elsewhere.example"], MSG) == {}
        r = subprocess.run(["swaks", "--pipeline", "--server", "127.0.0.1", "--port",
                            str(s.port), "--to", "postmaster@test.example", "--from",
                            "s@example.org"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout[-2000:]
        stranger = session(s.port, b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@elsewhere.example>",
                           b"RCPT TO:<nosuch@test.example>", source="127.0.0.2")
        assert codes(stranger) == [250, 553, 550]
        c = Client(s.port)
        c.hello()
        mail(c)
        c.send(b"Subject: a\r\n\r\nbody\n.\n" + SMUGGLED + b".\r\n")
        assert c.reply() == BARE
        c.close()
        # a new interpreter per session here: 200 sessions, 20 at a time, so that a
        # loaded CI machine does not starve them into client timeouts
        assert _send_many(s.port, 200, workers=20) == [{}] * 200
        assert wait_for(lambda: not psutil.Process(s.proc.pid).children(), 60)
        assert len(drops(qroot)) == 202
        if qpytest.IS_ROOT:
            qpyd = pwd.getpwnam("qpyd").pw_uid
            assert all(os.stat(os.path.join(qroot.paths.drop, n)).st_uid == qpyd
                       for n in drop_names(qroot))
    finally:
        s.stop()


# -- Postfix as a real client relaying into qpy ------------------------------------------------

@needs_root
@pytest.mark.slow
def test_postfix_relays_into_qpy(server, qroot):
    if not shutil.which("postfix"):
        pytest.skip("postfix not installed")
    from remote_peers import PrivatePostfix
    pf_port = qpytest.free_port()
    pf = PrivatePostfix("127.0.0.1", pf_port, "pf.example")
    try:
        r = subprocess.run(["postconf", "-c", pf.conf, "-e",
                            "relayhost = [127.0.0.1]:%d" % server.port,
                            "smtp_address_preference = ipv4"], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        subprocess.run(["postfix", "-c", pf.conf, "reload"], capture_output=True, timeout=30)
        time.sleep(1)   # reload is asynchronous; master re-reads main.cf
        with smtplib.SMTP("127.0.0.1", pf_port, timeout=30) as smtp:
            smtp.sendmail("someone@pf.example", ["postmaster@test.example"],
                          b"Subject: via postfix\r\n\r\nrelayed\r\n")
        assert wait_for(lambda: drops(qroot), 60), open(os.path.join(pf.top, "maillog")).read()
        (msg, sender, rcpts), = drops(qroot)
        assert sender == b"someone@pf.example" and rcpts == [b"postmaster@test.example"]
        assert b"Subject: via postfix" in msg and b"from postfix.pf.example" in msg
    finally:
        pf.stop()


# -- the whole system: SMTP in, delivered to a Maildir ------------------------------------------

@needs_root
@pytest.mark.slow
def test_delivered_end_to_end_under_qpy_start(qroot):
    home = os.path.join(os.path.dirname(qroot.path), "home-smtp2")
    pw = qpytest.make_user("smtp2", home)
    for sub in ("", "/new", "/cur", "/tmp"):
        os.makedirs(home + "/Maildir" + sub, exist_ok=True)
        os.chown(home + "/Maildir" + sub, pw.pw_uid, pw.pw_gid)
    with open(os.path.join(home, ".qmail"), "w") as f:
        f.write("./Maildir/\n")
    os.chown(os.path.join(home, ".qmail"), pw.pw_uid, pw.pw_gid)
    port = qpytest.free_port()
    qroot.control("smtplisten", "127.0.0.1:%d" % port)
    log = open(os.path.join(os.path.dirname(qroot.path), "start.log"), "ab")
    start = qroot.start("qpy-start", qroot.path, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                Client(port, timeout=2).close()
                return True
            except OSError:
                return False
        assert wait_for(up, 30)
        rcpt = "%s@test.example" % pw.pw_name
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            assert s.sendmail("a@client.example", [rcpt], b"Subject: e2e 1\r\n\r\nhi\r\n") == {}
            with pytest.raises(smtplib.SMTPRecipientsRefused):   # the table qpy-start built
                s.sendmail("a@client.example", ["nosuch-%s" % rcpt], MSG)
        r = subprocess.run(["swaks", "--pipeline", "--server", "127.0.0.1", "--port", str(port),
                            "--to", rcpt, "--from", "s@example.org", "--header",
                            "Subject: e2e 2"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout[-2000:]
        new = os.path.join(home, "Maildir", "new")
        assert wait_for(lambda: len(os.listdir(new)) == 2, 60)
        bodies = [open(os.path.join(new, n), "rb").read() for n in os.listdir(new)]
        assert all(b"Delivered-To: " in b and b"by test.example (qpy) with ESMTP" in b
                   for b in bodies)
        assert sorted(b"Subject: e2e 1" in b for b in bodies) == [False, True]
    finally:
        start.terminate()
        try:
            start.wait(60)
        except subprocess.TimeoutExpired:
            start.kill()
        log.close()
