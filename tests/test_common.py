"""The shared machinery of qpy/common on its own: the worker pool, the signal wakeup,
the cache keyed on file stamps. Real forks, sockets, signals and files; any user."""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from qpy.common.pool import Pool
from qpy.common.stamped import StampedCache


def _echo(sock: socket.socket) -> int:
    """A worker: answers each datagram with its pid and the datagram, until end of file."""
    while True:
        data = sock.recv(4096)
        if not data:
            return 7
        sock.send(b"%d %s" % (os.getpid(), data))


def _reap(pool: Pool, count: int) -> dict[int, int]:
    """Exit codes of `count` workers, by pid, as the pool reaps them (10 s at most)."""
    deadline = time.monotonic() + 10
    codes: dict[int, int] = {}
    while len(codes) < count and time.monotonic() < deadline:
        for w, status in pool.reap():
            codes[w.pid] = os.waitstatus_to_exitcode(status)
            pool.forget(w)
        time.sleep(0.02)
    return codes


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_pool_forks_reuses_retires_and_reaps():
    sel = selectors.DefaultSelector()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pool = Pool(sel, keep_stderr=False)
    pool.detach.append(mine)
    try:
        a = pool.fork("alice", _echo)
        b = pool.fork("bob", _echo)
        assert a and b and len(pool) == 2
        a.sock.send(b"hi")
        assert a.sock.recv(100) == b"%d hi" % a.pid
        # idle by key: a worker of one key never serves another
        pool.park(a)
        pool.park(b)
        assert pool.unpark("carol") is None
        assert pool.unpark("alice") is a and pool.unpark("alice") is None
        pool.park(a)
        assert [w.key for w in pool.idle_workers()] == ["bob", "alice"]   # oldest first
        assert pool.next_retirement(10.0) == pytest.approx(b.idle_since + 10.0)
        pool.retire_idle(0.0, most=1)                   # the one unused the longest
        assert pool.unpark("bob") is None and b.pid in pool.leaving
        pool.retire(a)                                  # end of file: it exits 7
        assert _reap(pool, 2) == {a.pid: 7, b.pid: 7}
        assert pool.all() == [] and not pool.idle
        assert a.sock.fileno() == -1 and b.sock.fileno() == -1
    finally:
        for w in pool.all():
            pool.kill(w)
        mine.close()
        theirs.close()


def test_pool_child_keeps_only_its_socket_and_never_returns():
    """A worker holds fd 0 (its socket) and 1, 2 (/dev/null), nothing of the parent's;
    a serve function that raises exits 111 instead of running on in the parent's loop."""
    sel = selectors.DefaultSelector()
    parent_secret = os.open("/dev/null", os.O_RDONLY)   # inheritable-free, still open here
    pool = Pool(sel, keep_stderr=False)

    def report(sock: socket.socket) -> int:
        fds = sorted(_open_fds())
        targets = [os.readlink("/proc/self/fd/%d" % fd) for fd in (1, 2)]
        sock.send(repr((fds, targets)).encode())
        sock.recv(10)
        return 0

    def explode(sock: socket.socket) -> int:
        raise RuntimeError("a bug in a worker")

    try:
        w = pool.fork(None, report)
        assert w is not None
        ready = sel.select(10)
        assert ready and ready[0][0].data is w
        fds, targets = eval(w.sock.recv(4096))  # noqa: S307 (our own repr)
        # 0 the socket, 1 and 2 /dev/null, and the descriptor listdir itself opened
        assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds
        assert targets == ["/dev/null", "/dev/null"]
        pool.retire(w)
        bad = pool.fork(None, explode)
        assert bad is not None
        assert _reap(pool, 2) == {w.pid: 0, bad.pid: 111}
    finally:
        os.close(parent_secret)
        for x in pool.all():
            pool.kill(x)


def test_pool_worker_on_fd3_takes_descriptors_and_is_recycled(tmp_path):
    """channel_fd=3 (qpy-tcpserver's layout): the worker's socket on fd 3, fd 0 and 1
    /dev/null, nothing else of the parent's (its listening socket neither); a
    descriptor sent with send_fd arrives as one the worker can use; recycle()
    retires the idle worker at once and marks the busy one stale, and a worker
    forked after it is not."""
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    pool = Pool(sel, channel_fd=3)
    pool.detach.append(listener)
    note = tmp_path / "note"
    note.write_bytes(b"from the parent")

    def serve(sock: socket.socket) -> int:
        fds = sorted(_open_fds())
        targets = [os.readlink("/proc/self/fd/%d" % fd) for fd in (0, 1)]
        sock.send(repr((sock.fileno(), fds, targets)).encode())
        data, got, flags, _ = socket.recv_fds(sock, 100, 1)
        cut = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
        if not data:
            return 5                        # end of file: retired before any job
        sock.send(b"%s %s %r" % (data, os.pread(got[0], 100, 0), cut))
        return 0 if sock.recv(10) == b"" else 1

    with pytest.raises(ValueError):
        Pool(sel, channel_fd=1)
    try:
        busy = pool.fork(None, serve)
        idle = pool.fork(None, serve)
        assert busy and idle
        for w in (busy, idle):
            chan, fds, targets = eval(w.sock.recv(4096))  # noqa: S307 (our own repr)
            # 0, 1 /dev/null, 2 stderr, 3 the socket, and the descriptor listdir opened
            assert chan == 3 and fds[:4] == [0, 1, 2, 3] and len(fds) <= 5, fds
            assert targets == ["/dev/null", "/dev/null"]
        with open(note, "rb") as f:
            socket.send_fds(busy.sock, [b"job"], [f.fileno()])
        assert busy.sock.recv(100) == b"job from the parent False"
        pool.park(idle)
        pool.recycle()
        assert idle.pid in pool.leaving and not pool.idle     # idle: retired now
        assert pool.stale(busy) and busy.pid in pool.workers  # busy: after its job
        fresh = pool.fork(None, _echo)
        assert fresh and not pool.stale(fresh)
        assert _reap(pool, 1) == {idle.pid: 5}        # end of file before any job
        pool.retire(busy)
        pool.retire(fresh)
        assert _reap(pool, 2) == {busy.pid: 0, fresh.pid: 7}
    finally:
        listener.close()
        for x in pool.all():
            pool.kill(x)


