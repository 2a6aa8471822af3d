"""durable — the one way qpy makes a file write survive a crash.

Write to a temporary name, fsync the file, rename it to its final name, fsync the
directory (through a descriptor opened before the rename, so a directory swapped
underneath cannot take the fsync). Small files (control, state heads, the aliases
table, requests) go through here; the per-message paths that need fewer syncs
(drop files, pickup's batches, Maildir) make their own argument where they write,
each marked `# durable:`.
"""

# (no __future__ import: the front ends load this module on every run; docs/queue.md)

import posix

FILE_MODE = 0o640


def fsync_dir(path: str) -> None:
    fd = posix.open(path, posix.O_RDONLY | posix.O_DIRECTORY)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = posix.write(fd, view)
        view = view[n:]


def write_file(directory: str, name: str, data: bytes, mode: int = FILE_MODE,
               sync_dir: bool = True) -> None:
    """Durably create or replace directory/name with data.

    temporary name, write, fsync, rename, fsync the directory: after this returns
    the file is on disk under its final name with exactly these bytes.
    """
    dfd = posix.open(directory, posix.O_RDONLY | posix.O_DIRECTORY)
    try:
        tmp = ".tmp.%s.%d" % (name, posix.getpid())
        fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_NOFOLLOW,
                        mode, dir_fd=dfd)
        try:
            posix.fchmod(fd, mode)
            write_all(fd, data)
            posix.fsync(fd)
        except BaseException:
            posix.close(fd)
            _unlink_quietly(tmp, dfd)
            raise
        posix.close(fd)
        try:
            posix.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _unlink_quietly(tmp, dfd)
            raise
        if sync_dir:
            posix.fsync(dfd)
    finally:
        posix.close(dfd)


def append_line(path: str, line: bytes, sync: bool = True) -> None:
    """Append one record and fsync it: the record counts only once this returns.
    sync=False: the caller makes it durable otherwise (a syncfs of its filesystem)."""
    fd = posix.open(path, posix.O_WRONLY | posix.O_APPEND | posix.O_NOFOLLOW)
    try:
        write_all(fd, line)
        if sync:
            posix.fsync(fd)
    finally:
        posix.close(fd)


RENAME_NOREPLACE = 1          # renameat2(2) flag
_renameat2 = None


def rename_noreplace(src: str, dst: str, src_dir_fd: int, dst_dir_fd: int) -> bool:
    """Rename src to dst unless dst exists (FileExistsError then), in one atomic step,
    where link + unlink takes two directory changes. False when the kernel or the
    filesystem has no renameat2(RENAME_NOREPLACE): the caller links instead."""
    global _renameat2
    if _renameat2 is None:
        import ctypes  # here, not at import: the front ends never need it
        try:
            f = ctypes.CDLL(None, use_errno=True).renameat2
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
            f.restype = ctypes.c_int
            _renameat2 = (f, ctypes.get_errno)
        except AttributeError:      # a libc without it (glibc < 2.28)
            _renameat2 = False
    if not _renameat2:
        return False
    f, get_errno = _renameat2
    if f(src_dir_fd, src.encode("utf-8", "surrogateescape"), dst_dir_fd,
          dst.encode("utf-8", "surrogateescape"), RENAME_NOREPLACE) == 0:
        return True
    err = get_errno()
    import errno  # not at the top: the front ends import this module
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False        # this filesystem or kernel cannot: link and unlink
    raise OSError(err, posix.strerror(err), src)


ORDERED_FILESYSTEMS = ("ext4", "xfs", "btrfs")   # with a journal (ext4: when it has one)


def orders_metadata(path: str) -> bool:
    """True when the filesystem holding path makes metadata changes durable in the order
    they were made (the journal of ext4, xfs, btrfs: what lets a Maildir's new/ go
    without an fsync of its own, qpy.local.maildir). False for any other filesystem,
    for one that cannot be told, and for an ext4 made or mounted without a journal,
    which writes directory blocks back in no particular order."""
    import os  # not at the top: the front ends import this module, never this function
    try:
        dev = os.stat(path).st_dev
        kind = _fs_type(dev)
        if kind not in ORDERED_FILESYSTEMS:
            return False
        if kind != "ext4":
            return True
        # ext4 names itself by its block device (s_id) under /sys/fs/ext4/
        name = os.path.basename(os.path.realpath(
            "/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev))))
        try:
            with open("/sys/fs/ext4/%s/journal_task" % name) as f:
                return f.read().strip() != "<none>"
        except FileNotFoundError:       # a kernel before that file: jbd2's own entry
            return os.path.isdir("/proc/fs/jbd2/%s-8" % name)
    except OSError:
        return False


def _fs_type(dev: int) -> str:
    """The filesystem type of the mount whose device is dev (/proc/self/mountinfo)."""
    want = b"%d:%d" % (posix.major(dev), posix.minor(dev))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 3 and fields[2] == want and b"-" in fields:
                return fields[fields.index(b"-") + 1].decode("ascii", "replace")
    return ""


def _unlink_quietly(name: str, dfd: int) -> None:
    try:
        posix.unlink(name, dir_fd=dfd)
    except OSError:
        pass
