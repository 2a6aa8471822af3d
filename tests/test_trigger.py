"""qpy-pickup's trigger to qpy-queue-send (qpy.common.trigger, issue 18 item 3).

queue-send has no inotify watch on todo/: pickup sends it the ids of each committed
batch in one datagram. These tests prove that a hint that cannot go strands nothing
well before queue-send's 60 s rescan (its socket queue full, queue-send not running,
pickup killed between its commit and its renames), that hostile datagrams are
ignored and deliver nothing twice, and that only qpyq and root reach the socket.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time

import qpytest
from qpytest import maildir_messages, needs_root, wait_for
from test_send import ME, Qpy, sendmail, user

from qpy.common import trigger
from qpy.common.watch import Watcher

RESCAN = 60.0       # qpy.common.watch.RESCAN_SECONDS: every proof below beats it


def sock_path(root: str) -> str:
    return os.path.join(trigger.directory(root), trigger.LEAF)


def subjects(pw) -> list[str]:
    return sorted(str(m["Subject"]) for m in maildir_messages(pw))


def inject(qroot, rcpt: str, subject: str) -> None:
    sendmail(qroot, "qtta@%s" % ME, rcpt, headers="Subject: %s\n" % subject)


# --- the module alone ----------------------------------------------------------------
def test_parse_takes_only_well_formed_hints():
    assert trigger.parse(b"L") == ([], True)
    assert trigger.parse(b"N 17") == (["17"], False)
    assert trigger.parse(b"N 17 18") == (["17", "18"], False)
    too_many = b"N " + b" ".join(b"%d" % (i + 1) for i in range(trigger.MAX_IDS + 1))
    for bad in (b"", b"N", b"N ", b"N 17 ", b"N  17", b"N ../x", b"N 17\x00", b"N 017",
                b"N 1/2", b"N \xb9", b"L ", b"LL", b"X 17", b"N " + b"9" * 25,
                b"N " + b"1" * trigger.MAX_DATAGRAM, too_many):
        assert trigger.parse(bad) is None, bad


def test_watcher_takes_names_and_listings_from_hints():
    """A Watcher without inotify directories wakes on the trigger: names from N, a
    rescan from L; a sender that finds nobody owes an L and sends it once it can."""
    root = qpytest.scratch_dir("trig")
    os.makedirs(trigger.directory(root))
    rx = trigger.Receiver(root)
    tx = trigger.Sender(root)
    w = Watcher([], rescan_seconds=3600, hints=rx)
    assert w.rescan_due() and not w.rescan_due()
    tx.new(["17", "18"])
    t0 = time.monotonic()
    w.wait(30)
    assert time.monotonic() - t0 < 20 and w.names() == ["17", "18"] and not w.rescan_due()
    rx.close()
    os.unlink(sock_path(root))                  # queue-send gone: ENOENT
    tx.new(["19"])
    assert tx.owed
    tx.settle()
    assert tx.owed and 0 < tx.timeout(30) <= trigger.RETRY_SECONDS
    rx = trigger.Receiver(root)
    w = Watcher([], rescan_seconds=3600, hints=rx)
    assert w.rescan_due()
    assert wait_for(lambda: (tx.settle(), not tx.owed)[1], 5)
    w.wait(30)
    assert w.names() == [] and w.rescan_due()   # the L: a listing
    tx.close()
    rx.close()


# --- the real programs ---------------------------------------------------------------
@needs_root
def test_socket_and_directory_admit_only_qpyq_and_root(qroot):
    """The directory qpys:qpyq 2750, the socket qpys:qpyq 0620: qpyq sends; qpyd, a
    mail user and the other qpy uids get EACCES (the directory stops them)."""
    user("ta", qroot)
    q = Qpy(qroot)
    path = sock_path(qroot.path)
    assert wait_for(lambda: os.path.exists(path), 30), q.log()
    d, s = os.stat(trigger.directory(qroot.path)), os.stat(path)
    qpys, qpyq = pwd.getpwnam("qpys").pw_uid, grp.getgrnam("qpyq").gr_gid
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (qpys, qpyq, 0o2750)
    assert stat.S_ISSOCK(s.st_mode)
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (qpys, qpyq, 0o620)
    check = qroot.run("qpy-install", "--check", qroot.path)
    assert check.returncode == 0, check.stdout + check.stderr
    for who, want in (("qpyq", "sent"), ("qpyd", "EACCES"), ("qpyl", "EACCES"),
                      ("qpyr", "EACCES"), ("qtta", "EACCES")):
        assert send_as(who, path, [b"L"]) == want, who
    assert "ignored a malformed hint" not in q.log()


SEND_AS = r"""
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
n = int(sys.argv[2])
try:
    for data in sys.stdin.buffer.read().split(b"\n--\n") * n:
        s.sendto(data, sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno]); sys.exit(0)
