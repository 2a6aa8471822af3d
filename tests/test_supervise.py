"""qpy under service managers: daemontools (svscan over the filled-in service tree),
systemd units (systemd-analyze verify, and their capability sets applied with setpriv),
and qpy-start's own supervision (SIGKILL each program in turn; nothing lost).

Everything runs as root with the real users; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time

import psutil
import pytest
import qpytest
import tlshelp

pytestmark = [qpytest.needs_root,
              pytest.mark.skipif(not os.path.exists("/usr/bin/svscan"), reason="no daemontools")]

SERVICES = ("send", "pickup", "smtpd", "authd")
TAI64N_LINE = re.compile(rb"^@[0-9a-f]{24} ")


class Host:
    """A root installed with --smtp and --supervise, and one recipient with a home."""

    def __init__(self, user: str):
        self.port = qpytest.free_port()
        self.svdir = qpytest.scratch_dir("svdir")
        home = os.path.join(qpytest.scratch_dir("home"), user)
        self.pw = qpytest.make_user(user, home=home)
        self.home = home
        self.qroot = qpytest.install_root("test.example", "--smtp", "127.0.0.1:%d" % self.port,
                                          "--supervise", self.svdir)
        self.root = self.qroot.path
        self.rcpt = "%s@test.example" % self.pw.pw_name

    def maildir(self) -> list[bytes]:
        out = []
        for f in sorted(glob.glob(os.path.join(self.home, "Maildir", "new", "*"))):
            with open(f, "rb") as fh:
                out.append(fh.read())
        return out

    def subjects(self) -> list[str]:
        return [m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
                for m in self.maildir() if b"Subject: " in m]

    def sendmail(self, subject: str) -> None:
        r = self.qroot.run("qpy-sendmail", self.rcpt,
                           input=b"Subject: %s\n\nbody of %s\n" % (subject.encode(),
                                                                   subject.encode()))
        assert r.returncode == 0, r.stderr

    def smtp(self, subject: str, rcpt: str | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            s.sendmail("sender@far.example", [rcpt or self.rcpt],
                       "Subject: %s\r\n\r\nbody of %s\r\n" % (subject, subject))

    def status(self, *args: str) -> subprocess.CompletedProcess:
        return self.qroot.run("qpy-status", self.root, *args)

    def qstat(self) -> bytes:
        return self.qroot.run("qpy-qstat", self.root).stdout

    def log(self, name: str = "send") -> bytes:
        try:
            with open(os.path.join(self.root, "log", "qpy-" + name, "current"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def break_maildir(self, broken: bool) -> None:
        """A Maildir the user cannot write into: local deliveries defer."""
        tmp = os.path.join(self.home, "Maildir", "tmp")
        os.chmod(tmp, 0o500 if broken else 0o700)

    def deferred_id(self) -> str | None:
        msgid = None
        for line in self.qroot.run("qpy-qread", self.root).stdout.decode().splitlines():
            if not line.startswith(" "):
                msgid = line.split()[0]
            elif line.split()[0] == "deferred":
                return msgid
        return None

    def cleanup(self) -> None:
        self.qroot.stop_all()
        qpytest.remove_tree(os.path.dirname(self.root))
        qpytest.remove_tree(self.svdir)
        qpytest.remove_tree(os.path.dirname(self.home))


class Scan:
    """svscan over a scan directory holding links to the filled-in service dirs."""

    def __init__(self, host: Host, names: tuple[str, ...]):
        self.dir = qpytest.scratch_dir("scan")
        for n in names:
            os.symlink(os.path.join(host.svdir, "qpy-" + n), os.path.join(self.dir, "qpy-" + n))
        self.proc = subprocess.Popen(["env", "-", "PATH=/usr/bin:/bin", "svscan", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, "qpy-" + name)

    def svc(self, flag: str, name: str) -> None:
        subprocess.run(["svc", flag, self.path(name)], check=True, timeout=30)

    def svstat(self, name: str) -> str:
        return subprocess.run(["svstat", self.path(name)], capture_output=True,
                              text=True, timeout=30).stdout

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        procs = self.processes()
        # svscan first, so that it does not restart the supervise processes we stop
        self.proc.kill()
        self.proc.wait()
        dirs = glob.glob(os.path.join(self.dir, "*")) + glob.glob(os.path.join(self.dir, "*/log"))
        subprocess.run(["svc", "-dx", *dirs], timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=90)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        qpytest.remove_tree(self.dir)


@pytest.fixture
def host():
    h = Host("sv1")
    try:
        yield h
    finally:
        h.cleanup()


def test_service_files_are_filled_in_and_systemd_verifies_them(host):
    for name in SERVICES:
        d = os.path.join(host.svdir, "qpy-" + name)
        with open(os.path.join(d, "run")) as f:
            run = f.read()
        assert "@" not in run.replace("@SMTPUSER@", "")  # no placeholder left
        assert os.access(os.path.join(d, "run"), os.X_OK)
        assert "\nexec 2>&1\n" in run
        assert "\nexec envdir ./env %s/qpy-start %s --only %s\n" % (qpytest.BIN, host.root,
                                                                     name) in run
        with open(os.path.join(d, "log", "run")) as f:
            logrun = f.read()
        assert "\nexec setuidgid qpyl multilog t s1000000 n20 %s/log/qpy-%s\n" % (
            host.root, name) in logrun
        st = os.stat(os.path.join(host.root, "log", "qpy-" + name))
        assert st.st_uid == qpytest.pwd.getpwnam("qpyl").pw_uid
        with open(os.path.join(d, "env", "QPY_ROOT")) as f:
            assert f.read() == host.root + "\n"
    # the commented tcpserver variant names the real programs too
    with open(os.path.join(host.svdir, "qpy-smtpd", "run")) as f:
        assert "# exec envdir ./env tcpserver" in f.read()
    units = sorted(glob.glob(os.path.join(host.svdir, "systemd", "*")))
    assert [os.path.basename(u) for u in units] == [
        "qpy-authd.service", "qpy-pickup.service", "qpy-send.service", "qpy-smtpd.service",
        "qpy.target"]
    for u in units:
        with open(u) as f:
            text = f.read()
        assert "@" not in text
        if u.endswith(".service"):
            assert "ExecReload=/bin/kill -HUP $MAINPID" in text
            assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
            assert "CapabilityBoundingSet=" in text and "RestrictAddressFamilies=" in text
        r = subprocess.run(["systemd-analyze", "verify", u], capture_output=True, text=True,
                           timeout=60, cwd=os.path.dirname(u))
        assert r.returncode == 0, r.stderr
        # unknown keys and bad values are only warnings: none may name our file
        assert os.path.basename(u) not in r.stderr, r.stderr
    pickup = open(os.path.join(host.svdir, "systemd", "qpy-pickup.service")).read()
    assert "User=qpyq" in pickup and "\nCapabilityBoundingSet=\n" in pickup


def test_one_user_root_service_files_name_that_user():
    pw = qpytest.make_user("ou1")
    base = qpytest.scratch_dir("oneuser")
    os.chown(base, pw.pw_uid, pw.pw_gid)
    root, svdir = os.path.join(base, "qpy"), os.path.join(base, "sv")
    try:
        r = subprocess.run(["setpriv", "--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid),
                            "--init-groups", qpytest.bin_path("qpy-install"), root, "--me",
                            "one.example", "--supervise", svdir],
                           capture_output=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        with open(os.path.join(svdir, "qpy-send", "log", "run")) as f:
            assert "exec setuidgid %s multilog t" % pw.pw_name in f.read()
        with open(os.path.join(svdir, "systemd", "qpy-pickup.service")) as f:
            assert "\nUser=%s\n" % pw.pw_name in f.read()
        assert os.stat(os.path.join(root, "log", "qpy-send")).st_uid == pw.pw_uid
    finally:
        qpytest.remove_tree(base)


def _unit_caps(host: Host, unit: str) -> str:
    with open(os.path.join(host.svdir, "systemd", unit)) as f:
        caps = re.search(r"^CapabilityBoundingSet=(.*)$", f.read(), re.M).group(1).split()
    return ",".join(["-all"] + ["+" + c[4:].lower() for c in caps])


def test_units_capability_sets_are_enough(host):
    """Run send and pickup as their systemd units would (bounding set, no new
    privileges, pickup as qpyq) and see mail delivered."""
    log = open(os.path.join(host.root, "log", "caps.log"), "wb")
    base = ["setpriv", "--no-new-privs"]
    send = subprocess.Popen(base + ["--bounding-set", _unit_caps(host, "qpy-send.service"),
                                    qpytest.bin_path("qpy-start"), host.root, "--only", "send"],
                            env=host.qroot.env(), stdout=log, stderr=subprocess.STDOUT)
    qpyq = qpytest.pwd.getpwnam("qpyq")
    pickup = subprocess.Popen(base + ["--bounding-set", _unit_caps(host, "qpy-pickup.service"),
                                      "--reuid", str(qpyq.pw_uid), "--regid", str(qpyq.pw_gid),
                                      "--init-groups", qpytest.bin_path("qpy-pickup")],
                              env=host.qroot.env(), stdout=log, stderr=subprocess.STDOUT)
    smtpd = subprocess.Popen(base + ["--bounding-set", _unit_caps(host, "qpy-smtpd.service"),
                                     qpytest.bin_path("qpy-start"), host.root, "--only",
                                     "smtpd"],
                             env=host.qroot.env(), stdout=log, stderr=subprocess.STDOUT)
    r = host.qroot.run("qpy-passwd", host.root, "capsuser", input=b"pw-123456\npw-123456\n")
    assert r.returncode == 0, r.stderr
    qpyauth = qpytest.pwd.getpwnam("qpyauth")
    authd = subprocess.Popen(base + ["--bounding-set", _unit_caps(host, "qpy-authd.service"),
                                     "--reuid", str(qpyauth.pw_uid), "--regid",
                                     str(qpyauth.pw_gid), "--init-groups",
                                     qpytest.bin_path("qpy-authd"), host.root],
                             env=host.qroot.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        sock = os.path.join(host.root, "queue", "run", "auth", "socket")
        assert qpytest.wait_for(lambda: os.path.exists(sock), timeout=60), \
            open(log.name, "rb").read()[-3000:]
        host.sendmail("caps")
        assert qpytest.wait_for(lambda: host.subjects() == ["caps"], timeout=60), \
            open(log.name, "rb").read()[-3000:]

        def smtp_ok() -> bool:
            try:
                host.smtp("caps-smtp")
                return True
            except OSError:
                return False
        assert qpytest.wait_for(smtp_ok, timeout=60), open(log.name, "rb").read()[-3000:]
        assert qpytest.wait_for(lambda: "caps-smtp" in host.subjects(), timeout=60)
    finally:
        qpytest.stop(authd, smtpd, pickup, send, timeout=90)
        log.close()


def ucspi_variant(host: Host, port: int) -> str:
    """A service dir whose run script is qpy-smtpd/run's commented tcpserver variant."""
    src = os.path.join(host.svdir, "qpy-smtpd")
    dst = os.path.join(host.svdir, "qpy-smtpd-ucspi")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("supervise"))
    with open(os.path.join(src, "run")) as f:
        text = f.read()
    head, _, variant = text.partition("\n#\n")
    lines = [ln[2:] for ln in variant.splitlines() if ln.startswith("# ")]
    assert any(ln.startswith("exec envdir ./env tcpserver ") for ln in lines), lines
    script = "#!/bin/sh\nexec 2>&1\n" + "\n".join(lines).replace(" 127.0.0.1 25 ",
                                                                  " 127.0.0.1 %d " % port)
    with open(os.path.join(dst, "run"), "w") as f:
        f.write(script + "\n")
    logrun = os.path.join(dst, "log", "run")
    with open(logrun) as f:
        text = f.read().replace("/log/qpy-smtpd\n", "/log/qpy-smtpd-ucspi\n")
    with open(logrun, "w") as f:
        f.write(text)
    logdir = os.path.join(host.root, "log", "qpy-smtpd-ucspi")
    os.mkdir(logdir)
    qpyl = qpytest.pwd.getpwnam("qpyl")
    os.chown(logdir, qpyl.pw_uid, qpyl.pw_gid)
    return dst


