"""Errors from the disk, not just crashes (issue 17 item 3): EIO and ENOSPC injected
by strace into the write and fsync calls of each program that writes mail.

One-shot programs (qpy-queue-inject, qpy-sendmail, qpy-smtpd) must say "temporary
failure" (exit 53/111/75, SMTP 4xx) and leave nothing; a resident program (pickup,
queue-send, lspawn with its qpy-local workers) has the fault injected while it runs:
it must keep the message (nothing is lost once the fault goes), report it, and not
spin (its CPU time over a few seconds stays low).
"""

from __future__ import annotations

import os
import shutil
import time

import crashpoints
import psutil
import pytest
import qpytest

pytestmark = [qpytest.needs_root,
              pytest.mark.skipif(not shutil.which("strace"), reason="no strace"),
              pytest.mark.skipif(not shutil.which("smtp-sink"), reason="no smtp-sink")]

FAULT_SECONDS = 4.0
MAX_CPU = 1.0          # seconds of CPU the faulted family may use in FAULT_SECONDS


@pytest.fixture(scope="module")
def rig():
    r = crashpoints.Rig("qtdisk")
    yield r
    r.stop()


def strace(call: str, error: str) -> list[str]:
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=" + call,
            "-e", "inject=%s:error=%s" % (call, error)]


@pytest.mark.parametrize("prog", ["sendmail", "queue-inject", "smtpd"])
@pytest.mark.parametrize("fault", ["write:EIO", "write:ENOSPC", "fsync:EIO", "pwrite64:EIO"])
def test_injector_with_a_failing_disk_refuses_and_leaves_nothing(rig, prog, fault):
    call, error = fault.split(":")
    if prog == "smtpd" and call == "write":
        call = "pwrite64"       # its writes to the client are write(2) too
    m = rig.new("smtp" if prog == "smtpd" else "local")
    rig.inject(m, prog, strace(call, error))
    busy = rig.queue_busy()
    if m.acked:
        # the fault never met a write that mattered (smtpd hands the message over
        # through pickup's door, with no fsync of its own): then it must arrive
        assert call in ("fsync", "pwrite64") and prog == "smtpd", (prog, fault)
    assert rig.settle([]) is not None, rig.queue_busy()
    quarantined = []
    if call == "fsync" and prog != "smtpd" and not m.acked:
        # pickup may have opened the drop file between its rename and the failed fsync
        # and then read the header the injector spoiled before unlinking it
        # (qpy.inject.drop.Drop._void): it quarantines what was never acknowledged.
        # That file, and only that one, may be there.
        qdir = os.path.join(rig.qroot.paths.queue, "quarantine")
        for name in os.listdir(qdir):
            with open(os.path.join(qdir, name), "rb") as f:
                assert b"Subject: tok %s\n" % m.tok.encode() in f.read(), name
            os.unlink(os.path.join(qdir, name))
            quarantined.append(name)
    tally = crashpoints.Tally()
    rig.check([m], tally)
    # an unacknowledged message may still arrive whole (pickup can read a drop file
    # between its rename and the failed fsync; docs/durability.md), never half
    assert (tally.lost, tally.half, tally.leftover) == (0, 0, 0), (tally, busy, quarantined)


def cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            t = psutil.Process(p).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


@pytest.mark.parametrize("prog,fault,kind", [
    ("pickup", "fsync,fdatasync,syncfs:error=EIO", "local"),
    ("pickup", "write,pwrite64:error=ENOSPC", "local"),
    ("queue-send", "fsync,fdatasync:error=EIO", "qrm"),     # a deferral writes state/ID
    ("queue-send", "write,pwrite64:error=ENOSPC", "bounce"),  # a bounce is a drop file
    ("lspawn", "fsync,fdatasync:error=EIO", "local"),
    ("lspawn", "write,pwrite64:error=ENOSPC", "local"),
])
def test_resident_program_with_a_failing_disk_keeps_the_mail_and_does_not_spin(
        rig, prog, fault, kind, tmp_path):
    rig.settle([])
    pids = crashpoints.family(rig, prog)
    out = str(tmp_path / "trace")
    t = crashpoints.attach(pids, fault.split(":")[0], out, None, fault)
    try:
        m = rig.new(kind)
        rig.inject(m, "sendmail")
        assert m.acked
        time.sleep(0.5)
        before = cpu(pids)
        time.sleep(FAULT_SECONDS)
        used = cpu(pids) - before
        with open(out, errors="replace") as f:
            injected = f.read().count("(INJECTED)")
        survived = psutil.pid_exists(pids[0])
    finally:
        crashpoints.detach(t)
    with open(rig.log.name, "rb") as f:
        said = [ln for ln in f.read().decode("utf-8", "replace").splitlines()[-40:]
                if "warning" in ln or "killed" in ln or "exited" in ln or "defer" in ln]
    print("\n%s %s: %d calls failed, %.2f s CPU in %.0f s, %s; log: %s" % (
        prog, fault, injected, used, FAULT_SECONDS, "survived" if survived else "restarted",
        said[-3:]))
    assert injected > 0, "the fault never met a call"
    assert used < MAX_CPU, "%s spins under %s: %.2f s CPU" % (prog, fault, used)
    pending = [m] if kind == "qrm" else []
    nudged = rig.settle(pending)
    assert nudged is not None, rig.queue_busy()
    tally = crashpoints.Tally()
    rig.check([m] + nudged, tally)
    assert (tally.lost, tally.half, tally.leftover, tally.check) == (0, 0, 0, 0), tally
    assert all(rig.pid(p) for p in crashpoints.RESIDENT)
    if kind != "qrm":
        assert rig.deliveries().get(m.tok), "not delivered once the disk was well again"
