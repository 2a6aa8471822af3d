"""Admin tools against a queue and a log whose content the test knows exactly.

qpy-qstat, qpy-qread, qpy-showctl, qpy-status, qpy-logsum, qpy-qrm, qpy-qretry run
as separate processes on a freshly installed root; the queue files are written
here with the shared writers (qpy.common.queue/state, qpy.inject.drop) so the
expected output is known to the byte.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

import pytest
import qpytest

from qpy.admin import queueinfo
from qpy.common import durable, envelope
from qpy.common.queue import todo_encode
from qpy.common.state import LOCAL, REMOTE, MessageState, RecipientState, StateFile
from qpy.inject.drop import Drop

T0 = 1709251200            # 2024-03-01 00:00:00 UTC
ID_A, ID_B = "1709251200000001", "1709251300000002"


def owner(qroot) -> tuple[int, int]:
    st = os.stat(qroot.paths.state)
    return st.st_uid, st.st_gid


# DSN parameters (RFC 3461) in their canonical wire form, as qpy-smtpd keeps them
DSN_MAIL = b"RET=HDRS ENVID=a+2B1"
DSN_RCPT = b"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol@far.example"


def build_queue(qroot) -> None:
    """A: picked up, not preprocessed (mess+todo). B: preprocessed (mess+state),
    with one recipient in each state. Plus one drop file not yet picked up."""
    p = qroot.paths
    msg_a = b"Subject: a\n\nhello\n"
    durable.write_file(p.mess, ID_A, msg_a)
    durable.write_file(p.todo, ID_A, todo_encode(
        T0, 0, len(msg_a), envelope.encode(b"alice@test.example",
                                           [b"bob@test.example", b"carol@far.example"],
                                           DSN_MAIL, [b"", DSN_RCPT])))
    msg_b = b"Subject: b\n\n" + b"x" * 100 + b"\n"
    durable.write_file(p.mess, ID_B, msg_b)
    ms = MessageState(ID_B, T0 + 100, len(msg_b), 0, 1234, b"dave@test.example", [
        RecipientState(b"r0@test.example", LOCAL, b"r0@test.example"),
        RecipientState(b"r1@far.example", REMOTE, b"r1@far.example", dsn=DSN_RCPT),
        RecipientState(b"r2@far.example", REMOTE, b"r2@far.example"),
        RecipientState(b"r3@test.example", LOCAL, b"r3@test.example"),
        RecipientState(b"r4@far.example", REMOTE, b"r4@far.example"),
    ])
    sf = StateFile(p.state, ID_B)
    sf.create(ms)
    sf.done(0)
    sf.deferred(1, T0 + 500, "451 4.3.0 try again later")
    sf.failed(2, "550 5.1.1 no such user")
    sf.deferred(3, T0 + 600, "first error")
    sf.done(3)
    sf.failed(4, "552 too big")
    sf.bounced([4])
    uid, gid = owner(qroot)
    for d, name in ((p.mess, ID_A), (p.todo, ID_A), (p.mess, ID_B), (p.state, ID_B)):
        os.chown(os.path.join(d, name), uid if d == p.state else -1, gid)
    drop = Drop(qroot.path)
    drop.write(b"Subject: c\n\nin drop\n")
    drop.commit(b"erin@test.example", [b"frank@test.example"])


def test_qstat_counts_mess_todo_and_drop(qroot):
    r = qroot.run("qpy-qstat", qroot.path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (b"messages in queue: 0\n"
                        b"messages in queue but not yet preprocessed: 0\n")
    build_queue(qroot)
    for args, env in (((qroot.path,), None), ((), {"QPY_ROOT": qroot.path})):
        r = qroot.run("qpy-qstat", *args, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (b"messages in queue: 3\n"
                            b"messages in queue but not yet preprocessed: 2\n")


def test_qread_shows_every_recipient_state(qroot):
    build_queue(qroot)
    r = qroot.run("qpy-qread", qroot.path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    drop = [ln for ln in lines if ln.startswith("drop:")]
    assert len(drop) == 1 and drop[0].endswith("(not yet picked up)")
    assert lines[:-1] == [
        "%s  01 Mar 2024 00:00:00 GMT  18 bytes  from <alice@test.example>  "
        "RET=HDRS ENVID=a+2B1" % ID_A,
        "  waiting   new     <bob@test.example>",
        "  waiting   new     <carol@far.example>  "
        "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol@far.example",
        "%s  01 Mar 2024 00:01:40 GMT  113 bytes  from <dave@test.example>" % ID_B,
        "  done      local   <r0@test.example>",
        "  deferred  remote  <r1@far.example>  "
        "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol@far.example  next 01 Mar 2024 00:08:20 GMT: "
        "451 4.3.0 try again later",
        "  bounced   remote  <r2@far.example>: 550 5.1.1 no such user",
        "  done      local   <r3@test.example>",
        "  bounced   remote  <r4@far.example>: 552 too big",
    ]


def test_qread_survives_a_damaged_state_file(qroot):
    build_queue(qroot)
    with open(os.path.join(qroot.paths.state, ID_B), "wb") as f:
        f.write(b"garbage\n")
    r = qroot.run("qpy-qread", qroot.path)
    assert r.returncode == 0
    assert ("%s  (unreadable state file: bad state header)" % ID_B).encode() in r.stdout
    assert b"<bob@test.example>" in r.stdout


def test_showctl_defaults_files_and_malformed(qroot):
    r = qroot.run("qpy-showctl", qroot.path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.decode().splitlines()
    assert "me: test.example" in out                       # written by qpy-install
    assert "concurrencylocal: 10 (default)" in out
    assert "databytes: 52428800 (default)" in out
    assert "bouncefrom: MAILER-DAEMON (default)" in out
    assert "acceptunknown: no (default)" in out
    qroot.control("concurrencylocal", "abc")
    qroot.control("databytes", "20000")
    qroot.control("virtualdomains", "# comment\nexample.net:alias-net\n\n")
    qroot.control("frobnicate", "one\ntwo")                  # not a setting qpy knows
    qroot.control("servercert.pem", "-----BEGIN PRIVATE KEY-----\nsecret\n")
    with open(os.path.join(qroot.paths.control, "timeoutsmtpd"), "wb") as f:
        f.write(b"12\x003\n")
    os.mkdir(os.path.join(qroot.paths.control, "maxsmtpd"))
    r = qroot.run("qpy-showctl", qroot.path)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout.decode().splitlines()
    assert "concurrencylocal: 10 (malformed: not a non-negative integer: 'abc')" in out
    assert "databytes: 20000" in out
    assert "timeoutsmtpd: 1200 (malformed: contains a NUL byte)" in out
    assert any(ln.startswith("maxsmtpd: 40 (malformed: cannot read") for ln in out)
    assert "virtualdomains: example.net:alias-net" in out   # the value, not "1 entry"
    assert "badmailfrom: (none) (default)" in out
    i = out.index("frobnicate: 2 entries")
    assert out[i + 1:i + 3] == ["  one", "  two"]
    assert any(ln.startswith("servercert.pem: (") and "not shown" in ln for ln in out)
    assert b"secret" not in r.stdout
    assert b"3 malformed" in r.stderr
    # every known setting is listed exactly once
    from qpy.common.control import DEFAULTS
    names = [ln.split(":", 1)[0] for ln in out if ln and not ln.startswith((" ", "control "))]
    assert all(names.count(n) == 1 for n in DEFAULTS)


LOG_DAY1 = [
    (T0 + 10, "new msg 101"),
    (T0 + 10, "info msg 101: bytes 1000 from <a@x.example> qp 11 uid 0"),
    (T0 + 11, "starting delivery 1: msg 101 to local b@test.example"),
    (T0 + 11, "status: local 1/10 remote 0/20"),
    (T0 + 12, "starting delivery 2: msg 101 to remote c@far.example"),
    (T0 + 13, "delivery 1: success: did_0+0+1/"),
    (T0 + 14, "delivery 2: deferral: Connection_refused"),
    (T0 + 20, "new msg 102"),
    (T0 + 20, "info msg 102: bytes 500 from <> qp 12 uid 994"),
    (T0 + 21, "starting delivery 3: msg 102 to remote d@far.example"),
    (T0 + 22, "delivery 3: failure: 550_no_such_user"),
    (T0 + 23, "bounce msg 102 qp 13"),
    (T0 + 24, "end msg 102"),
]
LOG_DAY2 = [
    (T0 + 86405, "starting delivery 4: msg 101 to remote c@far.example"),
    (T0 + 86465, "delivery 4: success: 250_ok"),
    (T0 + 86466, "end msg 101"),
    (T0 + 86470, "info msg 103: bytes 42 from <g@x.example> qp 14 uid 0"),
    (T0 + 86471, "remove msg 103 by qpy-qrm"),
]


def tai64n(t: float) -> str:
    return "@%016x%08x" % (2 ** 62 + 10 + int(t), 0)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + ".000000"


def test_logsum_totals_from_multilog_and_qpy_start_logs(tmp_path):
    multilog = tmp_path / "current"
    multilog.write_text("".join("%s %s\n" % (tai64n(t), x) for t, x in LOG_DAY1))
    # the second day as qpy-start's merged log: TIMESTAMP SERVICE PROGRAM: text
    merged = tmp_path / "start.log"
    merged.write_text("".join("%s send queue-send: %s\n" % (iso(t), x) for t, x in LOG_DAY2))
    r = subprocess.run([qpytest.bin_path("qpy-logsum"), str(multilog), str(merged)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    days = {}
    for block in r.stdout.decode().split("day: ")[1:]:
        lines = block.splitlines()
        days[lines[0]] = {k.strip(): v.strip() for k, _, v in
                          (ln.partition(": ") for ln in lines[1:]) if v}
    assert set(days) == {"2024-03-01", "2024-03-02", "total"}
    d1, d2, tot = days["2024-03-01"], days["2024-03-02"], days["total"]
    assert (d1["messages"], d1["bytes"], d1["recipients"]) == ("2", "1500", "3")
    assert (d1["delivery attempts"], d1["success"], d1["deferral"], d1["failure"]) == \
        ("3", "1", "1", "1")
    assert (d1["bounces"], d1["ended"], d1["other lines"]) == ("1", "1", "3")
    assert d1["average ddelay (s)"] == "3.00"      # arrival T0+10, success T0+13
    assert d1["average xdelay (s)"] == "1.67"      # 2, 2, 1
    assert (d2["messages"], d2["bytes"], d2["success"], d2["removed"]) == ("1", "42", "1", "1")
    assert d2["average ddelay (s)"] == "86455.00"
    assert (tot["messages"], tot["bytes"], tot["success"], tot["deferral"],
            tot["failure"]) == ("3", "1542", "2", "1", "1")
    text = r.stdout.decode()
    total_block = text[text.index("day: total"):]
    assert "within 10s        1  50.0%" in total_block
    assert "later             1  50.0%" in total_block
    assert " 50% within 3.00 s" in total_block and "100% within 86455.00 s" in total_block
    # the same log on standard input gives the same totals
    r2 = subprocess.run([qpytest.bin_path("qpy-logsum")],
                        input=multilog.read_bytes() + merged.read_bytes(),
                        capture_output=True, timeout=60)
    assert r2.stdout == r.stdout


def test_qrm_and_qretry_refuse_without_queue_send(qroot):
    build_queue(qroot)
    r = qroot.run("qpy-qrm", qroot.path, "999")
    assert r.returncode == 100 and b"no message" in r.stderr
    r = qroot.run("qpy-qrm", qroot.path, "../etc")
    assert r.returncode == 100
    r = qroot.run("qpy-qretry", qroot.path)
    assert r.returncode == 111 and b"not running" in r.stderr
    # a stale pid file naming some other live process signals nobody
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(qroot.paths.run, "queue-send.pid"), "w") as f:
            f.write("%d\n" % sleeper.pid)
        r = qroot.run("qpy-qretry", qroot.path)
        assert r.returncode == 111
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


FAKE = "import os, sys, time, setproctitle; setproctitle.setproctitle(sys.argv[1]); " \
       "os.chdir(sys.argv[2]); time.sleep(60)"


@qpytest.needs_root
def test_status_sees_processes_uids_and_down_services(qroot):
    build_queue(qroot)
    pickup = qroot.start("qpy-pickup")
    # a process titled as the queue core's cleaner, but running as root: a wrong uid
    fake = subprocess.Popen([qpytest.PYTHON, "-c", FAKE, "qpy-clean", qroot.path])
    try:
        # wait until pickup has admitted the drop file (its message renamed into todo/ and
        # the drop file gone): while it admits, mess/ID and the drop file both exist and a
        # count counts the message twice. Then the queue holds 3, 2 not preprocessed.
        def admitted():
            return (not queueinfo.drop_names(qroot.paths)
                    and len(queueinfo.ids(qroot.paths.todo)) == 2)
        assert qpytest.wait_for(admitted)
        assert qroot.run("qpy-qstat", qroot.path).stdout == (
            b"messages in queue: 3\nmessages in queue but not yet preprocessed: 2\n")
        def seen():
            r = qroot.run("qpy-status", qroot.path)
            procs = [ln.split()[0] for ln in r.stdout.decode().splitlines()
                     if ln.startswith("  ")]
            return r if "qpy-pickup" in procs and "qpy-clean" in procs else None
        r = qpytest.wait_for(seen, timeout=30)
        assert r is not None, qroot.run("qpy-status", qroot.path).stdout
        out = r.stdout.decode()
        assert r.returncode == 2, out
        qpyq = pwd.getpwnam("qpyq").pw_uid
        line = [ln for ln in out.splitlines() if ln.strip().startswith("qpy-pickup")][0]
        assert "pid %d " % pickup.pid in line and "uid %d " % qpyq in line and " ok " in line
        assert "open files" in line and "rss" in line
        line = [ln for ln in out.splitlines() if ln.strip().startswith("qpy-clean")][0]
        assert "WRONG UID" in line
        assert "service pickup: up" in out
        assert "service send: DOWN" in out
        assert "service authd: not configured" in out
        assert "queue: 3 messages, 2 not yet preprocessed, oldest" in out
    finally:
        fake.kill()
        fake.wait()
    pickup.terminate()
    pickup.wait(timeout=30)
    # with a password configured, authd is expected too
    r = qroot.run("qpy-passwd", qroot.path, "someone", input=b"pw-12345\npw-12345\n")
    assert r.returncode == 0, r.stderr
    r = qroot.run("qpy-status", qroot.path)
    assert b"service authd: DOWN, not running: qpy-authd" in r.stdout
    authd = qroot.start("qpy-authd", qroot.path)
    assert qpytest.wait_for(lambda: b"service authd: up" in
                            qroot.run("qpy-status", qroot.path).stdout, timeout=30)
    line = [ln for ln in qroot.run("qpy-status", qroot.path).stdout.decode().splitlines()
            if ln.startswith("  qpy-authd")][0]
    assert "pid %d " % authd.pid in line and " ok " in line
    r = qroot.run("qpy-status", qroot.path)
    assert b"\n  qpy-pickup" not in r.stdout
    assert b"service pickup: DOWN, not running: qpy-pickup" in r.stdout
    assert r.returncode == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
