"""The sqlite writer process: group commit off the reactor, and its failures."""

from __future__ import annotations

import marshal
import os
import signal
import sqlite3
from contextlib import closing

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from kvconfig.backends.sqlite import SQLiteBackend
from kvconfig.backends.sqlitefile import SCHEMA, CorruptStore, open_db, read_state, write_batches
from kvconfig.errors import CompareFailed, Unavailable
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


class FakeWriterTransport:
    """The pipes of a spawned writer, as the backend sees them."""

    pid = 4242

    def __init__(self) -> None:
        self.data = bytearray()
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def frames(self) -> list:
        """The batches sent, decoded as the writer decodes them."""
        batches, data = [], bytes(self.data)
        while data:
            size = int.from_bytes(data[:4], "big")
            batches.append(marshal.loads(data[4 : 4 + size]))
            data = data[4 + size :]
        return batches


class FakeSpawner:
    """Spawns no process: hands the backend's protocol a FakeWriterTransport."""

    def __init__(self) -> None:
        self.writers: list[tuple] = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        transport = FakeWriterTransport()
        protocol.makeConnection(transport)
        self.writers.append((protocol, transport))
        return transport


@pytest.fixture
def fake_writer(tmp_path):
    clock, spawner = Clock(), FakeSpawner()
    limits = Limits()
    store = Store(SQLiteBackend(str(tmp_path / "kv.db"), clock, limits, spawner=spawner),
                  limits)
    store.start()
    protocol, _ = spawner.writers[0]
    protocol.outReceived(b"ready\n")
    return store, clock, spawner


def ended(protocol) -> None:
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))


def fired(d):
    results = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_writer_that_committed_but_died_before_answering(fake_writer, tmp_path):
    """A batch the writer committed but never acknowledged is acknowledged
    and published after the file is re-read; the one it had not committed
    fails with Unavailable; a new writer is started."""
    store, clock, spawner = fake_writer
    published = []
    store.feed.subscribe(published.append)
    protocol, transport = spawner.writers[0]
    first = store.put("a", 1)
    clock.advance(0)
    second = store.put("b", 2)
    clock.advance(0)
    committed, _ = transport.frames()
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [committed])  # what the writer did before dying
    ended(protocol)
    assert fired(first).value == 1
    assert fired(second).check(Unavailable)
    assert [(e.key, e.revision) for e in published] == [("a", 1)]
    assert store.load("a") == 1 and store.get("b") is None and store.revision == 1
    clock.advance(1)
    assert len(spawner.writers) == 2


def test_writes_while_the_writer_restarts_fail_fast_and_change_nothing(fake_writer):
    """Between a writer's death and its successor, writes fail with
    Unavailable at once and nothing is decided; then writing resumes."""
    store, clock, spawner = fake_writer
    ended(spawner.writers[0][0])
    failed = store.put("k", 1)
    assert fired(failed).check(Unavailable)
    assert store.get("k") is None and store.revision == 0
    clock.advance(1)
    protocol, transport = spawner.writers[1]
    protocol.outReceived(b"ready\n")
    d = store.put("k", 2)
    clock.advance(0)
    assert len(transport.frames()) == 1
    protocol.outReceived(b"ok\n")
    assert fired(d).mod_revision == 1 and store.load("k") == 2


def test_answers_resting_on_a_pending_change_wait_for_it(fake_writer):
    """A failed compare or an absent delete that rests on a change not yet
    durable is answered only once it is, and fails if that change fails."""
    store, clock, spawner = fake_writer
    protocol, _ = spawner.writers[0]
    store.put("k", 1)
    deleted_again = [store.delete("k"), None]
    deleted_again[1] = store.delete("k")           # rests on the pending delete
    stale = store.put("k", 3, prev_revision=1)     # rests on it too
    clock.advance(0)
    assert not deleted_again[1].called and not stale.called
    ended(protocol)                                # nothing was committed
    assert fired(deleted_again[1]).check(Unavailable)
    assert fired(stale).check(Unavailable)
    assert store.get("k") is None and store.revision == 0


def test_answers_resting_on_a_pending_change_fire_once_it_commits(fake_writer):
    """A failed compare or an absent delete that rests on a change not yet
    durable is answered as soon as the commit holding that change is."""
    store, clock, spawner = fake_writer
    protocol, _ = spawner.writers[0]
    store.put("k", 1)
    clock.advance(0)
    protocol.outReceived(b"ok\n")
    store.delete("k")
    absent = store.delete("k")                     # rests on the pending delete
    stale = store.put("k", 3, prev_revision=1)     # rests on it too
    clock.advance(0)
    assert not absent.called and not stale.called
    protocol.outReceived(b"ok\n")
    assert fired(absent) is None
    assert fired(stale).check(CompareFailed)


def test_an_answer_resting_on_a_change_the_dead_writer_committed_is_given(
        fake_writer, tmp_path):
    """The writer committed a batch and died before answering: an answer
    resting on a change of that batch is given (the file holds it), one
    resting on a later, uncommitted change fails."""
    store, clock, spawner = fake_writer
    protocol, transport = spawner.writers[0]
    store.put("a", 1)
    store.delete("a")
    clock.advance(0)
    committed, = transport.frames()
    store.put("b", 1)
    stale = store.put("b", 2, prev_revision=0)     # rests on the uncommitted put
    clock.advance(0)
    absent_again = store.delete("a")               # rests on the committed delete
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [committed])
    ended(protocol)
    assert fired(absent_again) is None
    assert fired(stale).check(Unavailable)


def test_a_stray_acknowledgement_is_ignored(fake_writer):
    """An ok for a batch never sent is logged, not trusted."""
    store, clock, spawner = fake_writer
    spawner.writers[0][0].outReceived(b"ok\n")
    d = store.put("k", 1)
    clock.advance(0)
    assert not d.called


@pytest.mark.parametrize("raw", [b"{not json", b"1,2", b"1],[2", b"", b'"\xff"'])
def test_a_corrupt_value_among_many_is_named(tmp_path, raw):
    """Values are checked thousands at a time when a store is read; a
    corrupt one among them (even one that would pass as part of a JSON
    array, like "1,2") stops the read naming its key."""
    db = sqlite3.connect(tmp_path / "kv.db")
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO kv VALUES (?, ?, 1, 1, 1, NULL)",
                   [(f"k/{i:05d}", b"%d" % i) for i in range(10_000)])
    db.execute("UPDATE kv SET raw = ? WHERE key = 'k/05000'", (raw,))
    db.commit()
    rows, *_ = read_state(db)
    with pytest.raises(CorruptStore, match="'k/05000'"):
        list(rows)
