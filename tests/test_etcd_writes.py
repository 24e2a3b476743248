"""
The etcd backend's write pipeline (kvconfig/backends/etcd/writes.py), on a
Clock with a fake gateway client that the tests answer: batches and their
limits, per-key order, compare-and-set, TTL leases, acknowledgement once
the replica agrees (and its timeout), the mapping of failures to errors,
and stop().  The same behaviour against a real etcd is in
test_etcd_backend.py.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvconfig.backends.etcd import EtcdBackend
from kvconfig.backends.etcd.client import EtcdError, NoAnswer, Unreachable, unb64
from kvconfig.backends.etcd.writes import (
    MAX_BATCH_BYTES,
    MAX_BATCH_WRITES,
    MAX_BATCHES_IN_FLIGHT,
)
from kvconfig.errors import CompareFailed, Unavailable
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT

from fakeetcd import (
    ENDPOINTS,
    PREFIX,
    TIMEOUT,
    FakeClient,
    delete_event,
    etcd_kv,
    fired,
    header,
    put,
    put_event,
    raw,
    result_of,
    started,
)


def failure_of(d) -> Exception:
    result = result_of(d)
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    return result.value


# Batches


def test_the_unconditional_writes_of_one_turn_are_one_txn():
    """Puts and deletes made in one reactor turn go to etcd as one txn,
    sent at the start of the next turn, in the order they were made."""
    backend, client, clock = started()
    put(backend, "a", 1)
    put(backend, "b", [2])
    backend.delete("c")
    assert client.txns() == []
    clock.advance(0)
    txn, = client.txns()
    assert txn.keys() == ["a", "b", "c"]
    assert "compare" not in txn.body
    assert unb64(txn.operations[1]["request_put"]["value"]) == raw([2])
    assert backend.stats()["etcd_batches"] == 1


def test_a_batched_write_is_acknowledged_once_the_watch_brings_its_revision():
    """etcd's answer to a batch is not the acknowledgement: each put is
    acknowledged once the replica has the batch's revision, with the
    metadata its watch event gave; a delete with its revision."""
    backend, client, clock = started(kvs=[etcd_kv("c", "old", 7)])
    a, c = put(backend, "a", 1), backend.delete("c")
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    assert not fired(a) and not fired(c)
    client.watch_.events(11, put_event("a", 1, 11, version=4, create_revision=3),
                         delete_event("c", 11))
    event = result_of(a)
    assert (event.type, event.revision) == (PUT, 11)
    assert (event.kv.version, event.kv.create_revision, event.kv.value) == (4, 3, 1)
    assert (result_of(c).type, result_of(c).revision) == (DELETE, 11)


def test_a_batch_holding_max_batch_writes_is_sent_at_once_and_the_next_write_starts_another():
    """A batch is sent as soon as it holds MAX_BATCH_WRITES writes; the
    write after goes in the next batch."""
    backend, client, clock = started()
    for i in range(MAX_BATCH_WRITES + 1):
        put(backend, f"k{i}", i)
    first, = client.txns()
    assert len(first.operations) == MAX_BATCH_WRITES
    clock.advance(0)
    assert [txn.keys() for txn in client.txns()[1:]] == [[f"k{MAX_BATCH_WRITES}"]]


def test_a_batch_is_sent_before_its_values_pass_max_batch_bytes():
    """A write whose value would take the batch past MAX_BATCH_BYTES sends
    the batch first and starts the next."""
    backend, client, clock = started()
    big = "x" * (MAX_BATCH_BYTES // 2)
    put(backend, "a", big)
    put(backend, "b", big)
    assert [txn.keys() for txn in client.txns()] == [["a"]]
    clock.advance(0)
    assert [txn.keys() for txn in client.txns()] == [["a"], ["b"]]


def test_while_max_batches_are_in_flight_later_writes_wait_and_join_the_next_batch():
    """With MAX_BATCHES_IN_FLIGHT batches unanswered, writes of later turns
    are not sent; once one batch is answered, they all go in one txn."""
    backend, client, clock = started()
    for i in range(MAX_BATCHES_IN_FLIGHT):
        put(backend, f"batch{i}", i)
        clock.advance(0)
    assert len(client.txns()) == MAX_BATCHES_IN_FLIGHT
    put(backend, "late1", 1)
    clock.advance(0)
    put(backend, "late2", 2)
    backend.delete("late3")
    clock.advance(0)
    assert len(client.txns()) == MAX_BATCHES_IN_FLIGHT
    client.txns()[0].answer_batch(11)
    assert len(client.txns()) == MAX_BATCHES_IN_FLIGHT - 1
    clock.advance(0)
    assert client.txns()[-1].keys() == ["late1", "late2", "late3"]


def test_a_batch_answer_kvconfig_cannot_read_fails_its_writes_outcome_unknown():
    """An answer with fewer responses than writes: the writes may have been
    applied, so each fails saying its outcome is unknown."""
    backend, client, clock = started()
    a, b = put(backend, "a", 1), put(backend, "b", 2)
    clock.advance(0)
    client.txns()[0].answer({"header": header(11), "responses": [{}]})
    for d in (a, b):
        assert "may or may not have been applied" in str(failure_of(d))
    assert backend.stats()["etcd_outcome_unknown"] == 2


# Per-key order


def test_a_second_write_to_a_key_waits_until_the_first_is_acknowledged():
    """Two writes to one key in one turn: only the first is sent; the second
    goes once the first is acknowledged, while a write to another key joins
    the first batch."""
    backend, client, clock = started()
    first, second = put(backend, "k", 1), put(backend, "k", 2)
    other = put(backend, "other", 3)
    clock.advance(0)
    txn, = client.txns()
    assert txn.keys() == ["k", "other"]
    txn.answer_batch(11)
    clock.advance(0)
    assert client.txns() == []  # answered by etcd, not yet acknowledged
    client.watch_.events(11, put_event("k", 1, 11), put_event("other", 3, 11))
    assert result_of(first).kv.value == 1 and result_of(other).kv.value == 3
    assert not fired(second)
    clock.advance(0)
    txn, = client.txns()
    assert txn.keys() == ["k"] and unb64(txn.operations[0]["request_put"]["value"]) == raw(2)
    txn.answer_batch(12)
    client.watch_.events(12, put_event("k", 2, 12, version=2, create_revision=11))
    assert result_of(second).kv.version == 2
    assert backend.writes.in_flight == {}


def test_writes_queued_behind_one_to_their_key_go_one_at_a_time_in_the_order_made():
    """Three writes to one key: each is sent once the one before it is
    acknowledged, in the order they were made, so the last made wins."""
    backend, client, clock = started()
    writes = [put(backend, "k", n) for n in (1, 2, 3)] + [backend.delete("k")]
    sent = []
    for revision in (11, 12, 13, 14):
        clock.advance(0)
        txn, = client.txns()
        operation = txn.operations[0]
        request = operation.get("request_put")
        sent.append(unb64(request["value"]) if request else "delete")
        txn.answer_batch(revision)
        event = (put_event("k", revision - 10, revision) if request
                 else delete_event("k", revision))
        client.watch_.events(revision, event)
    assert sent == [raw(1), raw(2), raw(3), "delete"]
    assert [result_of(d).revision for d in writes] == [11, 12, 13, 14]
    assert backend.keyspace.get("k") is None and backend.writes.in_flight == {}


def test_a_failed_write_lets_the_next_write_to_its_key_go():
    """The write queued behind one that fails is sent then."""
    backend, client, clock = started()
    first, second = put(backend, "k", 1), put(backend, "k", 2)
    clock.advance(0)
    client.txns()[0].fail(EtcdError(ENDPOINTS[0], 400, 3, "request is too large"))
    assert failure_of(first)
    clock.advance(0)
    assert client.txns()[0].keys() == ["k"]
    assert not fired(second)


def test_each_put_is_acknowledged_with_its_own_event_while_others_to_its_key_arrive():
    """While this node's put of a key is in flight the watch brings other
    puts of that key too (another node's, before and after it): the
    acknowledgement carries the metadata of this node's own put, found
    among the puts applied meanwhile, which start afresh as the next put
    of the key is sent."""
    backend, client, clock = started()
    mine, next_ = put(backend, "k", "mine"), put(backend, "k", "next")
    clock.advance(0)
    client.watch_.events(11, put_event("k", "theirs", 11, version=1))
    client.txns()[0].answer_batch(12)
    client.watch_.events(13, put_event("k", "mine", 12, version=2, create_revision=11),
                         put_event("k", "later", 13, version=3, create_revision=11))
    kv = result_of(mine).kv
    assert (kv.mod_revision, kv.version, kv.value) == (12, 2, "mine")
    assert backend.keyspace.get("k").version == 3
    clock.advance(0)
    assert backend.writes.in_flight["k"].applied == []
    assert backend.writes.in_flight["k"].put == raw("next")
    assert not fired(next_)


def test_the_node_s_own_put_is_not_checked_again(monkeypatch):
    """A put's watch event carrying the bytes the node sent is not checked
    again as another program's value would be (the node checked them when
    the put was made), while a foreign value is."""
    backend, client, clock = started()
    checked = []
    real = backend.codec.value
    monkeypatch.setattr(backend.codec, "value", lambda raw: checked.append(raw) or real(raw))
    value = {"list": [1, 2], "text": "é"}
    d = put(backend, "k", value)
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    client.watch_.events(11, put_event("k", value, 11))
    assert result_of(d).kv.value == value and checked == []
    client.watch_.events(12, put_event("other", "from etcdctl", 12))
    assert len(checked) == 1


# Compare-and-set


def test_compare_and_set_goes_alone_with_its_compare_its_write_and_a_read():
    """A put with prev_revision is a txn of its own, sent at once: compare
    on mod_revision, then the put and a read of the key (the read alone if
    the compare fails); acknowledged with the read's metadata once the
    replica has the revision."""
    backend, client, clock = started(kvs=[etcd_kv("k", 1, 7)])
    d = put(backend, "k", 2, prev_revision=7)
    txn, = client.txns()
    compare, = txn.body["compare"]
    assert (compare["target"], compare["result"], compare["mod_revision"]) == (
        "MOD", "EQUAL", "7")
    assert [list(op) for op in txn.body["success"]] == [["request_put"], ["request_range"]]
    assert [list(op) for op in txn.body["failure"]] == [["request_range"]]
    meta = {"key": etcd_kv("k")["key"], "mod_revision": "11", "version": "2",
            "create_revision": "7"}
    txn.answer({"header": header(11), "succeeded": True,
                "responses": [{"response_put": {}}, {"response_range": {"kvs": [meta]}}]})
    assert not fired(d)
    client.watch_.events(11, put_event("k", 2, 11, version=2, create_revision=7))
    kv = result_of(d).kv
    assert (kv.mod_revision, kv.version, kv.create_revision, kv.value) == (11, 2, 7, 2)
    clock.advance(0)
    assert client.txns() == []  # never batched


def test_a_failed_compare_is_answered_once_the_replica_agrees():
    """A compare that failed because the key changed at revision 12 fails
    with CompareFailed (giving 12) only once the replica has that change,
    so that a read after the answer shows what it rested on."""
    backend, client, clock = started(kvs=[etcd_kv("k", 1, 7)])
    d = put(backend, "k", 2, prev_revision=7)
    meta = {"key": etcd_kv("k")["key"], "mod_revision": "12"}
    client.txns()[0].answer({"header": header(12),
                             "responses": [{"response_range": {"kvs": [meta]}}]})
    assert not fired(d)
    client.watch_.events(12, put_event("k", "other", 12, version=2))
    error = failure_of(d)
    assert isinstance(error, CompareFailed) and "12" in str(error)
    assert backend.keyspace.get("k").mod_revision == 12


def test_a_failed_compare_the_replica_already_agrees_with_is_answered_at_once():
    backend, client, clock = started(kvs=[etcd_kv("k", 1, 7)])
    d = put(backend, "k", 2, prev_revision=0)  # only if absent
    meta = {"key": etcd_kv("k")["key"], "mod_revision": "7"}
    client.txns()[0].answer({"header": header(12),
                             "responses": [{"response_range": {"kvs": [meta]}}]})
    assert isinstance(failure_of(d), CompareFailed)


def test_a_compare_and_delete_is_acknowledged_with_its_revision():
    backend, client, clock = started(kvs=[etcd_kv("k", 1, 7)])
    d = backend.delete("k", prev_revision=7)
    txn, = client.txns()
    assert txn.body["compare"][0]["mod_revision"] == "7"
    assert list(txn.body["success"][0]) == ["request_delete_range"]
    txn.answer({"header": header(11), "succeeded": True,
                "responses": [{"response_delete_range": {"deleted": "1"}},
                              {"response_range": {}}]})
    assert not fired(d)
    client.watch_.events(11, delete_event("k", 11))
    assert (result_of(d).type, result_of(d).revision) == (DELETE, 11)


def test_deleting_an_absent_key_is_answered_once_the_replica_has_it_absent():
    """A delete etcd says deleted nothing fires with None, but only once
    the replica no longer has the key (another node deleted it at 11)."""
    backend, client, clock = started(kvs=[etcd_kv("k", 1, 7)])
    d = backend.delete("k")
    clock.advance(0)
    client.txns()[0].answer_batch(12, deleted={"k": 0})
    assert not fired(d)
    client.watch_.events(11, delete_event("k", 11))
    assert result_of(d) is None


# TTL


def test_a_ttl_is_a_lease_granted_for_this_write_alone():
    """A put with a TTL first grants a lease of that many whole seconds
    (rounded up), then puts the key with it in a txn of its own."""
    backend, client, clock = started()
    d = put(backend, "hb", "alive", ttl=2.5)
    grant = client.take("/v3/lease/grant")
    assert grant.body == {"TTL": "3"}
    assert client.txns() == []
    grant.answer({"ID": "7587", "TTL": "3"})
    txn, = client.txns()
    assert txn.body["compare"] == []
    assert txn.body["success"][0]["request_put"]["lease"] == "7587"
    meta = {"mod_revision": "11", "version": "1", "create_revision": "11"}
    txn.answer({"header": header(11), "succeeded": True,
                "responses": [{"response_put": {}}, {"response_range": {"kvs": [meta]}}]})
    client.watch_.events(11, put_event("hb", "alive", 11))
    assert result_of(d).kv.value == "alive"
    put(backend, "hb2", "x", ttl=1)
    assert client.take("/v3/lease/grant").body == {"TTL": "1"}


def test_a_lease_that_cannot_be_granted_fails_the_write_and_sends_no_put():
    backend, client, clock = started()
    d = put(backend, "hb", "alive", ttl=10)
    client.take("/v3/lease/grant").fail(EtcdError(ENDPOINTS[0], 400, 3, "bad TTL"))
    assert "etcd refused the write" in str(failure_of(d))
    assert client.txns() == []


# Acknowledgement timeouts


def test_a_write_whose_event_does_not_come_in_time_fails_and_the_watch_is_reopened():
    """etcd answered the batch but the watch brings nothing: after the
    timeout the write fails with Unavailable (made in etcd, not yet seen),
    and the watch, which may be on a hung member, is reopened on the next
    member from the replica's revision + 1."""
    backend, client, clock = started()
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    clock.advance(TIMEOUT - 0.1)
    assert not fired(d)
    clock.advance(0.1)
    error = failure_of(d)
    assert isinstance(error, Unavailable)
    assert str(error).startswith("the write was made in etcd, but this node's copy has "
                                 f"not caught up within {TIMEOUT:g} s")
    assert client.watches[0].closed
    clock.advance(0)
    assert len(client.watches) == 2
    assert client.watch_.endpoint == ENDPOINTS[1] and client.watch_.start_revision == 11


