"""bounce — the delivery status notifications qpy-queue-send sends: the bounce for
failed recipients, the warning for delayed ones, and the success notice for
recipients whose NOTIFY asked for one (RFC 3461).

An RFC 3464 `multipart/report; report-type=delivery-status`, built with the stdlib
`email` package:

1. text/plain in qmail's bounce layout (QSBMF): it starts `Hi. This is the`, one
   paragraph per recipient starting `<address>:` with the reason, and a break
   paragraph starting `---`. People and qmail-era scripts read this part.
2. message/delivery-status: `Original-Envelope-Id` (the sender's ENVID, when
   given), `Reporting-MTA`, `Arrival-Date`, then per recipient
   `Original-Recipient` (from ORCPT, when given), `Final-Recipient`, `Action`
   (failed; delayed in a warning; delivered, or relayed to a peer that does not
   offer DSN, in a success notice), `Status`,
   `Remote-MTA` (when a server replied), `Diagnostic-Code`, `Last-Attempt-Date`
   (when known) and, in a warning, `Will-Retry-Until`. Status and Diagnostic-Code
   come from qpy.common.dsn: the server's enhanced code (RFC 3463) and
   `smtp; REPLY` with its whole reply when a server refused; else the basic
   code's class (`5.0.0`), or qpy's own `#x.y.z` code and `x-qpy; TEXT`. A
   warning never carries a class-5 Status. Modern clients read this part.
   A success notice has Status 2.0.0 and no Diagnostic-Code.
3. the original message (message/rfc822), or only its header (text/rfc822-headers)
   when it is larger than MAX_FULL_COPY or the sender asked RET=HDRS, and always in
   a warning and a success notice.

The original is never parsed: it is copied byte for byte.
"""

from __future__ import annotations

import email.charset
import email.policy
import io
import os
import secrets
import time
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import make_msgid

from qpy.common import dsn
from qpy.common.rfcdate import rfc5322_date

MAX_FULL_COPY = 128 * 1024       # larger originals are returned as their header only
MAX_HEADER_COPY = 64 * 1024      # at most this much of the header is returned
MAX_REASON = 2000                # bytes of failure text per recipient (program output)

INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
         "Your message could not be delivered to the addresses below. The failure\n"
         "is permanent, so qpy has stopped trying. The reason given for each\n"
         "address follows it.\n")
DOUBLE_INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
                "A bounce message could not be delivered to the sender of the message\n"
                "it reported on, so it comes to you, the postmaster. The reasons follow.\n")
WARN_INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
              "Your message has not been delivered yet to the addresses below. This\n"
              "is only a warning: qpy keeps trying until {until},\n"
              "and you need not send the message again. The last reason given for\n"
              "each address follows it.\n")
SUCCESS_INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
                 "Your message was delivered to the addresses below, as you asked to\n"
                 "be told.\n")
DELIVERED = "Delivered to the mailbox.\n"
RELAYED = ("Handed on to a mail server that does not report deliveries: no further\n"
           "notice will come from there.\n")
BREAK = "--- The delivery report and a copy of the message follow this text.\n"
WARN_BREAK = "--- The delivery report and the header of the message follow this text.\n"
DOUBLE_BREAK = "--- The delivery report and the original bounce follow this text.\n"


@dataclass
class Entry:
    """One recipient in a report: its address, the last reason, when it was tried."""
    address: bytes
    reason: str
    last_attempt: int = 0           # seconds since the epoch; 0: unknown
    original: str = ""              # Original-Recipient (`rfc822;addr`, from ORCPT) or ""


def status_code(reason: str) -> str:
    """The Status of a recipient that failed for good with `reason`."""
    return dsn.facts(reason, failed=True).status


def _text(b: bytes | str) -> str:
    """An address as bounce text: a control character (which no parsed address
    holds, but a hand-made queue file may) becomes `_`, so no header can break."""
    if isinstance(b, bytes):
        b = b.decode("utf-8", "replace")
    return "".join("_" if ch < " " or "\x7f" <= ch <= "\x9f" or ch in "\u2028\u2029"
                   else ch for ch in b)


def _paragraph(reason: str) -> str:
    """qmail's rule: no blank line inside a paragraph, LF at the end."""
    lines = [ln.rstrip() for ln in reason[:MAX_REASON].replace("\r", "").split("\n")]
    lines = [ln if ln else "/" for ln in lines]
    while lines and lines[-1] == "/":
        lines.pop()
    return "\n".join(lines) + "\n"


