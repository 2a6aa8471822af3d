"""qpy-local — deliver one message to one local address, as qmail-local(8).

SYNOPSIS
    (run in-process by qpy-lspawn's child for every local delivery)
    qpy-local [-n] USER HOMEDIR LOCAL DASH EXT DOMAIN SENDER DEFAULTDELIVERY < message

RUNS AS
    The recipient (qpy-lspawn's child has already dropped to the user's uid, gid
    and groups). Started by hand it runs as its caller and refuses root; the
    message on stdin must be a seekable file. QPY_ROOT names the root (forwards
    are injected into its queue). `-n` prints the instructions instead.

WHAT IT DOES
    chdir HOMEDIR; check it (owned by the user, not writable by group or others,
    sticky bit = the user is editing .qmail: retry later); build
        DTLINE  Delivered-To: LOCAL@DOMAIN
        RPLINE  Return-Path: <SENDER>
        UFLINE  From SENDER DATE      (mbox only)
    refuse a message whose header already holds DTLINE, or more than MAX_HOPS
    (100) Received: and Delivered-To: lines (a loop or a forward fan-out:
    permanent, #5.4.6, so queue-send bounces it; counted here, where the header
    is read for DTLINE anyway and where a forward re-enters the queue without
    passing qpy-smtpd, which counts the same lines of mail from the network);
    pick the alias user's /etc/aliases entry (qpy.local.alias), else the .qmail
    file (qpy.local.dotqmail) or, when the user's own address has none or it is
    empty, DEFAULTDELIVERY (control/defaultdelivery, default ./Maildir/), then
    run its lines in order:
        Maildir/mbox   RPLINE + DTLINE + message (qpy.local.maildir, qpy.local.mbox);
                       never through a symbolic link or into a file or directory
                       of another owner, nor an mbox with a second hard link
                       (Postfix local(8)'s rules: a temporary failure, #4.2.1)
        |command       /bin/sh -c command, in HOMEDIR, stdin the message from its
                       start (a sealed copy in memory with its own offset),
                       qmail's environment (below), output captured
                       (MAX_OUTPUT bytes, for the log and the bounce), killed with
                       its process group after the `timeoutlocal` control
                       (default TIMEOUT seconds). Exit 0: next line; 99: success,
                       skip the remaining lines; 100, 64, 65, 70, 76, 77, 78, 112:
                       permanent; anything else or a signal: temporary.
        &address       collected; sent at the end in one injection, through
                       qpy.inject.drop, with DTLINE prepended and NEWSENDER
                       as sender (SENDER; LOCAL-owner@DOMAIN with .qmail<DASH><EXT>-owner;
                       with -owner-default too, VERP: LOCAL-owner-@DOMAIN-@[]).
    Environment of a program: SENDER NEWSENDER RECIPIENT USER HOME HOST HOST2-4
    LOCAL EXT EXT2-4 DEFAULT DTLINE RPLINE UFLINE, PATH. Addresses reach it only
    after the strict address parser; a value that starts with `()` (a bash
    function import, the Shellshock path) is left out.

EXIT CODES
    0 delivered (text `did F+W+P`: files, forwards, programs), 100 permanent
    failure (bounce), 111 temporary failure (retry: also a full disk, a quota, a
    lock held too long). The text explains, in qmail's words where qmail has them.

NOTES
    This module is over 400 lines (405, 57 of them this page): qmail-local's rules
    for choosing and running the .qmail lines are kept in one reading.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from qpy.common import address, control, privilege
from qpy.common.exits import EXIT_OK, EXIT_PERM, EXIT_TEMP, permanent
from qpy.common.queue import root_from
from qpy.inject import drop
from qpy.local import alias, dotqmail, maildir, mbox
from qpy.local.dotqmail import Failure, perm, temp
from qpy.local.message import looping, private_copy

TIMEOUT = 3600                     # default for control/timeoutlocal (seconds)
MAX_OUTPUT = 4000                  # bytes of a program's output kept for the report
MAX_FORWARDS = dotqmail.MAX_INSTRUCTIONS
CHUNK = 64 * 1024
PATH = "/usr/local/bin:/usr/bin:/bin"
PERMANENT_PROGRAM_CODES = (64, 65, 70, 76, 77, 78, 100, 112)


@dataclass
class Delivery:
    root: str
    user: str
    uid: int
    home: str
    local: bytes          # the whole local part, case kept
    domain: bytes
    dash: bytes
    ext: bytes
    sender: bytes
    msgfd: int            # the message, readable and seekable
    defaultdelivery: bytes = b"./Maildir/"
    timeout: int = TIMEOUT
    envnoathost: bytes = b""
    queue_dev: int = -1   # st_dev of the queue (qpy.local.maildir: when new/ needs no fsync)


def timeout_from(ctl: control.Control) -> int:
    """control/timeoutlocal (a qpy addition) or TIMEOUT."""
    v = ctl.integer("timeoutlocal")
    return v if v > 0 else TIMEOUT


def _host_parts(host: bytes) -> list[bytes]:
    """HOST2..HOST4: HOST with the last 1, 2, 3 dot-components removed."""
    out, h = [], host
    for _ in range(3):
        i = h.rfind(b".")
        h = h[:i] if i >= 0 else h
        out.append(h)
    return out


def _ext_parts(ext: bytes) -> list[bytes]:
    """EXT2..EXT4: EXT after its 1st, 2nd, 3rd dash."""
    out, e = [], ext
    for _ in range(3):
        i = e.find(b"-")
        e = e[i + 1:] if i >= 0 else b""
        out.append(e)
    return out


def make_maildir(path: bytes) -> None:
    """Create the default Maildir on first delivery (a new user has none yet)."""
    for sub in (b"", b"tmp", b"new", b"cur"):
        try:
            os.mkdir(os.path.join(path, sub), 0o700)
        except FileExistsError:
            pass


class Local:
    """One delivery in progress: the lines, the environment, the counters."""

    def __init__(self, d: Delivery):
        self.d = d
        self.recipient = d.local + b"@" + d.domain
        self.dtline = b"Delivered-To: " + self.recipient.replace(b"\n", b"_") + b"\n"
        self.rpline = b"Return-Path: <" + d.sender + b">\n"
        ufsender = d.sender or b"MAILER-DAEMON"
        for c in b" \t\n":
            ufsender = ufsender.replace(bytes([c]), b"-")
        self.ufline = b"From " + ufsender + b" " + time.asctime(time.gmtime()).encode() + b"\n"
        self.files = self.forwarded = self.programs = 0
        self.output: list[bytes] = []
        self.newsender = d.sender
        self.from_default = False

    def env(self, default: bytes | None) -> dict[bytes, bytes]:
        d = self.d
        env = {b"PATH": os.environb.get(b"PATH", PATH.encode()),
               b"USER": d.user.encode(), b"HOME": os.fsencode(d.home),
               b"LOCAL": d.local, b"HOST": d.domain, b"RECIPIENT": self.recipient,
               b"SENDER": d.sender, b"NEWSENDER": self.newsender, b"EXT": d.ext,
               b"DTLINE": self.dtline, b"RPLINE": self.rpline, b"UFLINE": self.ufline}
        for i, h in enumerate(_host_parts(d.domain), 2):
            env[b"HOST%d" % i] = h
        for i, e in enumerate(_ext_parts(d.ext), 2):
            env[b"EXT%d" % i] = e
        if default is not None:
            env[b"DEFAULT"] = default
        # never hand a shell something that looks like an exported function
        return {k: v for k, v in env.items() if not v.startswith(b"()") and b"\0" not in v}

    def program(self, cmd: bytes, env: dict[bytes, bytes]) -> int:
        """Run one |command; returns its exit code (crash and timeout -> 111)."""
        try:
            stdin = private_copy(self.d.msgfd)
        except OSError as e:
            raise temp(f"Unable to copy the message for a program: {e.strerror}. (#4.3.0)")
        r, w = os.pipe()
        try:
            p = subprocess.Popen([b"/bin/sh", b"-c", cmd], stdin=stdin, stdout=w,
                                 stderr=w, cwd=self.d.home, env=env, close_fds=True,
                                 process_group=0)  # own group, same session as us
        except OSError as e:
            os.close(r)
            os.close(w)
            raise temp(f"Unable to run /bin/sh: {e.strerror}. (#4.3.0)")
        finally:
            os.close(stdin)
        os.close(w)
        self.programs += 1
        kept, timed_out = self._collect(p, r)
        self.output.append(kept)
        if timed_out:
            self.output.append(b"program timed out after %d seconds" % self.d.timeout)
            return EXIT_TEMP
        if p.returncode < 0:
            self.output.append(b"Aack, child crashed (signal %d). " % -p.returncode)
            return EXIT_TEMP
        return p.returncode

    def _collect(self, p: subprocess.Popen, r: int) -> tuple[bytes, bool]:
        """Read p's output (bounded) until it ends; kill its group on timeout."""
        deadline = time.monotonic() + self.d.timeout
        kept = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
                    return kept, True
                ready, _, _ = select.select([r], [], [], min(left, 1.0))
                if ready:
                    data = os.read(r, CHUNK)
                    if not data:
                        break
                    kept = (kept + data)[:MAX_OUTPUT]
                elif p.poll() is not None:
                    break  # exited; a background child still holds the pipe: stop reading
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return kept, True
            return kept, False
        finally:
            os.close(r)

    def file(self, kind: str, path: bytes) -> None:
        head = self.rpline + self.dtline
        try:
            if kind == "maildir":
                try:
                    maildir.deliver(path, self.d.msgfd, head, self.d.queue_dev)
                except FileNotFoundError:
                    if not self.from_default:
                        raise
                    make_maildir(path)      # a new user's first mail: then once more
                    maildir.deliver(path, self.d.msgfd, head, self.d.queue_dev)
            else:
                mbox.deliver(path, self.d.msgfd, self.ufline, head)
        except OSError as e:
            what = "maildir" if kind == "maildir" else "mbox"
            raise temp(f"Unable to deliver to {what} {path.decode(errors='replace')}: "
                       f"{e.strerror}. (#4.2.1)")
        self.files += 1

    def forward_address(self, line: bytes) -> bytes:
        line = line.strip()
        if line.startswith(b"<") and line.endswith(b">"):
            line = line[1:-1]
        try:
            addr = address.parse_mailbox(line, utf8=True, need_domain=False)
        except address.AddressError as e:
            raise temp(f"bad forward address in .qmail file: {e}. (#4.2.1)")
        if b"@" not in addr:
            addr += b"@" + self.d.envnoathost
        return addr

    def forward(self, rcpts: list[bytes]) -> None:
        d = self.d
        try:
            dr = drop.Drop(d.root)
            try:
                dr.write(self.dtline)
                off = 0
                while True:
                    chunk = os.pread(d.msgfd, CHUNK, off)
                    if not chunk:
                        break
                    dr.write(chunk)
                    off += len(chunk)
            except BaseException:
                dr.abort()
                raise
            dr.commit(self.newsender, rcpts)
        except drop.InjectError as e:
            code = EXIT_PERM if permanent(e.code) else EXIT_TEMP
            raise Failure(code, f"Unable to forward message: {e}. (#4.3.0)")
        except OSError as e:
            raise temp(f"Unable to forward message: {e.strerror}. (#4.3.0)")
        self.forwarded += len(rcpts)

    def run(self, print_only: bool = False) -> str:
        """Deliver; returns the success text or raises Failure."""
        d = self.d
        try:
            os.chdir(d.home)
            st = os.stat(".")
        except OSError as e:
            raise temp(f"Unable to switch to {d.home}: {e.strerror}. (#4.3.0)")
        if st.st_uid != d.uid or not stat.S_ISDIR(st.st_mode):
            raise temp("Uh-oh: home directory is not owned by the user. (#4.7.0)")
        if st.st_mode & 0o022:
            raise temp("Uh-oh: home directory is writable by group or others. (#4.7.0)")
        if st.st_mode & stat.S_ISVTX:
            raise temp("Home directory is sticky: user is editing his .qmail file. (#4.2.1)")
        why = looping(d.msgfd, self.dtline)
        if why:
            raise perm(why)
        aliased = alias.lines(d) if d.dash else None   # /etc/aliases first (alias.py)
        if aliased is not None:
            (lines, self.from_default, self.newsender), forward_only, default = \
                aliased, False, None
        else:
            homefd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                found = dotqmail.find(homefd, d.dash, d.ext, d.uid)
                if found is None and d.dash:
                    raise perm("Sorry, no mailbox here by that name. (#5.1.1)")
                data = found.data if found else b""
                forward_only = bool(found and found.forward_only)
                if not data.strip():
                    data, forward_only = d.defaultdelivery, False
                    self.from_default = True
                default = found.default if found else None
                if d.sender not in (b"", b"#@[]"):
                    owner = b".qmail" + d.dash + dotqmail.safe_ext(d.ext) + b"-owner"
                    if dotqmail.exists(homefd, owner):
                        tail = b"-@%s-@[]" if dotqmail.exists(homefd, owner + b"-default") \
                            else b"@%s"     # -owner-default too: VERP (qmail-local)
                        self.newsender = d.local + b"-owner" + tail % d.domain
            finally:
                os.close(homefd)
            lines = dotqmail.parse(data)
        if print_only:
            return "".join(f"{k} {a.decode(errors='replace')}\n" for k, a in lines)
        env = self.env(default)
        forwards: list[bytes] = []
        for kind, arg in lines:
            if forward_only and kind != "forward":
                raise temp("Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)")
            if kind == "forward":
                forwards.append(self.forward_address(arg))
                if len(forwards) > MAX_FORWARDS:
                    raise temp(f"more than {MAX_FORWARDS} forwards. (#4.2.1)")
            elif kind == "program":
                code = self.program(arg, env)
                if code == 99:
                    break
                if code in PERMANENT_PROGRAM_CODES:
                    raise perm(self.report() or f"program exited {code}. (#5.2.0)")
                if code != 0:
                    raise temp(self.report() or f"program exited {code}. (#4.2.0)")
            else:
                self.file(kind, arg)
        if forwards:
            self.forward(forwards)
        text = f"did {self.files}+{self.forwarded}+{self.programs}"
        extra = self.report()
        return text + (" " + extra if extra else "")

    def report(self) -> str:
        return b" ".join(o.strip() for o in self.output if o.strip()).decode(
            "utf-8", "replace")[:MAX_OUTPUT]