def test_a_failed_compare_the_replica_never_agrees_with_fails_unavailable():
    backend, client, clock = started()
    d = put(backend, "k", 1, prev_revision=0)
    meta = {"mod_revision": "12"}
    client.txns()[0].answer({"header": header(12),
                             "responses": [{"response_range": {"kvs": [meta]}}]})
    clock.advance(TIMEOUT)
    error = failure_of(d)
    assert isinstance(error, Unavailable)
    assert "this node's copy has not caught up with etcd's answer" in str(error)


def test_the_timeout_of_each_acknowledgement_runs_from_when_etcd_answered():
    """Writes etcd answered 2 s apart each fail a whole timeout after their
    own answer, not when the first one's runs out."""
    backend, client, clock = started()
    a = put(backend, "a", 1)
    clock.advance(0)
    client.txns()[0].answer_batch(11)
    clock.advance(2)
    b, c = put(backend, "b", 2), put(backend, "c", 3)
    clock.advance(0)
    client.txns()[0].answer_batch(13)
    clock.advance(TIMEOUT - 2)
    assert isinstance(failure_of(a), Unavailable) and not fired(b)
    clock.advance(1.9)
    assert not fired(b)
    clock.advance(0.1)
    assert isinstance(failure_of(b), Unavailable) and isinstance(failure_of(c), Unavailable)


