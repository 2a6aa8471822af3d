"""The queue's front door: qpy-queue-inject, qpy-sendmail, qpy-inject, qpy-pickup, qpy-install.

Real programs, real files, real uids (as root)."""

from __future__ import annotations

import os
import pwd
import random
import re
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import qpytest
from qpytest import needs_root, wait_for

from qpy.common import dropfile, envelope
from qpy.common.queue import todo_decode, todo_encode


def queue_inject(qroot, message: bytes, env_bytes: bytes, user: str | None = None,
                 extra_env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run qpy-queue-inject with the message on fd 0 and the envelope on fd 1."""
    r, w = os.pipe()
    os.write(w, env_bytes)
    os.close(w)
    cmd = [qroot.bin("qpy-queue-inject")]
    if user:
        pw = pwd.getpwnam(user)
        cmd = ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
               "--init-groups", "--"] + cmd
    try:
        return subprocess.run(cmd, input=message, stdout=r, stderr=subprocess.PIPE,
                              env=qroot.env(extra_env), timeout=timeout)
    finally:
        os.close(r)


def queued_messages(qroot) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(qroot.paths.mess):
        with open(os.path.join(qroot.paths.mess, name), "rb") as f:
            out[name] = f.read()
    return out


def todo_ready(qroot) -> list[str]:
    return [n for n in os.listdir(qroot.paths.todo) if n.isdigit()]


def start_pickup(qroot):
    """Start pickup with its log in a file (a pipe nobody reads would block it)."""
    log = open(os.path.join(os.path.dirname(qroot.path), "pickup.log"), "ab")
    return qroot.start("qpy-pickup", stdout=log)


def pickup_log(qroot) -> str:
    with open(os.path.join(os.path.dirname(qroot.path), "pickup.log"), "rb") as f:
        return f.read().decode()


def drop_empty(qroot) -> bool:
    return not os.listdir(qroot.paths.drop)


def put(path: str, data: bytes) -> None:
    """A queue file as pickup would leave it: qpyq's, mode 0640."""
    qpyq = pwd.getpwnam("qpyq")
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, qpyq.pw_uid, qpyq.pw_gid)
    os.chmod(path, 0o640)


# --- qpy-queue-inject: qmail-queue's interface and exit codes ---------------------

def test_queue_inject_writes_one_drop_file(qroot):
    msg = b"Subject: t\n\nbody\n"
    r = queue_inject(qroot, msg, envelope.encode(b"a@x.example", [b"b@test.example"]))
    assert r.returncode == 0, r.stderr
    names = os.listdir(qroot.paths.drop)
    assert len(names) == 1 and dropfile.is_final_name(names[0])
    with open(os.path.join(qroot.paths.drop, names[0]), "rb") as f:
        data = f.read()
    assert data.startswith(dropfile.MAGIC)     # written in the current format
    assert qpytest.split_drop(data) == (msg, b"a@x.example", [b"b@test.example"])
    assert stat.S_IMODE(os.stat(os.path.join(qroot.paths.drop, names[0])).st_mode) == 0o640


@pytest.mark.parametrize("env_bytes,code", [
    (b"Xa@b\0\0", 91),                          # does not start with F
    (b"Fa@b\0Xc@d\0\0", 91),                    # record that is not T
    (b"Fa@b\0Tc@d\0", 54),                      # no final NUL: truncated
    (b"Fa@b", 54),                              # truncated in the sender
    (b"", 54),                                  # no envelope at all
    (b"Fa@b\0T" + b"x" * 1100 + b"@d\0\0", 11),  # address too long
    (b"Fa@b\0Tc\n@d\0\0", 91),                  # control character in an address
    (b"Fa@b\0Tc@d\0\0junk", 91),                # bytes after the end
])
def test_queue_inject_refuses_bad_envelopes(qroot, env_bytes, code):
    r = queue_inject(qroot, b"Subject: x\n\nx\n", env_bytes)
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith(b"qpy-queue-inject: ")
    assert os.listdir(qroot.paths.drop) == []


def test_queue_inject_databytes(qroot):
    qroot.control("databytes", "1000")
    r = queue_inject(qroot, b"x" * 1001, envelope.encode(b"", [b"a@b.example"]))
    assert r.returncode == 31
    assert b"databytes" in r.stderr
    assert os.listdir(qroot.paths.drop) == []
    r = queue_inject(qroot, b"x" * 1000, envelope.encode(b"", [b"a@b.example"]))
    assert r.returncode == 0


def test_queue_inject_malformed_databytes(qroot):
    qroot.control("databytes", "lots")
    r = queue_inject(qroot, b"x\n", envelope.encode(b"", [b"a@b.example"]))
    assert r.returncode == 55 and b"control/databytes is malformed" in r.stderr, r.stderr
    assert os.listdir(qroot.paths.drop) == []


