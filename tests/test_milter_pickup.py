"""Local mail through control/nonsmtpmilters in qpy-pickup (uid qpyq), against a
hand-written filter: edits reach queue/mess, a reject becomes a bounce, a tempfail
or a dead filter holds the drop file, discard removes it, SMTP drops pass unfiltered."""

from __future__ import annotations

import os
import subprocess

import pytest
import qpytest
from milterhelp import ScriptFilter, addheader
from qpytest import needs_root

from qpy.common import envelope

pytestmark = needs_root
MSG = b"From: root@test.example\nSubject: cron\n\nbackup done\n"


@pytest.fixture
def pickup(qroot):
    logpath = os.path.join(os.path.dirname(qroot.path), "pickup.log")

    def start(filt: ScriptFilter | None, control: str | None = None):
        qroot.control("nonsmtpmilters", control if control is not None else filt.endpoint)
        log = open(logpath, "ab")
        qroot.start("qpy-pickup", stdout=log, stderr=subprocess.STDOUT)

    def text() -> str:
        with open(logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")
    start.log = text
    return start


def queued(qroot) -> list[tuple[bytes, bytes, list[bytes]]]:
    out = []
    for name in sorted(n for n in os.listdir(qroot.paths.todo) if n.isdigit()):
        with open(os.path.join(qroot.paths.mess, name), "rb") as f:
            msg = f.read()
        with open(os.path.join(qroot.paths.todo, name), "rb") as f:
            sender, rcpts = _env(f.read())
        out.append((msg, sender, rcpts))
    return out


def _env(todo: bytes) -> tuple[bytes, list[bytes]]:
    return envelope.decode(todo[todo.index(b"\n") + 1:])


def sendmail(qroot, *rcpts: str, msg: bytes = MSG) -> None:
    r = qroot.run("qpy-sendmail", "-f", "root@test.example", *rcpts, input=msg)
    assert r.returncode == 0, r.stderr


def test_edits_reach_the_queue_and_filter_sees_localhost(qroot, pickup):
    f = ScriptFilter(lambda cmd, data: [addheader(b"X-Signed", b"by filter"),
                                        b"+<extra@test.example>\0", b"c"]
                     if cmd == b"E" else [b"c"])
    pickup(f)
    sendmail(qroot, "postmaster@test.example")
    assert qpytest.wait_for(lambda: len(queued(qroot)) == 1, 30), pickup.log()
    (msg, sender, rcpts), = queued(qroot)
    assert msg.startswith(b"Received: (qpy ") and b"X-Signed: by filter\n" in msg
    assert sender == b"root@test.example"
    assert sorted(rcpts) == [b"extra@test.example", b"postmaster@test.example"]
    connect = [d for c, d in f.commands() if c == b"C"][0]
    assert connect.startswith(b"localhost\x004") and connect.endswith(b"127.0.0.1\x00")
    assert (b"H", b"localhost\x00") in f.commands()
    assert os.listdir(qroot.paths.drop) == []


def test_reject_bounces_to_the_sender(qroot, pickup):
    f = ScriptFilter(lambda cmd, data: [b"y550 5.7.1 no cron mail today"]
                     if cmd == b"E" else [b"c"])
    pickup(f)
    sendmail(qroot, "postmaster@test.example")
    assert qpytest.wait_for(lambda: len(queued(qroot)) == 1, 30), pickup.log()
    (msg, sender, rcpts), = queued(qroot)
    assert sender == b"" and rcpts == [b"root@test.example"]
    assert b"no cron mail today" in msg and b"<postmaster@test.example>" in msg
    assert "bounced to <root@test.example>" in pickup.log()


@pytest.mark.parametrize("behaviour", ["tempfail", "dead", "malformed"])
def test_tempfail_or_dead_filter_holds_the_drop_file(qroot, pickup, behaviour):
    if behaviour == "tempfail":
        pickup(ScriptFilter(lambda cmd, data: [b"t"] if cmd == b"E" else [b"c"]))
    elif behaviour == "dead":
        pickup(None, "inet:127.0.0.1:1 connect_timeout=2")
    else:
        pickup(None, "tcp:127.0.0.1:8891")
    sendmail(qroot, "postmaster@test.example")
    assert qpytest.wait_for(lambda: "held by milter" in pickup.log(), 30), pickup.log()
    assert queued(qroot) == []
    assert len(os.listdir(qroot.paths.drop)) == 1       # kept for the next try


def test_discard_removes_the_drop_file(qroot, pickup):
    pickup(ScriptFilter(lambda cmd, data: [b"d"] if cmd == b"E" else [b"c"]))
    sendmail(qroot, "postmaster@test.example")
    assert qpytest.wait_for(lambda: "discarded by milter" in pickup.log(), 30), pickup.log()
    assert qpytest.wait_for(lambda: os.listdir(qroot.paths.drop) == [], 10)
    assert queued(qroot) == []


def test_smtp_drops_are_not_filtered_again(qroot, pickup):
    f = ScriptFilter(lambda cmd, data: [b"r"])
    pickup(f)
    # a drop file owned by qpyd is SMTP mail: written here as qpyd would write it
    r = subprocess.run(["setpriv", "--reuid", "qpyd", "--regid", "qpyd", "--clear-groups",
                        qroot.bin("qpy-sendmail"), "-f", "a@b.example",
                        "postmaster@test.example"], input=MSG, env=qroot.env(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert qpytest.wait_for(lambda: len(queued(qroot)) == 1, 30), pickup.log()
    assert f.all_commands() == []
