"""qpytest — helpers the tests share: roots, users, ports, programs."""

from __future__ import annotations

import email
import email.message
import email.policy
import fcntl
import mailbox
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import zlib

import pytest

from qpy.common import dropfile, envelope

PREFIX = os.environ.get("QPY_PREFIX") or ("/opt/qpy" if os.getuid() == 0
                                          else os.path.expanduser("~/.local/qpy"))
BIN = os.path.join(PREFIX, "bin")
PYTHON = os.path.join(PREFIX, "venv", "bin", "python3")
TEST_BASE = "/var/tmp/qpy-test" if os.getuid() == 0 else "/var/tmp/qpy-test-%d" % os.getuid()
IS_ROOT = os.getuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (real uids)")


def maildir_path(pw: pwd.struct_passwd, sub: str = "Maildir", make: bool = False) -> str:
    """The path of a user's Maildir (made, with tmp/ new/ cur/ owned by the user, when
    make is set)."""
    path = os.path.join(pw.pw_dir, sub)
    if make:
        for d in ("", "tmp", "new", "cur"):
            os.makedirs(os.path.join(path, d), exist_ok=True)
            os.chown(os.path.join(path, d), pw.pw_uid, pw.pw_gid)
    return path


def maildir_messages(pw: pwd.struct_passwd) -> list[email.message.Message]:
    """The messages in a user's Maildir, parsed."""
    md = mailbox.Maildir(maildir_path(pw), factory=None, create=False)
    return [email.message_from_bytes(md.get_bytes(k), policy=email.policy.default)
            for k in md.keys()]


def bin_path(name: str) -> str:
    return os.path.join(BIN, name)


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scratch_dir(prefix: str = "t") -> str:
    """A fresh directory that every qpy uid can traverse (not pytest's 0700 tmp)."""
    os.makedirs(TEST_BASE, mode=0o755, exist_ok=True)
    os.chmod(TEST_BASE, 0o755)
    d = tempfile.mkdtemp(prefix=prefix + "-", dir=TEST_BASE)
    os.chmod(d, 0o755)
    return d