WAKEUP_CHILD = r"""
import os, select, signal, sys, time
from qpy.common.wakeup import Wakeup
sigs = Wakeup((signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1))
print("ready", flush=True)
got = []
while signal.SIGTERM not in got:
    t0 = time.monotonic()
    select.select([sigs.fd], [], [], 30.0)       # a long sleep: a signal must end it
    new = sigs.take()
    got += new
    if new:
        print(" ".join(signal.Signals(s).name for s in new), "%.3f" % (time.monotonic() - t0),
              flush=True)
"""


def test_wakeup_ends_a_long_select_at_once():
    """Each signal ends a 30 s select() within a second and is noted once."""
    p = subprocess.Popen([sys.executable, "-c", WAKEUP_CHILD], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = []
    try:
        assert p.stdout.readline().strip() == "ready"
        for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM):
            time.sleep(0.3)                     # asleep in select() again
            p.send_signal(sig)
            lines.append(p.stdout.readline().split())
        assert p.wait(10) == 0
    finally:
        p.kill()
    assert [w[0] for w in lines] == ["SIGUSR1", "SIGHUP", "SIGTERM"], lines
    assert all(len(w) == 2 and float(w[1]) < 1.0 for w in lines), lines


def test_wakeup_release_gives_a_child_the_defaults(tmp_path):
    from qpy.common.wakeup import Wakeup
    old = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGPIPE)}
    sigs = Wakeup((signal.SIGHUP,))
    try:
        pid = os.fork()
        if pid == 0:
            sigs.release()
            os.kill(os.getpid(), signal.SIGHUP)         # the default: death
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP
        os.kill(os.getpid(), signal.SIGHUP)             # here: noted, not fatal
        assert select.select([sigs.fd], [], [], 5)[0]
        assert sigs.take() == [signal.SIGHUP]
    finally:
        signal.set_wakeup_fd(-1)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(sigs.fd)


def test_stamped_cache_drops_everything_when_a_file_changes(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("alice\n")
    calls: list[str] = []

    def compute(key: str) -> str:
        calls.append(key)
        return key.upper() + str(len(calls))

    c = StampedCache([str(f), str(tmp_path / "missing")], ttl=3600)
    assert c.get("a", lambda: compute("a")) == "A1"
    assert c.get("a", lambda: compute("a")) == "A1" and calls == ["a"]     # kept
    f.write_text("alice\nbob\n")                                            # size changes
    assert c.get("a", lambda: compute("a")) == "A2"
    (tmp_path / "missing").write_text("")                                   # appears
    assert c.get("a", lambda: compute("a")) == "A3"
    c.clear()
    assert c.get("a", lambda: compute("a")) == "A4"
    with pytest.raises(KeyError):                        # an exception is not cached
        c.get("b", lambda: {}["b"])
    assert c.get("b", lambda: compute("b")) == "B5"
    short = StampedCache([str(f)], ttl=0.0)             # past its ttl: worked out again
    short.get("a", lambda: compute("a"))
    short.get("a", lambda: compute("a"))
    assert calls[-2:] == ["a", "a"]
    small = StampedCache([str(f)], ttl=3600, max_entries=2)
    for k in "abcd":
        small.get(k, lambda k=k: k)
    assert len(small.entries) <= 3


def test_control_files_are_read_whole_and_bounded(tmp_path):
    """qpy.common.control reads a file in one read of its size and a byte: the whole
    of it up to the 4 MiB bound exactly, the bound itself refused one byte over, and
    a FIFO, a directory or a link never block or pass for a value."""
    from qpy.common.control import MAX_CONTROL_BYTES, Control
    ctl = tmp_path / "control"
    ctl.mkdir()
    (ctl / "me").write_bytes(b"host.example")                   # no newline at the end
    (ctl / "locals").write_bytes(b"a.example\n# c\n\nb.example\n")
    (ctl / "rcpthosts").write_bytes(b"x" * (MAX_CONTROL_BYTES - 1) + b"\n")
    (ctl / "databytes").write_bytes(b"1" + b" " * MAX_CONTROL_BYTES)   # one byte over
    os.mkfifo(ctl / "smtproutes")                               # nobody writes it
    (ctl / "badmailfrom").mkdir()
    os.symlink(ctl / "me", ctl / "idhost")
    c = Control(str(tmp_path))
    assert c.explain("me") == ("host.example", "file")
    assert c.explain("locals") == (["a.example", "b.example"], "file")
    value, source = c.explain("rcpthosts")
    assert source == "file" and value == ["x" * (MAX_CONTROL_BYTES - 1)]
    assert c.explain("databytes")[1] == "malformed: larger than %d bytes" % MAX_CONTROL_BYTES
    assert c.explain("smtproutes") == ([], "file")
    assert c.explain("badmailfrom")[1].startswith("malformed: cannot read: ")
    assert c.explain("idhost")[1].startswith("malformed: cannot open: ")