def test_queue_inject_timeout_on_slow_input(qroot):
    """A writer that never closes the message pipe: exit 52, nothing left behind."""
    rm, wm = os.pipe()
    re_, we = os.pipe()
    p = subprocess.Popen([qroot.bin("qpy-queue-inject")], stdin=rm, stdout=re_,
                         stderr=subprocess.PIPE, env=qroot.env({"QPY_INJECT_TIMEOUT": "2"}))
    os.close(rm)
    os.close(re_)
    os.write(wm, b"Subject: slow\n")
    try:
        assert p.wait(timeout=20) == 52
    finally:
        os.close(wm)
        os.close(we)
    assert b"timeout" in p.stderr.read()
    assert os.listdir(qroot.paths.drop) == []


# --- front ends --------------------------------------------------------------------

def run_pickup_until_empty(qroot):
    p = start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot), 60), "pickup did not empty drop/"
    return p


def only_message(qroot) -> bytes:
    msgs = queued_messages(qroot)
    assert len(msgs) == 1
    return next(iter(msgs.values()))


def test_sendmail_adds_headers_and_keeps_body(qroot):
    body = b"line one\n" + bytes(range(256)).replace(b"\n", b"") + b"\n" + b"y" * 998 + \
        b"\nlast line without newline"
    r = qroot.run("qpy-sendmail", "-i", "-f", "sender@x.example", "-F", "Ann Smith", "rcpt",
                  input=b"Subject: s\n\n" + body)
    assert r.returncode == 0, r.stderr
    run_pickup_until_empty(qroot)
    m = only_message(qroot)
    head, _, got = m.partition(b"\n\n")
    assert got == body
    (todo_id,) = todo_ready(qroot)
    assert re.search(rb"^Received: \(qpy \d+ invoked by uid \d+\) id %s; \d+ \w{3} \d{4} "
                     % todo_id.encode(), head, re.M), head
    assert b"\nFrom: Ann Smith <" in head and b"\nDate: " in head and b"\nMessage-ID: <" in head
    todo = todo_id
    with open(os.path.join(qroot.paths.todo, todo), "rb") as f:
        t = todo_decode(f.read())
        size, env = t.size, t.env
    assert envelope.decode(env) == (b"sender@x.example", [b"rcpt@test.example"])
    assert size == len(m)


def test_sendmail_t_takes_recipients_and_removes_bcc(qroot):
    msg = (b"From: me@x.example\nTo: A <a@one.example>, b@two.example\n"
           b"Cc: \"Quoted, Name\" <c@three.example>\nBcc: hidden@four.example,\n"
           b" also@five.example\nSubject: t\n\nbody\n")
    r = qroot.run("qpy-sendmail", "-t", "-oi", input=msg)
    assert r.returncode == 0, r.stderr
    run_pickup_until_empty(qroot)
    m = only_message(qroot)
    assert b"Bcc" not in m and b"hidden" not in m and b"also@five" not in m
    (todo,) = todo_ready(qroot)
    with open(os.path.join(qroot.paths.todo, todo), "rb") as f:
        env = todo_decode(f.read()).env
    assert sorted(envelope.decode(env)[1]) == [b"a@one.example", b"also@five.example",
                                               b"b@two.example", b"c@three.example",
                                               b"hidden@four.example"]


def test_sendmail_dot_ends_message_without_i(qroot):
    r = qroot.run("qpy-sendmail", "x@y.example", input=b"Subject: d\n\nbefore\n.\nafter\n")
    assert r.returncode == 0, r.stderr
    run_pickup_until_empty(qroot)
    m = only_message(qroot)
    assert m.endswith(b"before\n") and b"after" not in m


