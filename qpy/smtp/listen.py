"""listen — qpy-tcpserver's listening sockets: the profiles and their addresses.

Not a program. `control/smtplisten`, `submissionlisten` and `smtpslisten` hold
one `ADDRESS:PORT` a line (IPv6 in brackets); each profile has its own rules
file (qpy.smtp.rules) and tells qpy-smtpd, through QPY_LISTENER, whether TLS
starts at once (smtps).
"""

from __future__ import annotations

import socket

from qpy.smtp import rules as rulesmod

BACKLOG = 1024

# (name, listen control file, rules control file): a listener profile per line.
PROFILES = (
    ("smtp", "smtplisten", "smtprules"),
    ("submission", "submissionlisten", "submissionrules"),
    ("smtps", "smtpslisten", "smtpsrules"),
)


def parse_listen(entry: str) -> tuple[int, str, int]:
    """`ADDRESS:PORT` or `[IPV6]:PORT` -> (family, address, port)."""
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("bad listen address %r" % entry)
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    if ":" in host:
        raise ValueError("IPv6 listen address needs brackets: %r" % entry)
    return socket.AF_INET, host or "0.0.0.0", int(port)


class Listener:
    def __init__(self, profile: str, rules_name: str, entry: str):
        family, host, port = parse_listen(entry)
        self.profile = profile
        self.rules_name = rules_name
        self.entry = entry
        self.family = int(family)       # an int: socket.family converts to an enum each time
        self.rules: list[rulesmod.Rule] = []
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(BACKLOG)
        self.sock.setblocking(False)
