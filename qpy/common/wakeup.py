"""wakeup — signals as events of a program's select loop (the self-pipe).

    sigs = Wakeup((signal.SIGHUP, signal.SIGTERM))
    ... select([sigs.fd, ...], ...) ...
    for sig in sigs.take(): ...         (or sigs.take_if(sigs.fd in ready))

A handled signal only notes its number; Python's wakeup fd (signal.set_wakeup_fd)
gets a byte at once, so a loop that sleeps in select() or a selector wakes the
moment a signal comes, whatever its timeout: Python restarts an interrupted
select() (PEP 475), so a handler alone would be seen only at the timeout. take()
returns the signals in the order they came, each once per arrival. SIGPIPE is
ignored (a write to a closed pipe or socket is an error, not a death).

A forked child that goes on to serve calls release() first: its signals go back to
their defaults and the pipe is closed in it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


class Wakeup:
    def __init__(self, signals: Iterable[int], unblock: bool = False):
        """Handle `signals`; with unblock, also unblock them (qpy-start execs some
        programs with them blocked, so that none kills them before this point)."""
        self.signals = tuple(signals)
        self._got: list[int] = []
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in self.signals:
            signal.signal(sig, self._note)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if unblock:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self.signals))

    def _note(self, sig: int, frame: object) -> None:
        self._got.append(sig)

    def fileno(self) -> int:
        return self.fd

    def pending(self) -> bool:
        """Signals have come since the last take() (their handler has run): a loop
        that reads the pipe only when select() says so must still take() then, for a
        signal that came after select() had gathered its events."""
        return bool(self._got)

    def take_if(self, woken: bool) -> list[int]:
        """take() when select() found the pipe readable (woken) or a handler has run
        since the last take; else [] without a read(2): the common pass of a busy
        loop, woken by its work and not by a signal."""
        return self.take() if woken or self._got else []

    def take(self) -> list[int]:
        """The signals that came since the last call, in order; empties the pipe."""
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass
        got, self._got = self._got, []
        return got

    def release(self) -> None:
        """In a forked child: default signal handling, and the pipe closed."""
        signal.set_wakeup_fd(-1)
        for sig in self.signals + (signal.SIGPIPE,):
            signal.signal(sig, signal.SIG_DFL)
        self.close()

    def close(self) -> None:
        """In a forked child that has set its own handlers: the pipe closed."""
        for fd in (self.fd, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