@needs_root
def test_sendmail_looks_the_user_up_only_for_a_missing_from(qroot):
    """`sendmail -f ADDR` of a message with From: and Message-ID: needs no user name
    (an NSS lookup per call, when LOGNAME and USER are unset): a uid with no passwd
    entry queues it. Without From: the name comes from LOGNAME, @defaulthost."""
    nobody = ["setpriv", "--reuid", "54321", "--regid", "54321", "--clear-groups", "--",
              qroot.bin("qpy-sendmail"), "-f", "s@x.example", "d@test.example"]
    r = subprocess.run(nobody, input=b"From: s@x.example\nMessage-ID: <1@x>\n\nb\n",
                       env=qroot.env(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(nobody, input=b"Subject: no from\n\nb\n", capture_output=True,
                       env=qroot.env({"LOGNAME": "carol"}), timeout=60)
    assert r.returncode == 0, r.stderr
    data = b"".join(open(os.path.join(qroot.paths.drop, n), "rb").read()
                    for n in os.listdir(qroot.paths.drop))
    assert b"From: s@x.example\nMessage-ID: <1@x>\n" in data, data
    assert re.search(rb"From: carol@[a-z0-9.-]+\n", data), data


@pytest.mark.parametrize("rcpt", ["a b@c.example", "<() { :;}; echo x@y>", "a@b@c", "x@-bad-",
                                  "a\rb@c.example"])
def test_sendmail_refuses_bad_addresses(qroot, rcpt):
    r = qroot.run("qpy-sendmail", "-i", rcpt, input=b"Subject: x\n\nx\n")
    assert r.returncode == 65       # EX_DATAERR (sysexits: what sendmail's callers read)
    assert b"bad address" in r.stderr
    assert os.listdir(qroot.paths.drop) == []


def test_sendmail_without_recipients_fails(qroot):
    r = qroot.run("qpy-sendmail", "-i", input=b"Subject: x\n\nx\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr     # EX_USAGE


def test_inject_qmail_style(qroot):
    r = qroot.run("qpy-inject", input=b"To: bob@b.example\nSubject: q\n\nbody\n",
                  env={"QMAILUSER": "carol", "QMAILHOST": "c.example", "QMAILNAME": "Carol C"})
    assert r.returncode == 0, r.stderr
    run_pickup_until_empty(qroot)
    m = only_message(qroot)
    assert b"From: Carol C <carol@c.example>" in m
    (todo,) = todo_ready(qroot)
    with open(os.path.join(qroot.paths.todo, todo), "rb") as f:
        env = todo_decode(f.read()).env
    assert envelope.decode(env) == (b"carol@c.example", [b"bob@b.example"])


def test_temporary_failure_when_queue_missing(qroot):
    r = qroot.run("qpy-sendmail", "-i", "a@b.example", input=b"x\n",
                  env={"QPY_ROOT": qroot.path + "/nonexistent"})
    assert r.returncode == 75       # EX_TEMPFAIL


# --- real uids --------------------------------------------------------------------

BODIES = [
    b"plain text\n",
    bytes(range(1, 256)).replace(b"\n", b"").replace(b"\r", b"") + b"\n",   # 8-bit binary
    (b"z" * 998 + b"\n") * 3,
    b"final line without newline",
]


@needs_root
def test_200_messages_from_three_users(qroot):
    users = [qpytest.make_user(n).pw_name for n in ("inja", "injb", "injc")]
    start_pickup(qroot)

    def send(i: int) -> tuple[int, str, int]:
        user = users[i % 3]
        body = BODIES[i % len(BODIES)]
        msg = b"Subject: m%d\nX-Seq: %d\n\n" % (i, i) + body
        r = qroot.run("qpy-sendmail", "-i", "-f", "s%d@x.example" % i, "dest@test.example",
                      input=msg, user=user)
        return i, user, r.returncode

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(send, range(200)))
    assert all(rc == 0 for _, _, rc in results), [r for r in results if r[2]]
    assert wait_for(lambda: len(todo_ready(qroot)) == 200, 120), len(todo_ready(qroot))
    msgs = queued_messages(qroot)
    assert len(msgs) == 200
    seen = {}
    for data in msgs.values():
        i = int(re.search(rb"^X-Seq: (\d+)$", data, re.M).group(1))
        seen[i] = data
        uid = pwd.getpwnam(users[i % 3]).pw_uid
        assert data.startswith(b"Received: (qpy ") and b" invoked by uid %d) id " % uid in \
            data.split(b"\n", 1)[0]
        assert data.split(b"\n\n", 1)[1] == BODIES[i % len(BODIES)]
    assert sorted(seen) == list(range(200))


@needs_root
def test_drop_files_are_private(qroot):
    a = qpytest.make_user("inja").pw_name
    b = qpytest.make_user("injb").pw_name
    r = qroot.run("qpy-sendmail", "-i", "x@test.example", input=b"secret\n", user=a)
    assert r.returncode == 0
    (name,) = os.listdir(qroot.paths.drop)
    path = os.path.join(qroot.paths.drop, name)
    pw = pwd.getpwnam(b)
    as_b = ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid), "--init-groups",
            "--"]
    assert subprocess.run(as_b + ["cat", path], capture_output=True).returncode != 0
    assert subprocess.run(as_b + ["rm", "-f", path], capture_output=True).returncode != 0
    assert subprocess.run(as_b + ["ls", qroot.paths.drop], capture_output=True).returncode != 0
    assert os.path.exists(path)
    # and qpyd (the SMTP user) cannot read queued mail
    run_pickup_until_empty(qroot)
    (mess,) = os.listdir(qroot.paths.mess)
    pwd_d = pwd.getpwnam("qpyd")
    as_d = ["setpriv", "--reuid", str(pwd_d.pw_uid), "--regid", str(pwd_d.pw_gid),
            "--init-groups", "--"]
    r = subprocess.run(as_d + ["cat", os.path.join(qroot.paths.mess, mess)], capture_output=True)
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    r = subprocess.run(as_d + ["ls", qroot.paths.mess], capture_output=True)
    assert r.returncode != 0


