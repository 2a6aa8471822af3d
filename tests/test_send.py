"""The scheduler: qpy-queue-send, qpy-clean and qpy-start, end to end.

Everything runs for real: qpy-start (root) with its whole send group and pickup,
qpy-sendmail to inject, qpy-lspawn/qpy-local to deliver into real users' Maildirs.
These tests cover scheduling, bounces, retries, concurrency, removal and crashes;
.qmail semantics are tested in test_local.py.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import os
import pwd
import random
import re
import signal
import subprocess
import time

import psutil
import pytest
import qpytest
from qpytest import maildir_messages, needs_root, wait_for

from qpy.common.state import StateError, StateFile, read_state

ME = "test.example"
CRASH_MESSAGES = int(os.environ.get("QPY_CRASH_MESSAGES", "1000"))


# --- helpers ---------------------------------------------------------------------
class Qpy:
    """qpy-start running on a root, its merged log in a file."""

    def __init__(self, qroot):
        self.qroot = qroot
        self.logpath = os.path.join(os.path.dirname(qroot.path), "start.log")
        self.proc = None
        self.start()

    def start(self) -> None:
        log = open(self.logpath, "ab")
        self.proc = self.qroot.start("qpy-start", self.qroot.path, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        assert wait_for(lambda: self.pid("queue-send"), 30), self.log()

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, pattern: str, timeout: float = 30, count: int = 1) -> list[str]:
        rx = re.compile(pattern)
        found = wait_for(lambda: len(rx.findall(self.log())) >= count and rx.findall(self.log()),
                         timeout)
        assert found, "no %r in log:\n%s" % (pattern, self.log()[-6000:])
        return found

    def pid(self, prog: str) -> int | None:
        try:
            with open(os.path.join(self.qroot.paths.run, prog + ".pid")) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def user(name: str, qroot, dot: dict[str, str] | None = None) -> pwd.struct_passwd:
    """A real user with a home holding a Maildir and the given .qmail files."""
    return qpytest.mail_user(qroot, name, dot)


def sendmail(qroot, sender: str, *rcpts: str, body: str = "hello\n",
             headers: str = "Subject: test\n") -> None:
    r = qroot.run("qpy-sendmail", "-f", sender, *rcpts, input=(headers + "\n" + body).encode())
    assert r.returncode == 0, r.stderr


def queue_empty(qroot) -> bool:
    p = qroot.paths
    return not any(os.listdir(d) for d in (p.mess, p.todo, p.state))


@pytest.fixture
def qpy(qroot):
    q = Qpy(qroot)
    yield q
    if q.proc.poll() is None:
        q.stop()


def bounces(pw) -> list[email.message.Message]:
    return [m for m in maildir_messages(pw) if m.get_content_type() == "multipart/report"]


# --- bounces, retries, lifetime --------------------------------------------------
@needs_root
def test_delivery_and_bounce_with_reason(qroot):
    a = user("sa", qroot)
    b = user("sb", qroot, {"fail": "|echo 'the fail program says no'; exit 100\n"})
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsb@%s" % ME, "qtsb-fail@%s" % ME, body="payload 42\n")
    assert wait_for(lambda: bounces(a), 30), q.log()
    assert wait_for(lambda: queue_empty(qroot), 30), q.log()
    delivered = maildir_messages(b)
    assert len(delivered) == 1 and "payload 42" in delivered[0].get_content()
    [bnc] = bounces(a)
    assert bnc["From"] == "MAILER-DAEMON@%s" % ME
    assert bnc["Return-Path"] == "<>"
    human, status, original = bnc.get_payload()
    text = human.get_content()
    assert text.startswith("Hi. This is the")
    assert "<qtsb-fail@%s>:\nthe fail program says no" % ME in text
    assert "<qtsb@%s>" % ME not in text          # the delivered one is not bounced
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert blocks[1]["Final-Recipient"] == "rfc822; qtsb-fail@%s" % ME
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"].startswith("5.")
    assert original.get_content_type() == "message/rfc822"
    assert b"payload 42" in original.as_bytes()
    log = q.log()
    for line in (r"new msg \d+", r"info msg \d+: bytes \d+ from <qtsa@test.example> qp \d+ uid 0",
                 r"starting delivery \d+: msg \d+ to local qtsb-fail@test.example",
                 r"delivery \d+: failure: the fail program says no",
                 r"delivery \d+: success", r"status: local \d+/10 remote 0/20",
                 r"bounce msg \d+ qp \d+", r"end msg \d+"):
        assert re.search(line, log), line
    assert q.stop() == 0


@needs_root
def test_retry_on_sigalrm_after_111(qroot):
    user("sa", qroot)
    b = user("sb", qroot, {"flaky": "|if [ -e flag ]; then exit 0; fi; touch flag; "
                                    "echo not yet; exit 111\n./Maildir/\n"})
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-flaky@%s" % ME)
    q.wait_log(r"delivery \d+: deferral: not yet")
    r = qroot.run("qpy-qread", qroot.path)
    assert re.search(r"deferred\s+local\s+<qtsb-flaky@test.example>\s+next .*: not yet",
                     r.stdout.decode()), r.stdout
    assert maildir_messages(b) == []
    q.signal(signal.SIGALRM)             # forwarded to queue-send: retry now, not in 100 s
    assert wait_for(lambda: maildir_messages(b), 30), q.log()
    assert wait_for(lambda: queue_empty(qroot), 30)


@needs_root
def test_queuelifetime_expiry_bounces(qroot):
    a = user("sa", qroot)
    user("sb", qroot, {"never": "|echo still busy; exit 111\n"})
    qroot.control("queuelifetime", "3")
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-never@%s" % ME)
    q.wait_log(r"delivery \d+: deferral: still busy")
    # the next try is moved to the end of the lifetime: one last attempt, then a bounce
    assert wait_for(lambda: bounces(a), 30), q.log()
    text = bounces(a)[0].get_payload()[0].get_content()
    assert "still busy" in text and "in the queue too long" in text
    assert wait_for(lambda: queue_empty(qroot), 30)


@needs_root
def test_double_and_triple_bounce(qroot):
    user("sa", qroot)
    user("sb", qroot, {"fail": "|echo refused; exit 100\n"})
    c = user("sc", qroot)
    qroot.control("doublebounceto", "qtsc")
    q = Qpy(qroot)
    # the sender itself fails: its bounce fails, so a double bounce goes to qtsc
    sendmail(qroot, "qtsb-fail@%s" % ME, "qtsb-fail@%s" % ME, body="original body\n")
    assert wait_for(lambda: bounces(c), 30), q.log()
    [dbl] = bounces(c)
    assert dbl["To"] == "qtsc@%s" % ME and dbl["Return-Path"] == "<>"
    text = dbl.get_payload()[0].get_content()
    assert "bounce message could not be delivered" in text
    assert "<qtsb-fail@%s>:\nrefused" % ME in text
    assert wait_for(lambda: queue_empty(qroot), 30)
    # a double bounce that fails too is logged and dropped
    qroot.control("doublebounceto", "qtsb-fail")
    q.signal(signal.SIGHUP)
    q.wait_log(r"info: control files re-read")
    sendmail(qroot, "qtsb-fail@%s" % ME, "qtsb-fail@%s" % ME)
    q.wait_log(r"triple bounce: discarding bounce/\d+")
    assert wait_for(lambda: queue_empty(qroot), 30)
    assert len(bounces(c)) == 1


# --- concurrency, removal, SIGTERM -----------------------------------------------
@needs_root
def test_concurrencylocal_2_observed(qroot):
    user("sa", qroot)
    prog = ("|mkdir -p run; touch run/$$; ls run | wc -l >> counts; sleep 0.4; "
            "rm run/$$\n")
    d = user("sd", qroot, {"slow-default": prog})
    qroot.control("concurrencylocal", "2")
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, *["qtsd-slow-%d@%s" % (i, ME) for i in range(8)])
    q.wait_log(r"delivery \d+: success", count=8, timeout=60)
    with open(os.path.join(d.pw_dir, "counts")) as f:
        counts = [int(x) for x in f.read().split()]
    assert len(counts) == 8
    assert max(counts) == 2, counts          # in parallel, and never more than 2
    assert not re.search(r"status: local [3-9]/2", q.log())


@needs_root
def test_qrm_removes_without_bounce(qroot):
    a = user("sa", qroot)
    user("sb", qroot, {"never": "|echo later; exit 111\n"})
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-never@%s" % ME)
    [msgid] = q.wait_log(r"new msg (\d+)")
    q.wait_log(r"delivery \d+: deferral")
    r = qroot.run("qpy-qrm", qroot.path, msgid)
    assert r.returncode == 0, r.stderr
    q.wait_log(r"remove msg %s by qpy-qrm" % msgid)
    assert wait_for(lambda: queue_empty(qroot), 30)
    assert os.listdir(os.path.join(qroot.paths.queue, "rm")) == []
    time.sleep(0.5)
    assert bounces(a) == [] and "bounce msg" not in q.log()


@needs_root
def test_sigterm_waits_for_deliveries_in_flight(qroot):
    user("sa", qroot)
    b = user("sb", qroot, {"slow": "|sleep 2\n./Maildir/\n"})
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-slow@%s" % ME)
    q.wait_log(r"starting delivery \d+: msg \d+ to local qtsb-slow")
    assert q.stop() == 0
    log = q.log()
    assert "status: exiting" in log and "stopped" in log
    # the delivery in flight finished and was recorded before queue-send exited
    assert log.index("delivery 1: success") < log.index("status: exiting")
    assert len(maildir_messages(b)) == 1
    assert queue_empty(qroot)
    for prog in ("queue-send", "lspawn", "clean", "pickup"):
        assert q.pid(prog) is None


@needs_root
def test_uids_and_titles_of_the_send_group(qpy, qroot):
    want = {"queue-send": "qpys", "clean": "qpyq", "lspawn": "root", "pickup": "qpyq"}
    if os.path.exists(qroot.bin("qpy-rspawn")):
        want["rspawn"] = "qpyr"
    for prog, name in want.items():
        p = psutil.Process(qpy.pid(prog))
        uid = pwd.getpwnam(name).pw_uid        # the preamble drops right after the exec
        assert wait_for(lambda p=p, uid=uid: p.uids() == (uid, uid, uid), 10), (prog, p.uids())
        # lspawn stays root: its uid matches at once, before the preamble names it
        assert wait_for(lambda p=p, prog=prog: p.cmdline()[0].split()[0] == "qpy-" + prog,
                        10), (prog, p.cmdline())
        assert set(p.environ()) <= {"QPY_ROOT", "PATH", "LC_CTYPE"}, p.environ()
        with open(os.path.join(qroot.paths.run, prog + ".pid"), "rb"):
            pass
        assert os.stat(os.path.join(qroot.paths.run, prog + ".pid")).st_uid == 0


@needs_root
def test_restart_after_kill_of_each_part(qroot):
    a = user("sa", qroot)
    q = Qpy(qroot)
    for prog in ("lspawn", "clean", "queue-send"):
        time.sleep(2.2)     # past qpy-start's crash-loop window: restarted after 1 s
        old = q.pid(prog)
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda prog=prog, old=old: q.pid(prog) not in (None, old), 30), q.log()
        assert wait_for(lambda: q.pid("queue-send") and q.pid("lspawn") and q.pid("clean"), 30)
    sendmail(qroot, "qtsa@%s" % ME, "qtsa@%s" % ME)
    assert wait_for(lambda: maildir_messages(a), 30), q.log()
    assert "restarting in" in q.log()


# --- crash safety ----------------------------------------------------------------
def _seqs(pw) -> dict[int, int]:
    seen: dict[int, int] = {}
    md = mailbox.Maildir(os.path.join(pw.pw_dir, "Maildir"), factory=None, create=False)
    for k in md.keys():
        m = re.search(rb"^X-Seq: (\d+)$", md.get_bytes(k), re.M)
        if m:
            seen[int(m.group(1))] = seen.get(int(m.group(1)), 0) + 1
    return seen


@needs_root
@pytest.mark.slow
def test_crash_safety_kill9_during_delivery(qroot):
    """N messages to 5 users; kill -9 queue-send, lspawn or a delivery child at random."""
    from qpy.inject.drop import inject
    users = [user("sk%d" % i, qroot) for i in range(5)]
    rcpts = [b"%s@%s" % (u.pw_name.encode(), ME.encode()) for u in users]
    q = Qpy(qroot)
    up = time.monotonic()
    # hold deliveries until the group has run 2 s (qpy-start backs off restarts of a
    # part that dies sooner): the first kills must find work in flight, however fast
    # delivery is
    os.kill(q.pid("lspawn"), signal.SIGSTOP)
    for n in range(CRASH_MESSAGES):
        inject(qroot.path, b"X-Seq: %d\nSubject: crash %d\n\nbody %d\n" % (n, n, n),
               b"qtsa@test.example", rcpts)
    time.sleep(max(0.0, up + 2.2 - time.monotonic()))
    os.kill(q.pid("lspawn"), signal.SIGCONT)
    rng = random.Random(1234)
    kills = {"qpy-local": 0, "queue-send": 0, "lspawn": 0, "clean": 0}
    deadline = time.monotonic() + 240
    turn = 0

    def all_there() -> bool:
        return all(len(_seqs(u)) == CRASH_MESSAGES for u in users)

    group = ["queue-send", "lspawn", "clean"]
    next_group_kill = time.monotonic()      # the group is up for 2 s already
    while not all_there() and time.monotonic() < deadline:
        time.sleep(0.2 + rng.random() * 0.5)
        # a delivery child: often, at random moments
        kids = []
        try:      # only this test's delivery children: other tests may run beside it
            kids = [p for p in psutil.Process(q.pid("lspawn")).children(recursive=True)
                    if (p.cmdline() or [""])[0].startswith("qpy-local")]
        except (psutil.Error, TypeError, ValueError):
            pass
        if kids:
            try:
                os.kill(rng.choice(kids).pid, signal.SIGKILL)
                kills["qpy-local"] += 1
            except ProcessLookupError:
                pass
        # a part of the send group, each in turn, once it has run 2 s (qpy-start backs
        # off restarts of a part that dies sooner, as a crash loop)
        if time.monotonic() >= next_group_kill:
            what = group[turn % len(group)]
            old = {g: q.pid(g) for g in group}
            if all(old.values()):
                turn += 1
                os.kill(old[what], signal.SIGKILL)
                kills[what] += 1

                def restarted(old=old) -> bool:
                    return all(q.pid(g) not in (None, old[g]) for g in group)
                assert wait_for(restarted, 60), q.log()[-3000:]
                next_group_kill = time.monotonic() + 2.1 + rng.random()
        q.signal(signal.SIGALRM)        # retry the deferred (killed) deliveries now
    for _ in range(20):
        if all_there():
            break
        q.signal(signal.SIGALRM)
        time.sleep(2)
    seqs = [_seqs(u) for u in users]
    if os.environ.get("QPY_CRASH_LOG"):       # keep the merged log for a look at it
        with open(os.environ["QPY_CRASH_LOG"], "w") as f:
            f.write(q.log())
    missing = sum(CRASH_MESSAGES - len(s) for s in seqs)
    dups = sum(c - 1 for s in seqs for c in s.values())
    print("\ncrash test: %d messages x 5 users, kills %s, duplicates %d, missing %d"
          % (CRASH_MESSAGES, kills, dups, missing))
    assert missing == 0, q.log()[-5000:]
    assert kills["qpy-local"] >= 1 and kills["queue-send"] >= 1
    # what was deferred by a killed delivery (perhaps after it wrote the mail) is
    # retried and the queue empties
    for _ in range(120):
        if queue_empty(qroot):
            break
        q.signal(signal.SIGALRM)
        time.sleep(0.5)
    assert queue_empty(qroot), os.listdir(qroot.paths.state)[:10]
    assert "Traceback" not in q.log()
    # SIGALRMs forwarded while queue-send was starting never killed it
    assert "killed by signal %d" % signal.SIGALRM not in q.log()


# --- qpy-clean and the state file on their own ------------------------------------
def _queue_owner(name: str) -> tuple[int, int]:
    """uid and gid of a queue user: the system user as root, else this one-user root's."""
    if not qpytest.IS_ROOT:
        return os.getuid(), os.getgid()
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def test_clean_refuses_what_is_not_an_id(qroot):
    p = qroot.paths
    for d in (p.mess, p.todo):
        with open(os.path.join(d, "123"), "w"):
            pass
        os.chown(os.path.join(d, "123"), *_queue_owner("qpyq"))
    victim = os.path.join(os.path.dirname(qroot.path), "victim")
    with open(victim, "w"):
        pass
    req = (b"../../victim\n0123\n12a\n\n" + b"9" * 5000 + b"\n" + "١٢".encode() + b"\n"
           b"123\n")
    r = qroot.run("qpy-clean", input=req)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(b"\n")[:-1] == [b"x", b"x", b"x", b"x", b"x", b"x", b"+"]
    assert os.path.exists(victim)
    assert not os.path.exists(os.path.join(p.mess, "123"))
    assert not os.path.exists(os.path.join(p.todo, "123"))


