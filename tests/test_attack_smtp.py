"""Attacks on the SMTP side (issue 12): each test is named for the finding it covers.

Real programs over real sockets: qpy-tcpserver and its qpy-smtpd workers,
qpy-queue-inject, qpy-sendmail and qpy-pickup, started from the installed prefix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
import tlshelp
from qpytest import needs_root, wait_for
from smtphelp import Client, Listener, drop_names, drops

from qpy.common import envelope, users

DEFAULT_LIMIT = 52428800
HEADER = b"Subject: size\r\n\r\n"


@pytest.fixture
def server(qroot):
    s = Listener(qroot, ipv6=False)
    try:
        yield s
    finally:
        s.stop()


def reload(server) -> None:
    """SIGHUP: every later session runs on the control files as they are now."""
    mark = server.log().count("control files re-read")
    server.proc.send_signal(1)
    assert wait_for(lambda: server.log().count("control files re-read") > mark, 20)


def body_of(size: int) -> bytes:
    """A message whose queued form (LF line ends) is exactly size bytes; CRLF on the wire."""
    head = b"Subject: size\n\n"
    lines, left = [], size - len(head)
    while left > 0:
        n = min(left, 999)           # n bytes with the LF
        lines.append(b"x" * (n - 1))
        left -= n
    return HEADER + b"\r\n".join(lines) + b"\r\n"


def start_mail(c: Client) -> None:
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")


def queue_inject(qroot, message: bytes) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.write(w, envelope.encode(b"a@b.example", [b"postmaster@test.example"]))
    os.close(w)
    try:
        return subprocess.run([qroot.bin("qpy-queue-inject")], input=message, stdout=r,
                              stderr=subprocess.PIPE, env=qroot.env(), timeout=120)
    finally:
        os.close(r)


# -- finding 1: one size limit, applied by whoever acknowledges -------------------------

def test_finding1_default_size_limit_advertised_and_refused_at_mail(server, qroot):
    """control/databytes absent: 50 MiB, advertised, and a larger SIZE= refused at MAIL."""
    assert not os.path.exists(os.path.join(qroot.paths.control, "databytes"))
    c = Client(server.port)
    assert c.reply().startswith(b"220 ")
    assert b"250-SIZE %d\r\n" % DEFAULT_LIMIT in c.cmd(b"EHLO client.example")
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=%d" % (DEFAULT_LIMIT + 1)) == \
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=%d" % DEFAULT_LIMIT).startswith(b"250 ")
    c.close()


def test_finding1_smtp_just_under_and_just_over(server, qroot):
    """At the limit: 250, and pickup admits it (never quarantined for size). One byte
    over: 552 after the real end, nothing queued, and the session goes on."""
    qroot.control("databytes", "3000")
    reload(server)
    c = Client(server.port)
    c.hello()
    start_mail(c)
    c.send(body_of(3001) + b".\r\n")
    assert c.reply() == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert drops(qroot) == [] and drop_names(qroot) == []
    start_mail(c)                                # the session goes on
    c.send(body_of(3000) + b".\r\n")
    assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
    assert c.cmd(b"QUIT").startswith(b"221")
    c.close()
    (msg, _, _), = drops(qroot)
    assert msg.endswith(body_of(3000)[len(HEADER):].replace(b"\r\n", b"\n"))
    log = open(os.path.join(os.path.dirname(qroot.path), "pickup.log"), "ab")
    qroot.start("qpy-pickup", stdout=log, stderr=subprocess.STDOUT)
    assert wait_for(lambda: not os.listdir(qroot.paths.drop), 30)
    assert os.listdir(qroot.paths.quarantine) == []
    assert len(os.listdir(qroot.paths.mess)) == 1


def test_finding1_malformed_databytes_is_a_temporary_refusal(server, qroot):
    """A broken databytes must not mean 'unlimited': every acknowledger refuses with
    a temporary error (smtpd: 421 to each session, test_faults' policy) and says why."""
    qroot.control("databytes", "lots")
    reload(server)
    c = Client(server.port)
    assert c.reply().startswith(b"421 4.3.0 ")
    c.close()
    assert server.wait_log("control/databytes is malformed")
    r = queue_inject(qroot, b"Subject: x\n\nx\n")
    assert r.returncode == 55 and b"control/databytes is malformed" in r.stderr
    r = qroot.run("qpy-sendmail", "postmaster@test.example", input=b"Subject: x\n\nx\n")
    assert r.returncode == 111 and b"control/databytes is malformed" in r.stderr
    r = qroot.run("qpy-inject", "-a", "postmaster@test.example", input=b"Subject: x\n\nx\n")
    assert r.returncode == 111 and b"control/databytes is malformed" in r.stderr
    assert os.listdir(qroot.paths.drop) == []


def test_finding1_queue_inject_default_limit(qroot):
    """No control/databytes: one byte over 50 MiB is exit 31 with nothing left in
    drop/; exactly 50 MiB is queued, and pickup admits it."""
    big = b"Subject: big\n\n" + b"x" * (DEFAULT_LIMIT - 14)
    assert len(big) == DEFAULT_LIMIT
    r = queue_inject(qroot, big + b"y")
    assert r.returncode == 31, r.stderr
    assert b"databytes" in r.stderr and os.listdir(qroot.paths.drop) == []
    r = queue_inject(qroot, big)
    assert r.returncode == 0, r.stderr
    log = open(os.path.join(os.path.dirname(qroot.path), "pickup.log"), "ab")
    qroot.start("qpy-pickup", stdout=log, stderr=subprocess.STDOUT)
    assert wait_for(lambda: not os.listdir(qroot.paths.drop), 60)
    assert os.listdir(qroot.paths.quarantine) == []
    assert len(os.listdir(qroot.paths.mess)) == 1


@pytest.mark.parametrize("program,code", [("qpy-sendmail", 65), ("qpy-inject", 100)])
def test_finding1_sendmail_refuses_over_the_limit(qroot, program, code):
    """qpy-sendmail (EX_DATAERR) and qpy-inject (qmail's 100) refuse a message over the
    limit, the default limit included, and queue one just under it."""
    args = ["-i", "postmaster@test.example"] if program == "qpy-sendmail" else \
        ["-a", "postmaster@test.example"]
    r = qroot.run(program, *args, input=b"Subject: big\n\n" + b"x" * DEFAULT_LIMIT)
    assert r.returncode == code, r.stderr
    assert b"databytes" in r.stderr and os.listdir(qroot.paths.drop) == []
    qroot.control("databytes", "2000")
    r = qroot.run(program, *args, input=b"Subject: big\n\n" + b"x" * 2000)
    assert r.returncode == code and os.listdir(qroot.paths.drop) == []
    r = qroot.run(program, *args, input=b"Subject: small\n\n" + b"x" * 1500)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(qroot.paths.drop)) == 1