# Failures


def test_writes_are_refused_at_once_while_loading():
    """Before the prefix is read, a write fails at once, sending nothing."""
    client = FakeClient()
    backend = EtcdBackend(client.endpoints, PREFIX, Clock(), Limits(), TIMEOUT, client=client)
    backend.start()
    with pytest.raises(Unavailable, match="^etcd is unavailable: not yet in step with etcd"):
        put(backend, "k", 1)
    assert client.unanswered("/v3/kv/txn") == []
    assert backend.stats()["etcd_unavailable_rejections"] == 1


@pytest.mark.parametrize("error, message, unknown", [
    (EtcdError(ENDPOINTS[0], 400, 3, "etcdserver: request is too large"),
     "etcd refused the write", 0),
    (EtcdError(ENDPOINTS[0], 503, 14, "etcdserver: request timed out"),
     "the write may or may not have been applied", 1),
    (EtcdError(ENDPOINTS[0], 504, 4, "context deadline exceeded"),
     "the write may or may not have been applied", 1),
    (NoAnswer(ENDPOINTS[0], ConnectionLost(), TIMEOUT),
     "the write may or may not have been applied", 1),
    (Unreachable("no etcd member could be reached"), "etcd is unavailable", 0),
])
def test_what_etcd_or_the_network_said_is_mapped_to_unavailable_refused_or_unknown(
        error, message, unknown):
    """etcd refusing a request: not applied.  A timeout, no leader, a lost
    connection: the write may have been applied, counted as outcome unknown
    and never retried.  No member reachable: not sent."""
    backend, client, clock = started()
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].fail(error)
    failure = failure_of(d)
    assert isinstance(failure, Unavailable) and str(failure).startswith(message)
    assert backend.stats()["etcd_outcome_unknown"] == unknown
    clock.advance(1)
    assert client.txns() == []  # never retried


