"""control — read `ROOT/control/*` as qmail does, with qmail's defaults.

One setting per file. A single-value file's first line counts (trailing blanks
removed); a list file is one entry a line, blank lines and `#` comments skipped.
Values are read once and cached: the programs re-read on SIGHUP (`reload()`),
never once per message.

A file that exists but cannot be used (unreadable, not UTF-8, not a number...) is
logged, once per read, i.e. at start and at every reload. Most settings then take
their default. The limits that protect (PROTECTIVE: databytes, maxsmtpd, maxrcpt, maxperip)
do not: a malformed one raises ControlError from get()/integer(), and the program
refuses with a temporary error until it is fixed, as qmail does ("unable to read
controls"), rather than run with no limit.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix

from qpy.common.queue import join

MAX_CONTROL_BYTES = 4 * 1024 * 1024   # a control file larger than this is malformed

# name: (kind, default). A default of None means "same as me"; "" means empty.
DEFAULTS: dict[str, tuple[str, object]] = {
    "me": ("line", None),
    "defaultdomain": ("line", None),
    "defaulthost": ("line", None),
    "plusdomain": ("line", None),
    "idhost": ("line", None),
    "envnoathost": ("line", None),
    "helohost": ("line", None),
    "smtpgreeting": ("line", None),
    "bouncefrom": ("line", "MAILER-DAEMON"),
    "bouncehost": ("line", None),
    "doublebounceto": ("line", "postmaster"),
    "doublebouncehost": ("line", None),
    "defaultdelivery": ("line", "./Maildir/"),
    "locals": ("list", None),
    "rcpthosts": ("list", None),
    "morercpthosts": ("list", []),
    "virtualdomains": ("list", []),
    "percenthack": ("list", []),
    "smtproutes": ("list", []),
    "badmailfrom": ("list", []),
    "smtplisten": ("list", ["127.0.0.1:25"]),
    "submissionlisten": ("list", []),
    "smtpslisten": ("list", []),
    "resolvers": ("list", []),
    "ipme": ("list", []),
    "tlsverify": ("list", []),
    "authsenders": ("list", []),
    "milters": ("list", []),
    "nonsmtpmilters": ("list", []),
    "rbls": ("list", []),
    "ratelimits": ("list", []),
    "greetdelay": ("int", 0),
    "concurrencylocal": ("int", 10),
    "concurrencyremote": ("int", 20),
    "concurrencyperdomain": ("int", 10),
    "queuelifetime": ("int", 604800),
    "delaywarning": ("line", "4"),
    "databytes": ("int", 52428800),
    "timeoutsmtpd": ("int", 1200),
    "timeoutremote": ("int", 1200),
    "timeoutremotetotal": ("int", 3600),
    "timeoutconnect": ("int", 60),
    "timeoutlocal": ("int", 3600),
    "maxsmtpd": ("int", 40),
    "maxperip": ("int", 10),
    "smtpdsessions": ("int", 100),
    "timeoutsession": ("int", 3600),
    "maxrcpt": ("int", 100),
    "acceptunknown": ("flag", False),
    "tlsrequired": ("flag", False),
}


PROTECTIVE = frozenset({"databytes", "maxsmtpd", "maxrcpt", "maxperip"})


class ControlError(ValueError):
    """A control file exists but cannot be used; str(e) says why."""


DATABYTES_DEFAULT = 52428800    # 50 MiB when control/databytes is absent
DATABYTES_CEILING = 1 << 30     # what databytes 0 (qmail: "no limit") means, and the most
                                # any setting gives: the queue's own hard cap


def message_limit(control: "Control", lower: str | None = None) -> int:
    """The one size limit (bytes of message) every program that acknowledges mail
    applies before it says yes: qpy-smtpd (SIZE, DATA), qpy-queue-inject (exit 31),
    qpy-sendmail and qpy-inject; qpy-pickup checks the same value again, as a
    defence only, so nothing acknowledged is ever quarantined for its size.

    control/databytes absent: DATABYTES_DEFAULT. A malformed databytes raises
    ControlError: the limit protects the host, so the caller refuses with a
    temporary error and logs it, never treats it as unlimited."""
    return effective_limit(control.integer("databytes"), lower)


def effective_limit(databytes: int, lower: str | None = None) -> int:
    """databytes 0 is no limit of the admin's (qmail), which is DATABYTES_CEILING
    (1 GiB), as is any larger value: the queue never holds a bigger message.
    `lower` (qpy-smtpd's DATABYTES from a client rule) can only lower the limit."""
    limit = min(databytes, DATABYTES_CEILING) if databytes else DATABYTES_CEILING
    if lower is not None and lower.isdigit() and 0 < int(lower) < limit:
        limit = int(lower)
    return limit


def _read(path: str) -> bytes | None:
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError("cannot open: %s" % e.strerror)
    try:
        data = _read_fd(fd)
    except OSError as e:
        raise ControlError("cannot read: %s" % e.strerror)
    finally:
        posix.close(fd)
    if len(data) > MAX_CONTROL_BYTES:
        raise ControlError("larger than %d bytes" % MAX_CONTROL_BYTES)
    if b"\0" in data:
        raise ControlError("contains a NUL byte")
    return data


def _read_fd(fd: int) -> bytes:
    """At most MAX_CONTROL_BYTES + 1 bytes. A plain file is read with one read of its
    size and a byte more, which comes back short at its end: no 4 MiB buffer and no
    read for the end (the front ends read control/me on every run; docs/queue.md)."""
    st = posix.fstat(fd)
    plain = st.st_mode & 0o170000 == 0o100000
    chunks, total, want = [], 0, st.st_size + 1
    while total <= MAX_CONTROL_BYTES:
        ask = min(want, MAX_CONTROL_BYTES + 1 - total)
        chunk = posix.read(fd, ask)
        chunks.append(chunk)
        total += len(chunk)
        if not chunk or plain and len(chunk) < ask:
            break           # the end (a plain file's read comes back short only there)
        want = 65536        # it grew since the fstat, or it is no plain file
    return b"".join(chunks)


def parse(name: str, data: bytes) -> object:
    """Turn a control file's bytes into its value, or raise ControlError."""
    kind = DEFAULTS.get(name, ("list", []))[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("not UTF-8")
    lines = [ln.strip() for ln in text.splitlines()]
    if kind == "list":
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        if name in ("milters", "nonsmtpmilters") and entries:
            from qpy.common.milter import parse_specs  # only for files that exist
            try:
                parse_specs(entries)
            except ValueError as e:
                raise ControlError(str(e))
        return entries
    if kind == "flag":
        return True
    first = lines[0] if lines else ""
    if kind == "int":
        if not first.isdigit():
            raise ControlError("not a non-negative integer: %r" % first[:40])
        return int(first)
    return first


def hostname() -> str:
    import socket  # rarely needed: `me` is normally in control/me
    name = socket.gethostname()
    if "." not in name:
        fq = socket.getfqdn(name)
        if "." in fq:
            name = fq
    return name.lower()


class Control:
    """The control files of one root, read lazily and cached until reload()."""

    def __init__(self, root: str):
        self.root = root
        self.dir = join(root, "control")
        self._cache: dict[str, object] = {}

    def reload(self) -> None:
        self._cache.clear()

    def derived(self, key: str, make) -> object:
        """A value worked out from control files (a parsed table, a resolver): made by
        make() at the first call, kept, like the files' values, until reload()."""
        key = "\0" + key               # no control file's name starts with NUL
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def explain(self, name: str) -> tuple[object, str]:
        """(value, source): source is 'file', 'default' or 'malformed: reason'."""
        try:
            data = _read(join(self.dir, name))
        except ControlError as e:
            return self._default(name), "malformed: %s" % e
        if data is None:
            return self._default(name), "default"
        try:
            return parse(name, data), "file"
        except ControlError as e:
            return self._default(name), "malformed: %s" % e

    def _default(self, name: str) -> object:
        kind, default = DEFAULTS.get(name, ("list", []))
        if default is None:
            me = self.get("me") if name != "me" else hostname()
            return [me] if kind == "list" else me
        return list(default) if isinstance(default, list) else default

    def get(self, name: str) -> object:
        """The value; ControlError for a malformed PROTECTIVE limit."""
        if name not in self._cache:
            value, source = self.explain(name)
            if source.startswith("malformed"):
                from qpy.common.log import log  # only then: the front ends never log
                what = "control/%s is %s" % (name, source)    # log() names the program
                if name in PROTECTIVE:
                    log("warning: %s: refusing with a temporary error until it is fixed"
                        % what)
                    value = ControlError("control/%s is %s" % (name, source))
                else:
                    log("warning: %s: using the default %r" % (what, value))
            self._cache[name] = value
        value = self._cache[name]
        if isinstance(value, ControlError):
            raise value
        return value

    def line(self, name: str) -> str:
        v = self.get(name)
        assert isinstance(v, str), name
        return v

    def integer(self, name: str) -> int:
        v = self.get(name)
        assert isinstance(v, int), name
        return v

    def integer_or(self, name: str, fallback: int) -> int:
        """integer(), or fallback where a malformed PROTECTIVE limit would raise (for a
        program that acknowledges nothing: its limit is only a defence)."""
        try:
            return self.integer(name)
        except ControlError:
            return fallback

    def lines(self, name: str) -> list[str]:
        v = self.get(name)
        assert isinstance(v, list), name
        return v

    def flag(self, name: str) -> bool:
        return bool(self.get(name))
