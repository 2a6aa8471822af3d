"""journal — qpy-pickup's record of the batches it admits, and its recovery at start.

queue/pickup/journal holds, per batch, one record "NAME ID\\n" per drop file, then
"C\\n" once the batch reached its commit point (its syncfs or fsyncs returned), or
"X\\n" when its syncfs failed and the batch was undone (its drop files stay and are
admitted again). Only qpy-pickup (qpyq) reads and writes it; its flock on the
journal keeps a second pickup out.

RECOVERY (recover(), at start)
    A batch reached its commit point when its "C" record is there (written only
    after the batch's syncfs or fsyncs returned; a power cut may lose an unsynced
    "C" but never make one appear) or when one of its todo/ID exists (the renames
    come after the "C"). Then its renames are finished and its drop files removed.
    Any other record may have been written before that point: its temporaries go,
    and its drop file is admitted again (at worst a second copy, never a lost one),
    as is every batch followed by "X". A record with nothing to come again from
    is different: a message from the door (record "-") has no drop file, and
    pickup answers it once the batch's syncfs returned, before the "C" and the
    renames are on disk, so a power cut can take both while the client holds a
    250; and a drop file is unlinked only after the commit point, but on a
    filesystem that keeps no metadata order (an ext4 without a journal,
    docs/durability.md §5) its unlink may reach the disk while the "C" and the
    renames do not. So a record without its "C" whose drop file is gone (or that
    has none) is finished when its temporaries are whole (todo/.tmp.ID parses,
    mess/ID has its size and begins with pickup's Received: line): if it was never
    committed, a door client sends it again, and a drop file that is gone was
    removed by its owner after its injector reported success: either way a second
    copy or a delivery its injector was promised, never a lost one. One that is
    not whole was never committed and goes.
"""

from __future__ import annotations

import os

from qpy.common import dropfile, durable, envelope
from qpy.common.queue import Paths, read_small, todo_decode

TODO_TMP = ".tmp."
COMMIT = b"C\n"                    # the records before it reached their commit point
VOID = b"X\n"                      # the records before it were never committed
DOOR = "-"                         # the record's name for a message from the door
RECEIVED = b"Received: (qpy "     # how pickup begins every mess/ID
TODO_LIMIT = envelope.MAX_ENVELOPE + 120


def unlink_quietly(directory: str, name: str) -> None:
    try:
        os.unlink(os.path.join(directory, name))
    except OSError:
        pass


class Journal:
    def __init__(self, paths: Paths):
        self.paths = paths
        self.path = os.path.join(paths.pickup, "journal")
        self.records = 0                  # records written since it was last emptied
        self.void_owed = False            # records of a failed batch wait for their "X"
        self.fd: int | None = None        # open for appending, once needed

    def _fd(self) -> int:
        """The journal, opened for appending once and kept (two opens and closes a
        batch less)."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        return self.fd

    def append(self, data: bytes, sync: bool) -> None:
        """Append records; with sync they count only once this returns."""
        durable.write_all(self._fd(), data)
        if sync:
            os.fsync(self._fd())

    def add(self, records: bytes, count: int, sync: bool) -> None:
        """Records of a batch; its "X" first when a failed batch's records precede."""
        if self.void_owed:
            # without it this batch's "C" would cover the failed batch's records too
            self.append(VOID, sync=False)
            self.void_owed = False
        self.records += count
        self.append(records, sync)

    def empty(self) -> None:
        """Once the drop files' removals are durable, the journal can go."""
        if self.records == 0:
            return
        durable.fsync_dir(self.paths.todo)      # the renames to todo/ID
        durable.fsync_dir(self.paths.drop)      # the removals of the drop files
        os.ftruncate(self._fd(), 0)
        os.fsync(self._fd())
        self.records = 0
        self.void_owed = False

    def _nothing_to_redo(self, name: str) -> bool:
        """No drop file will bring this record's message again (see RECOVERY)."""
        return name == DOOR or not os.path.lexists(os.path.join(self.paths.drop, name))

    def _whole(self, msg_id: str) -> bool:
        """The temporaries of a door message are complete (see RECOVERY)."""
        try:
            todo = todo_decode(read_small(os.path.join(self.paths.todo, TODO_TMP + msg_id),
                                          TODO_LIMIT))
            envelope.decode(todo.env)
            fd = os.open(os.path.join(self.paths.mess, msg_id), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                head, size = os.pread(fd, len(RECEIVED), 0), os.fstat(fd).st_size
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return False
        return size == todo.size and head == RECEIVED

    def recover(self) -> None:
        """Finish every batch that reached its commit point; undo the others."""
        with open(self.path, "rb") as f:
            data = f.read()
        batches: list[list[tuple[str, str]]] = [[]]
        marked: set[int] = set()            # indexes of batches with their "C"
        for line in data.split(b"\n"):
            if line == COMMIT[:-1]:
                marked.add(len(batches) - 1)
                batches.append([])
                continue
            if line == VOID[:-1]:               # a batch whose syncfs failed: undone
                batches.append([])
                continue
            fields = line.split(b" ")
            if len(fields) != 2 or not fields[1].isdigit():
                continue                       # a torn last record was never written
            batches[-1].append((fields[0].decode("ascii", "replace"),
                                fields[1].decode("ascii")))
        committed = set()
        paths = self.paths
        for n, batch in enumerate(batches):
            self.records += len(batch)
            voided = n + 1 < len(batches) and n not in marked   # followed by "X"
            if not (n in marked or any(
                    os.path.lexists(os.path.join(paths.todo, i)) for _, i in batch)):
                kept = [] if voided else [(name, i) for name, i in batch
                                          if self._nothing_to_redo(name) and self._whole(i)]
                for record in batch:           # perhaps never durable: admitted again
                    if record not in kept:
                        unlink_quietly(paths.mess, record[1])
                batch = kept                   # perhaps answered, nothing comes again: kept
            for name, msg_id in batch:
                committed.add(msg_id)
                tmp = os.path.join(paths.todo, TODO_TMP + msg_id)
                if os.path.exists(tmp):
                    os.rename(tmp, os.path.join(paths.todo, msg_id))
                if dropfile.is_final_name(name):
                    unlink_quietly(paths.drop, name)
        for name in os.listdir(paths.todo):
            if name.startswith(TODO_TMP) and name[len(TODO_TMP):] not in committed:
                unlink_quietly(paths.mess, name[len(TODO_TMP):])
                unlink_quietly(paths.todo, name)
        durable.fsync_dir(paths.todo)
        durable.fsync_dir(paths.mess)
        self.empty()
