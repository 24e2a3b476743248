"""
The etcd backend in process, against real etcd: TTLs as leases, the key
prefix and what other writers put under it, two nodes on one cluster, a
member killed under load, quorum lost and regained, compaction while a
node's watch is down, the order of one key's writes, an etcd that is not
there at start, a member that hangs (while a store uses it, or as one
starts), stop() with writes waiting, and one key written without pause.

Each test runs Stores on the etcd backend on the real reactor, with
pytest_twisted, against members started by etcdcluster.py: the shared
one-member ``etcd_single`` (each test under an etcd prefix of its own) or a
three-member ``etcd_cluster3`` of the test's own, which it kills and
restarts members of.  The harness's calls (kill, restart, and the JSON
gateway helpers the tests use to look at etcd directly) block the reactor
while they run, so the stores under test cannot act meanwhile: the
compaction test relies on that to change etcd behind a store's back.
Otherwise tests only wait, polling with a deadline, for what a store must
do next; no wait is unbounded and nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.task import deferLater

from kvconfig import values
from kvconfig.backends import backend_from_string
from kvconfig.errors import CompareFailed, Unavailable
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Event, KeyValue
from kvconfig.store import Store

from etcdcluster import EtcdCluster, b64, unb64

pytest_plugins = ["etcdcluster"]

#: The longest any one wait may take before the test fails.
WAIT = 20.0
#: Seconds between two looks at a condition being waited for.
POLL = 0.02
#: --etcd-timeout of the stores under test: a write lost with a member
#: fails after this long, not after the default 5 s.
ETCD_TIMEOUT = 2.0


def new_prefix(name: str) -> str:
    """An etcd prefix no other test (or earlier run) uses."""
    return f"etcdtest/{name}/{uuid.uuid4().hex[:8]}/"


def encoded(value: Any) -> bytes:
    """*value* as kvconfig stores it in etcd (tagged JSON)."""
    return values.encode(value, 1 << 20, 64)


@pytest_twisted.async_yield_fixture
async def open_store():
    """An async function opening a Store on the etcd backend with the given
    member URLs and prefix, started (its replica loaded) unless start=False;
    every store it opened is stopped after the test."""
    opened: list[Store] = []

    async def open_(endpoints: list[str], prefix: str, start: bool = True) -> Store:
        limits = Limits()
        backend = backend_from_string("etcd:" + ",".join(endpoints), reactor, limits,
                                      etcd_prefix=prefix, etcd_timeout=ETCD_TIMEOUT)
        store = Store(backend, limits)
        opened.append(store)
        if start:
            await within(store.start(), "the store loading its replica")
        return store

    yield open_
    for store in opened:
        await store.stop()


async def within(d: Deferred, what: str, timeout: float = WAIT) -> Any:
    """The result of *d*, or an AssertionError if it has none in *timeout* s."""
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise AssertionError(f"{what}: no result within {timeout:g} s") from None


async def eventually(condition: Callable[[], object], what: str,
                     timeout: float = WAIT) -> None:
    """Poll *condition* until it holds; an AssertionError after *timeout* s."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout:g} s")
        await deferLater(reactor, POLL, lambda: None)


async def failure_of(d: Deferred) -> Exception:
    try:
        await within(d, "a write expected to fail")
    except AssertionError:
        raise
    except Exception as e:
        return e
    raise AssertionError("expected the Deferred to fail")


def record(store: Store) -> list[Event]:
    """A list that gets every event the store's feed publishes from now on."""
    events: list[Event] = []
    store.feed.subscribe(events.append)
    return events


def summary(event: Event) -> tuple:
    """(type, key, revision, value) of a feed event, as etcd_history gives them."""
    return (event.type, event.key, event.revision,
            None if event.kv is None else event.kv.value)


def replay(view: dict[str, Any], events: list[Event]) -> dict[str, Any]:
    """*view* (key -> value) with *events* applied, as a feed consumer would."""
    view = dict(view)
    for event in events:
        if event.type == PUT:
            view[event.key] = event.kv.value
        else:
            view.pop(event.key, None)
    return view


def store_values(store: Store) -> dict[str, Any]:
    return {kv.key: kv.value for kv in store.range("")[1]}


# Looking at etcd directly, through a member's JSON gateway (blocking).

def _range_end(prefix: str) -> str:
    # The prefixes here are ASCII and end with "/", so the next key after
    # all of them is the prefix with its last character incremented.
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def etcd_kvs(cluster: EtcdCluster, index: int, prefix: str) -> dict[str, dict]:
    """etcd's keys under *prefix*, read through member *index*: the key
    without the prefix -> etcd's kv (JSON, base64 key and value)."""
    reply = cluster.call(index, "/v3/kv/range",
                         {"key": b64(prefix), "range_end": b64(_range_end(prefix))})
    return {unb64(kv["key"])[len(prefix):].decode("utf-8"): kv
            for kv in reply.get("kvs", [])}