print("sent")
"""


def send_as(login: str, path: str, datagrams: list[bytes], times: int = 1) -> str:
    """Send the datagrams (blocking: a full queue waits) as login; "sent" or the errno."""
    pw = pwd.getpwnam(login)
    r = subprocess.run(["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                        "--init-groups", "--", qpytest.PREFIX + "/venv/bin/python3", "-I",
                        "-c", SEND_AS, path, str(times)],
                       input=b"\n--\n".join(datagrams), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


@needs_root
def test_full_socket_queue_owes_a_listing(qroot):
    """queue-send stopped; its socket queue filled (by root) until a send would block,
    so each batch's hint then fails with EAGAIN; at SIGCONT every message arrives at
    once: pickup's owed L, not the 60 s rescan, told queue-send of them."""
    a = user("ta", qroot)
    q = Qpy(qroot)
    started = time.monotonic()
    inject(qroot, "qtta@%s" % ME, "first")
    assert wait_for(lambda: subjects(a) == ["first"], 20), q.log()
    qs = q.pid("queue-send")
    os.kill(qs, signal.SIGSTOP)
    try:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        filled = 0
        while True:
            try:
                filler.sendto(b"N 99", socket.MSG_DONTWAIT, sock_path(qroot.path))
                filled += 1
            except BlockingIOError:
                break
        for i in range(20):
            inject(qroot, "qtta@%s" % ME, "m%02d" % i)
        assert wait_for(lambda: len(os.listdir(qroot.paths.todo)) == 20, 20)
    finally:
        os.kill(qs, signal.SIGCONT)
    cont = time.monotonic()
    want = sorted(["first"] + ["m%02d" % i for i in range(20)])
    assert wait_for(lambda: subjects(a) == want, 15), (filled, subjects(a), q.log()[-3000:])
    assert time.monotonic() - started < RESCAN - 5, "too slow to tell the hint from a rescan"
    assert time.monotonic() - cont < 15 and q.pid("queue-send") == qs


@needs_root
def test_mail_admitted_while_queue_send_is_down_is_delivered_once_it_runs(qroot):
    """pickup alone (a stale socket left behind: ECONNREFUSED, then none: ENOENT)
    admits mail; qpy-start then runs queue-send, whose first listing finds it."""
    a = user("ta", qroot)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(sock_path(qroot.path))           # as queue-send leaves it at its exit
    stale.close()
    os.chown(sock_path(qroot.path), pwd.getpwnam("qpys").pw_uid, grp.getgrnam("qpyq").gr_gid)
    os.chmod(sock_path(qroot.path), trigger.SOCKET_MODE)
    pickup = qroot.start("qpy-pickup")
    inject(qroot, "qtta@%s" % ME, "refused")
    assert wait_for(lambda: len(os.listdir(qroot.paths.todo)) == 1, 20)
    os.unlink(sock_path(qroot.path))
    inject(qroot, "qtta@%s" % ME, "missing")
    assert wait_for(lambda: len(os.listdir(qroot.paths.todo)) == 2, 20)
    time.sleep(1.5)                             # the owed L retried, still in vain
    qpytest.stop(pickup)
    out = pickup.stdout.read().decode()
    assert "cannot send" not in out, out        # expected errors are not logged
    q = Qpy(qroot)
    assert wait_for(lambda: subjects(a) == ["missing", "refused"], 20), q.log()


