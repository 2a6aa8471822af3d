"""SMTP AUTH: qpy-passwd, qpy-authd (as real processes on a real socket), and AUTH in
qpy-smtpd over TLS (swaks, smtplib).

The checker is asked exactly as qpy-smtpd asks it: a client process running as
qpyd (as root: the real system user) connects to ROOT/queue/run/auth/socket.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pwd
import smtplib
import stat
import subprocess

import psutil
import pytest
import qpytest
import tlshelp
from hypothesis import given, settings
from hypothesis import strategies as st
from tlshelp import Raw

from qpy.common import authdb
from qpy.smtp import auth as smtpauth

FAIL_DELAY = 1.0          # qpy.auth.authd.FAIL_DELAY
LOCK_AFTER = 5            # qpy.auth.authd.LOCK_AFTER
ACCOUNT_DELAY_MAX = 3.0   # qpy.auth.authd.ACCOUNT_DELAY_MAX

# Runs as qpyd: ask the checker for each (user, password, ip) of argv[2], in parallel.
ASK = r"""
import json, sys, threading, time
from qpy.smtp import auth
root, reqs = sys.argv[1], json.loads(sys.argv[2])
out = [None] * len(reqs)
def one(i, u, p, ip):
    t = time.monotonic()
    a = auth.check(root, u.encode(), p.encode(), ip)
    out[i] = [a.decode(), time.monotonic() - t]
