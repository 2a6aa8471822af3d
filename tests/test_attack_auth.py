"""Issue 12, finding 4: one attacker must not lock AUTH for everyone; finding 11: the
first qpy-passwd starts qpy-authd without a restart.

Failures come from 300 client addresses in 127.0.0.0/8 (the client socket bound to
127.x.y.z) through a real qpy-tcpserver and qpy-smtpd (implicit TLS) to a real
qpy-authd; then the right password from a fresh address is accepted at once, while
an attacking address is slowed, then locked."""

from __future__ import annotations

import base64
import os
import re
import smtplib
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import qpytest
import tlshelp
from test_auth import (
    ACCOUNT_DELAY_MAX,
    FAIL_DELAY,
    LOCK_AFTER,
    ask,
    mta,  # noqa: F401 (the fixture: qpy-authd and qpy-tcpserver with TLS)
)


def auth_plain(port: int, source: str, user: str, password: str) -> tuple[int, float]:
    """One AUTH PLAIN from `source` over implicit TLS: (reply code, seconds it took)."""
    cred = base64.b64encode(b"\0%s\0%s" % (user.encode(), password.encode())).decode()
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=60, source_address=(source, 0),
                          context=tlshelp.client_context()) as s:
        s.ehlo("client.example")
        t = time.monotonic()
        code, _ = s.docmd("AUTH", "PLAIN " + cred)
        took = time.monotonic() - t
        if code != 421:
            s.quit()
    return code, took


@qpytest.needs_root
def test_attack_auth_finding4_failures_from_300_addresses_lock_out_no_one(mta):  # noqa: F811
    sources = ["127.1.%d.%d" % (i // 250, i % 250 + 1) for i in range(300)]
    # every tenth guess is for alice, the others for accounts that do not exist
    guesses = [(src, "alice" if i % 10 == 0 else "nobody%d" % (i % 30), "guess%d" % i)
               for i, src in enumerate(sources)]
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda g: auth_plain(mta.smtps, *g), guesses))
    codes = [c for c, _ in results]
    assert codes == [535] * 300, sorted(set(codes))     # refused, never 454 to all
    assert min(t for _, t in results) >= FAIL_DELAY       # each guess was slowed
    # the right password from addresses without failures: accepted, within seconds
    code, took = auth_plain(mta.smtps, "127.2.0.1", "alice", "correct horse")
    assert code == 235 and took < ACCOUNT_DELAY_MAX + 5, (code, took)
    code, took = auth_plain(mta.smtps, "127.2.0.2", "bob", "battery staple")
    assert code == 235 and took < 5, (code, took)
    # an attacking address is slowed, then locked: even the right password gets 421
    for i in range(LOCK_AFTER - 1):
        code, took = auth_plain(mta.smtps, sources[0], "bob", "wrong%d" % i)
        assert code == 535 and took >= FAIL_DELAY
    code, _ = auth_plain(mta.smtps, sources[0], "bob", "battery staple")
    assert code == 421


def _authd_of(parent: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(parent).children(recursive=True)
                if p.name() == "qpy-authd"]
    except psutil.NoSuchProcess:
        return []


def _check_alice(qroot) -> bool:
    """The right password through the socket, asked as qpyd asks."""
    return ask(qroot, [("alice", "correct horse", "192.0.2.1")])[0][0] == "Y"


@qpytest.needs_root
def test_attack_auth_finding11_first_passwd_starts_authd_without_restart(qroot):
    """qpy-start runs without AUTH configured; the first qpy-passwd makes it start
    qpy-authd within seconds, the same qpy-start (no restart), and qpy-status agrees."""
    start = qroot.start("qpy-start", qroot.path, stdout=subprocess.DEVNULL)
    try:
        assert qpytest.wait_for(lambda: os.path.exists(
            os.path.join(qroot.paths.run, "pickup.pid")), 30)
        assert _authd_of(start.pid) == []
        t = time.monotonic()
        tlshelp.set_password(qroot, "alice", "correct horse")
        assert qpytest.wait_for(lambda: _authd_of(start.pid), 10), "authd not started"
        assert qpytest.wait_for(lambda: os.path.exists(
            os.path.join(qroot.paths.run, "auth", "socket")), 10)
        assert time.monotonic() - t < 10 and start.poll() is None
        assert _check_alice(qroot)
        status = qroot.run("qpy-status", qroot.path).stdout.decode()
        assert "service authd: up" in status, status
    finally:
        start.terminate()
        start.wait(timeout=90)


@qpytest.needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/svscan"), reason="no daemontools")
def test_attack_auth_finding11_daemontools_status_agrees_with_svstat():
    """Under daemontools the qpy-authd service is up (svstat) before AUTH is configured;
    after the first qpy-passwd qpy-authd runs and qpy-status says up, as svstat does."""
    from test_supervise import Host, Scan
    host = Host("sva")
    scan = Scan(host, ("authd",))
    try:
        assert qpytest.wait_for(lambda: ": up " in scan.svstat("authd"), 30)
        tlshelp.set_password(host.qroot, "alice", "correct horse")
        r = qpytest.wait_for(lambda: (lambda r: r if "service authd: up" in r else None)(
            host.status("--svdir", scan.dir).stdout.decode()), 20)
        assert r is not None, host.status("--svdir", scan.dir).stdout.decode()
        assert re.search(r"^  qpy-authd .* ok ", r, re.M), r
        assert ": up " in scan.svstat("authd")
        assert _check_alice(host.qroot)
    finally:
        scan.stop()
        host.cleanup()