def test_state_file_torn_record_and_done_stays_done(tmp_path):
    from qpy.common.state import MessageState, RecipientState
    ms = MessageState("17", 1000, 12, 0, 5, b"s@x.org",
                      [RecipientState(b"a@x.org", "local", b"a@x.org"),
                       RecipientState(b"b@y.org", "remote", b"b@y.org"),
                       RecipientState(b"c@x.org", "local", b"pre-c@x.org")])
    sf = StateFile(str(tmp_path), "17")
    sf.create(ms)
    sf.done(0)
    sf.deferred(1, 5000, "try\tlater\n")
    sf.failed(2, "no")
    sf.bounced([2])
    sf.deferred(0, 9, "late report")          # done stays done
    with open(sf.path, "ab") as f:
        f.write(b"K\t1")                      # torn: no LF, never fsync'd as a record
    st = read_state(sf.path)
    assert [r.state for r in st.recipients] == ["done", "deferred", "bounced"]
    assert st.recipients[1].next_try == 5000 and st.recipients[1].error == "try_later_"
    assert st.recipients[2].delivery_address == b"pre-c@x.org"
    assert not st.recipients[2].bounce_owed and st.sender == b"s@x.org"
    sf.repair()
    sf.done(1)
    assert [r.state for r in read_state(sf.path).recipients] == ["done", "done", "bounced"]
    assert read_state(sf.path).finished()


