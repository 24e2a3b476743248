"""
The in-memory keyspace: current keys in order, and a bounded window of history.

Every backend keeps one.  The local backends (memory, sqlite) decide each
change here; a remote backend (etcd) applies the events its watch delivers.
Either way reads are served from it without I/O.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque

from kvconfig.errors import Compacted
from kvconfig.model import DELETE, PUT, Event, KeyValue


class Keyspace:
    """Keys, their metadata, the current revision and recent history."""

    def __init__(self, history_events: int, history_bytes: int) -> None:
        self._kvs: dict[str, KeyValue] = {}
        self._sorted_keys: list[str] = []
        self._history: deque[Event] = deque()
        self._history_bytes = 0
        self._max_events = history_events
        self._max_bytes = history_bytes
        #: The revision of the latest change.
        self.revision = 0
        #: History holds every event after this revision, and none before.
        self.compact_revision = 0

    def __len__(self) -> int:
        return len(self._kvs)

    def get(self, key: str) -> KeyValue | None:
        return self._kvs.get(key)

    def range(self, prefix: str, limit: int | None = None) -> list[KeyValue]:
        """Keys starting with *prefix*, in key order, at most *limit* of them."""
        return self.page(prefix, limit)[0]

    def page(self, prefix: str, limit: int | None = None, after: str | None = None,
             max_bytes: int | None = None) -> tuple[list[KeyValue], bool]:
        """(keys starting with *prefix* and after the key *after*, in key
        order; whether more follow), at most *limit* of them and, past the
        first, no more than *max_bytes* of keys and values in all."""
        keys, kvs = self._sorted_keys, self._kvs
        start = bisect_left(keys, prefix)
        if after is not None and after >= prefix:
            start = max(start, bisect_right(keys, after))
        found: list[KeyValue] = []
        size = 0
        for index in range(start, len(keys)):
            key = keys[index]
            if not key.startswith(prefix):
                return found, False
            if limit is not None and len(found) >= limit:
                return found, True
            kv = kvs[key]
            if max_bytes is not None:
                size += len(key) + len(kv.raw)
                if size > max_bytes and found:
                    return found, True
            found.append(kv)
        return found, False

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
            if key not in self._kvs:
                insort(self._sorted_keys, key)
            self._kvs[key] = event.kv
        elif event.type == DELETE:
            if self._kvs.pop(key, None) is not None:
                keys = self._sorted_keys
                del keys[bisect_left(keys, key)]
        else:
            raise ValueError(f"unknown event type {event.type!r}")
        self.revision = event.revision
        self._remember(event)

    def load(self, kvs: list[KeyValue], history: list[Event], revision: int,
             compact_revision: int) -> None:
        """Replace everything with a snapshot (from disk, or from etcd)."""
        self._kvs = {kv.key: kv for kv in kvs}
        self._sorted_keys = sorted(self._kvs)
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
