"""Fragile spots found by reading (issue 17), each with the test that failed before
its fix: qpy-start's supervision while qpy-newrcpt stalls, an injector whose fsync
fails, malformed control files, a root path too long for a socket name,
a killed injector's temporary file, a message file that cannot be opened.

Everything runs the installed programs; a stand-in replaces a program only where
the point is what its caller does when that program misbehaves.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import qpytest
import smtphelp
import tlshelp
from qpytest import wait_for


def shadow_bin(qroot, replace: dict[str, str]) -> str:
    """A bin directory beside the root: links to the installed launchers (programs
    find each other beside sys.argv[0]), with `replace` {program: sh script}."""
    d = os.path.join(os.path.dirname(qroot.path), "bin")
    os.makedirs(d)
    os.chmod(os.path.dirname(d), 0o755)
    for name in os.listdir(qpytest.BIN):
        if name not in replace:
            os.symlink(os.path.join(qpytest.BIN, name), os.path.join(d, name))
    for name, script in replace.items():
        p = os.path.join(d, name)
        with open(p, "w") as f:
            f.write("#!/bin/sh\n" + script)
        os.chmod(p, 0o755)
    os.symlink(os.path.join(qpytest.PREFIX, "share"),
               os.path.join(os.path.dirname(d), "share"))
    return d


def read_pid(qroot, prog: str) -> int | None:
    try:
        with open(os.path.join(qroot.paths.run, prog + ".pid")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def test_start_supervises_and_drains_logs_while_newrcpt_stalls(qroot):
    """A qpy-newrcpt that hangs (a home on a dead NFS server) must not stop qpy-start
    from reaping and restarting a dead service, nor from reading the logs."""
    stall = os.path.join(os.path.dirname(qroot.path), "stall")
    real = qpytest.bin_path("qpy-newrcpt")
    bindir = shadow_bin(qroot, {"qpy-newrcpt":
                                '[ -e %s ] && exec sleep 120\nexec %s "$@"\n' % (stall, real)})
    logpath = os.path.join(os.path.dirname(qroot.path), "start.log")
    with open(logpath, "wb") as log:
        proc = subprocess.Popen([os.path.join(bindir, "qpy-start"), qroot.path],
                                env=qroot.env(), stdout=log, stderr=subprocess.STDOUT)
    qroot.procs.append(proc)

    def text() -> str:
        with open(logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")
    assert wait_for(lambda: read_pid(qroot, "pickup") and "entries in" in text(), 30), text()
    open(stall, "w").close()
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)         # qpy-newrcpt is now asleep
    old = read_pid(qroot, "pickup")
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: read_pid(qroot, "pickup") not in (None, old), 15), \
        "pickup not restarted while qpy-newrcpt stalls:\n" + text()
    assert wait_for(lambda: re.search(r"pickup qpy-pickup: .*started", text().split(
        "killed by signal 9", 1)[-1]), 15), "pickup's log not read:\n" + text()
    print("pickup back %.1f s after its kill, qpy-newrcpt still asleep"
          % (time.monotonic() - t0))
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert "stopped" in text()


def strace_run(qroot, inject: str, prog: str, *args: str, input: bytes = b"",
               **kw) -> subprocess.CompletedProcess:
    """Run an installed program under strace with a fault injected (`inject` is
    strace's SYSCALL:error=E or SYSCALL:signal=S...)."""
    cmd = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=" + inject.split(":")[0],
           "-e", "inject=" + inject, qpytest.bin_path(prog), *args]
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(cmd, input=input, env=qroot.env(), timeout=60, **kw)


def envelope_pipe(sender: bytes, rcpts: list[bytes]) -> int:
    """A pipe holding the envelope for qpy-queue-inject's fd 1."""
    r, w = os.pipe()
    os.write(w, b"F" + sender + b"\0" + b"".join(b"T" + x + b"\0" for x in rcpts) + b"\0")
    os.close(w)
    return r


def test_injector_whose_fsync_fails_leaves_no_drop_file(qroot):
    """fsync of the drop file fails (EIO): exit 53 and no complete drop file under
    its final name, or pickup would admit what the sender will send again."""
    env_r = envelope_pipe(b"a@test.example", [b"b@test.example"])
    try:
        r = strace_run(qroot, "fsync:error=EIO", "qpy-queue-inject",
                       input=b"Subject: x\n\nbody\n", stdout=env_r)
    finally:
        os.close(env_r)
    assert r.returncode == 53, r
    assert qroot.queue_files("drop") == []


def smtp_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        data = b""
        while not data.endswith(b"\n"):
            got = s.recv(512)
            if not got:
                break
            data += got
        return data