@needs_root
def test_pickup_runs_as_qpyq(qroot):
    import psutil
    p = start_pickup(qroot)
    qpyq = pwd.getpwnam("qpyq").pw_uid
    assert wait_for(lambda: psutil.Process(p.pid).uids().real == qpyq, 10)
    proc = psutil.Process(p.pid)
    assert set(proc.uids()) == {qpyq}
    assert proc.cmdline()[0].startswith("qpy-pickup") or proc.name().startswith("qpy-pickup")


# --- hostile drop files -------------------------------------------------------------

def write_drop(qroot, name: str, data: bytes) -> str:
    path = os.path.join(qroot.paths.drop, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def good_drop(msg: bytes = b"Subject: ok\n\nok\n") -> bytes:
    env = envelope.encode(b"a@b.example", [b"c@test.example"])
    return dropfile.build(1, msg, env)


@needs_root
def test_hostile_drop_files(qroot):
    drop = qroot.paths.drop
    victim = os.path.join(qroot.path, "victim")
    with open(victim, "wb") as f:
        f.write(good_drop())
    os.symlink(victim, os.path.join(drop, "100.1.1"))                     # symlink
    os.mkfifo(os.path.join(drop, "101.1.1"))                              # FIFO
    write_drop(qroot, "102.1.1", good_drop())
    os.link(os.path.join(drop, "102.1.1"), os.path.join(drop, "102.1.2"))  # hard link
    os.mknod(os.path.join(drop, "103.1.1"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # device
    with open(os.path.join(drop, "104.1.1"), "wb") as f:                  # 2 GB sparse
        f.write(good_drop()[:dropfile.HEADER_LEN])
        f.truncate(2 << 30)
    g = good_drop()
    write_drop(qroot, "105.1.1", g[:-3])                                  # truncated envelope
    write_drop(qroot, "106.1.1", os.urandom(5000))                        # garbage
    write_drop(qroot, "107.1.1", b"QPYDROP1 " + b"9" * 200)               # garbage header
    write_drop(qroot, "tmp.1.2.3", g[:50])                                # still being written
    write_drop(qroot, "..evil", g)                                        # not a drop name
    os.mkdir(os.path.join(drop, "108.1.1"))                               # a directory
    body = b"Subject: torn\n\n" + b"x" * 10000 + b"\n"
    torn = bytearray(good_drop(body))
    torn[5000:9096] = bytes(4096)       # a page that never reached the disk before a crash
    write_drop(qroot, "109.1.1", bytes(torn))                             # torn: bad CRC
    env = envelope.encode(b"a@b.example", [b"c@test.example"])
    old = b"Subject: v1\n\nold format\n"
    write_drop(qroot, "110.1.1", b"QPYDROP1 %010d %015d %010d\n" % (1, len(old), len(env))
               + old + env)                                               # QPYDROP1: admitted
    for n in os.listdir(drop):
        if not os.path.islink(os.path.join(drop, n)):
            os.chown(os.path.join(drop, n), 0, pwd.getpwnam("qpyq").pw_gid)
    write_drop(qroot, "200.1.1", good_drop(b"Subject: good\n\ngood\n"))     # one good file
    os.chown(os.path.join(drop, "200.1.1"), 0, pwd.getpwnam("qpyq").pw_gid)
    os.chmod(os.path.join(drop, "200.1.1"), 0o640)
    p = start_pickup(qroot)
    assert wait_for(lambda: set(os.listdir(drop)) == {"tmp.1.2.3"}, 60), os.listdir(drop)
    assert p.poll() is None, "pickup died"
    quarantined = os.listdir(qroot.paths.quarantine)
    assert len(quarantined) == 11, quarantined       # and the empty directory removed
    msgs = list(queued_messages(qroot).values())
    assert len(msgs) == 2, msgs
    assert any(b"Subject: good" in m for m in msgs) and any(b"old format" in m for m in msgs)
    assert os.path.exists(victim)
    # pickup is still alive and admits the next good file
    write_drop(qroot, "201.1.1", good_drop(b"Subject: after\n\nafter\n"))
    os.chown(os.path.join(drop, "201.1.1"), 0, pwd.getpwnam("qpyq").pw_gid)
    os.chmod(os.path.join(drop, "201.1.1"), 0o640)
    assert wait_for(lambda: len(queued_messages(qroot)) == 3, 30)
    qroot.stop_all()
    log = pickup_log(qroot)
    for reason in ("not a plain file", "links", "too large", "cannot open",
                   "lengths do not match", "bad header", "not a drop file name",
                   "removed directory", "checksum mismatch"):
        assert reason in log, (reason, log)


def test_front_ends_import_only_what_injection_needs():
    """Each sendmail run starts an interpreter; heavy modules would double its start-up
    (dataclasses alone pulls in inspect: about 15 ms, as much as the interpreter)."""
    heavy = {"dataclasses", "inspect", "typing", "subprocess", "email", "socket", "ssl",
             "dns", "pyinotify", "psutil"}
    site = subprocess.run([qpytest.PYTHON, "-c", "import sysconfig; print(sysconfig."
                           "get_paths()['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for module in ("qpy.inject.sendmail", "qpy.inject.queue_inject", "qpy.inject.inject"):
        # as the launchers run them: -IS, the venv's site-packages put first by hand
        r = subprocess.run([qpytest.PYTHON, "-IS", "-c",
                            "import sys; sys.path[:0] = [%r]; import %s; print(' '.join("
                            "sorted(sys.modules)))" % (site, module)],
                           capture_output=True, text=True, check=True)
        loaded = set(r.stdout.split())
        assert module in loaded
        assert not {m.split(".")[0] for m in loaded} & heavy, (module, loaded & heavy)


def test_front_ends_queue_a_message_without_os(qroot):
    """A whole run of each front end, as its launcher starts it, queues the message
    loading no `os` (about 1 ms of a sendmail call's 2 over the bare interpreter),
    no `__future__` (the stdlib directory's only module on the path), no signal.py
    (enum, functools, collections) and nothing that parses, and qpy's own modules
    from its bundle, not one through the import system: docs/queue.md."""
    slow = {"os", "__future__", "signal", "enum", "functools", "collections", "re",
            "posixpath", "email", "socket", "dataclasses", "typing", "subprocess"}
    msg = b"From: a@x.example\nTo: d@test.example\nSubject: t\n\nbody\n"
    runs = {"qpy-sendmail": (["-f", "a@x.example", "d@test.example"], None),
            "qpy-inject": (["-f", "a@x.example", "d@test.example"], None),
            "qpy-queue-inject": ([], envelope.encode(b"a@x.example", [b"d@test.example"]))}
    for prog, (args, env_bytes) in runs.items():
        r, w = os.pipe()
        os.write(w, env_bytes or b"")
        os.close(w)
        try:
            p = subprocess.run([qpytest.PYTHON, "-IS", "-X", "importtime", qroot.bin(prog),
                                *args], input=msg, stdout=r if env_bytes else None,
                               stderr=subprocess.PIPE, env=qroot.env(), timeout=60)
        finally:
            os.close(r)
        assert p.returncode == 0, (prog, p.stderr[-400:])
        loaded = {line.rsplit(b"|", 1)[1].strip().decode() for line in p.stderr.splitlines()
                  if line.startswith(b"import time:") and b"imported package" not in line}
        assert not loaded & slow, (prog, loaded & slow)
        # every module of qpy came from the program's bundle (qpy.common.bundle), none
        # through the import system's search
        assert not {m for m in loaded if m.split(".")[0] == "qpy"}, (prog, loaded)
    assert len(os.listdir(qroot.paths.drop)) == 3


# --- crash safety ---------------------------------------------------------------------

@needs_root
def test_kill_pickup_during_injection_loses_nothing(qroot):
    """kill -9 pickup at random moments while 500 messages are injected, 20 times."""
    total = 500
    acked: set[int] = set()
    lock = threading.Lock()
    rng = random.Random(7)

    def send(i: int) -> None:
        msg = b"Subject: c\nX-Seq: %d\n\nbody %d\n" % (i, i)
        r = queue_inject(qroot, msg, envelope.encode(b"s@x.example", [b"d@test.example"]))
        if r.returncode == 0:
            with lock:
                acked.add(i)

    p = start_pickup(qroot)
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(send, i) for i in range(total)]
        for _ in range(20):
            time.sleep(rng.uniform(0.05, 0.4))
            p.send_signal(signal.SIGKILL)
            p.wait()
            p = start_pickup(qroot)
        for f in futures:
            f.result()
    assert wait_for(lambda: drop_empty(qroot), 120), os.listdir(qroot.paths.drop)
    qroot.stop_all()
    counts: dict[int, int] = {}
    for data in queued_messages(qroot).values():
        i = int(re.search(rb"^X-Seq: (\d+)$", data, re.M).group(1))
        counts[i] = counts.get(i, 0) + 1
    duplicates = sum(c - 1 for c in counts.values())
    print("pickup crash test: %d acknowledged, %d queued, %d duplicates"
          % (len(acked), len(counts), duplicates))
    assert len(acked) == total
    assert set(counts) == acked                     # nothing lost
    assert duplicates == 0                          # nothing admitted twice
    assert len(todo_ready(qroot)) == total
    assert not [n for n in os.listdir(qroot.paths.todo) if not n.isdigit()]


def test_pickup_journal_lingers_then_empties_and_old_records_are_harmless(qroot):
    """The journal keeps its records while mail flows (no fsyncs per message to empty
    it), empties once drop/ stays quiet, and records finished long ago do nothing at a
    restart: their drop names are never reused, their ids are gone."""
    journal = os.path.join(qroot.paths.queue, "pickup", "journal")
    p = start_pickup(qroot)
    r = queue_inject(qroot, b"Subject: j\n\nbody\n",
                     envelope.encode(b"s@x.example", [b"d@test.example"]))
    assert r.returncode == 0
    assert wait_for(lambda: drop_empty(qroot) and len(todo_ready(qroot)) == 1, 30)
    with open(journal, "rb") as f:
        records = f.read().split(b"\n")[:-1]
    # the record, then the "C" written once the batch's syncfs (or fsync) returned
    assert len(records) == 2 and records[1] == b"C"
    assert records[0].split(b" ")[1].decode() in todo_ready(qroot)
    assert wait_for(lambda: os.path.getsize(journal) == 0, 10), "journal never emptied"
    p.send_signal(signal.SIGKILL)
    p.wait()
    # a journal left by a crash: a record of that message (already finished), and a
    # record whose drop file and ids are long gone; a new drop file waits meanwhile
    (msgid,) = todo_ready(qroot)
    with open(journal, "ab") as f:
        f.write(records[0] + b"\nC\n" + b"1.2.3 99999\nC\n")
    r = queue_inject(qroot, b"Subject: k\n\nbody\n",
                     envelope.encode(b"s@x.example", [b"d@test.example"]))
    assert r.returncode == 0
    p = start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot) and len(todo_ready(qroot)) == 2, 30)
    assert msgid in todo_ready(qroot) and p.poll() is None
    qroot.stop_all()
    assert sorted(os.listdir(qroot.paths.mess)) == sorted(todo_ready(qroot))


def test_pickup_reacts_to_hup_and_term_at_once(qroot):
    """Idle pickup sleeps up to IDLE_WAIT (5 s) between scans; a signal must end the
    sleep, not wait for it (issue 17)."""
    p = start_pickup(qroot)
    assert wait_for(lambda: "started on" in pickup_log(qroot), 30)
    time.sleep(0.5)                         # asleep in its wait now
    t0 = time.monotonic()
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "control files re-read" in pickup_log(qroot), 1.0, 0.01), \
        pickup_log(qroot)
    assert time.monotonic() - t0 < 1.0 and p.poll() is None
    time.sleep(0.5)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 1.0, "pickup took %.1f s to exit" % (time.monotonic() - t0)
    assert "exiting" in pickup_log(qroot)


@needs_root
def test_pickup_recovery_finishes_committed_batches_and_undoes_the_rest(qroot):
    """Journals a crash can leave. (1) a batch with its "C" (its syncfs had returned)
    then one without (perhaps never durable): the first is finished, the second undone
    and its drop file admitted again. (2) a batch without "C" but with its todo/ID
    renamed (the rename comes after the commit point: a power cut took the "C"): it
    is finished, its drop file removed, nothing admitted twice. (3) a batch voided by
    "X" (its syncfs failed) before a committed one: its drop file is admitted again."""
    env = envelope.encode(b"a@b.example", [b"c@test.example"])
    journal = os.path.join(qroot.paths.queue, "pickup", "journal")


    def leave(tag: str, msg_id: str, renamed: bool) -> bytes:
        """A drop file and the queue files pickup wrote for it; its journal record."""
        msg = b"Subject: %s\n\nbody %s\n" % (tag.encode(), tag.encode())
        drop = "9%s.1.1" % msg_id
        put(os.path.join(qroot.paths.drop, drop), dropfile.build(1, msg, env))
        put(os.path.join(qroot.paths.mess, msg_id),
            b"Received: (qpy 1 invoked by uid 0); now\n" + msg)
        put(os.path.join(qroot.paths.todo, ("" if renamed else ".tmp.") + msg_id),
            todo_encode(int(time.time()), 0, 100, env))
        return b"%s %s\n" % (drop.encode(), msg_id.encode())

    def bodies() -> list[bytes]:
        return sorted(m.split(b"\n\n", 1)[1] for m in queued_messages(qroot).values())

    put(journal, leave("a", "1000001", False) + b"C\n" + leave("b", "1000002", False))
    p = start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot) and len(todo_ready(qroot)) == 2, 30), (
        os.listdir(qroot.paths.drop), os.listdir(qroot.paths.todo), pickup_log(qroot))
    assert p.poll() is None
    qroot.stop_all()
    ready = set(todo_ready(qroot))
    assert "1000001" in ready and "1000002" not in ready    # b: a new id, a new copy
    assert sorted(queued_messages(qroot)) == sorted(ready)
    assert bodies() == [b"body a\n", b"body b\n"]
    assert not [n for n in os.listdir(qroot.paths.todo) if n.startswith(".tmp.")]

    put(journal, leave("c", "1000003", True))
    p = start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot), 30), pickup_log(qroot)
    assert p.poll() is None
    qroot.stop_all()
    assert "1000003" in todo_ready(qroot) and len(todo_ready(qroot)) == 3
    assert bodies() == [b"body a\n", b"body b\n", b"body c\n"]   # c once

    # (3) a batch whose syncfs failed (its temporaries gone, its drop file waiting),
    # voided by "X", then a committed batch: the first drop file must survive
    record = leave("d", "1000004", False)
    os.unlink(os.path.join(qroot.paths.mess, "1000004"))
    os.unlink(os.path.join(qroot.paths.todo, ".tmp.1000004"))
    put(journal, record + b"X\n" + leave("e", "1000005", False) + b"C\n")
    p = start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot) and len(todo_ready(qroot)) == 5, 30), (
        os.listdir(qroot.paths.drop), pickup_log(qroot))
    qroot.stop_all()
    assert "1000005" in todo_ready(qroot) and "1000004" not in todo_ready(qroot)
    assert bodies() == [b"body %s\n" % t for t in (b"a", b"b", b"c", b"d", b"e")]


