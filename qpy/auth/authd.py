"""qpy-authd — the password checker behind SMTP AUTH; answers yes or no.

SYNOPSIS
    qpy-authd [ROOT]            (ROOT defaults to $QPY_ROOT, else /var/qpy)

RUNS AS
    qpyauth (started as root by qpy-start, it drops at once). Resident.

READS
    ROOT/auth/passwd — salted scrypt hashes (qpy.common.authdb), owner qpyauth,
    mode 0600 in a 0700 directory: nobody else, and in particular not qpyd,
    can read it. Re-read whenever it changes (qpy-passwd needs no restart).
    ROOT/control/checkpassword — when present, its first line names a program
    (with arguments) speaking the checkpassword interface: `user\\0password\\0
    timestamp\\0` on fd 3, exit 0 accepts, 1 refuses, anything else is a
    temporary failure. It then replaces the password file.
    ROOT/control/dovecotauth — when present (and no checkpassword), the path of
    a Dovecot auth socket (auth-client protocol, as Postfix's SASL uses it;
    the unix_listener must let qpyauth connect): Dovecot checks, qpy-authd
    still counts, delays and locks out. Both re-read on SIGHUP.

LISTENS
    ROOT/queue/run/auth/socket, a Unix stream socket. Its directory is
    qpyauth:qpyd 0750, and every connection's peer uid (SO_PEERCRED) must be
    qpyd's: no other user can ask. One request per connection
    (qpy.common.authdb), one answer line: Y, N, L (locked out) or T.

SECURITY
    qpyd never sees a hash; the most a compromised qpyd can do is guess, and
    guessing is slow here, and the penalties fall on the guesser, never on
    everyone:
      per client address (IPv4: the address; IPv6: its /64): every refusal is
      delayed FAIL_DELAY (1 s); checks for one address are done one at a
      time; after LOCK_AFTER (5) failures within FAIL_WINDOW (900 s) the
      address is locked (answer L, no check at all) for LOCK_SECONDS (900 s).
      per account (the user name asked for, known or not): once it has
      ACCOUNT_FREE (10) failures within ACCOUNT_WINDOW (900 s), from any
      addresses, every check for it waits ACCOUNT_DELAY (0.25 s), doubled for
      each further ACCOUNT_FREE failures, at most ACCOUNT_DELAY_MAX (3 s), as
      Dovecot's auth penalty grows: cycling client addresses slows down.
    There is no global refusal: the right password from an address without
    failures is accepted within ACCOUNT_DELAY_MAX plus one check, whatever
    other clients do. The waits hold no connection slot. Memory is bounded:
    at most MAX_TRACKED (10,000) addresses and as many accounts are
    remembered, the least recently failed forgotten first.
    Unknown users cost the same scrypt work as known ones.

LOG
    one line per answer: `auth ok|failed|locked|tempfail user U from IP`.

EXIT CODES
    0 after SIGTERM; 111 when the socket cannot be set up.

NOTES
    This module is over 400 lines (407, 57 of them this page): the three password
    backends and the per-address and per-account penalties share one request path.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import math
import os
import shlex
import signal
import socket
import struct
import sys
import time

from qpy.common import authdb, unixsock
from qpy.common.control import Control
from qpy.common.exits import EXIT_TEMP
from qpy.common.log import clean, log
from qpy.common.privilege import preamble, resolve_user, user_ids
from qpy.common.queue import root_from

PROGRAM = "qpy-authd"
FAIL_DELAY = 1.0            # seconds before a refusal is answered
LOCK_AFTER = 5              # failures per address within FAIL_WINDOW that lock it
FAIL_WINDOW = 900.0
LOCK_SECONDS = 900.0
ACCOUNT_FREE = 10           # failures per account within ACCOUNT_WINDOW before a delay
ACCOUNT_WINDOW = 900.0
ACCOUNT_DELAY = 0.25        # seconds, doubled for each further ACCOUNT_FREE failures
ACCOUNT_DELAY_MAX = 3.0     # a legitimate user never waits longer for the account
MAX_TRACKED = 10000         # addresses and accounts remembered (oldest forgotten first)
MAX_CONNECTIONS = 64        # checks run at once (the waits are not counted)
REQUEST_TIMEOUT = 10.0
CHECKPASSWORD_TIMEOUT = 10.0
DOVECOT_TIMEOUT = 10.0      # per line from Dovecot's auth socket
MAX_DOVECOT_LINES = 100     # handshake lines before DONE
_IP_CHARS = frozenset(b"0123456789abcdefABCDEF.:")
SOCKET_MODE = 0o666         # access is the directory's and SO_PEERCRED's job


def client_key(ip: str) -> str:
    """The unit that is counted: the address, or its /64 for IPv6."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network("%s/64" % addr, strict=False))
    return str(addr)


