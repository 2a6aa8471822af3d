"""qpy as the host's MTA: one id per message, the sendmail command line and its modes.

Real programs: qpy-tcpserver/qpy-smtpd, qpy-sendmail, qpy-pickup, qpy-qread, run as
separate processes on a freshly installed root."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
import qpytest
import smtphelp
from qpytest import needs_root, wait_for
from test_inject import drop_empty, pickup_log, start_pickup

from qpy.common.queue import id_usec, is_id, make_id


def test_one_id_in_250_received_pickup_log_and_qread(qroot):
    """The id of `250 ... queued as ID` names the drop file, the queue files, both
    Received: lines, pickup's log line and qpy-qread's block."""
    listener = smtphelp.Listener(qroot, ipv6=False)
    try:
        c = smtphelp.Client(listener.port)
        c.hello()
        assert c.cmd(b"MAIL FROM:<a@x.example>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<postmaster@test.example>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        reply = c.cmd(b"Subject: id\r\n\r\nbody\r\n.\r\n")
        c.cmd(b"QUIT")
        c.close()
    finally:
        listener.stop()
    m = re.match(rb"250 2\.0\.0 Ok: queued as (\d+)\r\n", reply)
    assert m, reply
    msg_id = m.group(1).decode()
    assert is_id(msg_id) and os.listdir(qroot.paths.drop) == [msg_id]
    start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot), 30)
    assert os.listdir(qroot.paths.mess) == [msg_id]
    assert wait_for(lambda: os.path.exists(os.path.join(qroot.paths.todo, msg_id)), 10)
    with open(os.path.join(qroot.paths.mess, msg_id), "rb") as f:
        head = f.read().split(b"\n\n", 1)[0]
    assert re.search(rb"^Received: \(qpy \d+ invoked from network\) id %s; " % m.group(1),
                     head, re.M), head
    assert re.search(rb"^\tby test\.example \(qpy\) with E?SMTP id %s;" % m.group(1),
                     head, re.M), head
    assert wait_for(lambda: "pickup msg %s: " % msg_id in pickup_log(qroot), 10)
    assert "(drop " not in pickup_log(qroot)
    r = qroot.run("qpy-qread", qroot.path)
    assert r.returncode == 0 and msg_id in r.stdout.decode(), r


def _hostile_drop(qroot, name: str) -> None:
    from qpy.common import dropfile, envelope
    data = dropfile.build(1, b"Subject: h\n\nx\n", envelope.encode(b"", [b"a@b.example"]))
    with open(os.path.join(qroot.paths.drop, name), "wb") as f:
        f.write(data)


def test_pickup_refuses_ids_a_user_chose_badly(qroot):
    """A drop name is the injector's choice: an id far from the file's ctime, one
    already queued, or an old-style name get a fresh id, and the log names both."""
    import time
    now = time.time_ns() // 1000
    future = make_id(now + 3600 * 10**6, 4242)      # an id not due for an hour
    past = make_id(now - 3 * 3600 * 10**6, 4242)    # older than any slow DATA
    fine = make_id(now, 4243)
    for name in (future, past, fine, "12345.678.9"):
        _hostile_drop(qroot, name)
    start_pickup(qroot)
    assert wait_for(lambda: drop_empty(qroot), 30)
    ids = sorted(os.listdir(qroot.paths.mess))
    assert len(ids) == 4 and fine in ids and future not in ids and past not in ids
    assert all(is_id(i) and id_usec(i) is not None for i in ids)
    log = pickup_log(qroot)
    for name in (future, past, "12345.678.9"):
        assert re.search(r"pickup msg \d+: uid \d+ bytes \d+ \(drop %s\)" % re.escape(name),
                         log), log
    assert "pickup msg %s: uid %d bytes" % (fine, os.getuid()) in log
    # a second drop file with an id now queued is not admitted under it
    _hostile_drop(qroot, fine)
    assert wait_for(lambda: drop_empty(qroot), 30)
    assert len(os.listdir(qroot.paths.mess)) == 5
    assert "(drop %s)" % fine in pickup_log(qroot)


# --- the command line ----------------------------------------------------------------

def _drops(qroot):
    return smtphelp.drops(qroot)


@pytest.mark.parametrize("args,kept", [
    (["-it", "x@y.example"], True),          # -i clustered with -t: the dot line stays
    (["-ti", "x@y.example"], True),
    (["-oi", "x@y.example"], True),
    (["-i", "-odb", "-oem", "-Am", "-N", "never", "-B8BITMIME", "-R", "hdrs", "-V", "e1",
      "-L", "lbl", "-v", "-FCron Daemon", "-f", "a@b.example", "--", "x@y.example"], True),
    (["x@y.example"], False),                # sendmail's default: the dot line ends it
    (["-odi", "-oem", "x@y.example"], False),
])
def test_clustered_and_ignored_flags(qroot, args, kept):
    msg = b"To: x@y.example\nSubject: s\n\nbefore\n.\nafter\n"
    r = qroot.run("qpy-sendmail", *args, input=msg)
    assert r.returncode == 0, r.stderr
    (got,) = _drops(qroot)
    assert got[0].endswith(b"after\n") == kept, got[0]
    assert got[2] == [b"x@y.example"]           # -t found the same address: once


def test_ti_without_arguments_takes_to_and_f_sets_sender(qroot):
    r = qroot.run("qpy-sendmail", "-ti", "-fcron@test.example", "-FCronDaemon",
                  input=b"To: a@one.example\nBcc: b@two.example\n\nx\n")
    assert r.returncode == 0, r.stderr
    ((msg, sender, rcpts),) = _drops(qroot)
    assert sender == b"cron@test.example" and sorted(rcpts) == [b"a@one.example",
                                                                b"b@two.example"]
    assert b"Bcc" not in msg and b"From: CronDaemon <" in msg


@pytest.mark.parametrize("args,words", [
    (["-Z"], "unknown option -Z"), (["-tZ"], "unknown option -Z"), (["-f"], "needs a value"),
    (["-bd"], "qpy-start"), (["-bD"], "qpy-start"), (["-bt"], "-bv"), (["-bh"], "qpy-qread"),
    (["-bH"], "qpy-qread"), (["-bx"], "unknown mode"),
])
def test_bad_options_and_modes_exit_64_with_one_line(qroot, args, words):
    r = qroot.run("qpy-sendmail", "x@y.example", *args, input=b"x\n")
    assert r.returncode == 64, r
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert os.listdir(qroot.paths.drop) == []


def test_bv_says_local_alias_remote_and_unknown(qroot):
    src = os.path.join(os.path.dirname(qroot.path), "aliases")
    with open(src, "w") as f:
        f.write("# a comment\nPostmaster: root\nlist: a@x.example,\n  b@y.example\n")
    r = qroot.run("qpy-sendmail", "-bi", "-oA" + src)
    assert r.returncode == 0, r.stderr
    r = qroot.run("qpy-sendmail", "-bv", "postmaster", "LIST@test.example", "a@far.example")
    assert r.returncode == 0, r
    out = r.stdout.decode()
    assert "postmaster... deliverable: alias to root" in out
    assert "LIST@test.example... deliverable: alias to a@x.example, b@y.example" in out
    assert "a@far.example... deliverable: remote" in out
    r = qroot.run("qpy-sendmail", "-bv", "nosuchname@test.example")
    assert r.returncode == 67 and "undeliverable" in r.stdout.decode(), r


def test_newaliases_compiles_debian_default_and_refuses_broken_files(qroot):
    """/etc/aliases as Debian ships it compiles; a loop or a malformed line exits 65
    and leaves the table as it was; -I and the newaliases name do the same."""
    table = os.path.join(qroot.path, "users", "aliases")
    r = qroot.run("qpy-sendmail", "-bi", "-oA/etc/aliases")
    assert r.returncode == 0, r.stderr
    with open(table, "rb") as f:
        good = f.read()
    assert b"postmaster\0&root\n" in good
    assert os.stat(table).st_mode & 0o777 == 0o644
    src = os.path.join(os.path.dirname(qroot.path), "aliases")
    for text, words in (("a: b\nb: a\n", "alias loop: a -> b -> a"),
                        ("a: \"|unclosed\n", "unbalanced quote"),
                        ("no colon here\n", "line 1"),
                        ("x: :include:relative\n", "absolute")):
        with open(src, "w") as f:
            f.write(text)
        r = qroot.run("qpy-sendmail", "-I", "-oA" + src)
        assert r.returncode == 65 and words in r.stderr.decode(), (text, r)
        with open(table, "rb") as f:
            assert f.read() == good


# --- end to end: aliases, -bs, mailq, one-user mode, and the real callers --------------

def _new(maildir: str) -> list[bytes]:
    d = os.path.join(maildir, "new")
    out = []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, n), "rb") as f:
            out.append(f.read())
    return out


@pytest.fixture
def mta(qroot):
    """A started root with an admin user, aliases routing root and postmaster to it,
    and the --system-mta launchers installed in a scratch prefix."""
    import signal
    base = os.path.dirname(qroot.path)
    admin = qpytest.make_user("qtsmadmin", os.path.join(base, "home-admin"))
    out = os.path.join(base, "out")
    os.mkdir(out)
    if qpytest.IS_ROOT:
        import pwd
        al = pwd.getpwnam("qpyalias")
        os.chown(out, al.pw_uid, al.pw_gid)
    with open(os.path.join(base, "aliases"), "w") as f:
        f.write("# as Debian's, then the admin's lines\n"
                "postmaster:    root\n"
                "root: %s\n"
                "pipe: \"|id -un > %s/pipe.out; cat >> %s/pipe.out\"\n"
                "file: %s/file.mbox\n"
                "list: %s,\n  :include:%s/list.inc\n"
                "owner-list: postmaster\n"
                % (admin.pw_name, out, out, out, admin.pw_name, out))
    with open(os.path.join(out, "list.inc"), "w") as f:
        f.write("# members\nfile\n")
    os.chmod(os.path.join(out, "list.inc"), 0o644)
    r = qroot.run("qpy-sendmail", "-bi", "-oA" + os.path.join(base, "aliases"))
    assert r.returncode == 0, r.stderr
    prefix = os.path.join(base, "sys")
    r = subprocess.run([qroot.bin("qpy-install"), qroot.path, "--system-mta",
                        "--system-prefix", prefix], capture_output=True)
    assert r.returncode == 0, r
    p = qroot.start("qpy-start", qroot.path, stdout=open(os.path.join(base, "start.log"),
                                                          "ab"))
    assert wait_for(lambda: os.path.exists(os.path.join(qroot.paths.run,
                                                        "queue-send.pid")), 30)
    qroot.admin, qroot.out, qroot.prefix = admin, out, prefix
    qroot.sendmail = os.path.join(prefix, "usr", "sbin", "sendmail")
    qroot.maildir = os.path.join(admin.pw_dir, "Maildir")
    yield qroot
    p.send_signal(signal.SIGTERM)
    p.wait(30)


@needs_root
def test_aliases_route_postmaster_and_root_and_run_as_the_alias_user(mta):
    env = {"PATH": "/usr/bin:/bin"}
    for rcpt in ("postmaster", "root", "pipe", "list"):
        r = subprocess.run([mta.sendmail, "-f", "carol@remote.example", rcpt + "@test.example"],
                           input=b"Subject: to %s\n\nhello\n" % rcpt.encode(), env=env,
                           capture_output=True)
        assert r.returncode == 0, r
    assert wait_for(lambda: len(_new(mta.maildir)) == 3, 60), _new(mta.maildir)
    got = _new(mta.maildir)
    assert any(b"Delivered-To: postmaster@test.example" in m and
               b"Delivered-To: root@test.example" in m for m in got)
    pipe = os.path.join(mta.out, "pipe.out")
    assert wait_for(lambda: os.path.exists(pipe) and b"hello" in open(pipe, "rb").read(), 60)
    assert open(pipe, "rb").read().startswith(b"qpyalias\n")     # never root
    mbox = os.path.join(mta.out, "file.mbox")
    assert wait_for(lambda: os.path.exists(mbox), 60)
    data = open(mbox, "rb").read()
    assert b"Subject: to list" in data and os.stat(mbox).st_uid == \
        __import__("pwd").getpwnam("qpyalias").pw_uid
    # the list's copies went out with owner-list as the envelope sender
    assert any(m.startswith(b"Return-Path: <owner-list@test.example>") and
               b"Subject: to list" in m for m in got), got


@needs_root
def test_newaliases_after_editing_and_a_loop_through_forwards_bounces(mta):
    src = os.path.join(os.path.dirname(mta.path), "aliases")
    with open(src, "a") as f:
        f.write("helpdesk: %s\n" % mta.admin.pw_name)
    newaliases = os.path.join(mta.prefix, "usr", "bin", "newaliases")
    r = subprocess.run([newaliases, "-oA" + src], capture_output=True)
    assert r.returncode == 0 and b"aliases" in r.stdout, r
    r = subprocess.run([mta.sendmail, "-i", "helpdesk"], input=b"Subject: hd\n\nx\n",
                       capture_output=True)
    assert r.returncode == 0, r
    assert wait_for(lambda: any(b"Subject: hd" in m for m in _new(mta.maildir)), 60)


@needs_root
def test_bs_driven_by_swaks_pipe_as_a_plain_user(mta):
    user = qpytest.make_user("qtsmuser")
    cmd = "setpriv --reuid %d --regid %d --init-groups -- %s -bs" % (
        user.pw_uid, user.pw_gid, mta.sendmail)
    r = subprocess.run(["swaks", "--pipe", cmd, "--to", "root@test.example", "--from",
                        "qtsmuser@test.example", "--header", "Subject: via swaks"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r
    m = re.search(rb"250 2\.0\.0 Ok: queued as (\d+)", r.stdout)
    assert m, r.stdout
    assert wait_for(lambda: any(b"Subject: via swaks" in x and m.group(1) in x
                                for x in _new(mta.maildir)), 60)
    got = [x for x in _new(mta.maildir) if b"Subject: via swaks" in x][0]
    assert b"invoked by uid %d) id %s;" % (user.pw_uid, m.group(1)) in got


@needs_root
def test_mailq_lists_a_deferred_message_and_q_retries(mta):
    port = qpytest.free_port()              # nothing listens there: a deferral
    mta.control("smtproutes", "far.example:127.0.0.1:%d" % port)
    import signal
    os.kill(mta.procs[0].pid, signal.SIGHUP)
    r = subprocess.run([mta.sendmail, "-oi", "someone@far.example"],
                       input=b"Subject: later\n\nx\n", capture_output=True)
    assert r.returncode == 0, r
    mailq = os.path.join(mta.prefix, "usr", "bin", "mailq")
    assert wait_for(lambda: "deferred" in subprocess.run(
        [mailq], capture_output=True, text=True).stdout, 60)
    out = subprocess.run([mailq], capture_output=True, text=True).stdout
    assert out.startswith("messages in queue: 1\n") and "someone@far.example" in out, out
    assert subprocess.run([mta.sendmail, "-q"], capture_output=True).returncode == 0


def _git_patch(base: str) -> str:
    repo = os.path.join(base, "repo")
    env = {"PATH": "/usr/bin:/bin", "HOME": base, "GIT_AUTHOR_NAME": "Dev",
           "GIT_AUTHOR_EMAIL": "dev@test.example", "GIT_COMMITTER_NAME": "Dev",
           "GIT_COMMITTER_EMAIL": "dev@test.example"}
    subprocess.run(["git", "init", "-q", repo], check=True, env=env)
    with open(os.path.join(repo, "f"), "w") as f:
        f.write("x\n")
    subprocess.run(["git", "-C", repo, "add", "f"], check=True, env=env)
    subprocess.run(["git", "-C", repo, "commit", "-qm", "git send-email patch"], check=True,
                   env=env)
    subprocess.run(["git", "-C", repo, "format-patch", "-1", "-o", base], check=True, env=env,
                   capture_output=True)
    return [os.path.join(base, n) for n in os.listdir(base) if n.endswith(".patch")][0]


# Each caller with the command line it uses (from its source or documentation); the
# marker is what must arrive in the admin's Maildir.
CALLERS = {
    # Debian's cron (do_command.c, with Debian's -FCronDaemon): MAILCMD flags then the user
    "cron": lambda m: ([m.sendmail, "-FCronDaemon", "-i", "-B8BITMIME", "-oem",
                        m.admin.pw_name],
                       b"From: root (Cron Daemon)\nTo: %s\nSubject: Cron <root@h> job\n"
                       b"Content-Type: text/plain; charset=UTF-8\n\ncron output\n.\nmore\n"
                       % m.admin.pw_name.encode(), b"more\n"),
    # PHP's mail(): popen(sendmail_path), php.ini's default "sendmail -t -i"
    "php": lambda m: (["php", "-n", "-d", "sendmail_path=%s -t -i" % m.sendmail, "-r",
                       "exit(mail('%s@test.example', 'php subject', \"php body\\n.\\n\") ? 0 : 1);"
                       % m.admin.pw_name], b"", b"Subject: php subject"),
    # logwatch: "sendmail -t" with the recipients in To: and Bcc:
    "logwatch": lambda m: ([m.sendmail, "-t"],
                           b"To: nobody@far.example\nBcc: %s@test.example\nFrom: logwatch\n"
                           b"Subject: Logwatch for h\n\nlogwatch report\n"
                           % m.admin.pw_name.encode(), b"logwatch report"),
    # mdadm --monitor's alert (Monitor.c): popen("/usr/lib/sendmail -t"), To: in the header
    "mdadm-style": lambda m: ([os.path.join(m.prefix, "usr", "lib", "sendmail"), "-t"],
                              b"From: mdadm monitoring <root>\nTo: root\n"
                              b"Subject: Fail event on /dev/md0:h\n\nmdadm event\n",
                              b"mdadm event"),
    # smartd's warning: its mail script runs `mail -s SUBJECT root` (bsd-mailx here)
    "smartd-style": lambda m: (["bsd-mailx", "-s", "SMART error detected on host: h",
                                "root"], b"smartd warning\n", b"smartd warning"),
    # bsd-mailx with `set sendmail=` in its MAILRC: runs sendmail -i ... recipients
    "bsd-mailx": lambda m: (["bsd-mailx", "-s", "mailx subject", m.admin.pw_name],
                            b"mailx body\n", b"Subject: mailx subject"),
    # s-nail with mta= (its sendmail variable): runs the mta with -i and recipients
    "s-nail": lambda m: (["s-nail", "-:/", "-S", "mta=" + m.sendmail, "-s", "s-nail subject",
                          m.admin.pw_name + "@test.example"], b"s-nail body\n",
                         b"Subject: s-nail subject"),
    # mutt: its default $sendmail is "/usr/sbin/sendmail -oem -oi"
    "mutt": lambda m: (["mutt", "-n", "-F", "/dev/null", "-e",
                        "set sendmail='%s -oem -oi'; set from=dev@test.example; "
                        "set use_from=yes" % m.sendmail,
                        "-s", "mutt subject", m.admin.pw_name + "@test.example"],
                       b"mutt body\n", b"Subject: mutt subject"),
}


@needs_root
@pytest.mark.parametrize("caller", sorted(CALLERS) + ["git-send-email"])
def test_real_callers(mta, caller):
    base = os.path.dirname(mta.path)
    env = {"PATH": "/usr/bin:/bin", "HOME": base, "LANG": "C"}
    if caller == "git-send-email":
        patch = _git_patch(base)
        env.update(GIT_COMMITTER_NAME="Dev", GIT_COMMITTER_EMAIL="dev@test.example",
                   GIT_AUTHOR_NAME="Dev", GIT_AUTHOR_EMAIL="dev@test.example")
        # git send-email --smtp-server=PATH runs "PATH -i RECIPIENTS"
        args, data, marker = (["git", "send-email", "--smtp-server=" + mta.sendmail,
                               "--to=%s@test.example" % mta.admin.pw_name,
                               "--from=dev@test.example", "--confirm=never", "--quiet",
                               patch], b"", b"git send-email patch")
    else:
        args, data, marker = CALLERS[caller](mta)
    if caller in ("bsd-mailx", "smartd-style"):
        rc = os.path.join(base, "mailrc")
        with open(rc, "w") as f:
            f.write("set sendmail=%s\n" % mta.sendmail)
        env["MAILRC"] = rc
    r = subprocess.run(args, input=data, env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r
    assert wait_for(lambda: any(marker in m for m in _new(mta.maildir)), 60), \
        (caller, _new(mta.maildir))


@needs_root
def test_one_user_mode_mail_to_yourself(tmp_path):
    """A plain user's own root (qpy-install run as that user): `qpy-sendmail -i $USER`
    lands in that user's Maildir; nothing bounces."""
    import pwd
    import signal
    base = qpytest.scratch_dir("solo")
    user = qpytest.make_user("qtsmsolo", os.path.join(base, "home"))
    os.chown(base, user.pw_uid, user.pw_gid)
    root = os.path.join(base, "qpy")
    as_user = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
               "--init-groups", "--"]
    env = {"PATH": "/usr/bin:/bin", "QPY_ROOT": root, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "HOME": user.pw_dir}
    try:
        r = subprocess.run(as_user + [qpytest.bin_path("qpy-install"), root, "--me",
                                      "solo.example"], env=env, capture_output=True)
        assert r.returncode == 0 and b"one-user mode" in r.stdout, r
        log = open(os.path.join(base, "start.log"), "ab")
        p = subprocess.Popen(as_user + [qpytest.bin_path("qpy-start"), root], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            r = subprocess.run(as_user + [qpytest.bin_path("qpy-sendmail"), "-i",
                                          user.pw_name], input=b"Subject: to me\n\nhi\n",
                               env=env, capture_output=True)
            assert r.returncode == 0, r
            maildir = os.path.join(user.pw_dir, "Maildir")
            assert wait_for(lambda: any(b"Subject: to me" in m for m in _new(maildir)), 60), \
                open(os.path.join(base, "start.log"), "rb").read()[-3000:]
            (m,) = _new(maildir)
            assert b"Delivered-To: %s@solo.example" % user.pw_name.encode() in m
            assert os.stat(os.path.join(maildir, "new")).st_uid == user.pw_uid
            time.sleep(1)
            assert b"bounce" not in open(os.path.join(base, "start.log"), "rb").read()
            assert pwd.getpwuid(os.stat(maildir).st_uid).pw_name == user.pw_name
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
    finally:
        qpytest.remove_tree(base)


def test_system_mta_launchers_move_aside_and_restore(qroot):
    """--system-mta into a scratch prefix: four launchers bound to the root (not links),
    what was there saved and put back by --remove-system-mta; a second run keeps the
    first saved file."""
    prefix = os.path.join(os.path.dirname(qroot.path), "sys")
    os.makedirs(os.path.join(prefix, "usr", "sbin"))
    os.makedirs(os.path.join(prefix, "usr", "lib"))
    old = os.path.join(prefix, "usr", "sbin", "sendmail")
    with open(old, "w") as f:
        f.write("#!/bin/sh\necho the old MTA\n")
    os.symlink("../sbin/sendmail", os.path.join(prefix, "usr", "lib", "sendmail"))
    for _ in range(2):
        r = subprocess.run([qroot.bin("qpy-install"), qroot.path, "--system-mta",
                            "--system-prefix", prefix], capture_output=True)
        assert r.returncode == 0, r
    for rel in ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases"):
        path = os.path.join(prefix, rel)
        assert not os.path.islink(path) and os.access(path, os.X_OK)
        assert ("QPY_ROOT='%s'" % qroot.path) in open(path).read()
    with open(old + ".qpy-saved") as f:
        assert "the old MTA" in f.read()
    # the launcher works from a caller with no QPY_ROOT at all
    r = subprocess.run([old, "-i", "x@y.example"], input=b"Subject: l\n\nx\n",
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True)
    assert r.returncode == 0 and len(os.listdir(qroot.paths.drop)) == 1, r
    r = subprocess.run([os.path.join(prefix, "usr/bin/mailq")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.startswith("messages in queue: 1\n"), r
    r = subprocess.run([qroot.bin("qpy-install"), "--remove-system-mta", "--system-prefix",
                        prefix], capture_output=True)
    assert r.returncode == 0, r
    assert "the old MTA" in open(old).read()
    assert os.readlink(os.path.join(prefix, "usr", "lib", "sendmail")) == "../sbin/sendmail"
    assert not os.path.exists(os.path.join(prefix, "usr", "bin", "mailq"))


@needs_root
def test_system_mta_refuses_while_a_debian_package_owns_sendmail(qroot):
    """For real, on /: postfix (installed for the tests) owns /usr/sbin/sendmail, so
    qpy-install changes nothing, names it and says how to remove it."""
    if subprocess.run(["dpkg", "-S", "/usr/sbin/sendmail"], capture_output=True).returncode:
        pytest.skip("no Debian package owns /usr/sbin/sendmail here")
    before = {p: os.lstat(p) for p in ("/usr/sbin/sendmail", "/usr/bin/mailq")}
    r = subprocess.run([qroot.bin("qpy-install"), qroot.path, "--system-mta"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r
    assert "belongs to the Debian package" in r.stderr and "apt-get remove" in r.stderr, r
    for p, st in before.items():
        now = os.lstat(p)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
        assert not os.path.exists(p + ".qpy-saved")


@needs_root
def test_one_id_from_queued_as_through_the_log_mailq_qrm_and_logsum(mta):
    """sendmail -bs's `250 ... queued as ID`: the same ID in qpy-start's log lines about
    the message (pickup, new msg, info msg, starting delivery), in mailq, taken by
    qpy-qrm, and counted by qpy-logsum from that log."""
    port = qpytest.free_port()
    mta.control("smtproutes", "far.example:127.0.0.1:%d" % port)
    import signal
    os.kill(mta.procs[0].pid, signal.SIGHUP)
    r = subprocess.run(["swaks", "--pipe", mta.sendmail + " -bs", "--to",
                        "someone@far.example", "--from", "a@test.example"],
                       capture_output=True, timeout=60)
    m = re.search(rb"250 2\.0\.0 Ok: queued as (\d+)", r.stdout)
    assert r.returncode == 0 and m, r
    msg_id = m.group(1).decode()
    log = os.path.join(os.path.dirname(mta.path), "start.log")

    def text() -> str:
        return open(log, "rb").read().decode("utf-8", "replace")
    assert wait_for(lambda: "delivery" in text() and
                    re.search(r"starting delivery \d+: msg %s to remote" % msg_id, text()), 60)
    for pattern in (r"pickup msg %s: uid \d+ bytes" % msg_id, r"new msg %s\b" % msg_id,
                    r"info msg %s: bytes" % msg_id):
        assert re.search(pattern, text()), (pattern, text()[-3000:])
    ids = set(re.findall(r"msg (\d+)", text()))
    assert ids == {msg_id}, ids
    mailq = subprocess.run([os.path.join(mta.prefix, "usr", "bin", "mailq")],
                           capture_output=True, text=True).stdout
    assert msg_id in mailq, mailq
    r = mta.run("qpy-qread", mta.path, msg_id)
    assert r.returncode == 0 and r.stdout.decode().startswith(msg_id + "  "), r
    assert "someone@far.example" in r.stdout.decode()
    r = mta.run("qpy-qread", msg_id[:-1] + "9" if msg_id[-1] != "9" else msg_id[:-1] + "8")
    assert r.returncode == 100 and b"not in the queue" in r.stderr and not r.stdout, r
    r = mta.run("qpy-qrm", mta.path, msg_id)
    assert r.returncode == 0, r
    assert wait_for(lambda: "remove msg %s by qpy-qrm" % msg_id in text(), 30), text()[-2000:]
    r = mta.run("qpy-logsum", log)
    assert r.returncode == 0 and re.search(rb"removed\D*1\b", r.stdout), r.stdout
    r = mta.run("qpy-logsum", mta.path, "--msg", msg_id, log)
    hist = r.stdout.decode()
    assert r.returncode == 0 and "pickup msg %s" % msg_id in hist, r
    for words in ("new msg %s" % msg_id, "info msg %s" % msg_id, ": deferral: ",
                  "remove msg %s by qpy-qrm" % msg_id):
        assert words in hist, (words, hist)
    assert all(msg_id in ln or re.search(r"delivery \d+: ", ln) for ln in hist.splitlines())


@needs_root
def test_real_cron_job_mails_its_output_through_qpy(mta):
    """Debian's cron itself, in a private mount namespace where /usr/sbin/sendmail is a
    wrapper that records its arguments and execs qpy's launcher; an @reboot job (run
    at cron's start because the private /run has no crond.reboot) prints a line; cron
    mails it to root, which /etc/aliases routes to the admin."""
    import shutil
    import signal
    if not shutil.which("cron"):
        pytest.skip("Debian's cron is not installed")
    base = os.path.dirname(mta.path)
    ns = os.path.join(base, "cronns")
    for d in ("cron.d", "run", "spool/crontabs"):
        os.makedirs(os.path.join(ns, d))
    with open(os.path.join(ns, "cron.d", "qpytest"), "w") as f:
        f.write("@reboot root echo output of a real cron job\n")
    os.chmod(os.path.join(ns, "cron.d", "qpytest"), 0o644)
    open(os.path.join(ns, "crontab"), "w").close()
    args = os.path.join(ns, "args")
    wrapper = os.path.join(ns, "sendmail")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\necho \"$@\" > %s\nexec %s \"$@\"\n" % (args, mta.sendmail))
    os.chmod(wrapper, 0o755)
    script = ("mount --bind %(w)s /usr/sbin/sendmail && mount --bind %(ns)s/cron.d /etc/cron.d"
              " && mount --bind %(ns)s/crontab /etc/crontab && mount --bind %(ns)s/run /run"
              " && mount --bind %(ns)s/spool /var/spool/cron && exec cron -f"
              % {"w": wrapper, "ns": ns})
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        assert wait_for(lambda: any(b"output of a real cron job" in m
                                    for m in _new(mta.maildir)), 60), _new(mta.maildir)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    assert open(args).read().split() == ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]
    (m,) = [m for m in _new(mta.maildir) if b"output of a real cron job" in m]
    assert b"From: root (Cron Daemon)" in m and b"Delivered-To: root@test.example" in m