@needs_root
def left_by_a_power_cut(qroot, msg_id: str, torn: bool = False, drop: str = "-") -> bytes:
    """The temporaries of one message as a batch's syncfs left them; its journal record
    (drop: the drop file's name, "-" for a message from the door)."""
    env = envelope.encode(b"a@b.example", [b"c@test.example"])
    mess = b"Received: (qpy 1 invoked from network) id %s; now\n" % msg_id.encode() \
        + b"Subject: left %s\n\nbody\n" % msg_id.encode()
    put(os.path.join(qroot.paths.mess, msg_id), mess[:-3] if torn else mess)
    put(os.path.join(qroot.paths.todo, ".tmp." + msg_id),
        todo_encode(int(time.time()), 0, len(mess), env))
    return b"%s %s\n" % (drop.encode(), msg_id.encode())


def test_pickup_recovery_keeps_an_answered_door_message_whose_commit_a_power_cut_took(qroot):
    """Pickup answers a message from the door once its batch's syncfs returned, before
    the "C" record and the rename to todo/ID reach the disk: a power cut then leaves
    only the record and the temporaries. At start such a door message is finished
    when its temporaries are whole (it may hold a 250), and dropped when they are
    torn or its batch was voided by "X" (never answered). Before the fix every door
    message of a batch without its "C" was dropped."""
    journal = os.path.join(qroot.paths.queue, "pickup", "journal")
    put(journal, left_by_a_power_cut(qroot, "2000001") + b"X\n"
        + left_by_a_power_cut(qroot, "2000002")
        + left_by_a_power_cut(qroot, "2000003", torn=True))
    p = start_pickup(qroot)
    assert wait_for(lambda: "2000002" in todo_ready(qroot), 30), (
        os.listdir(qroot.paths.todo), pickup_log(qroot))
    assert p.poll() is None
    qroot.stop_all()
    assert todo_ready(qroot) == ["2000002"]                 # whole, perhaps answered
    assert sorted(queued_messages(qroot)) == ["2000002"]    # voided and torn: gone
    assert not [n for n in os.listdir(qroot.paths.todo) if n.startswith(".tmp.")]


