"""Pickup's door: qpy-smtpd hands each message to qpy-pickup as a sealed memfd, and
says 250 only once pickup has made it durable and named its queue id (issue 18).

The door is tried as a hostile qpyd would try it: other uids, garbage, descriptors
that are not sealed, that lie about their lengths, two at once; a big message and a
pickup that is not running take the drop directory instead; pickup killed while
sessions hand mail in loses nothing that got its 250.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import time

import qpytest
from qpytest import maildir_messages, needs_root, wait_for
from smtphelp import Client, Listener
from test_send import Qpy, user

from qpy.common import door, dropfile, envelope, unixsock
from qpy.common.queue import is_id

pytestmark = [needs_root]
ME = "test.example"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def smtp_system(qroot) -> tuple[Qpy, int]:
    port = qpytest.free_port()
    qroot.control("smtplisten", "127.0.0.1:%d" % port)
    q = Qpy(qroot)
    assert wait_for(lambda: _listening(port), 30), q.log()
    # pickup opens its door a moment after qpy-tcpserver listens: until then mail
    # goes by drop files (tested below), so these tests wait for it
    sock = os.path.join(door.directory(qroot.path), door.LEAF)
    assert wait_for(lambda: os.path.exists(sock), 30), q.log()
    return q, port


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def send(port: int, rcpt: str, body: bytes, subject: str = "door") -> bytes:
    """One message in one session; the reply to its final dot."""
    c = Client(port)
    try:
        c.hello()
        assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<%s>" % rcpt.encode()).startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        return c.cmd(b"Subject: %s\r\n\r\n%s\r\n." % (subject.encode(), body))
    finally:
        c.close()


def memfd(data: bytes, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def good_message(rcpt: bytes) -> bytes:
    return dropfile.build(os.getpid(), b"Subject: by hand\n\nhi\n",
                          envelope.encode(b"a@b.example", [rcpt]))


def knock(root: str) -> socket.socket:
    return unixsock.connect(door.directory(root), door.LEAF, socket.SOCK_SEQPACKET, 20)


def ask(conn: socket.socket, fds: list[int], data: bytes = door.REQUEST) -> bytes:
    socket.send_fds(conn, [data], fds)
    return conn.recv(door.MAX_DATAGRAM)


def knock_as(ids: list[str], path: str, then: str) -> subprocess.CompletedProcess:
    """A SEQPACKET socket made by another identity (setpriv IDS), then `then` with it."""
    return subprocess.run(["setpriv", *ids, qpytest.PYTHON, "-c",
                           "import socket,sys\n"
                           "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n" + then,
                           path], capture_output=True, timeout=30)


def test_smtp_message_goes_through_the_door_with_one_id(qroot):
    pw = user("da", qroot)
    q, port = smtp_system(qroot)
    reply = send(port, "qtda@%s" % ME, b"through the door")
    m = re.match(rb"250 2\.0\.0 Ok: queued as (\S+)", reply)
    assert m and is_id(m.group(1).decode()), reply
    qid = m.group(1).decode()
    # pickup took it from the door, not from a drop file, under the id the client saw
    q.wait_log(r"pickup msg %s: uid %d bytes \d+ \(door\)" % (qid, pwd.getpwnam("qpyd").pw_uid))
    q.wait_log(r"new msg %s" % qid)
    assert wait_for(lambda: maildir_messages(pw), 30), q.log()
    got = maildir_messages(pw)[0]
    assert "through the door" in got.get_content()
    # one id everywhere: pickup's Received: line and qpy-smtpd's carry the id of the 250
    received = got.get_all("Received")
    assert "invoked from network" in received[0] and "id %s" % qid in received[0], received
    assert "id %s" % qid in received[1], received


def test_door_refuses_strangers_and_lies(qroot):
    q, _ = smtp_system(qroot)
    path = os.path.join(door.directory(qroot.path), door.LEAF)
    assert wait_for(lambda: os.path.exists(path), 20), q.log()
    st = os.stat(door.directory(qroot.path))
    assert (st.st_mode & 0o7777, st.st_gid) == (0o750, pwd.getpwnam("qpyd").pw_gid)
    # a uid outside group qpyd cannot even reach the socket
    r = knock_as(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"], path,
                 "try: s.connect(sys.argv[1])\n"
                 "except PermissionError: sys.exit(13)\n")
    assert r.returncode == 13, r
    # a uid that reaches it (group qpyd) but is not qpyd: shut out by SO_PEERCRED
    stranger = qpytest.make_user("dstr")
    r = knock_as(["--reuid", str(stranger.pw_uid), "--regid", str(stranger.pw_gid),
                  "--groups", str(pwd.getpwnam("qpyd").pw_gid)], path,
                 "s.connect(sys.argv[1]); s.settimeout(20)\n"
                 "sys.exit(0 if s.recv(10) == b'' else 1)\n")
    assert r.returncode == 0, r
    q.wait_log(r"door: refused a connection from uid %d" % stranger.pw_uid)

    rcpt = b"postmaster@" + ME.encode()
    conn = knock(qroot.path)
    assert ask(conn, [memfd(good_message(rcpt), seal=False)]).startswith(b"D not sealed")
    liar = good_message(rcpt)[:-5]             # lengths that do not add up
    assert ask(conn, [memfd(liar)]).startswith(b"D ")
    # an envelope the strict parser refuses: pickup's check, before it answers (qpy-smtpd
    # hands its envelope in unchecked and relies on this one, ahead of its 250)
    bad = dropfile.build(os.getpid(), b"Subject: bad\n\nhi\n",
                         envelope.encode(b"a@b.example", [b"x@[bad"]))
    assert ask(conn, [memfd(bad)]) == b"D bad address: bad address literal"
    with open(os.path.join(os.path.dirname(qroot.path), "plain"), "wb+") as f:
        f.write(good_message(rcpt))
        f.flush()
        assert ask(conn, [f.fileno()]).startswith(b"D not sealed")
    # the same connection still works for an honest message
    answer = ask(conn, [memfd(good_message(rcpt))])
    assert answer.startswith(b"K ") and is_id(answer[2:].decode()), answer
    q.wait_log(r"new msg %s" % answer[2:].decode())
    # protocol breaches close the connection, and pickup goes on
    for fds, data in (([], door.REQUEST), ([memfd(b"x"), memfd(b"y")], door.REQUEST),
                      ([memfd(good_message(rcpt))], b"GIVE")):
        c = knock(qroot.path)
        socket.send_fds(c, [data], fds) if fds else c.send(data)
        assert c.recv(door.MAX_DATAGRAM) == b"", (fds, data)
        c.close()
    conn2 = knock(qroot.path)
    assert ask(conn2, [memfd(good_message(rcpt))]).startswith(b"K ")
    assert q.pid("pickup") and "Traceback" not in q.log()


def test_without_pickup_smtp_mail_waits_in_drop(qroot):
    s = Listener(qroot)
    try:
        reply = send(s.port, "postmaster@%s" % ME, b"pickup is down")
        name = re.match(rb"250 2\.0\.0 Ok: queued as (\S+)", reply).group(1).decode()
        assert dropfile.is_final_name(name) and name in os.listdir(qroot.paths.drop)
    finally:
        s.stop()


def test_big_message_goes_by_drop_file_and_arrives_whole(qroot):
    pw = user("db", qroot)
    q, port = smtp_system(qroot)
    body = b"\r\n".join(b"%07d " % i + b"y" * 70 for i in range(70_000))   # ~5.4 MB
    reply = send(port, "qtdb@%s" % ME, body, subject="big")
    assert reply.startswith(b"250"), reply
    q.wait_log(r"pickup msg \d+: uid \d+ bytes \d+\n")    # by its drop file, not the door
    assert wait_for(lambda: maildir_messages(pw), 60), q.log()
    got = maildir_messages(pw)[0].get_payload(decode=True)
    assert got.replace(b"\r\n", b"\n").strip() == body.replace(b"\r\n", b"\n").strip()


def test_small_and_middle_messages_arrive_whole_through_the_door(qroot):
    """drop.py writes a message that its buffer still holds at commit() with its header
    and envelope in one write, and a longer one as it comes (header with the first
    write, filled in at commit): both pass pickup's checks at the door and arrive
    whole."""
    pw = user("dm", qroot)
    q, port = smtp_system(qroot)
    bodies = {"small": b"small body\r\n..dot", "middle": b"\r\n".join(
        b"%07d " % i + b"z" * 70 for i in range(3000))}          # ~230 KB: past 64 KiB
    for subject, body in bodies.items():
        assert send(port, "qtdm@%s" % ME, body, subject=subject).startswith(b"250")
    assert wait_for(lambda: len(maildir_messages(pw)) == 2, 60), q.log()
    # the log line may come after the delivery: qpy-start prints it when it reads it
    assert wait_for(lambda: len(re.findall(r"pickup msg \d+: uid \d+ bytes \d+ \(door\)",
                                           q.log())) == 2, 10), q.log()
    for m in maildir_messages(pw):
        want = bodies[str(m["Subject"])].replace(b"\r\n..", b"\r\n.")
        got = m.get_payload(decode=True)
        assert got.replace(b"\r\n", b"\n").strip() == want.replace(b"\r\n", b"\n").strip()


def test_pickup_killed_while_sessions_hand_in_loses_nothing(qroot):
    pw = user("dk", qroot)
    q, port = smtp_system(qroot)
    acked: list[str] = []
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set() and i < 1500:
            subject = "k%d-%d" % (k, i)
            try:
                reply = send(port, "qtdk@%s" % ME, b"kill test", subject=subject)
            except (OSError, EOFError, AssertionError):
                reply = b""
            if reply.startswith(b"250"):
                acked.append(subject)
            i += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    kills, last = 0, None
    try:
        while any(t.is_alive() for t in threads) and kills < 3:
            # each pickup runs 2.5 s before its kill: qpy-start's back-off stays short
            def fresh(last=last):
                pid = q.pid("pickup")
                return pid if pid not in (None, last) else None
            pid = wait_for(fresh, 30)
            time.sleep(2.5)
            os.kill(pid, signal.SIGKILL)
            kills, last = kills + 1, pid
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert kills >= 3 and len(acked) >= 20, (kills, len(acked), q.log()[-3000:])

    def delivered() -> set[str]:
        return {m["Subject"] for m in maildir_messages(pw)}
    assert wait_for(lambda: set(acked) <= delivered(), 90), \
        sorted(set(acked) - delivered())[:10]


def test_door_works_under_a_root_path_longer_than_a_socket_name():
    deep = os.path.join(qpytest.scratch_dir("long"), *(["d" * 40] * 3))
    os.makedirs(deep, mode=0o755)
    path = os.path.join(deep, "qpy")
    r = subprocess.run([qpytest.bin_path("qpy-install"), path, "--me", ME],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r
    assert len(os.path.join(door.directory(path), door.LEAF)) > 108
    root = qpytest.QRoot(path, ME)
    try:
        p = root.start("qpy-pickup")
        assert wait_for(lambda: os.path.exists(os.path.join(door.directory(path), door.LEAF)),
                        20)
        conn = knock(path)
        assert ask(conn, [memfd(good_message(b"postmaster@" + ME.encode()))]).startswith(b"K ")
        p.terminate()
    finally:
        root.stop_all()