def deliver(d: Delivery) -> tuple[int, str]:
    """Run one delivery: (exit code 0/100/111, text)."""
    try:
        return EXIT_OK, Local(d).run()
    except Failure as f:
        return f.code, f.text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = root_from()
    privilege.preamble("qpy-local", root, None)
    print_only = bool(argv) and argv[0] == "-n"
    if argv and argv[0] in ("-n", "-N", "--"):
        argv = argv[1:]
    if len(argv) != 8:
        sys.stderr.write("usage: qpy-local [-n] user homedir local dash ext domain sender "
                         "defaultdelivery < message\n")
        return EXIT_TEMP
    if os.getuid() == 0:
        sys.stderr.write("qpy-local: not allowed to deliver as root\n")
        return EXIT_TEMP
    args = [os.fsencode(a) for a in argv]
    try:
        if not stat.S_ISREG(os.fstat(0).st_mode):
            raise OSError("message on stdin is not a file")
    except OSError as e:
        sys.stderr.write(f"qpy-local: {e}\n")
        return EXIT_TEMP
    ctl = control.Control(root)
    d = Delivery(root=root, user=argv[0], uid=os.getuid(), home=argv[1], local=args[2],
                 dash=args[3], ext=args[4], domain=args[5], sender=args[6], msgfd=0,
                 defaultdelivery=args[7], timeout=timeout_from(ctl),
                 envnoathost=ctl.line("envnoathost").encode())
    if print_only:
        try:
            sys.stdout.write(Local(d).run(print_only=True))
            return EXIT_OK
        except Failure as f:
            sys.stdout.write(f.text + "\n")
            return f.code
    code, text = deliver(d)
    sys.stdout.write(text + "\n")
    return code