def test_finding1_databytes_zero_is_the_queue_ceiling(server, qroot):
    """databytes 0 (qmail: no limit) advertises the queue's own cap, 1 GiB, which pickup
    also admits: nothing the acknowledgers take can exceed what pickup admits."""
    qroot.control("databytes", "0")
    reload(server)
    c = Client(server.port)
    assert c.reply().startswith(b"220 ")
    assert b"250-SIZE %d\r\n" % (1 << 30) in c.cmd(b"EHLO client.example")
    assert c.cmd(b"MAIL FROM:<a@b.example> SIZE=%d" % ((1 << 30) + 1)).startswith(b"552 5.3.4")
    c.close()




# -- finding 5: one client cannot take every session; slow clients are cut off ------------

def test_finding5_maxperip_refuses_one_address_while_others_are_served(server, qroot):
    """Ten sessions from 127.0.0.1 are served; the eleventh gets 421 4.7.0 and is
    closed (and logged) while 127.0.0.2 is still served; when one of the ten ends,
    127.0.0.1 gets a session again. A client with RELAYCLIENT is exempt."""
    qroot.control("smtprules", '127.0.0.3:allow,RELAYCLIENT=""\n:allow\n')
    reload(server)
    held = []
    try:
        for _ in range(10):
            c = Client(server.port)
            assert c.reply().startswith(b"220 ")
            held.append(c)
        for _ in range(3):
            extra = Client(server.port)
            assert extra.reply() == \
                b"421 4.7.0 Too many connections from your address, try again later\r\n"
            assert extra.closed()
            extra.close()
        assert server.wait_log("maxperip 127.0.0.1: 421")
        other = Client(server.port, source="127.0.0.2")
        assert other.reply().startswith(b"220 ")
        assert other.cmd(b"QUIT").startswith(b"221")
        other.close()
        assert held[0].cmd(b"QUIT").startswith(b"221")
        held.pop(0).close()

        def served_again() -> bool:
            c = Client(server.port)
            ok = c.reply().startswith(b"220 ")
            c.close()
            return ok
        assert wait_for(served_again, 20)
        # a client its rule trusts (RELAYCLIENT) is exempt, as Postfix's mynetworks
        for _ in range(12):
            c = Client(server.port, source="127.0.0.3")
            assert c.reply().startswith(b"220 ")
            held.append(c)
    finally:
        for c in held:
            c.close()


