"""queuefiles — what the second file per queued message (todo/ID beside mess/ID) costs.

SYNOPSIS
    bench/queuefiles.py [--messages N] [--rounds R] [--gap S] [--inflight K]
                        [--syncfs-every B] [--dir DIR]

Runs anywhere (no install needed; as any user). Replays, in one process and without
qpy, the file-system calls the queue makes for each message, the way the programs
make them today (two files) and the way a one-file queue would (the envelope in
mess/ID's own head), and prints CPU (user + system, getrusage) and system calls
per message for each, rounds interleaved (two, one, two, one, ...):

    two   pickup:     lstat mess/ID; create todo/.tmp.ID, write the record, close;
                      create mess/ID, write Received: + message, close;
                      rename todo/.tmp.ID to todo/ID
          queue-send: open todo/ID, fstat, read, close; stat mess/ID; lstat state/ID
          qpy-clean:  unlink mess/ID, unlink todo/ID  (K messages later: in flight)
    one   pickup:     create mess/.tmp.ID, write record + Received: + message, close;
                      rename mess/.tmp.ID to mess/ID
          queue-send: open mess/ID, fstat, read the head, close; lstat state/ID
          qpy-clean:  unlink mess/ID

Messages are 2 KiB (W1's size), ids of qpy's form. No fsync by default (pickup's
group commit is one syncfs per batch, the same call for both); --syncfs-every B
adds one syncfs(2) per B messages (it also writes other programs' dirty data on
the same filesystem: noisy on a shared machine). Each round works in a fresh
directory under DIR (default /var/tmp/qpy-queuefiles, the queue's filesystem in
bench/run), removed at the end. --gap S waits S seconds before each round: on an
ext4 without a journal the inode allocator skips, one by one, every inode freed in
the last 30 seconds (recently_deleted()), so each round's unlinks slow the next
round's creates; --gap 35 keeps rounds apart.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import time

MESSAGE = b"Subject: bench\n\n" + b"x" * 70 * 29 + b"\n"      # 2 KiB, as W1
RECORD = b"QPYTODO1 1796590000 1056 2100 12345\n" + b"Fbench@remote.example\0" \
    b"Tqbench@bench.example\0\0"
RECEIVED = b"Received: (qpy 12345 invoked from network) id %s; 6 Dec 2026 21:00:00 -0000\n"
# system calls per message, as replayed below (counted by hand, checked with strace -c)
SYSCALLS = {"two": 4 + 3 + 1 + 4 + 1 + 1 + 2, "one": 3 + 1 + 4 + 1 + 1}


def _syncfs():
    f = ctypes.CDLL(None, use_errno=True).syncfs
    f.argtypes = [ctypes.c_int]
    return f


def _write_new(path: str, *parts: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, b"".join(parts))
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fstat(fd)
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def run(kind: str, top: str, n: int, inflight: int, sync_every: int) -> tuple[float, float]:
    """Replay n messages of `kind`; CPU seconds (user, system) they took."""
    mess, todo, state = (os.path.join(top, d) for d in ("mess", "todo", "state"))
    for d in (mess, todo, state):
        os.makedirs(d)
    syncfs = _syncfs() if sync_every else None
    dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    ids: list[str] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    base = time.time_ns() // 1000
    for i in range(n):
        msg_id = "%d%07d" % (base + i, 12345)
        received = RECEIVED % msg_id.encode()
        if kind == "two":
            os.path.lexists(os.path.join(mess, msg_id))
            _write_new(os.path.join(todo, ".tmp." + msg_id), RECORD)
            _write_new(os.path.join(mess, msg_id), received, MESSAGE)
            os.rename(os.path.join(todo, ".tmp." + msg_id), os.path.join(todo, msg_id))
            _read(os.path.join(todo, msg_id))
            os.stat(os.path.join(mess, msg_id))
        else:
            _write_new(os.path.join(mess, ".tmp." + msg_id), RECORD, received, MESSAGE)
            os.rename(os.path.join(mess, ".tmp." + msg_id), os.path.join(mess, msg_id))
            _read(os.path.join(mess, msg_id))
        os.path.lexists(os.path.join(state, msg_id))
        if syncfs is not None and i % sync_every == sync_every - 1:
            syncfs(dfd)
        ids.append(msg_id)
        if len(ids) > inflight:
            done = ids.pop(0)
            os.unlink(os.path.join(mess, done))
            if kind == "two":
                os.unlink(os.path.join(todo, done))
    for done in ids:
        os.unlink(os.path.join(mess, done))
        if kind == "two":
            os.unlink(os.path.join(todo, done))
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.close(dfd)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.0)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--syncfs-every", type=int, default=0)
    ap.add_argument("--dir", default="/var/tmp/qpy-queuefiles")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    results: dict[str, list[tuple[float, float]]] = {"two": [], "one": []}
    try:
        for r in range(a.rounds):
            for kind in ("two", "one"):
                time.sleep(a.gap)
                top = os.path.join(a.dir, "%s-%d-%d" % (kind, r, os.getpid()))
                user, system = run(kind, top, a.messages, a.inflight, a.syncfs_every)
                results[kind].append((user, system))
                print("round %d %s: %.1f us user + %.1f us sys a message" % (
                    r + 1, kind, 1e6 * user / a.messages, 1e6 * system / a.messages),
                    flush=True)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    for kind in ("two", "one"):
        us = sorted(1e6 * (u + s) / a.messages for u, s in results[kind])
        print("%s files: median %.1f us CPU a message (min %.1f, max %.1f), %d system "
              "calls a message" % (kind, us[len(us) // 2], us[0], us[-1], SYSCALLS[kind]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