ts = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(reqs)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"""


def as_user(name: str) -> list[str]:
    if not qpytest.IS_ROOT:
        return []
    pw = pwd.getpwnam(name)
    return ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
            "--init-groups", "--"]


def ask(qroot, reqs: list[tuple[str, str, str]], user: str = "qpyd") -> list[list]:
    r = subprocess.run(as_user(user) + [qpytest.PYTHON, "-c", ASK, qroot.path, json.dumps(reqs)],
                       capture_output=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def log_of(p: subprocess.Popen) -> str:
    p.terminate()
    out, _ = p.communicate(timeout=20)
    return out.decode("utf-8", "replace")


@pytest.fixture
def authd(qroot):
    tlshelp.set_password(qroot, "alice", "correct horse")
    p = tlshelp.start_authd(qroot)
    yield p


def test_passwd_writes_scrypt_hash_only_qpyauth_reads(qroot):
    tlshelp.set_password(qroot, "alice", "s3cret")
    path = os.path.join(qroot.path, "auth", "passwd")
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(b"alice:scrypt$") and b"s3cret" not in data
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    if qpytest.IS_ROOT:
        assert pwd.getpwuid(st.st_uid).pw_name == "qpyauth"
    # a second user, then a changed password: one line each, salts differ
    tlshelp.set_password(qroot, "bob", "s3cret")
    tlshelp.set_password(qroot, "alice", "other")
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    assert [ln.split(b":")[0] for ln in lines] == [b"alice", b"bob"]
    assert lines[0] != data.strip() and lines[0].split(b"$")[4] != lines[1].split(b"$")[4]


def test_passwd_refuses_mismatch_and_bad_names(qroot):
    r = qroot.run("qpy-passwd", qroot.path, "alice", input=b"one\ntwo\n")
    assert r.returncode == 1 and b"differ" in r.stderr
    r = qroot.run("qpy-passwd", qroot.path, "al:ice", input=b"x\nx\n")
    assert r.returncode == 1
    r = qroot.run("qpy-passwd", qroot.path, "alice", input=b"\n\n")
    assert r.returncode == 1
    r = qroot.run("qpy-passwd", qroot.path, "-d", "nobody-here")
    assert r.returncode == 1
    assert os.path.getsize(os.path.join(qroot.path, "auth", "passwd")) == 0


@qpytest.needs_root
def test_qpyd_cannot_read_hashes(qroot):
    """A compromised qpyd: opening the hash file (or listing its directory) is EACCES."""
    tlshelp.set_password(qroot, "alice", "pw")
    code = ("import os\nfor p in %r:\n"
            "    try:\n        os.open(p, os.O_RDONLY); print('OPEN')\n"
            "    except OSError as e:\n        print(e.errno)\n"
            % [os.path.join(qroot.path, "auth", "passwd"), os.path.join(qroot.path, "auth")])
    r = subprocess.run(as_user("qpyd") + [qpytest.PYTHON, "-c", code], capture_output=True,
                       cwd="/")
    assert r.stdout.split() == [str(errno.EACCES).encode()] * 2, r


def test_authd_answers_yes_no_and_delays_refusals(qroot, authd):
    if qpytest.IS_ROOT:
        assert psutil.Process(authd.pid).username() == "qpyauth"
        assert psutil.Process(authd.pid).name() == "qpy-authd"
    (ok, t_ok), (bad, t_bad), (unknown, t_unknown) = ask(qroot, [
        ("alice", "correct horse", "192.0.2.1"),
        ("alice", "wrong", "192.0.2.2"),
        ("mallory", "correct horse", "192.0.2.3")])
    assert (ok, bad, unknown) == ("Y", "N", "N")
    # refusals are delayed by the checker itself (a lower bound: cannot flake)
    assert t_bad >= FAIL_DELAY and t_unknown >= FAIL_DELAY
    # qpy-passwd takes effect without a restart
    tlshelp.set_password(qroot, "alice", "new one")
    assert [a for a, _ in ask(qroot, [("alice", "new one", "192.0.2.1"),
                                      ("alice", "correct horse", "192.0.2.4")])] == ["Y", "N"]
    log = log_of(authd)
    assert "auth ok user alice from 192.0.2.1" in log
    assert "auth failed user mallory from 192.0.2.3" in log
    assert "correct horse" not in log


def test_lockout_per_client_address(qroot, authd):
    """LOCK_AFTER failures from one address lock it: even the right password gets L."""
    # IPv4 addresses count alone, IPv6 ones by their /64; both series run at once
    fails = ask(qroot, [("alice", "guess%d" % i, "198.51.100.7") for i in range(LOCK_AFTER)]
                + [("alice", "guess%d" % i, "2001:db8:1:2::%x" % i) for i in range(LOCK_AFTER)])
    assert [a for a, _ in fails] == ["N"] * 2 * LOCK_AFTER
    # concurrent guesses from one address were serialised: each waited for the one before
    assert max(t for _, t in fails[:LOCK_AFTER]) >= LOCK_AFTER * FAIL_DELAY
    after = ask(qroot, [("alice", "correct horse", "198.51.100.7"),
                        ("alice", "correct horse", "198.51.100.8"),
                        ("alice", "correct horse", "2001:db8:1:2::ff")])
    assert [a for a, _ in after] == ["L", "Y", "L"]
    assert ask(qroot, [("alice", "correct horse", "2001:db8:1:3::1")])[0][0] == "Y"
    assert "auth locked user alice from 198.51.100.7" in log_of(authd)


def test_cycling_addresses_slows_the_account_never_locks_everyone(qroot, authd):
    """Failures for one account from many addresses make every check for that account
    wait (growing, at most ACCOUNT_DELAY_MAX); nothing is refused to all: another
    account is checked at once, and the right password is still accepted."""
    tlshelp.set_password(qroot, "bob", "battery staple")
    reqs = [("alice", "guess", "203.0.113.%d" % (i % 250 + 1)) if i < 250 else
            ("alice", "guess", "10.0.%d.1" % i) for i in range(70)]
    answers = [a for a, _ in ask(qroot, reqs)]
    assert answers == ["N"] * 70            # no global refusal (was T past 60 a minute)
    (alice, t_alice), (bob, t_bob) = ask(qroot, [("alice", "correct horse", "192.0.2.99"),
                                                 ("bob", "battery staple", "192.0.2.98")])
    assert (alice, bob) == ("Y", "Y")
    # 70 failures: 7 steps of ACCOUNT_FREE, so alice's checks wait ACCOUNT_DELAY_MAX
    assert t_alice >= ACCOUNT_DELAY_MAX
    assert t_alice < ACCOUNT_DELAY_MAX + 5 and t_bob < t_alice


@qpytest.needs_root
def test_only_qpyd_may_ask(qroot, authd):
    # another system user cannot reach the socket at all (directory qpyauth:qpyd 0750)
    assert ask(qroot, [("alice", "correct horse", "192.0.2.1")], user="qpyr")[0][0] == "T"
    # root can reach it, but SO_PEERCRED says it is not qpyd
    assert ask(qroot, [("alice", "correct horse", "192.0.2.1")], user="root")[0][0] == "T"
    assert ask(qroot, [("alice", "correct horse", "192.0.2.1")])[0][0] == "Y"
    log = log_of(authd)
    assert "refused connection from uid 0" in log


def test_malformed_requests_do_not_hurt_the_checker(qroot, authd):
    code = r"""