def _cut_off(c: Client, every: float, piece: bytes, limit: float) -> tuple[bytes, float]:
    """Send piece every `every` seconds until the server ends the session (or limit
    seconds pass); what the server said meanwhile and how long it let us go on."""
    start = time.monotonic()
    c.sock.settimeout(every)
    got = b""
    while time.monotonic() - start < limit:
        try:
            c.send(piece)
        except OSError:
            break
        try:
            data = c.sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        got += data
    return got, time.monotonic() - start


def test_finding5_slowloris_command_line_is_cut_off(server, qroot):
    """One byte a second, never a whole line: with timeoutsmtpd 3 the line's deadline
    ends the session (421 4.4.2) though no single read waited 3 s; meanwhile another
    client is served."""
    qroot.control("timeoutsmtpd", "3")
    reload(server)
    c = Client(server.port)
    c.hello()
    other = Client(server.port, source="127.0.0.2")
    other.hello()
    assert other.cmd(b"QUIT").startswith(b"221")
    got, took = _cut_off(c, 1.0, b"N", 20)
    assert b"421 4.4.2 " in got, got
    assert took < 10, took
    assert server.wait_log("result timeout")


def test_finding5_slowloris_data_is_cut_off(server, qroot):
    """Whole lines, one a second, in DATA: the DATA deadline (timeoutsmtpd for all of
    it) ends the session; nothing is queued."""
    qroot.control("timeoutsmtpd", "3")
    reload(server)
    c = Client(server.port)
    c.hello()
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    got, took = _cut_off(c, 1.0, b"x\r\n", 20)
    assert b"421 4.4.2 " in got, got
    assert took < 10, took
    assert drops(qroot) == []


def test_finding5_session_limit(server, qroot):
    """A client that answers promptly but never leaves: timeoutsession ends it."""
    qroot.control("timeoutsession", "3")
    reload(server)
    c = Client(server.port)
    c.hello()
    got, took = _cut_off(c, 0.5, b"NOOP\r\n", 20)
    assert b"421 4.4.2 test.example Session too long" in got, got
    assert got.count(b"250 2.0.0 Ok") >= 2
    assert took < 10, took
    assert server.wait_log("result session too long")


def test_finding5_client_that_never_reads_is_cut_off(server, qroot):
    """Pipelined commands from a client that never reads a reply: once the replies
    fill the socket, the write waits at most timeoutsmtpd and the session ends (the
    worker's socket is non-blocking: a write that finds no room falls back to poll)."""
    qroot.control("timeoutsmtpd", "2")
    reload(server)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    s.setblocking(False)
    burst = b"NOOP\r\n" * 20000
    end = time.monotonic() + 15
    sent = 0
    while time.monotonic() < end and not server.wait_log("result timeout", 0.05):
        try:
            sent += s.send(burst)
        except BlockingIOError:
            pass
    try:
        assert server.wait_log("result timeout", 30), server.log()[-2000:]
        assert sent > 1 << 20          # far more replies than the socket buffers hold
    finally:
        s.close()


# -- finding 7: nothing after a refused DATA runs as a command -------------------------------

SMUGGLED = (b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<postmaster@test.example>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nnot from the client\r\n.\r\n")


def _replies_until_closed(c) -> list[bytes]:
    out = []
    try:
        while True:
            out.append(c.reply())
    except (EOFError, OSError):
        return out


def test_finding7_payload_after_refused_data_in_a_later_read(server, qroot):
    """MAIL, a refused RCPT and DATA pipelined; DATA is refused (554); the message text
    the client sent without waiting arrives 0.5 s later, in another read. It must not
    run as commands: the session ends after the refusal, nothing is queued."""
    c = Client(server.port)
    c.hello()
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@test.example>\r\nDATA\r\n")
    assert c.reply().startswith(b"250 ")
    assert c.reply().startswith(b"550 5.1.1 ")
    assert c.reply() == b"554 5.5.1 No valid recipients\r\n"
    time.sleep(0.5)
    try:
        c.send(SMUGGLED)
    except OSError:
        pass
    rest = _replies_until_closed(c)
    assert rest[:1] == [b"421 4.5.0 test.example DATA refused, closing connection\r\n"], rest
    assert len(rest) == 1, rest
    assert drops(qroot) == [] and "evil@attacker" not in server.log()


def test_finding7_payload_after_refused_data_over_tls(qroot, tmp_path):
    """The same inside STARTTLS, where the payload comes in a later TLS record."""
    tlshelp.install_cert(qroot, tlshelp.make_cert(str(tmp_path)))
    server = tlshelp.Server(qroot, smtps=False)
    try:
        c = tlshelp.Raw(server.smtp)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.tls()
        assert c.cmd("EHLO client.example")[0] == 250
        c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@test.example>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 550, 554]
        time.sleep(0.5)
        try:
            c.send(SMUGGLED)
        except OSError:
            pass
        rest = []
        try:
            while True:
                rest.append(c.reply()[0])
        except (EOFError, OSError):
            pass
        assert rest == [421], rest
        assert tlshelp.drops(qroot) == []
    finally:
        server.stop()


