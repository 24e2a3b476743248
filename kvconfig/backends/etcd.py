"""
The etcd backend: cluster mode, several kvconfig nodes on one etcd v3 cluster.

``--store etcd:http://10.0.0.1:2379,http://10.0.0.2:2379`` with
``--etcd-prefix kvconfig/``: every kvconfig key ``K`` is the etcd key
``kvconfig/K``, so kvconfig can share a cluster.  Revisions, versions and
``create_revision``/``mod_revision`` are etcd's own; they are global to the
cluster, so they advance (with gaps) when other keys change too.

**The mirror.**  On start the node reads its prefix at a revision R (in
pages pinned to R), then watches the prefix from R+1.  Reads are served
from that local copy, without I/O, and every event the watch delivers (the
node's own writes and every other node's) is applied to it and published
on the change feed in revision order.  History for ``changes()`` starts at
the node's start: an older ``since`` is answered ``compacted``, after which
a client takes a snapshot, as for any compacted history.

**Writes** go to etcd as txns.  Unconditional puts and deletes made in one
reactor turn share one txn (group commit: one request, one raft entry, one
revision for them all, as several keys changed by one etcd transaction);
each put's new metadata comes with its watch event.  A compare-and-set goes
alone: the compare on ``mod_revision`` (0: only if
absent), the write, and the read, which when the compare failed gives the
actual ``mod_revision``.  A write is acknowledged only once the node's mirror has
its revision (read-your-writes on the node that made it).  An answer that
changes nothing (a failed compare, an absent key) waits until the mirror
agrees with it.  A TTL becomes an etcd lease of that many seconds (rounded
up to whole seconds, and to etcd's minimum) granted for this write alone:
a rewrite attaches a new lease or none, which is kvconfig's "expires unless
written again", so no lease is ever kept alive.  etcd deletes the key when
its lease runs out, and every node sees that as a delete event.

**Failures.**  A watch that says nothing for ``--etcd-timeout`` seconds has its
member asked for its status; one that does not answer, or has no leader, is
taken for hung and the watch reopened on another.  A watch that breaks is
reopened on the next member from the mirror's revision + 1, so nothing is
lost or repeated; one cancelled because that history was compacted makes
the node re-read its prefix, diff it against the mirror and publish the
differences.  Calls that cannot connect
move on to the next member.  While no member has a leader (quorum lost) or
none can be reached, the node is *unavailable*: writes fail at once with
``unavailable``, reads go on from the mirror and say they may be stale, and
the node keeps trying, recovering by itself.  A write that was sent but not
answered (a member died, or etcd timed it out) fails with ``unavailable``
saying its outcome is unknown: it may have been applied, so it is never
retried behind the client's back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kvconfig import values
from kvconfig.backends.base import IBackend
from kvconfig.backends.etcdclient import (
    EtcdClient,
    EtcdError,
    MessageTooLarge,
    NoAnswer,
    Unreachable,
    WatchStream,
    b64,
    prefix_end,
    unb64,
)
from kvconfig.errors import CompareFailed, KVConfigError, Unavailable
from kvconfig.feed import ChangeFeed
from kvconfig.keyspace import Keyspace
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue

#: Most writes, and bytes of values, in one batch.  etcd allows 128
#: operations in a txn by default, and requests of 1.5 MiB.
MAX_BATCH_WRITES = 128
MAX_BATCH_BYTES = 512 << 10
#: Batches sent and not yet answered; writes made meanwhile wait and join
#: the next, so a busy node sends fewer, fuller txns.
MAX_BATCHES_IN_FLIGHT = 4
#: Keys read per page when loading the mirror.
PAGE_SIZE = 500
#: Seconds before retrying after every member failed; doubles up to MAX_RETRY.
FIRST_RETRY = 0.05
MAX_RETRY = 1.0
#: gRPC status codes etcd answers with.
UNAVAILABLE_CODES = {4, 14}  # deadline exceeded, unavailable (no leader, timed out)

# Allowances beyond the largest value kvconfig writes, for values other
# writers put under the prefix and for base64 and JSON framing.
_MAX_WATCH_MESSAGE = 64 << 20

LOADING, IN_STEP, CATCHING_UP, UNAVAILABLE = "loading", "in_step", "catching_up", "unavailable"


def parse_endpoints(argument: str) -> list[str]:
    """The member URLs of ``etcd:URL[,URL...]``; ValueError if malformed."""
    endpoints = [part.strip() for part in argument.split(",")]
    if not argument or not all(endpoints):
        raise ValueError("--store etcd: needs member URLs, as in etcd:http://127.0.0.1:2379")
    for endpoint in endpoints:
        scheme, sep, rest = endpoint.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
            raise ValueError(f"--store etcd: {endpoint!r} is not an http://HOST:PORT URL")
    return endpoints


def check_prefix(prefix: str) -> str:
    """A valid ``--etcd-prefix``: printable, no whitespace; may be empty."""
    if prefix and (not prefix.isprintable() or " " in prefix):
        raise ValueError(f"--etcd-prefix must not hold whitespace or control characters: "
                         f"{prefix!r}")
    return prefix


@implementer(IBackend)
class EtcdBackend:
    """kvconfig's keyspace kept in an etcd cluster, mirrored by a watch."""

    log = Logger()

    name = "etcd"
    durable = True

    def __init__(self, endpoints: list[str], prefix: str, clock, limits: Limits,
                 timeout: float = 5.0) -> None:
        self.clock = clock
        self.limits = limits
        self.prefix = prefix.encode("utf-8")
        self.keyspace = Keyspace(limits.history_events, limits.history_bytes)
        self.feed = ChangeFeed()
        self.client = EtcdClient(clock, endpoints, timeout)
        self.timeout = timeout
        self.state = LOADING
        #: Why the node is not in step, for errors and logs.
        self.reason = "not yet in step with etcd"
        # Answers waiting for the mirror, oldest first, and the one timer
        # that fails those that wait too long.
        self._waiters: list[_Waiter] = []
        self._waiter_timer: IDelayedCall | None = None
        # Fire as each write is acknowledged or fails (stop() waits for them).
        self._writes: set[Deferred] = set()
        # key -> the writes to it waiting for this node's write in flight
        self._writing: dict[str, list[tuple[Callable[[], Deferred], Deferred]]] = {}
        # key -> (raw, value) of the put of it this node has in flight
        self._sending: dict[str, tuple[bytes, Any]] = {}
        # key -> the puts the watch applied to it while this node was writing it
        self._seen_puts: dict[str, list[KeyValue]] = {}
        # Unconditional writes waiting for the next batch: (operation, etcd key, Deferred)
        self._batch: list[tuple[dict, str, Deferred]] = []
        self._batch_bytes = 0
        self._batch_call: IDelayedCall | None = None
        self._batches_in_flight = 0
        self._watch: WatchStream | None = None
        # When the watch last said anything, and whether its member is being asked.
        self._last_heard = 0.0
        self._probing = False
        self._liveness: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        self._retry_delay = FIRST_RETRY
        self._failures_this_round = 0
        self._started: Deferred | None = None
        self._stopping = False
        self.counters = {"etcd_batches": 0, "etcd_watch_restarts": 0, "etcd_resyncs": 0,
                         "etcd_unavailable_rejections": 0, "etcd_outcome_unknown": 0,
                         "etcd_skipped_keys": 0, "etcd_foreign_values": 0}

    # The IBackend interface.

    @property
    def ready(self) -> bool:
        return self.state != LOADING

    @property
    def stale(self) -> bool:
        return self.state != IN_STEP

    def start(self) -> Deferred:
        """Fires once the mirror is loaded; until then it keeps trying."""
        self._started = Deferred()
        self._resync()
        self._liveness = LoopingCall(self._check_watch)
        self._liveness.clock = self.clock
        self._liveness.start(self.timeout, now=False)
        return self._started

    @inlineCallbacks
    def stop(self):
        """Refuse new writes, fail those not yet sent, let those sent be
        answered and acknowledged (each within the timeout), then close."""
        self._stopping = True
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        batch, self._batch = self._batch, []
        for _, _, d in batch:
            d.errback(Unavailable("kvconfig is stopping; the write was not sent"))
        # Writes queued behind another to their key fail as their turn
        # comes (_answered); writes sent are answered, and acknowledged
        # once the watch brings them, or fail within the timeout.
        while self._writes:
            yield DeferredList(list(self._writes))
        if self._waiter_timer is not None and self._waiter_timer.active():
            self._waiter_timer.cancel()
        if self._watch is not None:
            self._watch.close()
        yield self.client.close()

    def put(self, key: str, value: Any, raw: bytes, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        self._check_writable()
        etcd_key = b64(self.prefix + key.encode("utf-8"))
        request: dict[str, Any] = {"key": etcd_key, "value": b64(raw)}

        def send() -> Deferred:
            self._sending[key] = (raw, value)
            if ttl:
                d = self.client.call("/v3/lease/grant", {"TTL": str(math.ceil(ttl))})
                d.addCallback(lambda answer: request.update(lease=answer["ID"]))
                d.addCallback(lambda _: self._txn(key, etcd_key, prev_revision,
                                                  {"request_put": request}))
            elif prev_revision is not None:
                d = self._txn(key, etcd_key, prev_revision, {"request_put": request})
            else:
                d = self._batched({"request_put": request}, etcd_key, len(raw))
            d.addCallback(self._put_done, key, value, raw)
            return d.addErrback(self._failed)

        return self._track(self._in_order(key, send))

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        self._check_writable()
        etcd_key = b64(self.prefix + key.encode("utf-8"))

        def send() -> Deferred:
            operation = {"request_delete_range": {"key": etcd_key}}
            if prev_revision is None:
                d = self._batched(operation, etcd_key, 0)
            else:
                d = self._txn(key, etcd_key, prev_revision, operation)
            d.addCallback(self._delete_done, key)
            return d.addErrback(self._failed)

        return self._track(self._in_order(key, send))

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"etcd_state": self.state,
                                 "etcd_endpoint": self.client.endpoint}
        stats.update(self.counters)
        return stats

    # Writes.

    def _check_writable(self) -> None:
        if self._stopping:
            raise Unavailable("kvconfig is stopping")
        if self.state in (LOADING, UNAVAILABLE):
            self.counters["etcd_unavailable_rejections"] += 1
            raise Unavailable(f"etcd is unavailable: {self.reason}; reads are answered "
                              "from this node's copy, which may be stale")

    def _track(self, write: Deferred) -> Deferred:
        """Count *write* as unfinished until it is acknowledged or failed
        (stop() waits for those)."""
        done: Deferred = Deferred()
        self._writes.add(done)

        def finished(result):
            self._writes.discard(done)
            done.callback(None)
            return result

        return write.addBoth(finished)

    def _in_order(self, key: str, send: Callable[[], Deferred]) -> Deferred:
        """Send a write to *key* once this node's earlier writes to it are
        answered: concurrent HTTP requests reach etcd in any order, and a
        client pipelining two writes to one key must see the second win.
        (Writes to different keys in flight together commit in either
        order, as with etcd itself.)"""
        queue = self._writing.get(key)
        if queue is None:
            self._writing[key] = []
            d = send()
        else:
            d = Deferred()
            queue.append((send, d))
        return d.addBoth(self._answered, key)

    def _answered(self, result, key: str):
        """A write to *key* is answered: send the next one queued behind it."""
        queue = self._writing.get(key)
        if queue:
            send, d = queue.pop(0)
            if self._stopping:
                d.errback(Unavailable("kvconfig is stopping; the write was not sent"))
            else:
                send().chainDeferred(d)
        else:
            self._writing.pop(key, None)
            self._seen_puts.pop(key, None)
            self._sending.pop(key, None)
        return result

    def _batched(self, operation: dict, etcd_key: str, size: int) -> Deferred:
        """Send an unconditional write in the next batch: the writes of one
        reactor turn go to etcd as one txn (one request, one raft entry, one
        revision), as the sqlite backend groups its commits.  Fires with
        (revision, the write's response, None)."""
        if self._batch and (len(self._batch) >= MAX_BATCH_WRITES
                            or self._batch_bytes + size > MAX_BATCH_BYTES):
            self._send_batch()
        if not self._batch and self._batches_in_flight < MAX_BATCHES_IN_FLIGHT:
            self._batch_call = self.clock.callLater(0, self._send_batch)
        d: Deferred = Deferred()
        self._batch.append((operation, etcd_key, d))
        self._batch_bytes += size
        return d

    def _send_batch(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        if not batch:
            return
        # A batch never holds one key twice (etcd refuses that): _in_order
        # sends a key's next write only once the last is answered.  The
        # metadata each put left comes with its watch event, which the
        # acknowledgement waits for anyway: reading it in the txn would
        # nearly double etcd's work.
        d = self.client.call("/v3/kv/txn", {"success": [operation for operation, _, _ in batch]})
        self.counters["etcd_batches"] += 1
        self._batches_in_flight += 1

        def answered(answer: dict) -> None:
            try:
                revision = int(answer["header"]["revision"])
                responses = answer["responses"]
                if len(responses) != len(batch):
                    raise ValueError(f"{len(responses)} responses to {len(batch)} writes")
            except (KeyError, TypeError, ValueError) as e:
                # Code 14: it may have been applied.
                failed(Failure(EtcdError(self.client.endpoint, 200, 14,
                                         f"a txn answer kvconfig cannot read: {e}")))
                return
            for (_, _, waiter), response in zip(batch, responses, strict=True):
                waiter.callback((revision, response, None))

        def failed(failure) -> None:
            for _, _, waiter in batch:
                if not waiter.called:
                    waiter.errback(failure)

        def next_batch(_) -> None:
            self._batches_in_flight -= 1
            if self._batch and (self._batch_call is None or not self._batch_call.active()):
                self._batch_call = self.clock.callLater(0, self._send_batch)

        d.addCallbacks(answered, failed).addBoth(next_batch)

    def _txn(self, key: str, etcd_key: str, prev_revision: int | None,
             operation: dict) -> Deferred:
        compare = []
        if prev_revision is not None:
            compare.append({"key": etcd_key, "target": "MOD", "result": "EQUAL",
                            "mod_revision": str(prev_revision)})
        read = {"request_range": {"key": etcd_key, "keys_only": True}}
        body = {"compare": compare, "success": [operation, read], "failure": [read]}
        d = self.client.call("/v3/kv/txn", body)
        d.addCallback(self._txn_answered, key, prev_revision)
        return d

    def _txn_answered(self, answer: dict, key: str, prev_revision: int | None):
        revision = int(answer["header"]["revision"])
        responses = answer.get("responses", [])
        kvs = responses[-1].get("response_range", {}).get("kvs", []) if responses else []
        meta = kvs[0] if kvs else None
        if not answer.get("succeeded", False):
            actual = int(meta.get("mod_revision", 0)) if meta else 0
            # Answer only once the mirror agrees, so that a read after this
            # answer shows what it rested on.
            return self._when(lambda: self._mod_revision(key) == actual
                              or self.keyspace.revision >= revision,
                              CompareFailed(key, prev_revision, actual), wrote=False)
        return revision, responses[0], meta

    def _put_done(self, result, key: str, value: Any, raw: bytes) -> Deferred:
        revision, _, meta = result
        if meta is None:
            # A batched put: its metadata comes with its watch event.
            return self._when(lambda: self.keyspace.revision >= revision,
                              lambda: Event(PUT, key, revision,
                                            self._written(key, revision, value, raw)),
                              wrote=True)
        kv = KeyValue(key=key, value=value, raw=raw, version=int(meta["version"]),
                      create_revision=int(meta["create_revision"]),
                      mod_revision=revision)
        return self._when(lambda: self.keyspace.revision >= revision,
                          Event(PUT, key, revision, kv), wrote=True)

    def _written(self, key: str, revision: int, value: Any, raw: bytes) -> KeyValue:
        """The KeyValue this node's put of *key* at *revision* made, as its
        watch event (already applied) gave it."""
        seen = self._seen_puts.get(key)
        if seen:
            found = [kv for kv in seen if kv.mod_revision == revision]
            # Those up to this write are of no use to later ones.
            seen[:] = [kv for kv in seen if kv.mod_revision > revision]
            if found:
                return found[0]
        current = self.keyspace.get(key)
        if current is not None and current.mod_revision == revision:
            return current
        # Only if etcd compacted the event away before the watch delivered
        # it, and the key changed again: a resync publishes only the latest
        # state, so this write's version is no longer known (0).
        return KeyValue(key=key, value=value, raw=raw, version=0, create_revision=0,
                        mod_revision=revision)

    def _delete_done(self, result, key: str) -> Deferred:
        revision, response, _ = result
        deleted = int(response.get("response_delete_range", {}).get("deleted", 0))
        if deleted:
            return self._when(lambda: self.keyspace.revision >= revision,
                              Event(DELETE, key, revision), wrote=True)
        return self._when(lambda: self.keyspace.get(key) is None
                          or self.keyspace.revision >= revision, None, wrote=False)

    def _mod_revision(self, key: str) -> int:
        kv = self.keyspace.get(key)
        return kv.mod_revision if kv is not None else 0

    def _when(self, condition: Callable[[], bool], outcome: object, wrote: bool) -> Deferred:
        """A Deferred with *outcome* (raised if an exception, called if a
        function) once *condition* holds of the mirror, or Unavailable if it
        does not within the timeout."""
        d: Deferred = Deferred()
        if condition():
            _settle(d, outcome)
            return d
        if not self._waiters:
            self._waiter_timer = self.clock.callLater(self.timeout, self._expire_waiters)
        self._waiters.append(_Waiter(condition, d, outcome, wrote,
                                     self.clock.seconds() + self.timeout))
        return d

    def _release_waiters(self) -> None:
        if not self._waiters:
            return
        ready, waiting = [], []
        for waiter in self._waiters:
            (ready if waiter.condition() else waiting).append(waiter)
        self._waiters = waiting
        if not waiting and self._waiter_timer is not None and self._waiter_timer.active():
            self._waiter_timer.cancel()
        for waiter in ready:
            _settle(waiter.d, waiter.outcome)

    def _expire_waiters(self) -> None:
        """One timer for every waiter (they share one timeout, so the first
        is the first to expire): fail those whose time is up."""
        now = self.clock.seconds()
        expired = [waiter for waiter in self._waiters if waiter.deadline <= now]
        self._waiters = [waiter for waiter in self._waiters if waiter.deadline > now]
        if self._waiters:
            self._waiter_timer = self.clock.callLater(
                max(0.0, self._waiters[0].deadline - now), self._expire_waiters)
        why = f" ({self.reason})" if self.reason else ""
        for waiter in expired:
            what = ("the write was made in etcd, but this node's copy has not caught up"
                    if waiter.wrote else "this node's copy has not caught up with etcd's answer")
            waiter.d.errback(Unavailable(f"{what} within {self.timeout:g} s{why}"))
        if expired and self._watch is not None:
            # etcd answered but the watch brought nothing for that long: its
            # member may be hung with the connection open.  Reopen it (on the
            # next member) from the mirror's revision.
            self._watch.close(ConnectionError(
                f"the watch brought no event for {self.timeout:g} s"))

    def _failed(self, failure):
        """Map what etcd or the network said to kvconfig's errors."""
        if failure.check(KVConfigError):
            return failure
        error = failure.value
        if isinstance(error, Unreachable):
            self._lost(str(error))
            raise Unavailable(f"etcd is unavailable: {error}")
        if isinstance(error, EtcdError) and error.code not in UNAVAILABLE_CODES:
            # etcd refused the request itself (too large, too many ops ...):
            # it was not applied.
            raise Unavailable(f"etcd refused the write: {error}")
        self.counters["etcd_outcome_unknown"] += 1
        if isinstance(error, EtcdError) and "leader" in error.message:
            self._lost(error.message)
        if isinstance(error, NoAnswer):
            self._suspect(error.endpoint, str(error))
        raise Unavailable(f"the write may or may not have been applied: {error}")

    def _suspect(self, endpoint: str, reason: str) -> None:
        """A call to *endpoint* got no answer: if the watch is on that member,
        reopen it on another, from the mirror's revision."""
        if self._watch is not None and self._watch.endpoint == endpoint:
            self._watch.close(ConnectionError(reason))

    # The mirror: load, watch, resync.

    def _resync(self) -> None:
        """Read the prefix afresh, bring the mirror to it, and watch from there."""
        if self._stopping:
            return
        self._load().addCallbacks(self._loaded, self._load_failed)

    @inlineCallbacks
    def _load(self):
        start = self.prefix
        end = b64(prefix_end(self.prefix))
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

    def _loaded(self, result) -> None:
        revision, kvs = result
        if self._stopping:
            return
        if self.state == LOADING:
            self.keyspace.load(kvs, [], revision, revision)
            # WATCH answers with the feed's revision: the revision the copy
            # is at, not 0, before the first event arrives.
            self.feed.revision = revision
            self.state = CATCHING_UP
            self.log.info("mirror loaded from {endpoint}: {keys} keys at revision {revision}",
                          endpoint=self.client.endpoint, keys=len(kvs), revision=revision)
        else:
            self._apply_differences(kvs, revision)
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
        self._round_failed(str(failure.value))
        self._retry_later(self._resync)

    def _apply_differences(self, kvs: list[KeyValue], revision: int) -> None:
        """After compaction: publish what changed between the mirror and a
        snapshot at *revision* (puts at their mod_revision, deletes at
        *revision*), so consumers end equal to the snapshot."""
        self.counters["etcd_resyncs"] += 1
        keyspace = self.keyspace
        fresh = {kv.key: kv for kv in kvs}
        events = [Event(PUT, kv.key, kv.mod_revision, kv) for kv in kvs
                  if (old := keyspace.get(kv.key)) is None
                  or old.mod_revision != kv.mod_revision]
        events.sort(key=lambda event: event.revision)
        events += [Event(DELETE, kv.key, revision) for kv in keyspace.range("")
                   if kv.key not in fresh]
        for event in events:
            keyspace.apply(event)
            self.feed.publish(event)
        keyspace.revision = max(keyspace.revision, revision)
        self.feed.revision = max(self.feed.revision, revision)
        self.log.info("resynchronised with etcd at revision {revision}: {count} differences",
                      revision=revision, count=len(events))
        self._release_waiters()

    def _watch_from(self, start_revision: int) -> None:
        if self._stopping:
            return
        endpoint = self.client.endpoint
        request = {"key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix)),
                   "start_revision": str(start_revision)}
        d = self.client.watch(endpoint, request, self._on_message, _MAX_WATCH_MESSAGE)
        d.addCallbacks(self._watch_opened, self._watch_failed, errbackArgs=(endpoint,))

    def _watch_opened(self, stream: WatchStream) -> None:
        if self._stopping:
            stream.close()
            return
        self._watch = stream
        stream.done.addCallback(self._watch_ended, stream)

    def _watch_failed(self, failure, endpoint: str) -> None:
        if self._stopping:
            return
        self.log.info("watch on {endpoint} could not start: {error}",
                      endpoint=endpoint, error=failure.value)
        self._member_failed(endpoint, str(failure.value))

    def _watch_ended(self, reason: BaseException, stream: WatchStream) -> None:
        if self._watch is stream:
            self._watch = None
        if self._stopping or stream.resyncing:
            return
        self.log.info("watch on {endpoint} ended: {reason}",
                      endpoint=stream.endpoint, reason=reason)
        if isinstance(reason, MessageTooLarge):
            # Reopening from the same revision would bring the same message:
            # read the prefix afresh instead.
            self._catching_up(str(reason))
            self._resync()
            return
        self._member_failed(stream.endpoint, str(reason))

    def _catching_up(self, reason: str) -> None:
        if self.state == IN_STEP:
            self.state = CATCHING_UP
            self.reason = reason

    def _member_failed(self, endpoint: str, reason: str) -> None:
        """The watch on *endpoint* failed or ended: try the next member."""
        self._catching_up(f"the watch on {endpoint} broke: {reason}")
        self.counters["etcd_watch_restarts"] += 1
        if self.client.endpoint == endpoint:
            self.client.move_on()
        self._round_failed(reason)
        self._retry_later(lambda: self._watch_from(self.keyspace.revision + 1))

    def _round_failed(self, reason: str) -> None:
        """Count a failure; once every member failed in a row, the cluster is
        unavailable as far as this node can tell."""
        self._failures_this_round += 1
        if self._failures_this_round >= len(self.client.endpoints):
            self._lost(reason)

    def _lost(self, reason: str) -> None:
        if self.state != LOADING and self.state != UNAVAILABLE:
            self.log.warn("etcd unavailable: {reason}; writes are refused until it recovers",
                          reason=reason)
            self.state = UNAVAILABLE
        self.reason = reason
        if self._watch is not None:
            # Only a watch created with a leader brings the node back in
            # step, so a watch that looks alive is checked by reopening it.
            self._watch.close(ConnectionError(reason))

    def _retry_later(self, action: Callable[[], None]) -> None:
        """Run *action* now while members remain to try this round, then
        with a growing delay."""
        if self._stopping:
            return
        if self._failures_this_round < len(self.client.endpoints):
            delay = 0.0
        else:
            delay = self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, MAX_RETRY)
        self._retry = self.clock.callLater(delay, action)

    def _in_step(self) -> None:
        if self.state != IN_STEP:
            if self.state == UNAVAILABLE:
                self.log.info("etcd available again through {endpoint}",
                              endpoint=self.client.endpoint)
            self.state = IN_STEP
            self.reason = ""
        self._failures_this_round = 0
        self._retry_delay = FIRST_RETRY

    def _check_watch(self) -> None:
        """A watch that has said nothing for a while may be idle, or its
        member may be hung with the connection open: ask that member, and
        reopen the watch elsewhere if it does not answer or has no leader."""
        stream = self._watch
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
        stream = self._watch
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
            self._catching_up(f"history from revision {self.keyspace.revision + 1} "
                              f"was compacted (at {compact_revision})")
            self._resync()
            return
        if result.get("canceled"):
            if stream is not None:
                stream.close(ConnectionError(f"watch cancelled: {result.get('cancel_reason')}"))
            return
        if result.get("created"):
            self._in_step()
        events = result.get("events")
        if events:
            self._apply(events)

    def _apply(self, events: list[dict]) -> None:
        keyspace, feed = self.keyspace, self.feed
        for raw_event in events:
            kv = raw_event["kv"]
            revision = int(kv["mod_revision"])
            if revision < keyspace.revision:
                # Never expected (a watch reopens after the mirror's revision,
                # and several events of one txn share a revision), but the
                # feed must not go backwards.
                continue
            if raw_event.get("type") == "DELETE":
                key = self._key(kv)
                if key is None:
                    continue
                event = Event(DELETE, key, revision)
            else:
                new = self._key_value(kv)
                if new is None:
                    continue
                event = Event(PUT, new.key, revision, new)
                if new.key in self._sending:
                    self._seen_puts.setdefault(new.key, []).append(new)
            keyspace.apply(event)
            feed.publish(event)
        self._release_waiters()

    def _key(self, kv: dict) -> str | None:
        """The kvconfig key of an etcd key under the prefix, or None if
        another writer put a key there that kvconfig cannot serve."""
        etcd_key = unb64(kv["key"])
        try:
            key = etcd_key[len(self.prefix):].decode("utf-8")
            return values.check_key(key, self.limits.max_key_bytes)
        except (UnicodeDecodeError, KVConfigError):
            self.counters["etcd_skipped_keys"] += 1
            self.log.warn("skipped etcd key {key!r}: not a valid kvconfig key", key=etcd_key)
            return None

    def _key_value(self, kv: dict) -> KeyValue | None:
        key = self._key(kv)
        if key is None:
            return None
        raw = unb64(kv.get("value", ""))
        own = self._sending.get(key)
        if own is not None and own[0] == raw:
            value = own[1]  # this node's own write, checked when it was made
        else:
            value, raw = self._value(raw)
        return KeyValue(key=key, value=value, raw=raw, version=int(kv.get("version", 0)),
                        create_revision=int(kv.get("create_revision", 0)),
                        mod_revision=int(kv.get("mod_revision", 0)))

    def _value(self, raw: bytes) -> tuple[Any, bytes]:
        """(value, its tagged JSON) of an etcd value under the prefix."""
        limits = self.limits
        try:
            value = values.decode(raw)
            # kvconfig's own values are canonical; a JSON value another
            # writer put there must still be one every interface carries
            # (a 32-bit int, no NaN, no lone surrogate ...).
            values.encode(value, max(len(raw), limits.max_value_bytes), limits.max_value_depth)
            return value, raw
        except (ValueError, RecursionError, KVConfigError):
            pass
        # Written by something other than kvconfig: served as its text (or
        # bytes when it is not text kvconfig can carry), re-encoded so that
        # every interface carries it alike.
        self.counters["etcd_foreign_values"] += 1
        try:
            text = raw.decode("utf-8")
            return text, values.encode(text, len(raw) * 8 + 64, limits.max_value_depth)
        except (UnicodeDecodeError, KVConfigError):
            return raw, values.encode(raw, len(raw) * 2 + 64, limits.max_value_depth)


@dataclass(slots=True)
class _Waiter:
    """An answer waiting until the mirror satisfies *condition*."""

    condition: Callable[[], bool]
    d: Deferred
    outcome: object
    wrote: bool
    deadline: float


def _settle(d: Deferred, outcome: object) -> None:
    """Fire *d* with *outcome*: failed if an exception, called if a function."""
    if isinstance(outcome, Exception):
        d.errback(outcome)
    elif callable(outcome):
        d.callback(outcome())
    else:
        d.callback(outcome)
