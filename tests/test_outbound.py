"""Mail out to the real internet: an authenticated smarthost (real Postfix with Dovecot
as its SASL server, on its submission and smtps ports), TLS policies against aiosmtpd
and scripted peers, with certificates from a test CA made with openssl.

qpy-rspawn is driven as in test_remote (a request with the message fd, the result read
back); one case runs the whole queue to see a failed AUTH in the log and in qpy-qread.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import signal
import ssl
import time

import pytest
import qpytest
import test_remote
from remote_peers import PrivatePostfix, basic_session
from test_remote import MSG, PEER, Recorder, Rspawn, wire
from test_send import Qpy, bounces, sendmail, user
from tlshelp import TestCA

# test_remote's fixtures: a DNS server, a free port, peers, and qpy-rspawn on a root
dnssrv, port, raw, stack, aiopeer = test_remote.dnssrv, test_remote.port, test_remote.raw, \
    test_remote.stack, test_remote.aiopeer

pytestmark = [qpytest.needs_root,
              pytest.mark.skipif(not os.path.exists("/usr/sbin/postfix")
                                 or not os.path.exists("/usr/sbin/dovecot"),
                                 reason="postfix and dovecot needed")]

RELAY = "smtp.relay.test"
USER, PASSWORD = "relayuser", "s3cret-pw"


@pytest.fixture(scope="module")
def ca():
    d = qpytest.scratch_dir("ca")
    yield TestCA(d)
    qpytest.remove_tree(d)


class Smarthost:
    """A private Postfix for a.test on PEER: port 25 open to loopback, and submission
    (STARTTLS required), smtps (TLS from the start, AUTH LOGIN only) and plainauth
    (AUTH without TLS) that relay only for USER."""

    def __init__(self, ca: TestCA):
        self.smtp, self.submission, self.smtps, self.plain = (
            qpytest.free_port(PEER) for _ in range(4))
        self.pf = PrivatePostfix(PEER, self.smtp, "a.test", chain=ca.chain(RELAY),
                                 submission=self.submission, smtps=self.smtps,
                                 plainauth=self.plain, users={USER: PASSWORD},
                                 ccert_ca=ca.cafile, login_only=(self.smtps,))
        self.seen: set[str] = set()

    def new(self) -> list[bytes]:
        """The messages delivered since the last call (Maildir names do not sort by
        time within a second: by name, not by count)."""
        d = os.path.join(self.pf.mail, "inbox", "new")
        names = sorted(set(os.listdir(d)) - self.seen) if os.path.isdir(d) else []
        self.seen.update(names)
        out = []
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                out.append(f.read())
        return out


@pytest.fixture(scope="module")
def smarthost(ca):
    s = Smarthost(ca)
    yield s
    s.pf.stop()


def qpyr_file(qroot, name: str, text: str, mode: int = 0o400) -> str:
    path = os.path.join(qroot.paths.control, name)
    with open(path, "w") as f:
        f.write(text)
    pw = pwd.getpwnam("qpyr")
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def route_to_relay(qroot, dnssrv, port: int, mode: str = "") -> None:
    dnssrv.add(RELAY, "A", PEER)
    qroot.control("smtproutes", ":%s:%d%s" % (RELAY, port, ":" + mode if mode else ""))


def one(rs: Rspawn, rcpt: bytes = b"x@a.test") -> tuple[bytes, bytes]:
    res = rs.deliver([rcpt])
    return res[0]


# --- the smarthost ------------------------------------------------------------------------

def test_smarthost_587_starttls_verified_auth_plain(stack, smarthost, ca):
    qroot, dnssrv, _, rs = stack
    route_to_relay(qroot, dnssrv, smarthost.submission, "starttls")
    qpyr_file(qroot, "smtpauth", "# the provider\n%s %s %s\n" % (RELAY, USER, PASSWORD))
    qroot.control("tlspolicy", "%s verify" % RELAY)
    qroot.control("tlscafile", ca.cafile)
    status, text = one(rs)
    assert status == b"K", text
    assert b"(TLS TLSv1." in text
    got = qpytest.wait_for(smarthost.new, 30)
    assert got and got[0].endswith(MSG)
    head = got[0][: got[0].index(MSG)]
    assert b"(Authenticated sender: %s)" % USER.encode() in head
    assert re.search(r"sasl_method=PLAIN, sasl_username=%s" % USER, smarthost.pf.log())


def test_smarthost_465_smtps_auth_login_and_client_cert(stack, smarthost, ca):
    qroot, dnssrv, _, rs = stack
    # mode smtps from the smtproutes line; the port is not 465 here
    route_to_relay(qroot, dnssrv, smarthost.smtps, "smtps")
    qpyr_file(qroot, "smtpauth", "%s:%d %s %s\n%s nobody wrong\n"
              % (RELAY, smarthost.smtps, USER, PASSWORD, RELAY))
    cert, key = ca.issue("client.qpy.test")
    for p in (cert, key):
        os.chown(p, pwd.getpwnam("qpyr").pw_uid, -1)
        os.chmod(p, 0o400)
    qroot.control("tlsclientcert", "%s %s %s" % (RELAY, cert, key))
    status, text = one(rs)
    assert status == b"K", text
    got = qpytest.wait_for(smarthost.new, 30)
    assert got and got[0].endswith(MSG)
    head = got[0][: got[0].index(MSG)].decode()
    assert "(Authenticated sender: %s)" % USER in head       # HOST:PORT beat HOST
    assert 'Client CN "client.qpy.test", Issuer "qpy test CA" (verified OK)' in head, head
    assert re.search(r"sasl_method=LOGIN, sasl_username=%s" % USER, smarthost.pf.log())


def test_smarthost_wrong_password_defers_with_reply_in_log_and_qread(qroot, dnssrv,
                                                                     smarthost, ca):
    qroot.control("resolvers", "127.0.0.1:%d" % dnssrv.port)
    route_to_relay(qroot, dnssrv, smarthost.submission)
    qpyr_file(qroot, "smtpauth", "%s %s not-the-password\n" % (RELAY, USER))
    qroot.control("tlspolicy", "%s verify" % RELAY)
    qroot.control("tlscafile", ca.cafile)
    q = Qpy(qroot)
    try:
        sendmail(qroot, "someone@test.example", "x@a.test")
        q.wait_log(r"delivery \d+: deferral: .*rejected AUTH PLAIN as relayuser \(#4\.7\.0\)\."
                   r" Remote host smtp\.relay\.test said: 535 5\.7\.8")
        r = qroot.run("qpy-qread", qroot.path)
        assert re.search(r"deferred\s+remote\s+<x@a.test>.*rejected AUTH PLAIN.*535 5\.7\.8",
                         r.stdout.decode()), r.stdout
        assert "not-the-password" not in q.log()
        assert smarthost.new() == []
    finally:
        assert q.stop() == 0


def test_smtpauth_readable_by_others_not_used(stack, smarthost, ca):
    qroot, dnssrv, _, rs = stack
    route_to_relay(qroot, dnssrv, smarthost.submission)
    path = qpyr_file(qroot, "smtpauth", "%s %s %s\n" % (RELAY, USER, PASSWORD), mode=0o440)
    status, text = one(rs)
    assert status == b"Z" and b"control/smtpauth is not used: mode 0440" in text, text
    rs.stop()
    assert b"alert: control/smtpauth not used: mode 0440" in rs.proc.stderr.read()
    r = qroot.run("qpy-install", "--check", qroot.path)
    assert r.returncode == 1 and b"control/smtpauth: mode 0440, want 0400" in r.stdout, r.stdout
    os.chmod(path, 0o400)
    r = qroot.run("qpy-install", "--check", qroot.path)
    assert r.returncode == 0, r.stdout
    assert smarthost.new() == []


def test_credentials_never_in_clear_unless_cleartext_ok(stack, raw, smarthost):
    qroot, dnssrv, port, rs = stack
    ehlo = b"250-peer\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n"
    peer = raw(lambda c: basic_session(c, ehlo=ehlo))
    route_to_relay(qroot, dnssrv, port)
    qpyr_file(qroot, "smtpauth", "%s %s %s\n" % (RELAY, USER, PASSWORD))
    status, text = one(rs)
    assert status == b"Z" and b"does not offer STARTTLS, required (encrypt) by control/smtpauth"\
        in text, text
    assert peer.connections == 1 and b"AUTH" not in peer.transcripts[0]
    assert b"MAIL" not in peer.transcripts[0]
    # cleartext-ok: Postfix's AUTH-without-TLS port takes it
    route_to_relay(qroot, dnssrv, smarthost.plain)
    qpyr_file(qroot, "smtpauth", "%s %s %s cleartext-ok\n" % (RELAY, USER, PASSWORD))
    rs.proc.send_signal(signal.SIGHUP)
    status, text = one(rs)
    assert status == b"K" and b"TLS" not in text, text
    got = qpytest.wait_for(smarthost.new, 30)
    assert got and b"(Authenticated sender: %s)" % USER.encode() in got[0]


def test_unauthenticated_submission_refused_by_postfix(stack, smarthost, ca):
    """The smarthost really demands AUTH: without control/smtpauth, no relay."""
    qroot, dnssrv, _, rs = stack
    route_to_relay(qroot, dnssrv, smarthost.submission)
    status, text = one(rs)
    assert status == b"D" and b"Access denied" in text, text


# --- control/tlspolicy ----------------------------------------------------------------------

class TLSRecorder:
    """aiosmtpd handler: each message with whether it came inside TLS."""

    def __init__(self):
        self.messages: list[tuple[bytes, bool]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.content, session.ssl is not None))
        return "250 2.0.0 stored"


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
def aiotls(port):
    """aiosmtpd on PEER:port, with STARTTLS when given a server context."""
    from aiosmtpd.controller import Controller
    started = []

    def start(ctx: ssl.SSLContext | None = None) -> TLSRecorder:
        while started:                  # one peer at a time on the port
            started.pop().stop()
        h = TLSRecorder()
        c = Controller(h, hostname=PEER, port=port, tls_context=ctx)
        c.start()
        started.append(c)
        return h
    yield start
    for c in started:
        c.stop()


def hup(rs: Rspawn) -> None:
    """Retire the workers, which keep the control files they read; not before the
    first request, which proves qpy-rspawn has its signal handlers."""
    if rs.next > 1:
        rs.proc.send_signal(signal.SIGHUP)


def policy(qroot, rs: Rspawn, *lines: str) -> None:
    qroot.control("tlspolicy", "\n".join(lines))
    hup(rs)


def test_tlspolicy_none_ignores_offered_starttls(stack, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    h = aiotls(server_context(*ca.issue("mx.a.test")))
    status, text = one(rs)
    assert status == b"K" and b"(TLS TLSv1." in text, text     # may: TLS when offered
    policy(qroot, rs, "a.test none")
    status, text = one(rs)
    assert status == b"K" and b"TLS" not in text, text
    assert [tls for _, tls in h.messages] == [True, False]
    assert all(m == wire(MSG) for m, _ in h.messages)


def test_tlspolicy_encrypt_without_starttls_defers(stack, aiotls):
    qroot, dnssrv, port, rs = stack
    policy(qroot, rs, "a.test encrypt")
    h = aiotls(None)
    status, text = one(rs)
    assert status == b"Z", text
    assert b"does not offer STARTTLS, required (encrypt) by control/tlspolicy (a.test)." \
        b" (#4.7.5)" in text, text
    assert h.messages == []


def test_tlspolicy_encrypt_failed_handshake_never_retried_in_clear(stack, raw):
    qroot, dnssrv, port, rs = stack
    policy(qroot, rs, "a.test encrypt")

    def script(c):
        c.send(b"220 hi\r\n")
        c.expect(b"EHLO", b"250-peer\r\n250 STARTTLS\r\n")
        c.expect(b"STARTTLS", b"220 go ahead\r\n")
        c.send(b"this is not TLS\r\n")
        c.line()
    peer = raw(script)
    status, text = one(rs)
    assert status == b"Z" and b"required (encrypt) by control/tlspolicy (a.test), failed" \
        in text, text
    assert peer.connections == 1 and b"MAIL" not in peer.transcripts[0]


def test_tlspolicy_encrypt_takes_any_certificate(stack, aiotls):
    qroot, dnssrv, port, rs = stack
    policy(qroot, rs, ".test encrypt")                       # a suffix matches below it
    d = qpytest.scratch_dir("selfsigned")
    try:
        own = TestCA(d, "somebody else")                     # not trusted by anyone here
        h = aiotls(server_context(*own.issue("wrong.name.example")))
        status, text = one(rs)
        assert status == b"K" and b"(TLS TLSv1." in text, text
        assert [tls for _, tls in h.messages] == [True]
    finally:
        qpytest.remove_tree(d)


def test_tlspolicy_verify_name_and_ca(stack, aiotls, ca):
    """verify: a certificate for the MX name from a CA in tlscafile; a wrong name or an
    unknown CA defers, and nothing is sent."""
    qroot, dnssrv, port, rs = stack
    policy(qroot, rs, "mx.a.test verify")                   # by the MX host name
    h = aiotls(server_context(*ca.issue("mx.a.test")))
    status, text = one(rs)                                   # the CA is not trusted
    assert status == b"Z" and b"required (verify) by control/tlspolicy (mx.a.test)" in text
    assert b"certificate verify failed" in text, text
    assert h.messages == []
    qroot.control("tlscafile", ca.cafile)
    hup(rs)
    h = aiotls(server_context(*ca.issue("wrong.a.test", "a.test")))
    status, text = one(rs)
    assert status == b"Z" and b"certificate verify failed" in text, text
    assert b"mismatch" in text.lower(), text
    assert h.messages == []
    h = aiotls(server_context(*ca.issue("mx.a.test")))
    status, text = one(rs)
    assert status == b"K" and b"(TLS TLSv1." in text, text
    assert h.messages == [(wire(MSG), True)]


def test_tlspolicy_domain_before_host_and_unknown_level(stack, aiotls):
    qroot, dnssrv, port, rs = stack
    h = aiotls(None)
    policy(qroot, rs, "mx.a.test encrypt", "a.test may")    # the recipient's domain first
    status, text = one(rs)
    assert status == b"K", text
    policy(qroot, rs, "mx.a.test encrypt", "b.test may")
    status, text = one(rs)
    assert status == b"Z" and b"required (encrypt) by control/tlspolicy (mx.a.test)" in text
    policy(qroot, rs, "a.test sometimes")
    status, text = one(rs)
    assert status == b"Z" and b"unknown level 'sometimes' for a.test" in text, text
    assert len(h.messages) == 1
    rs.stop()
    assert b"control/tlspolicy: unknown level 'sometimes'" in rs.proc.stderr.read()


# --- bounces and delay warnings (RFC 3464) --------------------------------------------------

def remote_root(qroot, dnssrv, port: int) -> None:
    """Remote mail by MX through `dnssrv` to peers on `port`: a.test is mx.a.test at PEER;
    nx.test does not exist."""
    qroot.control("resolvers", "127.0.0.1:%d" % dnssrv.port)
    qroot.control("smtproutes", "::%d" % port)
    qroot.control("timeoutremote", "5")
    qroot.control("timeoutconnect", "5")
    dnssrv.add("a.test", "MX", "10 mx.a.test.")
    dnssrv.add("mx.a.test", "A", PEER)


def report_blocks(msg) -> list:
    """The per-recipient blocks of a multipart/report (after the per-message one)."""
    human, status, original = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def date_of(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


def test_bounce_fields_per_failure_class(qroot, dnssrv, port, aiopeer):
    """A refused RCPT with an enhanced code, a refused DATA without one, and a domain
    that does not exist: one bounce, each recipient's fields as RFC 3464 has them."""
    remote_root(qroot, dnssrv, port)
    a = user("ob", qroot)
    aiopeer(Recorder(data_reply="554 no thanks"))
    q = Qpy(qroot)
    try:
        before = time.time()
        sendmail(qroot, "qtob@test.example", "bad@a.test", "good@a.test", "x@nx.test",
                 body="payload 7\n")
        assert qpytest.wait_for(lambda: bounces(a), 30), q.log()
        [bnc] = bounces(a)
        top = report_blocks(bnc)[0]
        assert top["Reporting-MTA"] == "dns; test.example"
        assert abs(date_of(top["Arrival-Date"]) - before) < 30
        blocks = {b["Final-Recipient"]: b for b in report_blocks(bnc)[1:]}
        assert set(blocks) == {"rfc822; bad@a.test", "rfc822; good@a.test",
                               "rfc822; x@nx.test"}
        for b in blocks.values():
            assert b["Action"] == "failed"
            assert "Original-Recipient" not in b     # not known without DSN ORCPT
        bad = blocks["rfc822; bad@a.test"]
        assert bad["Status"] == "5.1.1"
        assert bad["Remote-MTA"] == "dns; mx.a.test"
        assert bad["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
        assert before - 1 <= date_of(bad["Last-Attempt-Date"]) <= time.time() + 1
        good = blocks["rfc822; good@a.test"]
        assert good["Status"] == "5.0.0"               # derived from the basic code
        assert good["Remote-MTA"] == "dns; mx.a.test"
        assert good["Diagnostic-Code"] == "smtp; 554 no thanks"
        nx = blocks["rfc822; x@nx.test"]
        assert nx["Status"] == "5.1.2" and "Remote-MTA" not in nx
        assert nx["Diagnostic-Code"].startswith("x-qpy; Sorry, I couldn't find any host")
        human = bnc.get_payload()[0].get_content()
        assert "<bad@a.test>:\n127.0.0.2 does not like recipient." in human
        assert b"payload 7" in bnc.get_payload()[2].as_bytes()
    finally:
        assert q.stop() == 0


def deferring_root(qroot, dnssrv, port: int, aiopeer):
    """Remote mail to a peer that defers temp*@a.test, delay warnings after 3.6 s:
    (the sender's user, the running qpy)."""
    remote_root(qroot, dnssrv, port)
    qroot.control("delaywarning", "0.001")             # 3.6 seconds
    a = user("ob", qroot)
    aiopeer(Recorder())
    return a, Qpy(qroot)


def test_delay_warning_once_then_bounce_keeps_far_end_status(qroot, dnssrv, port, aiopeer):
    a, q = deferring_root(qroot, dnssrv, port, aiopeer)
    try:
        sendmail(qroot, "qtob@test.example", "temp1@a.test", body="payload 8\n")
        q.wait_log(r"delivery \d+: deferral: .*451 4\.2\.0 try later")
        assert bounces(a) == []                         # younger than 3.6 s: no warning
        time.sleep(4)
        q.signal(signal.SIGALRM)
        q.wait_log(r"delay warning msg \d+")
        [warn] = qpytest.wait_for(lambda: bounces(a), 30)
        assert warn["Subject"].startswith("Delayed Mail")
        [b] = report_blocks(warn)[1:]
        assert b["Final-Recipient"] == "rfc822; temp1@a.test"
        assert b["Action"] == "delayed" and b["Status"] == "4.2.0"
        assert b["Remote-MTA"] == "dns; mx.a.test"
        assert b["Diagnostic-Code"] == "smtp; 451 4.2.0 try later"
        until = date_of(b["Will-Retry-Until"]) - date_of(report_blocks(warn)[0]["Arrival-Date"])
        assert until == 604800                           # queuelifetime's default
        copy = warn.get_payload()[2]
        assert copy.get_content_type() == "text/rfc822-headers"
        assert b"payload 8" not in copy.as_bytes()      # the header only
        q.signal(signal.SIGALRM)                         # deferred again: no second one
        q.wait_log(r"delivery \d+: deferral: .*451", count=3)
        q.signal(signal.SIGALRM)
        q.wait_log(r"delivery \d+: deferral: .*451", count=4)
        time.sleep(0.5)
        assert len(bounces(a)) == 1
        assert len(re.findall(r"delay warning msg", q.log())) == 1
    finally:
        assert q.stop() == 0
    # the W record survives a restart: still no second warning
    q = Qpy(qroot)
    try:
        q.signal(signal.SIGALRM)
        q.wait_log(r"delivery \d+: deferral: .*451", count=5)
        time.sleep(0.5)
        assert len(bounces(a)) == 1
    finally:
        assert q.stop() == 0



def test_no_delay_warning_for_a_recipient_whose_notify_leaves_out_delay(
        qroot, dnssrv, port, aiopeer):
    """RFC 3461: NOTIFY=FAILURE (no DELAY) asks for no delayed-delivery notice. Two
    messages deferred alike past delaywarning: only the one without NOTIFY is warned of."""
    a, q = deferring_root(qroot, dnssrv, port, aiopeer)
    try:
        sendmail(qroot, "qtob@test.example", "-N", "failure", "temp2@a.test")
        sendmail(qroot, "qtob@test.example", "temp1@a.test")
        q.wait_log(r"delivery \d+: deferral: .*451", count=2)
        time.sleep(4)
        q.signal(signal.SIGALRM)
        q.wait_log(r"delay warning msg \d+")
        q.wait_log(r"delivery \d+: deferral: .*451", count=4)   # both looked at again
        time.sleep(0.5)
        [warn] = bounces(a)
        [b] = report_blocks(warn)[1:]
        assert b["Final-Recipient"] == "rfc822; temp1@a.test"
        assert len(re.findall(r"delay warning msg", q.log())) == 1
    finally:
        assert q.stop() == 0

# --- DANE (RFC 7672) ------------------------------------------------------------------------

def tlsa(certfile: str, usage: int, selector: int, mtype: int) -> str:
    """The TLSA record text for the certificate in certfile."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    with open(certfile, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    data = cert.public_bytes(Encoding.DER) if selector == 0 else \
        cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype:
        data = (hashlib.sha256 if mtype == 1 else hashlib.sha512)(data).digest()
    return "%d %d %d %s" % (usage, selector, mtype, data.hex())


def with_ca(ca: TestCA, cert: str) -> str:
    """A chain file: the certificate, then the CA's (a DANE-TA server sends its TA)."""
    path = cert[:-4] + ".withca.pem"
    with open(path, "wb") as out:
        for p in (cert, ca.cafile):
            with open(p, "rb") as f:
                out.write(f.read())
    return path


def test_dane_ee_spki_and_full_cert_match_and_mismatch(stack, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.ad = True                                     # a validating resolver
    cert, key = ca.issue("not-the-mx-name.example")      # DANE-EE checks no name
    other, _ = ca.issue("mx.a.test")
    name = "_%d._tcp.mx.a.test" % port
    dnssrv.add(name, "TLSA", tlsa(other, 3, 1, 1))       # another key: no match
    h = aiotls(server_context(cert, key))
    status, text = one(rs)
    assert status == b"Z" and b"required (dane) by TLSA records of mx.a.test: no TLSA" \
        b" record matches the certificate" in text, text
    assert h.messages == []
    for rec in (tlsa(cert, 3, 1, 1), tlsa(cert, 3, 0, 2), tlsa(cert, 3, 0, 0)):
        dnssrv.zone[name + "."] = {"TLSA": [tlsa(other, 3, 1, 1), rec]}
        status, text = one(rs)
        assert status == b"K" and b" DANE)" in text, (rec, text)
    assert len(h.messages) == 3 and all(tls for _, tls in h.messages)


def test_dane_ta_chain_and_name(stack, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.ad = True
    name = "_%d._tcp.mx.a.test" % port
    dnssrv.add(name, "TLSA", tlsa(ca.cafile, 2, 0, 1))    # the test CA as trust anchor
    cert, key = ca.issue("wrong.a.test")
    h = aiotls(server_context(with_ca(ca, cert), key))
    status, text = one(rs)
    assert status == b"Z" and b"the certificate does not name mx.a.test" in text, text
    cert, key = ca.issue("mx.a.test")
    h = aiotls(server_context(with_ca(ca, cert), key))
    status, text = one(rs)
    assert status == b"K" and b" DANE)" in text, text
    d = qpytest.scratch_dir("otherca")                      # the right name, another CA
    try:
        own = TestCA(d, "qpy test CA")                   # even with the same CA name
        cert, key = own.issue("mx.a.test")
        h = aiotls(server_context(with_ca(own, cert), key))
        status, text = one(rs)
        assert status == b"Z" and b"no TLSA record matches" in text, text
        assert h.messages == []
    finally:
        qpytest.remove_tree(d)


def test_dane_needs_the_ad_bit(stack, aiotls, ca):
    """The same mismatching TLSA record from a resolver that does not validate is as if
    there were none: opportunistic TLS, delivered."""
    qroot, dnssrv, port, rs = stack
    cert, key = ca.issue("mx.a.test")
    other, _ = ca.issue("other.a.test")
    dnssrv.add("_%d._tcp.mx.a.test" % port, "TLSA", tlsa(other, 3, 1, 1))
    h = aiotls(server_context(cert, key))
    status, text = one(rs)
    assert status == b"K" and b"(TLS TLSv1." in text and b"DANE" not in text, text
    assert len(h.messages) == 1


def test_dane_tlsa_servfail_skips_that_mx(stack, raw, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.ad = True
    dnssrv.zone["a.test."] = {"MX": ["10 mx.a.test.", "20 mx2.a.test."]}
    dnssrv.add("mx2.a.test", "A", "127.0.0.4")
    dnssrv.servfail.add("_%d._tcp.mx.a.test" % port)
    first = raw(basic_session)                            # mx.a.test: never connected to
    from aiosmtpd.controller import Controller
    h = TLSRecorder()
    c = Controller(h, hostname="127.0.0.4", port=port)
    c.start()
    try:
        status, text = one(rs)
        assert status == b"K" and b"127.0.0.4" in text, text
        assert first.connections == 0 and len(h.messages) == 1
        dnssrv.add("b.test", "MX", "10 mx.a.test.")           # no other MX: deferred
        status, text = one(rs, b"x@b.test")
        assert status == b"Z" and b"TLSA lookup for _%d._tcp.mx.a.test failed" % port in text
        assert b"mx.a.test is skipped (RFC 7672)" in text, text
        assert first.connections == 0
    finally:
        c.stop()


def test_dane_only_without_tlsa_defers_and_dane_falls_back(stack, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.ad = True
    h = aiotls(server_context(*ca.issue("mx.a.test")))
    policy(qroot, rs, "a.test dane-only")
    status, text = one(rs)
    assert status == b"Z" and b"dane-only, and mx.a.test has no TLSA records" in text, text
    policy(qroot, rs, "a.test dane")
    status, text = one(rs)
    assert status == b"K" and b"DANE" not in text, text
    assert len(h.messages) == 1


# --- MTA-STS (RFC 8461) -----------------------------------------------------------------------

STS_ADDR = "127.0.0.77"         # the policy host's address: port 443 there, as the RFC says


class PolicyServer:
    """HTTPS on STS_ADDR:443 with a certificate from the test CA; `answer` is (status,
    content type, body) for /.well-known/mta-sts.txt; `hits` counts the fetches."""

    def __init__(self, ca: TestCA, name: str = "mta-sts.a.test"):
        import http.server
        import threading
        server = self
        self.hits = 0
        self.answer = (200, "text/plain", b"")

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                status, ctype, body = server.answer
                if self.path != "/.well-known/mta-sts.txt":
                    status, body = 404, b""
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer((STS_ADDR, 443), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*ca.issue(name))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def policy(self, mode: str, *mx: str, max_age: int = 86400) -> None:
        text = "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (
            mode, "".join("mx: %s\r\n" % m for m in mx), max_age)
        self.answer = (200, "text/plain", text.encode())

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sts(stack, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("mta-sts.a.test", "A", STS_ADDR)
    qroot.control("tlscafile", ca.cafile)
    s = PolicyServer(ca)
    yield s
    s.stop()


def sts_txt(dnssrv, policy_id: str) -> None:
    dnssrv.zone["_mta-sts.a.test."] = {"TXT": ['"v=STSv1; id=%s;"' % policy_id]}


def test_mta_sts_enforce_verifies_the_mx_and_caches(stack, sts, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    sts_txt(dnssrv, "20261206a")
    sts.policy("enforce", "mx.a.test")
    h = aiotls(server_context(*ca.issue("mx.a.test")))
    status, text = one(rs)
    assert status == b"K" and b"(TLS TLSv1." in text, text
    cached = os.path.join(qroot.path, "remote", "mta-sts", "a.test")
    with open(cached, "rb") as f:
        assert f.read().startswith(b"QPYSTS1 ")
    assert os.stat(cached).st_uid == pwd.getpwnam("qpyr").pw_uid
    # a wrong name on the MX certificate: deferred, and the policy comes from the cache
    h = aiotls(server_context(*ca.issue("wrong.a.test")))
    sts.answer = (500, "text/plain", b"")
    status, text = one(rs, b"y@a.test")
    assert status == b"Z" and b"required (verify) by the MTA-STS policy of a.test" \
        b" (enforce)" in text and b"certificate verify failed" in text, text
    assert sts.hits == 1 and len(h.messages) == 0


def test_mta_sts_enforce_skips_mx_not_listed_and_testing_does_not(stack, sts, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    sts_txt(dnssrv, "one")
    sts.policy("enforce", "*.elsewhere.test")
    h = aiotls(server_context(*ca.issue("wrong.a.test")))
    status, text = one(rs)
    assert status == b"Z" and b"policy of a.test (enforce) does not list MX mx.a.test" in text
    assert h.messages == []
    sts_txt(dnssrv, "two")                               # a new id: fetched again
    sts.policy("testing", "*.elsewhere.test")
    status, text = one(rs, b"y@a.test")
    assert status == b"K", text
    assert sts.hits == 2 and len(h.messages) == 1


@pytest.mark.parametrize("answer", [
    (200, "text/plain", b"version: STSv1\nmode: enforce\nmx: x\nmax_age: 1\n" + b"#" * 70000),
    (200, "text/html", b"version: STSv1\nmode: enforce\nmx: nowhere.test\nmax_age: 99\n"),
    (302, "text/plain", b""),
    (200, "text/plain", b"version: STSv2\nmode: enforce\nmx: nowhere.test\nmax_age: 9\n")])
def test_mta_sts_bad_policy_files_are_no_policy(stack, sts, aiotls, ca, answer):
    qroot, dnssrv, port, rs = stack
    sts_txt(dnssrv, "x1")
    sts.answer = answer
    h = aiotls(server_context(*ca.issue("wrong.a.test")))
    status, text = one(rs)
    assert status == b"K", text                          # as if there were no policy
    assert sts.hits == 1 and len(h.messages) == 1
    rs.stop()
    assert b"MTA-STS policy of a.test not fetched" in rs.proc.stderr.read()


def test_mta_sts_policy_host_with_wrong_certificate_is_no_policy(stack, aiotls, ca):
    qroot, dnssrv, port, rs = stack
    dnssrv.add("mta-sts.a.test", "A", STS_ADDR)
    sts_txt(dnssrv, "x2")
    qroot.control("tlscafile", ca.cafile)
    s = PolicyServer(ca, name="not-mta-sts.a.test")
    try:
        s.policy("enforce", "nowhere.test")
        h = aiotls(None)
        status, text = one(rs)
        assert status == b"K", text
        assert len(h.messages) == 1
    finally:
        s.stop()


# --- 8-bit to a 7-bit peer --------------------------------------------------------------------

MIME8 = ("From: a@test.example\nTo: x@a.test\nSubject: =?utf-8?q?caf=C3=A9?=\n"
         "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"BB\"\n\n"
         "preamble in ASCII\n"
         "--BB\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
         "Gr\u00fc\u00dfe aus K\u00f6ln.\n.a line starting with a dot\n\n"
         "--BB\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
         "AAECAwQFBgcICQ==\n"
         "--BB\nContent-Type: message/rfc822\n\n"
         "Subject: inner\nContent-Type: text/plain; charset=utf-8\n\n\u00e9t\u00e9\n"
         "--BB\nContent-Type: text/plain\n\n" + "x" * 1500 + "\n"
         "--BB--\nepilogue\n").encode()


def test_8bit_mime_converted_to_quoted_printable_for_a_7bit_peer(stack, raw):
    import email
    import email.policy
    qroot, dnssrv, port, rs = stack
    peer = raw(basic_session)                            # EHLO without 8BITMIME
    status, text = one_msg(rs, MIME8)
    assert status == b"K", text
    [data] = test_remote.bodies(peer.transcripts[0])
    sent = data[:-5].replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n") + b"\n"
    assert sent.isascii() and max(len(ln) for ln in sent.split(b"\n")) <= 998
    assert b"BODY=8BITMIME" not in peer.transcripts[0]
    head = MIME8[: MIME8.index(b"\n\n") + 1]
    assert sent.startswith(head)                         # the header as it was
    assert b"preamble in ASCII\n--BB\n" in sent and sent.endswith(b"--BB--\nepilogue\n")
    assert b"Content-Transfer-Encoding: base64\n\nAAECAwQFBgcICQ==\n--BB" in sent
    msg = email.message_from_bytes(sent, policy=email.policy.default)
    text8, binary, inner, long = msg.iter_parts()
    assert text8["Content-Transfer-Encoding"] == "quoted-printable"
    assert text8.get_content() == "Gr\u00fc\u00dfe aus K\u00f6ln.\n.a line starting with a dot\n"
    assert binary.get_content() == bytes(range(10))
    [innermsg] = inner.get_payload()
    assert innermsg["Subject"] == "inner" and innermsg.get_content() == "\u00e9t\u00e9"
    assert long["Content-Transfer-Encoding"] == "quoted-printable"
    assert long.get_content() == "x" * 1500     # its last LF is the delimiter's


@pytest.mark.parametrize("msg, why", [
    (b"Subject: s\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n\xc3\xa9\n",
     b"8-bit bytes in a part declared base64"),
    (b"Subject: s\nContent-Type: multipart/mixed\n\n--x\n\n\xc3\xa9\n--x--\n",
     b"a multipart without a boundary"),
    (b"Subject: s\nContent-Type: multipart/mixed; boundary=x\n\n\xc3\xa9 preamble\n--x\n\n"
     b"a\n--x--\n", b"8-bit bytes in a multipart's preamble or epilogue")])
def test_8bit_that_cannot_be_converted_bounces(stack, raw, msg, why):
    qroot, dnssrv, port, rs = stack
    peer = raw(basic_session)
    status, text = one_msg(rs, msg)
    assert status == b"D" and why in text and b"does not offer 8BITMIME. (#5.6.3)" in text
    assert all(b"DATA" not in t for t in peer.transcripts)


def one_msg(rs: Rspawn, msg: bytes) -> tuple[bytes, bytes]:
    return rs.deliver([b"x@a.test"], msg=msg)[0]


# --- an overall deadline per delivery ---------------------------------------------------------

def test_trickling_peer_cannot_hold_a_worker_past_the_deadline(stack, raw):
    qroot, dnssrv, port, rs = stack
    qroot.control("timeoutremotetotal", "2")             # timeoutremote is 3: per read

    def script(c):
        c.send(b"220 hi\r\n")
        c.expect(b"EHLO", b"250-peer\r\n250 PIPELINING\r\n")
        c.line()                                          # MAIL...
        for _ in range(100):                              # a byte every 0.2 s: each read
            c.send(b"2")                                  # is quick, the reply never ends
            time.sleep(0.2)
    raw(script)
    start = time.monotonic()
    status, text = one(rs)
    took = time.monotonic() - start
    assert status == b"Z" and b"ran past its deadline (control/timeoutremotetotal)" in text
    assert 1.5 < took < 5, took


# --- outgoing address, HELO per route, the memory of dead hosts -------------------------------

def test_outgoingip_and_helo_per_route(stack, raw):
    qroot, dnssrv, port, rs = stack
    qroot.control("outgoingip", "::1\n127.0.0.9")        # the IPv4 one for an IPv4 peer
    qroot.control("helohosts", "a.test helo.for.a.test\nmx.b.test helo.for.mx.b")
    dnssrv.add("b.test", "MX", "10 mx.b.test.")
    dnssrv.add("mx.b.test", "A", PEER)
    peers: list[tuple] = []

    def script(c):
        peers.append(c.c.getpeername())
        basic_session(c)
    peer = raw(script)
    assert one(rs)[0] == b"K"
    assert one(rs, b"x@b.test")[0] == b"K"               # by the next hop's name
    assert [p[0] for p in peers] == ["127.0.0.9", "127.0.0.9"]
    assert b"EHLO helo.for.a.test\r\n" in peer.transcripts[0]
    assert b"EHLO helo.for.mx.b\r\n" in peer.transcripts[1]


def test_tcpto_skips_a_host_that_timed_out_twice(stack, aiotls):
    import socket
    qroot, dnssrv, port, rs = stack
    qroot.control("timeoutconnect", "1")
    hole = socket.socket()                                # a full accept queue: SYNs
    hole.bind(("127.0.0.8", port))                        # are dropped, connects time out
    hole.listen(0)
    fill = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.8", port))
        fill.append(s)
    try:
        h = aiotls(None)
        dnssrv.add("dead.test", "A", "127.0.0.8")
        took = []
        for dom in ("a.test", "b.test", "c.test"):        # no connection reuse between them
            dnssrv.zone[dom + "."] = {"MX": ["10 dead.test.", "20 mx.a.test."]}
            start = time.monotonic()
            status, text = one(rs, b"x@" + dom.encode())
            took.append(time.monotonic() - start)
            assert status == b"K", text
        assert took[0] > 0.9 and took[1] > 0.9 and took[2] < 0.9, took
        assert len(h.messages) == 3
        r = qroot.run("qpy-status", qroot.path)
        assert re.search(rb"tcpto: 127\.0\.0\.8 skipped, 2 timeouts in a row, \d+ s left",
                         r.stdout), r.stdout
        dnssrv.zone["d.test."] = {"MX": ["10 dead.test."]}    # nothing else: deferred
        status, text = one(rs, b"x@d.test")
        assert status == b"Z" and b"127.0.0.8 timed out 2 times in a row lately; it is" \
            b" skipped for an hour (tcpto)" in text, text
    finally:
        for s in fill:
            s.close()
        hole.close()