def test_no_member_reachable_makes_the_node_unavailable_and_refuses_writes_at_once():
    backend, client, clock = started()
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].fail(Unreachable("no etcd member could be reached"))
    assert failure_of(d)
    assert backend.health.state == "unavailable" and backend.stale
    assert client.watches[0].closed  # only a watch created anew brings it back
    with pytest.raises(Unavailable, match="^etcd is unavailable: no etcd member"):
        put(backend, "k", 2)
    assert backend.stats()["etcd_unavailable_rejections"] == 1


def test_a_write_that_found_no_leader_makes_the_node_unavailable():
    backend, client, clock = started()
    d = put(backend, "k", 1)
    clock.advance(0)
    client.txns()[0].fail(EtcdError(ENDPOINTS[0], 503, 14, "etcdserver: no leader"))
    assert "may or may not" in str(failure_of(d))
    assert backend.health.state == "unavailable"
    assert backend.reason == "etcdserver: no leader"


def test_a_write_without_an_answer_moves_the_watch_off_that_member_only():
    """A call to the watch's member that got no answer closes the watch
    (it is reopened on another member); one to another member does not."""
    backend, client, clock = started()
    d = put(backend, "a", 1)
    clock.advance(0)
    client.txns()[0].fail(NoAnswer(ENDPOINTS[2], ConnectionLost(), TIMEOUT))
    assert failure_of(d) and not client.watch_.closed
    d = put(backend, "b", 1)
    clock.advance(0)
    client.txns()[0].fail(NoAnswer(ENDPOINTS[0], ConnectionLost(), TIMEOUT))
    assert failure_of(d) and client.watches[0].closed
    clock.advance(0)
    assert client.watch_.endpoint == ENDPOINTS[1]


