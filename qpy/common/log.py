"""log — one line per event on stderr, in qmail-log's words.

Timestamps are the collector's job (multilog, journald, or qpy-start). Text from
outside is made printable and bounded before it reaches a log line.
"""

from __future__ import annotations

import os

MAX_LOG_TEXT = 800


def clean(text: bytes | str, limit: int = MAX_LOG_TEXT) -> str:
    """Printable ASCII only, bounded: safe for a log line or a reply."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out = "".join(c if " " <= c <= "~" else "_" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def log(line: str) -> None:
    data = (line.replace("\n", " ") + "\n").encode("utf-8", "replace")
    try:
        os.write(2, data)
    except OSError:
        pass
