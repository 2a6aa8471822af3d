"""filters — a chain of milters for one connection or one message, and their edits.

`Filters` runs the filters of control/milters (qpy-smtpd) or
control/nonsmtpmilters (qpy-pickup) in order, stage by stage, over the
protocol of qpy.common.milter, as Postfix does:

  - connect, HELO, MAIL, RCPT and DATA go to every filter still in the game;
    the first reject, tempfail or custom reply ends the stage and is the
    answer (at RCPT it refuses that recipient only). A reject or tempfail at
    connect or HELO refuses every later MAIL, RCPT and DATA of the session.
  - `accept` takes a filter out of the rest of the connection (at connect and
    HELO) or of the message (later); `discard` at a message stage has the
    message accepted and thrown away.
  - the message (headers, end of headers, body, end of message) goes to one
    filter after another, each seeing the edits of the ones before it.
  - a filter that cannot be reached, times out, closes or breaks the protocol
    is closed and logged and gets its default_action: `accept` goes on
    without it, `tempfail` and `reject` refuse everything after, for the
    session, as Postfix's milter_default_action.

`Message` holds the header fields of a message being filtered (at most
MAX_HEADER_BYTES) with the body in a file, and applies the modifications
that filters ask for at the end of the message.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import BinaryIO

from qpy.common import address
from qpy.common.log import clean, log
from qpy.common.milter import CHUNK, Milter, MilterError, Spec

MAX_HEADER_BYTES = 1024 * 1024     # header section held in memory; more is body
MAX_HEADER_LINE = 64 * 1024
READ = 32 * 1024                   # LF-terminated body bytes read per chunk (CRLF <= CHUNK)
DEFAULTS = {"reject": (550, ["5.7.1 Command rejected"]),
            "tempfail": (451, ["4.7.1 Service unavailable - try again later"])}



def named(who: str) -> str:
    """`who: ` before a log line's text, when who (a drop, a session) is not already the
    line's program name (qpy.common.log)."""
    return who + ": " if who else ""

class Verdict:
    """A filter's refusal or discard, as the SMTP reply to give (or the note to log)."""

    def __init__(self, action: str, code: int = 0, lines: list[str] | None = None,
                 who: str = ""):
        self.action = action          # reject, tempfail, discard
        self.code, self.lines = (code, lines) if code else DEFAULTS.get(action, (250, ["Ok"]))
        self.who = who

    @classmethod
    def from_reply(cls, text: bytes, who: str) -> Verdict:
        code = int(text[:3])
        lines = []
        for raw in text.replace(b"\r\n", b"\n").split(b"\n"):
            if raw[:3].isdigit() and raw[3:4] in (b" ", b"-", b""):
                raw = raw[4:]
            lines.append(clean(raw, 400))
        return cls("reject" if code >= 500 else "tempfail", code, lines or [""], who)

    def text(self) -> str:
        return "%d %s" % (self.code, " / ".join(self.lines))


