"""
One server per sqlite store: the exclusive lock beside the file.

``PATH-lock`` (beside the store ``PATH``) is locked with ``flock`` by the
server before it opens the store, and the locked descriptor is handed to its
writer process (kvconfig.backends.sqlitewriter), which holds the same lock
for as long as it lives.  So no second server can load the file while
another server, or a writer that outlived its server (one stuck in a disk
write, say), may still commit to it: a commit the new server did not see
could otherwise clash with its own, and a recovery fooled by it would
acknowledge a write that is not there.

The lock file holds, for people and for the error message, the server's pid
(written by the server) and its current writer's (written by the writer).
It is never deleted: removing a lock file that another process may be
about to lock is how two processes end up holding "the" lock.
"""

from __future__ import annotations

import fcntl
import os


def lock_path(store_path: str) -> str:
    return f"{store_path}-lock"


class StoreLocked(Exception):
    """Another process holds the store's lock; the message says which."""


class StoreLock:
    """The lock on one store, held through an open descriptor (``fd``)."""

    def __init__(self, store_path: str) -> None:
        """Take the lock, or raise StoreLocked naming its holder (OSError if
        the lock file cannot be opened)."""
        self.path = lock_path(store_path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read(fd))
            os.close(fd)
            raise StoreLocked(f"it is in use by {holder}, which holds its lock {self.path}; "
                              "one server at a time may open a store") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        record_holder(fd, server=os.getpid())

    def release(self) -> None:
        """Close the descriptor; the lock is free once no writer holds it either."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def record_holder(fd: int, server: int, writer: int | None = None) -> None:
    """Write who holds the lock into the lock file open on *fd*."""
    text = f"server {server}\n" + (f"writer {writer}\n" if writer is not None else "")
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def check_held(fd: int, store_path: str) -> None:
    """Make sure that *fd* is the lock file of *store_path* and that it holds
    the lock (as a writer inheriting it from its server does); raise
    StoreLocked if another process holds it, OSError if *fd* is not it."""
    opened, named = os.fstat(fd), os.stat(lock_path(store_path))
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise OSError(f"descriptor {fd} is not the lock file {lock_path(store_path)}")
    try:
        # On the descriptor that already holds it, this changes nothing.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreLocked(f"the store is in use by {describe_holder(_read(fd))}") from None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("ascii", "replace")
    except OSError:
        return ""


def describe_holder(text: str) -> str:
    """Who holds the lock, from the lock file's *text*, checking who is alive."""
    pids = {}
    for line in text.splitlines():
        role, _, pid = line.partition(" ")
        if pid.isdigit():
            pids[role] = int(pid)
    server, writer = pids.get("server"), pids.get("writer")
    if server is not None and _alive(server):
        return f"kvconfig server process {server}"
    if writer is not None and _alive(writer):
        return (f"process {writer}, the sqlite writer of kvconfig server process {server}, "
                "which has exited (the writer exits once its disk write returns)")
    return "another process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie has closed its descriptors: it holds no lock.
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:][:1] != "Z"