class Limiter:
    """Failure counts per client key and per account, the lockout, the account delay."""

    def __init__(self) -> None:
        self.fails: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self.accounts: collections.OrderedDict[bytes, collections.deque[float]] = \
            collections.OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}

    def _window(self, key: str, now: float) -> list[float]:
        times = [t for t in self.fails.get(key, []) if now - t < max(FAIL_WINDOW, LOCK_SECONDS)]
        if times:
            self.fails[key] = times
        else:
            self.fails.pop(key, None)
        return times

    def locked(self, key: str, now: float) -> bool:
        times = self._window(key, now)
        in_window = [t for t in times if times[-1] - t < FAIL_WINDOW]
        return len(in_window) >= LOCK_AFTER and now - times[-1] < LOCK_SECONDS

    def account_delay(self, user: bytes, now: float) -> float:
        """Seconds every check for this account waits, from its recent failures."""
        times = self.accounts.get(user)
        while times and now - times[0] >= ACCOUNT_WINDOW:
            times.popleft()
        if not times:
            self.accounts.pop(user, None)
            return 0.0
        steps = len(times) // ACCOUNT_FREE
        return 0.0 if steps == 0 else min(ACCOUNT_DELAY * 2 ** (steps - 1), ACCOUNT_DELAY_MAX)

    def failed(self, key: str, user: bytes, now: float) -> None:
        self.fails.setdefault(key, []).append(now)
        self.fails.move_to_end(key)
        while len(self.fails) > MAX_TRACKED:
            self.fails.popitem(last=False)
        # enough failure times to reach ACCOUNT_DELAY_MAX; older ones change nothing
        cap = ACCOUNT_FREE * (2 + int(math.log2(ACCOUNT_DELAY_MAX / ACCOUNT_DELAY)))
        self.accounts.setdefault(user, collections.deque(maxlen=cap)).append(now)
        self.accounts.move_to_end(user)
        while len(self.accounts) > MAX_TRACKED:
            self.accounts.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self.fails.pop(key, None)

    def lock_for(self, key: str) -> asyncio.Lock:
        if key not in self.locks:
            self.locks[key] = asyncio.Lock()
        return self.locks[key]


class Passwords:
    """The password file, re-read when its identity or size or time changes."""

    def __init__(self, path: str):
        self.path = path
        self.stamp: tuple[int, ...] | None = None
        self.table: dict[bytes, str] = {}

    def get(self, user: bytes) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self.stamp is not None or not isinstance(e, FileNotFoundError):
                log("cannot stat %s: %s" % (self.path, e.strerror))
            self.stamp, self.table = None, {}
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self.stamp:
            try:
                with open(self.path, "rb") as f:
                    self.table = authdb.parse_passwd(f.read(authdb.MAX_PASSWD_FILE))
                self.stamp = stamp
            except OSError as e:
                log("cannot read %s: %s" % (self.path, e.strerror))
                self.table = {}
        return self.table.get(user)


# Costs the same as a real check, so unknown users cannot be told from wrong passwords.
DUMMY_HASH = authdb.make_hash(b"no such user")


