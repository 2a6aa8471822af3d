"""Every durable step crashed on purpose (issue 17): tests/crashpoints.py in CI.

CI runs every point of the one-shot programs and every QPY_CRASH_EVERY-th point
(default 6) of the resident ones, about four minutes on two cores; the full sweep
(about 40 minutes) runs with QPY_CRASH_FULL=1 (test_every_crash_point), or as
tests/crashpoints.py by hand; docs/durability.md has its figures.
"""

from __future__ import annotations

import os
import shutil

import crashpoints
import pytest
import qpytest

pytestmark = [qpytest.needs_root,
              pytest.mark.skipif(not shutil.which("strace"), reason="no strace"),
              pytest.mark.skipif(not shutil.which("smtp-sink"), reason="no smtp-sink")]

EVERY = int(os.environ.get("QPY_CRASH_EVERY", "6"))


def run(programs: tuple[str, ...], every: int) -> None:
    result = crashpoints.sweep(list(programs), every, "qtcrashci")
    print("\n" + crashpoints.table(result))
    for prog, t in result.items():
        assert t.points > 0 and t.fired > 0, (prog, t)
        assert (t.lost, t.half, t.leftover, t.check, t.stuck) == (0, 0, 0, 0, 0), (prog, t)


@pytest.mark.timeout(600)
def test_one_shot_programs_at_every_crash_point():
    run(crashpoints.ONESHOT, 1)


@pytest.mark.timeout(600)
def test_resident_programs_at_a_sample_of_crash_points():
    run(crashpoints.RESIDENT, EVERY)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
@pytest.mark.skipif(not os.environ.get("QPY_CRASH_FULL"), reason="QPY_CRASH_FULL=1: by hand")
def test_every_crash_point():
    run(crashpoints.ONESHOT + crashpoints.RESIDENT, 1)
