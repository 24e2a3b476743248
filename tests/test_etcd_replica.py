"""
The etcd backend's replica (kvconfig/backends/etcd/replica.py) and codec,
on a Clock with a fake gateway client: the paged load pinned to one
revision, events applied and published, watches reopened from the
replica's revision, resync after compaction or an oversized message (the
differences published in order), the probe of a silent watch's member, and
what other programs put under the prefix.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from kvconfig.backends.etcd import EtcdBackend
from kvconfig.backends.etcd.client import MessageTooLarge, b64, unb64
from kvconfig.backends.etcd.replica import PAGE_SIZE, differences
from kvconfig.keyspace import Keyspace, row_of
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue

from fakeetcd import (
    ENDPOINTS,
    PREFIX,
    TIMEOUT,
    FakeClient,
    answer_load,
    delete_event,
    etcd_kv,
    fired,
    header,
    put,
    put_event,
    result_of,
    started,
)


def recorded(backend: EtcdBackend) -> list[tuple[str, str, int]]:
    """(type, key, revision) of every event the feed publishes from now on."""
    events: list[tuple[str, str, int]] = []
    backend.feed.subscribe(lambda event: events.append((event.type, event.key,
                                                        event.revision)))
    return events


def replica_values(backend: EtcdBackend) -> dict:
    return {kv.key: kv.value for kv in backend.keyspace.range("")}


# Loading


def test_the_prefix_is_read_in_pages_pinned_to_the_first_page_s_revision():
    """The load reads the prefix's range; while etcd says there is more, the
    next page starts after the last key and is read at the first page's
    revision, so the replica is one snapshot.  Then the watch starts at
    that revision + 1."""
    clock, client = Clock(), FakeClient()
    backend = EtcdBackend(client.endpoints, PREFIX, clock, Limits(), TIMEOUT, client=client)
    started_ = backend.start()
    first = client.take("/v3/kv/range")
    assert unb64(first.body["key"]) == PREFIX.encode()
    assert unb64(first.body["range_end"]) == b"kv0"  # "/" + 1
    assert first.body["limit"] == str(PAGE_SIZE) and "revision" not in first.body
    first.answer({"header": header(40), "more": True,
                  "kvs": [etcd_kv("a", 1, 5), etcd_kv("b", 2, 6)]})
    assert not fired(started_) and not backend.ready
    second = client.take("/v3/kv/range")
    assert unb64(second.body["key"]) == (PREFIX + "b").encode() + b"\x00"
    assert second.body["revision"] == "40"
    second.answer({"header": header(45), "kvs": [etcd_kv("c", 3, 7)]})
    assert result_of(started_) is None
    assert replica_values(backend) == {"a": 1, "b": 2, "c": 3}
    assert backend.keyspace.revision == 40 and backend.feed.revision == 40
    assert backend.ready and backend.stale and backend.health.state == "catching_up"
    watch = client.watch_
    assert watch.start_revision == 41 and watch.endpoint == ENDPOINTS[0]
    assert unb64(watch.request["key"]) == PREFIX.encode()


def test_a_failed_load_moves_on_to_the_next_member_and_is_retried():
    """A load that fails on a member is tried on the next at once; once
    every member failed, after a growing delay; start() fires once one
    succeeds."""
    clock, client = Clock(), FakeClient()
    backend = EtcdBackend(client.endpoints, PREFIX, clock, Limits(), TIMEOUT, client=client)
    d = backend.start()
    for i in range(3):
        call = client.take("/v3/kv/range")
        assert call.endpoint == ENDPOINTS[i]
        call.fail(ConnectionRefused(ENDPOINTS[i]))
        clock.advance(0)
    assert client.unanswered() == []  # every member failed: wait a little
    assert backend.health.state == "loading" and "refused" in backend.reason
    clock.advance(0.05)
    answer_load(client, 10)
    assert result_of(d) is None


class ConnectionRefused(Exception):
    def __init__(self, endpoint: str) -> None:
        super().__init__(f"{endpoint}: connection refused")
        self.endpoint = endpoint


# The watch


def test_events_are_applied_and_published_in_revision_order():
    backend, client, clock = started(kvs=[etcd_kv("gone", 0, 5)])
    seen = recorded(backend)
    client.watch_.events(11, put_event("a", 1, 11), delete_event("gone", 11))
    client.watch_.events(12, put_event("a", 2, 12, version=2, create_revision=11))
    assert seen == [(PUT, "a", 11), (DELETE, "gone", 11), (PUT, "a", 12)]
    assert replica_values(backend) == {"a": 2}
    kv = backend.keyspace.get("a")
    assert (kv.version, kv.create_revision, kv.mod_revision) == (2, 11, 12)
    assert backend.keyspace.revision == 12


def test_an_event_older_than_the_replica_is_never_published():
    backend, client, clock = started(revision=20)
    seen = recorded(backend)
    client.watch_.events(20, put_event("old", 1, 19))
    assert seen == [] and backend.keyspace.get("old") is None


def test_a_broken_watch_is_reopened_on_the_next_member_from_the_replica_s_revision():
    """The connection carrying the watch is lost: the node is catching up,
    and a watch is opened at once on the next member from the replica's
    revision + 1, so nothing is lost or repeated; created, it is in step."""
    backend, client, clock = started()
    client.watch_.events(12, put_event("a", 1, 12))
    client.watch_.end(ConnectionError("connection lost"))
    assert backend.health.state == "catching_up"
    assert "the watch on http://etcd-a:2379 broke" in backend.reason
    clock.advance(0)
    watch = client.watch_
    assert (watch.endpoint, watch.start_revision) == (ENDPOINTS[1], 13)
    watch.open()
    watch.created(12)
    assert backend.health.state == "in_step" and backend.reason == ""
    assert backend.stats()["etcd_watch_restarts"] == 1


def test_an_error_message_or_a_cancelled_watch_closes_it_and_it_is_reopened():
    backend, client, clock = started()
    client.watch_.send({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}})
    assert client.watches[0].closed
    clock.advance(0)
    client.watch_.open()
    client.watch_.send({"result": {"canceled": True, "cancel_reason": "no leader"}})
    assert client.watches[1].closed
    clock.advance(0)
    assert len(client.watches) == 3 and client.watch_.endpoint == ENDPOINTS[2]


def test_a_watch_that_cannot_start_is_tried_on_the_next_member():
    backend, client, clock = started()
    client.watch_.end(ConnectionError("connection lost"))
    clock.advance(0)
    client.watch_.refuse(ConnectionRefused(ENDPOINTS[1]))
    clock.advance(0)
    assert client.watch_.endpoint == ENDPOINTS[2] and len(client.watches) == 3


# Resynchronising


def test_compaction_rereads_the_prefix_and_publishes_the_differences_in_order():
    """The watch says its history was compacted: the node reads the prefix
    afresh, and publishes a put for each key that changed, in revision
    order, then a delete for each key gone; the replica ends equal to the
    snapshot and a watch starts after it."""
    backend, client, clock = started(revision=13, kvs=[
        etcd_kv("same", "s", 11), etcd_kv("changed", "old", 12), etcd_kv("gone", "g", 13)])
    seen = recorded(backend)
    client.watch_.send({"result": {"header": header(30), "compact_revision": "25",
                                   "canceled": True}})
    assert client.watches[0].closed
    assert backend.health.state == "catching_up" and "was compacted (at 25)" in backend.reason
    answer_load(client, 30, [etcd_kv("same", "s", 11), etcd_kv("changed", "new", 22),
                             etcd_kv("new", "n", 18)])
    assert seen == [(PUT, "new", 18), (PUT, "changed", 22), (DELETE, "gone", 30)]
    assert replica_values(backend) == {"same": "s", "changed": "new", "new": "n"}
    assert backend.keyspace.revision == 30
    assert backend.stats()["etcd_resyncs"] == 1
    assert client.watch_.start_revision == 31 and len(client.watches) == 2
    assert backend.health.state == "catching_up"


def test_a_watch_message_too_large_rereads_the_prefix():
    """Reopening from the same revision would bring the same message: the
    node reads the prefix afresh instead."""
    backend, client, clock = started()
    seen = recorded(backend)
    client.watch_.stream.close(MessageTooLarge("a watch message grew past 64 bytes"))
    assert backend.health.state == "catching_up" and "grew past" in backend.reason
    answer_load(client, 12, [etcd_kv("big", "x", 12)])
    assert seen == [(PUT, "big", 12)]
    assert client.watch_.start_revision == 13


def test_a_write_is_acknowledged_by_a_resync_when_its_event_was_compacted_away():
    """A write whose revision the replica reaches by a resync (its event
    compacted away) is acknowledged, with what the snapshot says."""
    backend, client, clock = started()
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    client.watch_.send({"result": {"compact_revision": "11", "canceled": True}})
    answer_load(client, 11, [etcd_kv("k", 1, 11, version=3)])
    assert result_of(d).kv.version == 3


def test_differences_are_puts_in_revision_order_then_deletes():
    keyspace = Keyspace(100, 1 << 20)
    old = [KeyValue("a", b"1", 1, 1, 1), KeyValue("b", b"2", 1, 2, 2),
           KeyValue("c", b"3", 1, 3, 3)]
    keyspace.load(map(row_of, old), [], 3, 3)
    new = [KeyValue("a", b"1", 1, 1, 1), KeyValue("b", b"5", 2, 2, 9),
           KeyValue("d", b"4", 1, 7, 7)]
    assert differences(keyspace, new, 10) == [
        Event(PUT, "d", 7, new[2]), Event(PUT, "b", 9, new[1]), Event(DELETE, "c", 10)]


# The probe of a silent watch's member


def test_a_silent_watch_has_its_member_asked_and_is_moved_if_it_does_not_answer():
    """A watch that said nothing for the timeout may be on a hung member:
    that member is asked for its status (once at a time); with no answer,
    the watch is reopened on the next member."""
    backend, client, clock = started()
    clock.advance(TIMEOUT)
    status, = client.statuses
    assert status.endpoint == ENDPOINTS[0]
    clock.advance(TIMEOUT)
    assert len(client.statuses) == 1  # the first is still unanswered
    status.fail(ConnectionError("timed out"))
    assert client.watches[0].closed
    clock.advance(0)
    assert client.watch_.endpoint == ENDPOINTS[1]


def test_a_member_without_a_leader_has_its_watch_moved_one_with_a_leader_keeps_it():
    backend, client, clock = started()
    clock.advance(TIMEOUT)
    client.statuses[0].answer({"leader": "8211f1d0f64f3269"})
    assert not client.watch_.closed
    clock.advance(TIMEOUT)
    client.statuses[1].answer({"header": {}})  # leader 0 is left out
    assert client.watches[0].closed


def test_a_watch_that_speaks_is_not_probed():
    backend, client, clock = started()
    for revision in range(11, 15):
        clock.advance(TIMEOUT / 2)
        client.watch_.events(revision, put_event("k", revision, revision))
    assert client.statuses == []


# What other programs put under the prefix


def test_values_other_programs_wrote_are_served_as_text_or_bytes_and_counted():
    backend, client, clock = started(kvs=[
        etcd_kv("json", raw_value=b'{"a": [1, 2]}', mod_revision=3),
        etcd_kv("text", raw_value=b"plain text", mod_revision=4),
        etcd_kv("bytes", raw_value=b"\xff\xfe", mod_revision=5),
        etcd_kv("huge-int", raw_value=b"12345678901234567890", mod_revision=6)])
    assert replica_values(backend) == {"json": {"a": [1, 2]}, "text": "plain text",
                                       "bytes": b"\xff\xfe", "huge-int": "12345678901234567890"}
    assert backend.stats()["etcd_foreign_values"] == 3
    client.watch_.events(11, {"kv": etcd_kv("text2", raw_value=b"NaN", mod_revision=11)})
    assert backend.keyspace.get("text2").value == "NaN"
    assert backend.stats()["etcd_foreign_values"] == 4


def test_keys_kvconfig_cannot_serve_are_skipped_and_counted():
    bad = [{"key": b64(PREFIX.encode() + b"has space"), "value": b64(b"1"),
            "mod_revision": "3"},
           {"key": b64(PREFIX.encode() + b"\xff"), "value": b64(b"1"), "mod_revision": "4"}]
    backend, client, clock = started(kvs=[*bad, etcd_kv("ok", 1, 5)])
    assert replica_values(backend) == {"ok": 1}
    seen = recorded(backend)
    client.watch_.events(11, {"kv": dict(bad[0], mod_revision="11")},
                         {"type": "DELETE", "kv": dict(bad[1], mod_revision="11")},
                         put_event("ok", 2, 11))
    assert seen == [(PUT, "ok", 11)]
    assert backend.stats()["etcd_skipped_keys"] == 4


def test_stop_closes_the_watch_and_reopens_nothing():
    backend, client, clock = started()
    assert result_of(backend.stop()) is None
    assert client.watch_.closed
    clock.advance(TIMEOUT * 3)
    assert len(client.watches) == 1 and client.statuses == [] and client.closed


def test_while_stopping_a_broken_watch_is_not_reopened_and_a_silent_one_not_probed():
    """stop() waits for a write in flight, keeping the watch open for its
    event meanwhile; the silent watch's member is not asked for its status,
    and a watch that broke just before is not reopened."""
    backend, client, clock = started()
    clock.advance(2)
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    stopped = backend.stop()
    clock.advance(TIMEOUT - 2)  # the watch has been silent for the timeout
    assert client.statuses == [] and not client.watch_.closed
    clock.advance(2)
    assert fired(d) and result_of(stopped) is None
    assert len(client.watches) == 1


def test_a_watch_broken_as_the_node_stops_is_not_reopened():
    backend, client, clock = started()
    client.watch_.end(ConnectionError("connection lost"))
    backend.stop()
    clock.advance(TIMEOUT)
    assert len(client.watches) == 1 and client.unanswered() == []