import socket, sys
for payload in [b"", b"junk", b"QPYAUTH1\0a\0b\0", b"\0" * 5000, b"QPYAUTH1\0" + b"x" * 4000,
                b"QPYAUTH1\0al ice\0pw\0" + b"1.2.3.4\0"]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1]); s.sendall(payload); s.shutdown(socket.SHUT_WR)
    print(s.recv(10)); s.close()
"""
    r = subprocess.run(as_user("qpyd") + [qpytest.PYTHON, "-c", code,
                                          os.path.join(qroot.paths.run, "auth", "socket")],
                       capture_output=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\n")[:6] == [b"b'T\\n'"] * 6
    assert ask(qroot, [("alice", "correct horse", "192.0.2.1")])[0][0] == "Y"
    assert authd.poll() is None
    assert "Traceback" not in log_of(authd)


def test_checkpassword_backend(qroot):
    """control/checkpassword: user\\0password\\0 on fd 3, exit 0 accepts."""
    d = qpytest.scratch_dir("cp")
    prog = os.path.join(d, "checkpw")
    with open(prog, "w") as f:
        f.write("#!/bin/sh\n"
                "data=$(head -c 512 <&3 | tr '\\0' ' ')\n"
                "case \"$data\" in 'carol hunter2 '*) exec \"$@\";; esac\n"
                "exit 1\n")
    os.chmod(prog, 0o755)
    try:
        qroot.control("checkpassword", prog)
        p = tlshelp.start_authd(qroot)
        answers = [a for a, _ in ask(qroot, [("carol", "hunter2", "192.0.2.1"),
                                             ("carol", "hunter3", "192.0.2.2"),
                                             ("alice", "hunter2", "192.0.2.3")])]
        assert answers == ["Y", "N", "N"]
        assert "backend checkpassword %s" % prog in log_of(p)
    finally:
        qpytest.remove_tree(d)


# -- AUTH in qpy-smtpd: swaks, smtplib, raw sessions ---------------------------------

OUTSIDE = "friend@elsewhere.example"


@pytest.fixture
def mta(qroot):
    d = qpytest.scratch_dir("cert")
    tlshelp.install_cert(qroot, tlshelp.make_cert(d))
    tlshelp.set_password(qroot, "alice", "correct horse")
    tlshelp.set_password(qroot, "bob", "battery staple")
    qroot.control("authsenders", "alice: alice@test.example\nbob: bob@test.example @bob.example")
    tlshelp.start_authd(qroot)
    server = tlshelp.Server(qroot)
    yield server
    server.stop()
    qpytest.remove_tree(d)


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "-s", "127.0.0.1:%d" % port, "--timeout", "30",
                           "--to", OUTSIDE, *args], capture_output=True, timeout=60)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_tls_auth_relays_and_names_user(qroot, mta, mech):
    r = swaks(mta.submission, "--from", "alice@test.example", "--tls", "--auth", mech,
              "--auth-user", "alice", "--auth-password", "correct horse")
    out = r.stdout.decode()
    assert r.returncode == 0, out
    assert "235 2.7.0" in out and "250 2.0.0" in out
    (msg,) = tlshelp.wait_drops(qroot, 1)
    head = msg.split(b"\n\n")[0]
    assert b"with ESMTPSA (version=TLSv1." in head
    assert b"(authenticated user alice)" in head
    assert mta.wait_log("qpy-smtpd 127.0.0.1: authenticated user alice")


def test_auth_before_tls_is_refused(mta):
    c = Raw(mta.submission)
    c.reply()
    code, text = c.cmd("EHLO client.example")
    assert "AUTH" not in text and "STARTTLS" in text
    cred = base64.b64encode(b"\0alice\0correct horse").decode()
    code, text = c.cmd("AUTH PLAIN " + cred)
    assert code == 538 and "5.7.11" in text
    # and relaying without AUTH is refused
    c.cmd("MAIL FROM:<alice@test.example>")
    assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 553
    c.close()


def test_relay_without_auth_on_submission_is_refused(qroot, mta):
    r = swaks(mta.submission, "--from", "alice@test.example", "--tls")
    assert r.returncode != 0
    assert b"553 5.7.1" in r.stdout
    assert tlshelp.drops(qroot) == []


def test_wrong_password_is_refused_and_delayed(qroot, mta):
    c = Raw(mta.submission)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("STARTTLS")
    c.tls()
    c.cmd("EHLO client.example")
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    (code, text), took = tlshelp.elapsed(lambda: c.cmd("AUTH PLAIN " + bad))
    assert code == 535 and "5.7.8" in text
    assert took >= FAIL_DELAY
    assert c.cmd("MAIL FROM:<alice@test.example>")[0] == 250
    assert c.cmd("RCPT TO:<%s>" % OUTSIDE)[0] == 553          # still not allowed to relay
    c.cmd("RSET")
    # cancelling, bad base64, unknown mechanism, overlong response
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd("*")[0] == 501
    assert c.cmd("AUTH PLAIN !!!notbase64")[0] == 501
    assert c.cmd("AUTH CRAM-MD5")[0] == 504
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd("A" * 5000)[0] == 501
    # the third wrong password ends the session
    assert c.cmd("AUTH PLAIN " + bad)[0] == 535
    assert c.cmd("AUTH PLAIN " + bad)[0] == 421
    assert c.closed()
    assert tlshelp.drops(qroot) == []


def test_lockout_gives_421(mta):
    """LOCK_AFTER failures from one address: then even the right password gets 421."""
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    good = base64.b64encode(b"\0alice\0correct horse").decode()
    failures = 0
    while failures < LOCK_AFTER:
        c = Raw(mta.smtps, implicit_tls=True)
        c.reply()
        c.cmd("EHLO client.example")
        for _ in range(min(2, LOCK_AFTER - failures)):
            assert c.cmd("AUTH PLAIN " + bad)[0] == 535
            failures += 1
        c.close()
    c = Raw(mta.smtps, implicit_tls=True)
    c.reply()
    c.cmd("EHLO client.example")
    code, text = c.cmd("AUTH PLAIN " + good)
    assert code == 421 and "4.7.0" in text
    assert c.closed()


def test_authsenders_restricts_senders(qroot, mta):
    ctx = tlshelp.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", mta.smtps, timeout=30, context=ctx) as s:
        s.login("alice", "correct horse")
        for sender in ("bob@test.example", "someone@bob.example"):
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail(sender, [OUTSIDE], b"Subject: x\r\n\r\nx\r\n")
            assert e.value.smtp_code == 553
        s.sendmail("alice@test.example", [OUTSIDE], b"Subject: mine\r\n\r\nx\r\n")
    with smtplib.SMTP("127.0.0.1", mta.submission, timeout=30) as s:
        s.starttls(context=ctx)
        s.login("bob", "battery staple")
        s.sendmail("anything@bob.example", [OUTSIDE], b"Subject: bob's\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("alice@test.example", [OUTSIDE], b"Subject: x\r\n\r\nx\r\n")
    msgs = tlshelp.wait_drops(qroot, 2)
    assert len(msgs) == 2
    assert sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in msgs) == [b"bob's", b"mine"]


def test_no_auth_offered_without_authd(qroot):
    d = qpytest.scratch_dir("cert")
    tlshelp.install_cert(qroot, tlshelp.make_cert(d))
    server = tlshelp.Server(qroot, smtps=False)
    try:
        with smtplib.SMTP("127.0.0.1", server.submission, timeout=30) as s:
            s.starttls(context=tlshelp.client_context())
            s.ehlo("x")
            assert not s.has_extn("auth")
            code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode())
            assert code == 502
    finally:
        server.stop()
        qpytest.remove_tree(d)


def test_qpy_start_runs_authd_and_auth_works_end_to_end(qroot):
    """qpy-start starts authd (as qpyauth) because auth/passwd holds a user; qpy-status
    expects it; AUTH over implicit TLS then relays through the running system."""
    d = qpytest.scratch_dir("cert")
    tlshelp.install_cert(qroot, tlshelp.make_cert(d))
    tlshelp.set_password(qroot, "alice", "correct horse")
    port = qpytest.free_port()
    qroot.control("smtpslisten", "127.0.0.1:%d" % port)
    qroot.control("smtplisten", "127.0.0.1:%d" % qpytest.free_port())
    start = qroot.start("qpy-start", qroot.path)
    try:
        def authd_proc():
            for p in psutil.process_iter(["name", "username", "ppid"]):
                if p.info["name"] == "qpy-authd" and p.info["ppid"] == start.pid:
                    return p
            return None
        # the socket exists once authd has dropped to qpyauth
        assert qpytest.wait_for(lambda: os.path.exists(
            os.path.join(qroot.paths.run, "auth", "socket")), 30)
        p = qpytest.wait_for(authd_proc, 30)
        assert p is not None
        if qpytest.IS_ROOT:
            assert p.username() == "qpyauth"
        tlshelp.wait_port(port, start)
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30,
                              context=tlshelp.client_context()) as s:
            s.login("alice", "correct horse")
            refused = s.sendmail("alice@test.example", [OUTSIDE], b"Subject: e2e\r\n\r\nx\r\n")
            assert refused == {}
        status = qroot.run("qpy-status", qroot.path).stdout.decode()
        assert "service authd: up" in status, status
    finally:
        start.terminate()
        start.wait(timeout=60)
        qpytest.remove_tree(d)


DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log
protocols = none
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {d}/auth-qpy {{
    mode = 0600
    user = {user}
    group = {user}
  }}
}}
"""


