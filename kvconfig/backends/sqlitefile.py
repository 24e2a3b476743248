"""
The sqlite store file: its schema, reading it, and writing batches of changes.

Shared by the sqlite backend (which reads the file and may commit in
process) and its writer process (kvconfig.backends.sqlitewriter), so that
there is one way to write the file.

Tables: ``kv`` (the current keys), ``events`` (the history window, trimmed
in the same transaction that adds to it; it always holds the newest event,
so revisions never go backwards across restarts, even when the newest change
was a delete) and ``meta`` (compact_revision).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import islice

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
#: (kv rows to upsert, keys to delete, event rows, compact_revision or 0).
Batch = tuple[list[tuple], list[tuple[str]], list[tuple], int]


def open_db(path: str) -> sqlite3.Connection:
    """Open (creating if need be) a store file: WAL, fsync on every commit."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


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
        _event_from_row(*row)
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


def _event_from_row(revision, type_, key, raw, version, create, expires, expired) -> Event:
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


def make_batch(events: list[Event], compact_revision: int) -> Batch:
    """The rows that make *events* durable; *compact_revision* (if not 0)
    trims the history up to it."""
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
    return upserts, deletes, rows, compact_revision


def write_batches(db: sqlite3.Connection, batches: list[Batch]) -> None:
    """Commit *batches*, in order, in one transaction (one fsync).

    Raises sqlite3.Error, having rolled back, if they cannot be committed.
    """
    try:
        db.execute("BEGIN IMMEDIATE")
        compact_revision = 0
        for upserts, deletes, rows, compact in batches:
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)", upserts)
            db.executemany("DELETE FROM kv WHERE key = ?", deletes)
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            compact_revision = max(compact_revision, compact)
        if compact_revision:
            db.execute("DELETE FROM events WHERE revision <= ?", (compact_revision,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('compact_revision', ?)",
                       (compact_revision,))
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
