"""The one address rewrite (qpy.common.rewrite) and the canonical local part.

Pure logic: no qpy program is started and nothing here needs root. The RCPT
check is qpy-smtpd's own Session, fed command lines over a socketpair; the
scheduler's side is what qpy-queue-send and qpy-lspawn do with the envelope
qpy-smtpd hands in: the queue's envelope codec, Rewrite.route, rewrite.owner.
"""

from __future__ import annotations

import os
import pwd
import re
import socket

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qpy.admin import newrcpt
from qpy.common import address, envelope, rewrite
from qpy.common.control import Control
from qpy.common.state import LOCAL, REMOTE
from qpy.local import dotqmail
from qpy.smtp.channel import Channel
from qpy.smtp.config import Config
from qpy.smtp.recipients import RecipientTable
from qpy.smtp.session import Session

PROPS = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow,
                                        HealthCheck.function_scoped_fixture])
ME = "test.example"


def tables(locals_=(b"test.example",), virtual=None, percent=(), noat=b"test.example"):
    return rewrite.Rewrite(set(locals_), rewrite.parse_virtualdomains(virtual or []),
                           set(percent), noat)


# ---- the canonical local part -------------------------------------------------------

@pytest.mark.parametrize("given_, canonical", [
    (b'"user"@d.example', b"user@d.example"),
    (b'"user-ext"@d.example', b"user-ext@d.example"),
    (b'"us\\er"@d.example', b"user@d.example"),
    (b'"first.last"@d.example', b"first.last@d.example"),
    (b'"\\j\\o\\e"@D.Example', b"joe@d.example"),
    (b'"john doe"@d.example', b'"john doe"@d.example'),
    (b'"john\\ doe"@d.example', b'"john doe"@d.example'),      # fewest escapes
    (b'"a..b"@d.example', b'"a..b"@d.example'),                # not a dot-atom
    (b'".a"@d.example', b'".a"@d.example'),
    (b'"a@b"@d.example', b'"a@b"@d.example'),
    (b'"a\\"b"@d.example', b'"a\\"b"@d.example'),
    (b'"a\\\\b"@d.example', b'"a\\\\b"@d.example'),
    (b'""@d.example', b'""@d.example'),
    (b"Joe@d.example", b"Joe@d.example"),                      # case is kept
])
def test_parser_puts_the_local_part_in_canonical_form(given_, canonical):
    assert address.parse_mailbox(given_) == canonical
    assert address.parse_path(b"<" + given_ + b">") == canonical
    sender, rcpts = envelope.decode(envelope.encode(given_, [given_]))
    assert sender == canonical and rcpts == [canonical]
    assert address.parse_mailbox(canonical) == canonical       # idempotent


def test_utf8_quoted_local_part_is_canonical_too():
    assert address.parse_mailbox('"jürgen"@d.example'.encode(), utf8=True) \
        == "jürgen@d.example".encode()


@given(st.binary(max_size=30).map(lambda b: bytes(0x20 + c % 95 for c in b)))
@PROPS
def test_quote_unquote_round_trip(content):
    """quote() gives a local part the parser accepts as canonical, with the same content."""
    local = address.quote(content)
    assert address.unquote(local) == content
    assert address.canonical_local(local) == local
    assert address.parse_mailbox(local + b"@d.example") == local + b"@d.example"


# ---- controls in addresses (issue 12 finding 10) --------------------------------------

CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] \
    + ["\u2028", "\u2029"]


@pytest.mark.parametrize("ctl", CONTROLS, ids=lambda c: "U+%04X" % ord(c))
def test_controls_refused_by_the_parser(ctl):
    for text in ("a%sb@d.example" % ctl, '"a%sb"@d.example' % ctl, "ab@d%s.example" % ctl):
        addr = text.encode("utf-8")
        with pytest.raises(address.AddressError):
            address.parse_mailbox(addr, utf8=True)
        with pytest.raises(address.AddressError):
            address.parse_path(b"<" + addr + b">", utf8=True)
        if ctl != "\0":    # NUL ends an envelope field: a different refusal
            with pytest.raises(envelope.EnvelopeError) as e:
                envelope.decode(envelope.encode(b"", [addr]))
            assert e.value.code == envelope.EXIT_FORMAT


def test_printable_unicode_still_accepted():
    for text in ("jürgen@d.example", "a\u00a0b@d.example", "日本@d.example"):
        assert address.parse_mailbox(text.encode(), utf8=True) == text.encode()
    with pytest.raises(address.AddressError):
        address.parse_mailbox(b"a\xc2@d.example", utf8=True)    # not UTF-8


