"""Attacks on the SMTP side (issue 12): each test is named for the finding it covers.

Real programs over real sockets: qpy-tcpserver and its qpy-smtpd workers,
qpy-queue-inject, qpy-sendmail and qpy-pickup, started from the installed prefix.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from qpytest import wait_for
from smtphelp import Client, Listener, drop_names, drops

from qpy.common import envelope

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
    assert r.returncode == 75 and b"control/databytes is malformed" in r.stderr  # EX_TEMPFAIL
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