@pytest.mark.parametrize("name", ["databytes", "maxrcpt", "maxsmtpd"])
def test_malformed_protective_limit_refuses_with_421_and_logs_at_each_reload(qroot, name):
    """A limit that protects, malformed, is "unable to read controls" (421), not
    "no limit"; the problem is logged at start and again at every reload; once it is
    fixed, a HUP brings the listener back."""
    qroot.control(name, "50 MB")
    lst = smtphelp.Listener(qroot, ipv6=False)
    try:
        assert smtp_greeting(lst.port).startswith(b"421 4.3.0"), lst.log()
        warning = "control/%s is malformed" % name
        assert lst.wait_log(warning), lst.log()
        n = lst.log().count(warning)
        lst.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: lst.log().count(warning) > n, 20), lst.log()
        qroot.control(name, "1000000")
        lst.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: smtp_greeting(lst.port).startswith(b"220"), 20), lst.log()
    finally:
        lst.stop()


def test_malformed_databytes_makes_sendmail_fail_temporarily(qroot):
    qroot.control("databytes", "-1")
    r = qroot.run("qpy-sendmail", "someone@test.example", input=b"Subject: x\n\nbody\n")
    assert r.returncode == 111, r
    assert b"control/databytes is malformed" in r.stderr, r.stderr
    assert qroot.queue_files("drop") == []


def test_malformed_ordinary_setting_is_logged_and_defaulted(qroot):
    qroot.control("timeoutsmtpd", "soon")
    lst = smtphelp.Listener(qroot, ipv6=False)
    try:
        assert smtp_greeting(lst.port).startswith(b"220"), lst.log()
        assert lst.wait_log("control/timeoutsmtpd is malformed"), lst.log()
        assert "using the default 1200" in lst.log(), lst.log()
    finally:
        lst.stop()


