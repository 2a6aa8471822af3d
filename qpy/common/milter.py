"""milter — the client side of the Sendmail/Postfix milter protocol (version 6).

One `Milter` is one connection to one filter (rspamd, OpenDKIM, OpenDMARC,
clamav-milter...). qpy-smtpd uses it for mail from the network and qpy-pickup
for mail injected locally; the policy (which stage, what a reply means for the
SMTP client, a filter's default action) lives in qpy.common.filters.

THE WIRE
    Every packet, both ways: a 4-byte big-endian length (counting what
    follows), one command or reply byte, then its data; strings end in NUL.
    The client opens with SMFIC_OPTNEG (version, the actions it allows, the
    protocol steps it can leave out); the filter answers with the version it
    speaks (2 to 6), the actions it wants (a subset) and the steps it does
    not want. Then, per connection: CONNECT, HELO; per message: MAIL, RCPT...,
    DATA, HEADER..., EOH, BODY..., BODYEOB; ABORT ends a message early, QUIT
    the connection. Each may be preceded by SMFIC_MACRO (name/value pairs for
    that stage). A step the filter said it does not want is not sent; a step
    it said it will not answer (SMFIP_NR_*) gets no read. After BODYEOB the
    filter may send modification requests (SMFIR_ADDHEADER ... SMFIR_QUARANTINE,
    and SMFIR_PROGRESS to keep the timer alive) before its final answer.

LIMITS
    A reply's length is checked before its bytes are read (MAX_PACKET), the
    modifications of one end of message are bounded (MAX_MODS, MAX_MOD_BYTES; a
    new body is written to a temporary file), SMFIR_PROGRESS extends a wait to
    PROGRESS_MAX timeouts at most; a
    filter that asks for an action or step it was not offered, answers with an
    unknown byte, a short or overlong packet, or is silent past its timeout,
    raises MilterError: the caller gives it its default action. Body chunks
    sent are at most CHUNK bytes (no SMFIP_MDS_* is offered).
"""

from __future__ import annotations

import socket
import struct
import tempfile
import time
from collections.abc import Iterable
from typing import BinaryIO

VERSION = 6
CHUNK = 65535                      # MILTER_CHUNK_SIZE: the largest body chunk sent
MAX_PACKET = 1024 * 1024 + 64      # the largest reply read (a body chunk and its header)
MAX_MODS = 100_000                 # modification requests in one end-of-message
MAX_MOD_BYTES = 8 * 1024 * 1024    # and their bytes, a replaced body not counted

# actions a filter may ask for (SMFIF_*)
ADDHDRS, CHGBODY, ADDRCPT, DELRCPT, CHGHDRS, QUARANTINE, CHGFROM, ADDRCPT_PAR, SETSYMLIST = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)
ALL_ACTIONS = 0x1FF

# protocol steps (SMFIP_*): NO_x = do not send x; NR_x = x gets no reply
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
HDR_LEADSPC = 0x100000
# what qpy honours: every NO_ and NR_ step, SKIP and leading spaces; not RCPT_REJ
# (refused recipients are never shown to filters) nor the larger MDS_* chunks
OFFERED_STEPS = 0x1FFFFF & ~RCPT_REJ

