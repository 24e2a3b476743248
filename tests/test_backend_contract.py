"""
The backend contract: every backend, reached through the Store, behaves alike.

Tests run on the real reactor (so the sqlite group commit happens as in
production); the etcd backend runs against a real single-member etcd, each
test under a key prefix of its own.  etcd's revisions are global to its
cluster, so every test counts revisions from the store's revision when it
opened (``store.revision + n``), which is exact as long as nothing else
writes to that etcd during the test.  Time-based behaviour (TTL) is tested
with a Clock in test_ttl_and_commit.py, and against etcd in test_etcd_backend.py.
"""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest
import pytest_twisted
from twisted.internet import reactor

from kvconfig.backends import backend_from_string
from kvconfig.errors import Compacted, CompareFailed, InvalidArgument, InvalidKey, InvalidValue
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Absent
from kvconfig.store import Store

pytest_plugins = ["etcdcluster"]

BACKENDS = ["memory", "sqlite", "etcd"]
_prefixes = itertools.count()


@pytest.fixture(params=BACKENDS)
def backend_spec(request, tmp_path):
    """(kind, --store string, etcd prefix) of the backend under test."""
    if request.param == "etcd":
        etcd = request.getfixturevalue("etcd_single")
        return "etcd", f"etcd:{etcd.client_urls[0]}", f"contract/{next(_prefixes)}/"
    spec = "memory:" if request.param == "memory" else f"sqlite:{tmp_path / 'kv.db'}"
    return request.param, spec, ""


@pytest_twisted.async_yield_fixture
async def open_store(backend_spec):
    """An async function opening a started Store on the backend under test;
    the same sqlite file, or the same etcd prefix, each time it is called.
    ``open_store.base`` is the revision of the first store opened."""
    kind, spec, prefix = backend_spec
    opened = []

    async def open_(**limits) -> Store:
        limits = Limits(**limits)
        store = Store(backend_from_string(spec, reactor, limits, etcd_prefix=prefix), limits)
        opened.append(store)
        await store.start()
        if len(opened) == 1:
            open_.base = store.revision
        return store

    open_.kind = kind
    yield open_
    for store in opened:
        await store.stop()


@pytest_twisted.async_fixture
async def store(open_store):
    return await open_store()


async def failure_of(d):
    try:
        await d
    except Exception as e:
        return e
    raise AssertionError("expected the Deferred to fail")


@pytest_twisted.ensureDeferred
async def test_put_then_get_has_etcd_metadata(store):
    """A first put creates the key at version 1 with create == mod revision."""
    kv = await store.put("app/a", "one")
    got = store.get("app/a")
    assert got == kv
    assert (got.value, got.version) == ("one", 1)
    assert got.create_revision == got.mod_revision == store.revision


@pytest_twisted.ensureDeferred
async def test_rewrite_bumps_version_and_mod_revision_only(store):
    """Rewriting a key keeps create_revision and advances version and mod_revision."""
    base = store.revision
    first = await store.put("app/a", "one")
    await store.put("other", 1)
    second = await store.put("app/a", "two")
    assert second.version == 2
    assert second.create_revision == first.create_revision
    assert second.mod_revision == base + 3 == store.revision


@pytest_twisted.ensureDeferred
async def test_delete_is_an_event_and_missing_delete_changes_nothing(store):
    """Deleting a key advances the revision; deleting a missing key does not."""
    base = store.revision
    await store.put("k", 1)
    assert await store.delete("k") == base + 2
    assert store.get("k") is None and store.load("k") is None
    assert await store.delete("k") is None
    assert store.revision == base + 2


@pytest_twisted.ensureDeferred
async def test_recreated_key_starts_a_new_life(store):
    """A key written after its delete starts again at version 1."""
    base = store.revision
    await store.put("k", 1)
    await store.put("k", 2)
    await store.delete("k")
    kv = await store.put("k", 3)
    assert (kv.version, kv.create_revision, kv.mod_revision) == (1, base + 4, base + 4)


