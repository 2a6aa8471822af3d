"""TLS in qpy-smtpd: STARTTLS (RFC 3207), port 465 (RFC 8314), certificate trouble.

Real programs on real sockets: qpy-tcpserver with its smtp/submission/smtps
listeners, ucspi-tcp's tcpserver running qpy-smtpd, and swaks, smtplib and
openssl s_client as clients. Certificates are made by the tests with openssl.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import smtplib
import socket
import subprocess
import time

import psutil
import pytest
import qpytest
import tlshelp
from tlshelp import Raw

RCPT = "postmaster@test.example"


@pytest.fixture
def certdir():
    d = qpytest.scratch_dir("cert")
    yield d
    qpytest.remove_tree(d)


@pytest.fixture
def mta(qroot, certdir):
    tlshelp.install_cert(qroot, tlshelp.make_cert(certdir))
    server = tlshelp.Server(qroot)
    yield server
    server.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "-s", "127.0.0.1:%d" % port, "--to", RCPT, "--from",
                           "sender@example.org", "--timeout", "30", *args],
                          capture_output=True, timeout=60)


def test_swaks_starttls_and_received_line(qroot, mta):
    r = swaks(mta.smtp, "--tls")
    out = r.stdout.decode()
    assert r.returncode == 0, out
    assert "250 STARTTLS" in out and "TLS started with cipher TLSv1." in out
    (msg,) = tlshelp.wait_drops(qroot, 1)
    received = msg.split(b"\n\n")[0]
    assert b"with ESMTPS (version=TLSv1." in received and b" cipher=" in received
    assert mta.wait_log("qpy-smtpd 127.0.0.1: TLS TLSv1.")


def test_smtplib_starttls_and_smtp_ssl(qroot, mta):
    with smtplib.SMTP("127.0.0.1", mta.submission, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        s.starttls(context=tlshelp.client_context())
        s.ehlo("client.example")
        assert not s.has_extn("starttls")           # once only
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        s.sendmail("a@example.org", [RCPT], b"Subject: one\r\n\r\nvia starttls\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", mta.smtps, timeout=30,
                          context=tlshelp.client_context()) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250 and not s.has_extn("starttls")
        s.sendmail("a@example.org", [RCPT], b"Subject: two\r\n\r\nvia smtps\r\n")
    msgs = tlshelp.wait_drops(qroot, 2)
    assert len(msgs) == 2
    assert all(b"with ESMTPS (version=TLSv1." in m for m in msgs)


def test_openssl_s_client_shows_certificate_and_protocol(mta):
    r = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                        "127.0.0.1:%d" % mta.smtp, "-servername", tlshelp.CN],
                       input=b"EHLO x\r\nQUIT\r\n", capture_output=True, timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    assert "CN = %s" % tlshelp.CN in out or "CN=%s" % tlshelp.CN in out, out
    assert "Protocol  : TLSv1.3" in out or "New, TLSv1.3" in out, out
    # TLS 1.1 is refused
    r = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-tls1_1", "-connect",
                        "127.0.0.1:%d" % mta.smtp], input=b"QUIT\r\n", capture_output=True,
                       timeout=60)
    assert "Cipher is (NONE)" in r.stdout.decode() or r.returncode != 0


def test_plaintext_pipelined_after_starttls_is_discarded(qroot, mta):
    """CVE-2011-0411: commands in the same packet as STARTTLS are never executed."""
    c = Raw(mta.smtp)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(b"STARTTLS\r\nMAIL FROM:<inject@evil.example>\r\nRCPT TO:<%s>\r\n" % RCPT.encode())
    assert c.reply()[0] == 220
    c.tls()
    # state before TLS is forgotten: EHLO again, and no MAIL from the injection
    assert c.cmd("RCPT TO:<%s>" % RCPT)[0] == 503
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 503       # EHLO first
    code, text = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" not in text
    assert c.cmd("RCPT TO:<%s>" % RCPT)[0] == 503              # still no MAIL
    assert c.cmd("STARTTLS")[0] == 503                         # TLS is already on
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<%s>" % RCPT)[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd("Subject: x\r\n\r\nbody\r\n.")[0] == 250
    c.cmd("QUIT")
    (msg,) = tlshelp.wait_drops(qroot, 1)
    assert b"inject@evil.example" not in msg
    assert mta.wait_log("discarded")


def test_plaintext_after_starttls_in_a_later_packet_is_not_a_command(mta):
    """Plaintext sent instead of a handshake kills the session; it is never executed."""
    c = Raw(mta.smtp)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"MAIL FROM:<inject@evil.example>\r\n")
    assert c.closed()
    assert mta.wait_log("TLS handshake failed")


def test_tlsrequired_refuses_mail_without_tls(qroot, certdir):
    tlshelp.install_cert(qroot, tlshelp.make_cert(certdir))
    qroot.control("tlsrequired", "")
    server = tlshelp.Server(qroot, smtps=False)
    try:
        c = Raw(server.smtp)
        c.reply()
        c.cmd("EHLO client.example")
        code, text = c.cmd("MAIL FROM:<a@example.org>")
        assert code == 530 and "5.7.0" in text
        assert c.cmd("STARTTLS")[0] == 220
        c.tls()
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        c.close()
    finally:
        server.stop()


def _bad_cert_case(qroot, certdir, kind: str) -> str:
    good = tlshelp.make_cert(certdir)
    if kind == "expired":
        tlshelp.install_cert(qroot, tlshelp.make_cert(certdir, expired=True))
    elif kind == "unreadable":
        tlshelp.install_cert(qroot, good, owner="root", mode=0o400)
    elif kind == "mismatch":
        cert = good.split(b"-----BEGIN PRIVATE KEY-----")[0]
        other = tlshelp.make_cert(qpytest.scratch_dir("cert2"))
        key = b"-----BEGIN PRIVATE KEY-----" + other.split(b"-----BEGIN PRIVATE KEY-----")[1]
        tlshelp.install_cert(qroot, cert + key)
    else:
        tlshelp.install_cert(qroot, b"not a certificate\n")
    server = tlshelp.Server(qroot, smtps=False)
    try:
        c = Raw(server.smtp)
        c.reply()
        code, text = c.cmd("EHLO client.example")
        assert code == 250 and "STARTTLS" not in text
        assert c.cmd("STARTTLS")[0] == 502
        # mail still flows in plaintext
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<%s>" % RCPT)[0] == 250
        c.cmd("QUIT")
        return server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["expired", "unreadable", "mismatch", "garbage"])
def test_bad_certificate_gives_log_line_and_no_starttls(qroot, certdir, kind):
    if kind == "unreadable" and not qpytest.IS_ROOT:
        pytest.skip("needs root: a file qpyd cannot read")
    log = _bad_cert_case(qroot, certdir, kind)
    assert "STARTTLS not offered" in log
    assert {"expired": "expired on 2020-02-01", "unreadable": "Permission denied",
            "mismatch": "cannot use", "garbage": "cannot use"}[kind] in log
    assert "Traceback" not in log


def test_smtps_without_certificate_refuses(qroot):
    server = tlshelp.Server(qroot)
    try:
        s = socket.create_connection(("127.0.0.1", server.smtps), timeout=30)
        assert s.recv(200).startswith(b"421 4.7.0")
        s.close()
    finally:
        server.stop()


@qpytest.needs_root
def test_under_ucspi_tcpserver_fd0_is_the_socket(qroot, certdir):
    """qpy-smtpd run by Debian's tcpserver: STARTTLS and implicit TLS on fd 0/1."""
    tlshelp.install_cert(qroot, tlshelp.make_cert(certdir))
    pw = pwd.getpwnam("qpyd")
    procs = []
    ports = []
    try:
        for extra in ({}, {"QPY_LISTENER": "smtps"}):
            port = qpytest.free_port()
            env = qroot.env(extra)
            procs.append(subprocess.Popen(
                ["tcpserver", "-u", str(pw.pw_uid), "-g", str(pw.pw_gid), "-R", "-H",
                 "127.0.0.1", str(port), qroot.bin("qpy-smtpd")],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
            tlshelp.wait_port(port, procs[-1])
        r = swaks(ports[0], "--tls")
        assert r.returncode == 0 and b"TLS started" in r.stdout, r.stdout
        r = swaks(ports[1], "--tlsc")
        assert r.returncode == 0 and b"TLS started" in r.stdout, r.stdout
        msgs = tlshelp.wait_drops(qroot, 2)
        assert len(msgs) == 2 and all(b"ESMTPS" in m for m in msgs)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)


def test_certificate_is_read_once_before_fork(qroot, mta, certdir):
    """Sessions use the context qpy-tcpserver loaded: removing the file changes nothing
    until SIGHUP."""
    # the port accepts as soon as it is bound, a moment before the certificate is read:
    # one TLS session first, so that the removal below comes after the loading
    assert swaks(mta.smtp, "--tls").returncode == 0
    os.unlink(os.path.join(qroot.paths.control, "servercert.pem"))
    assert swaks(mta.smtp, "--tls").returncode == 0
    mta.proc.send_signal(signal.SIGHUP)
    assert mta.wait_log("control files re-read")
    r = swaks(mta.smtp, "--tls")
    assert r.returncode != 0 and b"did not advertise STARTTLS" in r.stdout + r.stderr


def _greeted(port: int) -> Raw:
    """A client past the 220; a 421 (the parent has not yet heard its one worker is free)
    is retried."""
    for _ in range(200):
        c = Raw(port)
        if c.reply()[0] == 220:
            return c
        c.close()
        time.sleep(0.05)
    raise AssertionError("no session on port %d" % port)


def _send(c: Raw, helo: str) -> None:
    assert c.cmd("EHLO " + helo)[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<%s>" % RCPT)[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd("Subject: %s\r\n\r\nhi\r\n." % helo)[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()


def test_pooled_worker_starts_each_client_in_plaintext(qroot, certdir):
    """One qpy-tcpserver worker serves a STARTTLS session, then a plaintext one:
    the second starts afresh without TLS, and the worker keeps no socket of
    either client (the TLS layer's own descriptor is closed too)."""
    qroot.control("maxsmtpd", "1")        # one worker: it serves every session
    tlshelp.install_cert(qroot, tlshelp.make_cert(certdir))
    server = tlshelp.Server(qroot)
    try:
        c = _greeted(server.smtp)
        assert "STARTTLS" in c.cmd("EHLO first.example")[1]
        assert c.cmd("STARTTLS")[0] == 220
        c.tls()
        _send(c, "tls.example")
        d = _greeted(server.smtp)
        code, text = d.cmd("EHLO second.example")
        assert code == 250 and "STARTTLS" in text
        _send(d, "plain.example")
        msgs = tlshelp.wait_drops(qroot, 2)
        received = {}
        for m in msgs:
            line = re.search(rb"Received: from (\S+) [^;]*", m)
            received[line.group(1)] = line.group(0)
        assert b"with ESMTPS " in received[b"tls.example"]
        assert b"with ESMTP id" in received[b"plain.example"]
        # a TLS session again; once the worker is idle it holds no socket of it
        c = _greeted(server.smtp)
        assert c.cmd("EHLO third.example")[0] == 250 and c.cmd("STARTTLS")[0] == 220
        c.tls()
        assert c.cmd("EHLO third.example")[0] == 250 and c.cmd("QUIT")[0] == 221
        assert c.closed()
        worker, = psutil.Process(server.proc.pid).children()
        assert qpytest.wait_for(lambda: not server.sessions(), 10)
        assert worker.net_connections("inet") == []
        assert set(re.findall(r"pid (\d+) from ", server.log())) == {str(worker.pid)}
    finally:
        server.stop()
