"""
The sqlite writer process: commits the backend's batches off the reactor.

``python -m kvconfig.backends.sqlitewriter PATH SERVER_PID [--recover SINCE]``
is spawned by the sqlite backend (no threads: a child process with pipes),
with the store's lock (kvconfig.backends.sqlitelock) on descriptor 3.

Its life is its server's: Linux kills it when the server dies
(``PR_SET_PDEATHSIG``), and before each commit it checks that its parent is
still SERVER_PID, committing nothing once orphaned.  It holds the store's
lock for as long as it lives, so a new server cannot load the file while
the old writer could still commit to it.  It ignores SIGINT and SIGTERM,
so a Ctrl-C or a service stop reaching the whole process group cannot cut
short the commits its server is waiting for.

Protocol, over its stdin and stdout:

- with ``--recover SINCE`` (a writer started after another one failed), it
  first writes ``tail <n>\\n`` and n bytes: a ``marshal``-ed
  kvconfig.backends.sqlitefile.read_tail of what the file holds after
  revision SINCE, so that the server learns what is durable without
  reading the file on its reactor;
- it writes ``ready\\n`` once it takes batches;
- it reads frames: a 4-byte big-endian length, then a ``marshal``-ed Batch
  (see kvconfig.backends.sqlitefile), which carries its identity;
- it commits every frame it has in one transaction, so batches that queue
  up while a commit's fsync runs share the next one (group commit), then
  writes one ``ok\\n`` per frame, in order;
- on a failed commit it writes the error to stderr and exits 1, committing
  nothing further: the backend then starts a new writer with ``--recover``;
- it exits 0 at the end of its stdin.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import signal
import sqlite3
import sys

from kvconfig.backends.sqlitefile import bound_wal, open_db, read_tail, write_batches
from kvconfig.backends.sqlitelock import StoreLocked, check_held, record_holder

#: The descriptor on which the writer inherits its server's store lock.
LOCK_FD = 3

#: Set (to 1) in a server's environment, and so in its writers', this keeps
#: the writers from asking Linux to kill them when the server dies, as a
#: writer stuck in a disk write cannot be killed until it returns.  Tests
#: use it to reproduce such a writer; it still commits nothing once orphaned.
NO_DEATH_SIGNAL_ENV = "KVCONFIG_WRITER_NO_DEATH_SIGNAL"

_PR_SET_PDEATHSIG = 1


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def tail_message(db: sqlite3.Connection, since: int) -> bytes:
    """The ``tail`` message: what the file holds after revision *since*."""
    payload = marshal.dumps(read_tail(db, since))
    return b"tail %d\n" % len(payload) + payload


def serve(path: str, server: int, recover_since: int | None = None, stdin: int = 0,
          stdout: int = 1, lock_fd: int = LOCK_FD) -> int:
    check_held(lock_fd, path)
    db = open_db(path)
    record_holder(lock_fd, server=server, writer=os.getpid())
    if recover_since is not None:
        _write_all(stdout, tail_message(db, recover_since))
    _write_all(stdout, b"ready\n")
    buffer = bytearray()
    while True:
        data = os.read(stdin, 1 << 20)
        if not data:
            return 0
        buffer += data
        batches = []
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + size:
                break
            batches.append(marshal.loads(bytes(buffer[4 : 4 + size])))
            del buffer[: 4 + size]
        if not batches:
            continue
        if os.getppid() != server:
            # Its batches were never acknowledged; a new server may be
            # waiting for the lock.
            sys.stderr.write("the server has exited: committing nothing more\n")
            return 3
        try:
            write_batches(db, batches)
        except sqlite3.Error as e:
            sys.stderr.write(f"commit failed: {e}\n")
            return 1
        _write_all(stdout, b"ok\n" * len(batches))
        try:
            bound_wal(db, path)
        except sqlite3.Error as e:
            sys.stderr.write(f"checkpoint failed: {e}\n")
            return 1


def die_with_parent(server: int) -> bool:
    """Have Linux kill this process when its parent dies; False if the
    parent is not *server* (it has died already)."""
    if sys.platform.startswith("linux") and not os.environ.get(NO_DEATH_SIGNAL_ENV):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            sys.stderr.write(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}\n")
    # Checked after asking: the parent may have died before.
    return os.getppid() == server


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path, server, *rest = (argv or sys.argv)[1:]
    recover_since = int(rest[1]) if rest[:1] == ["--recover"] else None
    if not die_with_parent(int(server)):
        sys.stderr.write("the server exited before its writer started\n")
        sys.exit(3)
    try:
        sys.exit(serve(path, int(server), recover_since))
    except (StoreLocked, OSError, sqlite3.Error) as e:
        sys.stderr.write(f"cannot serve {path}: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
