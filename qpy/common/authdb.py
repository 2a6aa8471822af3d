"""authdb — the password file and the qpy-authd request format.

Both sides of SMTP AUTH meet here, and nowhere else: `qpy-passwd` writes the
password file, `qpy-authd` reads it and answers requests, `qpy-smtpd` asks.

Password file `ROOT/auth/passwd` (owner qpyauth, mode 0600, directory 0700):
one line per user,

    USER:scrypt$N$R$P$SALT$HASH

SALT and HASH in standard base64; N, R, P the scrypt cost parameters it was
made with (so old lines stay valid when the defaults change).

Request (one per connection to `ROOT/queue/run/auth/socket`, a Unix stream
socket):  `QPYAUTH1\\0USER\\0PASSWORD\\0CLIENTIP\\0`, at most MAX_REQUEST bytes.
Answer: one line, `Y` (accepted), `N` (refused), `L` (this client address is
locked out for a while), `T` (temporary failure: try later).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from qpy.common.queue import Paths

MAGIC = b"QPYAUTH1"
MAX_USER = 256              # bytes in a user name
MAX_PASSWORD = 1024         # bytes in a password
MAX_REQUEST = len(MAGIC) + MAX_USER + MAX_PASSWORD + 64 + 4
MAX_PASSWD_FILE = 16 * 1024 * 1024

SCRYPT_N = 2 ** 14          # ~16 MB and ~50 ms per check: slow for guessing, fine for logins
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_N = 2 ** 20      # refuse absurd parameters from a damaged file
SCRYPT_MAXMEM = 256 * 1024 * 1024

YES, NO, LOCKED, TEMP = b"Y", b"N", b"L", b"T"
ANSWERS = (YES, NO, LOCKED, TEMP)


def passwd_dir(root: str) -> str:
    return os.path.join(root, "auth")


def passwd_path(root: str) -> str:
    return os.path.join(passwd_dir(root), "passwd")


def socket_dir(root: str) -> str:
    return os.path.join(Paths(root).run, "auth")


def socket_path(root: str) -> str:
    return os.path.join(socket_dir(root), "socket")


def valid_user(user: bytes) -> bool:
    """A user name: 1..MAX_USER printable ASCII bytes, no ':' and no space."""
    return 0 < len(user) <= MAX_USER and all(0x21 <= c <= 0x7E and c != 0x3A for c in user)


def valid_password(password: bytes) -> bool:
    return 0 < len(password) <= MAX_PASSWORD and b"\0" not in password


def make_hash(password: bytes) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=HASH_BYTES)
    return "scrypt$%d$%d$%d$%s$%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P,
                                      base64.b64encode(salt).decode(),
                                      base64.b64encode(digest).decode())


def check_hash(password: bytes, stored: str) -> bool:
    """True when password matches a stored `scrypt$...` hash; False for any damage."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        return False
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if not (1 < n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16):
        return False
    try:
        salt = base64.b64decode(parts[4], validate=True)
        want = base64.b64decode(parts[5], validate=True)
        got = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM,
                             dklen=len(want))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


def parse_passwd(data: bytes) -> dict[bytes, str]:
    """USER -> stored hash; malformed lines are skipped (qpy-passwd never writes one)."""
    table: dict[bytes, str] = {}
    for line in data.split(b"\n"):
        user, sep, stored = line.partition(b":")
        if sep and valid_user(user) and stored.startswith(b"scrypt$") and stored.isascii():
            table[user] = stored.decode("ascii")
    return table


def format_passwd(table: dict[bytes, str]) -> bytes:
    return b"".join(b"%s:%s\n" % (u, table[u].encode("ascii")) for u in sorted(table))


def encode_request(user: bytes, password: bytes, client: str) -> bytes:
    return b"\0".join([MAGIC, user, password, client.encode("ascii", "replace")[:64], b""])


def decode_request(data: bytes) -> tuple[bytes, bytes, str] | None:
    """(user, password, client address), or None for anything malformed."""
    if len(data) > MAX_REQUEST or not data.endswith(b"\0"):
        return None
    fields = data[:-1].split(b"\0")
    if len(fields) != 4 or fields[0] != MAGIC:
        return None
    _, user, password, client = fields
    if not valid_user(user) or not valid_password(password) or not client.isascii():
        return None
    return user, password, client.decode("ascii")