def etcd_values(cluster: EtcdCluster, index: int, prefix: str) -> dict[str, Any]:
    """etcd's keys under *prefix* -> their values, decoded as kvconfig's."""
    return {key: values.decode(unb64(kv.get("value", "")))
            for key, kv in etcd_kvs(cluster, index, prefix).items()}


def etcd_kv(cluster: EtcdCluster, index: int, key: str) -> dict | None:
    reply = cluster.call(index, "/v3/kv/range", {"key": b64(key)})
    kvs = reply.get("kvs", [])
    return kvs[0] if kvs else None


def metadata(kv: dict) -> tuple[int, int, int]:
    """(version, create_revision, mod_revision) of an etcd kv."""
    return (int(kv.get("version", 0)), int(kv.get("create_revision", 0)),
            int(kv.get("mod_revision", 0)))


def etcd_history(cluster: EtcdCluster, index: int, prefix: str, start: int,
                 end: int) -> list[tuple]:
    """(type, key, revision, value) of every change etcd holds under *prefix*
    from revision *start* to *end*, which must be a change under *prefix*:
    read by a watch from *start* on member *index*."""
    url = urlsplit(cluster.client_urls[index])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT)
    request = {"create_request": {"key": b64(prefix), "range_end": b64(_range_end(prefix)),
                                  "start_revision": str(start)}}
    history: list[tuple] = []
    try:
        connection.request("POST", "/v3/watch", json.dumps(request),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        while not history or history[-1][2] < end:
            line = response.readline()
            assert line, f"the history watch ended before revision {end}"
            message = json.loads(line)
            assert "result" in message, message
            result = message["result"]
            assert not result.get("canceled"), result
            for event in result.get("events", []):
                kv = event["kv"]
                revision = int(kv["mod_revision"])
                key = unb64(kv["key"])[len(prefix):].decode("utf-8")
                if event.get("type") == "DELETE":
                    history.append((DELETE, key, revision, None))
                else:
                    history.append((PUT, key, revision,
                                    values.decode(unb64(kv.get("value", "")))))
    finally:
        connection.close()
    return [change for change in history if change[2] <= end]


def run_async(function, *args) -> Deferred:
    return ensureDeferred(function(*args))


# 1. TTLs are etcd leases.

@pytest_twisted.ensureDeferred
async def test_ttl_is_an_etcd_lease_and_expiry_is_a_delete_event(etcd_single, open_store):
    """put(ttl=1) attaches a one-second etcd lease to the key (visible in
    etcd; a TTL is rounded up to whole seconds); when etcd expires it the
    key leaves the store with a delete event on the feed.  A key rewritten
    without a TTL before its lease runs out has no lease any more and
    outlives it."""
    prefix = new_prefix("ttl")
    store = await open_store(etcd_single.client_urls, prefix)
    seen = record(store)

    def lease_of(key: str) -> str:
        return etcd_kv(etcd_single, 0, prefix + key).get("lease", "0")

    def granted_ttl(lease: str) -> str:
        return etcd_single.call(0, "/v3/lease/timetolive", {"ID": lease})["grantedTTL"]

    expiring = await store.put("t", 1, ttl=1)
    lease = lease_of("t")
    assert lease != "0" and granted_ttl(lease) == "1"

    # Two seconds of lease, so that the rewrite comes before it runs out
    # even on a busy machine.
    kept = await store.put("keep", "a", ttl=1.5)
    first_keep_lease = lease_of("keep")
    assert first_keep_lease not in ("0", lease) and granted_ttl(first_keep_lease) == "2"
    rewritten = await store.put("keep", "b")
    assert lease_of("keep") == "0"
    assert rewritten.version == kept.version + 1

    await eventually(lambda: store.get("t") is None, "key t expired by etcd")
    [put, expiry] = [event for event in seen if event.key == "t"]
    assert put.kv == expiring
    assert expiry.type == DELETE and expiry.revision > expiring.mod_revision
    assert etcd_kv(etcd_single, 0, prefix + "t") is None

    def first_keep_lease_gone() -> bool:
        answer = etcd_single.call(0, "/v3/lease/timetolive", {"ID": first_keep_lease})
        return answer.get("TTL") == "-1"

    await eventually(first_keep_lease_gone, "keep's first lease expired in etcd")
    await store.put("later", 1)  # any delete of keep would have come before it
    assert store.get("keep") == rewritten
    assert values.decode(unb64(etcd_kv(etcd_single, 0, prefix + "keep")["value"])) == "b"
    assert [summary(event)[::3] for event in seen if event.key == "keep"] == [(PUT, "a"),
                                                                              (PUT, "b")]


# 2. The key prefix.

@pytest_twisted.ensureDeferred
async def test_prefix_separates_stores_and_foreign_keys_are_served_or_skipped(
        etcd_single, open_store):
    """Keys live under --etcd-prefix in etcd; stores with different prefixes
    on one etcd never see each other's keys.  Keys another writer puts under
    the prefix are served and published: a plain-text value as str, a
    non-UTF-8 one as bytes; an etcd key that is no valid kvconfig key (a
    space, bytes that are not UTF-8) is skipped and counted, by the watch
    and by a store loading its replica alike."""
    root = new_prefix("prefix")
    prefix_a, prefix_b = root + "a/", root + "b/"
    a = await open_store(etcd_single.client_urls, prefix_a)
    b = await open_store(etcd_single.client_urls, prefix_b)
    seen_a, seen_b = record(a), record(b)

    await a.put("shared/name", "from a")
    await b.put("shared/name", "from b")
    # Once a has its own next write, any event of b's write its watch could
    # carry would have come before it.
    await a.put("only/a", 1)
    assert values.decode(etcd_single.get(prefix_a + "shared/name")) == "from a"
    assert values.decode(etcd_single.get(prefix_b + "shared/name")) == "from b"
    assert etcd_single.get(root + "shared/name") is None
    assert etcd_single.get("shared/name") is None
    assert store_values(a) == {"shared/name": "from a", "only/a": 1}
    assert store_values(b) == {"shared/name": "from b"}
    assert [e.key for e in seen_a] == ["shared/name", "only/a"]
    assert [e.key for e in seen_b] == ["shared/name"]

    etcd_single.put(prefix_a + "bad key", "x")
    etcd_single.put(prefix_a.encode() + b"\xff\xfe", "x")
    etcd_single.put(root + "outside", "x")
    etcd_single.put(prefix_a + "ext/text", "plain text, not JSON")
    etcd_single.put(prefix_a + "ext/binary", b"\xff\x00\xfe binary")
    await eventually(lambda: a.get("ext/binary") is not None, "a sees ext/binary")
    assert a.load("ext/text") == "plain text, not JSON"
    assert a.load("ext/binary") == b"\xff\x00\xfe binary"
    assert [summary(e)[::3] for e in seen_a[2:]] == [
        (PUT, "plain text, not JSON"), (PUT, b"\xff\x00\xfe binary")]
    assert [e.key for e in seen_a[2:]] == ["ext/text", "ext/binary"]
    assert sorted(store_values(a)) == ["ext/binary", "ext/text", "only/a", "shared/name"]
    stats = a.stats()
    assert (stats["etcd_skipped_keys"], stats["etcd_foreign_values"]) == (2, 2)
    assert store_values(b) == {"shared/name": "from b"}

    again = await open_store(etcd_single.client_urls, prefix_a)
    assert again.range("")[1] == a.range("")[1]
    assert again.stats()["etcd_skipped_keys"] == 2


@pytest_twisted.ensureDeferred
async def test_foreign_value_too_deep_for_the_json_decoder_does_not_stop_the_node(
        etcd_single, open_store):
    """Another writer's value of 5000 "[" (not JSON; deep enough that Python's
    decoder gives up with RecursionError before it finds that out) is served
    as the text it is, like any foreign value, and the node goes on applying
    later changes and taking writes; a node started afterwards loads."""
    prefix = new_prefix("deep")
    store = await open_store(etcd_single.client_urls, prefix)
    etcd_single.put(prefix + "deep", b"[" * 5000)
    etcd_single.put(prefix + "after", encoded("after"))
    await eventually(lambda: store.get("after") is not None,
                     "the store applied the change after the deep value")
    assert store.load("deep") == "[" * 5000
    assert store.stats()["etcd_foreign_values"] == 1
    kv = await within(store.put("mine", 1), "a write after the deep value")
    assert store.get("mine") == kv
    again = await open_store(etcd_single.client_urls, prefix)
    assert again.range("")[1] == store.range("")[1]


@pytest_twisted.ensureDeferred
async def test_foreign_json_kvconfig_cannot_carry_is_served_as_text(etcd_single, open_store):
    """Another writer's values that are JSON but no value kvconfig carries
    (an int beyond 32 bits, NaN, a lone surrogate) are foreign values: served
    as their text, counted, and so carried alike by every interface."""
    prefix = new_prefix("uncarried")
    store = await open_store(etcd_single.client_urls, prefix)
    texts = {"big": "12345678901234567890", "nan": "NaN", "surrogate": '"\\ud800"'}
    for key, text in texts.items():
        etcd_single.put(prefix + key, text)
    etcd_single.put(prefix + "after", encoded("after"))
    await eventually(lambda: store.get("after") is not None, "the store has every key")
    for key, text in texts.items():
        assert store.load(key) == text
        values.encode(store.load(key), 1 << 20, 64)
    assert store.stats()["etcd_foreign_values"] == 3


# 3. Two nodes on one cluster.

@pytest_twisted.ensureDeferred
async def test_two_nodes_publish_every_write_once_in_the_same_order(etcd_cluster3, open_store):
    """Two stores on one three-member cluster, each given the members in
    another order: every write made through either is published on both
    feeds exactly once, in etcd's revision order, the same on both.  The node
    that made a write shows it as soon as it is acknowledged, the other one
    soon after; a compare that fails against the other node's write says
    that write's revision, and the node then shows it."""
    cluster = etcd_cluster3
    prefix = new_prefix("two-nodes")
    a = await open_store(cluster.client_urls, prefix)
    b = await open_store(cluster.client_urls[::-1], prefix)
    assert a.stats()["etcd_endpoint"] != b.stats()["etcd_endpoint"]
    base = max(a.revision, b.revision)
    seen_a, seen_b = record(a), record(b)
    acked: list[tuple] = []

    async def write(i: int) -> None:
        node, key = (a, b)[i % 2], f"k/{i % 7}"
        if i % 5 == 4:
            revision = await node.delete(key)
            if revision is not None:
                acked.append((DELETE, key, revision))
        else:
            kv = await node.put(key, i)
            acked.append((PUT, key, kv.mod_revision))

    semaphore = DeferredSemaphore(8)
    await within(gatherResults([semaphore.run(run_async, write, i) for i in range(80)],
                               consumeErrors=True), "80 writes through two nodes")
    end = max(revision for _, _, revision in acked)
    await eventually(lambda: a.revision >= end and b.revision >= end, "both nodes caught up")
    history = etcd_history(cluster, 0, prefix, base + 1, end)
    assert [summary(e) for e in seen_a] == history
    assert [summary(e) for e in seen_b] == history
    # Writes made in one reactor turn may share a txn, hence a revision.
    revisions = [revision for _, _, revision, _ in history]
    assert revisions == sorted(revisions)
    assert len({(revision, key) for _, key, revision, _ in history}) == len(history)
    assert sorted(acked, key=lambda change: change[::-1]) == sorted(
        (change[:3] for change in history), key=lambda change: change[::-1])

    for i in range(6):
        node, other = (a, b) if i % 2 == 0 else (b, a)
        kv = await node.put("ryw", i)
        assert node.get("ryw") == kv
        await eventually(lambda other=other, kv=kv: other.get("ryw") == kv,
                         "the other node shows the write")
    revision = await a.delete("ryw")
    assert a.get("ryw") is None and a.revision >= revision

    old = await a.put("cas", "a")
    await eventually(lambda: b.get("cas") == old, "b shows cas")
    new = await b.put("cas", "b", prev_revision=old.mod_revision)
    error = await failure_of(a.put("cas", "a again", prev_revision=old.mod_revision))
    assert isinstance(error, CompareFailed) and error.actual == new.mod_revision
    assert a.get("cas") == new


# 4. A member killed under load.

KILL_AFTER = 100
WRITES = 300
IN_FLIGHT = 8


@pytest.mark.parametrize("victim", ["follower", "leader"])
@pytest_twisted.ensureDeferred
async def test_member_killed_under_load_loses_no_acknowledged_write_or_event(
        etcd_cluster3, open_store, victim):
    """A store whose first member (the one its calls and its watch use) is
    killed in the middle of a load of writes, 8 in flight: every write
    either is acknowledged or fails with Unavailable; every acknowledged one
    is in etcd's history at the acknowledged revision; the feed gives every
    change etcd holds under the prefix exactly once, in order, as do
    changes() and a store opened afterwards.  Killing the leader, then
    restarting it, the store goes on taking writes."""
    cluster = etcd_cluster3
    leader = cluster.wait_for_leader()
    first = leader if victim == "leader" else (leader + 1) % 3
    order = [first, (first + 1) % 3, (first + 2) % 3]
    survivor = order[1]
    prefix = new_prefix(f"load-{victim}")
    store = await open_store([cluster.client_urls[i] for i in order], prefix)
    assert store.stats()["etcd_endpoint"] == cluster.client_urls[first]
    base = store.revision
    seen = record(store)
    outcomes: list[tuple] = []

    async def write(i: int) -> None:
        key = f"load/{i % 37}"
        try:
            if i % 10 == 9:
                outcomes.append((i, DELETE, key, await store.delete(key)))
            else:
                outcomes.append((i, PUT, key, await store.put(key, i)))
        except Exception as e:
            outcomes.append((i, "failed", key, e))
            # A client would not retry at once either.
            await deferLater(reactor, 0.05, lambda: None)
        if len(outcomes) == KILL_AFTER:
            cluster.kill_member(first)

    semaphore = DeferredSemaphore(IN_FLIGHT)
    await within(gatherResults([semaphore.run(run_async, write, i) for i in range(WRITES)],
                               consumeErrors=True), f"{WRITES} writes", timeout=30)
    assert not cluster.members[first].running

    failures = [outcome[3] for outcome in outcomes if outcome[1] == "failed"]
    assert all(isinstance(error, Unavailable) for error in failures), [
        repr(error) for error in failures if not isinstance(error, Unavailable)]
    assert any(outcome[1] != "failed" for outcome in outcomes[KILL_AFTER:]), \
        "no write was acknowledged after the kill"
    assert store.stats()["etcd_watch_restarts"] >= 1

    await eventually(lambda: not store.stale, "the store back in step")
    marker = cluster.put(prefix + "marker", encoded("end"), index=survivor)
    end = int(marker["header"]["revision"])
    await eventually(lambda: store.revision >= end, "the store has the marker")
    history = etcd_history(cluster, survivor, prefix, base + 1, end)
    assert [summary(e) for e in seen] == history
    assert [summary(e) for e in store.changes("", base)[1]] == history
    changes = set(history)
    for i, kind, key, result in outcomes:
        if kind == PUT:
            assert (PUT, key, result.mod_revision, i) in changes
            assert result.value == i
        elif kind == DELETE and result is not None:
            assert (DELETE, key, result, None) in changes
    assert store_values(store) == etcd_values(cluster, survivor, prefix) == replay({}, seen)
    fresh = await open_store([cluster.client_urls[survivor]], prefix)
    assert fresh.range("")[1] == store.range("")[1]

    if victim == "leader":
        cluster.restart_member(first)
        kv = await within(store.put("after/restart", 1), "a write after the restart")
        assert summary(seen[-1]) == (PUT, "after/restart", kv.mod_revision, 1)


# 5. Quorum lost and regained.

@pytest.mark.parametrize("killed", [(1, 2), (0, 1)],
                         ids=["watched-member-survives", "watched-member-killed"])
@pytest_twisted.ensureDeferred
async def test_quorum_lost_refuses_writes_serves_reads_and_recovers(
        etcd_cluster3, open_store, killed):
    """With two of three members killed (the one the store watches left
    running without a leader, or killed too), the store turns stale and
    unavailable; writes are then refused without being sent (counted as
    rejections), reads answer from the replica.  Once the members are back,
    the store recovers by itself, writes succeed and are published, and no
    change is missed across the outage, not even one another writer made
    while the store could not look."""
    cluster = etcd_cluster3
    prefix = new_prefix("quorum")
    store = await open_store(cluster.client_urls, prefix)
    base = store.revision
    seen = record(store)
    acked = {}
    for i in range(10):
        acked[f"q/{i}"] = await store.put(f"q/{i}", i)
    assert store.stats()["etcd_state"] == "in_step" and not store.stale

    for index in killed:
        cluster.kill_member(index)
    await eventually(lambda: store.stats()["etcd_state"] == "unavailable",
                     "the store unavailable")
    assert store.stale and store.stats()["stale"]
    assert {kv.key: kv for kv in store.range("")[1]} == acked
    assert store.load("q/3") == 3

    rejected = store.stats()["etcd_unavailable_rejections"]
    for d in [store.put("during", 1), store.delete("q/0"), store.put("q/1", 2, ttl=5),
              store.put("q/2", 3, prev_revision=acked["q/2"].mod_revision)]:
        error = await failure_of(d)
        assert isinstance(error, Unavailable), repr(error)
    assert store.stats()["etcd_unavailable_rejections"] == rejected + 4
    assert store.stats()["etcd_outcome_unknown"] == 0

    for index in killed:
        cluster.restart_member(index)
    # Made while the store is blocked: it learns of it once it is back.
    cluster.put(prefix + "q/foreign", encoded("while away"), index=killed[0])
    await eventually(lambda: not store.stale, "the store back in step")
    await eventually(lambda: store.get("q/foreign") is not None, "the store has q/foreign")
    assert store.stats()["etcd_state"] == "in_step" and not store.stats()["stale"]
    kv = await within(store.put("after", 1), "a write after the outage")
    assert summary(seen[-1]) == (PUT, "after", kv.mod_revision, 1)

    history = etcd_history(cluster, killed[0], prefix, base + 1, kv.mod_revision)
    assert [summary(e) for e in seen] == history
    assert [change[1] for change in history[10:]] == ["q/foreign", "after"]
    for key, before in acked.items():
        assert store.get(key) == before
    assert etcd_kv(cluster, killed[0], prefix + "during") is None
    assert etcd_values(cluster, killed[0], prefix) == store_values(store)


# 6. Compaction while a node's watch is down.

@pytest_twisted.ensureDeferred
async def test_history_compacted_while_watch_down_makes_the_node_reread_its_prefix(
        etcd_cluster3, open_store):
    """The member a store watches is killed, and before the store can reopen
    its watch on its other member, keys under its prefix are changed,
    created, deleted (one created and deleted) and etcd's history is
    compacted past the store's revision.  The store's watch is refused that
    history, so it re-reads its prefix: its keys and metadata then equal
    etcd's, and the events its feed published turn its earlier view into
    etcd's."""
    cluster = etcd_cluster3
    leader = cluster.wait_for_leader()
    follower = (leader + 1) % 3
    prefix = new_prefix("compaction")
    # Watching a follower, so that killing it leaves the leader in place.
    endpoints = [cluster.client_urls[follower], cluster.client_urls[leader]]
    store = await open_store(endpoints, prefix)
    for key, value in [("keep", 1), ("change", 1), ("gone", 1), ("change", 2)]:
        await store.put(key, value)
    before, since = store_values(store), store.revision
    seen = record(store)
    # The member the store's watch is on now (a busy machine may have made
    # it move), and the other one it knows.
    await eventually(lambda: not store.stale, "the store in step")
    watched = cluster.client_urls.index(store.stats()["etcd_endpoint"])
    other = cluster.client_urls.index(next(url for url in endpoints
                                           if url != store.stats()["etcd_endpoint"]))

    # From here to the compaction the reactor does not run: the store
    # cannot see the kill, nor reopen its watch, before etcd compacts.
    cluster.kill_member(watched)
    cluster.wait_for_leader()

    def put(key: str, value: Any) -> int:
        return int(cluster.put(prefix + key, encoded(value), index=other)["header"]["revision"])

    def delete(key: str) -> None:
        cluster.call(other, "/v3/kv/deleterange", {"key": b64(prefix + key)})

    put("change", 3)
    put("new", "n")
    put("brief", 0)
    delete("gone")
    delete("brief")
    revision = put("change", 4)
    cluster.call(other, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
    assert store.revision == since

    await eventually(lambda: store.stats()["etcd_resyncs"] >= 1, "the store re-read its prefix")
    await eventually(lambda: not store.stale and store.revision >= revision,
                     "the store back in step")
    expected = etcd_values(cluster, other, prefix)
    assert expected == {"keep": 1, "change": 4, "new": "n"}
    assert store_values(store) == expected
    for key, kv in etcd_kvs(cluster, other, prefix).items():
        got = store.get(key)
        assert (got.version, got.create_revision, got.mod_revision) == metadata(kv)
    assert replay(before, seen) == expected
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)
    assert all(e.revision > since for e in seen)

    kv = await within(store.put("after", 1), "a write after the re-read")
    assert summary(seen[-1]) == (PUT, "after", kv.mod_revision, 1)


# 7. One key's writes keep their order.

@pytest_twisted.ensureDeferred
async def test_pipelined_writes_to_one_key_apply_in_order(etcd_single, open_store):
    """50 puts to one key sent without waiting for each other commit in the
    order they were made: the key ends with the last value, each write is
    acknowledged with the next version and a later revision, and the feed
    shows the values in order."""
    prefix = new_prefix("order")
    store = await open_store(etcd_single.client_urls, prefix)
    seen = record(store)
    kvs = await within(gatherResults([store.put("k", i) for i in range(50)],
                                     consumeErrors=True), "50 pipelined puts")
    assert [kv.value for kv in kvs] == list(range(50))
    assert [kv.version for kv in kvs] == list(range(1, 51))
    assert [kv.mod_revision for kv in kvs] == sorted(kv.mod_revision for kv in kvs)
    assert store.load("k") == 49
    assert values.decode(etcd_single.get(prefix + "k")) == 49
    assert [e.kv.value for e in seen if e.key == "k"] == list(range(50))


# 8. No etcd at start.

@pytest_twisted.ensureDeferred
async def test_store_without_etcd_is_not_ready_until_etcd_comes(etcd_binary, tmp_path,
                                                                   open_store):
    """A store whose only member refuses connections keeps loading: reads
    and writes fail with Unavailable (writes without being sent), and it
    reports itself stale.  When an etcd starts on that port the store
    loads its replica by itself and serves."""
    cluster = EtcdCluster(etcd_binary, tmp_path / "etcd", size=1)
    try:
        store = await open_store(cluster.client_urls, new_prefix("absent"), start=False)
        loading = store.backend.reason
        started = store.start()
        await eventually(lambda: store.backend.reason != loading,
                         "the store found no member to load from")
        assert not started.called
        for read in (lambda: store.get("k"), lambda: store.load("k"),
                     lambda: store.range(""), lambda: store.changes("", 0)):
            with pytest.raises(Unavailable):
                read()
        for d in (store.put("k", 1), store.delete("k")):
            assert isinstance(await failure_of(d), Unavailable)
        stats = store.stats()
        assert stats["etcd_state"] == "loading" and stats["stale"] and store.stale
        assert stats["etcd_unavailable_rejections"] == 2

        cluster.start()
        await within(started, "the store loading its replica once etcd is up")
        assert store.range("")[1] == []
        await eventually(lambda: not store.stale, "the store in step with etcd")
        kv = await within(store.put("k", 1), "a write once etcd is up")
        assert store.get("k") == kv
    finally:
        cluster.close()


# 9. A member that hangs: it accepts connections and never answers.

@contextlib.contextmanager
def hung(cluster: EtcdCluster, index: int):
    """Member *index* frozen with SIGSTOP (as a frozen VM, or a half-open
    connection to a crashed host) for the block, and resumed after it, so
    that the cluster's teardown finds it running.  While it hangs, only the
    other members may be asked anything: a call to it blocks the harness."""
    process = cluster.members[index].process
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("victim", ["follower", "leader"])
@pytest_twisted.ensureDeferred
async def test_hung_member_costs_at_most_the_first_write_then_the_store_moves_on(
        etcd_cluster3, open_store, victim):
    """The member a store's calls and watch use hangs (SIGSTOP) while the
    other two keep quorum.  At most the first writes fail, with Unavailable
    saying their outcome is unknown (they were sent and got no answer within
    --etcd-timeout); the store then moves to another member: later writes
    are acknowledged, the store ends in step, not stale, on another member,
    and every acknowledged write is in etcd and in the store."""
    cluster = etcd_cluster3
    leader = cluster.wait_for_leader()
    first = leader if victim == "leader" else (leader + 1) % 3
    order = [first, (first + 1) % 3, (first + 2) % 3]
    live = order[1]
    prefix = new_prefix(f"hung-{victim}")
    store = await open_store([cluster.client_urls[i] for i in order], prefix)
    acked = {"before": await within(store.put("before", 0), "a write before the hang")}
    await eventually(lambda: not store.stale, "the store in step")
    assert store.stats()["etcd_endpoint"] == cluster.client_urls[first]

    outcomes: list[tuple[str, object]] = []
    with hung(cluster, first):
        for i in range(6):
            key = f"w/{i}"
            try:
                acked[key] = await within(store.put(key, i), f"write {i} settled")
                outcomes.append(("ok", key))
            except Unavailable as e:
                outcomes.append(("failed", str(e)))
        failures = [why for kind, why in outcomes if kind == "failed"]
        assert all("may or may not have been applied" in why for why in failures), failures
        kinds = [kind for kind, _ in outcomes]
        # Failures only at first, then every write acknowledged.
        assert kinds == sorted(kinds, key=lambda kind: kind == "ok"), outcomes
        assert len(failures) <= 2 and kinds[-4:] == ["ok"] * 4, outcomes

        await eventually(lambda: store.stats()["etcd_state"] == "in_step",
                         "the store in step through another member")
        assert not store.stale and not store.stats()["stale"]
        assert store.stats()["etcd_endpoint"] != cluster.client_urls[first]
        in_etcd = etcd_values(cluster, live, prefix)
        for key, kv in acked.items():
            assert in_etcd[key] == kv.value
            assert store.get(key) == kv


@pytest.mark.parametrize("how", ["hung", "down"])
@pytest_twisted.ensureDeferred
async def test_store_starting_without_its_first_member_loads_from_another(
        etcd_cluster3, open_store, how):
    """A store started while the first member it lists hangs (SIGSTOP: its
    read gets no answer) or is down (connections refused) loads its replica
    from another member: start() fires, the store is in step with what
    etcd holds, and takes writes."""
    cluster = etcd_cluster3
    leader = cluster.wait_for_leader()
    first = (leader + 1) % 3
    order = [first, (first + 1) % 3, (first + 2) % 3]
    prefix = new_prefix(f"start-{how}")
    cluster.put(prefix + "before", encoded("before"), index=leader)
    with contextlib.ExitStack() as stack:
        if how == "hung":
            stack.enter_context(hung(cluster, first))
        else:
            cluster.kill_member(first)
        store = await open_store([cluster.client_urls[i] for i in order], prefix,
                                 start=False)
        await within(store.start(), "the store loading its replica from another member")
        await eventually(lambda: store.stats()["etcd_state"] == "in_step",
                         "the store in step")
        assert not store.stale
        assert store.stats()["etcd_endpoint"] != cluster.client_urls[first]
        assert store.load("before") == "before"
        kv = await within(store.put("after", 1), "a write after loading")
        assert store.get("after") == kv
        assert etcd_values(cluster, leader, prefix) == {"before": "before", "after": 1}


# 10. stop() with writes queued and a batch pending.

def _outcome(d: Deferred) -> list:
    """A list that gets *d*'s result (a KeyValue or an exception) once it has one."""
    got: list = []
    d.addCallbacks(got.append, lambda failure: got.append(failure.value))
    return got


@pytest.mark.parametrize("head", ["sent", "unsent"])
@pytest_twisted.ensureDeferred
async def test_stop_fails_unsent_writes_lets_sent_ones_finish_and_sends_nothing_after(
        etcd_single, open_store, head):
    """stop() while five pipelined puts to key k wait, the first of them
    already sent (head="sent") or still in the batch not yet sent
    (head="unsent"), and a put to another key waits in that batch: every
    write not yet sent fails with Unavailable ("stopping"); a sent one is
    acknowledged or fails with Unavailable; what etcd holds once stop()
    has fired is the value before or the acknowledged one, and nothing
    reaches etcd afterwards; a write after stop() fails with Unavailable."""
    prefix = new_prefix(f"stop-{head}")
    store = await open_store(etcd_single.client_urls, prefix)
    await within(store.put("k", "before"), "a write before")
    batches = store.stats()["etcd_batches"]
    writes = {("k", i): _outcome(store.put("k", i)) for i in range(5)}
    if head == "sent":
        # The batch holding k's first write goes in the next reactor turn.
        for _ in range(100):
            await deferLater(reactor, 0, lambda: None)
            if store.stats()["etcd_batches"] > batches:
                break
        assert store.stats()["etcd_batches"] == batches + 1
    writes["y", 0] = _outcome(store.put("y", 0))
    await within(store.stop(), "stop()")
    at_stop = etcd_values(etcd_single, 0, prefix)
    await eventually(lambda: all(writes.values()), "every write has its outcome")

    results = {write: got[0] for write, got in writes.items()}
    sent = [("k", 0)] if head == "sent" else []
    unsent = {write: result for write, result in results.items() if write not in sent}
    assert all(isinstance(e, Unavailable) and "stopping" in str(e)
               for e in unsent.values()), unsent
    if head == "unsent":
        assert at_stop == {"k": "before"}
    elif isinstance(results["k", 0], KeyValue):
        assert results["k", 0].value == 0 and at_stop == {"k": 0}
    else:
        # Sent, and failed: its outcome is unknown.
        assert isinstance(results["k", 0], Unavailable), results
        assert at_stop in ({"k": "before"}, {"k": 0}), at_stop
    # A write sent after stop() fired would have reached etcd by now.
    await deferLater(reactor, 0.5, lambda: None)
    assert etcd_values(etcd_single, 0, prefix) == at_stop

    for d in (store.put("z", 1), store.delete("k")):
        error = await failure_of(d)
        assert isinstance(error, Unavailable) and "stopping" in str(error), repr(error)


# 11. One hot key written by pipelining writers.

HOT_WRITES = 400


@pytest_twisted.ensureDeferred
async def test_hot_key_pipelined_by_two_writers_keeps_few_remembered_puts(
        etcd_single, open_store):
    """Two writers each put one key 400 times, each waiting for its own
    write but not the other's, so the node always has a write to the key
    in flight and another queued: the puts the node remembers to acknowledge
    its writes with (the applied puts of the key's KeyWrites) stay few
    instead of growing with every write, each write is acknowledged with its own version, and the
    key ends with the value last acknowledged."""
    prefix = new_prefix("hot")
    store = await open_store(etcd_single.client_urls, prefix)
    acked = []

    async def writer(name: str) -> None:
        for i in range(HOT_WRITES):
            acked.append(await store.put("hot", [name, i]))

    writers = gatherResults([run_async(writer, name) for name in ("a", "b")],
                            consumeErrors=True)
    peak = 0
    deadline = reactor.seconds() + WAIT
    while not writers.called and reactor.seconds() < deadline:
        writes = store.backend.writes.in_flight.get("hot")
        peak = max(peak, len(writes.applied) if writes is not None else 0)
        await deferLater(reactor, POLL, lambda: None)
    await within(writers, "the writers", timeout=0.1)
    # Without pruning, it held every put made while the key was being written.
    assert peak <= 200, peak
    assert sorted(kv.version for kv in acked) == list(range(1, 2 * HOT_WRITES + 1))
    last = max(acked, key=lambda kv: kv.mod_revision)
    assert last.version == 2 * HOT_WRITES and last.value[1] == HOT_WRITES - 1
    assert store.get("hot") == last
    assert values.decode(etcd_single.get(prefix + "hot")) == last.value