@pytest_twisted.ensureDeferred
async def test_compare_and_set_on_mod_revision(store):
    """put with prev_revision succeeds only on the current mod_revision;
    a lost compare raises CompareFailed and changes nothing."""
    kv = await store.put("cfg", "a", prev_revision=0)
    error = await failure_of(store.put("cfg", "b", prev_revision=0))
    assert isinstance(error, CompareFailed) and error.actual == kv.mod_revision
    error = await failure_of(store.put("cfg", "b", prev_revision=kv.mod_revision + 7))
    assert isinstance(error, CompareFailed)
    assert store.get("cfg") == kv and store.revision == kv.mod_revision
    kv2 = await store.put("cfg", "b", prev_revision=kv.mod_revision)
    assert kv2.value == "b" and kv2.version == 2


@pytest_twisted.ensureDeferred
async def test_compare_and_delete(store):
    """delete with prev_revision deletes only on the current mod_revision."""
    kv = await store.put("cfg", "a")
    assert isinstance(await failure_of(store.delete("cfg", prev_revision=99)), CompareFailed)
    assert store.get("cfg") == kv
    assert await store.delete("cfg", prev_revision=kv.mod_revision) == kv.mod_revision + 1


@pytest_twisted.ensureDeferred
async def test_every_xmlrpc_type_round_trips(store):
    """Every type XML-RPC carries reads back equal, nested too."""
    value = {
        "s": "héllo ✓", "i": -(2**31), "f": 1.5, "t": True, "n": None,
        "l": [1, [2, [3]]], "b": b"\x00\xff", "d": datetime(2026, 11, 22, 1, 2, 3),
        "$weird": {"$bytes": "not a tag"},
    }
    for key, item in [("v/all", value), ("v/bytes", b"raw"), ("v/tuple", (1, 2))]:
        await store.put(key, item)
    assert store.load("v/all") == value
    assert store.load("v/bytes") == b"raw"
    assert store.load("v/tuple") == [1, 2]


@pytest_twisted.ensureDeferred
async def test_range_lists_a_prefix_in_key_order(store):
    """range(prefix) returns exactly the keys under the prefix, sorted, with a limit."""
    for key in ["app/b", "app/a", "apple", "app/c/d", "zzz", "ap"]:
        await store.put(key, key)
    revision, kvs, more = store.range("app/")
    assert revision == store.revision and not more
    assert [kv.key for kv in kvs] == ["app/a", "app/b", "app/c/d"]
    assert [kv.key for kv in store.range("app/", limit=2)[1]] == ["app/a", "app/b"]
    assert len(store.range("")[1]) == 6


@pytest_twisted.ensureDeferred
async def test_range_pages_continue_after_the_last_key(store):
    """A page says whether more follow; the next starts after its last key;
    together the pages are the whole listing, each key once."""
    keys = [f"page/{i:02d}" for i in range(7)]
    for key in reversed(keys):
        await store.put(key, key)
    await store.put("pagf", "outside the prefix")
    seen, after, pages = [], None, 0
    while True:
        _, kvs, more = store.range("page/", limit=3, after=after)
        seen += [kv.key for kv in kvs]
        pages += 1
        if not more:
            break
        after = kvs[-1].key
    assert seen == keys and pages == 3
    assert store.range("page/", after="page/99")[1:] == ([], False)
    assert [kv.key for kv in store.range("page/", after="a")[1]] == keys  # before the prefix


@pytest_twisted.ensureDeferred
async def test_changes_since_is_exclusive_and_filtered(store):
    """changes(prefix, since) returns the events after since, in revision order."""
    base = store.revision
    await store.put("app/a", 1)          # base + 1
    await store.put("other", 1)          # base + 2
    await store.put("app/a", 2)          # base + 3
    await store.delete("app/a")          # base + 4
    revision, events = store.changes("app/", base + 1)
    assert revision == base + 4
    assert [(e.type, e.key, e.revision) for e in events] == [(PUT, "app/a", base + 3),
                                                              (DELETE, "app/a", base + 4)]
    assert events[0].kv.value == 2
    assert [e.revision for e in store.changes("", base)[1]] == [base + n for n in (1, 2, 3, 4)]
    assert store.changes("", base + 4)[1] == []