@qpytest.needs_root
@pytest.mark.skipif(not os.path.exists("/usr/sbin/dovecot"), reason="no Dovecot")
def test_dovecot_auth_socket_backend(qroot):
    """control/dovecotauth: qpy-authd asks Debian's Dovecot (auth-client protocol, as
    Postfix does) and still applies its own delays."""
    d = qpytest.scratch_dir("dovecot")
    for sub in ("run", "state"):
        os.mkdir(os.path.join(d, sub))
    with open(os.path.join(d, "users"), "w") as f:
        f.write("carol:{PLAIN}hunter2\n")
    conf = os.path.join(d, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(DOVECOT_CONF.format(d=d, user="qpyauth"))
    dovecot = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", conf],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = os.path.join(d, "auth-qpy")
        assert qpytest.wait_for(lambda: os.path.exists(sock), 20)
        qroot.control("dovecotauth", sock)
        p = tlshelp.start_authd(qroot)
        (ok, _), (bad, t_bad), (unknown, _) = ask(qroot, [
            ("carol", "hunter2", "192.0.2.1"), ("carol", "hunter3", "192.0.2.2"),
            ("alice", "hunter2", "192.0.2.3")])
        assert (ok, bad, unknown) == ("Y", "N", "N")
        assert t_bad >= FAIL_DELAY
        assert "backend dovecot %s" % sock in log_of(p)
        # Dovecot gone: a temporary failure, not a yes or a no
        dovecot.terminate()
        dovecot.wait(timeout=30)
        p = tlshelp.start_authd(qroot)
        assert ask(qroot, [("carol", "hunter2", "192.0.2.1")])[0][0] == "T"
    finally:
        if dovecot.poll() is None:
            dovecot.terminate()
            dovecot.wait(timeout=30)
        qpytest.remove_tree(d)


# -- the SASL parser and the authsenders rule, as pure functions ------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.one_of(st.none(), st.binary(max_size=600)),
                                         max_size=3))
