"""TTL keys (driven by a Clock) and the sqlite commit path, on the local backends."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvconfig.backends.memory import MemoryBackend
from kvconfig.backends.sqlite import SQLiteBackend
from kvconfig.errors import CompareFailed, InvalidKey, Unavailable
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT
from kvconfig.store import Store


@pytest.fixture(params=["memory", "sqlite"])
def clocked(request, tmp_path):
    """(store, clock, reopen) on a Clock; reopen() opens the same store anew."""
    clock = Clock()
    clock.advance(1_000_000)
    opened = []

    def reopen() -> Store:
        limits = Limits()
        if request.param == "memory":
            backend = MemoryBackend(clock, limits)
        else:
            backend = SQLiteBackend(str(tmp_path / "kv.db"), clock, limits)
        store = Store(backend, limits)
        store.start()
        opened.append(store)
        return store

    yield reopen(), clock, reopen
    for store in opened:
        store.stop()


def settle(clock: Clock, d):
    """Run the turn that commits, then return what *d* fired with."""
    clock.advance(0)
    results = []
    d.addBoth(results.append)
    assert results, "the write was not acknowledged after its commit"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_ttl_key_expires_as_a_delete_event(clocked):
    """A key with a TTL is deleted when it runs out, as an expired delete event."""
    store, clock, _ = clocked
    events = []
    store.feed.subscribe(events.append)
    kv = settle(clock, store.put("hb/node1", "alive", ttl=10))
    assert kv.expires_at == clock.seconds() + 10
    clock.advance(9.9)
    assert store.load("hb/node1") == "alive"
    clock.advance(0.1)
    clock.advance(0)
    assert store.get("hb/node1") is None
    assert [(e.type, e.expired) for e in events] == [("put", False), (DELETE, True)]
    assert store.stats()["expired"] == 1


def test_rewrite_renews_or_clears_the_ttl(clocked):
    """Writing a TTL key again with a TTL restarts it; without one makes it permanent."""
    store, clock, _ = clocked
    settle(clock, store.put("a", 1, ttl=10))
    settle(clock, store.put("b", 1, ttl=10))
    clock.advance(8)
    settle(clock, store.put("a", 2, ttl=10))
    settle(clock, store.put("b", 2))
    clock.advance(5)
    clock.advance(0)
    assert store.load("a") == 2 and store.load("b") == 2
    clock.advance(5)
    clock.advance(0)
    assert store.load("a") is None and store.load("b") == 2


def test_deleted_ttl_key_does_not_expire_a_later_one(clocked):
    """The timer of a deleted key never deletes the key written after it."""
    store, clock, _ = clocked
    settle(clock, store.put("a", 1, ttl=5))
    settle(clock, store.delete("a"))
    settle(clock, store.put("a", 2))
    clock.advance(6)
    clock.advance(0)
    assert store.load("a") == 2


def test_ttl_survives_restart_on_sqlite(clocked):
    """An unexpired TTL key is still timed after a restart; an overdue one is
    deleted right away (sqlite)."""
    store, clock, reopen = clocked
    if store.backend.name != "sqlite":
        pytest.skip("only sqlite keeps keys across a restart")
    settle(clock, store.put("short", 1, ttl=5))
    settle(clock, store.put("long", 1, ttl=50))
    store.stop()
    clock.advance(10)
    again = reopen()
    clock.advance(0)
    clock.advance(0)
    assert again.load("short") is None and again.load("long") == 1
    clock.advance(41)
    clock.advance(0)
    assert again.load("long") is None


def test_failed_commit_fails_the_writes_and_changes_nothing(tmp_path):
    """When sqlite cannot commit, every write of the batch fails with
    Unavailable, nothing is published, and the keyspace is as committed."""
    clock = Clock()
    limits = Limits()
    store = Store(SQLiteBackend(str(tmp_path / "kv.db"), clock, limits), limits)
    store.start()
    settle(clock, store.put("kept", 1))
    published = []
    store.feed.subscribe(published.append)
    store.backend._db.execute("PRAGMA query_only = 1")  # a real sqlite write failure
    ds = [store.put("kept", 2), store.put("new", 1)]
    for d in ds:
        with pytest.raises(Unavailable):
            settle(clock, d)
    assert published == []
    assert store.load("kept") == 1 and store.get("new") is None and store.revision == 1
    store.backend._db.execute("PRAGMA query_only = 0")
    assert settle(clock, store.put("new", 1)).mod_revision == 2
    store.stop()


def test_a_run_whose_commit_fails_fails_every_write_of_it(tmp_path):
    """A run of writes (write_many) that sqlite cannot commit answers each of
    its writes Unavailable, the compare that failed in it too (it rested on
    the run), publishes nothing and changes nothing; the next run goes on
    from the committed state."""
    clock = Clock()
    limits = Limits()
    store = Store(SQLiteBackend(str(tmp_path / "kv.db"), clock, limits), limits)
    store.start()
    settle(clock, store.put("kept", 1))
    published = []
    store.feed.subscribe(published.append)
    store.backend._db.execute("PRAGMA query_only = 1")  # a real sqlite write failure
    run = [(PUT, "kept", 2, None, None), (PUT, "new", 1, 0, None),
           (PUT, "new", 2, 0, None), (DELETE, "kept", None, None, None),
           (PUT, "", 3, None, None)]
    outcomes = settle(clock, store.write_many(run))
    assert [type(outcome) for outcome in outcomes] == [Unavailable] * 4 + [InvalidKey]
    assert published == []
    assert store.load("kept") == 1 and store.get("new") is None and store.revision == 1
    store.backend._db.execute("PRAGMA query_only = 0")
    kv, again = settle(clock, store.write_many(run[1:3]))
    assert kv.mod_revision == 2 and isinstance(again, CompareFailed)
    store.stop()
