"""The sqlite writer process: group commit off the reactor, and its failures."""

from __future__ import annotations

import os
import signal
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater

from kvconfig.backends.sqlite import SQLiteBackend
from kvconfig.errors import Unavailable
from kvconfig.limits import Limits
from kvconfig.store import Store

POISON_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS poison BEFORE INSERT ON kv WHEN NEW.key = 'poison'
BEGIN SELECT RAISE(ABORT, 'poisoned key'); END;
"""


def open_store(path) -> Store:
    limits = Limits()
    store = Store(SQLiteBackend(str(path), reactor, limits), limits)
    store.start()
    assert store.backend.use_writer
    return store


async def until(condition, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("condition not met in time")


def committed_keys(path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT key, mod_revision FROM kv"))


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_every_write_in_flight(tmp_path):
    """stop() fires only once every write sent to the writer is committed."""
    path = tmp_path / "kv.db"
    store = open_store(path)
    ds = [store.put(f"k{i}", i) for i in range(200)]
    await store.stop()
    results = await DeferredList(ds, consumeErrors=True)
    assert all(ok for ok, _ in results)
    assert len(committed_keys(path)) == 200


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_fails_its_writes_and_the_writer_comes_back(tmp_path):
    """A commit sqlite refuses fails every write of that transaction with
    Unavailable, publishes nothing for them, keeps earlier writes, and a new
    writer takes the next ones."""
    path = tmp_path / "kv.db"
    store = open_store(path)
    await store.put("before", 1)
    with sqlite3.connect(path) as db:
        db.executescript(POISON_TRIGGER)
    published = []
    store.feed.subscribe(published.append)
    first_writer = store.backend.writer_pid
    ds = [store.put("poison", 1), store.put("same-batch", 1)]
    for d in ds:
        with pytest.raises(Unavailable):
            await d
    assert published == []
    assert store.get("poison") is None and store.get("same-batch") is None
    assert store.load("before") == 1 and store.revision == 1
    await until(lambda: store.backend.writer_pid not in (None, first_writer))
    kv = await store.put("after", 1)
    assert kv.mod_revision == 2
    assert committed_keys(path) == {"before": 1, "after": 2}
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_killed_writer_loses_no_acknowledged_write(tmp_path):
    """When the writer is killed mid-load, every acknowledged write is in the
    file, the writes it had committed without answering are acknowledged
    after re-reading the file, the rest fail with Unavailable, and writing
    goes on with a new writer."""
    path = tmp_path / "kv.db"
    store = open_store(path)
    acknowledged, failed = {}, []

    def record(kv):
        acknowledged[kv.key] = kv.mod_revision

    for round_ in range(30):
        ds = [store.put(f"r{round_}/k{i}", i).addCallbacks(record, failed.append)
              for i in range(20)]
        if round_ == 10:
            os.kill(store.backend.writer_pid, signal.SIGKILL)
        await DeferredList(ds)
        if round_ == 10:
            await until(lambda: store.backend.writer_pid is not None)
    assert acknowledged and len(acknowledged) + len(failed) == 600
    assert store.backend.commit_failures == 1  # the recovery ran
    assert all(f.check(Unavailable) for f in failed)
    on_disk = committed_keys(path)
    assert {k: on_disk.get(k) for k in acknowledged} == acknowledged
    assert set(on_disk) == set(acknowledged)
    # The keyspace agrees with the file: nothing failed is readable.
    assert {kv.key for kv in store.range("")[1]} == set(acknowledged)
    await store.stop()
