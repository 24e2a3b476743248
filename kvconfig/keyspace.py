"""
The in-memory keyspace: current keys in order, and a bounded window of history.

Every backend keeps one.  The local backends (memory, sqlite) decide each
change here; a remote backend (etcd) applies the events its watch delivers.
Either way reads are served from it without I/O.

It is built for a million keys: each key is one entry of a dict, its
metadata packed with its encoded value in one bytes object (no per-key
Python objects but the key and that entry, none of which the garbage
collector has to visit), and the key once in a SortedList (an insert costs
a few microseconds, not a copy of the whole key list).  A KeyValue is made
for each key read.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from kvconfig.errors import Compacted
from kvconfig.model import DELETE, PUT, Event, KeyValue

#: A key's entry: version, create_revision, mod_revision, expires_at (NaN for
#: none), then the value's tagged JSON.
_META = struct.Struct("<QQQd")
_pack_meta, _unpack_meta, _META_SIZE = _META.pack, _META.unpack_from, _META.size
_NONE = math.nan

#: (key, raw, version, create_revision, mod_revision, expires_at): a key as
#: backends load it.
Row = tuple[str, bytes, int, int, int, "float | None"]


def _entry(raw: bytes, version: int, create: int, mod: int, expires: float | None) -> bytes:
    return _pack_meta(version, create, mod, _NONE if expires is None else expires) + raw


def _key_value(key: str, entry: bytes) -> KeyValue:
    version, create, mod, expires = _unpack_meta(entry)
    return KeyValue(key, entry[_META_SIZE:], version, create, mod,
                    None if expires != expires else expires)


class Keyspace:
    """Keys, their metadata, the current revision and recent history."""

    def __init__(self, history_events: int, history_bytes: int) -> None:
        self._entries: dict[str, bytes] = {}
        self._keys = SortedList()
        #: key -> expires_at of the keys with a time to live.
        self._expiring: dict[str, float] = {}
        self._history: deque[Event] = deque()
        self._history_bytes = 0
        self._max_events = history_events
        self._max_bytes = history_bytes
        #: The revision of the latest change.
        self.revision = 0
        #: History holds every event after this revision, and none before.
        self.compact_revision = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> KeyValue | None:
        entry = self._entries.get(key)
        return None if entry is None else _key_value(key, entry)

    def raw(self, key: str) -> bytes | None:
        """The key's encoded value alone, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry[_META_SIZE:]

    def range(self, prefix: str, limit: int | None = None) -> list[KeyValue]:
        """Keys starting with *prefix*, in key order, at most *limit* of them."""
        return self.page(prefix, limit)[0]

    def page(self, prefix: str, limit: int | None = None, after: str | None = None,
             max_bytes: int | None = None) -> tuple[list[KeyValue], bool]:
        """(keys starting with *prefix* and after the key *after*, in key
        order; whether more follow), at most *limit* of them and, past the
        first, no more than *max_bytes* of keys and values in all."""
        keys, entries = self._keys, self._entries
        start = keys.bisect_left(prefix)
        if after is not None and after >= prefix:
            start = max(start, keys.bisect_right(after))
        found: list[KeyValue] = []
        size = 0
        for key in keys.islice(start):
            if not key.startswith(prefix):
                return found, False
            if limit is not None and len(found) >= limit:
                return found, True
            entry = entries[key]
            if max_bytes is not None:
                size += len(key) + len(entry) - _META_SIZE
                if size > max_bytes and found:
                    return found, True
            found.append(_key_value(key, entry))
        return found, False

    def expiring(self) -> Iterator[KeyValue]:
        """The keys with a time to live."""
        for key in list(self._expiring):
            yield _key_value(key, self._entries[key])

    def changes(self, prefix: str, since: int) -> list[Event]:
        """Events after revision *since* on keys starting with *prefix*.

        Raises Compacted when events after *since* have left the window.
        """
        if since < self.compact_revision:
            raise Compacted(since, self.compact_revision)
        history = self._history
        if not history or since >= history[-1].revision:
            return []
        # Revisions in the window are dense enough that scanning from the
        # end is cheap for the usual "what did I miss" question.
        start = len(history)
        while start > 0 and history[start - 1].revision > since:
            start -= 1
        return [
            event
            for index in range(start, len(history))
            if (event := history[index]).key.startswith(prefix)
        ]

    @property
    def history_length(self) -> int:
        return len(self._history)

    def apply(self, event: Event) -> None:
        """Make *event* the latest change."""
        key = event.key
        if event.type == PUT:
            kv = event.kv
            if key not in self._entries:
                self._keys.add(key)
            self._entries[key] = _entry(kv.raw, kv.version, kv.create_revision,
                                        kv.mod_revision, kv.expires_at)
            if kv.expires_at is not None:
                self._expiring[key] = kv.expires_at
            else:
                self._expiring.pop(key, None)
        elif event.type == DELETE:
            if self._entries.pop(key, None) is not None:
                self._keys.remove(key)
                self._expiring.pop(key, None)
        else:
            raise ValueError(f"unknown event type {event.type!r}")
        self.revision = event.revision
        self._remember(event)

    def load(self, rows: Iterable[Row], history: list[Event], revision: int,
             compact_revision: int) -> None:
        """Replace everything with a snapshot (from disk, or from etcd)."""
        entries: dict[str, bytes] = {}
        expiring: dict[str, float] = {}
        for key, raw, version, create, mod, expires in rows:
            entries[key] = _entry(raw, version, create, mod, expires)
            if expires is not None:
                expiring[key] = expires
        self._entries, self._expiring = entries, expiring
        self._keys = SortedList(entries)
        self._history.clear()
        self._history_bytes = 0
        self.revision = revision
        self.compact_revision = compact_revision
        for event in history:
            self._remember(event)

    def _remember(self, event: Event) -> None:
        history = self._history
        history.append(event)
        self._history_bytes += event.size
        while len(history) > self._max_events or (
            self._history_bytes > self._max_bytes and len(history) > 1
        ):
            dropped = history.popleft()
            self._history_bytes -= dropped.size
            self.compact_revision = dropped.revision


def row_of(kv: KeyValue) -> Row:
    """A KeyValue as a row to load."""
    return kv.key, kv.raw, kv.version, kv.create_revision, kv.mod_revision, kv.expires_at
