"""qpy-logsum — per-day totals from a qpy log, as qmailanalog's zoverall and zddist.

SYNOPSIS
    qpy-logsum [ROOT] [FILE...]
    qpy-logsum [ROOT] --msg ID [FILE...]

DESCRIPTION
    Reads the log files given (a ROOT directory given first is skipped: the root is
    accepted like every admin tool's, the log is what counts), or standard input when
    none. Each line is one of:

        @4000000067a1b2c30a1b2c3d TEXT         multilog t (tai64n stamp)
        2024-11-29 18:20:00.123456 NAME: TEXT  qpy-start's merged log (ISO time, UTC)

    and TEXT is a qmail-log event (qpy.common.log): `info msg N: bytes B from <S> ...`,
    `starting delivery D: msg N to local|remote A`, `delivery D: success|deferral|failure:
    ...`, `bounce msg N`, `remove msg N by qpy-qrm`, `end msg N`. Lines it does not know
    are counted as `other lines` and otherwise ignored; a line longer than MAX_LINE is cut.

    For each UTC day, and then for all days together, it prints:

        messages, bytes (from `info msg`), recipients (distinct message/address pairs a
        delivery was started for), delivery attempts, success, deferral, failure,
        bounces, removed, ended; ddelay (arrival to successful delivery) average and its
        distribution (the share of successful deliveries done within 1 s, 10 s, 1 min,
        10 min, 1 h, 1 d, later) and percentiles; xdelay (one attempt's duration) average.

    With --msg ID it prints instead every line about that message, as they stand:
    those naming `msg ID` (the id of `250 ... queued as`, of the Received: lines,
    of qpy-qread and qpy-qrm) and the results of its deliveries (`delivery D:`).

RUNS AS
    anyone who can read the log; writes nothing.

EXIT CODES
    0 summarised; 111 a file cannot be read.
"""

from __future__ import annotations

import calendar
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from qpy.common.exits import EXIT_TEMP
from qpy.common.privilege import preamble

MAX_LINE = 8192
TAI_OFFSET = 2 ** 62 + 10            # tai64n label of 1970-01-01 00:00:00 UTC
DELAY_BUCKETS = ((1, "1s"), (10, "10s"), (60, "1min"), (600, "10min"), (3600, "1h"),
                 (86400, "1d"))
PERCENTILES = (50, 90, 95, 99, 100)

TAI64N = re.compile(rb"@([0-9a-f]{16})([0-9a-f]{8})\s")
ISO = re.compile(rb"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(\.\d+)?(?:Z|[+-]00:?00)?\s")
INFO = re.compile(rb"\binfo msg (\d+): bytes (\d+) from <")
START = re.compile(rb"\bstarting delivery (\d+): msg (\d+) to (local|remote) (\S*)")
END_DELIVERY = re.compile(rb"\bdelivery (\d+): (success|deferral|failure):")
BOUNCE = re.compile(rb"\bbounce msg (\d+)")
REMOVE = re.compile(rb"\bremove msg (\d+) by qpy-qrm")
END = re.compile(rb"\bend msg (\d+)")


