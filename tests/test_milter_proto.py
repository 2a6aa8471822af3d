"""The milter client (qpy.common.milter, qpy.common.filters) against hand-written filters
over real sockets: negotiation, every reply, every modification, broken filters."""

from __future__ import annotations

import io
import struct
import time

import pytest
from milterhelp import ScriptFilter, addheader, chgheader, insheader

from qpy.common.filters import Filters, Message
from qpy.common.milter import Spec

MSG = (b"Received: from x by y\nFrom: a@example.org\nTo: b@example.org\n"
       b"Subject: hello\n world\n\nline one\nline two\n")


def chain(*filters: ScriptFilter, opts: str = "") -> Filters:
    return Filters([Spec("%s %s" % (f.endpoint, opts)) for f in filters], "test")


def run_message(fl: Filters, data: bytes = MSG, rcpts=(b"b@example.org",)):
    assert fl.connect(b"client.example", "4", 4000, b"192.0.2.1", {b"j": b"mx.test"}) is None
    assert fl.helo(b"client.example", {}) is None
    assert fl.mail(b"a@example.org", [b"SIZE=100"], {b"mail_addr": b"a@example.org"}) is None
    for r in rcpts:
        assert fl.rcpt(r, [], {b"rcpt_addr": r}) is None
    assert fl.data({b"i": b"QID"}) is None
    msg = Message(io.BytesIO(data), b"a@example.org", list(rcpts))
    return fl.message(msg, {b"i": b"QID"}), msg


def rendered(msg: Message) -> bytes:
    out = io.BytesIO()
    msg.write_to(out.write)
    return out.getvalue()


def test_wire_format_of_every_stage():
    f = ScriptFilter()
    fl = chain(f)
    verdict, msg = run_message(fl)
    fl.quit()
    assert verdict is None
    time.sleep(0.2)
    cmds = f.commands()
    kinds = b"".join(c for c, _ in cmds)
    assert kinds == b"ODCHDMDRDTLLLLDNBDEQ"
    optneg = cmds[0][1]
    assert struct.unpack(">III", optneg[:12])[0] == 6
    connect = [d for c, d in cmds if c == b"C"][0]
    assert connect == b"client.example\x004" + struct.pack(">H", 4000) + b"192.0.2.1\x00"
    macros = [d for c, d in cmds if c == b"D"]
    assert macros[0] == b"Cj\x00mx.test\x00"
    assert b"M{mail_addr}\x00a@example.org\x00" in macros
    assert [d for c, d in cmds if c == b"M"] == [b"<a@example.org>\x00SIZE=100\x00"]
    headers = [d for c, d in cmds if c == b"L"]
    assert headers[1] == b"From\x00a@example.org\x00"
    assert headers[3] == b"Subject\x00hello\n world\x00"       # folded: LF-separated
    body = b"".join(d for c, d in cmds if c == b"B")
    assert body == b"line one\r\nline two\r\n"
    assert [c for c, _ in cmds][-2:] == [b"E", b"Q"]
    assert rendered(msg) == MSG


def test_fewer_negotiated_steps_are_not_sent():
    # NOCONNECT|NOHELO|NOHDRS|NOBODY, no reply to RCPT (NR_RCPT)
    f = ScriptFilter(steps=0x01 | 0x02 | 0x20 | 0x10 | 0x8000)
    fl = chain(f)
    verdict, _ = run_message(fl)
    fl.quit()
    assert verdict is None
    time.sleep(0.2)
    kinds = {c for c, _ in f.commands()}
    assert not kinds & {b"C", b"H", b"L", b"B"}
    assert {b"M", b"R", b"T", b"N", b"E"} <= kinds


@pytest.mark.parametrize("reply,action,code", [
    (b"r", "reject", 550), (b"t", "tempfail", 451), (b"d", "discard", 250),
    (b"y550 5.7.1 go away", "reject", 550), (b"y421 4.7.0 later", "tempfail", 421)])
def test_final_replies_at_end_of_message(reply, action, code):
    f = ScriptFilter(lambda cmd, data: [reply] if cmd == b"E" else [b"c"])
    verdict, _ = run_message(chain(f))
    assert verdict is not None and verdict.action == action and verdict.code == code
    if reply.startswith(b"y550"):
        assert verdict.lines == ["5.7.1 go away"]


