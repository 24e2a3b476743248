"""
The sqlite writer process: commits the backend's batches off the reactor.

``python -m kvconfig.backends.sqlitewriter PATH`` is spawned by the sqlite
backend (no threads: a child process with pipes).  Protocol, over its
stdin and stdout:

- it writes ``ready\\n`` once the store file is open;
- it reads frames: a 4-byte big-endian length, then a ``marshal``-ed Batch
  (see kvconfig.backends.sqlitefile);
- it commits every frame it has in one transaction, so batches that queue
  up while a commit's fsync runs share the next one (group commit), then
  writes one ``ok\\n`` per frame, in order;
- on a failed commit it writes the error to stderr and exits 1, committing
  nothing further: the backend then reloads the file to learn what is
  durable, and starts a new writer;
- it exits 0 at the end of its stdin.  It ignores SIGINT and SIGTERM, so a
  Ctrl-C or a service stop reaching the whole process group cannot cut it
  short: its life is tied to the pipe from the server.
"""

from __future__ import annotations

import marshal
import os
import signal
import sqlite3
import sys

from kvconfig.backends.sqlitefile import open_db, write_batches


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def serve(path: str, stdin: int = 0, stdout: int = 1) -> int:
    db = open_db(path)
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
        try:
            write_batches(db, batches)
        except sqlite3.Error as e:
            sys.stderr.write(f"commit failed: {e}\n")
            return 1
        _write_all(stdout, b"ok\n" * len(batches))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
