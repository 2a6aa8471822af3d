"""Local delivery: qpy-lspawn + qpy-local with real users, .qmail rules, Maildir, mbox,
programs, forwards, the alias user, and hostile homes and .qmail files.

Most tests drive the real qpy-lspawn directly: a SOCK_SEQPACKET socketpair, one end
as its fd 0, requests and results in qpy.common.spawn's format (as qpy-queue-send
sends them). The end-to-end tests go through qpy-sendmail, qpy-pickup and
qpy-start. Everything here needs root (real uids) and skips otherwise.
"""

from __future__ import annotations

import fcntl
import grp
import itertools
import mailbox
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import time

import psutil
import pytest
import qpytest
from qpytest import maildir_path

from qpy.common import dropfile, durable, spawn

SENDER = b"sender@remote.example"
MSG = b"Subject: hello\nFrom: sender@remote.example\n\nFrom the start\nbody line\n>From quoted\n"
_ids = itertools.count(1)


class LSpawn:
    """A running qpy-lspawn with its request socket."""

    def __init__(self, root: qpytest.QRoot):
        self.root = root
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.errpath = os.path.join(root.path, "lspawn.err")
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen([root.bin("qpy-lspawn")], stdin=theirs,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env=root.env())
        theirs.close()
        self.msgdir = os.path.join(root.path, "msgs")
        os.makedirs(self.msgdir, exist_ok=True)
        self.qpyq = pwd.getpwnam("qpyq")

    def message_fd(self, message: bytes) -> int:
        path = os.path.join(self.msgdir, str(next(_ids)))
        with open(path, "wb") as f:
            f.write(message)
        os.chown(path, self.qpyq.pw_uid, self.qpyq.pw_gid)
        os.chmod(path, 0o640)
        return os.open(path, os.O_RDONLY)

    def send(self, rcpts: list[bytes], message: bytes = MSG, sender: bytes = SENDER) -> int:
        d = next(_ids)
        fd = self.message_fd(message)
        try:
            spawn.send_request(self.sock, d, sender, rcpts, fd)
        finally:
            os.close(fd)
        return d

    def recv(self, timeout: float = 60) -> tuple[int, list[tuple[bytes, bytes]]]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no result from qpy-lspawn; stderr: %r" % self.stderr()
        got = spawn.recv_result(self.sock)
        assert got is not None
        return got

    def deliver(self, rcpt: bytes, message: bytes = MSG, sender: bytes = SENDER,
                timeout: float = 60) -> tuple[bytes, str]:
        d = self.send([rcpt], message, sender)
        got, results = self.recv(timeout)
        assert got == d
        status, text = results[0]
        return status, text.decode()

    def stderr(self) -> bytes:
        with open(self.errpath, "rb") as f:
            return f.read()

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def ls(qroot):
    h = LSpawn(qroot)
    try:
        yield h
    finally:
        rc = h.close()
        assert rc == 0, h.stderr()


@pytest.fixture
def homes():
    """Two real users qtlalice and qtlbob with fresh homes."""
    base = qpytest.scratch_dir("home")
    alice = qpytest.make_user("lalice", home=os.path.join(base, "alice"))
    bob = qpytest.make_user("lbob", home=os.path.join(base, "bob"))
    try:
        yield alice, bob
    finally:
        qpytest.remove_tree(base)


def put(pw: pwd.struct_passwd, name: str, data: bytes | str, mode: int = 0o644) -> str:
    """Write a file in pw's home, owned by pw."""
    path = os.path.join(pw.pw_dir, name)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


def new_files(path: str) -> list[str]:
    try:
        return sorted(os.path.join(path, "new", n) for n in os.listdir(os.path.join(path, "new")))
    except FileNotFoundError:
        return []


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def addr(pw: pwd.struct_passwd, ext: str = "") -> bytes:
    return (pw.pw_name + ext + "@test.example").encode()


# ---- Maildir, mbox, readers --------------------------------------------------------

@qpytest.needs_root
def test_maildir_default_delivery(ls, homes):
    alice, _ = homes
    status, text = ls.deliver(addr(alice))
    assert status == b"K", text
    assert text.startswith("did 1+0+0")
    md = maildir_path(alice)
    files = new_files(md)
    assert len(files) == 1
    st = os.stat(files[0])
    assert st.st_uid == alice.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    data = read(files[0])
    assert data.startswith(b"Return-Path: <sender@remote.example>\n"
                           b"Delivered-To: qtlalice@test.example\n")
    assert data.endswith(MSG)  # no From_ line, no quoting in a Maildir
    assert os.listdir(os.path.join(md, "tmp")) == []
    msgs = list(mailbox.Maildir(md, create=False))
    assert len(msgs) == 1 and msgs[0]["Subject"] == "hello"
    assert msgs[0]["Delivered-To"] == "qtlalice@test.example"


@pytest.mark.skipif(not shutil.which("mutt") or not shutil.which("script"),
                    reason="mutt or script missing")
