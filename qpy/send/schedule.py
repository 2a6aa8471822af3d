"""schedule — when qpy-queue-send tries a recipient again, and the words it logs.

A temporary failure is retried on qmail's schedule: the next try is at
birth + (floor(sqrt(age)) + c)^2, with c = 10 for local and 20 for remote
recipients. Past the message's lifetime (control/queuelifetime) it gets one
more try; a temporary failure then becomes permanent (EXPIRED is appended).
The recipient state words themselves are qpy.common.state's.
"""

from __future__ import annotations

import math

from qpy.common.state import LOCAL, PENDING, REMOTE, RecipientState

CHANSKIP = {LOCAL: 10, REMOTE: 20}
EXPIRED = "I'm not going to try again; this message has been in the queue too long."
NO_REMOTE = "qpy-rspawn is not running; remote delivery waits in the queue (#4.3.0)"
RETRY_LATER = 123           # a bounce or clean-up that failed is tried again after this


def next_try(birth: int, now: int, channel: str, lifetime: int) -> int:
    """qmail's chrysanthemum schedule, with the last try at the end of the lifetime."""
    age = max(0, now - birth)
    nxt = birth + (math.isqrt(age) + CHANSKIP[channel]) ** 2
    end = birth + lifetime
    if now < end < nxt:
        nxt = end
    return nxt


def dying(birth: int, now: int, lifetime: int) -> bool:
    """This try is the last: a temporary failure now is permanent."""
    return now >= birth + lifetime


def due(r: RecipientState, now: int) -> bool:
    """Still to be tried, and its time has come."""
    return r.state in PENDING and r.next_try <= now
