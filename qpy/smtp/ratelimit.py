"""ratelimit — per-client connection and message rates for qpy-tcpserver (anvil-style).

control/ratelimits, one limit a line, per client address per minute:

    connections N     new connections; over it: `421 4.7.0` and close, logged
    messages N        MAIL commands; over it: `421 4.7.0` and the session ends

0 or a missing line is no limit. The counters live in one shared anonymous
mapping that qpy-tcpserver makes before it forks its workers (Postfix keeps
them in its anvil server): the parent counts connections as it accepts them,
the workers count MAIL commands, under one lock. A fixed one-minute window per
address; SLOTS addresses are tracked at once (each probes PROBES slots), and
an address that finds no free slot is not limited (fail open, as a full anvil
table would). Under ucspi-tcp's tcpserver each qpy-smtpd process is alone, so
only qpy-tcpserver applies these limits.
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
import time
import zlib

from qpy.common.control import Control
from qpy.common.log import log

SLOTS = 8192
PROBES = 8
SLOT = struct.Struct("<16sIII")      # address, minute, connections, messages

shared: RateLimits | None = None     # set by qpy-tcpserver before it forks its workers


class RateLimits:
    def __init__(self, ctl: Control):
        self.limits = {"connections": 0, "messages": 0}
        for line in ctl.lines("ratelimits"):
            words = line.split()
            if len(words) == 2 and words[0] in self.limits and words[1].isdigit():
                self.limits[words[0]] = int(words[1])
            else:
                log("control/ratelimits: ignored line %r" % line[:60])
        self.mem: mmap.mmap | None = None
        self.lock = None
        if any(self.limits.values()):
            import multiprocessing  # only here: qpy-smtpd under ucspi-tcp never needs it
            self.mem = mmap.mmap(-1, SLOTS * SLOT.size)   # MAP_SHARED: the workers see it
            self.lock = multiprocessing.Lock()

    def over(self, kind: str, ip: str) -> bool:
        """Count one more `kind` for ip; True when that is over its limit."""
        limit = self.limits[kind]
        if not limit or self.mem is None or self.lock is None:
            return False
        try:
            key = ipaddress.ip_address(ip).packed.ljust(16, b"\0")
        except ValueError:
            return False
        minute = int(time.time() // 60)
        first = zlib.crc32(key) % SLOTS
        with self.lock:
            for n in range(PROBES):
                off = ((first + n) % SLOTS) * SLOT.size
                k, when, conns, msgs = SLOT.unpack_from(self.mem, off)
                if k == key and when == minute:
                    pass
                elif when != minute:             # free, or another address's old window
                    k, conns, msgs = key, 0, 0
                else:
                    continue
                conns += kind == "connections"
                msgs += kind == "messages"
                SLOT.pack_into(self.mem, off, key, minute, conns, msgs)
                count = conns if kind == "connections" else msgs
                return count > limit
        return False