@needs_root
def test_one_user_mode(qroot):
    """A root installed by a plain user: qpy-start runs everything as that user."""
    home = os.path.join(os.path.dirname(qroot.path), "home-sou")
    pw = qpytest.make_user("sou", home)
    root = os.path.join(home, "root")
    r = qroot.run("qpy-install", root, "--me", ME, user=pw.pw_name)
    assert r.returncode == 0, r.stderr
    logpath = os.path.join(home, "start.log")
    with open(logpath, "wb") as log:
        p = subprocess.Popen(["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                              "--init-groups", "--", qroot.bin("qpy-start"), root],
                             stdout=log, stderr=subprocess.STDOUT,
                             env={"PATH": "/usr/bin:/bin"})
    try:
        run = os.path.join(root, "queue", "run")
        progs = ("queue-send", "clean", "lspawn", "pickup")
        assert wait_for(lambda: all(os.path.exists(os.path.join(run, n + ".pid"))
                                    for n in progs), 30)
        for n in progs:
            with open(os.path.join(run, n + ".pid")) as f:
                proc = psutil.Process(int(f.read()))
            assert proc.uids().real == pw.pw_uid, n
        r = qroot.run("qpy-sendmail", "postmaster@%s" % ME, input=b"Subject: ou\n\nhi\n",
                      env={"QPY_ROOT": root}, user=pw.pw_name)
        assert r.returncode == 0, r.stderr

        def text() -> str:
            with open(logpath, "rb") as f:
                return f.read().decode()
        assert wait_for(lambda: re.search(r"end msg \d+", text()), 30), text()
        assert "one-user mode" in text()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=90) == 0