# stage -> (command byte, the step that leaves it out, the step that leaves its reply out)
STAGES = {
    "connect": (b"C", NOCONNECT, NR_CONN),
    "helo": (b"H", NOHELO, NR_HELO),
    "mail": (b"M", NOMAIL, NR_MAIL),
    "rcpt": (b"R", NORCPT, NR_RCPT),
    "data": (b"T", NODATA, NR_DATA),
    "header": (b"L", NOHDRS, NR_HDR),
    "eoh": (b"N", NOEOH, NR_EOH),
    "body": (b"B", NOBODY, NR_BODY),
    "eom": (b"E", 0, 0),
}
# SMFIR_SETSYMLIST's stage numbers (SMFIM_*) -> our stage names
SYMLIST_STAGES = {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom", 6: "eoh"}

FINAL = {b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail",
         b"d": "discard", b"s": "skip", b"y": "reply", b"4": "shutdown", b"f": "shutdown"}
SHUTDOWN = b"421 4.7.0 Server closing connection"   # SMFIR_SHUTDOWN, SMFIR_CONN_FAIL (Postfix)
# modification byte -> (name, action it needs)
MODS = {b"h": ("addheader", ADDHDRS), b"i": ("insheader", ADDHDRS),
        b"m": ("chgheader", CHGHDRS), b"b": ("replbody", CHGBODY),
        b"e": ("chgfrom", CHGFROM), b"+": ("addrcpt", ADDRCPT),
        b"2": ("addrcpt", ADDRCPT_PAR), b"-": ("delrcpt", DELRCPT),
        b"q": ("quarantine", QUARANTINE)}
PROGRESS = b"p"
PROGRESS_MAX = 4                   # SMFIR_PROGRESS keeps a filter alive this many timeouts


class MilterError(Exception):
    """The filter failed: unreachable, silent past its timeout, gone, or off-protocol."""


class Spec:
    """One line of control/milters: `ENDPOINT [key=value]...` (Postfix's defaults)."""

    ACTIONS = ("accept", "tempfail", "reject")

    def __init__(self, line: str):
        words = line.split()
        if not words:
            raise ValueError("empty line")
        self.endpoint = words[0]
        self.default_action = "tempfail"
        self.connect_timeout, self.command_timeout, self.content_timeout = 30.0, 30.0, 300.0
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq:
                raise ValueError("not key=value: %s" % word[:40])
            if key == "default_action":
                if value not in self.ACTIONS:
                    raise ValueError("default_action is accept, tempfail or reject")
                self.default_action = value
            elif key in ("connect_timeout", "command_timeout", "content_timeout"):
                try:
                    seconds = float(value.rstrip("s"))
                except ValueError:
                    raise ValueError("%s is a number of seconds" % key)
                if not 0 < seconds <= 86400:
                    raise ValueError("%s out of range" % key)
                setattr(self, key, seconds)
            else:
                raise ValueError("unknown setting %s" % key[:40])
        self.family, self.address = parse_endpoint(self.endpoint)


def parse_endpoint(endpoint: str) -> tuple[int, str | tuple[str, int]]:
    """unix:/path, inet:host:port, inet6:[addr]:port -> (family, sockaddr)."""
    kind, _, rest = endpoint.partition(":")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError("unix: needs an absolute path")
        return socket.AF_UNIX, rest
    if kind == "inet6" and rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
        family = socket.AF_INET6
    elif kind in ("inet", "inet6"):
        host, _, port = rest.rpartition(":")
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    else:
        raise ValueError("endpoint is unix:/path, inet:host:port or inet6:[addr]:port")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError("bad host or port in %s" % endpoint[:80])
    return family, (host, int(port))


def parse_specs(lines: Iterable[str]) -> list[Spec]:
    return [Spec(ln) for ln in lines]


def _cstr(data: bytes) -> bytes:
    return data.replace(b"\0", b"") + b"\0"


def _strings(data: bytes, count: int) -> list[bytes]:
    """Split `count` NUL-terminated strings (the last NUL may be missing)."""
    parts = data.split(b"\0")
    if len(parts) < count or any(parts[count:]) or len(parts) > count + 1:
        raise MilterError("malformed string data")
    return parts[:count]


class Milter:
    """One connection to one filter. Methods raise MilterError on any failure."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.sock: socket.socket | None = None
        self.actions = 0
        self.steps = 0
        self.symlists: dict[str, list[bytes]] = {}
        self.version = VERSION

    # -- packets ---------------------------------------------------------------------
    def _send(self, cmd: bytes, data: bytes = b"", before: bytes = b"") -> None:
        """One packet (after `before`, its macros) in one write: a macro packet and
        its command in two would wait for a delayed ACK (40 ms) at every stage."""
        assert self.sock is not None
        try:
            self.sock.settimeout(self.spec.command_timeout)
            self.sock.sendall(before + struct.pack(">I", len(data) + 1) + cmd + data)
        except OSError as e:
            raise MilterError("cannot send: %s" % (e.strerror or "timeout"))

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MilterError("timeout")
            try:
                self.sock.settimeout(left)
                data = self.sock.recv(min(n - len(buf), 65536))
            except TimeoutError:
                raise MilterError("timeout")
            except OSError as e:
                raise MilterError("cannot read: %s" % e.strerror)
            if not data:
                raise MilterError("filter closed the connection")
            buf += data
        return bytes(buf)

    def _recv(self, timeout: float) -> tuple[bytes, bytes]:
        """(reply byte, data); SMFIR_PROGRESS restarts the timer (within PROGRESS_MAX
        times the timeout in all) and is not returned."""
        end = time.monotonic() + timeout * PROGRESS_MAX
        while True:
            deadline = min(time.monotonic() + timeout, end)
            (length,) = struct.unpack(">I", self._recv_exact(4, deadline))
            if not 1 <= length <= MAX_PACKET:
                raise MilterError("bad packet length %d" % length)
            packet = self._recv_exact(length, deadline)
            if packet[:1] != PROGRESS:
                return packet[:1], packet[1:]

    # -- negotiation -----------------------------------------------------------------
    def open(self) -> None:
        sock = socket.socket(self.spec.family, socket.SOCK_STREAM)
        sock.settimeout(self.spec.connect_timeout)
        try:
            sock.connect(self.spec.address)
        except OSError as e:
            sock.close()
            raise MilterError("cannot connect: %s" % (e.strerror or "timeout"))
        if self.spec.family != socket.AF_UNIX:   # replies must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._send(b"O", struct.pack(">III", VERSION, ALL_ACTIONS, OFFERED_STEPS))
        cmd, data = self._recv(self.spec.connect_timeout)
        if cmd != b"O" or len(data) < 12:
            raise MilterError("bad answer to option negotiation")
        version, actions, steps = struct.unpack(">III", data[:12])
        if not 2 <= version <= VERSION:
            raise MilterError("unsupported protocol version %d" % version)
        if actions & ~ALL_ACTIONS or steps & ~OFFERED_STEPS:
            raise MilterError("filter asks for actions or steps not offered "
                              "(actions 0x%x, steps 0x%x)" % (actions, steps))
        self.version, self.actions, self.steps = version, actions, steps
        self._symlists(data[12:])

    def _symlists(self, data: bytes) -> None:
        """The macro lists a filter may name per stage after the three words (v6)."""
        while len(data) >= 4 and self.actions & SETSYMLIST:
            (stage,) = struct.unpack(">I", data[:4])
            names, nul, data = data[4:].partition(b"\0")
            if not nul:
                raise MilterError("unterminated macro list")
            if stage in SYMLIST_STAGES:
                self.symlists[SYMLIST_STAGES[stage]] = [
                    n.strip(b"{}") for n in names.split() if n]

    def wants(self, stage: str) -> bool:
        return not (self.steps & STAGES[stage][1])

    def leadspace(self) -> bool:
        return bool(self.steps & HDR_LEADSPC)

    # -- stages ----------------------------------------------------------------------
    def _macros(self, stage: str, macros: dict[bytes, bytes] | None) -> bytes:
        """The SMFIC_MACRO packet for a stage (b'' when there is nothing to send)."""
        wanted = self.symlists.get(stage)
        pairs = [(k, v) for k, v in (macros or {}).items() if wanted is None or k in wanted]
        if not pairs:
            return b""
        data = STAGES[stage][0] + b"".join(
            _cstr(k if len(k) == 1 else b"{" + k + b"}") + _cstr(v) for k, v in pairs)
        return struct.pack(">I", len(data) + 1) + b"D" + data

    def stage(self, stage: str, data: bytes, macros: dict[bytes, bytes] | None = None,
              timeout: float | None = None) -> tuple[str, bytes]:
        """Send one step; return (action, reply text for 'reply'); ('continue', b'')
        when the step is not wanted or gets no reply."""
        cmd, skip_step, no_reply = STAGES[stage]
        if self.steps & skip_step:
            return "continue", b""
        self._send(cmd, data, self._macros(stage, macros))
        if self.steps & no_reply:
            return "continue", b""
        return self._final(self._recv(timeout or self.spec.command_timeout), stage)

    def _final(self, packet: tuple[bytes, bytes], stage: str) -> tuple[str, bytes]:
        cmd, data = packet
        action = FINAL.get(cmd)
        if action is None or (action == "skip" and stage != "body"):
            raise MilterError("unexpected reply %r at %s" % (cmd, stage))
        if action == "shutdown":
            return "reply", SHUTDOWN
        if action == "reply":
            text = data.rstrip(b"\0")
            if len(text) < 3 or text[:1] not in (b"4", b"5") or not text[:3].isdigit():
                raise MilterError("bad reply code %r" % text[:20])
            return action, text
        return action, b""

    def connect(self, hostname: bytes, family: str, port: int, addr: bytes,
                macros: dict[bytes, bytes]) -> tuple[str, bytes]:
        if family in ("4", "6"):
            data = _cstr(hostname) + family.encode() + struct.pack(">H", port) + _cstr(addr)
        else:
            data = _cstr(hostname) + b"U"
        return self.stage("connect", data, macros)

    def body(self, chunk: bytes) -> tuple[str, bytes]:
        return self.stage("body", chunk, None, self.spec.content_timeout)

    def eom(self, macros: dict[bytes, bytes]) -> tuple[str, bytes, list[tuple]]:
        """End of message: (action, reply text, modifications in the order sent)."""
        self._send(b"E", b"", self._macros("eom", macros))
        mods: list[tuple] = []
        held = 0                       # bytes of modifications other than the body
        body: BinaryIO | None = None   # a replaced body goes to a file, not to memory
        while True:
            cmd, data = self._recv(self.spec.content_timeout)
            if cmd not in MODS:
                action, text = self._final((cmd, data), "eom")
                return action, text, mods
            name, needs = MODS[cmd]
            if not self.actions & needs:
                raise MilterError("%s was not negotiated" % name)
            if cmd == b"b":
                if body is None:
                    body = tempfile.TemporaryFile()
                    mods.append(("replbody", body))
                body.write(data)
                continue
            held += len(data)
            if len(mods) >= MAX_MODS or held > MAX_MOD_BYTES:
                raise MilterError("too many modifications")
            mods.append(self._modification(cmd, name, data))

    @staticmethod
    def _modification(cmd: bytes, name: str, data: bytes) -> tuple:
        if cmd in (b"i", b"m"):
            if len(data) < 4:
                raise MilterError("short %s" % name)
            (index,) = struct.unpack(">I", data[:4])
            hname, value = _strings(data[4:], 2)
            return (name, index, hname, value)
        if cmd == b"h":
            return (name, 0, *_strings(data, 2))
        if cmd in (b"e", b"2"):   # address and optional ESMTP arguments
            parts = data.split(b"\0")
            if not parts[0] or len(parts) > 3 or any(parts[2:]):
                raise MilterError("malformed %s" % name)
            return (name, parts[0], parts[1] if len(parts) > 1 else b"")
        return (name, _strings(data, 1)[0])

    def abort(self) -> None:
        self._send(b"A")

    def quit(self) -> None:
        if self.sock is not None:
            try:
                self._send(b"Q")
            except MilterError:
                pass
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