# ---- routing --------------------------------------------------------------------------

def test_locals_virtualdomains_and_envnoathost():
    rw = tables(virtual=["virt.example:v", ".sub.example:s", "skip.virt.example:",
                         ":all", "dup.example:first", "dup.example:second"])
    assert rw.route(b"Joe@test.example") == (LOCAL, b"Joe@test.example", b"Joe@test.example")
    assert rw.route(b"joe").address == b"joe@test.example"
    assert rw.route(b"Joe@virt.example")[:2] == (LOCAL, b"v-Joe@virt.example")
    assert rw.route(b"joe@a.sub.example")[:2] == (LOCAL, b"s-joe@a.sub.example")
    assert rw.route(b"joe@skip.virt.example")[:2] == (REMOTE, b"joe@skip.virt.example")
    assert rw.route(b"joe@else.example")[:2] == (LOCAL, b"all-joe@else.example")
    assert rw.route(b"joe@dup.example").address == b"first-joe@dup.example"
    assert rw.route(b'"joe"@virt.example').local == b"v-joe"


def test_virtualdomains_user_at_domain_entry_wins_over_the_domain():
    rw = tables(virtual=["virt.example:dom", "Boss@Virt.example:boss",
                         '"ab"@virt.example:ab', "nobody@virt.example:"])
    assert rw.route(b"boss@virt.example")[:2] == (LOCAL, b"boss-boss@virt.example")
    assert rw.route(b"BOSS@virt.example")[:2] == (LOCAL, b"boss-BOSS@virt.example")
    assert rw.route(b"ab@virt.example").address == b"ab-ab@virt.example"
    assert rw.route(b"other@virt.example").address == b"dom-other@virt.example"
    assert rw.route(b"nobody@virt.example").channel == REMOTE      # an exception
    assert rw.route(b"boss@other.example").channel == REMOTE


def test_virtualdomains_keys_containing_colons():
    """Split at the last colon: an IPv6 literal or a quoted local part holds colons."""
    rw = tables(virtual=["[IPv6:2001:db8::1]:six", '"a:b"@virt.example:ab'])
    rcpt = address.parse_mailbox(b"joe@[IPv6:2001:DB8::1]")
    assert rw.route(rcpt)[:2] == (LOCAL, b"six-joe@[IPv6:2001:db8::1]")
    rcpt = address.parse_mailbox(b'"a:b"@virt.example')
    assert rw.route(rcpt)[:2] == (LOCAL, b'ab-"a:b"@virt.example')
    assert rewrite.parse_virtualdomains(["no colon here", " x.example : p "]) \
        == {b"x.example": b"p"}


def test_percenthack():
    rw = tables(locals_=(b"test.example", b"in.example"), percent=(b"gw.example",),
                virtual=["virt.example:v"])
    assert rw.route(b"joe%out.example@gw.example")[:2] == (REMOTE, b"joe@out.example")
    assert rw.route(b"joe%in.example@gw.example")[:2] == (LOCAL, b"joe@in.example")
    assert rw.route(b"joe%virt.example@gw.example").address == b"v-joe@virt.example"
    # repeated while the domain is a percenthack domain, from the last %
    assert rw.route(b"joe%out.example%gw.example@gw.example").address == b"joe@out.example"
    assert rw.route(b"joe%gw.example%out.example@gw.example").address \
        == b"joe%gw.example@out.example"
    assert rw.route(b'"j oe%out.example"@gw.example').address == b'"j oe"@out.example'
    # not a percenthack domain, nothing before the %, no valid domain after it
    for rcpt in (b"joe%out.example@test.example", b"%out.example@gw.example",
                 b"joe%bad..example@gw.example", b"joe%@gw.example"):
        assert rw.route(rcpt).target == rcpt


def test_relayclient_suffix():
    assert rewrite.append_suffix(b"joe@host.example", b"") == b"joe@host.example"
    assert rewrite.append_suffix(b"joe@host.example", b".relay") == b"joe@host.example.relay"
    fixed = rewrite.append_suffix(b"joe@host.example", b"@fixme")
    assert fixed == b'"joe@host.example"@fixme'
    rw = tables(virtual=["fixme:fix"])
    assert rw.route(fixed)[:2] == (LOCAL, b'fix-"joe@host.example"@fixme')
    assert rewrite.append_suffix(b'"a b"@h.example', b"@fixme") == b'"a b@h.example"@fixme'
    for bad in (b"\r\n", b"@", b"@bad..domain", b"\x85".decode("latin-1").encode()):
        with pytest.raises(address.AddressError):
            rewrite.append_suffix(b"joe@host.example", bad)