@needs_root
def test_new_mail_is_read_while_deliveries_block(qroot):
    """A delivery that hangs (and a full local channel) never stops preprocessing."""
    a = user("sa", qroot)
    b = user("sb", qroot, {"hold": "|while [ ! -e go ]; do sleep 0.1; done\n./Maildir/\n"})
    qroot.control("concurrencylocal", "1")
    q = Qpy(qroot)
    go = os.path.join(b.pw_dir, "go")
    try:
        _hold_and_inject(q, qroot, a, b, go)
    finally:
        with open(go, "w"):     # never leave the held delivery running
            pass


def _hold_and_inject(q, qroot, a, b, go) -> None:
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-hold@%s" % ME)
    q.wait_log(r"starting delivery 1: msg \d+ to local qtsb-hold")
    for i in range(10):
        sendmail(qroot, "qtsa@%s" % ME, "qtsa@%s" % ME, body="n%d\n" % i)
    q.wait_log(r"new msg \d+", count=11)       # all read while delivery 1 hangs
    assert not re.search(r"queue-send: delivery 1: ", q.log())
    qpid = q.pid("queue-send")
    os.kill(qpid, signal.SIGUSR1)
    q.wait_log(r"status: local 1/1 remote 0/20", count=2)
    q.wait_log(r"info: 11 messages queued")       # the held one and 10 waiting for the slot
    with open(go, "w"):
        pass
    q.wait_log(r"delivery 1: success")
    assert wait_for(lambda: len(maildir_messages(a)) == 10 and len(maildir_messages(b)) == 1,
                    30), q.log()


