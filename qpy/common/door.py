"""door — the wire format between qpy-smtpd and qpy-pickup's queue door.

qpy-smtpd writes an accepted message, in the drop-file format (qpy.common.dropfile),
into a sealed memfd and hands the descriptor to qpy-pickup over a SOCK_SEQPACKET
socket, `queue/door/socket` (directory qpyq:qpyd 0750; pickup checks the peer's uid
too). Pickup copies it into the queue with the same checks as a drop file, makes it
durable together with whatever else arrived meanwhile, and answers; only then does
qpy-smtpd say 250. So a message from the network is written into the queue once, by
the queue's owner, and the network process never holds a file the queue reads.

    request   b"Q ID" with exactly one descriptor (SCM_RIGHTS): the sealed memfd,
              and the id its sender proposes (ID may be left out: b"Q")
    answers   b"K " ID      queued as ID (durable)
              b"Z " TEXT    not queued, try again later
              b"D " TEXT    not queued, refused for good (the message fails a check)

One request at a time per connection; a connection carries many messages.
"""

from __future__ import annotations

import os

LEAF = "socket"
MAX_DATAGRAM = 512            # an answer or a request never needs more
QUEUED, TEMPORARY, REFUSED = b"K", b"Z", b"D"
REQUEST = b"Q"


def directory(root: str) -> str:
    return os.path.join(root, "queue", "door")
