"""Debian's filters behind qpy, started by the tests: OpenDKIM signs and verifies,
OpenDMARC after it, rspamd in milter mode, clamav-milter on EICAR; DNS from a
loopback server. Mail goes in by SMTP (qpy-tcpserver) and by qpy-sendmail through
pickup's control/nonsmtpmilters, and is checked where it lands."""

from __future__ import annotations

import mailbox
import os
import shutil
import signal
import subprocess

import dkim
import dns.message
import dns.query
import pytest
import qpytest
from milterhelp import Listeners
from qpytest import needs_root
from realfilters import EICAR, GTUBE, ClamavMilter, Dns53, OpenDKIM, OpenDMARC, Rspamd
from smtphelp import Client, drops

pytestmark = [needs_root,
              pytest.mark.skipif(not shutil.which("opendkim"), reason="opendkim not installed")]

SIGNED_FROM = b"From: Alice <alice@test.example>\r\n"


def message(body: bytes = b"hello from qpy\r\n", frm: bytes = SIGNED_FROM) -> bytes:
    return (frm + b"To: <postmaster@test.example>\r\nSubject: filter test\r\n"
            b"Date: Sun, 06 Dec 2026 19:00:00 +0000\r\nMessage-ID: <t1@test.example>\r\n"
            b"\r\n" + body)


@pytest.fixture(scope="module")
def dnsd():
    d = Dns53()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def opendkim(dnsd):
    f = OpenDKIM(dnsd)
    yield f
    f.stop()


def dkim_verify(msg: bytes, dnsd: Dns53) -> bool:
    def txt(name: bytes, timeout: int = 5) -> bytes:
        q = dns.message.make_query(name.decode().rstrip("."), "TXT")
        r = dns.query.udp(q, dnsd.host, timeout=5, port=53)
        return b"".join(b"".join(rd.strings) for rr in r.answer for rd in rr)
    return dkim.verify(msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=txt)


def smtp_send(port: int, msg: bytes, source: str | None = None,
              rcpt: bytes = b"postmaster@test.example") -> bytes:
    c = Client(port, source=source)
    c.hello()
    assert c.cmd(b"MAIL FROM:<alice@test.example>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<%s>" % rcpt).startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    reply = c.cmd(msg.replace(b"\n.", b"\n..") + b".\r\n")
    c.cmd(b"QUIT")
    c.close()
    return reply


@pytest.fixture
def listen(qroot):
    ls = Listeners(qroot)
    yield ls.start
    ls.stop()


def test_opendkim_signs_relay_client_mail(qroot, listen, opendkim, dnsd):
    s = listen(opendkim)
    reply = smtp_send(s.port, message())
    assert reply.startswith(b"250 "), reply
    (msg, _, _), = drops(qroot)
    assert b"DKIM-Signature:" in msg and b"d=test.example" in msg
    assert dkim_verify(msg, dnsd)


