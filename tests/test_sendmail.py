"""qpy as the host's MTA: one id per message, the sendmail command line and its modes.

Real programs: qpy-tcpserver/qpy-smtpd, qpy-sendmail, qpy-pickup, qpy-qread, run as
separate processes on a freshly installed root."""

from __future__ import annotations

import os
import re

import smtphelp
from qpytest import wait_for
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