@dataclass
class Day:
    messages: int = 0
    bytes: int = 0
    recipients: set[tuple[bytes, bytes]] = field(default_factory=set)
    attempts: int = 0
    success: int = 0
    deferral: int = 0
    failure: int = 0
    bounces: int = 0
    removed: int = 0
    ended: int = 0
    other: int = 0
    ddelays: list[float] = field(default_factory=list)
    xdelays: list[float] = field(default_factory=list)

    def add(self, o: Day) -> None:
        for k in ("messages", "bytes", "attempts", "success", "deferral", "failure",
                  "bounces", "removed", "ended", "other"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.recipients |= o.recipients
        self.ddelays += o.ddelays
        self.xdelays += o.xdelays


def stamp(line: bytes) -> tuple[float | None, bytes]:
    """(unix time or None, the rest of the line)."""
    m = TAI64N.match(line)
    if m:
        return int(m.group(1), 16) - TAI_OFFSET + int(m.group(2), 16) / 1e9, line[m.end():]
    m = ISO.match(line)
    if m:
        t = time.struct_time(tuple(int(g) for g in m.groups()[:6]) + (0, 1, 0))
        frac = float(m.group(7)) if m.group(7) else 0.0
        return calendar.timegm(t) + frac, line[m.end():]
    return None, line


class Summary:
    def __init__(self) -> None:
        self.days: dict[str, Day] = {}
        self.arrival: dict[bytes, float] = {}                   # msg -> time of info msg
        self.started: dict[bytes, tuple[bytes, float]] = {}     # delivery -> (msg, time)
        self.last = 0.0

    def day(self, t: float) -> Day:
        key = time.strftime("%Y-%m-%d", time.gmtime(t))
        return self.days.setdefault(key, Day())

    def feed(self, raw: bytes) -> None:
        t, text = stamp(raw[:MAX_LINE])
        # an unstamped line (a bare log) counts at the last time seen
        t = self.last if t is None else t
        self.last = t
        d = self.day(t)
        if m := INFO.search(text):
            d.messages += 1
            d.bytes += int(m.group(2))
            self.arrival.setdefault(m.group(1), t)
        elif m := START.search(text):
            d.attempts += 1
            d.recipients.add((m.group(2), m.group(4)))
            self.started[m.group(1)] = (m.group(2), t)
        elif m := END_DELIVERY.search(text):
            word = m.group(2).decode()
            setattr(d, word, getattr(d, word) + 1)
            msg, began = self.started.pop(m.group(1), (b"", None))
            if began is not None:
                d.xdelays.append(max(0.0, t - began))
            if word == "success" and msg in self.arrival:
                d.ddelays.append(max(0.0, t - self.arrival[msg]))
        elif BOUNCE.search(text):
            d.bounces += 1
        elif REMOVE.search(text):
            d.removed += 1
        elif m := END.search(text):
            d.ended += 1
            self.arrival.pop(m.group(1), None)
        else:
            d.other += 1


def _avg(xs: list[float]) -> str:
    return "%.2f" % (sum(xs) / len(xs)) if xs else "-"


def render(name: str, d: Day) -> list[str]:
    out = ["day: %s" % name,
           "  messages: %d" % d.messages,
           "  bytes: %d" % d.bytes,
           "  recipients: %d" % len(d.recipients),
           "  delivery attempts: %d" % d.attempts,
           "  success: %d" % d.success,
           "  deferral: %d" % d.deferral,
           "  failure: %d" % d.failure,
           "  bounces: %d" % d.bounces,
           "  removed: %d" % d.removed,
           "  ended: %d" % d.ended,
           "  other lines: %d" % d.other,
           "  average ddelay (s): %s" % _avg(d.ddelays),
           "  average xdelay (s): %s" % _avg(d.xdelays)]
    if d.ddelays:
        n = len(d.ddelays)
        ordered = sorted(d.ddelays)
        out.append("  ddelay distribution (%d successful deliveries):" % n)
        done = 0
        for limit, label in DELAY_BUCKETS:
            done = sum(1 for x in ordered if x <= limit)
            out.append("    within %-5s %6d %5.1f%%" % (label, done, 100.0 * done / n))
        out.append("    later        %6d %5.1f%%" % (n - done, 100.0 * (n - done) / n))
        for p in PERCENTILES:
            k = max(0, -(-p * n // 100) - 1)   # nearest-rank percentile
            out.append("    %3d%% within %.2f s" % (p, ordered[k]))
    return out


def summarise(streams: Iterable[Iterable[bytes]]) -> list[str]:
    s = Summary()
    for stream in streams:
        for line in stream:
            s.feed(line.rstrip(b"\r\n"))
    total = Day()
    out: list[str] = []
    for name in sorted(s.days):
        out += render(name, s.days[name])
        total.add(s.days[name])
    out += render("total", total)
    return out


def history(streams: Iterable[Iterable[bytes]], msgid: bytes) -> list[str]:
    """Every line about message msgid, and the results of its deliveries."""
    about = re.compile(rb"\bmsg %s\b" % re.escape(msgid))
    mine: set[bytes] = set()
    out: list[str] = []
    for stream in streams:
        for line in stream:
            line = line.rstrip(b"\r\n")[:MAX_LINE]
            start = START.search(line)
            end = END_DELIVERY.search(line)
            if about.search(line) or (end and end.group(1) in mine):
                if start:
                    mine.add(start.group(1))
                out.append(line.decode("utf-8", "replace"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and os.path.isdir(args[0]):
        args = args[1:]   # a ROOT first, as every admin tool takes it
    msgid = None
    if args[:1] == ["--msg"] and len(args) > 1:
        msgid, args = args[1].encode("ascii", "replace"), args[2:]
    preamble("qpy-logsum", "", None)
    files = []
    try:
        for name in args:
            files.append(open(name, "rb"))
    except OSError as e:
        sys.stderr.write("qpy-logsum: cannot read %s: %s\n" % (name, e.strerror))
        return EXIT_TEMP
    streams = files or [sys.stdin.buffer]
    try:
        lines = history(streams, msgid) if msgid else summarise(streams)
        sys.stdout.write("".join(ln + "\n" for ln in lines))
    finally:
        for f in files:
            f.close()
    return 0
