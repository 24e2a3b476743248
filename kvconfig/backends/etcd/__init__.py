"""
The etcd backend: cluster mode, several kvconfig nodes on one etcd v3 cluster.

``--store etcd:http://10.0.0.1:2379,http://10.0.0.2:2379`` with
``--etcd-prefix kvconfig/``: every kvconfig key ``K`` is the etcd key
``kvconfig/K``, so kvconfig can share a cluster.  Revisions, versions and
``create_revision``/``mod_revision`` are etcd's own; they are global to the
cluster, so they advance (with gaps) when other keys change too.

EtcdBackend composes the parts, each in its own module:

- ``client``: the JSON gateway client (treq): unary calls moving on to the
  next member when one cannot be reached, and the streaming watch;
- ``replica``: this node's copy of its prefix, served to reads: loaded at a
  revision, kept by a watch, resynchronised after compaction;
- ``writes``: the write pipeline: batches, per-key order, compare-and-set,
  TTL leases, acknowledgement once the replica agrees, and the mapping of
  etcd's and the network's failures to kvconfig's errors;
- ``health``: how well the replica follows etcd (loading, catching_up,
  in_step, unavailable), a state machine;
- ``codec``: what kvconfig makes of the keys and values other programs put
  under the prefix.

While no member has a leader (quorum lost) or none can be reached, the node
is *unavailable*: writes fail at once with ``unavailable``, reads go on from
the replica and say they may be stale, and the node keeps trying,
recovering by itself.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kvconfig.backends.base import IBackend, Write, write_each
from kvconfig.backends.etcd.client import EtcdClient
from kvconfig.backends.etcd.codec import Codec
from kvconfig.backends.etcd.health import Health
from kvconfig.backends.etcd.replica import Replica
from kvconfig.backends.etcd.writes import KeyWrites, Writes
from kvconfig.limits import Limits


@implementer(IBackend)
class EtcdBackend:
    """kvconfig's keyspace kept in an etcd cluster, replicated by a watch."""

    name = "etcd"
    durable = True

    def __init__(self, endpoints: list[str], prefix: str, clock: IReactorTime, limits: Limits,
                 timeout: float = 5.0, client: EtcdClient | None = None) -> None:
        """*client*: the gateway client to use instead of one on *endpoints*
        (a test's fake)."""
        self.clock = clock
        self.limits = limits
        self.timeout = timeout
        self.client = client if client is not None else EtcdClient(clock, endpoints, timeout)
        self.codec = Codec(prefix.encode("utf-8"), limits)
        in_flight: dict[str, KeyWrites] = {}
        self.replica = Replica(self.client, clock, self.codec, limits, timeout, in_flight)
        self.writes = Writes(self.client, clock, self.codec, self.replica, in_flight)
        self.health: Health = self.replica.health
        self.keyspace = self.replica.keyspace
        self.feed = self.replica.feed

    @property
    def ready(self) -> bool:
        return self.health.ready

    @property
    def stale(self) -> bool:
        return self.health.stale

    @property
    def reason(self) -> str:
        """Why the node is not in step, for errors and logs."""
        return self.health.reason

    def start(self) -> Deferred:
        """Fires once the replica is loaded; until then it keeps trying."""
        return self.replica.start()

    @inlineCallbacks
    def stop(self) -> Generator[Deferred, Any, None]:
        """Refuse new writes, fail those not yet sent, let those sent be
        answered and acknowledged (each within the timeout), then close."""
        self.replica.stop()
        yield self.writes.stop()
        self.replica.close()
        yield self.client.close()

    def put(self, key: str, raw: bytes, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        return self.writes.put(key, raw, prev_revision, ttl)

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        return self.writes.delete(key, prev_revision)

    def write_many(self, writes: list[Write]) -> Deferred:
        # Each write keeps its own order per key and its own batch in etcd.
        return write_each(self, writes)

    @property
    def counters(self) -> dict[str, int]:
        writes, replica, codec = self.writes, self.replica, self.codec
        return {"etcd_batches": writes.batches,
                "etcd_watch_restarts": replica.watch_restarts,
                "etcd_resyncs": replica.resyncs,
                "etcd_unavailable_rejections": writes.unavailable_rejections,
                "etcd_outcome_unknown": writes.outcome_unknown,
                "etcd_skipped_keys": codec.skipped_keys,
                "etcd_foreign_values": codec.foreign_values}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"etcd_state": self.health.state,
                                 "etcd_endpoint": self.client.endpoint}
        stats.update(self.counters)
        return stats


__all__ = ["EtcdBackend"]