@pytest_twisted.ensureDeferred
async def test_changes_older_than_history_are_compacted(open_store):
    """Asking for history that left the window raises Compacted; the window works."""
    store = await open_store(history_events=3)
    base = store.revision
    for i in range(6):
        await store.put("k", i)
    error = await failure_of(_async_call(store.changes, "", base + 1))
    assert isinstance(error, Compacted) and error.compact_revision == base + 3
    assert [e.revision for e in store.changes("", base + 3)[1]] == [base + n for n in (4, 5, 6)]


async def _async_call(function, *args):
    return function(*args)


@pytest_twisted.ensureDeferred
async def test_feed_publishes_every_event_in_revision_order(store):
    """Consumers get every change in revision order, filtered by prefix."""
    base = store.revision
    everything, app = [], []
    store.feed.subscribe(everything.append)
    store.feed.subscribe(app.append, "app/")
    for i in range(20):
        await store.put(f"app/{i % 3}" if i % 2 else f"x/{i}", i)
    await store.delete("app/1")
    assert [e.revision for e in everything] == list(range(base + 1, base + 22))
    assert all(e.key.startswith("app/") for e in app) and len(app) == 11


@pytest_twisted.ensureDeferred
async def test_write_is_acknowledged_and_published_only_once_durable(open_store):
    """The writer's Deferred and the feed both wait for the commit (sqlite),
    and the concurrent writes of one turn share one commit."""
    store = await open_store()
    seen = []
    store.feed.subscribe(seen.append)
    ds = [store.put(f"g/{i}", i) for i in range(10)]
    if open_store.kind == "sqlite":
        assert not any(d.called for d in ds) and seen == []
        commits = store.backend.commits
    for d in ds:
        await d
    assert len(seen) == 10
    if open_store.kind == "sqlite":
        assert store.backend.commits == commits + 1


@pytest_twisted.ensureDeferred
async def test_a_run_of_writes_is_made_in_order_each_with_its_outcome(open_store):
    """write_many makes each write as put() and delete() would, each seeing
    the ones before it to its key (compare-and-set on a write of the same
    run); a write that fails, by its input or its compare, fails alone, in
    its place; readers and the feed see the run only once it is durable.
    The local backends make the whole run in order, as one commit; etcd
    orders each key's writes (its writes to different keys are sent at
    once, as pipelined single writes always were)."""
    store = await open_store()
    base = store.revision
    await store.put("run/a", "before")
    seen = []
    store.feed.subscribe(seen.append)
    if open_store.kind == "sqlite":
        commits = store.backend.commits
    made = store.write_many([
        (PUT, "run/a", "one", None, None),
        (PUT, "run/b", {"x": [1, 2.5]}, 0, None),       # only if absent: it is
        (PUT, "run/b", "again", 0, None),                 # no longer absent
        (PUT, "bad key", 1, None, None),
        (PUT, "run/c", float("nan"), None, None),
        (DELETE, "run/missing", None, None, None),
        (DELETE, "run/a", None, None, None),
        (DELETE, "run/a", None, None, None),              # absent by now
    ])
    if open_store.kind in ("sqlite", "etcd"):
        assert not made.called
        assert store.load("run/a") == "before" and store.revision == base + 1 and seen == []
    outcomes = await made
    one, b, again, bad_key, nan, missing, deleted, gone = outcomes
    assert (one.key, one.value, one.version) == ("run/a", "one", 2)
    assert (b.key, b.value, b.version) == ("run/b", {"x": [1, 2.5]}, 1)
    assert isinstance(again, CompareFailed) and again.actual == b.mod_revision
    assert isinstance(bad_key, InvalidKey) and isinstance(nan, InvalidValue)
    assert isinstance(missing, Absent) and deleted > one.mod_revision
    assert isinstance(gone, Absent) and gone.revision >= deleted
    assert sorted((e.revision, e.type, e.key) for e in seen) == [
        (e.revision, e.type, e.key) for e in seen]
    assert sorted((e.revision, e.type, e.key) for e in seen) == sorted([
        (one.mod_revision, PUT, "run/a"), (b.mod_revision, PUT, "run/b"),
        (deleted, DELETE, "run/a")])
    assert store.get("run/a") is None and store.get("run/b") == b
    assert store.revision == base + 4
    if open_store.kind != "etcd":
        assert (one.mod_revision, b.mod_revision, deleted) == (base + 2, base + 3, base + 4)
        assert missing.revision == base + 3 and gone.revision == base + 4
    if open_store.kind == "sqlite":
        assert store.backend.commits == commits + 1


