"""bench/run --quick: the benchmark harness still drives qpy end to end (issue 7).

The full benchmark (qpy beside Postfix, minutes) is not run in CI; this smoke run sends
50 messages over SMTP, a few through sendmail and one at a time, counts fsyncs with
strace, and must report every figure. Its failure path is checked too: with qpy's
default delivery pointed away from ~/Maildir/ nothing arrives, and bench/run must say
so with a non-zero exit instead of printing a table of nonsense.
"""

from __future__ import annotations

import os
import re
import subprocess

import qpytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(os.path.dirname(HERE), "bench", "run")


def bench(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, QPY_PREFIX=qpytest.PREFIX)
    return subprocess.run([RUN, "--quick", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@qpytest.needs_root
def test_quick_run_delivers_and_reports_every_figure():
    r = bench()
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    table = r.stdout
    for figure in ("accepted msg/s", "delivered msg/s", "injected msg/s", "p50 ms",
                   "p99 ms", "peak RSS MiB", "fsync+fdatasync+syncfs", "ops/s, 1 writer",
                   "% of one core", "ms per sendmail call",
                   "ms per bare `python3 -IS -c pass` (qpy's floor)"):
        row = [line for line in table.splitlines() if "| %s |" % figure in line]
        assert row, "no %r row in:\n%s" % (figure, table)
        value = row[0].split("|")[3].strip()
        assert re.fullmatch(r"[0-9.]+", value), row[0]
        assert float(value) > 0 or figure == "% of one core", row[0]
    # each message took at least one fsync on its way (drop file, queue, Maildir)
    fs = [line for line in table.splitlines() if "fsync+fdatasync+syncfs" in line][0]
    assert float(fs.split("|")[3]) >= 1.0, fs
    # W1 through one pass-through milter (issue 16): the harness points qpy at the filter
    row = [line for line in table.splitlines() if "W1 + one pass-through milter" in line]
    assert row and float(row[0].split("|")[3].split()[0]) > 0, table
    assert "Failed runs" not in table
    # no resident part spins while no mail flows (pickup once busy-looped on its watcher)
    idle = [line for line in table.splitlines() if "| % of one core |" in line][0]
    assert float(idle.split("|")[3]) < 10.0, idle


@qpytest.needs_root
def test_quick_run_fails_when_qpy_does_not_deliver_to_maildir():
    # mbox delivery: qpy delivers, but never into the Maildir the harness watches
    r = bench("--only", "W1", "--deadline", "8", "--qpy-control", "defaultdelivery=./Mailbox",
              timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "0 of 50 delivered in time" in r.stdout, r.stdout