def test_daemontools(host):
    scan = Scan(host, ("send", "pickup", "smtpd"))
    try:
        # every expected service comes up under the right uids
        r = qpytest.wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(
            host.status("--svdir", scan.dir)), timeout=60)
        assert r is not None, host.status("--svdir", scan.dir).stdout
        out = r.stdout.decode()
        for prog in ("qpy-queue-send", "qpy-clean", "qpy-lspawn", "qpy-rspawn", "qpy-pickup",
                     "qpy-tcpserver"):
            assert re.search(r"^  %s .* ok " % prog, out, re.M), out
        assert "WRONG" not in out
        uids = {p.name(): p.uids().real for p in scan.processes() if p.is_running()}
        assert uids["multilog"] == qpytest.pwd.getpwnam("qpyl").pw_uid
        sends = [p for p in scan.processes() if p.cmdline()[:1] == ["qpy-queue-send"]]
        assert [p.uids().real for p in sends] == [qpytest.pwd.getpwnam("qpys").pw_uid]

        # mail over SMTP and through qpy-sendmail is delivered
        host.smtp("over-smtp")
        host.sendmail("over-sendmail")
        assert qpytest.wait_for(lambda: sorted(host.subjects()) == ["over-sendmail",
                                                                     "over-smtp"], timeout=60)
        # multilog: every line stamped, qmail-log words inside, qpy-logsum reads it
        assert qpytest.wait_for(lambda: host.log().count(b": success: ") >= 2, timeout=30)
        lines = host.log().splitlines()
        assert lines and all(TAI64N_LINE.match(ln) for ln in lines)
        assert any(b"qpy-start" in ln for ln in host.log("smtpd").splitlines())
        summary = host.qroot.run("qpy-logsum", os.path.join(host.root, "log", "qpy-send",
                                                             "current")).stdout.decode()
        assert "\n  success: 2\n" in summary.split("day: total")[1]

        # svc -h: control files re-read (qpy-send), recipient table rebuilt (qpy-smtpd)
        scan.svc("-h", "send")
        assert qpytest.wait_for(lambda: b"info: control files re-read" in host.log(), 30)
        newcomer = qpytest.make_user("sv2", home=os.path.join(os.path.dirname(host.home),
                                                               "sv2"))
        rcpt2 = newcomer.pw_name + "@test.example"
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            host.smtp("too-early", rcpt2)
        scan.svc("-h", "smtpd")

        def accepted() -> bool:
            try:
                host.smtp("after-hup", rcpt2)
                return True
            except smtplib.SMTPRecipientsRefused:
                return False
        assert qpytest.wait_for(accepted, timeout=30)

        # svc -a: a deferred local delivery (qmail retries it ~100 s later) goes now
        host.break_maildir(True)
        host.sendmail("deferred-then-alarm")
        assert qpytest.wait_for(host.deferred_id, timeout=30)
        host.break_maildir(False)
        scan.svc("-a", "send")
        assert qpytest.wait_for(lambda: "deferred-then-alarm" in host.subjects(), timeout=60)
        # qpy-qretry does the same
        host.break_maildir(True)
        host.sendmail("deferred-then-qretry")
        assert qpytest.wait_for(host.deferred_id, timeout=30)
        host.break_maildir(False)
        assert host.qroot.run("qpy-qretry", host.root).returncode == 0
        assert qpytest.wait_for(lambda: "deferred-then-qretry" in host.subjects(), timeout=60)

        # qpy-qrm: a deferred message is removed through queue-send, logged, not bounced
        host.break_maildir(True)
        host.sendmail("to-be-removed")
        msgid = qpytest.wait_for(host.deferred_id, timeout=30)
        assert msgid
        r = host.qroot.run("qpy-qrm", host.root, msgid)
        assert r.returncode == 0, r.stderr
        assert qpytest.wait_for(lambda: host.qstat() == b"messages in queue: 0\n"
                                b"messages in queue but not yet preprocessed: 0\n", timeout=30)
        assert qpytest.wait_for(
            lambda: b"remove msg %s by qpy-qrm" % msgid.encode() in host.log(), timeout=30)
        assert b"bounce msg %s" % msgid.encode() not in host.log()
        host.break_maildir(False)
        assert "to-be-removed" not in host.subjects()

        # the commented ucspi-tcp variant of qpy-smtpd/run, made live on a second port
        port2 = qpytest.free_port()
        ucspi = ucspi_variant(host, port2)
        os.symlink(ucspi, os.path.join(scan.dir, "qpy-smtpd-ucspi"))   # svscan: within 5 s

        def ucspi_ok() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", port2, timeout=30) as c:
                    c.sendmail("sender@far.example", [host.rcpt],
                               "Subject: via-ucspi-tcpserver\r\n\r\nhi\r\n")
                return True
            except OSError:
                return False
        assert qpytest.wait_for(ucspi_ok, timeout=60), host.log("smtpd-ucspi")
        assert qpytest.wait_for(lambda: "via-ucspi-tcpserver" in host.subjects(), timeout=60)
        tcpservers = [p for p in scan.processes() if p.name() == "tcpserver"]
        assert [p.uids().real for p in tcpservers] == [qpytest.pwd.getpwnam("qpyd").pw_uid]
        assert qpytest.wait_for(lambda: b"tcpserver: status:" in host.log("smtpd-ucspi"), 30)

        # svc -d: stopped on purpose; qpy-status says so; mail waits in drop/ meanwhile
        scan.svc("-d", "pickup")
        assert qpytest.wait_for(lambda: "down" in scan.svstat("pickup"), timeout=30)
        r = qpytest.wait_for(lambda: (lambda r: r if b"\n  qpy-pickup" not in r.stdout
                                      else None)(host.status("--svdir", scan.dir)), timeout=60)
        assert r.returncode == 2, r.stdout.decode()
        assert b"service pickup: DOWN, supervise says down" in r.stdout, r.stdout.decode()
        host.sendmail("while-pickup-down")
        assert host.qstat() == (b"messages in queue: 1\n"
                                b"messages in queue but not yet preprocessed: 1\n")
        scan.svc("-u", "pickup")
        assert qpytest.wait_for(lambda: "while-pickup-down" in host.subjects(), timeout=60)

        # svc -d on the queue core: a clean stop, logged, every part gone
        scan.svc("-d", "send")
        assert qpytest.wait_for(lambda: b"status: exiting" in host.log(), timeout=120)
        assert qpytest.wait_for(lambda: "down" in scan.svstat("send"), timeout=120)

        def core() -> list[str]:
            return [ln for ln in host.status().stdout.decode().splitlines()
                    if ln.startswith(("  qpy-queue-send", "  qpy-lspawn", "  qpy-clean",
                                      "  qpy-rspawn"))]
        assert qpytest.wait_for(lambda: not core(), timeout=30), core()
    finally:
        scan.stop()


