"""
The sqlite store file: its schema, reading it, and writing batches of changes.

Shared by the sqlite backend (which reads the file and may commit in
process) and its writer process (kvconfig.backends.sqlitewriter), so that
there is one way to write the file.

Tables: ``kv`` (the current keys), ``events`` (the history window, trimmed
in the same transaction that adds to it; it always holds the newest event,
so revisions never go backwards across restarts, even when the newest change
was a delete) and ``meta``: compact_revision, and the identity of the last
batch committed (``commit_writer``, the committing server's random nonce,
and ``commit_batch``, its sequence number), written in the same transaction
as the batch, so that a server recovering from a failed writer can tell
from the file which of its batches committed: revisions alone cannot say
who wrote them.

The write-ahead log is bounded: ``journal_size_limit`` truncates it when
sqlite restarts it, and a commit that leaves it over WAL_SIZE_LIMIT
checkpoints it and truncates it at once (unless a reader outside kvconfig,
a backup say, still needs it: then at a later commit).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from kvconfig import values
from kvconfig.errors import KVConfigError
from kvconfig.keyspace import Row
from kvconfig.model import PUT, Event, KeyValue

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    raw BLOB NOT NULL,
    version INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    expires_at REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    raw BLOB,
    version INTEGER,
    create_revision INTEGER,
    expires_at REAL,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

#: A batch as it travels to the writer process (marshal-able plain data):
#: (kv rows to upsert, keys to delete, event rows, compact_revision or 0,
#: writer nonce, batch sequence).
Batch = tuple[list[tuple], list[tuple[str]], list[tuple], int, int, int]

#: Bytes the -wal file may keep between checkpoints (it can pass this only by
#: one transaction, or while a reader outside kvconfig holds an old snapshot).
WAL_SIZE_LIMIT = 64 << 20

#: Milliseconds a connection waits for a lock held by another connection.
BUSY_TIMEOUT_MS = 30_000


def open_db(path: str) -> sqlite3.Connection:
    """Open (creating if need be) a store file: WAL, fsync on every commit."""
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    db.executescript(SCHEMA)
    return db


def bound_wal(db: sqlite3.Connection, path: str) -> None:
    """After a commit: if the -wal file has grown past WAL_SIZE_LIMIT,
    checkpoint it and truncate it, without waiting for other readers."""
    try:
        size = os.stat(f"{path}-wal").st_size
    except OSError:
        return
    if size <= WAL_SIZE_LIMIT:
        return
    # A reader outside kvconfig (a backup) may still need the log: then the
    # checkpoint does what it can and a later commit tries again.
    db.execute("PRAGMA busy_timeout=0")
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class CorruptStore(Exception):
    """A row of the store file cannot be read back: the message names the
    table and the key."""


def read_state(db: sqlite3.Connection) -> tuple[Iterator[Row], list[Event], int, int]:
    """(keys as rows, history, revision, compact_revision) as last committed.

    The keys come in key order, as Keyspace.load takes them, read as they
    are consumed (while *db* is open): a million of them are never all in
    memory as rows at once.  Raises CorruptStore when a row does not hold
    what kvconfig wrote (while the rows are read, for those).
    """
    meta = dict(db.execute("SELECT name, value FROM meta"))
    history = [
        event_from_row(*row)
        for row in db.execute(
            "SELECT revision, type, key, raw, version, create_revision, expires_at, expired"
            " FROM events ORDER BY revision"
        )
    ]
    compact_revision = meta.get("compact_revision", 0)
    revision = history[-1].revision if history else compact_revision
    rows = db.execute("SELECT key, raw, version, create_revision, mod_revision, expires_at"
                      " FROM kv ORDER BY key")
    return _checked(rows), history, revision, compact_revision


#: Rows whose values are checked together at start-up.
_CHECKED_TOGETHER = 4096


def _checked(rows: Iterable[Row]) -> Iterator[Row]:
    """The rows, each value checked to be what kvconfig wrote: JSON, a few
    thousand at a time in one parse (a value at a time would be a third of
    a start-up at a million keys); a chunk that fails is checked value by
    value, to name the key."""
    rows = iter(rows)
    while chunk := list(islice(rows, _CHECKED_TOGETHER)):
        try:
            # As many as there are rows: a corrupt "1,2" would pass as two.
            whole = len(json.loads(b"[" + b",".join(row[1] for row in chunk) + b"]")) \
                == len(chunk)
        except (ValueError, TypeError, RecursionError):
            whole = False
        if not whole:
            for key, raw, *_ in chunk:
                _check_value(raw, "kv", key)
        yield from chunk


def event_from_row(revision, type_, key, raw, version, create, expires, expired) -> Event:
    kv = None
    if type_ == PUT:
        _check_value(raw, f"events (revision {revision})", key)
        kv = KeyValue(key, raw, version, create, revision, expires)
    return Event(type_, key, revision, kv, bool(expired))


def _check_value(raw: object, where: str, key: object) -> None:
    try:
        values.decode(raw)
    except (ValueError, TypeError, AttributeError, RecursionError, KVConfigError) as e:
        raise CorruptStore(f"the value of key {key!r} in table {where} cannot be read: "
                           f"{e}") from None


def make_batch(events: list[Event], compact_revision: int, writer: int = 0,
               sequence: int = 0) -> Batch:
    """The rows that make *events* durable; *compact_revision* (if not 0)
    trims the history up to it.  (*writer*, *sequence*) is the batch's
    identity, recorded in the file with it."""
    # Only each key's last change in the batch decides its row in kv.
    last = {event.key: event for event in events}
    upserts = [
        (kv.key, kv.raw, kv.version, kv.create_revision, kv.mod_revision, kv.expires_at)
        for event in last.values()
        if (kv := event.kv) is not None
    ]
    deletes = [(key,) for key, event in last.items() if event.kv is None]
    rows = []
    for event in events:
        kv = event.kv
        if kv is None:
            rows.append((event.revision, event.type, event.key, None, None, None, None,
                         int(event.expired)))
        else:
            rows.append((event.revision, event.type, event.key, kv.raw, kv.version,
                         kv.create_revision, kv.expires_at, 0))
    return upserts, deletes, rows, compact_revision, writer, sequence


def write_batches(db: sqlite3.Connection, batches: list[Batch]) -> None:
    """Commit *batches*, in order, in one transaction (one fsync), with the
    identity of the last one.

    Raises sqlite3.Error, having rolled back, if they cannot be committed.
    """
    try:
        db.execute("BEGIN IMMEDIATE")
        compact_revision = 0
        for upserts, deletes, rows, compact, _, _ in batches:
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)", upserts)
            db.executemany("DELETE FROM kv WHERE key = ?", deletes)
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            compact_revision = max(compact_revision, compact)
        if compact_revision:
            db.execute("DELETE FROM events WHERE revision <= ?", (compact_revision,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('compact_revision', ?)",
                       (compact_revision,))
        *_, writer, sequence = batches[-1]
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       [("commit_writer", writer), ("commit_batch", sequence)])
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


#: A Tail's ``since`` asking for everything (a full re-read).
EVERYTHING = -1

_KV_COLUMNS = "key, raw, version, create_revision, mod_revision, expires_at"
_EVENT_COLUMNS = "revision, type, key, raw, version, create_revision, expires_at, expired"


def read_tail(db: sqlite3.Connection, since: int) -> dict[str, Any]:
    """What the file holds after revision *since* (the last one a server
    acknowledged), as marshal-able rows: the events after it, the kv rows
    of their keys, the identity of the last batch committed, and the
    compact revision.  Reads only that much, unless the file does not go
    on from *since* (its history was trimmed past it, or it ends before
    it, as only another process could make it): then it holds every row
    and ``full`` is true, as with *since* = EVERYTHING.  tail_contents
    checks and decodes it.

    Raises sqlite3.Error if the file cannot be read.
    """
    db.execute("BEGIN")  # one snapshot
    try:
        meta = dict(db.execute("SELECT name, value FROM meta"))
        compact = meta.get("compact_revision", 0)
        (newest,) = db.execute("SELECT max(revision) FROM events").fetchone()
        newest = compact if newest is None else newest
        full = since == EVERYTHING or compact > since or newest < since
        if full:
            events = db.execute(f"SELECT {_EVENT_COLUMNS} FROM events"
                                " ORDER BY revision").fetchall()
            kvs = db.execute(f"SELECT {_KV_COLUMNS} FROM kv ORDER BY key").fetchall()
        else:
            events = db.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE revision > ?"
                                " ORDER BY revision", (since,)).fetchall()
            keys = sorted({row[2] for row in events})
            kvs = []
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                kvs += db.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key IN"
                                  f" ({', '.join('?' * len(chunk))})", chunk).fetchall()
    finally:
        db.execute("COMMIT")
    return {"since": since, "full": full, "compact_revision": compact, "revision": newest,
            "writer": meta.get("commit_writer", 0), "batch": meta.get("commit_batch", 0),
            "events": events, "kvs": kvs}


def tail_contents(tail: dict[str, Any]) -> tuple[list[Event], list[Row]]:
    """The events and kv rows of a read_tail, checked.

    Raises CorruptStore when a row does not hold what kvconfig wrote.
    """
    return [event_from_row(*row) for row in tail["events"]], list(_checked(tail["kvs"]))
