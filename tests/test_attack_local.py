"""Issue 12, attacks by local users: hostile drop files (findings 3 and 9).

Real programs, real files, real uids (as root)."""

from __future__ import annotations

import os
import pwd
import resource
import zlib

import qpytest
from qpytest import needs_root, wait_for
from test_inject import pickup_log, queue_inject, queued_messages

from qpy.common import dropfile, envelope

MEMORY_LIMIT = 256 << 20


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _hostile(qroot, name: str, head: bytes, size: int, tail: bytes = b"") -> None:
    """A drop file of `size` bytes whose only data are `head` and `tail`: holes between."""
    path = os.path.join(qroot.paths.drop, name)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size - len(tail))
        f.seek(0, os.SEEK_END)
        f.write(tail)
    os.chown(path, 0, pwd.getpwnam("qpyq").pw_gid)
    os.chmod(path, 0o640)


def _zeros_crc(n: int, crc: int = 0) -> int:
    block = bytes(1 << 20)
    while n:
        step = min(n, len(block))
        crc = zlib.crc32(block[:step], crc)
        n -= step
    return crc


def _inject_good(qroot, tag: bytes) -> None:
    qpytest.make_user("attack")
    r = queue_inject(qroot, b"Subject: " + tag + b"\n\nfine\n",
                     envelope.encode(b"a@b.example", [b"c@test.example"]), user="qtattack")
    assert r.returncode == 0, r.stderr       # acknowledged: it must reach the queue


@needs_root
def test_attack_local_finding3_hostile_drops_under_memory_limit(qroot):
    """Finding 3 (+9): pickup under RLIMIT_AS 256 MiB meets a header claiming a ~1 GiB
    envelope over a sparse file, a sparse message with a right checksum, an envelope
    over its limit, a truncated file, a FIFO, a symlink and a hard link; it quarantines each, stays up, stays small,
    and admits every acknowledged message injected around them."""
    drop = qroot.paths.drop
    _inject_good(qroot, b"before")
    env = envelope.encode(b"a@b.example", [b"c@test.example"])
    # a header claiming a ~1 GiB envelope; the file is that long, but all holes
    envlen = (1 << 30) - 4096
    _hostile(qroot, "100.1.1", dropfile.header(1, 10, envlen, 0) + b"Subject: x",
             dropfile.HEADER_LEN + 10 + envlen)
    # a sparse message of 40 MiB (under any size limit) with a checksum that matches:
    # only its holes are wrong (admitted, it would take 40 MiB of real disk)
    msglen = 40 << 20
    crc = zlib.crc32(env, _zeros_crc(msglen))
    _hostile(qroot, "101.1.1", dropfile.header(1, msglen, len(env), crc),
             dropfile.HEADER_LEN + msglen + len(env), env)
    good = dropfile.build(1, b"Subject: t\n\nt\n", env)
    _hostile(qroot, "102.1.1", good[:-5], len(good) - 5)                   # truncated
    os.mkfifo(os.path.join(drop, "103.1.1"))                                # FIFO
    victim = os.path.join(os.path.dirname(qroot.path), "victim")
    with open(victim, "wb") as f:
        f.write(good)
    os.symlink(victim, os.path.join(drop, "104.1.1"))                       # symlink
    os.link(victim, os.path.join(drop, "105.1.1"))                          # hard link
    # not sparse, but an envelope one byte over its limit: refused before it is read
    envlen = envelope.MAX_ENVELOPE + 1
    with open(os.path.join(drop, "106.1.1"), "wb") as f:
        f.write(dropfile.header(1, 0, envlen, 0) + bytes(envlen))
    log = open(os.path.join(os.path.dirname(qroot.path), "pickup.log"), "ab")
    p = qroot.start("qpy-pickup", stdout=log, preexec_fn=_limit_memory)
    _inject_good(qroot, b"during")
    assert wait_for(lambda: len(os.listdir(drop)) == 0, 60), os.listdir(drop)
    _inject_good(qroot, b"after")
    assert wait_for(lambda: len(queued_messages(qroot)) == 3, 30), pickup_log(qroot)
    assert p.poll() is None, "pickup died: " + pickup_log(qroot)
    with open("/proc/%d/status" % p.pid) as f:
        hwm = [ln for ln in f if ln.startswith("VmHWM:")][0]
    assert int(hwm.split()[1]) < 100 * 1024, hwm          # kB: it never read a hole
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\n")[0]
                      for m in queued_messages(qroot).values())
    assert subjects == [b"after", b"before", b"during"]
    assert len(os.listdir(qroot.paths.quarantine)) == 7
    text = pickup_log(qroot)
    for name, reason in (("100.1.1", "sparse file"), ("101.1.1", "sparse file"),
                         ("106.1.1", "envelope too large")):
        assert [ln for ln in text.splitlines()
                if ln.startswith("quarantine drop %s " % name) and reason in ln], text
    for reason in ("lengths do not match", "not a plain file", "cannot open", "links"):
        assert reason in text, (reason, text)
    with open(victim, "rb") as f:
        assert f.read() == good