# ---- the RCPT check and the scheduler agree -------------------------------------------

def _write(path: str, data: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)
    os.chmod(path, mode)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-user root (the test's own user): users/assign, the alias user's .qmail
    files, a home, control files, and users/recipients built by qpy-newrcpt's code."""
    top = tmp_path_factory.mktemp("rw")
    root, home = str(top / "qpy"), str(top / "home")
    me = pwd.getpwuid(os.getuid())
    os.makedirs(home, mode=0o755)
    _write(os.path.join(root, "oneuser"), me.pw_name + "\n")
    ctl = {"me": ME, "locals": "test.example\nlocal2.example", "envnoathost": ME,
           "rcpthosts": "test.example\nlocal2.example\nvirt.example\ngw.example",
           "virtualdomains": "virt.example:v\nboss@virt.example:boss\n"
                             "[IPv6:2001:db8::1]:six\nout.virt.example:",
           "percenthack": "gw.example"}
    for name, text in ctl.items():
        _write(os.path.join(root, "control", name), text + "\n")
    for name in ("sales", "v-default", "list-info", "boss-default", "six-default",
                 "postmaster"):
        _write(os.path.join(root, "alias", ".qmail-" + name), "./Maildir/\n")
    for name in ("s-default", "c-x", "c-y-default", "b3"):
        _write(os.path.join(home, ".qmail-" + name), "./Maildir/\n")
    entry = "%s:%d:%d:%s" % (me.pw_name, me.pw_uid, me.pw_gid, home)
    # with a dash, an assigned address needs a .qmail file in that home: club-x and
    # club-y-* have one, club-42 does not; boss3 has one, boss2 does not
    _write(os.path.join(root, "users", "assign"),
           "=boss:%s:::\n+shop-:%s:-:s-:\n+club-:%s:-:c-:\n=boss2:%s:-:b2:\n"
           "=boss3:%s:-:b3:\n.\n" % ((entry,) * 5))
    with open(os.path.join(root, "users", "recipients"), "wb") as f:
        f.write(newrcpt.build(root))
    return root


LOCAL_WORDS = ["sales", "Sales", "boss", "shop-", "shop-42", "list", "-info", "info", "x",
               "v", "nobody", "post", "master", "%", "%out.example", "%test.example",
               "%virt.example", ".", "-", "six", "club-", "y-", "Y", "boss2", "boss3", "42"]
DOMAINS = ["test.example", "TEST.example", "local2.example", "virt.example",
           "out.virt.example", "gw.example", "remote.example", "[IPv6:2001:db8::1]",
           "[192.0.2.1]"]


@st.composite
def smtp_paths(draw) -> bytes:
    """An RCPT path: a local part from words that mean something here, plain or
    quoted (with needless escapes, spaces or quotes inside), at one of the domains."""
    local = "".join(draw(st.lists(st.sampled_from(LOCAL_WORDS), min_size=1, max_size=4)))
    how = draw(st.sampled_from(["plain", "quoted", "escaped", "spaced"]))
    if how != "plain":
        if how == "escaped":
            local = "".join("\\" + c if draw(st.booleans()) else c for c in local)
        elif how == "spaced":
            local += draw(st.sampled_from([" ", "\\\"", "@x", ":"]))
        local = '"%s"' % local
    return ("<%s@%s>" % (local, draw(st.sampled_from(DOMAINS)))).encode()


class RcptCheck:
    """qpy-smtpd's Session over a socketpair: what it answers to RCPT, and the
    envelope recipients it would hand to the queue."""

    def __init__(self, root: str, env: dict[str, str]):
        self.ours, theirs = socket.socketpair()
        self.theirs = theirs
        self.session = Session(Config(root), env, Channel(theirs.fileno(), theirs.fileno(), 5))
        assert self.say(b"EHLO client.example").startswith(b"250")

    def say(self, line: bytes) -> bytes:
        self.ours.sendall(line + b"\r\n")
        self.session.one_command()
        self.session.ch.flush()
        reply = b""
        while not re.search(rb"(^|\n)\d{3} [^\n]*\n$", reply):
            reply += self.ours.recv(65536)
        return reply.rsplit(b"\n", 2)[-2] + b"\n"

    def rcpt(self, path: bytes) -> tuple[int, bytes | None]:
        """(reply code, the envelope recipient when accepted)."""
        assert self.say(b"RSET").startswith(b"250")
        assert self.say(b"MAIL FROM:<a@client.example>").startswith(b"250")
        code = int(self.say(b"RCPT TO:" + path)[:3])
        return code, (self.session.recipients[-1] if code == 250 else None)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def scheduler(root: str, rcpt: bytes) -> tuple[rewrite.Route, bytes]:
    """What qpy-queue-send and qpy-lspawn make of an envelope recipient: the route
    (after the queue's envelope codec, as pickup and queue-send read it) and the
    local part qpy-lspawn looks up for its owner."""
    [r] = envelope.decode(envelope.encode(b"", [rcpt]))[1]
    route = rewrite.Rewrite.from_control(Control(root)).route(r)
    return route, address.canonical_local(address.split(route.address)[0])


def delivers(root: str, key: bytes) -> bool:
    """True when local delivery finds instructions for local part `key`; False when
    qpy-local would bounce it with `no mailbox here by that name`."""
    who = rewrite.owner(root, key)
    if not who.dash:
        return True        # the user's own .qmail or defaultdelivery
    fd = os.open(who.home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return dotqmail.find(fd, who.dash, who.ext, who.uid) is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("relay", [None, "", "@fixme"])
@given(path=smtp_paths())
@PROPS
def test_rcpt_check_and_scheduler_agree(root, relay, path):
    """For any address: local or remote, and which local part (so which owner), the
    RCPT check and the scheduler decide alike; an unknown local part is refused at
    RCPT (550), and every local recipient accepted is delivered, never bounced as
    unknown."""
    env = {"TCPREMOTEIP": "192.0.2.9"} if relay is None else {"RELAYCLIENT": relay}
    check = RcptCheck(root, env)
    try:
        code, accepted = check.rcpt(path)
    finally:
        check.close()
    try:
        rcpt = address.parse_path(path, utf8=True)
    except address.AddressError:
        assert code == 501
        return
    if relay:
        try:
            rcpt = rewrite.append_suffix(rcpt, relay.encode())
        except address.AddressError:
            assert code == 553
            return
    route, key = scheduler(root, rcpt)
    table = RecipientTable(root)
    table.refresh()
    assert table.state == "ok"
    rcpthosts = {b"test.example", b"local2.example", b"virt.example", b"gw.example"}
    stranger = relay is None and not {address.domain_part(rcpt),
                                      address.domain_part(route.target)} <= rcpthosts
    unknown = route.channel == LOCAL and not table.known(key)
    assert code == (553 if stranger else 550 if unknown else 250), (path, route)
    if code == 250:
        assert accepted == rcpt            # the envelope carries the canonical form
        assert scheduler(root, accepted) == (route, key)
        if route.channel == LOCAL:
            assert delivers(root, key), (path, route, rewrite.owner(root, key))


@given(words=st.lists(st.sampled_from(LOCAL_WORDS), min_size=1, max_size=4),
       domain=st.sampled_from(DOMAINS), escapes=st.lists(st.booleans(), min_size=1))
@PROPS
def test_quoted_and_plain_forms_are_one_recipient(root, words, domain, escapes):
    """`"x"`, `"\\x"` and `x` are one recipient: one RCPT answer, one envelope
    recipient, one route (before, the envelope kept the quotes and local delivery
    looked up another local part than the RCPT check)."""
    local = "".join(words)
    plain = ("<%s@%s>" % (local, domain)).encode()
    try:
        address.parse_path(plain)
    except address.AddressError:
        assume(False)
    escaped = "".join("\\" + c if escapes[i % len(escapes)] else c
                      for i, c in enumerate(local))
    quoted = ('<"%s"@%s>' % (escaped, domain)).encode()
    check = RcptCheck(root, {"RELAYCLIENT": ""})
    try:
        assert check.rcpt(plain) == check.rcpt(quoted)
    finally:
        check.close()


def test_quoted_local_parts_reach_the_same_owner(root):
    """The backscatter case in pure logic: "sales", "shop-42" and "s\\ales" are the
    alias user's `sales` and the assigned shop- prefix, on both sides."""
    check = RcptCheck(root, {"RELAYCLIENT": ""})
    try:
        for path, owner_ext in ((b'<"sales"@test.example>', b"sales"),
                                (b'<"sal\\es"@test.example>', b"sales"),
                                (b'<"shop-42"@test.example>', b"s-42")):
            code, accepted = check.rcpt(path)
            assert code == 250 and accepted is not None
            route, key = scheduler(root, accepted)
            assert rewrite.owner(root, key).ext == owner_ext
            assert delivers(root, key)
        assert check.rcpt(b'<"no body"@test.example>')[0] == 550
    finally:
        check.close()
