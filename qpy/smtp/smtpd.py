"""qpy-smtpd — receive mail by SMTP on one connection (qmail-smtpd, done strictly).

SYNOPSIS
    qpy-smtpd                         (fd 0 and 1 are the connection)
    tcpserver -u UID -g GID 0 25 /opt/qpy/bin/qpy-smtpd      (ucspi-tcp)
    qpy-smtpd --as-caller             (qpy-sendmail -bs: stdin/stdout, as the caller)

    qpy-tcpserver runs the same Session in its pre-forked workers, without a
    new interpreter or a fork per connection.

RUNS AS
    qpyd (started as root, it drops to qpyd before reading a byte). With
    --as-caller (only from qpy-sendmail -bs; refused when PROTO or TCPREMOTEIP
    is set, i.e. on a network connection) it keeps the caller's uid, injects as
    the caller and accepts every local recipient (the caller may not read
    users/recipients; the queue bounces what has no owner, as sendmail does).

READS
    the client on fd 0; QPY_ROOT; the ucspi-tcp environment (TCPREMOTEIP,
    TCPREMOTEHOST, TCPLOCALIP, RELAYCLIENT, DATABYTES) and QPY_LISTENER;
    control/: me, smtpgreeting, locals, rcpthosts, morercpthosts,
    virtualdomains, percenthack, envnoathost, badmailfrom, databytes,
    timeoutsmtpd, timeoutsession, maxrcpt, acceptunknown, milters, rbls,
    greetdelay, resolvers; RBLSMTPD from the client rules; users/recipients
    (built by qpy-newrcpt).

WRITES
    replies on fd 1; accepted messages through qpy.inject.drop (the one door):
    handed to qpy-pickup at queue/door/socket as a sealed memfd, or written to
    queue/drop/ when pickup is not there or the message is over 4 MiB; durably
    in the queue, before it says 250 (`queued as ID`: the id of its Received:
    line, which pickup keeps); one log line per refused command and per session
    on fd 2.

SMTP
    RFC 5321 with PIPELINING, 8BITMIME, SIZE, ENHANCEDSTATUSCODES, SMTPUTF8, DSN.
    DSN (RFC 3461, qpy.common.dsnparam): MAIL takes RET=FULL|HDRS and
    ENVID=xtext (at most 100 characters, printable ASCII once decoded), RCPT
    NOTIFY=NEVER or a list of SUCCESS, DELAY, FAILURE, and ORCPT=rfc822;xtext or
    utf-8;utf-8-addr-xtext (at most 500 characters); each at most once, the
    xtext decoded strictly (a NUL, CR, LF or bad `+XX` is refused). A
    malformed one is 501 5.5.4, any other parameter 555 5.5.4, and any
    parameter after HELO (not EHLO) 555 5.5.4. They are queued with the
    message and the recipient (in the canonical form: upper-case keywords,
    xtext re-encoded).
    RECIPIENTS (docs/addresses.md). The address is parsed strictly and its
    local part put in canonical form (`"joe"@d` is `joe@d`); C0 and C1
    controls, DEL, U+2028 and U+2029 are refused (501 5.1.3). When RELAYCLIENT
    is set its value is appended to the recipient, as qmail-smtpd does. Then
    qpy.common.rewrite routes it exactly as qpy-queue-send will (envnoathost,
    percenthack, locals, virtualdomains with user@domain entries). Without
    RELAYCLIENT or AUTH, the domain as given and the domain after the percent
    hack must both be in rcpthosts (553 5.7.1). A local recipient whose local
    part (after a virtualdomains prepend) is not in users/recipients is
    refused (550 5.1.1) unless acceptunknown. The envelope carries the
    canonical address with the suffix.
    DATA ends at <CR><LF>.<CR><LF> only, and a bare CR or LF anywhere in it
    refuses the message (550 5.6.0) after reading to that end. The size limit
    (control/databytes, 52428800 when absent, qpy.common.control.message_limit;
    a client rule's DATABYTES only lowers it) is advertised as SIZE n, refused at
    MAIL for a larger SIZE= and after the real end of a larger DATA (552 5.3.4,
    nothing queued, the session goes on). A command line over 512 bytes (1012
    for MAIL and RCPT: RFC 3461 gives RCPT 500 more for ORCPT, MAIL 100 for
    ENVID) gets 500 5.5.2;
    bytes sent before the 354 reply to DATA close the session.

LIMITS (against clients that harvest, trickle or stay; docs/security.md)
    timeoutsmtpd (default 1200 s): a whole command line must arrive within it,
    however its bytes trickle in, and a whole DATA (354 to the final dot) as
    well; else 421 4.4.2 and close. timeoutsession (default 3600 s): the whole
    session; then 421 4.4.2 Session too long. 10 syntax or sequence errors:
    421 4.7.0. Refused recipients (550 5.1.1 unknown, 553 5.7.1 relaying):
    the first 3 answered at once, each later one 0.25 s times its number past
    3 later, the 10th followed by 421 4.7.0 and close (Postfix's error sleep
    and hard error limit). A DATA refused before 354 (no valid recipients,
    no MAIL, a queue problem) in an EHLO session, or with bytes waiting, is
    followed by 421 4.5.0 and close: a pipelining client may have sent the
    message text without waiting, and none of it may run as a command.
    qpy-tcpserver adds maxsmtpd, maxperip and smtpdsessions.

FILTERS
    control/milters lists milters (rspamd, OpenDKIM, OpenDMARC, clamav-milter),
    one `ENDPOINT [default_action=accept|tempfail|reject] [connect_timeout=S]
    [command_timeout=S] [content_timeout=S]` a line (unix:/path,
    inet:host:port, inet6:[addr]:port; Postfix's defaults tempfail, 30, 30,
    300 s). They are told of the connection, HELO, MAIL, RCPT and DATA as they
    come, with Postfix's macros (i = the queue id of "queued as"); with
    filters, DATA is spooled, the filters see it after the final dot, and the
    message they leave (headers, body, envelope) is what is queued, before the
    250. A filter that fails gets its default_action, logged. See
    docs/milter.md. With or without filters, Authentication-Results fields
    from outside that claim this host's authserv-id (me) are removed (RFC 8601
    section 5), logged.

BEFORE ANY FILTER (qpy.smtp.screen, docs/smtp.md)
    control/greetdelay S (default 0, off): `220-` at once, the final `220 `
    S seconds later; a client that speaks in between gets 554 5.5.1 and is
    disconnected (postscreen's pregreet test). control/rbls: DNS blocklists
    (`zone` or `zone=127.0.0.2`), looked up at connect through
    control/resolvers; a listed client that may not relay gets every RCPT
    refused with 554 5.7.1 and the list's TXT record; RBLSMTPD from the rules
    overrides as with ucspi-tcp's rblsmtpd. control/ratelimits (qpy-tcpserver
    only): over `messages N` a minute per client address, 421 4.7.0 at MAIL.

SECURITY
    Every byte from the client is parsed as bytes with a bound. Addresses pass
    qpy.common.address. No shell, no template, no % formatting of client data.
    Errors never reach the wire as a traceback: an internal error is 451.

EXIT CODES
    0 always once the session has started (the log says how it ended);
    111 when it cannot drop privileges.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping

from qpy.common.log import clean, log
from qpy.common.log import name as logname
from qpy.common.privilege import preamble
from qpy.common.queue import root_from
from qpy.smtp.channel import Channel
from qpy.smtp.config import PROGRAM, Config
from qpy.smtp.secure import SecureSession

__all__ = ["Config", "serve", "main"]


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(cfg: Config, env: Mapping[str, str], rfd: int = 0, wfd: int = 1,
          greeted: Callable[[], None] | None = None) -> int:
    """Run one session on rfd/wfd (a forked qpy-tcpserver child or qpy-smtpd itself).
    The caller has set SIGTERM to end the session (SystemExit) and SIGPIPE to SIG_IGN:
    main() here, once per worker in qpy-tcpserver (not per session: it costs). The
    session's log lines are named `qpy-smtpd IP` (qpy-tcpserver names its worker's
    again after the session). greeted() runs once the 220 is out, before the first
    command is read: work of the caller's that the client need not wait for."""
    logname("%s %s" % (PROGRAM, env.get("TCPREMOTEIP", "")) if env.get("TCPREMOTEIP")
            else PROGRAM)
    if cfg.unusable:
        log("%s: 421 to %s" % (cfg.unusable, env.get("TCPREMOTEIP", "")))
        try:
            os.write(wfd, b"421 4.3.0 Unable to read controls\r\n")
        except OSError:
            pass
        return 0
    # STARTTLS, implicit TLS and AUTH (qpy.smtp.secure); plain SMTP without a cert.
    # PROTO: a network connection (qpy-tcpserver, ucspi-tcp), never sendmail -bs's stdio
    channel = Channel(rfd, wfd, cfg.timeout, cfg.session_timeout, own_socket="PROTO" in env)
    session = SecureSession(cfg, env, channel)
    session.greeted = greeted
    try:
        session.run()
    finally:
        session.close()   # a qpy-tcpserver worker lives on: keep nothing of this client open
    return 0


def main() -> int:
    root = root_from()
    caller = sys.argv[1:] == ["--as-caller"]
    if caller and ("PROTO" in os.environ or "TCPREMOTEIP" in os.environ):
        sys.stderr.write("%s: --as-caller is for sendmail -bs, not a network connection\n"
                         % PROGRAM)
        return 111
    # --as-caller (qpy-sendmail -bs): the session runs as whoever started it and
    # injects as that user through queue/drop/, as `sendmail -bm` would
    preamble(PROGRAM, root, None if caller else "qpyd", os.environ.get("TCPREMOTEIP", ""))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        # --as-caller: the caller may not read users/recipients; the queue bounces
        # what has no owner, as it does for sendmail
        cfg = Config(root, acceptunknown=caller)
    except Exception as e:
        log("cannot read control files: %s" % clean(str(e)))
        try:
            os.write(1, b"421 4.3.0 Unable to read controls\r\n")
        except OSError:
            pass
        return 0
    return serve(cfg, os.environ)