@needs_root
def test_bounce_that_cannot_be_injected_is_retried(qroot):
    a = user("sa", qroot)
    user("sb", qroot, {"fail": "|echo nope; exit 100\n"})
    q = Qpy(qroot)
    drop = qroot.paths.drop
    mode = os.stat(drop).st_mode & 0o7777
    os.chmod(drop, 0o3700)           # only qpyq (and root) can create a drop file now
    try:
        sendmail(qroot, "qtsa@%s" % ME, "qtsb-fail@%s" % ME)   # root can still inject
        q.wait_log(r"trouble injecting bounce message, will try later")
        assert bounces(a) == [] and os.listdir(qroot.paths.state)
    finally:
        os.chmod(drop, mode)
    q.signal(signal.SIGALRM)
    assert wait_for(lambda: bounces(a), 30), q.log()
    assert wait_for(lambda: queue_empty(qroot), 30)


@needs_root
def test_without_rspawn_remote_mail_waits(qroot):
    """qpy-start skips a missing qpy-rspawn; remote recipients stay queued, deferred."""
    import shutil
    bindir = os.path.join(os.path.dirname(qroot.path), "bin")
    os.mkdir(bindir)
    os.chmod(bindir, 0o755)
    for name in os.listdir(qpytest.BIN):
        if name != "qpy-rspawn":
            shutil.copy2(os.path.join(qpytest.BIN, name), bindir)   # launchers find
    a = user("sa", qroot)                                          # their siblings here
    logpath = os.path.join(os.path.dirname(qroot.path), "norspawn.log")
    with open(logpath, "wb") as log:
        p = subprocess.Popen([os.path.join(bindir, "qpy-start"), qroot.path], stdout=log,
                             stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})

    def text() -> str:
        with open(logpath, "rb") as f:
            return f.read().decode()
    try:
        assert wait_for(lambda: "qpy-rspawn is missing" in text(), 30), text()
        sendmail(qroot, "qtsa@%s" % ME, "someone@remote.example", "qtsa@%s" % ME)
        assert wait_for(lambda: maildir_messages(a), 30), text()
        assert wait_for(lambda: "no qpy-rspawn connection" in text(), 30), text()
        r = qroot.run("qpy-qread", qroot.path)
        assert wait_for(lambda: re.search(
            r"deferred\s+remote\s+<someone@remote.example>\s+next .*qpy-rspawn is not running",
            qroot.run("qpy-qread", qroot.path).stdout.decode()), 30), r.stdout
        assert "starting delivery 2" not in text() and bounces(a) == []
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=90) == 0


@needs_root
def test_bounce_of_a_big_message_returns_its_header_only(qroot):
    a = user("sa", qroot)
    user("sb", qroot, {"fail": "|exit 100\n"})
    q = Qpy(qroot)
    big = ("line of a big message %d\n" % 0) * 12000            # about 300 kB
    sendmail(qroot, "qtsa@%s" % ME, "qtsb-fail@%s" % ME, body=big,
             headers="Subject: big one\nX-Marker: kept\n")
    assert wait_for(lambda: bounces(a), 30), q.log()
    [bnc] = bounces(a)
    parts = bnc.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    headers = parts[2].get_payload()
    assert "X-Marker: kept" in headers and "Subject: big one" in headers
    assert "line of a big message" not in bnc.as_string()
    assert len(bnc.as_bytes()) < 20000


# --- state/ID only for a message that outlives its first pass (issue 7) -----------
def _write_queue_files(qroot, msgid: str, body: bytes | None, rcpts: list[bytes],
                       qp: int = 9) -> None:
    """mess/ID (unless body is None) and todo/ID by hand, with pickup's owners and modes."""
    from qpy.common import envelope
    from qpy.common.queue import todo_encode
    p = qroot.paths
    todo = todo_encode(int(time.time()), 0, len(body or b""),
                       envelope.encode(b"qtsa@%s" % ME.encode(), rcpts), qp)
    files = [(os.path.join(p.todo, msgid), todo)]
    if body is not None:
        files.append((os.path.join(p.mess, msgid), body))
    for path, data in files:
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, _queue_owner("qpyq")[0], _queue_owner("qpys")[1])
        os.chmod(path, 0o640)