@needs_root
def test_pickup_killed_between_commit_and_rename_is_delivered_after_restart(qroot):
    """pickup killed at its first rename of a batch (todo/.tmp.ID committed, not yet
    todo/ID): the restarted pickup's recovery renames it and its start hint (an L)
    tells queue-send, long before queue-send's own rescan would."""
    a = user("ta", qroot)
    q = Qpy(qroot)
    started = time.monotonic()
    time.sleep(2.2)             # past qpy-start's crash-loop window: restarted after 1 s
    pid = q.pid("pickup")
    out = os.path.join(os.path.dirname(qroot.path), "strace.out")
    t = subprocess.Popen(["strace", "-f", "-q", "-o", out, "-e", "trace=rename,renameat,"
                          "renameat2", "-e", "inject=rename,renameat,renameat2:signal=KILL:"
                          "when=1", "-p", str(pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def traced() -> bool:
            with open("/proc/%d/status" % pid) as f:
                return not re.search(r"^TracerPid:\s+0$", f.read(), re.M)
        assert wait_for(traced, 10, 0.01)
        inject(qroot, "qtta@%s" % ME, "killed")
        assert wait_for(lambda: q.pid("pickup") not in (None, pid), 20), q.log()
    finally:
        if t.poll() is None:
            t.send_signal(signal.SIGINT)
        t.wait(10)
    with open(out) as f:
        assert "+++ killed by SIGKILL +++" in f.read()
    assert wait_for(lambda: subjects(a) == ["killed"], 15), q.log()[-3000:]
    assert time.monotonic() - started < RESCAN - 5, "too slow to tell the hint from a rescan"


@needs_root
def test_hostile_hints_are_ignored_and_deliver_nothing_twice(qroot):
    """As root and as qpyq: overlong, NUL, paths, ids of missing files, ids of mail
    in flight, and a burst of 10,000. queue-send stays up, logs the malformed once,
    and every message is delivered exactly once."""
    a = user("ta", qroot)
    q = Qpy(qroot)
    path = sock_path(qroot.path)
    assert wait_for(lambda: os.path.exists(path), 30)
    qs = q.pid("queue-send")
    junk = [b"N " + b"1" * 5000, b"N 17\x00", b"\x00", b"N ../x", b"N ../../etc/passwd",
            b"N 12345678901234567890", b"L", b"N 9 8 7", b"", b"x" * 70000]
    assert send_as("qpyq", path, junk) == "sent"
    for i in range(10):
        inject(qroot, "qtta@%s" % ME, "h%d" % i)
        ids = [n for n in os.listdir(qroot.paths.todo) if not n.startswith(".")]
        if ids:
            # the ids of mail being taken in and delivered, again and again
            hint = b"N " + " ".join(ids).encode()
            assert send_as("qpyq", path, [hint, b"L"], times=20) == "sent"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for i in range(10_000):         # blocking: as fast as queue-send reads
        s.sendto(junk[i % len(junk)] if i % 2 else b"N %d" % (i + 1), path)
    want = sorted("h%d" % i for i in range(10))
    assert wait_for(lambda: subjects(a) == want, 30), q.log()[-3000:]
    time.sleep(1.0)                 # a second copy would come now
    assert subjects(a) == want
    assert q.pid("queue-send") == qs
    assert len(re.findall(r"ignored a malformed hint", q.log())) == 1
    assert not re.search(r"queue-send: .*(Traceback|alert)", q.log())


@needs_root
def test_root_without_the_trigger_directory_falls_back_to_inotify(qroot):
    """A root installed before the trigger (no queue/trigger/): pickup and queue-send
    say so once, and queue-send watches todo/ by inotify: mail still comes at once."""
    a = user("ta", qroot)
    os.rmdir(trigger.directory(qroot.path))
    q = Qpy(qroot)
    q.wait_log(r"queue-send: warning: cannot bind .*trigger/socket.*watched by inotify")
    q.wait_log(r"pickup: warning: no .*queue/trigger")
    time.sleep(1.0)                 # past queue-send's first listing
    t0 = time.monotonic()
    inject(qroot, "qtta@%s" % ME, "inotify")
    assert wait_for(lambda: subjects(a) == ["inotify"], 20), q.log()
    assert time.monotonic() - t0 < RESCAN - 5