def test_pickup_recovery_finishes_a_record_whose_drop_file_is_gone_without_its_commit(qroot):
    """Pickup unlinks a drop file only after its batch's commit point, but where the
    filesystem keeps no metadata order (an ext4 without a journal, as this machine's
    root) a power cut can keep that unlink and lose the unsynced "C" and the rename
    to todo/ID. The injector had exit 0: such a record is finished when its
    temporaries are whole; a torn one goes; one whose drop file is still there is
    undone and its drop file admitted again (one copy, not two). Before the fix the
    first was removed with its drop file already gone: a lost message."""
    r = queue_inject(qroot, b"Subject: still here\n\nbody\n",
                     envelope.encode(b"a@b.example", [b"c@test.example"]))
    assert r.returncode == 0, r.stderr
    (still_there,) = os.listdir(qroot.paths.drop)
    journal = os.path.join(qroot.paths.queue, "pickup", "journal")
    put(journal, left_by_a_power_cut(qroot, "2000011", drop="1.2.3")
        + left_by_a_power_cut(qroot, "2000012", drop=still_there)
        + left_by_a_power_cut(qroot, "2000013", torn=True, drop="1.2.4"))
    p = start_pickup(qroot)
    assert wait_for(lambda: len(todo_ready(qroot)) == 2 and drop_empty(qroot), 30), (
        os.listdir(qroot.paths.todo), pickup_log(qroot))
    assert p.poll() is None
    qroot.stop_all()
    msgs = queued_messages(qroot)
    assert sorted(todo_ready(qroot)) == sorted(msgs)
    assert "2000011" in msgs and "2000012" not in msgs and "2000013" not in msgs
    (again,) = [m for i, m in msgs.items() if i != "2000011"]   # the drop file, once
    assert b"Subject: still here" in again
    assert not [n for n in os.listdir(qroot.paths.todo) if n.startswith(".tmp.")]