def read_original(path: str, size_limit: int = MAX_FULL_COPY) -> tuple[bytes, bool]:
    """(bytes, whole): the message, or its header only when larger than size_limit."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        data = f.read(size_limit + 1)
    if len(data) <= size_limit:
        return data, True
    head = data[:MAX_HEADER_COPY]
    end = head.find(b"\n\n")
    return (head[:end + 1] if end != -1 else head), False


def build(host: str, bounce_from: str, to: bytes, failures: list[Entry],
          original: bytes, whole: bool, arrival: int, double: bool = False,
          envid: str = "") -> bytes:
    """The bounce message (LF line ends) for the failed recipients."""
    human = (DOUBLE_INTRO if double else INTRO).format(host=host) + "\n"
    for e in failures:
        human += "<%s>:\n%s\n" % (_text(e.address), _paragraph(e.reason))
    human += DOUBLE_BREAK if double else BREAK
    blocks = [_block(e, "failed") for e in failures]
    return _report(host, bounce_from, to, "failure notice", human, arrival, blocks,
                   original, whole, envid)


def build_warning(host: str, bounce_from: str, to: bytes, delayed: list[Entry],
                  header: bytes, arrival: int, retry_until: int, envid: str = "") -> bytes:
    """The delayed-delivery warning (RFC 3464 Action: delayed), with the header of
    the message only."""
    until = rfc5322_date(retry_until)
    human = WARN_INTRO.format(host=host, until=until) + "\n"
    for e in delayed:
        human += "<%s>:\n%s\n" % (_text(e.address), _paragraph(e.reason))
    human += WARN_BREAK
    blocks = []
    for e in delayed:
        b = _block(e, "delayed")
        b["Will-Retry-Until"] = until
        blocks.append(b)
    return _report(host, bounce_from, to, "Delayed Mail (still being retried)", human,
                   arrival, blocks, header, False, envid)


def build_success(host: str, bounce_from: str, to: bytes, done: list[tuple[Entry, bool]],
                  header: bytes, arrival: int, envid: str = "") -> bytes:
    """The success notice (RFC 3461 NOTIFY=SUCCESS) for recipients delivered here
    (Action: delivered) or handed to a peer that does not offer DSN (relayed,
    the second of each pair True), with the header of the message only."""
    human = SUCCESS_INTRO.format(host=host) + "\n"
    blocks = []
    for e, relayed in done:
        human += "<%s>:\n%s\n" % (_text(e.address), RELAYED if relayed else DELIVERED)
        b = Message()
        if e.original:
            b["Original-Recipient"] = _text(e.original)
        b["Final-Recipient"] = "rfc822; " + _text(e.address)
        b["Action"] = "relayed" if relayed else "delivered"
        b["Status"] = "2.0.0"
        blocks.append(b)
    human += WARN_BREAK
    return _report(host, bounce_from, to, "Successful Mail Delivery Report", human,
                   arrival, blocks, header, False, envid)


def _block(e: Entry, action: str) -> Message:
    """The per-recipient fields of RFC 3464 section 2.3, in its order."""
    f = dsn.facts(_text(e.reason)[:MAX_REASON], failed=action == "failed")
    b = Message()
    if e.original:
        b["Original-Recipient"] = _text(e.original)
    b["Final-Recipient"] = "rfc822; " + _text(e.address)
    b["Action"] = action
    b["Status"] = f.status
    if f.remote_mta:
        b["Remote-MTA"] = "dns; " + f.remote_mta
    b["Diagnostic-Code"] = f.diagnostic
    if e.last_attempt:
        b["Last-Attempt-Date"] = rfc5322_date(e.last_attempt)
    return b


def _report(host: str, bounce_from: str, to: bytes, subject: str, human: str, arrival: int,
            blocks: list[Message], original: bytes, whole: bool, envid: str = "") -> bytes:
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = bounce_from
    report["To"] = _text(to) if to else "<>"
    report["Subject"] = subject
    report["Date"] = rfc5322_date()
    report["Message-ID"] = make_msgid(domain=host)
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-formatted delivery status notification."
    if human.isascii():   # plain 7bit text, as qmail-era scripts expect
        report.attach(MIMEText(human, "plain", "us-ascii"))
    else:                 # a UTF-8 address: quoted-printable keeps it mostly legible
        cs = email.charset.Charset("utf-8")
        cs.body_encoding = email.charset.QP
        report.attach(MIMEText(human, "plain", cs))

    status = Message()
    status["Content-Type"] = "message/delivery-status"
    top = Message()
    if envid:
        top["Original-Envelope-Id"] = _text(envid)
    top["Reporting-MTA"] = "dns; " + host
    top["Arrival-Date"] = rfc5322_date(arrival)
    status.set_payload([top] + blocks)
    report.attach(status)

    # the original goes in as a token replaced afterwards: copied byte for byte, never
    # re-encoded by the generator (which refuses or rewrites 8-bit and broken MIME)
    token = "QPY-ORIGINAL-" + secrets.token_hex(16)
    copy = Message()
    copy["Content-Type"] = "message/rfc822" if whole else "text/rfc822-headers"
    copy.set_payload(token)
    report.attach(copy)

    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email.policy.compat32).flatten(report)
    if not original.endswith(b"\n"):
        original += b"\n"
    return out.getvalue().replace(token.encode(), original, 1)


def header_of(original: bytes) -> bytes:
    """The header of a message read by read_original (up to its blank line)."""
    end = original.find(b"\n\n")
    return original[:end + 1] if end != -1 else original[:MAX_HEADER_COPY]


def now() -> int:
    return int(time.time())
