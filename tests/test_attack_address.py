"""Attacks through addresses (issue 12, findings 2 and 10), end to end.

Backscatter through quoted local parts: `RCPT TO:<"user"@local>` passed the RCPT
check (which unquoted) while the envelope kept the quotes, so local delivery looked
up `"user"`, found no one, and bounced the spam to the forged sender. Control
characters in (SMTPUTF8) addresses reached Return-Path and $SENDER raw. Here the
real programs run: qpy-start with qpy-smtpd, pickup, queue-send, lspawn and
qpy-local into real users' Maildirs; qpy-queue-inject; qpy-lspawn on its socket.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import signal
import socket
import subprocess
import time

import qpytest
from qpytest import needs_root, wait_for
from smtphelp import Client, Listener, drops

from qpy.common import envelope, spawn
from qpy.common.state import LOCAL, MessageState, RecipientState, encode_head

ME = "test.example"
FORGED = b"forged@victim.example"


def make_user(qroot, name: str, dot: dict[str, str]) -> pwd.struct_passwd:
    """A real user with a Maildir and the given .qmail files (key "" is .qmail)."""
    return qpytest.mail_user(qroot, name, dot)


def mails(pw: pwd.struct_passwd) -> list[bytes]:
    new = os.path.join(pw.pw_dir, "Maildir", "new")
    out = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


class Running:
    """qpy-start on a root with an SMTP port; its merged log in a file."""

    def __init__(self, qroot):
        self.qroot = qroot
        self.port = qpytest.free_port()
        qroot.control("smtplisten", "127.0.0.1:%d" % self.port)
        self.logpath = os.path.join(os.path.dirname(qroot.path), "start.log")
        with open(self.logpath, "ab") as log:
            self.proc = qroot.start("qpy-start", qroot.path, stdout=log,
                                    stderr=subprocess.STDOUT)

        def up() -> bool:
            try:
                Client(self.port, timeout=2).close()
                return True
            except OSError:
                return False
        assert wait_for(up, 60), self.log()

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def queue_empty(self) -> bool:
        p = self.qroot.paths
        return not any(os.listdir(d) for d in (p.drop, p.mess, p.todo, p.state))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def send(port: int, rcpts: list[bytes], sender: bytes = FORGED,
         source: str | None = None) -> list[int]:
    """One SMTP transaction; the RCPT reply codes (DATA only when one was accepted)."""
    c = Client(port, source=source)
    try:
        c.hello()
        assert c.cmd(b"MAIL FROM:<%s>" % sender).startswith(b"250")
        codes = [int(c.cmd(b"RCPT TO:" + r)[:3]) for r in rcpts]
        if 250 in codes:
            assert c.cmd(b"DATA").startswith(b"354")
            assert c.cmd(b"Subject: quoted\r\n\r\nspam or not\r\n.").startswith(b"250")
        c.cmd(b"QUIT")
        return codes
    finally:
        c.close()


@needs_root
def test_quoted_local_parts_delivered_never_bounced_to_the_forged_sender(qroot):
    """Issue 12 finding 2, end to end: "user", "user-ext" and "us\\er" (and a sample
    of other forms the RCPT check accepts as local: a case variant, the alias user's
    .qmail-NAME, a virtual domain, the percent hack, a local part that stays quoted,
    RELAYCLIENT's `@fixme` suffix) all land in the user's Maildir; nothing bounces,
    nothing is left in the queue; unknown ones are refused at RCPT."""
    pw = make_user(qroot, "rwa", {"": "./Maildir/\n", "ext": "./Maildir/\n",
                                  "v-default": "./Maildir/\n"})
    u = pw.pw_name.encode()
    sales = os.path.join(qroot.paths.alias, ".qmail-sales")
    with open(sales, "w") as f:
        f.write("&%s@%s\n" % (pw.pw_name, ME))
    os.chmod(sales, 0o644)
    fix = os.path.join(qroot.paths.alias, ".qmail-fix-default")
    with open(fix, "w") as f:
        f.write("&%s@%s\n" % (pw.pw_name, ME))
    os.chmod(fix, 0o644)
    qroot.control("rcpthosts", "%s\nvirt.example\ngw.example" % ME)
    qroot.control("virtualdomains", "virt.example:%s-v\nfixme:fix" % pw.pw_name)
    qroot.control("percenthack", "gw.example")
    qroot.control("smtprules", '127.0.0.2:allow,RELAYCLIENT="@fixme"\n'
                               '127.:allow,RELAYCLIENT=""\n:allow\n')
    q = Running(qroot)        # builds users/recipients at start
    try:
        accepted = [b'<"%s"@test.example>' % u, b'<"%s-ext"@test.example>' % u,
                    b'<"%s\\%s"@test.example>' % (u[:2], u[2:]),
                    b'<"%s"@TEST.example>' % u.upper(), b'<"sales"@test.example>',
                    b'<"Some.One"@virt.example>', b"<%s%%test.example@gw.example>" % u,
                    b'<"john doe"@virt.example>']       # stays quoted: a -default takes it
        refused = [b'<"%s-nosuch"@test.example>' % u, b'<"no body"@test.example>',
                   b'<"%s"@test.example>' % u[:-1]]
        codes = send(q.port, accepted + refused)
        assert codes == [250] * len(accepted) + [550] * len(refused), q.log()[-3000:]
        # RELAYCLIENT="@fixme": the whole address is the local part at fixme (quoted),
        # delivered by the alias user's .qmail-fix-default, not bounced
        assert send(q.port, [b"<joe@elsewhere.example>"], source="127.0.0.2") == [250]
        accepted.append(b"fixme")
        assert wait_for(lambda: len(mails(pw)) == len(accepted), 60), q.log()[-4000:]
        assert wait_for(q.queue_empty, 30), q.log()[-4000:]
        got = mails(pw)
        assert all(m.startswith(b"Return-Path: <%s>\n" % FORGED) for m in got)
        # the newest Delivered-To comes first: the sales forward ends at the user
        assert sorted(re.search(rb"Delivered-To: ([^\n]+)\n", m).group(1) for m in got) \
            == sorted([u + b"@test.example"] * 5 + [u + b"-ext@test.example",
                                                     u.upper() + b"@test.example",
                                                     u + b"-v-Some.One@virt.example",
                                                     u + b'-v-"john doe"@virt.example'])
        assert sum(b"Delivered-To: sales@test.example\n" in m for m in got) == 1
        assert sum(b'Delivered-To: fix-"joe@elsewhere.example"@fixme\n' in m
                   for m in got) == 1
        log = q.log()
        assert re.findall(r"delivery \d+: (failure|deferral)", log) == [], log[-4000:]
        assert "bounce msg" not in log, log[-4000:]
    finally:
        q.stop()


# ---- RELAYCLIENT's suffix and the percent hack at RCPT (no root needed) ----------------

def test_relayclient_suffix_and_percenthack_at_rcpt(qroot):
    """qmail-smtpd appends RELAYCLIENT's value to each recipient: the envelope carries
    the result (`@fixme` makes the whole address the local part at `fixme`). The
    percent hack cannot open a relay: a stranger's `user%elsewhere@gw` is refused,
    because the RCPT check sees where the rewrite sends it."""
    qroot.control("smtprules", '127.0.0.2:allow,RELAYCLIENT="@fixme"\n'
                               '127.0.0.3:allow,RELAYCLIENT=".relay.example"\n'
                               '127.0.0.4:allow\n127.:allow,RELAYCLIENT=""\n:allow\n')
    qroot.control("rcpthosts", "%s\ngw.example" % ME)
    qroot.control("virtualdomains", "fixme:fix")
    qroot.control("percenthack", "gw.example")
    fix = os.path.join(qroot.paths.alias, ".qmail-fix-default")
    with open(fix, "w") as f:
        f.write("./Maildir/\n")
    os.chmod(fix, 0o644)
    r = qroot.run("qpy-newrcpt", qroot.path)
    assert r.returncode == 0, r.stderr
    s = Listener(qroot)
    try:
        assert send(s.port, [b"<joe@elsewhere.example>", b'<"a b"@else.example>'],
                    source="127.0.0.2") == [250, 250]
        assert send(s.port, [b"<joe@elsewhere.example>"], source="127.0.0.3") == [250]
        stranger = send(s.port, [b"<joe%elsewhere.example@gw.example>",
                                 b"<postmaster%test.example@gw.example>",
                                 b"<joe@elsewhere.example>"], source="127.0.0.4")
        assert stranger == [553, 250, 553]
        assert wait_for(lambda: len(drops(qroot)) == 3, 10)
        got = sorted(tuple(rcpts) for _, _, rcpts in drops(qroot))
        assert got == sorted([(b'"joe@elsewhere.example"@fixme', b'"a b@else.example"@fixme'),
                              (b"joe@elsewhere.example.relay.example",),
                              (b"postmaster%test.example@gw.example",)])
    finally:
        s.stop()


# ---- control characters (issue 12 finding 10) -------------------------------------------

HOSTILE = ["\x85", "\u2028", "\u2029", "\x9b", "\x7f", "\x1b"]


def test_controls_in_addresses_refused_at_smtp(qroot):
    s = Listener(qroot)
    try:
        for ctl in HOSTILE:     # a session each: four refusals count toward MAX_ERRORS
            c = Client(s.port)
            c.hello()
            bad = ("a%sb@test.example" % ctl).encode()
            quoted = ('"a%sb"@test.example' % ctl).encode()
            # C0 and DEL: the command line reader refuses them first (500 5.5.2)
            mail, rcpt = (b"501 5.1.7 ", b"501 5.1.3 ") if ctl > "\x7f" else (b"500 5.5.2 ",) * 2
            for path in (bad, quoted):
                r = c.cmd(b"MAIL FROM:<%s> SMTPUTF8" % path)
                assert r.startswith(mail), (ctl, r)
            assert c.cmd(b"MAIL FROM:<a@b.example> SMTPUTF8").startswith(b"250")
            for path in (bad, quoted):
                r = c.cmd(b"RCPT TO:<%s>" % path)
                assert r.startswith(rcpt), (ctl, r)
            c.close()
        assert drops(qroot) == []
    finally:
        s.stop()


def test_controls_in_addresses_refused_by_queue_inject(qroot):
    for ctl in HOSTILE:
        for sender, rcpt in ((("x%sy@b.example" % ctl).encode(), b"ok@test.example"),
                             (b"a@b.example", ('"x%sy"@test.example' % ctl).encode())):
            r, w = os.pipe()
            os.write(w, envelope.encode(sender, [rcpt]))
            os.close(w)
            try:
                p = subprocess.run([qroot.bin("qpy-queue-inject")], input=b"Subject: x\n\nx\n",
                                   stdout=r, stderr=subprocess.PIPE, env=qroot.env(),
                                   timeout=30)
            finally:
                os.close(r)
            assert p.returncode == envelope.EXIT_FORMAT, (ctl, p.stderr)
            assert b"control character" in p.stderr
    assert [n for n in os.listdir(qroot.paths.drop) if not n.startswith(".")] == []


# ---- qpy-lspawn checks sender and recipient bytes again --------------------------------

@needs_root
def test_lspawn_refuses_cr_lf_in_sender_or_recipient(qroot):
    """A request whose sender or recipient holds CR or LF (the parser lets none in;
    a hand-made state file or a bug could) is refused for good, with a log line,
    before any delivery runs; a clean recipient of the same request is delivered."""
    pw = make_user(qroot, "rwb", {"": "./Maildir/\n", "default": "./Maildir/\n"})
    u = pw.pw_name.encode()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    errpath = os.path.join(os.path.dirname(qroot.path), "lspawn.err")
    with open(errpath, "wb") as err:
        proc = subprocess.Popen([qroot.bin("qpy-lspawn")], stdin=theirs,
                                stdout=subprocess.DEVNULL, stderr=err, env=qroot.env())
    theirs.close()
    msg = os.path.join(os.path.dirname(qroot.path), "msg")
    with open(msg, "wb") as f:
        f.write(b"Subject: x\n\nbody\n")
    qpyq = pwd.getpwnam("qpyq")
    os.chown(msg, qpyq.pw_uid, qpyq.pw_gid)
    os.chmod(msg, 0o640)

    def deliver(n: int, sender: bytes, rcpts: list[bytes]) -> list[tuple[bytes, bytes]]:
        fd = os.open(msg, os.O_RDONLY)
        try:
            spawn.send_request(ours, n, sender, rcpts, fd)
        finally:
            os.close(fd)
        assert select.select([ours], [], [], 60)[0]
        got, results = spawn.recv_result(ours)
        assert got == n
        return results

    try:
        results = deliver(1, b"a@b.example", [u + b"-x\rX-Evil: 1@test.example",
                                              u + b"-y\nX-Evil: 2@test.example",
                                              u + b"@test.example"])
        assert [s for s, _ in results] == [b"D", b"D", b"K"], results
        assert all(b"control character" in t for _, t in results[:2])
        results = deliver(2, b"a@b.example\nX-Evil: 3", [u + b"@test.example"])
        assert results[0][0] == b"D" and b"control character" in results[0][1]
        assert wait_for(lambda: len(mails(pw)) == 1, 10)
        assert b"X-Evil" not in mails(pw)[0]
    finally:
        ours.close()
        assert proc.wait(30) == 0
    with open(errpath, "rb") as f:
        log = f.read()
    assert log.count(b"refused: control character") == 3, log


@needs_root
def test_hostile_state_file_never_reaches_a_delivery(qroot):
    """A recipient with a CR planted in the queue as root (state/ID is not parsed as
    an address): queue-send hands it on, lspawn refuses it for good, the sender gets
    the bounce, the user's .qmail-default never runs for it."""
    pw = make_user(qroot, "rwc", {"": "./Maildir/\n", "default": "./Maildir/\n"})
    u = pw.pw_name.encode()
    p = qroot.paths
    msgid = "1700000000000077"
    body = b"Received: (qpy 1 invoked by uid 0); 1 Jan 2026 00:00:00 -0000\n" \
           b"Subject: planted\n\nplanted body\n"
    hostile = u + b"-x\rX-Evil: 1@test.example"
    st = MessageState(msgid, int(time.time()), len(body), 0, 1, u + b"@test.example")
    st.recipients.append(RecipientState(hostile, LOCAL, hostile))
    qpyq, qpys = pwd.getpwnam("qpyq"), pwd.getpwnam("qpys")
    for path, data, owner, mode in ((os.path.join(p.mess, msgid), body, qpyq, 0o640),
                                    (os.path.join(p.state, msgid), encode_head(st), qpys,
                                     0o600)):
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, owner.pw_uid, qpys.pw_gid)
        os.chmod(path, mode)
    q = Running(qroot)
    try:
        assert wait_for(lambda: "refused: control character" in q.log(), 60), q.log()
        assert wait_for(lambda: len(mails(pw)) == 1, 60), q.log()[-4000:]
        [bounce] = mails(pw)
        assert b"Return-Path: <>\n" in bounce and b"control character" in bounce
        assert b"planted body" in bounce and b"X-Evil: 1\n" not in bounce.split(b"\n\n")[0]
    finally:
        q.stop()
