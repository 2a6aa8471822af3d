"""rewrite — where a recipient goes: qpy's one address rewrite (Postfix's trivial-rewrite).

    rw = Rewrite.from_control(Control(root))
    rw.route(b"joe-list@example.org") -> Route(channel=LOCAL, address=b"joe-list@example.org")
    owner(root, b"joe-list")          -> users.Recipient("joe", ..., dash=b"-", ext=b"list")

Every program that decides what an address is asks here, and nowhere else:
qpy-smtpd at RCPT (is it local, and does the local part exist), qpy-queue-send
when it takes a message in (local or remote, and the delivery address), and
qpy-lspawn (who owns the local part). So the RCPT check and the delivery can never
classify one address two ways (docs/addresses.md).

ORDER, for a recipient as the envelope carries it
    0. The local part in its canonical form (qpy.common.address: a quoted string
       whose content is a dot-atom is that dot-atom). The parser did this where
       the address came in; it is done again here, which changes nothing then.
    1. No domain: `@envnoathost` is added.
    2. The percent hack, while the domain is in `control/percenthack`: the last
       `%` of the local part becomes the `@` and the old domain goes
       (`joe%host.example@gw.example` -> `joe@host.example`). Nothing is done
       when what follows the `%` is no valid domain or nothing precedes it.
    3. A domain in `control/locals`: local, the address unchanged.
    4. `control/virtualdomains`, the most specific entry first: the whole
       address (`user@domain:prepend`), the domain, each `.suffix` of the
       domain, then the empty key (`:prepend`, a catch-all). A hit with a
       prepend is local, the address becomes `prepend-ADDRESS` (the whole
       address after 1 and 2); a hit with an empty prepend is an exception:
       remote.
    5. Anything else is remote.
    Domains and keys compare in ASCII lower case, as qmail's constmap.

    qpy-smtpd applies RELAYCLIENT's suffix (append_suffix) before this, as
    qmail-smtpd appends it to each recipient; the envelope carries the result.

VIRTUALDOMAINS
    One `key:prepend` a line, split at the LAST colon: a key may hold colons
    (`[IPv6:2001:db8::1]:admin`, a quoted local part), a prepend never does.
    Keys are lowercased, a user@domain key's local part made canonical; the
    first line of a key wins. A line without a colon is ignored.

OWNER (local delivery, qpy.common.users.lookup)
    users/assign (exact entry, then the longest prefix), then the passwd
    database, then the alias user, for whom qpy-local reads /etc/aliases
    (users/aliases) before its .qmail files. qpy-newrcpt's table
    (users.valid_locals) lists the same owners in the same order: a new
    kind of owner goes into both, so that the RCPT check keeps agreeing.
"""

from __future__ import annotations

from typing import NamedTuple

from qpy.common import address, users
from qpy.common.control import Control
from qpy.common.state import LOCAL, REMOTE


class Route(NamedTuple):
    channel: str        # LOCAL or REMOTE
    address: bytes      # the delivery address: what qpy-lspawn or qpy-rspawn gets
    target: bytes       # the recipient after steps 0-2 (before virtualdomains)

    @property
    def local(self) -> bytes:
        """The local part qpy-lspawn looks up (and the RCPT check in users/recipients)."""
        return address.split(self.address)[0]


def parse_virtualdomains(lines: list[str]) -> dict[bytes, bytes]:
    """`key:prepend` lines -> {lowercased key: prepend} (see VIRTUALDOMAINS)."""
    out: dict[bytes, bytes] = {}
    for line in lines:
        key, sep, prepend = line.rpartition(":")
        if not sep:
            continue
        k = key.strip().encode("utf-8")
        if b"@" in k:
            try:
                local, domain = address.split(k)
                k = address.canonical_local(local) + b"@" + domain
            except address.AddressError:
                pass    # kept as written: it can only match an address written so
        out.setdefault(k.lower(), prepend.strip().encode("utf-8"))
    return out


def _domains(values: list[str]) -> set[bytes]:
    return {v.strip().lower().encode("utf-8") for v in values if v.strip()}


class Rewrite:
    """The routing tables of one root (locals, virtualdomains, percenthack, envnoathost)."""

    def __init__(self, locals_: set[bytes], virtual: dict[bytes, bytes],
                 percenthack: set[bytes], envnoathost: bytes):
        self.locals = locals_
        self.virtual = virtual
        self.percenthack = percenthack
        self.envnoathost = envnoathost.lower()

    @classmethod
    def from_control(cls, c: Control) -> Rewrite:
        return cls(_domains(c.lines("locals")), parse_virtualdomains(c.lines("virtualdomains")),
                   _domains(c.lines("percenthack")), c.line("envnoathost").encode("utf-8"))

    def target(self, rcpt: bytes) -> bytes:
        """Steps 0-2: canonical local part, envnoathost, the percent hack."""
        local, domain = address.split(rcpt)
        if not domain:
            domain = self.envnoathost
        addr = address.canonical_local(local) + b"@" + domain
        while domain.lower() in self.percenthack:
            content = address.unquote(local)
            cut = content.rfind(b"%")
            if cut <= 0:
                break
            try:
                host = address.check_domain(content[cut + 1:], utf8=True)
            except address.AddressError:
                break
            local, domain = address.quote(content[:cut]), host
            addr = local + b"@" + domain
        return addr

    def route(self, rcpt: bytes) -> Route:
        """Where rcpt goes (steps 0-5)."""
        addr = self.target(rcpt)
        domain = address.split(addr)[1].lower()
        if domain in self.locals:
            return Route(LOCAL, addr, addr)
        low = addr.lower()
        keys = [low, domain]
        keys += [domain[i:] for i in range(len(domain)) if domain[i:i + 1] == b"."]
        keys.append(b"")
        for key in keys:
            prepend = self.virtual.get(key)
            if prepend is not None:
                if not prepend:
                    return Route(REMOTE, addr, addr)
                return Route(LOCAL, prepend + b"-" + addr, addr)
        return Route(REMOTE, addr, addr)


def append_suffix(rcpt: bytes, suffix: bytes, utf8: bool = True) -> bytes:
    """qmail-smtpd's RELAYCLIENT: `suffix` appended to the recipient, which is then
    taken apart again at its last `@` (`joe@host.example` + `@fixme` is the local
    part `joe@host.example` at `fixme`, written `"joe@host.example"@fixme`).
    Raises AddressError when the result is no address qpy accepts."""
    if not suffix:
        return rcpt
    local, domain = address.split(rcpt)
    whole = address.unquote(local) + (b"@" + domain if domain else b"") + suffix
    at = whole.rfind(b"@")
    new = address.quote(whole) if at < 0 else address.quote(whole[:at]) + whole[at:]
    return address.parse_mailbox(new, utf8=utf8, need_domain=bool(domain))


def owner(root: str, local: bytes) -> users.Recipient:
    """Who receives local part `local` (see OWNER); raises users.UsersError (retry)."""
    return users.lookup(root, address.canonical_local(local))
