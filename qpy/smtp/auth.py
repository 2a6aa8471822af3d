"""auth — SMTP AUTH (RFC 4954) for qpy-smtpd: PLAIN and LOGIN, checked by qpy-authd.

Not a program: the session calls `offered()` when it builds its EHLO reply,
`command()` for an AUTH line, and `sender_allowed()` at MAIL for an
authenticated session.

WHAT IT DOES
    Parses the SASL exchange (RFC 4616 PLAIN, and the LOGIN mechanism) with
    explicit limits: base64 lines of at most MAX_B64 characters, strictly
    decoded, `*` cancels (501). The user and password go to qpy-authd over its
    Unix socket (qpy.common.authdb) together with the client address; qpyd
    never sees a hash. Answers: Y -> 235, N -> 535, L -> 421 and close (the
    client address is locked out for a while), T or no checker -> 454.

POLICY
    AUTH is offered only under TLS and only when qpy-authd's socket exists;
    before TLS an AUTH gets 538 5.7.11. A session may fail MAX_FAILURES times,
    then 421. control/authsenders limits users to their own senders:

        alice: alice@example.org alice.smith@example.org
        bob: @bob.example.net        (any address at that domain)

    A user listed there may use only the listed addresses or domains (compared
    case-insensitively); an address or domain listed for some user may be used
    by that user only. Users not listed, and addresses not listed, are free.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
from collections.abc import Callable

from qpy.common import authdb, unixsock

MECHANISMS = ("PLAIN", "LOGIN")
MAX_B64 = 4 * ((2 * authdb.MAX_USER + authdb.MAX_PASSWORD + 2 + 2) // 3 + 1)
MAX_FAILURES = 3             # per session, then 421
CHECK_TIMEOUT = 30.0         # qpy-authd delays refusals; this bounds the wait

OK = "235 2.7.0 authentication successful"
BAD = "535 5.7.8 authentication credentials invalid"
LOCKED = "421 4.7.0 too many failed authentications from your address, try later"
TOO_MANY = "421 4.7.0 too many failed authentications"
TEMP = "454 4.7.0 temporary authentication failure"
NEED_TLS = "538 5.7.11 encryption required for requested authentication mechanism"
CANCELLED = "501 5.0.0 authentication cancelled"
BAD_B64 = "501 5.5.2 cannot decode response"
SYNTAX = "501 5.5.4 syntax: AUTH mechanism [initial-response]"
UNKNOWN = "504 5.5.4 unrecognized authentication mechanism"
ALREADY = "503 5.5.1 already authenticated"
IN_TRANSACTION = "503 5.5.1 AUTH not permitted during a mail transaction"
NOT_OFFERED = "502 5.5.1 AUTH not available"
SENDER_REFUSED = "553 5.7.1 sender address not owned by authenticated user"


def offered(root: str, tls: bool) -> bool:
    """AUTH goes into EHLO only under TLS and with a checker running."""
    return tls and os.path.exists(authdb.socket_path(root))


def ehlo_line() -> str:
    return "AUTH " + " ".join(MECHANISMS)


def _b64(data: bytes) -> bytes | None:
    if len(data) > MAX_B64:
        return None
    if data == b"=":             # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


# ask(challenge) sends `334 challenge` and returns the client's line (no CRLF),
# or None when the connection ended or the line was too long.
Ask = Callable[[bytes], "bytes | None"]


def exchange(arg: bytes, ask: Ask) -> tuple[bytes, bytes] | str:
    """Run the SASL exchange for `AUTH arg`: (user, password) or an error reply."""
    words = arg.split()
    if not 1 <= len(words) <= 2:
        return SYNTAX
    mech = words[0].upper()
    initial = words[1] if len(words) == 2 else None
    if mech == b"PLAIN":
        line = initial if initial is not None else ask(b"")
        if line is None:
            return CANCELLED
        if line.strip() == b"*":
            return CANCELLED
        raw = _b64(line.strip())
        if raw is None:
            return BAD_B64
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return BAD_B64
        authzid, user, password = parts
        if authzid and authzid != user:   # no proxy authorization
            return BAD
    elif mech == b"LOGIN":
        fields = []
        for prompt, given in ((b"Username:", initial), (b"Password:", None)):
            line = given if given is not None else ask(base64.b64encode(prompt))
            if line is None or line.strip() == b"*":
                return CANCELLED
            value = _b64(line.strip())
            if value is None:
                return BAD_B64
            fields.append(value)
        user, password = fields
    else:
        return UNKNOWN
    if not authdb.valid_user(user) or not authdb.valid_password(password):
        return BAD
    return user, password


def check(root: str, user: bytes, password: bytes, client_ip: str,
          timeout: float = CHECK_TIMEOUT) -> bytes:
    """Ask qpy-authd: Y, N, L or T (T also when it cannot be reached)."""
    try:
        with unixsock.connect(authdb.socket_dir(root), "socket", socket.SOCK_STREAM,
                              timeout) as s:
            s.sendall(authdb.encode_request(user, password, client_ip))
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(16)
    except OSError:
        return authdb.TEMP
    answer = answer.strip()
    return answer if answer in authdb.ANSWERS else authdb.TEMP


def reply_for(answer: bytes) -> str:
    return {authdb.YES: OK, authdb.NO: BAD, authdb.LOCKED: LOCKED}.get(answer, TEMP)


def _owners(lines: list[str]) -> dict[str, set[str]]:
    """pattern (address or @domain, lowercase) -> users who may send as it."""
    owners: dict[str, set[str]] = {}
    for line in lines:
        user, sep, rest = line.partition(":")
        if not sep or not user.strip():
            continue
        for pattern in rest.split():
            owners.setdefault(pattern.lower(), set()).add(user.strip())
    return owners


def sender_allowed(lines: list[str], user: str, sender: bytes) -> bool:
    """May authenticated `user` use envelope `sender`? (control/authsenders)"""
    if not lines:
        return True
    owners = _owners(lines)
    address = sender.decode("utf-8", "replace").lower()
    domain = "@" + address.rpartition("@")[2] if "@" in address else None
    mine = {p for p, users in owners.items() if user in users}
    if mine:  # a listed user: only their own addresses and domains
        return address in mine or (domain is not None and domain in mine)
    for key in (address, domain):
        if key is not None and key in owners:
            return False
    return True