# --- full disk ------------------------------------------------------------------------

@needs_root
def test_full_disk(tmp_path):
    mnt = qpytest.scratch_dir("tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", mnt], check=True)
    try:
        root = os.path.join(mnt, "qpy")
        r = subprocess.run([qpytest.bin_path("qpy-install"), root, "--me", "test.example"],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        q = qpytest.QRoot(root)
        filler = os.path.join(mnt, "filler")
        subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k", "count=1000"],
                       capture_output=True)
        big = b"Subject: big\n\n" + b"x" * 200_000
        r = q.run("qpy-sendmail", "-i", "a@test.example", input=big)
        assert r.returncode == 75, (r.returncode, r.stderr)      # EX_TEMPFAIL
        r = queue_inject(q, big, envelope.encode(b"", [b"a@test.example"]))
        assert r.returncode == 53 and b"No space left" in r.stderr, (r.returncode, r.stderr)
        assert [n for n in os.listdir(q.paths.drop)] == []          # no partial file left
        os.unlink(filler)
        r = q.run("qpy-sendmail", "-i", "a@test.example", input=big)
        assert r.returncode == 0, r.stderr
        p = q.start("qpy-pickup", stdout=subprocess.DEVNULL)
        assert wait_for(lambda: len(todo_ready(q)) == 1, 30)
        msgs = queued_messages(q)
        assert len(msgs) == 1 and next(iter(msgs.values())).endswith(b"x" * 200_000)
        # pickup on a full disk: the drop file stays until there is room
        subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k", "count=1000"],
                       capture_output=True)
        q.stop_all()
        os.unlink(filler)
        r = q.run("qpy-sendmail", "-i", "a@test.example", input=big)
        assert r.returncode == 0
        subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=64k", "count=1000"],
                       capture_output=True)
        p = q.start("qpy-pickup", stdout=subprocess.DEVNULL)
        time.sleep(2)
        assert len(os.listdir(q.paths.drop)) == 1 and p.poll() is None
        assert len(todo_ready(q)) == 1
        os.unlink(filler)
        assert wait_for(lambda: len(todo_ready(q)) == 2, 30)
        q.stop_all()
    finally:
        subprocess.run(["umount", "-l", mnt])
        os.rmdir(mnt)