@pytest.mark.parametrize("reply", [b"4", b"f"])
def test_shutdown_and_conn_fail_are_421(reply):
    f = ScriptFilter(lambda cmd, data: [reply] if cmd == b"M" else [b"c"])
    fl = chain(f)
    fl.connect(b"h", "4", 1, b"192.0.2.1", {})
    v = fl.mail(b"a@example.org", [], {})
    assert v.code == 421 and v.action == "tempfail"


def test_skip_stops_the_body():
    body = b"".join(b"line %06d of a long body\n" % n for n in range(4000))   # ~100 KB
    f = ScriptFilter(lambda cmd, data: [b"s"] if cmd == b"B" else [b"c"], steps=0x400)
    verdict, msg = run_message(chain(f), MSG.split(b"\n\n")[0] + b"\n\n" + body)
    assert verdict is None
    assert [c for c, _ in f.commands()].count(b"B") == 1
    g = ScriptFilter()
    run_message(chain(g), MSG.split(b"\n\n")[0] + b"\n\n" + body)
    assert [c for c, _ in g.commands()].count(b"B") >= 3
    assert b"".join(d for c, d in g.commands() if c == b"B") == body.replace(b"\n", b"\r\n")


def test_reject_at_rcpt_refuses_that_recipient_only():
    f = ScriptFilter(lambda cmd, data: [b"r"] if cmd == b"R" and b"bad" in data else [b"c"])
    fl = chain(f)
    fl.connect(b"h", "4", 1, b"192.0.2.1", {})
    fl.mail(b"a@example.org", [], {})
    assert fl.rcpt(b"bad@example.org", [], {}).code == 550
    assert fl.rcpt(b"good@example.org", [], {}) is None


def test_reject_at_connect_refuses_every_mail():
    f = ScriptFilter(lambda cmd, data: [b"y554 5.7.1 not you"] if cmd == b"C" else [b"c"])
    fl = chain(f)
    assert fl.connect(b"h", "4", 1, b"192.0.2.1", {}).code == 554
    assert fl.mail(b"a@example.org", [], {}).code == 554


def test_accept_takes_a_filter_out_of_the_message():
    f = ScriptFilter(lambda cmd, data: [b"a"] if cmd == b"M" else [b"c"])
    verdict, _ = run_message(chain(f))
    assert verdict is None
    assert b"E" not in {c for c, _ in f.commands()}


def test_every_modification():
    mods = [addheader(b"X-Added", b"yes"),
            insheader(0, b"X-Top", b"first\n\tfolded"),
            chgheader(1, b"Subject", b"changed"),
            chgheader(1, b"To", b""),
            b"bNEW BODY\r\nsecond",
            b"b line\r\n",
            b"e<new@example.org>\0",
            b"+<added@example.org>\0",
            b"2<added2@example.org>\0NOTIFY=NEVER\0",
            b"-<b@example.org>\0",
            b"p",
            b"c"]
    f = ScriptFilter(lambda cmd, data: mods if cmd == b"E" else [b"c"])
    verdict, msg = run_message(chain(f))
    assert verdict is None
    out = rendered(msg)
    assert out == (b"X-Top: first\n\tfolded\nReceived: from x by y\nFrom: a@example.org\n"
                   b"Subject: changed\nX-Added: yes\n\nNEW BODY\nsecond line\n")
    assert msg.sender == b"new@example.org"
    assert msg.recipients == [b"added@example.org", b"added2@example.org"]


def test_quarantine_is_recorded():
    f = ScriptFilter(lambda cmd, data: [b"qsuspicious\0", b"c"] if cmd == b"E" else [b"c"])
    verdict, msg = run_message(chain(f))
    assert verdict is None and msg.quarantine == b"suspicious"


def test_a_modification_not_negotiated_is_a_failure():
    f = ScriptFilter(lambda cmd, data: [addheader(b"X", b"y"), b"c"] if cmd == b"E" else [b"c"],
                   actions=0)
    verdict, msg = run_message(chain(f))
    assert verdict is not None and verdict.code == 451          # default tempfail
    assert b"X: y" not in rendered(msg)