class Message:
    """A message being filtered: header fields in memory, the body in a file."""

    def __init__(self, spool: BinaryIO, sender: bytes, recipients: list[bytes]):
        """spool holds the message (LF line ends) from offset 0; read here up to the body."""
        spool.seek(0)
        self.headers: list[list[bytes]] = []     # [name, raw lines with their LFs]
        self.separator = b""
        total = 0
        while total < MAX_HEADER_BYTES:
            line = spool.readline(MAX_HEADER_LINE)
            if line in (b"\n", b""):
                self.separator = line
                break
            if line[:1] in (b" ", b"\t") and self.headers:
                self.headers[-1][1] += line
            else:
                name, colon, _ = line.partition(b":")
                if not colon or not name or b" " in name.rstrip() or len(name) > 200:
                    spool.seek(-len(line), 1)   # not a header field: the body starts here
                    break
                self.headers.append([name.rstrip(), line])
            total += len(line)
        self.body = spool
        self.body_start = spool.tell()
        self.sender = sender
        self.recipients = list(recipients)
        self.quarantine: bytes | None = None
        self.changed = False

    @staticmethod
    def value(raw: bytes, leadspace: bool) -> bytes:
        """A field's value as filters get it: folded lines joined by LF, no last LF."""
        value = raw[raw.index(b":") + 1:]
        value = value[:-1] if value.endswith(b"\n") else value
        return value if leadspace else value.lstrip(b" \t")

    def body_chunks(self) -> object:
        self.body.seek(self.body_start)
        while True:
            data = self.body.read(READ)
            if not data:
                return
            yield data.replace(b"\n", b"\r\n")

    def write_to(self, write: Callable[[bytes], None]) -> int:
        """Write the edited message; returns its size."""
        size = 0
        for _, raw in self.headers:
            write(raw)
            size += len(raw)
        write(self.separator)
        size += len(self.separator)
        self.body.seek(self.body_start)
        while True:
            data = self.body.read(256 * 1024)
            if not data:
                return size
            write(data)
            size += len(data)

    # -- modifications ------------------------------------------------------------------
    @staticmethod
    def _field(name: bytes, value: bytes, leadspace: bool) -> list[bytes]:
        if not name or len(name) > 200 or any(c <= 32 or c >= 127 or c == 58 for c in name):
            raise MilterError("bad header name %r" % name[:40])
        lines = value.replace(b"\r\n", b"\n").replace(b"\r", b"").split(b"\n")
        if len(value) > MAX_HEADER_LINE:
            raise MilterError("header value too long")
        for n in range(1, len(lines)):          # a continuation starts with white space
            if lines[n][:1] not in (b" ", b"\t"):
                lines[n] = b"\t" + lines[n]
        first = lines[0] if leadspace else b" " + lines[0].lstrip(b" \t")
        return [name, name + b":" + first + b"\n" + b"".join(ln + b"\n" for ln in lines[1:])]

    def apply(self, mods: list[tuple], leadspace: bool, who: str) -> None:
        body: BinaryIO | None = None
        pending_cr = False
        for mod in mods:
            kind = mod[0]
            if kind == "addheader":
                self.headers.append(self._field(mod[2], mod[3], leadspace))
            elif kind == "insheader":
                self.headers.insert(min(mod[1], len(self.headers)),
                                    self._field(mod[2], mod[3], leadspace))
            elif kind == "chgheader":
                self._change(mod[1], mod[2], mod[3], leadspace)
            elif kind == "replbody":        # CRLF from the filter, LF in the queue
                body, raw = tempfile.TemporaryFile(), mod[1]
                raw.seek(0)
                while data := raw.read(READ):
                    data = (b"\r" if pending_cr else b"") + data
                    pending_cr = data.endswith(b"\r")
                    body.write((data[:-1] if pending_cr else data).replace(b"\r\n", b"\n"))
                raw.close()
            elif kind == "chgfrom":
                self.sender = self._address(mod[1], empty=True)
            elif kind == "addrcpt":
                rcpt = self._address(mod[1])
                if rcpt.lower() not in (r.lower() for r in self.recipients):
                    self.recipients.append(rcpt)
            elif kind == "delrcpt":
                gone = self._address(mod[1]).lower()
                self.recipients = [r for r in self.recipients if r.lower() != gone]
            elif kind == "quarantine":
                self.quarantine = mod[1][:400]
            log("milter %s: %s %s" % (who, kind, clean(b" ".join(
                m if isinstance(m, bytes) else b"%d" % m for m in mod[1:]), 200)
                if kind != "replbody" else "(%d bytes)" % body.tell()))
            self.changed = True
        if body is not None:
            if pending_cr:
                body.write(b"\r")
            self.body, self.body_start = body, 0

    def _change(self, index: int, name: bytes, value: bytes, leadspace: bool) -> None:
        """The index-th (from 1) field called name: replaced, or removed by an empty
        value; added at the end when there is no such field."""
        seen = 0
        for n, (hname, _) in enumerate(self.headers):
            if hname.lower() == name.lower():
                seen += 1
                if seen == max(index, 1):
                    if value:
                        self.headers[n] = self._field(name, value, leadspace)
                    else:
                        del self.headers[n]
                    return
        if value:
            self.headers.append(self._field(name, value, leadspace))

    @staticmethod
    def _address(raw: bytes, empty: bool = False) -> bytes:
        path = raw.strip() if raw.strip().startswith(b"<") else b"<" + raw.strip() + b">"
        try:
            addr = address.parse_path(path, utf8=True)
        except address.AddressError as e:
            raise MilterError("bad address from filter: %s" % e)
        if not addr and not empty:
            raise MilterError("empty recipient from filter")
        return addr


class Entry:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.milter: Milter | None = None
        self.done = False          # failed, accepted for the connection, or gone
        self.skip = False          # accepted for the rest of this message
        self.in_message = False