# --- qpy-install --------------------------------------------------------------------

def test_install_check_and_rerun(qroot):
    r = subprocess.run([qroot.bin("qpy-install"), "--check", qroot.path], capture_output=True)
    assert r.returncode == 0 and r.stdout == b"", r.stdout
    os.chmod(qroot.paths.mess, 0o755)
    os.rmdir(qroot.paths.quarantine)
    r = subprocess.run([qroot.bin("qpy-install"), "--check", qroot.path], capture_output=True)
    assert r.returncode == 1
    out = r.stdout.decode()
    assert "queue/mess: mode 0755, want 2750" in out
    assert "queue/quarantine: missing" in out
    os.chmod(qroot.paths.mess, 0o2750)
    # a second install on a live root touches no queued mail and no changed setting
    assert qroot.run("qpy-sendmail", "-i", "x@test.example", input=b"keep\n").returncode == 0
    run_pickup_until_empty(qroot)
    qroot.stop_all()
    before = queued_messages(qroot)
    qroot.control("me", "changed.example")
    r = subprocess.run([qroot.bin("qpy-install"), qroot.path, "--me", "test.example"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert queued_messages(qroot) == before and len(before) == 1
    with open(os.path.join(qroot.paths.control, "me")) as f:
        assert f.read() == "changed.example\n"
    r = subprocess.run([qroot.bin("qpy-install"), "--check", qroot.path], capture_output=True)
    assert r.returncode == 0, r.stdout


@needs_root
def test_install_creates_system_users_without_shell(qroot):
    for name in ("qpyd", "qpyq", "qpys", "qpyr", "qpyl", "qpyalias"):
        pw = pwd.getpwnam(name)
        assert pw.pw_shell.endswith("nologin")
    for name in ("postmaster", "mailer-daemon", "root"):
        st = os.stat(os.path.join(qroot.paths.alias, ".qmail-" + name))
        assert st.st_uid == pwd.getpwnam("qpyalias").pw_uid
    with open(os.path.join(qroot.paths.control, "rcpthosts")) as f:
        assert f.read() == "test.example\n"


def test_nothing_under_queue_is_open_to_others(qroot):
    """Design §8: under queue/ only drop/ lets others in, and only to create files."""
    for dirpath, dirnames, filenames in os.walk(qroot.paths.queue):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if path == qroot.paths.drop:
                assert mode & 0o007 == 0o003, oct(mode)      # -wx: create, no listing
            else:
                assert mode & 0o006 == 0, (path, oct(mode))
    assert stat.S_IMODE(os.stat(qroot.paths.queue).st_mode) & 0o007 == 0o001
