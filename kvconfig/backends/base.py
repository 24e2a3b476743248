"""
The backend interface, and the logic the local backends (memory, sqlite) share.

A backend owns the keyspace (served from memory, without I/O), decides or
learns every change, makes it durable, and only then publishes it on its
change feed and fires the writer's Deferred.  The store above it checks and
encodes what clients send; the backend trusts what it gets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from kvconfig.backends.answers import PendingAnswers
from kvconfig.errors import CompareFailed, KVConfigError, Unavailable
from kvconfig.feed import ChangeFeed
from kvconfig.keyspace import Keyspace
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Absent, Event, KeyValue

#: One write of a run given to write_many: (PUT or DELETE, key, raw,
#: prev_revision, ttl).
Write = tuple[str, str, "bytes | None", "int | None", "float | None"]


class IBackend(Interface):
    """What the store needs of a backend; the contract suite checks it."""

    name = Attribute("Short name of the backend kind, as in --store.")
    durable = Attribute("True if an acknowledged write survives a crash.")
    keyspace = Attribute("The Keyspace reads are served from.")
    feed = Attribute("The ChangeFeed events are published on, in revision order.")
    ready = Attribute("True once the keyspace may be read (after start).")
    clock = Attribute("The clock TTLs count on: KeyValue.expires_at is in its seconds.")
    stale = Attribute("True while the keyspace may lag the store of record "
                      "(a remote backend out of touch with it).")

    def start() -> Deferred:
        """Open storage and load the keyspace; fires when reads may be served."""

    def stop() -> Deferred:
        """Finish pending writes and close storage."""

    def put(key: str, raw: bytes, prev_revision: int | None,
            ttl: float | None) -> Deferred:
        """Write *key*; fires with the put Event once durable.

        *prev_revision* (if not None) must equal the key's mod_revision, 0
        meaning "only if absent", else the Deferred fails with CompareFailed.
        With *ttl* (seconds) the key is deleted, as an expired event, after
        that long unless written again.
        """

    def delete(key: str, prev_revision: int | None) -> Deferred:
        """Delete *key*; fires with the delete Event, or None if it was absent."""

    def write_many(writes: list[Write]) -> Deferred:
        """Make *writes* (each ``(PUT or DELETE, key, raw, prev_revision,
        ttl)``, raw and ttl None for a delete) as put() and delete() would,
        in order, each decided seeing the ones before it; fires once all
        are durable with their outcomes in order: an Event, an Absent (a
        delete of an absent key) or a CompareFailed.  A local backend's run fails
        as a whole if it cannot be made durable; a backend whose writes are
        made one by one (write_each) gives each failure as that write's
        outcome."""

    def stats() -> dict:
        """The backend's own counters, for the store's stats()."""


def write_each(backend: IBackend, writes: list[Write]) -> Deferred:
    """write_many for a backend whose writes are made one by one: each
    outcome in order, a write's failure (its KVConfigError) among them."""
    made = []
    for op, key, raw, prev_revision, ttl in writes:
        try:
            made.append(backend.put(key, raw, prev_revision, ttl) if op is PUT
                        else backend.delete(key, prev_revision))
        except KVConfigError as e:
            made.append(fail(e))
    return DeferredList(made, consumeErrors=True).addCallback(
        lambda results: [_outcome(backend, ok, result) for ok, result in results])


def _outcome(backend: IBackend, ok: bool, result: Any) -> Any:
    """A write's result as write_many gives it: a failure as its
    KVConfigError (the Failure itself for any other, which the store
    reports), an absent key's delete as Absent at the revision known now."""
    if not ok:
        return result.value if isinstance(result.value, KVConfigError) else result
    return Absent(backend.keyspace.revision) if result is None else result