@needs_root
def test_first_pass_success_creates_no_state_file(qroot):
    """One recipient delivered on the first try: state/ID is never created (inotify
    sees every creation in state/, however short-lived)."""
    import pyinotify
    pw = user("sa", qroot)
    q = Qpy(qroot)
    created: list[str] = []
    wm = pyinotify.WatchManager()
    notifier = pyinotify.Notifier(wm, lambda e: created.append(e.pathname), timeout=10)
    wm.add_watch(qroot.paths.state, pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO)
    try:
        for n in range(3):
            sendmail(qroot, "qtsa@%s" % ME, "qtsa@%s" % ME, body="first pass %d\n" % n)
        q.wait_log(r"end msg \d+", count=3)
        assert wait_for(lambda: queue_empty(qroot), 30), q.log()
        while notifier.check_events():
            notifier.read_events()
            notifier.process_events()
    finally:
        notifier.stop()
    assert len(maildir_messages(pw)) == 3
    assert created == [], created


@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="no strace")
def test_queue_send_fsyncs_nothing_for_first_pass_successes(qroot, tmp_path):
    """The fsyncs of qpy-queue-send itself, counted with strace attached to it."""
    pw = user("sa", qroot)
    q = Qpy(qroot)
    out, err = str(tmp_path / "strace.out"), tmp_path / "strace.err"
    with open(err, "wb") as errf:
        tracer = subprocess.Popen(["strace", "-e", "trace=fsync,fdatasync,syncfs", "-o", out,
                                   "-p", str(q.pid("queue-send"))], stderr=errf)
    try:
        if not wait_for(lambda: b"attached" in err.read_bytes(), 10):
            pytest.skip("strace cannot attach here: %s" % err.read_bytes()[-300:])
        for n in range(5):
            sendmail(qroot, "qtsa@%s" % ME, "qtsa@%s" % ME, body="counted %d\n" % n)
        q.wait_log(r"end msg \d+", count=5)
    finally:
        tracer.send_signal(signal.SIGINT)       # detach; the trace is complete then
        tracer.wait(timeout=30)
    assert len(maildir_messages(pw)) == 5
    with open(out) as f:
        calls = [ln for ln in f if re.match(r"(fsync|fdatasync|syncfs)\(", ln)]
    assert calls == [], calls


@needs_root
def test_deferral_in_first_pass_persists_done_and_deferred(qroot):
    """Two recipients, one delivered and one deferred: state/ID gets the K of the
    delivered one and the Z, todo/ID goes; the retry ends the message."""
    a = user("sa", qroot)
    b = user("sb", qroot, {"flaky": "|if [ -e flag ]; then exit 0; fi; touch flag; "
                                    "sleep 1; echo not yet; exit 111\n./Maildir/\n"})
    q = Qpy(qroot)
    sendmail(qroot, "qtsa@%s" % ME, "qtsa@%s" % ME, "qtsb-flaky@%s" % ME)
    [msgid] = q.wait_log(r"new msg (\d+)")
    q.wait_log(r"delivery \d+: deferral: not yet")
    state = os.path.join(qroot.paths.state, msgid)

    def states() -> list[str] | None:
        try:
            return [r.state for r in read_state(state).recipients]
        except (OSError, StateError):
            return None
    # the K usually comes first (the deferral sleeps 1 s) and goes into the head
    assert wait_for(lambda: states() == ["done", "deferred"], 30), (states(), q.log())
    with open(state, "rb") as f:
        records = f.read().split(b"\nE\n", 1)[1].splitlines()
    assert b"K\t0" in records and [r for r in records if r.startswith(b"Z\t1\t")], records
    assert not os.path.exists(os.path.join(qroot.paths.todo, msgid))
    assert len(maildir_messages(a)) == 1 and maildir_messages(b) == []
    q.signal(signal.SIGALRM)
    q.wait_log(r"end msg %s" % msgid)
    assert wait_for(lambda: queue_empty(qroot), 30), q.log()
    # qtsa not delivered again
    assert len(maildir_messages(a)) == 1 and len(maildir_messages(b)) == 1


@needs_root
def test_todo_without_mess_is_removed_at_start(qroot):
    """qpy-clean removes mess/ID, then todo/ID: a crash between the two leaves a
    todo/ID that queue-send removes at start, delivering and bouncing nothing."""
    a = user("sa", qroot)
    msgid = "1700000000000002"
    _write_queue_files(qroot, msgid, None, [b"qtsa@%s" % ME.encode()])
    q = Qpy(qroot)
    q.wait_log(r"warning: todo/%s has no mess/%s: finished before a crash; removing it"
               % (msgid, msgid))
    assert wait_for(lambda: queue_empty(qroot), 30), q.log()
    time.sleep(0.5)
    log = q.log()
    assert "new msg" not in log and "starting delivery" not in log
    assert "bounce msg" not in log and maildir_messages(a) == []
    assert q.stop() == 0


def _queue_send(qroot, monkeypatch):
    """A QueueSend in this process: no spawners, qpy-clean's handler called directly."""
    from qpy.queue import clean
    from qpy.send.queue_send import QueueSend
    monkeypatch.setattr(QueueSend, "_sock", staticmethod(lambda fd: None))
    qs = QueueSend(qroot.path)
    os.makedirs(qs.rmdir, exist_ok=True)
    monkeypatch.setattr(qs, "clean_request",
                        lambda msgid: clean.handle(qs.paths, msgid.encode()))
    return qs


