"""bounce — the delivery status notification qpy-queue-send sends for failed recipients.

An RFC 3464 `multipart/report; report-type=delivery-status`, built with the stdlib
`email` package:

1. text/plain in qmail's bounce layout (QSBMF): it starts `Hi. This is the`, one
   paragraph per failed recipient starting `<address>:` with the reason, and a break
   paragraph starting `---`. People and qmail-era scripts read this part.
2. message/delivery-status: `Reporting-MTA`, `Arrival-Date`, then per recipient
   `Final-Recipient`, `Action: failed`, `Status` (the `#5.x.x` code found in the
   reason, else 5.0.0) and `Diagnostic-Code`. Modern clients read this part.
3. the original message (message/rfc822), or only its header (text/rfc822-headers)
   when it is larger than MAX_FULL_COPY.

The original is never parsed: it is copied byte for byte.
"""

from __future__ import annotations

import email.charset
import email.policy
import io
import os
import re
import secrets
import time
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

MAX_FULL_COPY = 128 * 1024       # larger originals are returned as their header only
MAX_HEADER_COPY = 64 * 1024      # at most this much of the header is returned
MAX_REASON = 2000                # bytes of failure text per recipient (program output)

_STATUS = re.compile(r"#([245]\.\d{1,3}\.\d{1,3})")

INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
         "Your message could not be delivered to the addresses below. The failure\n"
         "is permanent, so qpy has stopped trying. The reason given for each\n"
         "address follows it.\n")
DOUBLE_INTRO = ("Hi. This is the qpy-queue-send program at {host}.\n"
                "A bounce message could not be delivered to the sender of the message\n"
                "it reported on, so it comes to you, the postmaster. The reasons follow.\n")
BREAK = "--- The delivery report and a copy of the message follow this text.\n"
DOUBLE_BREAK = "--- The delivery report and the original bounce follow this text.\n"


def status_code(reason: str) -> str:
    m = _STATUS.search(reason)
    if m and m.group(1).startswith("5"):
        return m.group(1)
    return "5.0.0"


def _text(b: bytes | str) -> str:
    if isinstance(b, bytes):
        b = b.decode("utf-8", "replace")
    return b


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


def build(host: str, bounce_from: str, to: bytes, failures: list[tuple[bytes, str]],
          original: bytes, whole: bool, arrival: int, double: bool = False) -> bytes:
    """The bounce message (LF line ends), for the failures [(address, reason)]."""
    human = (DOUBLE_INTRO if double else INTRO).format(host=host) + "\n"
    for addr, reason in failures:
        human += "<%s>:\n%s\n" % (_text(addr), _paragraph(reason))
    human += DOUBLE_BREAK if double else BREAK

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = bounce_from
    report["To"] = _text(to) if to else "<>"
    report["Subject"] = "failure notice"
    report["Date"] = formatdate(localtime=False)
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
    top["Reporting-MTA"] = "dns; " + host
    top["Arrival-Date"] = formatdate(arrival, localtime=False)
    blocks = [top]
    for addr, reason in failures:
        b = Message()
        b["Final-Recipient"] = "rfc822; " + _text(addr)
        b["Action"] = "failed"
        b["Status"] = status_code(reason)
        diag = " ".join(_text(reason)[:MAX_REASON].split())
        b["Diagnostic-Code"] = "x-qpy; " + diag
        blocks.append(b)
    status.set_payload(blocks)
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


def now() -> int:
    return int(time.time())