def test_later_filters_see_earlier_edits():
    f1 = ScriptFilter(lambda cmd, data: [addheader(b"X-First", b"1"), b"c"]
                    if cmd == b"E" else [b"c"])
    f2 = ScriptFilter()
    verdict, _ = run_message(chain(f1, f2))
    assert verdict is None
    assert (b"L", b"X-First\x001\x00") in f2.commands()


@pytest.mark.parametrize("behaviour", ["hang", "close", "garbage"])
@pytest.mark.parametrize("default,code", [("tempfail", 451), ("reject", 550), ("accept", None)])
def test_broken_filter_gets_its_default_action(behaviour, default, code):
    f = ScriptFilter(lambda cmd, data: behaviour if cmd == b"B" else [b"c"])
    fl = chain(f, opts="default_action=%s command_timeout=1 content_timeout=1" % default)
    start = time.monotonic()
    verdict, _ = run_message(fl)
    assert time.monotonic() - start < 5
    assert (verdict.code if verdict else None) == code
    if code:   # the whole session is refused from then on, as Postfix does
        assert fl.mail(b"a@example.org", [], {}).code == code


def test_unreachable_filter_and_garbage_negotiation():
    dead = Spec("inet:127.0.0.1:1 connect_timeout=1")
    fl = Filters([dead], "test")
    assert fl.connect(b"h", "4", 1, b"192.0.2.1", {}).code == 451
    g = ScriptFilter(version=0)
    fl = chain(g, opts="connect_timeout=1 default_action=reject")
    assert fl.connect(b"h", "4", 1, b"192.0.2.1", {}).code == 550


def test_filter_asking_for_steps_not_offered_is_refused():
    f = ScriptFilter(steps=0x800)     # RCPT_REJ: qpy does not offer it
    assert chain(f).connect(b"h", "4", 1, b"192.0.2.1", {}).code == 451


def test_setsymlist_limits_macros():
    extra = struct.pack(">I", 0) + b"{client_addr}\0"
    f = ScriptFilter(optneg_extra=extra)
    fl = chain(f)
    fl.connect(b"h", "4", 1, b"192.0.2.1", {b"j": b"me", b"client_addr": b"192.0.2.1"})
    fl.quit()
    time.sleep(0.1)
    assert [d for c, d in f.commands() if c == b"D"] == [b"C{client_addr}\x00192.0.2.1\x00"]


@pytest.mark.parametrize("line,ok", [
    ("unix:/run/x.sock", True), ("inet:127.0.0.1:11332 default_action=accept", True),
    ("inet6:[::1]:8891 command_timeout=5", True), ("inet:host", False),
    ("tcp:1.2.3.4:5", False), ("unix:rel", False), ("inet:h:1 default_action=maybe", False),
    ("inet:h:1 bogus=1", False), ("inet:h:99999", False)])
def test_spec_syntax(line, ok):
    if ok:
        s = Spec(line)
        assert s.default_action in ("accept", "tempfail", "reject")
    else:
        with pytest.raises(ValueError):
            Spec(line)


def test_progress_forever_still_times_out():
    f = ScriptFilter(lambda cmd, data: "progress" if cmd == b"E" else [b"c"])
    fl = chain(f, opts="content_timeout=1")
    start = time.monotonic()
    verdict, _ = run_message(fl)
    assert verdict is not None and verdict.code == 451
    assert time.monotonic() - start < 4 * 1 + 3


def test_modifications_are_bounded_and_a_large_body_replacement_passes():
    big = [addheader(b"X-Big", b"v" * 60000)] * 200            # 12 MB of header fields
    f = ScriptFilter(lambda cmd, data: big + [b"c"] if cmd == b"E" else [b"c"])
    verdict, msg = run_message(chain(f))
    assert verdict is not None and verdict.code == 451
    assert b"X-Big" not in rendered(msg)
    line = b"0123456789" * 6 + b"\r\n"
    chunks = [b"b" + line * 1000] * 50                            # 3.1 MB of new body
    g = ScriptFilter(lambda cmd, data: chunks + [b"c"] if cmd == b"E" else [b"c"])
    verdict, msg = run_message(chain(g))
    assert verdict is None
    body = rendered(msg).split(b"\n\n", 1)[1]
    assert body == line.replace(b"\r\n", b"\n") * 50000
