"""
The store: the one core every interface talks to.

It checks and encodes what clients send (keys, values, revisions, TTLs),
passes changes to its backend, serves reads from the backend's keyspace and
exposes the backend's change feed.  It knows nothing of HTTP, lines or
datagrams: protocols translate their wire forms to these calls and map the
errors of kvconfig.errors back to theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvconfig import __version__, values
from kvconfig.backends import IBackend
from kvconfig.errors import (
    CompareFailed,
    InternalError,
    InvalidArgument,
    KVConfigError,
    Unavailable,
    brief,
)
from kvconfig.feed import ChangeFeed
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue

log = Logger()


class Budget:
    """The bytes held for clients, all connections together: request bodies
    and partial lines being read, requests waiting, watch backlogs
    (--max-buffer-bytes), and of that at most --max-buffer-bytes-per-address
    for the connections of one address.  Each interface asks it before
    holding more, and refuses (a typed error, or a dropped watch) when it
    says no, so that many connections cannot multiply a per-connection
    limit, nor those of one address take what every other client needs."""

    def __init__(self, limit: int, per_address: int | None = None) -> None:
        self.limit = limit
        self.per_address = limit if per_address is None else per_address
        self.held = 0
        self.refused = 0
        #: Bytes held by the connections of each address holding any.
        self._by_address: dict[str | None, int] = {}
        #: Why the last refusal was made: the bound, as a client is told it.
        self.refusal = ""

    def take(self, size: int, address: str | None = None) -> bool:
        """Hold *size* more bytes for a connection from *address* (None: one
        without an address, such as a UNIX socket's), if the bounds allow."""
        by_address = self._by_address
        mine = by_address.get(address, 0)
        if self.held + size > self.limit:
            self.refusal = f"{self.limit} bytes for all connections, --max-buffer-bytes"
        elif address is not None and mine + size > self.per_address:
            self.refusal = (f"{self.per_address} bytes for the connections of one address, "
                            "--max-buffer-bytes-per-address")
        else:
            self.held += size
            by_address[address] = mine + size
            return True
        self.refused += 1
        return False

    def give(self, size: int, address: str | None = None) -> None:
        self.held -= size
        left = self._by_address.get(address, 0) - size
        if left > 0:
            self._by_address[address] = left
        else:
            self._by_address.pop(address, None)

    def stats(self) -> dict[str, int]:
        # What is held at a moment is for metrics, not stats(): it changes
        # with how a client's bytes happened to arrive.
        return {"refused": self.refused, "limit_bytes": self.limit}


class Store:
    """A revisioned key-value store over one backend."""

    def __init__(self, backend: IBackend, limits: Limits | None = None) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.counters = {"reads": 0, "puts": 0, "deletes": 0, "compare_failures": 0,
                         "rejected": 0}
        self._interface_stats: dict[str, Callable[[], dict[str, Any]]] = {}
        #: What is held for clients, all connections of all interfaces together.
        self.budget = Budget(self.limits.max_buffer_bytes,
                             self.limits.max_buffer_bytes_per_address)
        #: Writes made and not yet answered (durable or failed), and their bytes.
        self.writes_in_flight = 0
        self.write_bytes_in_flight = 0
        self._waiting_for_room: list[Callable[[], None]] = []
        #: Whether the sessions log a line per change they make
        #: (kvconfig.changelog); --no-change-log turns it off.
        self.log_changes = True

    @property
    def feed(self) -> ChangeFeed:
        return self.backend.feed

    @property
    def revision(self) -> int:
        return self.backend.keyspace.revision

    @property
    def stale(self) -> bool:
        """True while reads may lag the store of record (etcd out of reach);
        the interfaces say so beside what they read."""
        return self.backend.stale

    def start(self) -> Deferred:
        return self.backend.start()

    def stop(self) -> Deferred:
        return self.backend.stop()

    # Reads: synchronous, from the keyspace in memory.

    def get(self, key: str) -> KeyValue | None:
        """The key's value and metadata, or None."""
        values.check_key(key, self.limits.max_key_bytes)
        backend = self.backend
        if not backend.ready:
            self._check_ready()
        self.counters["reads"] += 1
        return backend.keyspace.get(key)

    def load(self, key: str) -> Any:
        """The key's value, or None."""
        kv = self.get(key)
        return None if kv is None else kv.value

    def ttl(self, key: str) -> float | None:
        """Seconds the key has left before it expires (-1 if it has no time
        to live), or None if it is absent."""
        kv = self.get(key)
        if kv is None:
            return None
        if kv.expires_at is None:
            return -1
        return max(0.0, kv.expires_at - self.backend.clock.seconds())

    def range(self, prefix: str, limit: int | None = None,
              after: str | None = None) -> tuple[int, list[KeyValue], bool]:
        """(revision, keys starting with *prefix* in key order, whether more
        follow): one page, a snapshot at that revision.

        A page holds at most *limit* keys (and never more than
        --max-list-items) and, past its first key, at most --max-reply-bytes
        of keys and values; the next page starts *after* the last key of
        this one.  Pages are each a snapshot of their own revision: to
        follow a prefix, take ``changes(prefix, since)`` from the first
        page's revision once the last is read.
        """
        limits = self.limits
        values.check_prefix(prefix, limits.max_key_bytes)
        if limit is not None:
            _check_int(limit, "limit", minimum=1)
        if after is not None:
            values.check_key(after, limits.max_key_bytes)
        self._check_ready()
        self.counters["reads"] += 1
        keyspace = self.backend.keyspace
        kvs, more = keyspace.page(prefix, min(limit or limits.max_list_items,
                                              limits.max_list_items),
                                  after, limits.max_reply_bytes)
        return keyspace.revision, kvs, more

    def changes(self, prefix: str, since: int) -> tuple[int, list[Event]]:
        """(revision, events after revision *since* under *prefix*).

        Raises Compacted when that history is gone.
        """
        values.check_prefix(prefix, self.limits.max_key_bytes)
        _check_int(since, "since", minimum=0)
        self._check_ready()
        self.counters["reads"] += 1
        keyspace = self.backend.keyspace
        return keyspace.revision, keyspace.changes(prefix, since)

    def _check_ready(self) -> None:
        if not self.backend.ready:
            # A remote backend before its first snapshot: an empty answer
            # would be a lie, not merely stale.
            raise Unavailable("not yet in step with the store (still loading)")

    # Writes: Deferreds that fire once the change is durable.

    def put(self, key: str, value: Any, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        """Write *key*; fires with its new KeyValue.

        *prev_revision*: compare-and-set on mod_revision (0: only if absent).
        *ttl*: seconds until the key is deleted unless written again.
        """
        try:
            limits = self.limits
            values.check_key(key, limits.max_key_bytes)
            # Only the encoding is kept: every reader decodes a copy of its
            # own, the same whichever interface wrote it.
            raw = values.encode(value, limits.max_value_bytes, limits.max_value_depth)
            if prev_revision is not None:
                _check_int(prev_revision, "prev_revision", minimum=0)
            if ttl is not None:
                _check_ttl(ttl)
            d = self.backend.put(key, raw, prev_revision, ttl)
        except KVConfigError as e:
            return self._rejected(e)
        self.counters["puts"] += 1
        return self._in_flight(d, len(raw) + len(key), _kv_of)

    def save(self, key: str, value: Any) -> Deferred:
        """The classic save: fires with None once durable."""
        return self.put(key, value).addCallback(lambda _: None)

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        """Delete *key*; fires with the delete's revision, or None if absent."""
        try:
            values.check_key(key, self.limits.max_key_bytes)
            if prev_revision is not None:
                _check_int(prev_revision, "prev_revision", minimum=0)
            d = self.backend.delete(key, prev_revision)
        except KVConfigError as e:
            return self._rejected(e)
        self.counters["deletes"] += 1
        return self._in_flight(d, len(key), _revision_of)

    def write_many(self, writes: list[tuple[str, str, Any, int | None, float | None]]) -> Deferred:
        """A run of writes, each ``(PUT or DELETE, key, value, prev_revision,
        ttl)`` (value and ttl None for a delete), made in order as put() and
        delete() would make them, sharing one commit; fires once all are
        answered with each one's outcome in order: its KeyValue (a put), its
        revision (a delete), Absent (a delete of an absent key) or the
        KVConfigError it failed with.  It never fails."""
        limits = self.limits
        max_key_bytes, max_value_bytes = limits.max_key_bytes, limits.max_value_bytes
        outcomes: list[Any] = []
        checked: list[tuple] = []   # (op, key, raw, prev, ttl) for the backend
        size = 0
        for op, key, value, prev_revision, ttl in writes:
            try:
                values.check_key(key, max_key_bytes)
                raw = None
                if op is PUT:
                    raw = values.encode(value, max_value_bytes, limits.max_value_depth)
                    size += len(raw)
                if prev_revision is not None:
                    _check_int(prev_revision, "prev_revision", minimum=0)
                if ttl is not None:
                    _check_ttl(ttl)
            except KVConfigError as e:
                self.counters["rejected"] += 1
                outcomes.append(e)
                continue
            size += len(key)
            checked.append((op, key, raw, prev_revision, ttl))
            outcomes.append(checked)  # a place: the backend's outcome goes here
        if not checked:
            return succeed(outcomes)
        try:
            made = self.backend.write_many(checked)
        except KVConfigError as e:
            return succeed([e if outcome is checked else outcome for outcome in outcomes])
        self.counters["puts"] += sum(1 for write in checked if write[0] is PUT)
        self.counters["deletes"] += sum(1 for write in checked if write[0] is DELETE)
        return self._in_flight(made, size, lambda made: self._outcomes(outcomes, checked, made),
                               len(checked)).addErrback(
            lambda failure: [outcome_of(failure) if outcome is checked else outcome
                             for outcome in outcomes])

    def _outcomes(self, outcomes: list[Any], place: list, made: list[Any]) -> list[Any]:
        """*outcomes* with each place of a checked write filled with what the
        backend made of it, in order."""
        made_of = iter(made)
        answers = []
        for outcome in outcomes:
            if outcome is place:
                outcome = next(made_of)
                if type(outcome) is Event:
                    outcome = outcome.kv if outcome.type is PUT else outcome.revision
                elif isinstance(outcome, CompareFailed):
                    self.counters["compare_failures"] += 1
                elif isinstance(outcome, Failure):
                    outcome = outcome_of(outcome)
            answers.append(outcome)
        return answers

    # The bound on writes waiting for their commit, in total (each client's
    # own is kept by its Session).

    def _in_flight(self, d: Deferred, size: int, answer: Callable[[Any], Any],
                   count: int = 1) -> Deferred:
        """*d*, the backend's Deferred of *count* writes of *size* bytes,
        counted in flight until it fires; it fires with what *answer* makes
        of its result, or fails (counted) as the writes did."""
        if d.called:
            return d.addBoth(self._answered, 0, answer, 0)  # at once: never in flight
        self.writes_in_flight += count
        self.write_bytes_in_flight += size
        return d.addBoth(self._answered, size, answer, count)

    def _answered(self, result: Any, size: int, answer: Callable[[Any], Any],
                  count: int = 1) -> Any:
        # One callback for all a write's answer needs: it runs for every write.
        if size:
            self.writes_in_flight -= count
            self.write_bytes_in_flight -= size
            if self._waiting_for_room and self.has_write_room(0):
                waiting, self._waiting_for_room = self._waiting_for_room, []
                for wake in waiting:
                    wake()
        if isinstance(result, Failure):
            if result.check(CompareFailed):
                self.counters["compare_failures"] += 1
            return result
        return answer(result)

    def has_write_room(self, size: int) -> bool:
        """Whether a write of *size* bytes fits under --max-write-bytes with
        the writes in flight (one always fits when none is)."""
        return (not self.writes_in_flight
                or self.write_bytes_in_flight + size <= self.limits.max_write_bytes)

    def when_write_room(self, wake: Callable[[], None]) -> None:
        """Call *wake* (once) when writes in flight have made room."""
        if wake not in self._waiting_for_room:
            self._waiting_for_room.append(wake)

    def _rejected(self, error: KVConfigError) -> Deferred:
        self.counters["compare_failures" if isinstance(error, CompareFailed) else "rejected"] += 1
        return fail(error)

    def add_stats(self, interface: str, stats: Callable[[], dict[str, Any]]) -> None:
        """Include an interface's counters in stats(), as ``<interface>_<name>``."""
        self._interface_stats[interface] = stats

    def stats(self) -> dict[str, Any]:
        backend = self.backend
        keyspace = backend.keyspace
        stats = {
            "version": __version__,
            "backend": backend.name,
            "durable": backend.durable,
            "stale": backend.stale,
            "keys": len(keyspace),
            "revision": keyspace.revision,
            "compact_revision": keyspace.compact_revision,
            "history_events": keyspace.history_length,
            "feed_consumers": backend.feed.consumers,
            "feed_published": backend.feed.published,
        }
        stats.update(backend.stats())
        stats.update(self.counters)
        stats.update({f"buffers_{name}": value for name, value in self.budget.stats().items()})
        stats["writes_in_flight"] = self.writes_in_flight
        stats["write_bytes_in_flight"] = self.write_bytes_in_flight
        for interface, interface_stats in self._interface_stats.items():
            stats.update({f"{interface}_{name}": value
                          for name, value in interface_stats().items()})
        return stats


def outcome_of(result: Any) -> Any:
    """A request's result as its outcome: a Failure becomes the
    KVConfigError it holds, or (logged) an InternalError."""
    if isinstance(result, Failure):
        if isinstance(result.value, KVConfigError):
            return result.value
        log.failure("request failed", result)
        return InternalError(f"internal error: {result.type.__name__}")
    return result


def _kv_of(event: Event) -> KeyValue:
    return event.kv


def _revision_of(event: Event | None) -> int | None:
    return None if event is None else event.revision


def _check_int(number: Any, name: str, minimum: int) -> None:
    if type(number) is not int or number < minimum:
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, not {brief(number)}")


def _check_ttl(ttl: Any) -> None:
    if type(ttl) not in (int, float) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgument(f"ttl must be a number of seconds > 0, not {brief(ttl)}")
