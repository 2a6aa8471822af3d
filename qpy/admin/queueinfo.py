"""queueinfo — what the admin tools read from a queue: ids, counts, ages, signals.

Shared by qpy-qstat, qpy-qread, qpy-status, qpy-qrm and qpy-qretry. Reads only;
the one write (a removal request, `queue/rm/ID`) goes through qpy.common.durable.
"""

from __future__ import annotations

import os
import signal

from qpy.common import dropfile
from qpy.common.queue import Paths, is_id

MAX_PID_FILE = 64
QUEUE_SEND_PID = "queue-send.pid"   # written by qpy-start into queue/run/
QUEUE_SEND_TITLE = "qpy-queue-send"


def ids(directory: str) -> list[str]:
    """Message ids named in a queue directory (temporary and stray names skipped)."""
    try:
        return sorted((n for n in os.listdir(directory) if is_id(n)), key=int)
    except FileNotFoundError:
        return []


def drop_names(paths: Paths) -> list[str]:
    """Committed drop files not yet picked up (temporary names are not messages yet)."""
    try:
        return [n for n in os.listdir(paths.drop) if dropfile.is_final_name(n)]
    except FileNotFoundError:
        return []


def counts(paths: Paths) -> tuple[int, int]:
    """(messages in queue, not yet preprocessed), as qmail-qstat: drop files count in both."""
    waiting = len(drop_names(paths))
    return len(ids(paths.mess)) + waiting, len(ids(paths.todo)) + waiting


def oldest(paths: Paths) -> float | None:
    """Modification time of the oldest queued message file, or None when empty."""
    times = []
    for name in ids(paths.mess):
        try:
            times.append(os.stat(os.path.join(paths.mess, name)).st_mtime)
        except FileNotFoundError:
            continue
    for name in drop_names(paths):
        try:
            times.append(os.stat(os.path.join(paths.drop, name)).st_mtime)
        except FileNotFoundError:
            continue
    return min(times) if times else None


def read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PID_FILE).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def queue_send_pid(paths: Paths) -> int | None:
    """The pid of this root's running qpy-queue-send, checked by its process title."""
    pid = read_pid(os.path.join(paths.run, QUEUE_SEND_PID))
    if pid is None:
        return None
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            title = f.read(256)
    except OSError:
        return None
    # a stale pid file may name a pid the kernel has given to something else
    if title.split(b"\0")[0].split(b" ")[0] != QUEUE_SEND_TITLE.encode():
        return None
    return pid


def alarm_queue_send(paths: Paths) -> str | None:
    """SIGALRM to qpy-queue-send (retry everything now); None, or why it failed."""
    pid = queue_send_pid(paths)
    if pid is None:
        return "qpy-queue-send is not running (no live pid in %s)" % \
            os.path.join(paths.run, QUEUE_SEND_PID)
    try:
        os.kill(pid, signal.SIGALRM)
    except OSError as e:
        return "cannot signal qpy-queue-send pid %d: %s" % (pid, e.strerror)
    return None