def _locked(fn):
    """Serialise user/group database changes across parallel test processes."""
    def wrapper(*a, **kw):
        os.makedirs(TEST_BASE, mode=0o755, exist_ok=True)
        with open(os.path.join(TEST_BASE, ".userlock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return fn(*a, **kw)
    return wrapper


_held: dict[str, int] = {}      # user name -> fd of the lock this test holds on it


def hold_user(login: str) -> None:
    """Keep other test runs on this machine (other checkouts, other engineers) off the
    test user `login` until the current test ends (release_users()): a test that gives
    the user a new home must not see another run move it under its feet."""
    if login in _held:
        return
    os.makedirs(TEST_BASE, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(TEST_BASE, ".user-%s.lock" % login), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + 180    # two runs taking two users in turn cannot deadlock
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    _held[login] = fd


def release_users() -> None:
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def make_user(name: str, home: str | None = None) -> pwd.struct_passwd:
    """A real Unix user `qt<name>` (created once, reused); home made and owned by it.
    Held for this test alone (hold_user)."""
    login = name if name.startswith("qt") else "qt" + name
    hold_user(login)
    return _make_user(login, home)


def mail_user(qroot: QRoot, name: str, dot: dict[str, str] | None = None) -> pwd.struct_passwd:
    """A real user (make_user) whose fresh home next to qroot holds a Maildir and the
    given .qmail files ({ext: text}; ext "" is .qmail itself)."""
    home = os.path.join(os.path.dirname(qroot.path), "home-" + name)
    pw = make_user(name, home)
    for sub in ("", "/new", "/cur", "/tmp"):
        os.makedirs(home + "/Maildir" + sub, exist_ok=True)
        os.chown(home + "/Maildir" + sub, pw.pw_uid, pw.pw_gid)
        os.chmod(home + "/Maildir" + sub, 0o700)
    for ext, text in (dot or {}).items():
        p = os.path.join(home, ".qmail" + ("-" + ext if ext else ""))
        with open(p, "w") as f:
            f.write(text)
        os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(p, 0o644)
    return pw


@_locked
def _make_user(login: str, home: str | None) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(login)
    except KeyError:
        for _ in range(20):
            r = subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-d",
                                home or "/nonexistent", login], capture_output=True)
            if r.returncode in (0, 9):
                break
            time.sleep(0.2)
        pw = pwd.getpwnam(login)
    if home:
        for _ in range(50):  # 8: a process of the user still runs (an idle qpy-local worker)
            r = subprocess.run(["usermod", "-d", home, login], capture_output=True)
            if r.returncode != 8:
                break
            time.sleep(0.2)
        r.check_returncode()
        os.makedirs(home, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o755)
        pw = pwd.getpwnam(login)
    return pw


class QRoot:
    """A freshly installed qpy root for one test."""

    def __init__(self, path: str, me: str = "test.example"):
        from qpy.common.queue import Paths
        self.path = path
        self.me = me
        self.paths = Paths(path)
        self.procs: list[subprocess.Popen] = []

    def bin(self, name: str) -> str:
        return bin_path(name)

    def env(self, extra: dict | None = None) -> dict:
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "QPY_ROOT": self.path}
        env.update(extra or {})
        return env

    def run(self, prog: str, *args: str, input: bytes = b"", env: dict | None = None,
            user: str | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        cmd = [self.bin(prog), *args]
        if user:
            pw = pwd.getpwnam(user)
            cmd = ["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                   "--init-groups", "--"] + cmd
        return subprocess.run(cmd, input=input, env=self.env(env), capture_output=True,
                              timeout=timeout, **kw)

    def start(self, prog: str, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        """Start a long-running program; stopped at teardown."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        p = subprocess.Popen([self.bin(prog), *args], env=self.env(env), **kw)
        self.procs.append(p)
        return p

    def control(self, name: str, text: str) -> None:
        p = os.path.join(self.paths.control, name)
        with open(p, "w") as f:
            f.write(text if text.endswith("\n") or not text else text + "\n")
        os.chmod(p, 0o644)

    def stop_all(self) -> None:
        stop(*self.procs)

    def queue_files(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.paths.queue, sub)))


def stop(*procs: subprocess.Popen, timeout: float = 15) -> None:
    """TERM each process still running, then wait for them all together for at most
    timeout seconds; one that outlives it is killed."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def install_root(me: str = "test.example", *extra: str) -> QRoot:
    path = os.path.join(scratch_dir("root"), "qpy")
    r = subprocess.run([bin_path("qpy-install"), path, "--me", me, *extra],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError("qpy-install failed: %s %s" % (r.stdout, r.stderr))
    return QRoot(path, me)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_for(pred, timeout: float = 30.0, interval: float = 0.05):
    """Poll pred() until it returns a true value; that value, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def split_drop(data: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """(message, sender, recipients) of a drop file's bytes; checks its CRC-32."""
    h = dropfile.parse_header(data[:dropfile.HEADER_LEN], len(data))
    msg, env = data[h.length:h.length + h.msglen], data[h.length + h.msglen:]
    assert h.crc is None or zlib.crc32(env, zlib.crc32(msg)) == h.crc
    sender, rcpts = envelope.decode(env)
    return msg, sender, rcpts


def fd_of(pid: int, fd: int) -> socket.socket:
    """A copy of process pid's socket fd (pidfd_getfd; root, or skip): to speak on a
    worker's own connection to its spawner as only that worker could."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(438, pidfd, fd, 0)     # SYS_pidfd_getfd
    finally:
        os.close(pidfd)
    if got < 0:
        pytest.skip("pidfd_getfd: %s" % os.strerror(ctypes.get_errno()))
    return socket.socket(fileno=got)