# stop()


def test_stop_fails_unsent_writes_and_waits_for_sent_ones():
    """stop() refuses new writes, fails at once the writes not yet sent (in
    the next batch, or queued behind another to their key), lets a sent
    write be answered and acknowledged, and only then closes the watch and
    the client."""
    backend, client, clock = started()
    sent = put(backend, "a", 1)
    clock.advance(0)
    unsent = put(backend, "b", 2)
    queued = put(backend, "a", 3)
    stopped = backend.stop()
    assert "not sent" in str(failure_of(unsent))
    assert not fired(stopped) and not fired(queued)
    with pytest.raises(Unavailable, match="kvconfig is stopping"):
        put(backend, "c", 4)
    client.txns()[0].answer_batch(11)
    assert not client.watch_.closed
    client.watch_.events(11, put_event("a", 1, 11))
    assert result_of(sent).kv.value == 1
    assert "not sent" in str(failure_of(queued))
    assert result_of(stopped) is None
    assert client.watch_.closed and client.closed
    clock.advance(0)
    assert client.txns() == []


def test_stop_waits_at_most_the_timeout_for_an_acknowledgement():
    backend, client, clock = started()
    sent = put(backend, "a", 1)
    clock.advance(0)
    stopped = backend.stop()
    client.txns()[0].answer_batch(11)
    clock.advance(TIMEOUT)
    assert isinstance(failure_of(sent), Unavailable)
    assert result_of(stopped) is None
    assert len(client.watches) == 1  # not reopened while stopping