def test_authd_listens_and_answers_under_a_root_path_too_long_for_a_socket_name():
    """ROOT/queue/run/auth/socket longer than sun_path's 107 bytes: qpy-authd must
    still listen, and smtpd's side (qpy.smtp.auth.check, as qpyd) still reach it."""
    top = qpytest.scratch_dir("long")
    deep = os.path.join(top, "a-directory-name-long-enough" * 3)
    os.makedirs(deep, mode=0o755)
    path = os.path.join(deep, "qpy")
    r = subprocess.run([qpytest.bin_path("qpy-install"), path, "--me", "test.example"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r
    qroot = qpytest.QRoot(path)
    try:
        sock = os.path.join(qroot.paths.run, "auth", "socket")
        assert len(sock.encode()) > 107
        tlshelp.set_password(qroot, "alice", "correct horse")
        authd = tlshelp.start_authd(qroot)
        ask = ("import sys\nfrom qpy.smtp import auth\n"
               "for pw in (b'correct horse', b'wrong'):\n"
               "    print(auth.check(sys.argv[1], b'alice', pw, '192.0.2.1').decode())\n")
        who = []
        if qpytest.IS_ROOT:
            pw = pwd.getpwnam("qpyd")
            who = ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                   "--init-groups", "--"]
        r = subprocess.run(who + [qpytest.PYTHON, "-c", ask, path], capture_output=True,
                           timeout=60, cwd="/")
        assert r.stdout.split() == [b"Y", b"N"], (r, authd.poll())
    finally:
        qroot.stop_all()
        qpytest.remove_tree(top)


def test_pickup_removes_the_temporary_file_of_a_killed_injector(qroot):
    """An injector killed mid-message leaves drop/tmp.*; it was never acknowledged,
    and the restarted system must not keep it for qmail's 36 hours."""
    start = qroot.start("qpy-start", qroot.path, "--only", "pickup")
    assert wait_for(lambda: read_pid(qroot, "pickup"), 30), start
    env_r = envelope_pipe(b"a@test.example", [b"b@test.example"])
    inj = subprocess.Popen([qpytest.bin_path("qpy-queue-inject")], env=qroot.env(),
                           stdin=subprocess.PIPE, stdout=env_r, stderr=subprocess.PIPE)
    os.close(env_r)
    inj.stdin.write(b"Subject: half\n\n" + b"x" * 200000)
    inj.stdin.flush()
    assert wait_for(lambda: any(n.startswith("tmp.") for n in qroot.queue_files("drop")), 20)
    inj.kill()
    inj.wait()
    inj.stdin.close()
    time.sleep(1.5)
    r = qroot.run("qpy-sendmail", "b@test.example", input=b"Subject: next\n\nbody\n")
    assert r.returncode == 0, r
    # the next scan (the new message's) admits it and removes the orphan
    assert wait_for(lambda: qroot.queue_files("drop") == [], 20), qroot.queue_files("drop")
    assert len(qroot.queue_files("mess")) == 1


@qpytest.needs_root
def test_message_whose_mess_file_cannot_be_opened_bounces_after_queuelifetime(qroot):
    """mess/ID unreadable (EACCES here; EIO on a bad disk): deferred while young, but
    past queuelifetime it bounces (quoting nothing) instead of staying for ever."""
    home = os.path.join(os.path.dirname(qroot.path), "home-faults")
    qpytest.make_user("qtfaults", home)
    qroot.control("queuelifetime", "2")
    pickup = qroot.start("qpy-start", qroot.path, "--only", "pickup")
    r = qroot.run("qpy-sendmail", "-f", "qtfaults@test.example", "nobody-here@test.example",
                  input=b"Subject: unreadable\n\nbody\n")
    assert r.returncode == 0, r
    assert wait_for(lambda: qroot.queue_files("todo"), 20)
    [msgid] = qroot.queue_files("mess")
    os.chmod(os.path.join(qroot.paths.mess, msgid), 0)
    pickup.terminate()
    pickup.wait(60)
    time.sleep(2.5)         # older than queuelifetime before queue-send first sees it
    logpath = os.path.join(os.path.dirname(qroot.path), "start.log")
    with open(logpath, "wb") as log:
        qroot.start("qpy-start", qroot.path, stdout=log, stderr=subprocess.STDOUT)

    def text() -> str:
        with open(logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")
    assert wait_for(lambda: "end msg %s" % msgid in text(), 30), text()
    bounces = wait_for(lambda: glob.glob(os.path.join(home, "Maildir", "new", "*")), 30)
    assert bounces, text()
    with open(bounces[0], "rb") as f:
        data = f.read()
    assert b"Return-Path: <>" in data and b"unable to open the queued message" in data
    assert wait_for(lambda: qroot.queue_files("mess") == qroot.queue_files("todo") == [], 20)


def test_queue_send_removes_the_temporary_request_of_a_killed_qrm(qroot):
    """qpy-qrm killed between creating queue/rm/.tmp.ID.PID and its rename: the
    temporary file is not a request, and nothing else would ever remove it."""
    p = os.path.join(qroot.paths.queue, "rm", ".tmp.1234.999999")
    open(p, "w").close()
    os.utime(p, (time.time() - 60, time.time() - 60))
    qroot.start("qpy-start", qroot.path, "--only", "send")
    assert wait_for(lambda: not os.path.exists(p), 30), os.listdir(os.path.dirname(p))


@qpytest.needs_root
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_smtpd_unit_rebuilds_the_table_outside_protecthome(qroot):
    """qpy-smtpd.service runs with ProtectHome=yes, which hides the homes qpy-newrcpt
    must stat: systemd runs it with full privileges ("+") at start and on reload, and
    qpy-start --no-newrcpt leaves the table alone. (No systemd runs as PID 1 here:
    the unit is checked by systemd-analyze and the flag by running qpy-start.)"""
    svdir = qpytest.scratch_dir("units")
    try:
        r = subprocess.run([qpytest.bin_path("qpy-install"), qroot.path, "--supervise", svdir],
                           capture_output=True, timeout=120)
        assert r.returncode == 0, r
        unit = os.path.join(svdir, "systemd", "qpy-smtpd.service")
        with open(unit) as f:
            text = f.read()
        newrcpt = "%s %s\n" % (qpytest.bin_path("qpy-newrcpt"), qroot.path)
        assert "\nExecStartPre=+" + newrcpt in text
        assert "\nExecReload=+" + newrcpt + "ExecReload=/bin/kill -HUP $MAINPID\n" in text
        assert "--only smtpd --no-newrcpt\n" in text and "\nProtectHome=yes\n" in text
        r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True,
                           text=True, timeout=60, cwd=os.path.dirname(unit))
        assert r.returncode == 0 and "qpy-smtpd.service" not in r.stderr, r.stderr
    finally:
        qpytest.remove_tree(svdir)
    table = os.path.join(qroot.path, "users", "recipients")
    if os.path.exists(table):
        os.unlink(table)
    qroot.control("smtplisten", "127.0.0.1:%d" % qpytest.free_port())
    logpath = os.path.join(os.path.dirname(qroot.path), "start.log")
    with open(logpath, "wb") as log:
        p = qroot.start("qpy-start", qroot.path, "--only", "smtpd", "--no-newrcpt",
                        stdout=log, stderr=subprocess.STDOUT)
    assert wait_for(lambda: read_pid(qroot, "tcpserver"), 30), open(logpath).read()
    p.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert not os.path.exists(table), "qpy-start ran qpy-newrcpt despite --no-newrcpt"
    assert "qpy-newrcpt" not in open(logpath).read()


@qpytest.needs_root
def test_qrm_request_for_a_message_pickup_has_not_committed_is_kept(qroot):
    """qpy-qrm accepts an id that has mess/ID only (pickup between the message and
    its todo/ID); queue-send dropped such a request as "nothing left to remove", and
    the message lived on although qpy-qrm had said yes. Found by bench/soak."""
    msgid = "17965900000000000000001"
    mess = os.path.join(qroot.paths.mess, msgid)
    with open(mess, "wb") as f:
        f.write(b"Subject: x\n\nbody\n")
    req = os.path.join(qroot.paths.queue, "rm", msgid)
    open(req, "w").close()
    start = qroot.start("qpy-start", qroot.path, "--only", "send")
    assert wait_for(lambda: read_pid(qroot, "queue-send"), 30)
    for _ in range(3):
        time.sleep(1.0)
        start.send_signal(signal.SIGALRM)      # queue/rm/ is read on every SIGALRM
    time.sleep(1.0)
    assert os.path.exists(req), "the removal request was dropped"
    os.unlink(mess)
    start.send_signal(signal.SIGALRM)
    assert wait_for(lambda: not os.path.exists(req), 20), "a request for nothing stays"