# -- finding 8: directory harvest ----------------------------------------------------------------

def test_finding8_ten_thousand_pipelined_rcpts_are_cut_off(server, qroot):
    """10,000 pipelined RCPTs of unknown users: the first refusals come at once, later
    ones each wait longer, and the session ends (421) after the hard limit of 10."""
    c = Client(server.port, timeout=60)
    c.hello()
    cmds = b"MAIL FROM:<a@b.example>\r\n" + b"".join(
        b"RCPT TO:<user%d@test.example>\r\n" % i for i in range(10_000))
    sender = threading.Thread(target=lambda: _send_quietly(c, cmds))
    start = time.monotonic()
    sender.start()
    got = _replies_until_closed(c)
    took = time.monotonic() - start
    sender.join()
    assert got[0].startswith(b"250 ")
    assert [r[:9] for r in got[1:11]] == [b"550 5.1.1"] * 10, got[:12]
    assert got[11:] == [b"421 4.7.0 test.example Too many refused recipients, "
                        b"closing connection\r\n"], got[11:]
    assert took >= 0.25 * sum(range(1, 8)) - 0.1, took     # the growing delay: 7 s in all
    assert server.wait_log("Too many refused recipients")
    # a fresh session starts again with no penalty: three refusals at once
    c = Client(server.port)
    c.hello()
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    t = time.monotonic()
    for i in range(3):
        assert c.cmd(b"RCPT TO:<user%d@test.example>" % i).startswith(b"550 5.1.1 ")
    assert time.monotonic() - t < 2


def _send_quietly(c: Client, data: bytes) -> None:
    try:
        c.send(data)
    except OSError:
        pass


@needs_root
def test_finding8_system_accounts_are_not_mail_users(server, qroot):
    """`man` (uid 6, owns its home /var/cache/man) is not a mail user: 550 5.1.1 at
    RCPT, and local delivery gives its name to the alias user, as the RCPT check said.
    users/assign naming it makes it one."""
    import pwd
    pw = pwd.getpwnam("man")
    assert pw.pw_uid < 1000 and os.stat(pw.pw_dir).st_uid == pw.pw_uid
    c = Client(server.port)
    c.hello()
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<man@test.example>").startswith(b"550 5.1.1 ")
    assert c.cmd(b"RCPT TO:<man-foo@test.example>").startswith(b"550 5.1.1 ")
    assert c.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
    c.close()
    assert users.lookup(qroot.path, b"man").user == users.ALIAS_USER
    assign = os.path.join(qroot.paths.users, "assign")
    with open(assign, "w") as f:
        f.write("=man:man:%d:%d:%s:::\n.\n" % (pw.pw_uid, pw.pw_gid, pw.pw_dir))
    r = qroot.run("qpy-newrcpt", qroot.path)
    assert r.returncode == 0, r.stderr
    c = Client(server.port)
    c.hello()
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<man@test.example>").startswith(b"250")
    c.close()


# -- finding 12: how many sessions one worker serves ---------------------------------------

def _session_pids(qroot, n: int) -> list[int]:
    """Start qpy-tcpserver; n sessions one after another; the pid that served each."""
    s = Listener(qroot, ipv6=False)
    try:
        assert s.wait_idle()
        pids = []
        for _ in range(n):
            c = Client(s.port)
            assert c.reply().startswith(b"220 ")
            serving = wait_for(lambda: [p.pid for p in s.sessions()], 10)
            assert serving and len(serving) == 1, serving
            pids.append(serving[0])
            assert c.cmd(b"QUIT").startswith(b"221")
            c.close()
            assert s.wait_idle()
        return pids
    finally:
        s.stop()


def test_finding12_smtpdsessions_one_is_a_fresh_process_per_connection(qroot):
    """control/smtpdsessions 1: five sessions one after another, five worker pids."""
    qroot.control("smtpdsessions", "1")
    pids = _session_pids(qroot, 5)
    assert len(set(pids)) == 5, pids


def test_finding12_smtpdsessions_reuse_and_retirement(qroot):
    """By default a worker serves many sessions (one worker: maxsmtpd 1, the same pid
    each time); with smtpdsessions 2 each worker serves two, then is replaced."""
    qroot.control("maxsmtpd", "1")
    pids = _session_pids(qroot, 3)
    assert len(set(pids)) == 1, pids
    qroot.control("smtpdsessions", "2")
    pids = _session_pids(qroot, 4)
    # Listener's readiness probe was the first worker's first session
    assert pids[0] != pids[1] == pids[2] != pids[3] and len(set(pids)) == 3, pids
