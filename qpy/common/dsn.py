"""dsn — what a delivery status notification (RFC 3464) says about one recipient,
read from the result text a delivery program gave.

qpy-remote (writer) and qpy-queue-send's bounces (reader) share this format; both
import it from here. A result that carries a server's reply holds it as

    ... Remote host HOST said: REPLY

REPLY being the reply as the server sent it (lines joined with ` / `, made
printable), HOST the name qpy-remote connected to (an MX, a relay, or an
address). Anything after REPLY that qpy adds (` (#4.7.0)`, queue-send's
`/I'm not going to try again...`) is not part of it. The text of a result is
never used for control flow: only to fill in a bounce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAID = " said: "
_REMOTE = re.compile(r"Remote host (\S{1,300}) said: ([2-5][0-9][0-9](?:[ -].*)?)$")
_ENHANCED = re.compile(r"([2-5])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_QMAIL_CODE = re.compile(r"#([245]\.\d{1,3}\.\d{1,3})")
_TRAILER = re.compile(r"(?: \(#[245]\.\d{1,3}\.\d{1,3}\))?(?:/I'm not going to try again.*)?$")


def remote_said(host: str, reply: str) -> str:
    """The part of a result text that names the server and holds its reply."""
    return "Remote host %s%s%s" % (host, SAID, reply)


@dataclass
class Facts:
    status: str             # RFC 3463 code: the server's, derived, or qpy's own
    diagnostic: str         # `smtp; REPLY` or `x-qpy; TEXT`
    remote_mta: str         # the server's name, or "" when no server replied


def facts(text: str, failed: bool) -> Facts:
    """The DSN fields for a recipient whose last result was `text`; `failed`: for
    good (Action: failed), else delayed."""
    text = " ".join(text.split())
    m = _REMOTE.search(text)
    if m is not None:
        host, reply = m.group(1), _TRAILER.sub("", m.group(2))
        return Facts(_status_of_reply(reply, failed), "smtp; " + reply, host)
    q = _QMAIL_CODE.search(text)
    status = q.group(1) if q else ("5.0.0" if failed else "4.0.0")
    if not failed and status.startswith("5"):
        status = "4" + status[1:]
    return Facts(status, "x-qpy; " + text, "")


def _status_of_reply(reply: str, failed: bool) -> str:
    """The enhanced code after the basic one (RFC 3463; its class must agree with the
    basic code's), else the basic code's class with .0.0. A reply taken as a
    temporary failure (delayed) is never reported with class 5."""
    basic = reply[0]
    m = _ENHANCED.match(reply[4:]) if len(reply) > 4 else None
    status = "%s.%s.%s" % m.groups() if m and m.group(1) == basic else basic + ".0.0"
    if not failed and status[0] == "5":
        status = "4" + status[1:]
    return status
