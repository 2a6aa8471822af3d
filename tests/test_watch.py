"""The file watcher: inotify events are hints; lost events never strand a file."""

from __future__ import annotations

import os
import time

import qpytest

from qpy.common.watch import Watcher


def queued_events_limit() -> int:
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        return int(f.read())


def test_rename_into_the_directory_wakes_the_watcher():
    """Queue files arrive by rename (drop files, todo/ID): that is the one event watched.
    A file merely created in place wakes nobody; the periodic rescan finds it."""
    d = qpytest.scratch_dir("watch")
    w = Watcher([d], rescan_seconds=3600)
    assert w.rescan_due()                       # a full listing is due at start
    assert not w.rescan_due()
    with open(os.path.join(d, "tmp.x"), "w") as f:
        f.write("x")
    t0 = time.monotonic()
    w.wait(1.0)
    assert time.monotonic() - t0 >= 0.9         # created and written: no wake-up
    os.rename(os.path.join(d, "tmp.x"), os.path.join(d, "x"))
    t0 = time.monotonic()
    w.wait(30)
    assert time.monotonic() - t0 < 20           # woken by the rename, not by the timeout
    assert w.names() == ["x"] and w.names() == []   # the name, once: no listing needed
    for n in ("a", "b"):
        with open(os.path.join(d, "tmp." + n), "w") as f:
            f.write(n)
        os.rename(os.path.join(d, "tmp." + n), os.path.join(d, n))
    w.wait(30)
    w.wait(0.2)                                 # events may come in one read or two
    assert w.names() == ["a", "b"]
    w.close()


def test_periodic_rescan_without_events():
    d = qpytest.scratch_dir("watch")
    w = Watcher([d], rescan_seconds=0.5)
    assert w.rescan_due()
    w.wait(30)                                  # nothing happens: the rescan wakes it
    assert w.rescan_due()
    w.close()


def test_queue_overflow_forces_a_rescan():
    """More events than the kernel queues: IN_Q_OVERFLOW, and a full rescan is due."""
    limit = queued_events_limit()
    d = qpytest.scratch_dir("watch")
    w = Watcher([d], rescan_seconds=3600)
    assert w.rescan_due()
    src = qpytest.scratch_dir("watch")
    for i in range(limit + 100):                # nobody reads events meanwhile: they are lost
        os.close(os.open(os.path.join(src, "f%d" % i), os.O_CREAT | os.O_WRONLY, 0o600))
        os.rename(os.path.join(src, "f%d" % i), os.path.join(d, "f%d" % i))
    w.wait(30)
    assert w.rescan_due(), "an overflow must make the caller list the directory"
    assert len(w.names()) < limit + 100         # names lost with the events: the rescan
    w.close()
    qpytest.remove_tree(d)
    qpytest.remove_tree(src)
