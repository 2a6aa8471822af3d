"""rules — per-client rules for a listener, in tcprules' text syntax.

    # comment
    127.:allow,RELAYCLIENT=""
    ::1:allow,RELAYCLIENT=""
    192.0.2.:deny
    10.0.0.0/8:allow,RELAYCLIENT=""
    :allow

One rule a line: an address, `:`, `allow` or `deny`, then `,NAME=VALUE` pairs
for the session's environment (VALUE in "..." or '...' quotes, or bare up to
the next comma). Matching (design §8) as tcprules: an address ending in `.`
is an IPv4 prefix at that boundary (`127.` matches 127.0.0.1, not 1270.x);
ending in `:` it is an IPv6 prefix of whole groups (`2001:db8:`); a full
address matches only itself; `a.b.c.D-E` is a range in the last byte; qpy
adds CIDR (`10.0.0.0/8`, `2001:db8::/32`); the empty address matches every
client. The first match wins; no match means allow with nothing set.
Host-name rules (`=host`) need DNS and are not supported: such a line is
reported and skipped, never guessed at.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MAX_RULES = 100_000


class RuleError(ValueError):
    pass


@dataclass
class Rule:
    spec: str
    allow: bool
    env: dict[str, str] = field(default_factory=dict)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    low: int = 0
    high: int = 0
    ipv6_groups: tuple[int, ...] | None = None


def _parse_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    i = 0
    while i < len(text):
        if text[i] != ",":
            raise RuleError("expected , before %r" % text[i:i + 20])
        i += 1
        eq = text.find("=", i)
        if eq == -1:
            raise RuleError("instruction without =")
        name = text[i:eq]
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise RuleError("bad variable name %r" % name[:40])
        i = eq + 1
        if i < len(text) and text[i] in "\"'":
            end = text.find(text[i], i + 1)
            if end == -1:
                raise RuleError("unterminated quote")
            value, i = text[i + 1:end], end + 1
        else:
            end = text.find(",", i)
            end = len(text) if end == -1 else end
            value, i = text[i:end], end
        env[name] = value
    return env


def _address(rule: Rule) -> None:
    spec = rule.spec
    if spec == "":
        return
    if spec.startswith("="):
        raise RuleError("host-name rules need DNS and are not supported")
    if "/" in spec:
        try:
            rule.network = ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise RuleError("bad network %r" % spec)
        return
    if ":" not in spec:      # IPv4
        parts = spec.split(".")
        if spec.endswith("."):
            parts = parts[:-1]
            if not 1 <= len(parts) <= 3 or not all(p.isdigit() and int(p) < 256 for p in parts):
                raise RuleError("bad IPv4 prefix %r" % spec)
            rule.network = ipaddress.ip_network("%s/%d" % (
                ".".join(parts + ["0"] * (4 - len(parts))), 8 * len(parts)))
            return
        last = parts[-1]
        if len(parts) == 4 and "-" in last:
            lo, _, hi = last.partition("-")
            try:
                base = ipaddress.IPv4Address(".".join(parts[:3] + [lo]))
                if not hi.isdigit() or not int(lo) <= int(hi) < 256:
                    raise ValueError
            except ValueError:
                raise RuleError("bad IPv4 range %r" % spec)
            rule.low, rule.high = int(base), int(base) + int(hi) - int(lo)
            return
        try:
            rule.network = ipaddress.ip_network(spec + "/32")
        except ValueError:
            raise RuleError("bad IPv4 address %r" % spec)
        return
    if spec.endswith(":") and "::" not in spec:     # IPv6 prefix of whole groups
        groups = spec[:-1].split(":")
        try:
            values = tuple(int(g, 16) for g in groups)
        except ValueError:
            raise RuleError("bad IPv6 prefix %r" % spec)
        if len(values) > 7 or any(len(g) > 4 or not g for g in groups):
            raise RuleError("bad IPv6 prefix %r" % spec)
        rule.ipv6_groups = values
        return
    try:
        rule.network = ipaddress.ip_network(spec + "/128")
    except ValueError:
        raise RuleError("bad IPv6 address %r" % spec)


def parse_line(line: str) -> Rule:
    """One rule; raises RuleError with the reason."""
    line = line.strip()
    for i, c in enumerate(line):
        if c != ":":
            continue
        rest = line[i + 1:]
        for word, allow in (("allow", True), ("deny", False)):
            if rest.startswith(word) and (len(rest) == len(word) or rest[len(word)] == ","):
                rule = Rule(line[:i], allow, _parse_env(rest[len(word):]))
                _address(rule)
                return rule
    raise RuleError("no :allow or :deny")


def parse(text: str) -> tuple[list[Rule], list[str]]:
    """All rules of a file, and a message for each line that was skipped."""
    rules: list[Rule] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rules.append(parse_line(line))
        except RuleError as e:
            problems.append("line %d: %s" % (n, e))
        if len(rules) >= MAX_RULES:
            problems.append("more than %d rules; the rest ignored" % MAX_RULES)
            break
    return rules, problems


def matches(rule: Rule, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if rule.spec == "":
        return True
    if rule.network is not None:
        return ip.version == rule.network.version and ip in rule.network
    if rule.ipv6_groups is not None:
        if ip.version != 6:
            return False
        n = len(rule.ipv6_groups)
        return tuple(int(ip) >> (16 * (7 - k)) & 0xFFFF for k in range(n)) == rule.ipv6_groups
    return ip.version == 4 and rule.low <= int(ip) <= rule.high


def match(rules: list[Rule], ip: str) -> Rule | None:
    """The first rule for the client address `ip` (text), or None."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for rule in rules:
        if matches(rule, addr):
            return rule
    return None


def client_key(ip: str) -> str:
    """Whose sessions maxperip counts together: an IPv4 address; an IPv6 /64 (one
    site's share: its owner has all of it); an IPv4-mapped IPv6 address as IPv4."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