class Filters:
    """The filters of one connection (qpy-smtpd) or one local message (qpy-pickup)."""

    def __init__(self, specs: list[Spec], who: str):
        self.entries = [Entry(s) for s in specs]
        self.who = who
        self.refusal: Verdict | None = None    # for every later MAIL, RCPT, DATA

    def __bool__(self) -> bool:
        return bool(self.entries)

    def _fail(self, e: Entry, stage: str, err: Exception) -> Verdict | None:
        log("%smilter %s failed at %s: %s; default_action %s" % (
            named(self.who), e.spec.endpoint, stage, clean(str(err), 200), e.spec.default_action))
        if e.milter is not None:
            e.milter.close()
        e.done = True
        if e.spec.default_action == "accept":
            return None
        self.refusal = Verdict(e.spec.default_action, who=e.spec.endpoint)
        return self.refusal

    def _live(self) -> list[Entry]:
        return [e for e in self.entries if not e.done and not e.skip]

    def _stage(self, stage: str, call: Callable[[Milter], tuple[str, bytes]],
               message: bool) -> Verdict | None:
        if self.refusal is not None:    # HELO itself still gets its 250: MAIL is refused
            return None if stage == "helo" else self.refusal
        for e in self._live():
            try:
                if e.milter is None:
                    e.milter = Milter(e.spec)
                    e.milter.open()
                if message:
                    e.in_message = True
                action, text = call(e.milter)
            except MilterError as err:
                verdict = self._fail(e, stage, err)
                if verdict is not None:
                    return verdict
                continue
            verdict = self._answer(e, stage, action, text, message)
            if verdict is not None:
                return verdict
        return None

    def _answer(self, e: Entry, stage: str, action: str, text: bytes,
                message: bool) -> Verdict | None:
        if action == "accept":
            if message:
                e.skip = True
            else:
                e.done = True
                if e.milter is not None:
                    e.milter.quit()
            return None
        if action in ("continue", "skip"):
            return None
        verdict = (Verdict.from_reply(text, e.spec.endpoint) if action == "reply"
                   else Verdict(action, who=e.spec.endpoint))
        if action == "discard" and not message:
            return None          # discard means nothing before there is a message
        log("%smilter %s %s at %s: %s" % (named(self.who), e.spec.endpoint, verdict.action,
                                          stage, verdict.text()))
        if stage in ("connect", "helo"):
            self.refusal = verdict
        return verdict

    # -- the stages ---------------------------------------------------------------------
    def connect(self, hostname: bytes, family: str, port: int, addr: bytes,
                macros: dict[bytes, bytes]) -> Verdict | None:
        return self._stage("connect", lambda m: m.connect(hostname, family, port, addr,
                                                          macros), False)

    def helo(self, name: bytes, macros: dict[bytes, bytes]) -> Verdict | None:
        return self._stage("helo", lambda m: m.stage("helo", name.replace(b"\0", b"") + b"\0",
                                                     macros), False)

    def mail(self, sender: bytes, params: list[bytes],
             macros: dict[bytes, bytes]) -> Verdict | None:
        self.end_message()
        data = b"".join(p.replace(b"\0", b"") + b"\0" for p in [b"<" + sender + b">", *params])
        return self._stage("mail", lambda m: m.stage("mail", data, macros), True)

    def rcpt(self, rcpt: bytes, params: list[bytes],
             macros: dict[bytes, bytes]) -> Verdict | None:
        data = b"".join(p.replace(b"\0", b"") + b"\0" for p in [b"<" + rcpt + b">", *params])
        return self._stage("rcpt", lambda m: m.stage("rcpt", data, macros), True)

    def data(self, macros: dict[bytes, bytes]) -> Verdict | None:
        return self._stage("data", lambda m: m.stage("data", b"", macros), True)

    def message(self, msg: Message, macros: dict[bytes, bytes]) -> Verdict | None:
        """Headers, EOH, body and EOM to each filter in turn; edits applied to msg."""
        if self.refusal is not None:
            return self.refusal
        for e in self._live():
            try:
                if e.milter is None:
                    e.milter = Milter(e.spec)
                    e.milter.open()
                e.in_message = True
                action, text, mods = self._content(e.milter, msg, macros)
                e.in_message = False
                msg.apply(mods, e.milter.leadspace(), e.spec.endpoint)
            except MilterError as err:
                verdict = self._fail(e, "end of message", err)
                if verdict is not None:
                    return verdict
                continue
            verdict = self._answer(e, "end of message", action, text, True)
            if verdict is not None:
                return verdict
        return None

    @staticmethod
    def _content(m: Milter, msg: Message, macros: dict[bytes, bytes]) -> tuple:
        lead = m.leadspace()
        for name, raw in msg.headers:
            if not m.wants("header"):
                break
            action, text = m.stage("header", name + b"\0" + msg.value(raw, lead) + b"\0")
            if action != "continue":
                return action, text, []
        action, text = m.stage("eoh", b"", macros)
        if action != "continue":
            return action, text, []
        if m.wants("body"):
            for chunk in msg.body_chunks():
                for i in range(0, len(chunk), CHUNK):
                    action, text = m.body(chunk[i:i + CHUNK])
                    if action == "skip":
                        break
                    if action != "continue":
                        return action, text, []
                else:
                    continue
                break
        return m.eom(macros)

    def end_message(self) -> None:
        """The transaction ended without an end of message (RSET, refusal, new MAIL)."""
        for e in self.entries:
            e.skip = False
            if e.in_message and not e.done and e.milter is not None:
                try:
                    e.milter.abort()
                except MilterError as err:
                    self._fail(e, "abort", err)
            e.in_message = False

    def quit(self) -> None:
        for e in self.entries:
            if e.milter is not None:
                e.milter.quit()
                e.milter = None
