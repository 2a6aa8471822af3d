"""qpy-remote — one SMTP client delivery of one message to one domain's servers.

SYNOPSIS
    qpy-remote HOST SENDER RECIPIENT...  < message

    qmail-remote's interface, for admins and tests. qpy-rspawn does not run
    this program: its workers (qpy.remote.worker, forked from qpy-rspawn, so no
    new interpreter per delivery) call `deliver()` with the message as an open
    fd and a connection cache.

RUNS AS
    qpyr (the preamble drops to it when started as root).

READS
    the message (stdin, or the fd handed over by qpy-rspawn; never a path in
    `queue/mess/`, which qpyr cannot open), `QPY_ROOT`, `control/`: me,
    helohost, locals, ipme, smtproutes, resolvers, timeoutconnect,
    timeoutremote, tlsverify, tlspolicy, tlscafile, tlsclientcert, smtpauth.
    DNS: MX, A/AAAA, TLSA (DANE), `_mta-sts` TXT; HTTPS: MTA-STS policies,
    cached in ROOT/remote/mta-sts/ (qpyr's).

CONTROL FILES (defaults in brackets; docs/outbound.md has examples)
    smtproutes      [none: MX] `domain:relay[:port[:mode]]`, mode `smtps`
                    (implicit TLS; the default on port 465) or `starttls`
                    (required; the default on port 587). qpy.remote.route.
    smtpauth        [none: no AUTH] `HOST[:PORT] USER PASSWORD [cleartext-ok]`,
                    qpyr's, mode 0400, or not used. qpy.remote.smtpauth.
    tlspolicy       [may; dane where the resolver vouches for TLSA records]
                    `DOMAIN-OR-HOST LEVEL`, LEVEL one of none, may, encrypt,
                    verify, dane, dane-only. qpy.remote.tlspolicy, qpy.remote.dane.
    tlsverify       [none] domains that need `verify` (older form of tlspolicy).
    tlscafile       [system CAs only] a PEM file of CAs also trusted by `verify`
                    and by MTA-STS policy fetches (qpy.remote.mtasts).
    tlsclientcert   [none] `HOST[:PORT] CERTFILE [KEYFILE]`: a client certificate.
    timeoutconnect  [60] seconds for the TCP connection. An address whose
                    connection timed out twice in a row is skipped for an hour
                    (qpy.common.tcpto; qpy-status lists them).
    outgoingip      [the kernel's choice] local addresses to connect from, one
                    IPv4 and/or one IPv6; the one of the peer's family is used.
    helohosts       [helohost, else me] `DOMAIN-OR-HOST NAME` lines: the EHLO
                    name by recipient domain, then by next hop.
    timeoutremote   [1200] seconds for each read or write.
    timeoutremotetotal [3600] seconds one delivery (all its connections) may
                    take, however its peers trickle their bytes.

WRITES
    stdout: qmail-remote's report, one `\\0`-terminated record per recipient
    (`r` accepted, `h` permanent, `s` temporary refusal, with text) then one
    for the message (`K` delivered, `Z` temporary, `D` permanent).

EXIT CODES
    0 a report was written (whatever it says: the report, not the exit code,
    carries each recipient's result, as qmail-remote's does); 111 the
    arguments or the root are unusable.

PROTOCOL
    Targets come from qpy.remote.route. A connection failure, or a greeting
    that is not 2xx, moves on to the next target; after that the first
    server that greets decides. TLS from the first byte for an smtproutes
    relay in mode `smtps`. EHLO with helohost (HELO if EHLO is refused);
    STARTTLS as the TLS policy says (qpy.remote.tlspolicy: by default
    whenever offered, without a certificate check, as opportunistic TLS is);
    a policy that cannot be met (no STARTTLS, a failed handshake, a
    certificate that does not verify) moves on to the next target and, when
    none is left, defers with the reason (#4.7.5): never clear text. Under
    `may`, a handshake that fails is retried once in plain text. AUTH PLAIN or
    LOGIN after EHLO when control/smtpauth has credentials for the next hop
    (only inside TLS unless the line says cleartext-ok); a refused AUTH
    defers with the server's reply. PIPELINING and SIZE when offered.
    DSN (RFC 3461): to a peer whose EHLO offers DSN (per connection: a cached
    one keeps the keywords it was opened with), the message's RET and ENVID go
    on MAIL and each recipient's NOTIFY and ORCPT on its RCPT, as queued
    (canonical, xtext re-encoded); to one that does not, none of them, and a
    recipient whose NOTIFY asks for SUCCESS is reported R (relayed) instead of
    K so that qpy-queue-send sends the `Action: relayed` notice (RFC 3461 5.2).
    Per-recipient RCPT results; the DATA result applies to the accepted ones;
    421 at any point defers all that is left. The message goes with CRLF
    line ends, dot-stuffed; bare CR and LF become CRLF, a missing final line
    end is added.

    8-bit data: a message with 8-bit bytes only in its body goes with
    BODY=8BITMIME to a peer that offers 8BITMIME (or SMTPUTF8); to one that
    offers neither, its 8-bit MIME parts are converted to quoted-printable
    (qpy.remote.encode, 7-BIT CONVERSION; as Postfix, and like it this breaks
    a DKIM signature over the body), and what cannot be converted fails
    permanently (#5.6.3). One with a non-ASCII envelope address or 8-bit
    header bytes needs SMTPUTF8, or fails permanently (#5.6.7): there is no
    standard downgrade for UTF-8 addresses.

    Connection reuse (qpy-rspawn's workers only; this program always ends
    with QUIT, as qmail-remote): a transaction that ends with the connection
    between commands (a final reply to the end of DATA, to DATA, or to every
    RCPT; no broken connection, no 421, no unread byte from the server) does
    not QUIT: the connection (socket, TLS state, EHLO keywords, target) is
    kept in a ConnCache under the job's domain, one connection per worker.
    The next job for that domain sends RSET on it and, on 250 within
    RSET_WAIT seconds, runs its transaction there without greeting, EHLO or
    STARTTLS; to a peer that offers PIPELINING the RSET goes in one write with
    MAIL, RCPT and DATA (RFC 2920), so a reused connection costs no round trip
    of its own. A refused or unanswered RSET, a broken connection, or a 421
    anywhere before the answer to the message's final dot closes it, and the
    recipients still open go through the targets on fresh connections in
    the same delivery: a dead cached connection costs no deferral. Only a
    connection that breaks after the final dot was sent defers with
    "Possible duplicate!", as on a fresh connection. A job for another
    domain, and a connection idle CONN_IDLE seconds, CONN_MAX_AGE seconds
    after it was opened, or after CONN_MAX_USES transactions, gets QUIT and
    is closed; one that the server closes or speaks on while idle is closed
    at once. A connection is reused only by a job whose TLS and AUTH plan
    (level, credentials, client certificate) is the one it was opened under.

SECURITY
    Own small client (qpy.remote.wire), not smtplib: smtplib bounds a reply line (8192 bytes)
    but not the number of lines of a multi-line reply, has no pipelining and
    no per-recipient control of the transaction. Here every reply is bounded
    (line, lines, bytes), parsing is total, and the server's text is made
    printable and short before it reaches a result, a log or a bounce.
    Addresses pass the strict parser before any I/O (no CR/LF injection).

MODULES
    qpy.remote.wire (the connection and its bounded replies), session
    (connect, greeting, EHLO, STARTTLS, AUTH), tlspolicy (TLS levels and
    contexts), smtpauth (credentials and AUTH), transaction (MAIL/RCPT/DATA and the
    results), encode (the message as DATA), conncache (the connection kept
    for reuse), route (the targets); this module is the command.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile

from qpy.common.control import Control
from qpy.common.privilege import preamble
from qpy.common.queue import root_from
from qpy.remote.transaction import RELAYED, D, K, Z, deliver

EXIT_USAGE = 111


def report(results: list[tuple[bytes, bytes]]) -> bytes:
    """qmail-remote's output: r/h/s per recipient, then K/Z/D for the message."""
    out = []
    for status, text in results:
        out.append({K: b"r", RELAYED: b"r", D: b"h", Z: b"s"}[status] + text + b"\0")
    ok = [t for s, t in results if s in (K, RELAYED)]
    if ok:
        out.append(K + ok[0] + b"\0")
    elif any(s == Z for s, _ in results):
        out.append(Z + next(t for s, t in results if s == Z) + b"\0")
    else:
        out.append(D + results[0][1] + b"\0")
    return b"".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = root_from()
    preamble("qpy-remote", root, "qpyr", argv[0] if argv else "")
    if len(argv) < 3:
        sys.stderr.write("usage: qpy-remote host sender recip...\n")
        return EXIT_USAGE
    host = argv[0]
    ctl = Control(root)
    args = [os.fsencode(a) for a in argv[1:]]
    fd = 0
    if not stat.S_ISREG(os.fstat(0).st_mode):     # a pipe: deliver() needs to read it twice
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        fd = spool.fileno()
    results = deliver(ctl, args[0], args[1:], fd, host.lower())
    sys.stdout.buffer.write(report(results))
    sys.stdout.flush()
    return 0