def _in_flight(qs, msgid: str, indexes: list[int]) -> int:
    """Pretend the local spawner took a delivery of these recipients: its number."""
    from qpy.send.deliver import LOCAL, Delivery
    qs.dnum += 1
    qs.deliveries[qs.dnum] = Delivery(msgid, LOCAL, indexes, False)
    qs.msgs[msgid].inflight.update(indexes)
    qs.busy[LOCAL] += 1
    return qs.dnum


def test_queue_send_records_only_what_outlives_the_first_pass(qroot, monkeypatch, capfd):
    from qpy.common.state import encode_head
    qs = _queue_send(qroot, monkeypatch)
    p = qroot.paths
    one, two, gone = "1700000000000011", "1700000000000012", "1700000000000013"
    body = b"Received: (qpy 7 invoked by uid 0); 1 Jan 2026 00:00:00 -0000\n\nhi\n"
    _write_queue_files(qroot, one, body, [b"x@%s" % ME.encode()])
    _write_queue_files(qroot, two, body, [b"x@%s" % ME.encode(), b"y@%s" % ME.encode()])
    _write_queue_files(qroot, gone, None, [b"x@%s" % ME.encode()])
    qs.scan_todo()
    while qs.todo:
        qs.preprocess(qs.todo.popleft())
    assert sorted(qs.msgs) == [one, two] and not os.path.exists(os.path.join(p.todo, gone))
    assert os.listdir(p.state) == [] and all(m.backed_by_todo for m in qs.msgs.values())
    qs.scan_todo()                       # todo/ID of a message taken in is not new again
    assert not qs.todo
    # one recipient, delivered: qpy-clean removes it; state/ID never existed
    qs.result(_in_flight(qs, one, [0]), [(b"K", b"ok")])
    assert one not in qs.msgs and os.listdir(p.state) == []
    assert not os.path.exists(os.path.join(p.mess, one))
    assert not os.path.exists(os.path.join(p.todo, one))
    # two recipients, the first delivered: head and its K in one write; todo/ID goes
    d0, d1 = _in_flight(qs, two, [0]), _in_flight(qs, two, [1])
    qs.result(d0, [(b"K", b"ok")])
    m = qs.msgs[two]
    with open(os.path.join(p.state, two), "rb") as f:
        assert f.read() == encode_head(m.st, [0])
    assert not m.backed_by_todo and not os.path.exists(os.path.join(p.todo, two))
    qs.result(d1, [(b"Z", b"busy")])
    assert [r.state for r in read_state(os.path.join(p.state, two)).recipients] == \
        ["done", "deferred"]
    log = capfd.readouterr().err
    assert "todo/%s has no mess/%s: finished before a crash; removing it" % (gone, gone) in log
    assert "end msg %s" % one in log and "new msg %s" % gone not in log
    # the qp comes from the todo record (9), not from mess/ID's Received: line (7)
    assert "info msg %s: bytes %d from <qtsa@%s> qp 9 uid 0" % (one, len(body), ME) in log


def test_queue_send_removes_a_todo_backed_message_without_state(qroot, monkeypatch):
    qs = _queue_send(qroot, monkeypatch)
    p = qroot.paths
    msgid = "1700000000000021"
    _write_queue_files(qroot, msgid, b"\nhi\n", [b"x@%s" % ME.encode(), b"y@%s" % ME.encode()])
    qs.scan_todo()
    qs.preprocess(qs.todo.popleft())
    d = _in_flight(qs, msgid, [0])
    with open(os.path.join(qs.rmdir, msgid), "wb"):
        pass
    qs.check_rm()                        # in flight: removed once its result is in
    assert msgid in qs.msgs
    qs.result(d, [(b"K", b"ok")])
    assert msgid not in qs.msgs
    assert os.listdir(p.state) == [] and os.listdir(qs.rmdir) == []
    assert not os.path.exists(os.path.join(p.mess, msgid))
    assert not os.path.exists(os.path.join(p.todo, msgid))


def test_queue_send_persists_a_finished_message_whose_clean_up_fails(qroot, monkeypatch):
    """The K's of a todo-backed message must not wait in memory for a clean-up retry."""
    from qpy.common.state import encode_head
    qs = _queue_send(qroot, monkeypatch)
    p = qroot.paths
    msgid = "1700000000000031"
    _write_queue_files(qroot, msgid, b"\nhi\n", [b"x@%s" % ME.encode()])
    qs.scan_todo()
    qs.preprocess(qs.todo.popleft())
    works = qs.clean_request
    monkeypatch.setattr(qs, "clean_request", lambda msgid: b"!mess/%s: I/O error" % msgid.encode())
    qs.result(_in_flight(qs, msgid, [0]), [(b"K", b"ok")])
    m = qs.msgs[msgid]
    with open(os.path.join(p.state, msgid), "rb") as f:
        assert f.read() == encode_head(m.st, [0])
    assert not os.path.exists(os.path.join(p.todo, msgid)) and msgid in qs.retrying
    monkeypatch.setattr(qs, "clean_request", works)
    qs.retry_failed(float("inf"))
    assert msgid not in qs.msgs and os.listdir(p.state) == []
    assert not os.path.exists(os.path.join(p.mess, msgid))