class LocalBackend:
    """A backend that decides every change itself.

    The keyspace holds durable state only: reads, listings, history and the
    feed never show a change that could still be lost.  Changes decided but
    not yet durable wait in an overlay that only later decisions consult
    (compare-and-set, versions, the next revision).  Subclasses say how a
    change becomes durable by overriding ``_persist``, and call
    ``_make_durable`` once it is.
    """

    log = Logger()

    name = "local"
    durable = False
    # A local backend decides every change itself: its keyspace is the
    # store of record, never behind it.
    ready = True
    stale = False

    def __init__(self, clock: IReactorTime, limits: Limits) -> None:
        self.clock = clock
        self.limits = limits
        self.keyspace = Keyspace(limits.history_events, limits.history_bytes)
        self.feed = ChangeFeed()
        self._expiry: dict[str, IDelayedCall] = {}
        # key -> (revision, KeyValue or None when deleted), not yet durable
        self._overlay: dict[str, tuple[int, KeyValue | None]] = {}
        # Answers waiting for the change they rest on to be durable.
        self._answers = PendingAnswers()
        self._decided_revision = 0
        self.expired = 0

    def start(self) -> Deferred:
        self._decided_revision = self.keyspace.revision
        self._schedule_all_expiry()
        return succeed(None)

    def stop(self) -> Deferred:
        self._cancel_all_expiry()
        return succeed(None)

    def put(self, key: str, raw: bytes, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        self._check_writable()
        decided = self._decide(PUT, key, raw, prev_revision, ttl)
        if type(decided) is Event:
            return self._persist(decided)
        return self._answer(key, decided)

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        self._check_writable()
        decided = self._decide(DELETE, key, None, prev_revision, None)
        if type(decided) is Event:
            return self._persist(decided)
        return self._answer(key, None if type(decided) is Absent else decided)

    def write_many(self, writes: list[Write]) -> Deferred:
        self._check_writable()
        outcomes: list[Event | CompareFailed | Absent] = []
        events: list[Event] = []
        rests_on = 0  # the latest change not yet durable an outcome rests on
        overlay = self._overlay
        for write in writes:
            decided = self._decide(*write)
            if type(decided) is Event:
                events.append(decided)
            else:
                pending = overlay.get(write[1])
                if pending is not None and pending[0] > rests_on:
                    rests_on = pending[0]
                if type(decided) is Absent and decided.revision > rests_on:
                    rests_on = decided.revision  # it says "absent as of" that
            outcomes.append(decided)
        if events:
            # Every change decided before them is durable before they are.
            made = self._persist_many(events)
        else:
            keyspace = self.keyspace
            made = self._answers.when(lambda: keyspace.revision >= rests_on, None)
        return made.addCallback(lambda _: outcomes)

    def _decide(self, op: str, key: str, raw: bytes | None, prev_revision: int | None,
                ttl: float | None) -> Event | CompareFailed | Absent:
        """Decide one write, seeing every change decided before it: the
        Event it makes (decided, to be made durable), else its outcome (a
        CompareFailed, or Absent for the delete of an absent key)."""
        current = self._decided(key)
        if prev_revision is not None:
            actual = current.mod_revision if current else 0
            if actual != prev_revision:
                return CompareFailed(key, prev_revision, actual)
        revision = self._decided_revision + 1
        if op is PUT:
            kv = KeyValue(key, raw,
                          current.version + 1 if current else 1,
                          current.create_revision if current else revision,
                          revision,
                          self.clock.seconds() + ttl if ttl else None)
            event = Event(PUT, key, revision, kv)
        elif current is None:
            return Absent(self._decided_revision)
        else:
            kv = None
            event = Event(DELETE, key, revision)
        self._decided_revision = revision
        self._overlay[key] = (revision, kv)
        if kv is not None and kv.expires_at is not None or key in self._expiry:
            self._schedule_expiry(key, kv)
        return event

    def _check_writable(self) -> None:
        """Raise Unavailable when no change can be made durable now."""

    def _decided(self, key: str) -> KeyValue | None:
        """The key as the changes decided so far leave it, durable or not."""
        pending = self._overlay.get(key)
        return self.keyspace.get(key) if pending is None else pending[1]

    def _answer(self, key: str, outcome: object) -> Deferred:
        """An answer that changes nothing (a failed compare, an absent key).

        If it rests on a change to *key* not yet durable, it waits for that
        change, and fails with it, so that no client hears of state that a
        failed commit could take back.
        """
        pending = self._overlay.get(key)
        revision = pending[0] if pending is not None else 0
        keyspace = self.keyspace
        return self._answers.when(lambda: keyspace.revision >= revision, outcome)

    def _change(self, event: Event) -> Deferred:
        self._decided_revision = event.revision
        self._overlay[event.key] = (event.revision, event.kv)
        self._schedule_expiry(event.key, event.kv)
        return self._persist(event)

    def _persist(self, event: Event) -> Deferred:
        """Make *event* durable, then call _make_durable; fires with *event*."""
        self._make_durable([event])
        return succeed(event)

    def _persist_many(self, events: list[Event]) -> Deferred:
        """Make *events* durable together, as _persist does one; fires with
        the last."""
        self._make_durable(events)
        return succeed(events[-1])

    def _make_durable(self, events: list[Event]) -> None:
        """*events* are durable: show them to readers, then publish them."""
        overlay = self._overlay
        for event in events:
            self.keyspace.apply(event)
            pending = overlay.get(event.key)
            if pending is not None and pending[0] <= event.revision:
                del overlay[event.key]
        self._publish(events)

    def _publish(self, events: list[Event]) -> None:
        """Publish durable *events*, and release the answers waiting on them."""
        for event in events:
            self.feed.publish(event)
        self._answers.release()

    def stats(self) -> dict[str, int]:
        return {"expired": self.expired}

    def _forget_undecided(self) -> None:
        """After a failure: only durable state (the keyspace) stands."""
        self._overlay.clear()
        self._decided_revision = self.keyspace.revision
        self._schedule_all_expiry()
        self._answers.release()
        self._answers.fail(Unavailable("the change this answer rested on was not committed"))

    # TTL keys: one timer per key; a timer only deletes the write that set it.

    def _schedule_expiry(self, key: str, kv: KeyValue | None) -> None:
        call = self._expiry.pop(key, None)
        if call is not None and call.active():
            call.cancel()
        if kv is not None and kv.expires_at is not None:
            delay = max(0.0, kv.expires_at - self.clock.seconds())
            self._expiry[key] = self.clock.callLater(delay, self._expire, key, kv.mod_revision)

    def _expire(self, key: str, mod_revision: int) -> None:
        self._expiry.pop(key, None)
        current = self._decided(key)
        if current is None or current.mod_revision != mod_revision:
            return
        try:
            self._check_writable()
        except Unavailable:
            self._expiry[key] = self.clock.callLater(1.0, self._expire, key, mod_revision)
            return
        self.expired += 1
        event = Event(DELETE, key, self._decided_revision + 1, expired=True)
        # Nobody waits on an expiry, so its failure is only logged; the key
        # stays until the next write or restart expires it again.
        self._change(event).addErrback(
            lambda failure: self.log.failure("expiring {key} failed", failure, key=key)
        )

    def _schedule_all_expiry(self) -> None:
        self._cancel_all_expiry()
        for kv in self.keyspace.expiring():
            self._schedule_expiry(kv.key, kv)

    def _cancel_all_expiry(self) -> None:
        for call in self._expiry.values():
            if call.active():
                call.cancel()
        self._expiry.clear()
