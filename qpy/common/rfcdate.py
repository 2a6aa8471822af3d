"""rfcdate — the one RFC 5322 date writer (Date:, Received:, bounces).

No locale and no email package: `email.utils` costs about 30 ms to import, and
qpy-sendmail writes a Date: on every injection. Names of days and months are
RFC 5322's, never the locale's.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_last: tuple[float, bool, bool, str] = (float("nan"), False, False, "")   # nothing kept


def rfc5322_date(when: float | None = None, local: bool = False,
                 weekday: bool = True) -> str:
    """`Sun, 6 Dec 2026 19:10:35 -0000` for when (default now). UTC is written
    -0000 (RFC 5322: no claim about the local zone); local=True writes local time
    with its offset. weekday=False leaves out the optional day name, as qmail's
    Received: lines do. The last string is kept for its second: qpy-smtpd writes
    one for every message, many a second."""
    global _last
    when = time.time() if when is None else when
    second = when // 1          # gmtime and localtime round down too
    if _last[0] == second and _last[1] == local and _last[2] == weekday:
        return _last[3]
    _last = (second, local, weekday, _format(when, local, weekday))
    return _last[3]


def _format(when: float, local: bool, weekday: bool) -> str:
    if local:
        t = time.localtime(when)
        off = t.tm_gmtoff // 60
        zone = "%s%02d%02d" % ("+" if off >= 0 else "-", abs(off) // 60, abs(off) % 60)
    else:
        t = time.gmtime(when)
        zone = "-0000"
    day = _DAYS[t.tm_wday] + ", " if weekday else ""
    return "%s%d %s %d %02d:%02d:%02d %s" % (day, t.tm_mday, _MONTHS[t.tm_mon - 1],
                                            t.tm_year, t.tm_hour, t.tm_min, t.tm_sec, zone)
