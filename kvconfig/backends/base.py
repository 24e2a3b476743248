"""
The backend interface, and the logic the local backends (memory, sqlite) share.

A backend owns the keyspace (served from memory, without I/O), decides or
learns every change, makes it durable, and only then publishes it on its
change feed and fires the writer's Deferred.  The store above it checks and
encodes what clients send; the backend trusts what it gets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from kvconfig.errors import CompareFailed
from kvconfig.feed import ChangeFeed
from kvconfig.keyspace import Keyspace
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue


class IBackend(Interface):
    """What the store needs of a backend; the contract suite checks it."""

    name = Attribute("Short name of the backend kind, as in --store.")
    durable = Attribute("True if an acknowledged write survives a crash.")
    keyspace = Attribute("The Keyspace reads are served from.")
    feed = Attribute("The ChangeFeed events are published on, in revision order.")

    def start() -> Deferred:
        """Open storage and load the keyspace; fires when reads may be served."""

    def stop() -> Deferred:
        """Finish pending writes and close storage."""

    def put(key: str, value: Any, raw: bytes, prev_revision: int | None,
            ttl: float | None) -> Deferred:
        """Write *key*; fires with the put Event once durable.

        *prev_revision* (if not None) must equal the key's mod_revision, 0
        meaning "only if absent", else the Deferred fails with CompareFailed.
        With *ttl* (seconds) the key is deleted, as an expired event, after
        that long unless written again.
        """

    def delete(key: str, prev_revision: int | None) -> Deferred:
        """Delete *key*; fires with the delete Event, or None if it was absent."""


class LocalBackend:
    """A backend that decides every change itself, from its own keyspace.

    Subclasses say how a change becomes durable by overriding ``_persist``.
    """

    log = Logger()

    name = "local"
    durable = False

    def __init__(self, clock: IReactorTime, limits: Limits) -> None:
        self.clock = clock
        self.limits = limits
        self.keyspace = Keyspace(limits.history_events, limits.history_bytes)
        self.feed = ChangeFeed()
        self._expiry: dict[str, IDelayedCall] = {}
        self.expired = 0

    def start(self) -> Deferred:
        self._schedule_all_expiry()
        return succeed(None)

    def stop(self) -> Deferred:
        self._cancel_all_expiry()
        return succeed(None)

    def put(self, key: str, value: Any, raw: bytes, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        current = self.keyspace.get(key)
        self._compare(key, current, prev_revision)
        revision = self.keyspace.revision + 1
        kv = KeyValue(
            key=key,
            value=value,
            raw=raw,
            version=current.version + 1 if current else 1,
            create_revision=current.create_revision if current else revision,
            mod_revision=revision,
            expires_at=self.clock.seconds() + ttl if ttl else None,
        )
        return self._change(Event(PUT, key, revision, kv))

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        current = self.keyspace.get(key)
        self._compare(key, current, prev_revision)
        if current is None:
            return succeed(None)
        return self._change(Event(DELETE, key, self.keyspace.revision + 1))

    @staticmethod
    def _compare(key: str, current: KeyValue | None, prev_revision: int | None) -> None:
        if prev_revision is None:
            return
        actual = current.mod_revision if current else 0
        if actual != prev_revision:
            raise CompareFailed(key, prev_revision, actual)

    def _change(self, event: Event) -> Deferred:
        self.keyspace.apply(event)
        self._schedule_expiry(event.key, event.kv)
        return self._persist(event)

    def _persist(self, event: Event) -> Deferred:
        """Make *event* durable, then publish it; fires with *event*."""
        self.feed.publish(event)
        return succeed(event)

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
        current = self.keyspace.get(key)
        if current is None or current.mod_revision != mod_revision:
            return
        self.expired += 1
        event = Event(DELETE, key, self.keyspace.revision + 1, expired=True)
        # Nobody waits on an expiry, so its failure is only logged; the key
        # stays until the next write or restart expires it again.
        self._change(event).addErrback(
            lambda failure: self.log.failure("expiring {key} failed", failure, key=key)
        )

    def _schedule_all_expiry(self) -> None:
        self._cancel_all_expiry()
        for kv in self.keyspace.range(""):
            if kv.expires_at is not None:
                self._schedule_expiry(kv.key, kv)

    def _cancel_all_expiry(self) -> None:
        for call in self._expiry.values():
            if call.active():
                call.cancel()
        self._expiry.clear()