def test_queue_send_leaves_todo_alone_while_an_unusable_state_file_is_in_the_way(
        qroot, monkeypatch, capfd):
    qs = _queue_send(qroot, monkeypatch)
    p = qroot.paths
    msgid = "1700000000000041"
    _write_queue_files(qroot, msgid, b"\nhi\n", [b"x@%s" % ME.encode()])
    os.mkdir(os.path.join(p.state, msgid))          # cannot be read as a state file
    qs.scan_todo()
    qs.preprocess(qs.todo.popleft())
    assert msgid not in qs.msgs and os.path.exists(os.path.join(p.todo, msgid))
    assert "unable to take in todo/%s: state/%s exists and is unusable" % (msgid, msgid) \
        in capfd.readouterr().err


def test_state_file_refuses_records_before_it_exists(tmp_path):
    sf = StateFile(str(tmp_path), "17", exists=False)
    for record in (lambda: sf.done(0), lambda: sf.deferred(0, 1, "x"),
                   lambda: sf.failed(0, "x"), lambda: sf.bounced([0])):
        with pytest.raises(RuntimeError):
            record()
    assert os.listdir(tmp_path) == []


@needs_root
def test_torn_state_head_is_rebuilt_from_todo(qroot):
    """A crash while queue-send wrote a state head (O_EXCL, one fsync, no directory
    fsync) leaves todo/ID and a torn state/ID: the message is still delivered, once."""
    from qpy.common import envelope
    from qpy.common.queue import todo_encode
    pw = user("sh", qroot)
    p = qroot.paths
    msgid = "1700000000000001"
    body = b"Received: (qpy 1 invoked by uid 0); 1 Jan 2026 00:00:00 -0000\n" \
           b"Subject: torn\n\ntorn head body\n"
    todo = todo_encode(int(time.time()), 0, len(body),
                       envelope.encode(b"a@%s" % ME.encode(), [b"qtsh@%s" % ME.encode()]))
    qpyq, qpys = pwd.getpwnam("qpyq"), pwd.getpwnam("qpys")
    for path, data, owner, mode in (
            (os.path.join(p.mess, msgid), body, qpyq, 0o640),
            (os.path.join(p.todo, msgid), todo, qpyq, 0o640),
            # half a head: the fsync never returned, so todo/ID was never unlinked
            (os.path.join(p.state, msgid), b"QPYSTATE1\t%s\t17" % msgid.encode(), qpys,
             0o600)):
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, owner.pw_uid, qpys.pw_gid)
        os.chmod(path, mode)
    q = Qpy(qroot)
    q.wait_log(r"state/%s torn .*rebuilding it from todo/%s" % (msgid, msgid))
    assert wait_for(lambda: queue_empty(qroot), 30), q.log()
    [m] = maildir_messages(pw)
    assert "torn head body" in m.get_content()
    q.stop()


# --- the retry schedule and the clean-up protocol on their own ----------------------
def test_retry_schedule_is_qmails_with_a_last_try_at_the_end_of_the_lifetime():
    from qpy.common.state import LOCAL, REMOTE
    from qpy.send.schedule import dying, next_try
    birth, week = 1_000_000, 7 * 86400
    assert next_try(birth, birth, LOCAL, week) == birth + 100           # (0 + 10)^2
    assert next_try(birth, birth, REMOTE, week) == birth + 400          # (0 + 20)^2
    assert next_try(birth, birth + 400, REMOTE, week) == birth + 40 ** 2
    assert next_try(birth, birth + 9999, LOCAL, week) == birth + (99 + 10) ** 2
    # the try that would fall past the lifetime is moved to its end, once
    late = birth + week - 10
    assert next_try(birth, late, REMOTE, week) == birth + week
    assert not dying(birth, late, week) and dying(birth, birth + week, week)
    after = next_try(birth, birth + week, REMOTE, week)
    assert after > birth + week                                         # no end in sight
    for now in range(birth, birth + 3 * week, 3607):                    # always later
        assert next_try(birth, now, LOCAL, week) > now


def test_clean_protocol_framing():
    """Replies in order, an endless line refused once and skipped, a lost peer noticed."""
    from qpy.common import cleanreq
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"17\n" + b"9" * 5000 + b"\nx\n18\n")
    os.close(w1)
    seen: list[bytes] = []

    def handle(line: bytes) -> bytes:
        seen.append(line)
        return cleanreq.OK if line.isdigit() else cleanreq.REFUSED
    assert cleanreq.serve(r1, w2, handle) == 0
    os.close(w2)
    with os.fdopen(r2, "rb") as f:
        assert f.read() == b"+\nx\nx\n+\n"
    assert seen == [b"17", b"x", b"18"]
    # the asking side: one request, its reply; a closed peer is CleanLost
    r3, w3 = os.pipe()
    r4, w4 = os.pipe()
    os.write(w4, b"!mess/19: I/O error\n")
    assert cleanreq.ask(w3, r4, "19") == b"!mess/19: I/O error"
    assert os.read(r3, 100) == b"19\n"
    os.close(w4)
    with pytest.raises(cleanreq.CleanLost):
        cleanreq.ask(w3, r4, "20")
    for fd in (r3, w3, r4):
        os.close(fd)
