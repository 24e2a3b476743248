"""
The etcd backend's write pipeline: this node's writes, from the store's
call to their acknowledgement.

- **Batches.**  Unconditional puts and deletes made in one reactor turn share
  one txn (group commit: one request, one raft entry, one revision for them
  all, as several keys changed by one etcd transaction), up to
  MAX_BATCH_WRITES writes and MAX_BATCH_BYTES of values.  While
  MAX_BATCHES_IN_FLIGHT batches are unanswered, later writes wait and join
  the next batch, so a busy node sends fewer, fuller txns.  A put's new
  metadata comes with its watch event.
- **Per-key order.**  One node's writes to one key go in order: a write is
  sent once the one before it to that key is answered, since concurrent
  HTTP requests reach etcd in any order and a client pipelining two writes
  to a key must see the second win.  (Writes to different keys in flight
  together commit in either order, as with etcd itself.)  A KeyWrites record
  holds them, with the put in flight and the puts of the key the watch
  applied meanwhile, among which that put finds its own event.
- **Compare-and-set** goes alone: the compare on ``mod_revision`` (0: only
  if absent), the write, and the read, which when the compare failed gives
  the actual ``mod_revision``.
- **TTL.**  A TTL becomes an etcd lease of that many seconds (rounded up to
  whole seconds, and by etcd to its minimum) granted for this write alone:
  a rewrite attaches a new lease or none, which is kvconfig's "expires
  unless written again", so no lease is ever kept alive.  etcd deletes the
  key when its lease runs out, and every node sees that as a delete event.
- **Acknowledgement.**  A write is acknowledged only once the replica has
  its revision (read-your-writes on the node that made it); an answer that
  changes nothing (a failed compare, an absent key) waits until the replica
  agrees with it.  Either fails with ``unavailable`` if the replica does not
  get there within the timeout.
- **Failures.**  While the node is unavailable (or loading) writes fail at
  once with ``unavailable``.  A write etcd refused (too large, too many
  operations ...) was not applied and fails saying so.  A write that was
  sent but not answered (a member died, or etcd timed it out) fails with
  ``unavailable`` saying its outcome is unknown: it may have been applied,
  so it is never retried behind the client's back.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kvconfig.backends.etcd.client import EtcdClient, EtcdError, NoAnswer, Unreachable, b64
from kvconfig.backends.etcd.codec import Codec
from kvconfig.backends.etcd.replica import Replica
from kvconfig.errors import CompareFailed, KVConfigError, Unavailable
from kvconfig.model import DELETE, PUT, Event, KeyValue

#: Most writes, and bytes of values, in one batch.  etcd allows 128
#: operations in a txn by default, and requests of 1.5 MiB.
MAX_BATCH_WRITES = 128
MAX_BATCH_BYTES = 512 << 10
#: Batches sent and not yet answered; writes made meanwhile wait and join
#: the next, so a busy node sends fewer, fuller txns.
MAX_BATCHES_IN_FLIGHT = 4
#: gRPC status codes etcd answers with.
UNAVAILABLE_CODES = {4, 14}  # deadline exceeded, unavailable (no leader, timed out)

Send = Callable[["KeyWrites"], Deferred]


class KeyWrites:
    """This node's writes to one key, from the first sent until the last is
    answered: the writes queued behind the one in flight, and what matches
    a put in flight with its watch event."""

    # One is made for nearly every write: kept small, its lists made once.
    __slots__ = ("queued", "put", "applied")

    def __init__(self) -> None:
        #: Writes waiting for the one in flight to be answered, oldest first.
        self.queued: deque[tuple[Send, Deferred]] | None = None
        #: The encoded value of the put in flight; None while a delete is.
        self.put: bytes | None = None
        #: The puts of the key the watch applied while that put was in flight.
        self.applied: list[KeyValue] = []

    def queue(self, send: Send, d: Deferred) -> None:
        if self.queued is None:
            self.queued = deque()
        self.queued.append((send, d))

    def sending_put(self, raw: bytes) -> None:
        # Every put applied before this one is sent has an older revision
        # than it will get, so none of them is of use to it.
        self.put = raw
        if self.applied:
            self.applied.clear()

    def sending_delete(self) -> None:
        self.put = None
        if self.applied:
            self.applied.clear()


class Writes:
    """This node's writes to its etcd prefix, acknowledged from its replica."""

    def __init__(self, client: EtcdClient, clock: IReactorTime, codec: Codec,
                 replica: Replica, in_flight: dict[str, KeyWrites]) -> None:
        """*in_flight*: the KeyWrites of every key with a write in flight,
        kept here and read by the replica."""
        self.client = client
        self.clock = clock
        self.codec = codec
        self.replica = replica
        self.health = replica.health
        self.keyspace = replica.keyspace
        self.in_flight = in_flight
        self.batches = 0
        self.unavailable_rejections = 0
        self.outcome_unknown = 0
        # Fire as each write is acknowledged or fails (stop() waits for them).
        self._unfinished: set[Deferred] = set()
        # Unconditional writes waiting for the next batch: (operation, Deferred)
        self._batch: list[tuple[dict, Deferred]] = []
        self._batch_bytes = 0
        self._batch_call: IDelayedCall | None = None
        self._batches_in_flight = 0
        self._stopping = False
        #: Called (metrics) with (seconds from a batch's send to etcd's
        #: answer, writes in it), and with the seconds from etcd's answer to
        #: a write until the watch brought it to the replica (the watch lag).
        self.commit_observer: Callable[[float, int], None] | None = None
        self.watch_lag_observer: Callable[[float], None] | None = None
        # Bound once: one is handed with every acknowledgement.
        self._too_late_for_write = self._write_not_seen
        self._too_late_for_answer = self._answer_not_seen

    def put(self, key: str, raw: bytes, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        """Write *key*; fires with its put Event once the replica has it."""
        self._check_writable()
        etcd_key = self.codec.etcd_key(key)
        request: dict[str, Any] = {"key": etcd_key, "value": b64(raw)}

        def send(writes: KeyWrites) -> Deferred:
            writes.sending_put(raw)
            if ttl:
                d = self.client.call("/v3/lease/grant", {"TTL": str(math.ceil(ttl))})
                d.addCallback(lambda answer: request.update(lease=answer["ID"]))
                d.addCallback(lambda _: self._txn(key, etcd_key, prev_revision,
                                                  {"request_put": request}))
            elif prev_revision is not None:
                d = self._txn(key, etcd_key, prev_revision, {"request_put": request})
            else:
                d = self._batched({"request_put": request}, len(raw))
            d.addCallback(self._put_done, key, raw)
            return d.addErrback(self._failed)

        return self._track(self._in_order(key, send))

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        """Delete *key*; fires with its delete Event (None if it was absent)
        once the replica agrees."""
        self._check_writable()
        etcd_key = self.codec.etcd_key(key)

        def send(writes: KeyWrites) -> Deferred:
            writes.sending_delete()
            operation = {"request_delete_range": {"key": etcd_key}}
            if prev_revision is None:
                d = self._batched(operation, 0)
            else:
                d = self._txn(key, etcd_key, prev_revision, operation)
            d.addCallback(self._delete_done, key)
            return d.addErrback(self._failed)

        return self._track(self._in_order(key, send))

    @inlineCallbacks
    def stop(self):
        """Refuse new writes, fail those not yet sent, and wait until those
        sent are acknowledged or failed (each within the timeout)."""
        self._stopping = True
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        for _, d in batch:
            d.errback(Unavailable("kvconfig is stopping; the write was not sent"))
        # Writes queued behind another to their key fail as their turn
        # comes (_answered); writes sent are answered, and acknowledged
        # once the watch brings them, or fail within the timeout.
        while self._unfinished:
            yield DeferredList(list(self._unfinished))

    def _check_writable(self) -> None:
        if self._stopping:
            raise Unavailable("kvconfig is stopping")
        health = self.health
        if not health.writable:
            self.unavailable_rejections += 1
            raise Unavailable(f"etcd is unavailable: {health.reason}; reads are answered "
                              "from this node's copy, which may be stale")

    def _track(self, write: Deferred) -> Deferred:
        """Count *write* as unfinished until it is acknowledged or failed."""
        done: Deferred = Deferred()
        self._unfinished.add(done)

        def finished(result):
            self._unfinished.discard(done)
            done.callback(None)
            return result

        return write.addBoth(finished)

    # Per-key order.

    def _in_order(self, key: str, send: Send) -> Deferred:
        """Send a write to *key* now if no other to it is in flight, else
        once the writes to it before this one are answered."""
        writes = self.in_flight.get(key)
        if writes is None:
            writes = self.in_flight[key] = KeyWrites()
            d = send(writes)
        else:
            d = Deferred()
            writes.queue(send, d)
        return d.addBoth(self._answered, key)

    def _answered(self, result, key: str):
        """A write to *key* is answered: send the next one queued behind it."""
        writes = self.in_flight[key]
        if writes.queued:
            send, d = writes.queued.popleft()
            if self._stopping:
                d.errback(Unavailable("kvconfig is stopping; the write was not sent"))
            else:
                send(writes).chainDeferred(d)
        else:
            del self.in_flight[key]
        return result

    # Batches of unconditional writes.

    def _batched(self, operation: dict, size: int) -> Deferred:
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
        self._batch.append((operation, d))
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
        sent_at = self.clock.seconds()
        d = self.client.call("/v3/kv/txn", {"success": [operation for operation, _ in batch]})
        self.batches += 1
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
            if self.commit_observer is not None:
                self.commit_observer(self.clock.seconds() - sent_at, len(batch))
            for (_, waiter), response in zip(batch, responses, strict=True):
                waiter.callback((revision, response, None))

        def failed(failure) -> None:
            for _, waiter in batch:
                if not waiter.called:
                    waiter.errback(failure)

        def next_batch(_) -> None:
            self._batches_in_flight -= 1
            if self._batch and (self._batch_call is None or not self._batch_call.active()):
                self._batch_call = self.clock.callLater(0, self._send_batch)

        d.addCallbacks(answered, failed).addBoth(next_batch)

    # Txns of their own: compare-and-set, and puts with a lease.

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
            # Answer only once the replica agrees, so that a read after this
            # answer shows what it rested on.
            return self._when(lambda: self._mod_revision(key) == actual
                              or self.keyspace.revision >= revision,
                              CompareFailed(key, prev_revision, actual), wrote=False)
        return revision, responses[0], meta

    # Acknowledgements, once the replica agrees.

    def _put_done(self, result, key: str, raw: bytes) -> Deferred:
        revision, _, meta = result
        if meta is None:
            # A batched put: its metadata comes with its watch event.
            return self._when(lambda: self.keyspace.revision >= revision,
                              lambda: Event(PUT, key, revision,
                                            self._written(key, revision, raw)),
                              wrote=True)
        kv = KeyValue(key=key, raw=raw, version=int(meta["version"]),
                      create_revision=int(meta["create_revision"]),
                      mod_revision=revision)
        return self._when(lambda: self.keyspace.revision >= revision,
                          Event(PUT, key, revision, kv), wrote=True)

    def _written(self, key: str, revision: int, raw: bytes) -> KeyValue:
        """The KeyValue this node's put of *key* at *revision* made, as its
        watch event (already applied) gave it."""
        for kv in self.in_flight[key].applied:
            if kv.mod_revision == revision:
                return kv
        current = self.keyspace.get(key)
        if current is not None and current.mod_revision == revision:
            return current
        # Only if etcd compacted the event away before the watch delivered
        # it, and the key changed again: a resync publishes only the latest
        # state, so this write's version is no longer known (0).
        return KeyValue(key=key, raw=raw, version=0, create_revision=0,
                        mod_revision=revision)

    def _delete_done(self, result, key: str) -> Deferred:
        revision, response, _ = result
        keyspace = self.keyspace
        deleted = int(response.get("response_delete_range", {}).get("deleted", 0))
        if deleted:
            return self._when(lambda: keyspace.revision >= revision,
                              Event(DELETE, key, revision), wrote=True)
        return self._when(lambda: keyspace.get(key) is None
                          or keyspace.revision >= revision, None, wrote=False)

    def _mod_revision(self, key: str) -> int:
        kv = self.keyspace.get(key)
        return kv.mod_revision if kv is not None else 0

    def _when(self, condition: Callable[[], bool], outcome: object, wrote: bool) -> Deferred:
        d = self.replica.answers.when(
            condition, outcome, self._too_late_for_write if wrote else self._too_late_for_answer)
        if wrote and self.watch_lag_observer is not None:
            d.addCallback(self._watched, self.clock.seconds())
        return d

    def _watched(self, result: object, answered_at: float) -> object:
        self.watch_lag_observer(self.clock.seconds() - answered_at)
        return result

    def _write_not_seen(self) -> Exception:
        return self._too_late("the write was made in etcd, but this node's copy has not "
                              "caught up")

    def _answer_not_seen(self) -> Exception:
        return self._too_late("this node's copy has not caught up with etcd's answer")

    def _too_late(self, what: str) -> Exception:
        reason = self.health.reason
        why = f" ({reason})" if reason else ""
        return Unavailable(f"{what} within {self.replica.timeout:g} s{why}")

    # Failures.

    def _failed(self, failure):
        """Map what etcd or the network said to kvconfig's errors."""
        if failure.check(KVConfigError):
            return failure
        error = failure.value
        if isinstance(error, Unreachable):
            self.health.round_failed(str(error))
            raise Unavailable(f"etcd is unavailable: {error}")
        if isinstance(error, EtcdError) and error.code not in UNAVAILABLE_CODES:
            # etcd refused the request itself (too large, too many ops ...):
            # it was not applied.
            raise Unavailable(f"etcd refused the write: {error}")
        self.outcome_unknown += 1
        if isinstance(error, EtcdError) and "leader" in error.message:
            self.health.round_failed(error.message)
        if isinstance(error, NoAnswer):
            self.replica.suspect(error.endpoint, str(error))
        raise Unavailable(f"the write may or may not have been applied: {error}")
