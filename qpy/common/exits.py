"""exits — the exit codes qpy's programs share, in qmail's meanings.

Every program's EXIT CODES section says which of these it uses. The injection
codes are qmail-queue's, so a front end or script written for qmail reads them
the same way: 11 to 40 are permanent (the message will never be taken), every
other non-zero code is temporary. This module imports nothing: qpy-sendmail
loads it on every injection.
"""

EXIT_OK = 0
EXIT_PERM = 100             # permanent failure; also a usage error (qmail's tools)
EXIT_USAGE = 100
EXIT_TEMP = 111             # temporary failure: try again later

# qmail-queue's codes, as qpy-queue-inject and qpy.inject.drop use them
EXIT_TOO_LONG = 11          # address too long
EXIT_REFUSED = 31           # message refused (too big)
EXIT_TIMEOUT = 52           # timeout reading the message
EXIT_WRITE = 53             # write error (disk full)
EXIT_READ = 54              # cannot read the message or the envelope (truncated)
EXIT_CONFIG = 55            # cannot read a control file
EXIT_QUEUE = 62             # trouble making files in the queue
EXIT_BUG = 81               # internal bug
EXIT_FORMAT = 91            # envelope format error


def permanent(code: int) -> bool:
    """A qmail-queue exit code that means the message will never be taken."""
    return 11 <= code <= 40


def leave(code: int) -> None:
    """Exit with `code` at once, skipping the interpreter's teardown (about 1 ms, an
    eighth of a front end's run): for the front ends that shell loops start once per
    message, once their work is durable and their files closed. Only stdio's buffers
    are left, and they are flushed here; a flush that fails turns an exit 0 into 120,
    as the interpreter's own exit does."""
    import posix  # imported at start-up already; `os` would cost more than it saves
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            code = code or 120
    posix._exit(code)
