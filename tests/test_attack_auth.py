"""Issue 12, finding 4: one attacker must not lock AUTH for everyone.

Failures come from 300 client addresses in 127.0.0.0/8 (the client socket bound to
127.x.y.z) through a real qpy-tcpserver and qpy-smtpd (implicit TLS) to a real
qpy-authd; then the right password from a fresh address is accepted at once, while
an attacking address is slowed, then locked."""

from __future__ import annotations

import base64
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import qpytest
import tlshelp

FAIL_DELAY = 1.0          # qpy.auth.authd.FAIL_DELAY
LOCK_AFTER = 5            # qpy.auth.authd.LOCK_AFTER
ACCOUNT_DELAY_MAX = 3.0   # qpy.auth.authd.ACCOUNT_DELAY_MAX


@pytest.fixture
def mta(qroot):
    d = qpytest.test_dir("cert")
    tlshelp.install_cert(qroot, tlshelp.make_cert(d))
    tlshelp.set_password(qroot, "alice", "correct horse")
    tlshelp.set_password(qroot, "bob", "battery staple")
    tlshelp.start_authd(qroot)
    server = tlshelp.Server(qroot)
    yield server
    server.stop()
    qpytest.remove_tree(d)


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
def test_attack_auth_finding4_failures_from_300_addresses_lock_out_no_one(mta):
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