@contextlib.contextmanager
def _start(host):
    """qpy-start on host's root, its output in log/start.log; stopped at the end."""
    out = open(os.path.join(host.root, "log", "start.log"), "wb")
    start = host.qroot.start("qpy-start", host.root, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield start
    finally:
        qpytest.stop(start, timeout=90)
        out.close()


def test_qpy_start_restarts_each_killed_program_and_loses_nothing(host):
    sent: list[str] = []
    with _start(host):
        assert qpytest.wait_for(lambda: host.status().returncode == 0, timeout=60), \
            host.status().stdout
        run = host.qroot.paths.run
        for prog in ("queue-send", "clean", "lspawn", "rspawn", "pickup", "tcpserver"):
            pidfile = os.path.join(run, prog + ".pid")
            old = int(open(pidfile).read())
            for i in range(2):
                sent.append("%s-before-%d" % (prog, i))
                host.sendmail(sent[-1])
            os.kill(old, signal.SIGKILL)
            for i in range(2):
                sent.append("%s-after-%d" % (prog, i))
                host.sendmail(sent[-1])

            def back(pidfile: str = pidfile, old: int = old, prog: str = prog) -> bool:
                try:
                    pid = int(open(pidfile).read())
                    return pid != old and \
                        psutil.Process(pid).cmdline()[0].split()[0] == "qpy-" + prog
                except (OSError, ValueError, IndexError, psutil.Error):
                    return False
            assert qpytest.wait_for(back, timeout=90), "qpy-%s did not come back" % prog
        # the listener is back too
        assert qpytest.wait_for(lambda: host.status().returncode == 0, timeout=60)
        sent.append("smtp-at-end")
        host.smtp(sent[-1])
        assert qpytest.wait_for(lambda: set(host.subjects()) >= set(sent), timeout=120), \
            sorted(set(sent) - set(host.subjects()))
        got = host.subjects()
        dups = sorted({s for s in got if got.count(s) > 1})
        print("qpy-start kill test: %d messages, %d duplicate deliveries %s"
              % (len(sent), len(got) - len(set(got)), dups))
        assert set(host.subjects()) == set(sent)


def test_authd_starts_once_configured_and_its_files_are_looked_at_once_a_second(host):
    """qpy-start looks at authd's files (control/checkpassword, control/dovecotauth,
    auth/passwd) once a second while authd is not running, not at every line it
    collects from its children's logs: mail flows, the first qpy-passwd still starts
    authd within seconds."""
    with _start(host) as start:
        assert qpytest.wait_for(lambda: host.status().returncode == 0, timeout=60), \
            host.status().stdout
        pidfile = os.path.join(host.qroot.paths.run, "authd.pid")
        assert not os.path.exists(pidfile)
        sent = ["auth-look-%d" % i for i in range(10)]
        looks, seconds, lines = _stats_of(
            start.pid, lambda: [host.sendmail(s) for s in sent], 2.0)
        assert qpytest.wait_for(lambda: set(host.subjects()) >= set(sent), timeout=120)
        # a look is three stats, at most one a second; it used to be one for every
        # wake by a log line (qpy-pickup, qpy-queue-send, ... for each message)
        assert lines >= 2 * len(sent), lines
        assert 0 < looks <= 3 * (seconds + 2), (looks, seconds)
        tlshelp.set_password(host.qroot, "alice", "s3cret")
        assert qpytest.wait_for(lambda: os.path.exists(pidfile), timeout=10)


def _stats_of(pid: int, work, settle: float) -> tuple[int, float, int]:
    """While work() runs and settle seconds after, under strace: the stats of authd's
    files by pid, the seconds traced, and the log lines pid read from its children."""
    log = os.path.join(tempfile.mkdtemp(prefix="qpystrace"), "trace")
    tracer = subprocess.Popen(["strace", "-q", "-e", "trace=stat,newfstatat,statx,read",
                               "-e", "read=none", "-s", "65536", "-p", str(pid), "-o", log])
    try:
        time.sleep(1.0)                 # strace attached
        began = time.monotonic()
        work()
        time.sleep(settle)
        seconds = time.monotonic() - began + 1.0
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    with open(log) as f:
        text = f.read()
    shutil.rmtree(os.path.dirname(log), ignore_errors=True)
    stats = "\n".join(line for line in text.splitlines() if not line.startswith("read("))
    looks = sum(stats.count(n) for n in ("checkpassword", "dovecotauth", "auth/passwd"))
    # one read may carry the lines of many programs and messages (qpy-start reads its
    # pipes in rounds under load): each line starts with its program's name
    reads = re.findall(r'read\(\d+, "(qpy-.*)", \d+\) = \d+', text)
    return looks, seconds, sum(len(re.findall(r'(?:^|\\n)qpy-', r)) for r in reads)