def test_opendkim_signs_mail_submitted_with_auth_on_587(qroot, opendkim, dnsd):
    import tlshelp
    d = qpytest.scratch_dir("cert")
    tlshelp.install_cert(qroot, tlshelp.make_cert(d))
    tlshelp.set_password(qroot, "alice", "correct horse")
    tlshelp.start_authd(qroot)
    qroot.control("milters", opendkim.endpoint)
    server = tlshelp.Server(qroot, smtps=False)
    try:
        # from 127.0.0.9, not one of OpenDKIM's internal hosts: it signs because the
        # client authenticated ({auth_authen}), as it does behind Postfix
        r = subprocess.run(["swaks", "-s", "127.0.0.1:%d" % server.submission,
                            "--local-interface", "127.0.0.9", "--timeout", "30",
                            "--from", "alice@test.example", "--to", "bob@elsewhere.example",
                            "--header", "From: Alice <alice@test.example>",
                            "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                            "--auth-password", "correct horse"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout.decode()[-2000:]
        assert qpytest.wait_for(lambda: len(drops(qroot)) == 1, 20)
        (msg, _, _), = drops(qroot)
        assert b"DKIM-Signature:" in msg
        assert dkim_verify(msg, dnsd)
    finally:
        server.stop()
        qpytest.remove_tree(d)


def test_opendkim_verifies_inbound_signed_and_tampered(qroot, listen, opendkim, dnsd):
    with open(os.path.join(opendkim.dir, "sel.private"), "rb") as f:
        key = f.read()
    signed = message()
    sig = dkim.sign(signed, b"sel", b"test.example", key,
                    include_headers=[b"from", b"to", b"subject", b"date"])
    s = listen(opendkim)
    # from 127.0.0.9, not one of OpenDKIM's internal hosts: it verifies instead of signing
    assert smtp_send(s.port, sig + signed, source="127.0.0.9").startswith(b"250 ")
    tampered = sig + signed.replace(b"hello", b"HELLO")
    assert smtp_send(s.port, tampered, source="127.0.0.9").startswith(b"250 ")
    results = [m for m, _, _ in drops(qroot)]
    ar = [[ln for ln in m.split(b"\n\n")[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
           .split(b"\n") if ln.startswith(b"Authentication-Results: test.example")]
          for m in results]
    assert sorted(b"dkim=pass" in a[0] for a in ar) == [False, True], ar
    assert any(b"dkim=fail" in a[0] for a in ar), ar


def test_sendmail_through_nonsmtpmilters_signed_and_delivered(qroot, opendkim, dnsd):
    base = qpytest.scratch_dir("home")
    alice = qpytest.make_user("malice", home=os.path.join(base, "alice"))
    qroot.control("nonsmtpmilters", opendkim.endpoint)
    p = qroot.start("qpy-start", qroot.path, stdout=subprocess.DEVNULL)
    try:
        r = qroot.run("qpy-sendmail", "-f", "alice@test.example",
                      "%s@test.example" % alice.pw_name, input=message().replace(b"\r\n", b"\n"),
                      user=alice.pw_name)
        assert r.returncode == 0, r.stderr
        md = os.path.join(alice.pw_dir, "Maildir")
        assert qpytest.wait_for(lambda: os.path.isdir(os.path.join(md, "new")) and
                                os.listdir(os.path.join(md, "new")), 60)
        (got,) = [bytes(m) for m in mailbox.Maildir(md, create=False)]
        assert b"DKIM-Signature:" in got
        assert dkim_verify(got, dnsd)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        qpytest.remove_tree(base)


def test_opendmarc_after_opendkim(qroot, listen, opendkim, dnsd):
    dnsd.add("_dmarc.test.example", "TXT", '"v=DMARC1; p=reject"')
    dmarc = OpenDMARC(dnsd)
    try:
        with open(os.path.join(opendkim.dir, "sel.private"), "rb") as f:
            key = f.read()
        s = listen(opendkim, dmarc)
        good = message()
        good = dkim.sign(good, b"sel", b"test.example", key,
                         include_headers=[b"from", b"to", b"subject", b"date"]) + good
        assert smtp_send(s.port, good, source="127.0.0.9").startswith(b"250 ")
        (msg, _, _), = drops(qroot)
        assert b"dmarc=pass" in msg, msg
        # unsigned mail claiming test.example, whose policy is reject
        reply = smtp_send(s.port, message(b"forged\r\n"), source="127.0.0.9")
        assert reply.startswith(b"550"), reply
        assert len(drops(qroot)) == 1
    finally:
        dmarc.stop()


@pytest.fixture(scope="module")
def rspamd(dnsd):
    if not shutil.which("rspamd"):
        pytest.skip("rspamd not installed")
    f = Rspamd(dnsd)
    yield f
    f.stop()


def test_rspamd_rejects_gtube_and_passes_clean_with_headers(qroot, listen, rspamd):
    s = listen(rspamd)
    reply = smtp_send(s.port, message(GTUBE + b"\r\n"), source="127.0.0.9")
    assert reply.startswith(b"554 5.7.1 Gtube pattern"), reply
    assert drops(qroot) == []
    reply = smtp_send(s.port, message(b"An ordinary message.\r\n"), source="127.0.0.9")
    assert reply.startswith(b"250 "), reply
    (msg, _, _), = drops(qroot)
    assert b"X-Spamd-Result:" in msg or b"X-Rspamd-Server:" in msg, msg[:2000]


def test_clamav_milter_rejects_eicar(qroot, listen):
    if not shutil.which("clamav-milter") or not shutil.which("clamd"):
        pytest.skip("clamav-milter or clamd not installed")
    try:
        f = ClamavMilter()
    except RuntimeError as e:
        pytest.skip("clamd will not start on an offline signature file: %s" % e)
    try:
        s = listen(f)
        reply = smtp_send(s.port, message(EICAR + b"\r\n"), source="127.0.0.9")
        assert reply.startswith(b"5"), reply
        assert drops(qroot) == []
        assert smtp_send(s.port, message(b"clean\r\n"), source="127.0.0.9").startswith(b"250")
    finally:
        f.stop()