@pytest_twisted.ensureDeferred
async def test_a_run_that_changes_nothing_still_answers(open_store):
    """A run of failed compares and deletes of absent keys changes nothing
    and answers each in its place."""
    store = await open_store()
    kv = await store.put("k", 1)
    outcomes = await store.write_many([(PUT, "k", 2, kv.mod_revision + 5, None),
                                       (DELETE, "nothing", None, None, None)])
    assert isinstance(outcomes[0], CompareFailed) and isinstance(outcomes[1], Absent)
    assert outcomes[1].revision == kv.mod_revision
    assert store.revision == kv.mod_revision and store.load("k") == 1
    # "Absent as of a revision" is said once that revision is durable: a
    # client told of it can read it.  A local backend decides it after the
    # write before it (etcd, on another key, maybe before).
    pending = store.put("other", 1)
    absent = store.write_many([(DELETE, "nothing", None, None, None)])
    if open_store.kind == "sqlite":
        assert not absent.called
    (outcome,) = await absent
    assert isinstance(outcome, Absent) and store.revision >= outcome.revision
    assert (await pending).mod_revision == kv.mod_revision + 1
    if open_store.kind != "etcd":
        assert outcome.revision == kv.mod_revision + 1


@pytest_twisted.ensureDeferred
async def test_rejected_input_changes_nothing(store):
    """Bad keys and arguments raise typed errors and leave the store as it was."""
    await store.put("k", 1)
    before = (store.revision, store.get("k"))
    for bad in [store.put("", 1), store.put("a b", 1), store.put(7, 1),
                store.put("k", 2, prev_revision=-1), store.put("k", 2, ttl=-1),
                store.delete("k\n")]:
        assert isinstance(await failure_of(bad), (InvalidKey, InvalidArgument))
    assert (store.revision, store.get("k")) == before


@pytest_twisted.ensureDeferred
async def test_reopened_store_has_every_acknowledged_write(open_store):
    """After a restart the keys, metadata and revision are as before;
    revisions never go backwards, even when the newest change was a delete.
    sqlite keeps its history too; an etcd node's history starts when it
    starts (older is answered compacted, and clients take a snapshot)."""
    if open_store.kind == "memory":
        pytest.skip("the memory backend keeps nothing across restarts, by design")
    store = await open_store()
    base = open_store.base
    for i in range(5):
        await store.put(f"k{i}", {"i": i})
    await store.delete("k4")
    keys = store.range("")
    await store.stop()
    again = await open_store()
    assert again.range("") == keys
    assert again.revision == base + 6
    if open_store.kind == "etcd":
        error = await failure_of(_async_call(again.changes, "", base))
        assert isinstance(error, Compacted) and error.compact_revision == base + 6
        assert again.changes("", base + 6)[1] == []
    else:
        assert [e.revision for e in again.changes("", base)[1]] == list(range(base + 1,
                                                                             base + 7))
    kv = await again.put("k9", 1)
    assert kv.mod_revision == base + 7


@pytest_twisted.ensureDeferred
async def test_readers_see_a_change_only_once_it_is_durable(open_store):
    """Until a write is acknowledged, reads, listings and changes() show the
    state before it; later writes to the key are decided on top of it
    (CAS), on etcd too, where they are sent in order."""
    store = await open_store()
    base = store.revision
    await store.put("k", "old")
    d = store.put("k", "new")
    cas = store.put("k", "newer", prev_revision=base + 2)  # decided on the pending write
    if open_store.kind in ("sqlite", "etcd"):
        assert not d.called
        assert store.load("k") == "old" and store.revision == base + 1
        assert [kv.value for kv in store.range("")[1]] == ["old"]
        assert store.changes("", base + 1)[1] == []
    await d
    await cas
    assert store.load("k") == "newer" and store.revision == base + 3
