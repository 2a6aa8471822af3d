"""Power cut, not just process death (issue 17 item 2).

This kernel has loop devices and ext4 but no device-mapper (no /dev/mapper/control,
no modules to load), so dm-flakey and dm-log-writes are out. Instead the queue and
the recipient's home live on an ext4 file system on a loop device; while mail flows,
every qpy process is stopped (SIGSTOP) at random moments and the loop device's
backing file is copied: that copy holds what ext4 had written to its "disk", not
what sat dirty in the page cache, i.e. what a power cut at that moment leaves (the
journal mounted with commit=600, so only qpy's own fsync/syncfs commit anything).
Each image is then mounted where the live file system was, its journal replayed,
qpy started on it and left to finish, and the invariant checked: every message
acknowledged before the cut is delivered, none is delivered half, the queue ends
empty and passes `qpy-install --check`.

Limits: a kernel thread may write back while the processes are stopped, and the
copy is not atomic against it; the images are therefore "a cut at about this
moment". QPY_POWERCUTS sets the number of images (default 4; 30 by hand).
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import qpytest
from qpytest import wait_for

pytestmark = [qpytest.needs_root,
              pytest.mark.skipif(not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
                                 reason="no losetup or mkfs.ext4")]

CUTS = int(os.environ.get("QPY_POWERCUTS", "4"))
ME = "test.example"
USER = "qtpower"
IMAGE_MB = 96


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


class Disk:
    def __init__(self, top: str):
        self.top = top
        self.backing = os.path.join(top, "disk.img")
        self.mnt = os.path.join(top, "mnt")
        os.makedirs(self.mnt)
        with open(self.backing, "wb") as f:
            f.truncate(IMAGE_MB << 20)
        self.dev = ""

    def attach(self, image: str) -> None:
        try:
            self.dev = sh("losetup", "-f", "--show", image).strip()
        except subprocess.CalledProcessError as e:
            pytest.skip("no loop device here: %s" % e.stderr.strip())
        sh("mount", "-t", "ext4", "-o", "commit=600", self.dev, self.mnt)

    def detach(self) -> None:
        if self.dev:
            subprocess.run(["umount", self.mnt], capture_output=True, timeout=120)
            subprocess.run(["losetup", "-d", self.dev], capture_output=True, timeout=60)
            self.dev = ""


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        p = psutil.Process(proc.pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


def start(root: str, log: str) -> subprocess.Popen:
    for old in glob.glob(os.path.join(root, "queue/run/*.pid")):
        os.unlink(old)          # the image's, from before the cut
    with open(log, "ab") as f:
        p = subprocess.Popen([qpytest.bin_path("qpy-start"), root], stdout=f,
                             stderr=subprocess.STDOUT,
                             env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root})
    assert wait_for(lambda: os.path.exists(os.path.join(root, "queue/run/queue-send.pid")),
                    30)
    return p


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(90)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def send(root: str, tok: str) -> bool:
    body = "Subject: tok %s\n\n%sEND %s\n" % (tok, "filler line\n" * 30, tok)
    r = subprocess.run([qpytest.bin_path("qpy-sendmail"), "%s@%s" % (USER, ME)],
                       input=body.encode(), capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "QPY_ROOT": root})
    return r.returncode == 0


def delivered(home: str) -> dict[str, int]:
    seen: dict[str, int] = {}
    for p in glob.glob(os.path.join(home, "Maildir", "new", "*")):
        with open(p, "rb") as f:
            data = f.read()
        m = re.search(rb"Subject: tok (p\d+)", data)
        if m:
            tok = m.group(1).decode()
            assert b"END " + m.group(1) in data, "half delivered: %s" % tok
            seen[tok] = seen.get(tok, 0) + 1
    return seen


def busy(root: str) -> list[str]:
    return [d + "/" + n for d in ("drop", "mess", "todo", "state")
            for n in os.listdir(os.path.join(root, "queue", d))]


def probe_is_volatile(disk: Disk, top: str) -> None:
    """The method itself: bytes written without fsync are not in an image."""
    data = b"not synced\n" * 6000
    with open(os.path.join(disk.mnt, "probe"), "wb") as f:
        f.write(data)
    image, mnt = os.path.join(top, "probe.img"), os.path.join(top, "probe-mnt")
    sh("cp", "--sparse=always", disk.backing, image)
    os.makedirs(mnt)
    dev = sh("losetup", "-f", "--show", image).strip()
    try:
        sh("mount", "-t", "ext4", dev, mnt)
        try:
            with open(os.path.join(mnt, "probe"), "rb") as f:
                kept = f.read()
        except FileNotFoundError:
            kept = b""
        subprocess.run(["umount", mnt], timeout=60)
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=60)
        os.unlink(image)
    assert kept != data, "the image holds unsynced data: it would not show a power cut"
    os.unlink(os.path.join(disk.mnt, "probe"))


def test_power_cut_images_keep_every_acknowledged_message():
    top = qpytest.scratch_dir("power")
    disk = Disk(top)
    images: list[tuple[str, set[str]]] = []
    try:
        sh("mkfs.ext4", "-q", "-F", disk.backing)
        disk.attach(disk.backing)
        os.chmod(disk.mnt, 0o755)
        root = os.path.join(disk.mnt, "qpy")
        home = os.path.join(disk.mnt, "home")
        sh(qpytest.bin_path("qpy-install"), root, "--me", ME)
        qpytest.make_user(USER, home)
        probe_is_volatile(disk, top)
        live = start(root, os.path.join(top, "live.log"))
        acked: set[str] = set()
        rng = random.Random(17)
        cut_at = sorted(rng.sample(range(3, 12 * CUTS), CUTS))
        n = 0
        try:
            while len(images) < CUTS:
                n += 1
                if send(root, "p%d" % n):
                    acked.add("p%d" % n)
                if n in cut_at:
                    time.sleep(rng.random() * 0.05)     # somewhere in pickup/delivery
                    procs = tree(live)
                    for p in procs:
                        p.send_signal(signal.SIGSTOP)
                    image = os.path.join(top, "cut-%d.img" % len(images))
                    sh("cp", "--sparse=always", disk.backing, image)
                    for p in procs:
                        p.send_signal(signal.SIGCONT)
                    images.append((image, set(acked)))
        finally:
            stop(live)
            disk.detach()
        lost_total = dups = 0
        for image, acked_then in images:
            disk.attach(image)
            try:
                log = os.path.join(top, os.path.basename(image) + ".log")
                p = start(root, log)
                try:
                    def done(p: subprocess.Popen = p, acked_then: set = acked_then) -> bool:
                        left = busy(root)
                        if left and all(x.startswith("drop/tmp.") for x in left):
                            send(root, "p0")        # a scan removes the orphan
                        p.send_signal(signal.SIGALRM)
                        return not left and acked_then <= set(delivered(home))
                    wait_for(done, 60, 0.5)
                finally:
                    stop(p)
                seen = delivered(home)
                lost = sorted(acked_then - set(seen))
                if lost:
                    with open(log, errors="replace") as f:
                        print(f.read()[-3000:])
                    print("log %s: %d bytes" % (log, os.path.getsize(log)))
                    print(busy(root), sorted(seen), sorted(acked_then))
                    print(sh("ls", "-la", os.path.join(root, "queue", "drop"),
                             os.path.join(root, "queue", "quarantine")))
                lost_total += len(lost)
                dups += sum(c - 1 for c in seen.values())
                assert not lost, "%s: acknowledged, not delivered: %s" % (image, lost)
                assert busy(root) == [], (image, busy(root))
                r = subprocess.run([qpytest.bin_path("qpy-install"), "--check", root],
                                   capture_output=True, timeout=60)
                assert r.returncode == 0, r.stdout
            finally:
                disk.detach()
                if not os.environ.get("QPY_KEEP"):
                    os.unlink(image)
        print("\npower cut: %d images, %d messages acknowledged before the last cut, "
              "lost %d, duplicates %d" % (len(images), len(images[-1][1]), lost_total, dups))
    finally:
        disk.detach()
        if not os.environ.get("QPY_KEEP"):
            qpytest.remove_tree(top)