def test_sasl_exchange_never_raises(arg, answers):
    it = iter(answers)
    result = smtpauth.exchange(arg, lambda challenge: next(it, None))
    if isinstance(result, tuple):
        user, password = result
        assert authdb.valid_user(user) and authdb.valid_password(password)
    else:
        assert result[:3].isdigit() and result[3] == " "


def test_sasl_exchange_examples():
    b64 = lambda b: base64.b64encode(b)  # noqa: E731
    assert smtpauth.exchange(b"PLAIN " + b64(b"\0alice\0pw"), None) == (b"alice", b"pw")
    assert smtpauth.exchange(b"plain " + b64(b"alice\0alice\0pw"), None) == (b"alice", b"pw")
    assert smtpauth.exchange(b"PLAIN " + b64(b"bob\0alice\0pw"), None) == smtpauth.BAD
    assert smtpauth.exchange(b"PLAIN =", None) == smtpauth.BAD_B64
    replies = iter([b64(b"alice"), b64(b"pw")])
    assert smtpauth.exchange(b"LOGIN", lambda c: next(replies)) == (b"alice", b"pw")
    assert smtpauth.exchange(b"LOGIN " + b64(b"alice"), lambda c: b"*") == smtpauth.CANCELLED
    assert smtpauth.exchange(b"PLAIN " + b"A" * (smtpauth.MAX_B64 + 4), None) \
        == smtpauth.BAD_B64


def test_authsenders_rule():
    lines = ["alice: alice@example.org Alice.Smith@example.org", "bob: @bob.example"]
    ok = smtpauth.sender_allowed
    assert ok(lines, "alice", b"alice@example.org")
    assert ok(lines, "alice", b"alice.smith@EXAMPLE.org")
    assert not ok(lines, "alice", b"bob@bob.example")
    assert not ok(lines, "alice", b"")
    assert ok(lines, "bob", b"anything@bob.example")
    assert not ok(lines, "carol", b"x@bob.example")       # owned by bob
    assert not ok(lines, "carol", b"alice@example.org")   # owned by alice
    assert ok(lines, "carol", b"carol@example.org")       # nobody's: free
    assert ok([], "carol", b"alice@example.org")
