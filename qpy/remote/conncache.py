"""conncache — the SMTP connection a qpy-rspawn worker keeps for the next job.

Used by qpy.remote.worker and qpy.remote.transaction (as `qpyr`); no program of
its own. What reuse means for a delivery is in qpy-remote's man page
("Connection reuse"); this module only holds the connection and ends it in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from qpy.remote.route import Target
from qpy.remote.tlspolicy import Plan
from qpy.remote.wire import Conn, end

CONN_IDLE = 2.0             # seconds a cached connection may sit unused (Postfix's default)
CONN_MAX_AGE = 300.0        # seconds since it was opened (Postfix's reuse time limit)
CONN_MAX_USES = 100         # transactions on one connection


@dataclass(eq=False)
class Cached:
    """A connection after a clean transaction, with what reusing it needs."""
    conn: Conn
    domain: str             # the job's routing key: the recipients' domain, or `host`
    target: Target          # where it goes
    ext: dict[str, str]     # the EHLO keywords (after STARTTLS when it was used)
    plan: Plan              # what it was opened under (qpy.remote.tlspolicy)
    opened: float           # time.monotonic() at connect
    uses: int = 1           # transactions run on it
    last: float = 0.0       # time.monotonic() when its last transaction ended


class ConnCache:
    """At most one idle SMTP connection, kept for the next job to the same domain.

    qpy-rspawn's workers (qpy.remote.worker) keep one across deliveries; qpy-remote
    keeps none. A connection is given back only after a clean transaction and is
    ended (QUIT) once idle CONN_IDLE seconds, CONN_MAX_AGE after it was opened, or
    after CONN_MAX_USES transactions.
    """

    def __init__(self) -> None:
        self.held: Cached | None = None

    def domain(self) -> str:
        return self.held.domain if self.held else ""

    def fileno(self) -> int:
        """The held connection's socket, to watch while idle; -1 when none is held."""
        return self.held.conn.sock.fileno() if self.held else -1

    def deadline(self) -> float | None:
        """time.monotonic() at which the held connection must end; None when none is."""
        h = self.held
        return min(h.last + CONN_IDLE, h.opened + CONN_MAX_AGE) if h else None

    def take(self, domain: str, fits: Callable[[Cached], bool]) -> Cached | None:
        """The held connection when it goes to `domain`, `fits` (the job's TLS and
        AUTH plan is the one it was opened under) and is still fit for use."""
        h, deadline = self.held, self.deadline()
        if h is None or deadline is None or h.domain != domain:
            return None
        self.held = None
        if time.monotonic() >= deadline or not fits(h):
            end(h.conn)
            return None
        return h

    def keep(self, c: Cached) -> None:
        """Hold `c` for the next job (instead of any other), or QUIT it when it is used up."""
        self.close()
        c.last = time.monotonic()
        if c.uses >= CONN_MAX_USES or c.last - c.opened >= CONN_MAX_AGE:
            end(c.conn)
            return
        self.held = c

    def retain(self, domains: set[str]) -> None:
        """QUIT the held connection unless it goes to one of `domains`."""
        if self.held and self.held.domain not in domains:
            self.close()

    def close(self) -> None:
        """QUIT and close the held connection, if any."""
        h, self.held = self.held, None
        if h:
            end(h.conn)

    def drop(self) -> None:
        """Close the held connection without a word: the peer closed it or spoke unasked."""
        h, self.held = self.held, None
        if h:
            h.conn.close()