@qpytest.needs_root
def test_mutt_reads_maildir_and_mbox(ls, homes, tmp_path):
    alice, _ = homes
    put(alice, ".qmail", "./Maildir/\n./Mailbox\n")
    maildir_path(alice, make=True)
    assert ls.deliver(addr(alice))[0] == b"K"
    (tmp_path / "Mail").mkdir()  # or mutt asks to create it, eating our keys
    for box in (maildir_path(alice), os.path.join(alice.pw_dir, "Mailbox")):
        out = tmp_path / "mutt.out"
        if out.exists():
            out.unlink()
        cmd = ("mutt -n -F /dev/null -R -f %s -e 'set wait_key=no' "
               "-e 'push \"|cat > %s<enter>q\"'" % (box, out))
        subprocess.run(["script", "-qfec", cmd, str(tmp_path / "typescript")], env={
            "HOME": str(tmp_path), "TERM": "vt100", "PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=20)
        assert out.exists(), (tmp_path / "typescript").read_bytes()[-2000:]
        got = out.read_bytes()
        assert b"Subject: hello" in got and b"body line" in got, box
        assert b"Delivered-To: qtlalice@test.example" in got


@qpytest.needs_root
def test_mbox_quoting_and_reader(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", "./Mailbox\n")
    assert ls.deliver(addr(alice))[0] == b"K"
    assert ls.deliver(addr(alice), message=b"Subject: second\n\nno newline at end")[0] == b"K"
    box = os.path.join(alice.pw_dir, "Mailbox")
    raw = read(box)
    assert raw.startswith(b"From sender@remote.example ")
    assert b"\n>From the start\n" in raw and b"\n>>From quoted\n" in raw
    assert raw.endswith(b"no newline at end\n\n")
    assert os.stat(box).st_uid == alice.pw_uid
    assert not os.path.exists(box + ".lock")
    msgs = list(mailbox.mbox(box, create=False))
    assert [m["Subject"] for m in msgs] == ["hello", "second"]
    assert msgs[0]["Return-Path"] == "<sender@remote.example>"


@qpytest.needs_root
def test_bounce_sender_in_mbox_from_line(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", "./Mailbox\n")
    assert ls.deliver(addr(alice), sender=b"")[0] == b"K"
    raw = read(os.path.join(alice.pw_dir, "Mailbox"))
    assert raw.startswith(b"From MAILER-DAEMON ")
    assert b"\nReturn-Path: <>\n" in raw


# ---- programs ------------------------------------------------------------------------

PROG = """|env > "$HOME/env.out"; echo $$ > "$HOME/pid"; cat > "$HOME/stdin.out"; \
i=0; while [ ! -e "$HOME/go" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo prog said hi
"""


def _env(path: str) -> dict[str, str]:
    out = {}
    for line in read(path).decode().split("\n"):
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


@qpytest.needs_root
def test_program_env_uid_and_stdin(ls, homes):
    alice, _ = homes
    put(alice, ".qmail-prog-default", PROG)
    d = ls.send([addr(alice, "-prog-Foo-bar")])
    pidfile = os.path.join(alice.pw_dir, "pid")
    assert qpytest.wait_for(lambda: os.path.exists(pidfile) and read(pidfile).strip())
    proc = psutil.Process(int(read(pidfile)))
    uids, gids = proc.uids(), proc.gids()
    assert set(uids) == {alice.pw_uid} and set(gids) == {alice.pw_gid}
    # its parent is the delivery child, named for the user, also under the user's uid
    parent = proc.parent()
    assert parent.cmdline()[0].startswith("qpy-local qtlalice") or \
        "qpy-local" in " ".join(parent.cmdline())
    assert set(parent.uids()) == {alice.pw_uid}
    put(alice, "go", "")
    got, results = ls.recv()
    assert got == d and results[0][0] == b"K", results
    assert b"did 0+0+1" in results[0][1] and b"prog said hi" in results[0][1]
    env = _env(os.path.join(alice.pw_dir, "env.out"))
    expect = {
        "SENDER": "sender@remote.example", "NEWSENDER": "sender@remote.example",
        "RECIPIENT": "qtlalice-prog-Foo-bar@test.example", "USER": "qtlalice",
        "HOME": alice.pw_dir, "HOST": "test.example", "HOST2": "test", "HOST3": "test",
        "HOST4": "test", "LOCAL": "qtlalice-prog-Foo-bar", "EXT": "prog-Foo-bar",
        "EXT2": "Foo-bar", "EXT3": "bar", "EXT4": "", "DEFAULT": "Foo-bar",
    }
    for k, v in expect.items():
        assert env.get(k) == v, k
    # multi-line values: the first line is what `env` shows
    assert env["DTLINE"] == "Delivered-To: qtlalice-prog-Foo-bar@test.example"
    assert env["RPLINE"] == "Return-Path: <sender@remote.example>"
    assert env["UFLINE"].startswith("From sender@remote.example ")
    assert read(os.path.join(alice.pw_dir, "stdin.out")) == MSG  # no RP/DT lines
    assert os.stat(os.path.join(alice.pw_dir, "env.out")).st_uid == alice.pw_uid


@qpytest.needs_root
@pytest.mark.parametrize("code,status", [(100, b"D"), (111, b"Z"), (64, b"D"), (1, b"Z")])
def test_program_exit_codes(ls, homes, code, status):
    alice, _ = homes
    put(alice, ".qmail", f"|echo failing with {code}; exit {code}\n./Maildir/\n")
    got, text = ls.deliver(addr(alice))
    assert got == status
    assert f"failing with {code}" in text
    assert new_files(maildir_path(alice)) == []  # processing stopped at the failure


@qpytest.needs_root
def test_program_99_stops_but_forwards_go(ls, homes, qroot):
    alice, bob = homes
    put(alice, ".qmail", f"&{bob.pw_name}@test.example\n|exit 99\n./Maildir/\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"K", text
    assert text.startswith("did 0+1+1")
    assert new_files(maildir_path(alice)) == []
    assert len(drops(qroot)) == 1


@qpytest.needs_root
def test_shell_metacharacters_in_sender_stay_data(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", '|printf "%s" "$SENDER" > "$HOME/sender.out"\n')
    evil = b"a$(touch${IFS}/tmp/qpy-pwned)`id`@x.example"
    assert ls.deliver(addr(alice), sender=evil)[0] == b"K"
    assert read(os.path.join(alice.pw_dir, "sender.out")) == evil
    assert not os.path.exists("/tmp/qpy-pwned")


@qpytest.needs_root
def test_function_import_values_kept_out_of_env(ls, qroot):
    p = os.path.join(qroot.paths.alias, ".qmail-default")
    with open(p, "w") as f:
        f.write('|env > "$HOME/alias-env.out"\n')
    os.chmod(p, 0o644)
    rcpt = b'"a-() { :;}; touch /tmp/qpy-shellshock"@test.example'
    status, text = ls.deliver(rcpt)
    assert status == b"K", text
    out = os.path.join(qroot.paths.alias, "alias-env.out")
    env = _env(out)
    assert env["EXT"] == '"a-() { :;}; touch /tmp/qpy-shellshock"'
    assert "EXT2" not in env  # would start with "() {"
    assert os.stat(out).st_uid == pwd.getpwnam("qpyalias").pw_uid
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # umask 077 as qmail-local
    assert not os.path.exists("/tmp/qpy-shellshock")


# ---- forwards ------------------------------------------------------------------------

def drops(qroot) -> list[tuple[bytes, bytes, list[bytes]]]:
    """(message, sender, recipients) of every final drop file."""
    out = []
    for name in qroot.queue_files("drop"):
        if not dropfile.is_final_name(name):
            continue
        data = read(os.path.join(qroot.paths.drop, name))
        out.append(qpytest.split_drop(data))
    return out


@qpytest.needs_root
def test_forward_keeps_sender_adds_delivered_to(ls, homes, qroot):
    alice, bob = homes
    put(alice, ".qmail", f"&{bob.pw_name}@test.example\nother@elsewhere.example\n"
                         "# a comment\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"K" and text.startswith("did 0+2+0"), text
    [(msg, sender, rcpts)] = drops(qroot)
    assert sender == SENDER
    assert rcpts == [b"qtlbob@test.example", b"other@elsewhere.example"]
    assert msg == b"Delivered-To: qtlalice@test.example\n" + MSG
    st = os.stat(os.path.join(qroot.paths.drop, qroot.queue_files("drop")[-1]))
    assert st.st_uid == alice.pw_uid  # injected by the user, so pickup names that uid


@qpytest.needs_root
def test_owner_file_sets_newsender(ls, homes, qroot):
    alice, bob = homes
    put(alice, ".qmail-list", f"&{bob.pw_name}@test.example\n")
    put(alice, ".qmail-list-owner", "./Maildir/\n")
    assert ls.deliver(addr(alice, "-list"))[0] == b"K"
    [(_, sender, _)] = drops(qroot)
    assert sender == b"qtlalice-list-owner@test.example"


@qpytest.needs_root
def test_delivered_to_loop_bounces(ls, homes):
    alice, _ = homes
    looping = b"Delivered-To: qtlalice@test.example\n" + MSG
    status, text = ls.deliver(addr(alice), message=looping)
    assert status == b"D" and "looping" in text
    # another address's line in the header, or our line in the body, is no loop
    other = b"Delivered-To: someone@test.example\n" + MSG + b"Delivered-To: qtlalice@test.example\n"
    assert ls.deliver(addr(alice), message=other)[0] == b"K"


# ---- extensions, default, alias, assign -------------------------------------------------

@qpytest.needs_root
def test_extension_files_and_default(ls, homes):
    alice, _ = homes
    put(alice, ".qmail-work", "./work/\n")
    put(alice, ".qmail-lists-default", "./lists/\n")
    put(alice, ".qmail-default", "./rest/\n")
    for sub in ("work", "lists", "rest"):
        maildir_path(alice, sub, make=True)
    assert ls.deliver(addr(alice, "-Work"))[0] == b"K"          # case folded for the file
    assert ls.deliver(addr(alice, "-lists-python"))[0] == b"K"
    assert ls.deliver(addr(alice, "-lists-a.b"))[0] == b"K"      # dots become colons
    assert ls.deliver(addr(alice, "-other"))[0] == b"K"
    assert len(new_files(maildir_path(alice, "work"))) == 1
    assert len(new_files(maildir_path(alice, "lists"))) == 2
    assert len(new_files(maildir_path(alice, "rest"))) == 1
    work = read(new_files(maildir_path(alice, "work"))[0])
    assert b"Delivered-To: qtlalice-Work@test.example\n" in work


@qpytest.needs_root
def test_empty_dotqmail_forward_only_and_blank_first_line(ls, homes, qroot):
    alice, bob = homes
    put(alice, ".qmail", "")
    assert ls.deliver(addr(alice))[0] == b"K"  # empty: the default delivery
    assert len(new_files(maildir_path(alice))) == 1
    put(alice, ".qmail", "\n./Maildir/\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "blank" in text
    put(alice, ".qmail", f"&{bob.pw_name}@test.example\n", mode=0o744)  # x bit: forward-only
    assert ls.deliver(addr(alice))[0] == b"K"
    put(alice, ".qmail", f"&{bob.pw_name}@test.example\n./Maildir/\n", mode=0o744)
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "x bit" in text
    assert len(drops(qroot)) == 1 and len(new_files(maildir_path(alice))) == 1


@qpytest.needs_root
def test_unknown_extension_without_default_bounces(ls, homes):
    alice, _ = homes
    status, text = ls.deliver(addr(alice, "-nosuch"))
    assert status == b"D" and "no mailbox" in text


@qpytest.needs_root
def test_postmaster_and_root_go_to_alias(ls, qroot):
    alias = qroot.paths.alias
    qa = pwd.getpwnam("qpyalias")
    assert os.stat(alias).st_uid == qa.pw_uid
    for name in (".qmail-postmaster", ".qmail-root"):
        p = os.path.join(alias, name)
        with open(p, "wb") as f:
            f.write(b"./Maildir/\n")
        os.chmod(p, 0o644)  # owned by root, as an admin writes it
    md = os.path.join(alias, "Maildir")
    for d in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(md, d), exist_ok=True)
        os.chown(os.path.join(md, d), qa.pw_uid, qa.pw_gid)
    assert ls.deliver(b"Postmaster@test.example")[0] == b"K"
    assert ls.deliver(b"root@test.example")[0] == b"K"
    files = new_files(md)
    assert len(files) == 2 and all(os.stat(f).st_uid == qa.pw_uid for f in files)
    status, text = ls.deliver(b"nobody-here@test.example")
    assert status == b"D" and "no mailbox" in text


@qpytest.needs_root
def test_users_assign_exact_and_prefix(ls, homes, qroot):
    alice, bob = homes
    with open(os.path.join(qroot.paths.users, "assign"), "w") as f:
        f.write(f"=info:{alice.pw_name}:{alice.pw_uid}:{alice.pw_gid}:{alice.pw_dir}:-:info:\n"
                f"+sales-:{bob.pw_name}:{bob.pw_uid}:{bob.pw_gid}:{bob.pw_dir}:-:s-:\n"
                f"=boss:root:0:0:/root:::\n.\n")
    put(alice, ".qmail-info", "./Maildir/\n")
    put(bob, ".qmail-s-default", "./Maildir/\n")
    maildir_path(alice, make=True)
    maildir_path(bob, make=True)
    assert ls.deliver(b"INFO@test.example")[0] == b"K"
    assert ls.deliver(b"sales-east@test.example")[0] == b"K"
    assert len(new_files(maildir_path(alice))) == 1 and len(new_files(maildir_path(bob))) == 1
    status, text = ls.deliver(b"boss@test.example")
    assert status == b"Z" and "root" in text


@qpytest.needs_root
def test_users_lookup_rules(qroot, homes):
    from qpy.common import users
    alice, _ = homes
    r = users.lookup(qroot.path, b"qtlalice-Foo-Bar")
    assert (r.user, r.uid, r.dash, r.ext) == ("qtlalice", alice.pw_uid, b"-", b"Foo-Bar")
    assert users.lookup(qroot.path, b"QTLALICE").dash == b""
    assert users.lookup(qroot.path, b"root").user == "qpyalias"
    assert users.lookup(qroot.path, b"root").ext == b"root"
    valid = users.valid_locals(qroot.path)
    assert b"qtlalice" in valid and b"qtlalice-x" not in valid
    put(alice, ".qmail-x", "./Maildir/\n")
    assert b"qtlalice-x" in users.valid_locals(qroot.path)


@qpytest.needs_root
def test_valid_locals_assign_and_alias_default(qroot, homes):
    from qpy.common import users
    alice, _ = homes
    with open(os.path.join(qroot.paths.users, "assign"), "w") as f:
        f.write(f"=info:{alice.pw_name}:{alice.pw_uid}:{alice.pw_gid}:{alice.pw_dir}:-:i:\n"
                f"+Sales-:{alice.pw_name}:{alice.pw_uid}:{alice.pw_gid}:{alice.pw_dir}:-::\n.\n")
    # with a dash, delivery needs .qmail-i (info) and .qmail-x or .qmail-default
    # (sales-x) in that home, else it bounces them as unknown: not valid before
    valid = users.valid_locals(qroot.path)
    assert b"info" not in valid and b"sales-x" not in valid
    put(alice, ".qmail-i", "./Maildir/\n")
    put(alice, ".qmail-default", "./Maildir/\n")
    valid = users.valid_locals(qroot.path)
    assert b"INFO" in valid and b"sales-x" in valid and b"info-x" not in valid
    assert b"nosuchname" not in valid
    p = os.path.join(qroot.paths.alias, ".qmail-default")
    with open(p, "w") as f:
        f.write("./Maildir/\n")
    assert b"nosuchname" in users.valid_locals(qroot.path)


@qpytest.needs_root
def test_qpy_local_by_hand(qroot, homes):
    alice, _ = homes
    put(alice, ".qmail-x", "./Mailbox\n|echo hi\n")
    msg = put(alice, "msg", MSG)
    args = [alice.pw_name, alice.pw_dir, alice.pw_name + "-x", "-", "x", "test.example",
            "s@remote.example", "./Maildir/"]
    def run(*argv: str) -> subprocess.CompletedProcess:
        with open(msg, "rb") as f:
            return subprocess.run(["setpriv", "--reuid", str(alice.pw_uid), "--regid",
                                   str(alice.pw_gid), "--init-groups", "--",
                                   qroot.bin("qpy-local"), *argv], stdin=f,
                                  capture_output=True, env=qroot.env(), timeout=60)
    r = run("-n", *args)
    assert r.returncode == 0 and r.stdout == b"mbox ./Mailbox\nprogram echo hi\n"
    r = run(*args)
    assert r.returncode == 0 and r.stdout == b"did 1+0+1 hi\n", r
    assert mailbox.mbox(os.path.join(alice.pw_dir, "Mailbox"))[0]["Subject"] == "hello"
    r = qroot.run("qpy-local", *args, input=MSG)  # as root: refused
    assert r.returncode == 111 and b"root" in r.stderr


@pytest.mark.parametrize("bad", [b"=a:b:1:1:/h::\n.\n", b"=a:b:x:1:/h:::\n.\n",
                                 b"=a:b:1:1:h:::\n.\n", b"=a:b:1:1:/h:::\n", b"a\n.\n"])
@qpytest.needs_root
def test_assign_malformed_defers(ls, homes, qroot, bad):
    alice, _ = homes
    with open(os.path.join(qroot.paths.users, "assign"), "wb") as f:
        f.write(bad)
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "users/assign" in text


# ---- hostile homes and .qmail files --------------------------------------------------------

@qpytest.needs_root
def test_dotqmail_symlink_to_other_users_file(ls, homes):
    alice, bob = homes
    put(bob, ".qmail", f"|touch {alice.pw_dir}/ran\n", mode=0o644)
    os.symlink(os.path.join(bob.pw_dir, ".qmail"), os.path.join(alice.pw_dir, ".qmail"))
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "not owned" in text
    assert not os.path.exists(os.path.join(alice.pw_dir, "ran"))
    assert new_files(maildir_path(alice)) == []


@qpytest.needs_root
def test_home_writable_by_others_defers(ls, homes):
    alice, _ = homes
    os.chmod(alice.pw_dir, 0o777)
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "writable" in text
    os.chmod(alice.pw_dir, 0o755)
    assert ls.deliver(addr(alice))[0] == b"K"


@qpytest.needs_root
def test_dotqmail_writable_by_group_defers(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", "./Maildir/\n", mode=0o664)
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "writable" in text


@qpytest.needs_root
def test_dotqmail_10000_lines(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", "".join("# comment %d\n" % i for i in range(10000)) + "./Maildir/\n")
    maildir_path(alice, make=True)
    assert ls.deliver(addr(alice))[0] == b"K"
    assert len(new_files(maildir_path(alice))) == 1
    put(alice, ".qmail", "".join(f"&x{i}@remote.example\n" for i in range(10000)))
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "instructions" in text


@qpytest.needs_root
def test_dotqmail_1mb_line(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", b"|" + b"x" * 1024 * 1024 + b"\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "larger" in text
    put(alice, ".qmail", b"|" + b"x" * 100_000 + b"\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "longer" in text


@qpytest.needs_root
def test_program_that_never_exits_is_killed_and_deferred(ls, homes, qroot):
    alice, _ = homes
    qroot.control("timeoutlocal", "2")
    ls.close()
    ls2 = LSpawn(qroot)  # re-reads control files
    try:
        put(alice, ".qmail", '|echo $$ > "$HOME/pid"; sleep 3600 & wait\n')
        status, text = ls2.deliver(addr(alice))
        assert status == b"Z" and "timed out" in text
        pid = int(read(os.path.join(alice.pw_dir, "pid")))
        assert qpytest.wait_for(lambda: not psutil.pid_exists(pid), timeout=10)
        left = [p for p in psutil.process_iter(["uids", "status", "cmdline"])
                if p.info["uids"] and p.info["uids"].real == alice.pw_uid
                and p.info["status"] != "zombie"
                and not " ".join(p.info["cmdline"] or []).startswith("qpy-local ")]
        assert left == []  # the sleep in the background went with its process group
        # the worker that ran it (idle now) is the only process left as alice
        workers = [p for p in psutil.Process(ls2.proc.pid).children()
                   if p.uids().real == alice.pw_uid]
        assert len(workers) == 1
    finally:
        assert ls2.close() == 0


@qpytest.needs_root
def test_killed_delivery_takes_its_programs_along(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", '|echo $$ $PPID > "$HOME/pids"; sleep 3600 & sleep 3600; echo\n')
    d = ls.send([addr(alice)])
    pids = os.path.join(alice.pw_dir, "pids")
    assert qpytest.wait_for(lambda: os.path.exists(pids) and read(pids).strip())
    prog, child = (int(x) for x in read(pids).split())
    os.kill(child, signal.SIGKILL)
    got, results = ls.recv()
    assert got == d and results[0][0] == b"Z" and b"crashed" in results[0][1]

    def gone() -> bool:
        return not [p for p in psutil.process_iter(["uids", "status"]) if p.info["uids"]
                    and p.info["uids"].real == alice.pw_uid and p.info["status"] != "zombie"]
    assert qpytest.wait_for(gone, timeout=10)
    assert not psutil.pid_exists(prog) or psutil.Process(prog).status() == "zombie"


@qpytest.needs_root
def test_maildir_that_is_a_file_defers(ls, homes):
    alice, _ = homes
    put(alice, "Maildir", "not a directory")
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "maildir" in text
    assert read(os.path.join(alice.pw_dir, "Maildir")) == b"not a directory"


@qpytest.needs_root
def test_mbox_that_is_a_fifo_defers(ls, homes):
    alice, _ = homes
    fifo = os.path.join(alice.pw_dir, "Mailbox")
    os.mkfifo(fifo)
    os.chown(fifo, alice.pw_uid, alice.pw_gid)
    put(alice, ".qmail", "./Mailbox\n")
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "mbox" in text
    # with a reader on the FIFO it is still no mbox
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status, text = ls.deliver(addr(alice))
        assert status == b"Z" and "regular file" in text
    finally:
        os.close(r)


@qpytest.needs_root
def test_mbox_waits_for_lock(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", "./Mailbox\n")
    assert ls.deliver(addr(alice))[0] == b"K"
    box = os.path.join(alice.pw_dir, "Mailbox")
    before = os.path.getsize(box)
    with open(box, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        d = ls.send([addr(alice)])
        time.sleep(0.5)
        assert os.path.getsize(box) == before  # nothing written while we hold the lock
        fcntl.flock(f, fcntl.LOCK_UN)
    got, results = ls.recv()
    assert got == d and results[0][0] == b"K"
    assert len(list(mailbox.mbox(box))) == 2


@pytest.fixture
def small_disk(homes):
    """alice's home on a 256 KiB tmpfs."""
    alice, _ = homes
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=755", "tmpfs",
                       alice.pw_dir], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        os.chown(alice.pw_dir, alice.pw_uid, alice.pw_gid)
        yield alice
    finally:
        subprocess.run(["umount", "-l", alice.pw_dir], capture_output=True)


@qpytest.needs_root
def test_full_disk_defers_and_leaves_no_partial_mail(ls, small_disk):
    alice = small_disk
    big = b"Subject: big\n\n" + b"From line\n" * 40_000  # 400 KB: more than the disk
    put(alice, ".qmail", "./Mailbox\n")
    assert ls.deliver(addr(alice))[0] == b"K"
    box = os.path.join(alice.pw_dir, "Mailbox")
    before = read(box)
    status, text = ls.deliver(addr(alice), message=big)
    assert status == b"Z" and "space" in text
    assert read(box) == before  # truncated back to the old length
    put(alice, ".qmail", "./Maildir/\n")
    maildir_path(alice, make=True)
    status, text = ls.deliver(addr(alice), message=big)
    assert status == b"Z" and "space" in text
    md = maildir_path(alice)
    assert new_files(md) == [] and os.listdir(os.path.join(md, "tmp")) == []
    assert ls.deliver(addr(alice))[0] == b"K"  # a small one still fits


@qpytest.needs_root
def test_sticky_home_means_editing(ls, homes):
    alice, _ = homes
    os.chmod(alice.pw_dir, 0o1755)
    status, text = ls.deliver(addr(alice))
    assert status == b"Z" and "sticky" in text


# ---- the spawner itself ------------------------------------------------------------------

@qpytest.needs_root
def test_concurrent_deliveries_and_multi_recipient_request(ls, homes):
    alice, bob = homes
    put(alice, ".qmail", '|while [ ! -e "$HOME/go" ]; do sleep 0.05; done\n./Maildir/\n')
    maildir_path(alice, make=True)
    first = ls.send([addr(alice)])
    second = ls.send([addr(bob), b"@test.example", b"nohost"])  # runs while alice's waits
    got, results = ls.recv()
    assert got == second
    assert [r[0] for r in results] == [b"K", b"K", b"D"]
    put(alice, "go", "")
    got, results = ls.recv()
    assert got == first and results[0][0] == b"K"


@qpytest.needs_root
def test_wrong_message_owner_refused(ls, homes):
    alice, _ = homes
    path = os.path.join(ls.msgdir, "rootowned")
    with open(path, "wb") as f:
        f.write(MSG)
    fd = os.open(path, os.O_RDONLY)
    spawn.send_request(ls.sock, 7, SENDER, [addr(alice)], fd)
    os.close(fd)
    got, results = ls.recv()
    assert got == 7 and results[0][0] == b"Z" and b"owner" in results[0][1]


@qpytest.needs_root
def test_lspawn_title_and_workers_hold_only_their_socket(ls, homes):
    alice, _ = homes
    assert qpytest.wait_for(
        lambda: psutil.Process(ls.proc.pid).cmdline()[0].startswith("qpy-lspawn"))
    put(alice, ".qmail", '|echo $$ $PPID > "$HOME/pids"; '
                         'while [ ! -e "$HOME/go" ]; do sleep 0.05; done\n')
    d = ls.send([addr(alice)])
    pids = os.path.join(alice.pw_dir, "pids")
    assert qpytest.wait_for(lambda: os.path.exists(pids) and read(pids).strip())
    prog, child = (int(x) for x in read(pids).split())

    def fds(pid: int) -> dict[int, str]:
        return {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}

    links = fds(prog)
    assert not [x for x in links.values() if x.startswith("socket:")], links
    # the worker: its own socket to lspawn on fd 0 (never queue-send's request socket),
    # /dev/null on 1 and 2, the message, the program's output pipe; nothing else
    links = fds(child)
    assert [n for n, x in links.items() if x.startswith("socket:")] == [0], links
    assert links[0] != fds(ls.proc.pid)[0]
    assert links[1] == links[2] == "/dev/null" and len(links) == 5, links
    assert "qpy-local qtlalice" in " ".join(psutil.Process(child).cmdline())
    put(alice, "go", "")
    got, results = ls.recv()
    assert got == d and results[0][0] == b"K"


@pytest.mark.parametrize("garbage", [b"A2 0 forged: another delivery's number", b"hello",
                                     b"A1 0", b"A1 1000 text", b"A" + b"9" * 30 + b" 0 x"])
@qpytest.needs_root
def test_worker_garbage_is_a_deferral_and_retires_the_worker(ls, homes, garbage):
    """A worker runs as the user, so lspawn parses its answers as untrusted input: an
    answer that does not parse or names another delivery defers that delivery (Z),
    retires the worker, and is never taken for a success."""
    alice, _ = homes
    put(alice, ".qmail", '|while [ ! -e "$HOME/go" ]; do sleep 0.05; done\n')
    d = ls.send([addr(alice)])                 # lspawn's first delivery: number 1
    busy = qpytest.wait_for(lambda: [p for p in psutil.Process(ls.proc.pid).children()
                                     if p.uids().real == alice.pw_uid], 10)
    assert busy and len(busy) == 1
    with qpytest.fd_of(busy[0].pid, 0) as fake:
        fake.send(garbage)
    got, results = ls.recv()
    assert got == d and results[0][0] == b"Z" and b"mangled" in results[0][1], results
    put(alice, "go", "")
    assert qpytest.wait_for(lambda: not busy[0].is_running() or
                            busy[0].status() == psutil.STATUS_ZOMBIE, 10)
    ls.sock.settimeout(1)
    with pytest.raises(TimeoutError):           # the real answer came too late: dropped
        ls.sock.recv(100)
    ls.sock.settimeout(None)
    os.unlink(os.path.join(alice.pw_dir, ".qmail"))
    maildir_path(alice, make=True)
    status, text = ls.deliver(addr(alice))      # a fresh worker takes the next one
    assert status == b"K", text


@qpytest.needs_root
def test_sigterm_waits_for_delivery_in_flight(ls, homes):
    alice, _ = homes
    put(alice, ".qmail", '|touch "$HOME/started"; sleep 1\n./Maildir/\n')
    maildir_path(alice, make=True)
    d = ls.send([addr(alice)])
    assert qpytest.wait_for(lambda: os.path.exists(os.path.join(alice.pw_dir, "started")))
    ls.proc.send_signal(signal.SIGTERM)
    got, results = ls.recv()
    assert got == d and results[0][0] == b"K"
    assert ls.proc.wait(30) == 0
    assert len(new_files(maildir_path(alice))) == 1


@qpytest.needs_root
def test_supplementary_groups_from_the_parent_follow_etc_group(ls, homes):
    """lspawn looks the groups up itself and caches them; a change of /etc/group
    reaches the very next delivery."""
    alice, _ = homes
    group = "qtlgroup"
    subprocess.run(["groupadd", "-f", group], check=True, capture_output=True)
    subprocess.run(["gpasswd", "-d", alice.pw_name, group], capture_output=True)
    gid = grp.getgrnam(group).gr_gid
    put(alice, ".qmail", '|id -G > "$HOME/groups"\n')
    out = os.path.join(alice.pw_dir, "groups")

    def groups() -> set[int]:
        status, text = ls.deliver(addr(alice))
        assert status == b"K", text
        return {int(g) for g in read(out).split()}

    try:
        assert groups() == {alice.pw_gid}
        assert groups() == {alice.pw_gid}        # from the cache
        subprocess.run(["gpasswd", "-a", alice.pw_name, group], check=True,
                       capture_output=True)
        assert groups() == {alice.pw_gid, gid}
    finally:
        subprocess.run(["gpasswd", "-d", alice.pw_name, group], capture_output=True)


@qpytest.needs_root
def test_sighup_retires_a_busy_worker_after_its_delivery(ls, homes):
    """After SIGHUP no delivery runs in a worker forked before it: an idle worker goes
    at once, one busy then finishes its delivery and goes (its groups and settings may
    be the old ones)."""
    alice, bob = homes
    put(alice, ".qmail", '|echo $PPID > "$HOME/ppid"\n')
    put(alice, ".qmail-wait", '|echo $PPID > "$HOME/ppid"; i=0; '
        'while [ ! -e "$HOME/go" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n')
    put(bob, ".qmail", '|echo $PPID > "$HOME/ppid"\n')
    ppid = os.path.join(alice.pw_dir, "ppid")

    def worker_of(status_text: tuple[bytes, str]) -> int:
        assert status_text[0] == b"K", status_text
        pid = int(read(ppid))
        os.unlink(ppid)
        return pid

    assert ls.deliver(addr(bob))[0] == b"K"                 # an idle worker of bob's
    idle = int(read(os.path.join(bob.pw_dir, "ppid")))
    first = worker_of(ls.deliver(addr(alice)))
    assert worker_of(ls.deliver(addr(alice))) == first      # idle, so reused
    d = ls.send([addr(alice, "-wait")])                     # the same worker, now busy
    assert qpytest.wait_for(lambda: os.path.exists(ppid) and read(ppid).strip())
    assert int(read(ppid)) == first
    assert psutil.Process(first).cmdline()[0].startswith("qpy-local " + alice.pw_name)
    os.unlink(ppid)
    ls.proc.send_signal(signal.SIGHUP)

    def gone(pid: int) -> bool:
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == \
            psutil.STATUS_ZOMBIE
    # bob's idle worker retired: lspawn has taken the HUP while alice's delivery runs
    assert qpytest.wait_for(lambda: gone(idle))
    assert not gone(first)
    put(alice, "go", "")
    got, results = ls.recv()
    assert got == d and results[0][0] == b"K", results
    second = worker_of(ls.deliver(addr(alice)))
    assert second != first
    assert qpytest.wait_for(lambda: gone(first))


# ---- end to end: qpy-sendmail -> pickup -> queue-send -> lspawn -> local ---------------------

@pytest.fixture
def started(qroot):
    p = qroot.start("qpy-start", qroot.path)
    yield qroot
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()


@qpytest.needs_root
def test_end_to_end_maildir_forward_ext_postmaster(started, homes):
    qroot = started
    alice, bob = homes
    put(alice, ".qmail-fwd", f"&{bob.pw_name}@test.example\n")
    put(alice, ".qmail", "./Maildir/\n./Mailbox\n")
    maildir_path(alice, make=True)
    alias = qroot.paths.alias
    with open(os.path.join(alias, ".qmail-postmaster"), "w") as f:
        f.write(f"&{alice.pw_name}@test.example\n")
    os.chmod(os.path.join(alias, ".qmail-postmaster"), 0o644)
    qroot.control("virtualdomains", f"virt.example:{alice.pw_name}-v")
    put(alice, ".qmail-v-default", '|printf "%s" "$DEFAULT" > "$HOME/virt.out"\n')
    # qpy-start forwards HUP once queue-send runs; before that a HUP would find nobody
    assert qpytest.wait_for(lambda: os.path.exists(os.path.join(qroot.paths.run,
                                                                "queue-send.pid")), 30)
    os.kill(started.procs[0].pid, signal.SIGHUP)  # queue-send re-reads virtualdomains
    time.sleep(0.5)
    msg = b"Subject: e2e\n\nFrom here\n"
    r = qroot.run("qpy-sendmail", "-f", "carol@remote.example", "Someone@virt.example",
                  input=msg, user=alice.pw_name)
    assert r.returncode == 0, r.stderr
    virt = os.path.join(alice.pw_dir, "virt.out")
    assert qpytest.wait_for(lambda: os.path.exists(virt), timeout=60)
    assert read(virt) == b"Someone"  # qpy-queue-send made it qtlalice-v-Someone@virt.example
    for rcpt in (alice.pw_name, alice.pw_name + "-fwd", "postmaster"):
        r = qroot.run("qpy-sendmail", "-f", "carol@remote.example", rcpt + "@test.example",
                      input=msg, user=alice.pw_name)
        assert r.returncode == 0, r.stderr
    assert qpytest.wait_for(lambda: len(new_files(maildir_path(alice))) == 2
                            and len(new_files(maildir_path(bob))) == 1, timeout=60), \
        (new_files(maildir_path(alice)), new_files(maildir_path(bob)))
    got = [read(f) for f in new_files(maildir_path(alice))]
    assert all(g.startswith(b"Return-Path: <carol@remote.example>\n") for g in got)
    assert any(b"Delivered-To: postmaster@test.example\n" in g for g in got)
    fwd = read(new_files(maildir_path(bob))[0])
    assert b"Delivered-To: qtlalice-fwd@test.example\n" in fwd
    assert fwd.startswith(b"Return-Path: <carol@remote.example>\n"
                          b"Delivered-To: qtlbob@test.example\n")
    msgs = list(mailbox.mbox(os.path.join(alice.pw_dir, "Mailbox")))
    assert len(msgs) == 2 and all(">From here" in m.get_payload() for m in msgs)


def test_maildir_fsyncs_new_only_off_the_queue_filesystem(tmp_path, monkeypatch):
    """new/ needs no fsync of its own on the queue's filesystem (its journal orders the
    link before the queue's later unlinks); elsewhere it is fsync'd."""
    from qpy.local import maildir as md
    box = tmp_path / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        os.mkdir(box / sub)
    src = tmp_path / "msg"
    src.write_bytes(MSG)
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(md.os, "fsync", fsync)
    fd = os.open(src, os.O_RDONLY)
    try:
        md.deliver(str(box), fd, b"Delivered-To: x\n", os.stat(tmp_path).st_dev)
        assert synced == ["file"]
        synced.clear()
        md.deliver(str(box), fd, b"Delivered-To: x\n", -1)     # another filesystem
        assert synced == ["file", "dir"]
    finally:
        os.close(fd)
    assert len(os.listdir(box / "new")) == 2 and os.listdir(box / "tmp") == []


def test_maildir_move_never_replaces_a_file_in_new(tmp_path):
    """The move from tmp/ into new/ (renameat2 RENAME_NOREPLACE) refuses a name that
    exists in new/ and leaves both files as they were, as qmail's link would."""
    from qpy.common.durable import rename_noreplace
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "tmp" / "a").write_bytes(b"new mail")
    (tmp_path / "new" / "a").write_bytes(b"old mail")
    (tmp_path / "tmp" / "b").write_bytes(b"more mail")
    tmpfd = os.open(tmp_path / "tmp", os.O_RDONLY | os.O_DIRECTORY)
    newfd = os.open(tmp_path / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace("a", "a", tmpfd, newfd)
        assert (tmp_path / "new" / "a").read_bytes() == b"old mail"
        assert (tmp_path / "tmp" / "a").read_bytes() == b"new mail"
        assert rename_noreplace("b", "b", tmpfd, newfd) is True   # ext4 has it
        assert (tmp_path / "new" / "b").read_bytes() == b"more mail"
        assert not (tmp_path / "tmp" / "b").exists()
    finally:
        os.close(tmpfd)
        os.close(newfd)


@qpytest.needs_root
@pytest.mark.skipif(not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
                    reason="no losetup or mkfs.ext4")
def test_maildir_new_is_fsynced_on_an_ext4_without_journal(tmp_path):
    """Skipping new/'s fsync rests on the queue filesystem's journal ordering metadata
    changes: an ext4 with a journal keeps qpy-lspawn's queue_dev, one made without a
    journal (it writes directory blocks back in any order) gets -1 (fsync new/)."""
    from qpy.local.identity import queue_dev
    mounted: list[tuple[str, str]] = []
    try:
        for name, opts in (("journal", []), ("nojournal", ["-O", "^has_journal"])):
            image, mnt = str(tmp_path / (name + ".img")), str(tmp_path / name)
            os.mkdir(mnt)
            with open(image, "wb") as f:
                f.truncate(16 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", *opts, image], check=True,
                           capture_output=True, timeout=60)
            r = subprocess.run(["losetup", "-f", "--show", image], capture_output=True,
                               text=True, timeout=60)
            if r.returncode:
                pytest.skip("no loop device here: %s" % r.stderr.strip())
            dev = r.stdout.strip()
            mounted.append((dev, ""))
            subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True,
                           capture_output=True, timeout=60)
            mounted[-1] = (dev, mnt)
            os.mkdir(os.path.join(mnt, "queue"))
        (jdev, jmnt), (ndev, nmnt) = mounted
        assert durable.orders_metadata(jmnt) and not durable.orders_metadata(nmnt)
        assert queue_dev(jmnt) == os.stat(jmnt).st_dev
        assert queue_dev(nmnt) == -1
        assert not durable.orders_metadata("/proc")         # not a filesystem for mail
    finally:
        for dev, mnt in reversed(mounted):
            if mnt:
                subprocess.run(["umount", mnt], capture_output=True, timeout=60)
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)


@pytest.mark.parametrize("renameat2", ["kernel", "missing"])
def test_maildir_move_into_new_with_and_without_renameat2(tmp_path, monkeypatch, renameat2):
    """The move tmp/ -> new/ is one renameat2(RENAME_NOREPLACE); where libc or the
    filesystem has none (glibc < 2.28, some network filesystems: neither exists here,
    so durable is told so) it is a link and an unlink. Both leave the message, whole,
    in new/ only; the rename never replaces an existing name."""
    from qpy.common import durable
    from qpy.local import maildir
    if renameat2 == "missing":
        monkeypatch.setattr(durable, "_renameat2", False)
    md = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    (tmp_path / "msg").write_bytes(MSG)
    fd = os.open(tmp_path / "msg", os.O_RDONLY)
    try:
        name = maildir.deliver(str(md), fd, b"Delivered-To: x@test.example\n")
    finally:
        os.close(fd)
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == [name]
    assert (md / "new" / name).read_bytes() == b"Delivered-To: x@test.example\n" + MSG
    # the same move onto a name new/ already holds is refused, the old file untouched
    (md / "tmp" / name).write_bytes(b"other")
    tmpfd = os.open(md / "tmp", os.O_RDONLY | os.O_DIRECTORY)
    newfd = os.open(md / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if renameat2 == "kernel":
            with pytest.raises(FileExistsError):
                durable.rename_noreplace(name, name, tmpfd, newfd)
        else:
            assert durable.rename_noreplace(name, name, tmpfd, newfd) is False
            with pytest.raises(FileExistsError):
                os.link(name, name, src_dir_fd=tmpfd, dst_dir_fd=newfd, follow_symlinks=False)
    finally:
        os.close(tmpfd)
        os.close(newfd)
    assert (md / "new" / name).read_bytes() == b"Delivered-To: x@test.example\n" + MSG
