"""config — the control files one qpy-smtpd session needs, read once.

Not a program. qpy-tcpserver reads a Config before it forks its workers (and
again on SIGHUP); qpy-smtpd under ucspi-tcp reads one per connection. Reads
control/: me, smtpgreeting, locals, rcpthosts, morercpthosts, virtualdomains,
percenthack, envnoathost (qpy.common.rewrite),
badmailfrom, databytes (qpy.common.control.message_limit), timeoutsmtpd,
timeoutsession, maxrcpt, acceptunknown, milters, greetdelay, rbls; and
users/recipients.
"""

from __future__ import annotations

from qpy.common import address, rewrite
from qpy.common.control import Control, ControlError, message_limit
from qpy.common.log import log
from qpy.smtp import screen
from qpy.smtp.recipients import RecipientTable

PROGRAM = "qpy-smtpd"


def _domains(values: list[str]) -> set[bytes]:
    return {v.strip().lower().encode("utf-8") for v in values if v.strip()}


class Config:
    """The control files one session needs, read once (in qpy-tcpserver: before fork)."""

    def __init__(self, root: str, acceptunknown: bool = False):
        c = Control(root)
        self.root = root
        self.me = c.line("me")
        self.greeting = c.line("smtpgreeting") or self.me
        self.rewrite = rewrite.Rewrite.from_control(c)   # as qpy-queue-send will route
        self.rcpthosts = _domains(c.lines("rcpthosts") + c.lines("morercpthosts"))
        self.badmailfrom = _domains(c.lines("badmailfrom"))
        self.timeout = max(1, c.integer("timeoutsmtpd"))
        self.session_timeout = max(1, c.integer("timeoutsession"))
        self.unusable = ""        # a malformed limit: every session gets 421 (serve())
        try:
            self.databytes = message_limit(c)
            self.maxrcpt = max(1, c.integer("maxrcpt"))
        except ControlError as e:
            self.databytes, self.maxrcpt, self.unusable = 1, 1, str(e)
        self.acceptunknown = acceptunknown or c.flag("acceptunknown")
        self.recipients = RecipientTable(root)
        self.milters: list = []
        self.milters_problem = ""
        value, source = c.explain("milters")
        if value or source.startswith("malformed"):
            from qpy.smtp import milters  # here: ~15 ms to import, for hosts with filters
            self.milters, self.milters_problem = milters.load_specs(c)
        self.greetdelay = c.integer("greetdelay")
        self.rbls = screen.Blocklists(c)
        self.refresh()

    def refresh(self) -> None:
        """Pick up a rebuilt recipient table (cheap: one stat); log when its state changes."""
        before = getattr(self, "_table_state", "ok")
        self.recipients.refresh()
        self._table_state = self.recipients.state
        if self.recipients.state not in ("ok", before) and not self.acceptunknown:
            log("recipient table %s: %s" % (self.recipients.state,
                "accepting every local recipient" if self.recipients.state == "missing"
                else "local recipients deferred"))

    def in_rcpthosts(self, domain: bytes) -> bool:
        if domain in self.rcpthosts:
            return True
        pos = domain.find(b".")
        while pos != -1:
            if domain[pos:] in self.rcpthosts:
                return True
            pos = domain.find(b".", pos + 1)
        return False

    def bad_sender(self, sender: bytes) -> bool:
        s = sender.lower()
        return s in self.badmailfrom or b"@" + address.domain_part(s) in self.badmailfrom
