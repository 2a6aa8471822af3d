"""identity — who a local delivery runs as, worked out in qpy-lspawn and kept.

The owner of a local part (qpy.common.rewrite.owner: users/assign, the passwd
database, the alias user; a parse of files and a stat of the home) and the
owner's supplementary groups (os.getgrouplist) are looked up in lspawn, never
in a worker, and kept (qpy.common.stamped): owners for OWNERS_TTL seconds or
until /etc/passwd or users/assign changes, groups for GROUPS_TTL seconds or
until /etc/group or /etc/passwd changes; clear() (SIGHUP) drops both. Whom
nothing may be delivered as (root; another uid in a one-user root) is refused
here with a temporary failure; screen() answers at once for an address no
delivery may serve. queue_dev() tells the workers whether a Maildir's new/ on the
queue's filesystem may go without an fsync (qpy.local.maildir).
"""

from __future__ import annotations

import os
import pwd

from qpy.common import address, durable, privilege, rewrite, users
from qpy.common.log import clean, log
from qpy.common.queue import Paths
from qpy.common.stamped import StampedCache

GROUPS_TTL = 60.0       # seconds a user's supplementary groups are kept
OWNERS_TTL = 60.0       # seconds an address's owner (users.lookup) is kept
GROUP_FILE = "/etc/group"
PASSWD_FILE = "/etc/passwd"


class Refused(Exception):
    """No delivery can run for this address now; the text is the Z result's."""


class Identities:
    def __init__(self, root: str) -> None:
        self.root = root
        self.oneuser = Paths(root).oneuser() is not None
        # supplementary groups by (user, gid); owners by local part
        self.groups = StampedCache([GROUP_FILE, PASSWD_FILE], GROUPS_TTL)
        self.owners = StampedCache([PASSWD_FILE, os.path.join(Paths(root).users, "assign")],
                                   OWNERS_TTL)

    def clear(self) -> None:
        self.groups.clear()
        self.owners.clear()

    def of(self, local: bytes) -> tuple[users.Recipient, list[int], tuple]:
        """(owner, groups, key) for a local part; key names a worker's identity."""
        try:
            who = self.owners.get(local, lambda: rewrite.owner(self.root, local))
        except users.UsersError as e:
            raise Refused(f"Unable to find the owner of this address: {e}. (#4.3.0)")
        if who.uid == 0:
            raise Refused("Not allowed to perform deliveries as root. (#4.3.0)")
        if self.oneuser and who.uid != os.getuid():
            raise Refused("One-user mode: cannot deliver as another uid. (#4.3.0)")
        try:
            groups = self.groups.get((who.user, who.gid), lambda: _groups(who.user, who.gid)) \
                if os.getuid() == 0 else []
        except OSError:
            raise Refused("Unable to look up the groups of the recipient. (#4.3.0)")
        return who, groups, (who.user, who.uid, who.gid, tuple(groups))


def screen(delivery: int, sender: bytes, rcpt: bytes) -> tuple[bytes, bytes] | None:
    """The result at once for a recipient no delivery may serve, or None."""
    if any(c in b"\r\n\0" for c in sender + rcpt):
        # the parser refuses these at every entry; this is the last door before
        # they reach a delivery's environment, a Return-Path or a Delivered-To
        log(f"warning: delivery {delivery}: refused: control character "
            f"in sender <{clean(sender)}> or recipient <{clean(rcpt)}>")
        return b"D", b"Sorry, control character in the sender or recipient. (#5.1.3)"
    local, domain = address.split(rcpt)
    if not domain:
        return b"D", b"Sorry, address must include host name. (#5.1.3)"
    if not local:
        return b"K", b"empty local part: trash address"
    return None


def queue_uid(root: str) -> int:
    """The uid that owns queued messages (qpyq, or the one-user root's user); -1:
    unknown (then a message's owner is not checked)."""
    try:
        return privilege.user_ids(privilege.resolve_user(root, "qpyq"))[0]
    except KeyError:
        return -1


def queue_dev(root: str) -> int:
    """The queue's st_dev, for qpy.local.maildir (no fsync of new/ on that filesystem);
    -1 (always fsync new/) when unknown or when that filesystem does not keep metadata
    changes in order (qpy.common.durable.orders_metadata: an ext4 without a journal)."""
    queue = Paths(root).queue
    try:
        dev = os.stat(queue).st_dev
    except OSError:
        return -1
    if not durable.orders_metadata(queue):
        log("info: the queue's filesystem keeps no order of metadata changes (not ext4 "
            "with a journal, xfs or btrfs): every Maildir delivery fsyncs new/")
        return -1
    return dev


def _groups(user: str, gid: int) -> list[int]:
    # a users/assign name missing from passwd gets its own gid only, as before
    return os.getgrouplist(user, gid) if _in_passwd(user) else [gid]


def _in_passwd(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
