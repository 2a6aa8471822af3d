"""resolver — the DNS resolver every qpy program uses (dnspython), and IP literals.

ARCHITECTURE §8: when control/resolvers exists, every DNS query of qpy goes to
those servers (`IP`, `IP:port`, `[IPv6]:port` a line) and nowhere else; an
existing file without a usable line gives a resolver with no servers, whose
every lookup fails temporarily.
"""

from __future__ import annotations

import ipaddress

import dns.nameserver
import dns.resolver

from qpy.common.control import Control


def literal(text: str) -> str | None:
    """The address of `[1.2.3.4]`, `[IPv6:...]` or a bare IP, else None."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def make_resolver(lines: list[str] | None, timeout: float, lifetime: float
                  ) -> dns.resolver.Resolver:
    """A resolver that asks the servers of control/resolvers, or (None) the system's."""
    if lines is None:
        res = dns.resolver.Resolver()
    else:
        res = dns.resolver.Resolver(configure=False)
        servers = []
        for line in lines:
            host, port = line, 53
            if line.startswith("["):
                host, _, rest = line[1:].partition("]")
                if rest.startswith(":") and rest[1:].isdigit():
                    port = int(rest[1:])
            elif line.count(":") == 1:
                host, _, p = line.partition(":")
                port = int(p) if p.isdigit() else 53
            if literal(host) is not None:
                servers.append(dns.nameserver.Do53Nameserver(literal(host), port))
        res.nameservers = servers
    res.timeout = timeout
    res.lifetime = lifetime
    return res


def from_control(ctl: Control, timeout: float, lifetime: float) -> dns.resolver.Resolver:
    lines, source = ctl.explain("resolvers")
    return make_resolver(None if source == "default" else lines, timeout,  # type: ignore
                         lifetime)
