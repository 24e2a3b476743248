"""
The replica: this node's copy of its prefix in etcd, kept by a watch.

On start the node reads its prefix at one revision R (in pages pinned to
R), then watches the prefix from R+1.  Reads are served from the replica,
without I/O, and every event the watch delivers (this node's writes and
every other node's) is applied to it and published on the change feed in
revision order.  History for ``changes()`` starts at the node's start: an
older ``since`` is answered ``compacted``, after which a client takes a
snapshot, as for any compacted history.

A watch that breaks is reopened on the next member from the replica's
revision + 1, so nothing is lost or repeated.  One cancelled because that
history was compacted, or that brings a message too large to hold, makes
the node read its prefix again, diff it against the replica and publish
the differences.  A watch that says nothing for ``--etcd-timeout`` seconds
has its member asked for its status; one that does not answer, or has no
leader, is taken for hung and the watch reopened on another member.

The answers waiting for the replica to agree with etcd (acknowledgements of
this node's writes, answers that change nothing) are released as it
changes; one that waits too long fails, and the watch, which brought
nothing for that long, is reopened.  How well the replica follows etcd is
its Health.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvconfig.backends.answers import PendingAnswers
from kvconfig.backends.etcd.client import (
    EtcdClient,
    EtcdError,
    MessageTooLarge,
    WatchStream,
    b64,
    prefix_end,
    unb64,
)
from kvconfig.backends.etcd.codec import Codec
from kvconfig.backends.etcd.health import LOADING, Health
from kvconfig.feed import ChangeFeed
from kvconfig.keyspace import Keyspace, row_of
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue

if TYPE_CHECKING:
    from kvconfig.backends.etcd.writes import KeyWrites

#: Keys read per page when loading the replica.
PAGE_SIZE = 500

# Allowances beyond the largest value kvconfig writes, for values other
# writers put under the prefix and for base64 and JSON framing.
MAX_WATCH_MESSAGE = 64 << 20


def differences(keyspace: Keyspace, kvs: list[KeyValue], revision: int) -> list[Event]:
    """The events that take *keyspace* to the snapshot *kvs* at *revision*,
    in the order to publish them: a put for each key that changed, at its
    mod_revision, in revision order, then a delete at *revision* for each
    key the snapshot no longer has."""
    fresh = {kv.key: kv for kv in kvs}
    events = [Event(PUT, kv.key, kv.mod_revision, kv) for kv in kvs
              if (old := keyspace.get(kv.key)) is None
              or old.mod_revision != kv.mod_revision]
    events.sort(key=lambda event: event.revision)
    events += [Event(DELETE, kv.key, revision) for kv in keyspace.range("")
               if kv.key not in fresh]
    return events


class Replica:
    """This node's copy of its etcd prefix: loaded, watched, resynchronised."""

    log = Logger()

    def __init__(self, client: EtcdClient, clock: IReactorTime, codec: Codec, limits: Limits,
                 timeout: float, in_flight: Mapping[str, KeyWrites]) -> None:
        """*in_flight*: this node's writes in flight, by key (kept by the
        write pipeline), which the watch's events are matched with."""
        self.client = client
        self.clock = clock
        self.codec = codec
        self.timeout = timeout
        self.keyspace = Keyspace(limits.history_events, limits.history_bytes)
        self.feed = ChangeFeed()
        self.health = Health(len(client.endpoints), self._cluster_lost)
        #: Answers waiting for the replica to agree with etcd.
        self.answers = PendingAnswers(clock, timeout, expired=self._answers_expired)
        #: The watch keeping the replica, once open.
        self.watch: WatchStream | None = None
        self.watch_restarts = 0
        self.resyncs = 0
        self._in_flight = in_flight
        # When the watch last said anything, and whether its member is being asked.
        self._last_heard = 0.0
        self._probing = False
        self._liveness: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        self._started: Deferred | None = None
        self._stopping = False

    def start(self) -> Deferred:
        """Fires once the replica is loaded; until then it keeps trying."""
        self._started = Deferred()
        self.resync()
        self._liveness = LoopingCall(self.check_watch)
        self._liveness.clock = self.clock
        self._liveness.start(self.timeout, now=False)
        return self._started

    def stop(self) -> None:
        """Read, reopen and probe no more; the watch stays open, so that the
        writes in flight are still acknowledged, until close()."""
        self._stopping = True
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()

    def suspect(self, endpoint: str, reason: str) -> None:
        """A call to *endpoint* got no answer: if the watch is on that member,
        reopen it on another, from the replica's revision."""
        if self.watch is not None and self.watch.endpoint == endpoint:
            self.watch.close(ConnectionError(reason))

    # Loading, and resynchronising after compaction.

    def resync(self) -> None:
        """Read the prefix afresh, bring the replica to it, and watch from there."""
        if self._stopping:
            return
        self._load().addCallbacks(self._loaded, self._load_failed)

    @inlineCallbacks
    def _load(self):
        start = self.codec.prefix
        end = b64(prefix_end(start))
        revision = None
        kvs = []
        while True:
            request = {"key": b64(start), "range_end": end, "limit": str(PAGE_SIZE)}
            if revision is not None:
                request["revision"] = str(revision)
            answer = yield self.client.call("/v3/kv/range", request)
            if revision is None:
                revision = int(answer["header"]["revision"])
            page = answer.get("kvs", [])
            kvs.extend(kv for kv in map(self._key_value, page) if kv is not None)
            if not answer.get("more", False) or not page:
                return revision, kvs
            start = unb64(page[-1]["key"]) + b"\x00"

    def _loaded(self, result: tuple[int, list[KeyValue]]) -> None:
        revision, kvs = result
        if self._stopping:
            return
        if self.health.state == LOADING:
            self.keyspace.load(map(row_of, kvs), [], revision, revision)
            # WATCH answers with the feed's revision: the revision the replica
            # is at, not 0, before the first event arrives.
            self.feed.revision = revision
            self.log.info("replica loaded from {endpoint}: {keys} keys at revision {revision}",
                          endpoint=self.client.endpoint, keys=len(kvs), revision=revision)
        else:
            self._apply_differences(kvs, revision)
        self.health.loaded()
        self._watch_from(revision + 1)
        if self._started is not None and not self._started.called:
            self._started.callback(None)

    def _load_failed(self, failure) -> None:
        if self._stopping:
            return
        self.log.warn("reading the prefix from etcd failed: {error}", error=failure.value)
        endpoint = getattr(failure.value, "endpoint", None)
        if endpoint == self.client.endpoint:
            self.client.move_on()  # that member has no leader, or is hung
        self.health.member_failed(str(failure.value))
        self._retry_later(self.resync)

    def _apply_differences(self, kvs: list[KeyValue], revision: int) -> None:
        """Publish what changed between the replica and a snapshot at
        *revision*, so that consumers end equal to the snapshot."""
        self.resyncs += 1
        keyspace, feed = self.keyspace, self.feed
        events = differences(keyspace, kvs, revision)
        for event in events:
            keyspace.apply(event)
            feed.publish(event)
        keyspace.revision = max(keyspace.revision, revision)
        feed.revision = max(feed.revision, revision)
        self.log.info("replica resynchronised with etcd at revision {revision}: "
                      "{count} differences", revision=revision, count=len(events))
        self.answers.release()

    # The watch.

    def _watch_from(self, start_revision: int) -> None:
        if self._stopping:
            return
        endpoint = self.client.endpoint
        prefix = self.codec.prefix
        request = {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                   "start_revision": str(start_revision)}
        d = self.client.watch(endpoint, request, self._on_message, MAX_WATCH_MESSAGE)
        d.addCallbacks(self._watch_opened, self._watch_failed, errbackArgs=(endpoint,))

    def _watch_opened(self, stream: WatchStream) -> None:
        if self._stopping:
            stream.close()
            return
        self.watch = stream
        stream.done.addCallback(self._watch_ended, stream)

    def _watch_failed(self, failure, endpoint: str) -> None:
        if self._stopping:
            return
        self.log.info("watch on {endpoint} could not start: {error}",
                      endpoint=endpoint, error=failure.value)
        self._member_failed(endpoint, str(failure.value))

    def _watch_ended(self, reason: BaseException, stream: WatchStream) -> None:
        if self.watch is stream:
            self.watch = None
        if self._stopping or stream.resyncing:
            return
        self.log.info("watch on {endpoint} ended: {reason}",
                      endpoint=stream.endpoint, reason=reason)
        if isinstance(reason, MessageTooLarge):
            # Reopening from the same revision would bring the same message:
            # read the prefix afresh instead.
            self.health.watch_broke(str(reason))
            self.resync()
            return
        self._member_failed(stream.endpoint, str(reason))

    def _member_failed(self, endpoint: str, reason: str) -> None:
        """The watch on *endpoint* failed or ended: try the next member."""
        self.health.watch_broke(f"the watch on {endpoint} broke: {reason}")
        self.watch_restarts += 1
        if self.client.endpoint == endpoint:
            self.client.move_on()
        self.health.member_failed(reason)
        self._retry_later(lambda: self._watch_from(self.keyspace.revision + 1))

    def _retry_later(self, action: Callable[[], None]) -> None:
        """Run *action* now while members remain to try this round, then
        with a growing delay."""
        if self._stopping:
            return
        self._retry = self.clock.callLater(self.health.retry_delay(), action)

    def _cluster_lost(self, reason: str) -> None:
        if self.watch is not None:
            self.watch.close(ConnectionError(reason))

    def _answers_expired(self, count: int) -> None:
        # etcd answered but the watch brought nothing for that long: its
        # member may be hung with the connection open.  Reopen it (on the
        # next member) from the replica's revision.
        if self.watch is not None:
            self.watch.close(ConnectionError(
                f"the watch brought no event for {self.timeout:g} s"))

    def check_watch(self) -> None:
        """A watch that has said nothing for a while may be idle, or its
        member may be hung with the connection open: ask that member, and
        reopen the watch elsewhere if it does not answer or has no leader."""
        stream = self.watch
        if (stream is None or self._probing
                or self.clock.seconds() - self._last_heard < self.timeout):
            return
        self._probing = True

        def answered(answer: dict) -> None:
            if int(answer.get("leader", 0)) == 0:
                stream.close(ConnectionError(f"{stream.endpoint} has no leader"))

        def failed(failure) -> None:
            stream.close(ConnectionError(
                f"{stream.endpoint} did not answer a status request: {failure.value}"))

        def done(_) -> None:
            self._probing = False

        d = self.client.status(stream.endpoint)
        d.addCallbacks(answered, failed).addBoth(done)

    def _on_message(self, message: dict) -> None:
        self._last_heard = self.clock.seconds()
        result = message.get("result")
        stream = self.watch
        if result is None:
            error = message.get("error", message)
            if stream is not None:
                stream.close(EtcdError(self.client.endpoint, 0, int(error.get("grpc_code", -1)),
                                       str(error.get("message"))))
            return
        compact_revision = int(result.get("compact_revision", 0))
        if compact_revision:
            self.log.info("watch history compacted at {revision}; re-reading the prefix",
                          revision=compact_revision)
            if stream is not None:
                stream.resyncing = True
                stream.close()
            self.health.watch_broke(f"history from revision {self.keyspace.revision + 1} "
                                    f"was compacted (at {compact_revision})")
            self.resync()
            return
        if result.get("canceled"):
            if stream is not None:
                stream.close(ConnectionError(f"watch cancelled: {result.get('cancel_reason')}"))
            return
        if result.get("created"):
            self.health.watch_created(self.client.endpoint)
        events = result.get("events")
        if events:
            self._apply(events)

    def _apply(self, events: list[dict]) -> None:
        keyspace, feed, in_flight = self.keyspace, self.feed, self._in_flight
        for raw_event in events:
            kv = raw_event["kv"]
            revision = int(kv["mod_revision"])
            if revision < keyspace.revision:
                # Never expected (a watch reopens after the replica's
                # revision, and several events of one txn share a revision),
                # but the feed must not go backwards.
                continue
            key = self.codec.key(kv)
            if key is None:
                continue
            if raw_event.get("type") == "DELETE":
                event = Event(DELETE, key, revision)
            else:
                writes = in_flight.get(key)
                if writes is None or writes.put is None:
                    new = self.codec.key_value(key, kv)
                else:
                    new = self.codec.key_value(key, kv, writes.put)
                    writes.applied.append(new)
                event = Event(PUT, key, revision, new)
            keyspace.apply(event)
            feed.publish(event)
        self.answers.release()

    def _key_value(self, kv: dict) -> KeyValue | None:
        key = self.codec.key(kv)
        if key is None:
            return None
        writes = self._in_flight.get(key)
        return self.codec.key_value(key, kv, writes.put if writes is not None else None)