class Checker:
    def __init__(self, root: str):
        self.root = root
        self.control = Control(root)
        self.passwords = Passwords(authdb.passwd_path(root))
        self.checkpassword: list[str] = []
        self.dovecot = ""
        self.reload()

    def reload(self) -> None:
        self.control.reload()
        lines = self.control.lines("checkpassword")
        self.checkpassword = shlex.split(lines[0]) if lines else []
        lines = self.control.lines("dovecotauth")
        self.dovecot = lines[0] if lines else ""
        if self.checkpassword:
            backend = "checkpassword " + clean(" ".join(self.checkpassword))
        elif self.dovecot:
            backend = "dovecot " + clean(self.dovecot)
        else:
            backend = "passwd file"
        log("backend %s" % backend)

    async def check(self, user: bytes, password: bytes, ip: str) -> bytes:
        if self.checkpassword:
            return await self._checkpassword(user, password)
        if self.dovecot:
            return await self._dovecot(user, password, ip)
        stored = self.passwords.get(user)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, authdb.check_hash, password,
                                        stored or DUMMY_HASH)
        return authdb.YES if ok and stored else authdb.NO

    async def _checkpassword(self, user: bytes, password: bytes) -> bytes:
        r, w = os.pipe()
        try:
            # fd 3 is the checkpassword interface; the shell puts the pipe there.
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh",
                *self.checkpassword, "/bin/true",
                stdin=r, stdout=asyncio.subprocess.DEVNULL, close_fds=True,
                env={"PATH": "/usr/bin:/bin"}, cwd="/")
        except OSError as e:
            os.close(r)
            os.close(w)
            log("cannot run checkpassword: %s" % e.strerror)
            return authdb.TEMP
        os.close(r)
        try:
            os.write(w, user + b"\0" + password + b"\0" + b"%d\0" % time.time())
        except OSError:
            pass
        os.close(w)
        try:
            code = await asyncio.wait_for(proc.wait(), CHECKPASSWORD_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log("checkpassword timed out")
            return authdb.TEMP
        return {0: authdb.YES, 1: authdb.NO}.get(code, authdb.TEMP)


    async def _dovecot(self, user: bytes, password: bytes, ip: str) -> bytes:
        """One PLAIN check over Dovecot's auth-client protocol (version 1)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.dovecot), DOVECOT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log("cannot connect to dovecot at %s: %s" % (clean(self.dovecot),
                                                           clean(str(e))))
            return authdb.TEMP
        try:
            writer.write(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
            for _ in range(MAX_DOVECOT_LINES):
                line = await asyncio.wait_for(reader.readline(), DOVECOT_TIMEOUT)
                if not line or (line.startswith(b"VERSION\t")
                                and not line.startswith(b"VERSION\t1\t")):
                    return authdb.TEMP
                if line == b"DONE\n":
                    break
            else:
                return authdb.TEMP
            resp = base64.b64encode(b"\0" + user + b"\0" + password)
            raw_ip = ip.encode("ascii")
            rip = b"\trip=" + raw_ip if raw_ip and set(raw_ip) <= _IP_CHARS else b""
            writer.write(b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tsecured%s\tresp=%s\n"
                         % (rip, resp))
            fields = (await asyncio.wait_for(reader.readline(), DOVECOT_TIMEOUT)).split(b"\t")
            fields[-1] = fields[-1].rstrip(b"\n")
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            return authdb.TEMP
        finally:
            writer.close()
        if fields[:2] == [b"OK", b"1"]:
            return authdb.YES
        if fields[:2] == [b"FAIL", b"1"] and b"temp" not in fields[2:]:
            return authdb.NO
        return authdb.TEMP


class Server:
    def __init__(self, root: str, allowed_uid: int):
        self.checker = Checker(root)
        self.limiter = Limiter()
        self.allowed_uid = allowed_uid
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            if uid != self.allowed_uid:
                log("refused connection from uid %d pid %d" % (uid, pid))
                return
            answer = await asyncio.wait_for(self.answer(reader), REQUEST_TIMEOUT * 3)
            writer.write(answer + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a resident checker never dies of one request
            log("internal error: %s" % clean(repr(e)))
        finally:
            writer.close()

    async def answer(self, reader: asyncio.StreamReader) -> bytes:
        data = b""
        while len(data) <= authdb.MAX_REQUEST:
            chunk = await asyncio.wait_for(reader.read(4096), REQUEST_TIMEOUT)
            if not chunk:
                break
            data += chunk
        request = authdb.decode_request(data)
        if request is None:
            log("malformed request")
            return authdb.TEMP
        user, password, ip = request
        key = client_key(ip)
        who = "user %s from %s" % (clean(user), clean(ip))
        async with self.limiter.lock_for(key):
            now = time.monotonic()
            if self.limiter.locked(key, now):
                log("auth locked %s" % who)
                return authdb.LOCKED
            delay = self.limiter.account_delay(user, now)
            if delay:
                await asyncio.sleep(delay)      # holds no slot: others are checked
            async with self.slots:              # bounds the checks run at once
                result = await self.checker.check(user, password, ip)
            if result == authdb.YES:
                self.limiter.succeeded(key)
                log("auth ok %s" % who)
            elif result == authdb.NO:
                self.limiter.failed(key, user, time.monotonic())
                log("auth failed %s" % who)
                await asyncio.sleep(FAIL_DELAY)
            else:
                log("auth tempfail %s" % who)
        if len(self.limiter.locks) > MAX_TRACKED:
            self.limiter.locks = {k: v for k, v in self.limiter.locks.items() if v.locked()}
        return result


def listen(path: str) -> socket.socket:
    # by a short name: a root's path may push the full one past sun_path's 108 bytes
    sock = unixsock.bind(os.path.dirname(path), os.path.basename(path),
                         socket.SOCK_STREAM, SOCKET_MODE)
    sock.listen(128)
    return sock


async def serve(root: str, allowed_uid: int) -> None:
    server = Server(root, allowed_uid)
    path = authdb.socket_path(root)
    try:
        sock = listen(path)
    except OSError as e:
        log("cannot listen on %s: %s" % (path, e.strerror))
        raise SystemExit(EXIT_TEMP)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.checker.reload)
    srv = await asyncio.start_unix_server(server.handle, sock=sock)
    log("listening on %s" % path)
    await stop.wait()
    srv.close()
    try:
        os.unlink(path)
    except OSError:
        pass
    log("exiting")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = root_from(args[:1])
    preamble(PROGRAM, root, "qpyauth")
    try:
        allowed = user_ids(resolve_user(root, "qpyd"))[0]
    except KeyError:
        log("no user qpyd")
        return EXIT_TEMP
    asyncio.run(serve(root, allowed))
    return 0
