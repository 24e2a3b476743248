"""The sqlite writer process: group commit off the reactor, and its failures:
the store's lock, batch identities, the commit timeout, recovery from the
tail of the file, and the bounded write-ahead log."""

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

from kvconfig import values
from kvconfig.backends import sqlitefile
from kvconfig.backends.sqlite import SQLiteBackend
from kvconfig.backends.sqlitefile import (
    EVERYTHING,
    SCHEMA,
    CorruptStore,
    make_batch,
    open_db,
    read_state,
    read_tail,
    write_batches,
)
from kvconfig.backends.sqlitelock import StoreLock, StoreLocked, check_held
from kvconfig.backends.sqlitewriter import serve, tail_message
from kvconfig.errors import CompareFailed, Unavailable
from kvconfig.limits import Limits
from kvconfig.model import PUT, Event, KeyValue
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
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.data += data

    def writeSequence(self, data: list[bytes]) -> None:
        self.data += b"".join(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal_name: str) -> None:
        self.signals.append(signal_name)

    def frames(self) -> list:
        """The batches sent, decoded as the writer decodes them."""
        batches, data = [], bytes(self.data)
        while data:
            size = int.from_bytes(data[:4], "big")
            batches.append(marshal.loads(data[4 : 4 + size]))
            data = data[4 + size :]
        return batches


class FakeSpawner:
    """Spawns no process: hands the backend's protocol a FakeWriterTransport.

    A writer started to recover (``--recover SINCE``) answers at once with
    what the real one reads from the file (its ``tail``); the test says
    ``ready`` and ``ok`` for it.
    """

    def __init__(self) -> None:
        self.writers: list[tuple] = []
        #: The command line of each writer.
        self.args: list[list[str]] = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        transport = FakeWriterTransport()
        protocol.makeConnection(transport)
        self.writers.append((protocol, transport))
        self.args.append(args)
        if "--recover" in args:
            path, since = args[3], int(args[args.index("--recover") + 1])
            with closing(open_db(path)) as db:
                protocol.outReceived(tail_message(db, since))
        return transport


def start_with_fake_writer(path) -> tuple[Store, Clock, FakeSpawner]:
    """A started Store on the sqlite file *path*, on a Clock, its writers fake."""
    clock, spawner = Clock(), FakeSpawner()
    limits = Limits()
    store = Store(SQLiteBackend(str(path), clock, limits, spawner=spawner), limits)
    store.start()
    protocol, _ = spawner.writers[0]
    protocol.outReceived(b"ready\n")
    return store, clock, spawner


@pytest.fixture
def fake_writer(tmp_path):
    return start_with_fake_writer(tmp_path / "kv.db")


def ended(protocol) -> None:
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))


def fired(d):
    results = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_batches_wait_unmarshalled_while_the_writers_pipe_is_full(fake_writer):
    """While the pipe to the writer is full (its transport pauses the
    backend's producer), batches wait in the backend, not as bytes queued
    for the pipe; once it has room they go, in order, and are answered as
    the writer acknowledges them."""
    store, clock, spawner = fake_writer
    protocol, transport = spawner.writers[0]
    transport.producer.pauseProducing()
    writes = []
    for i in range(3):
        writes.append(store.put(f"k{i}", "x" * 1000))
        clock.advance(0)
    assert transport.data == b"" and len(protocol._queue) == 3
    transport.producer.resumeProducing()
    assert [[row[0] for row in batch[0]] for batch in transport.frames()] == [
        ["k0"], ["k1"], ["k2"]]
    for _ in range(3):
        protocol.outReceived(b"ok\n")
    assert [fired(d).mod_revision for d in writes] == [1, 2, 3]


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


# Batch identity, the commit timeout and recovery from the tail, with a fake writer.


def put_event(key: str, value, revision: int, version: int = 1) -> Event:
    raw = values.encode(value, 1 << 20, 64)
    return Event(PUT, key, revision, KeyValue(key, raw, version, revision, revision))


def commit_foreign(path, events: list[Event], compact: int = 0) -> None:
    """Commit *events* as another server's writer would."""
    with closing(open_db(str(path))) as db:
        write_batches(db, [make_batch(events, compact, writer=12345, sequence=1)])


def test_a_revision_another_writer_wrote_is_not_acknowledged(fake_writer, tmp_path):
    """When the file holds a revision at or after a batch in flight, but
    committed under another writer's identity, recovery does not take it
    for the batch: the write fails, and the keyspace shows what the file
    holds."""
    store, clock, spawner = fake_writer
    published = []
    store.feed.subscribe(published.append)
    mine = store.put("a", "mine")
    clock.advance(0)
    theirs = put_event("a", "theirs", 1)
    commit_foreign(tmp_path / "kv.db", [theirs])
    ended(spawner.writers[0][0])
    failure = fired(mine)
    assert failure.check(Unavailable) and "changed by another process" in str(failure.value)
    assert store.load("a") == "theirs" and store.revision == 1
    assert published == [theirs]


def test_recovery_reads_only_what_follows_the_last_acknowledged_revision(tmp_path):
    """After a writer dies, the next one is asked for what follows the last
    acknowledged revision, and the recovery reads those rows only: the
    events of the batch in flight and the kv rows of their keys, not the
    300 keys before them."""
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [make_batch([put_event(f"k{i}", i, i + 1) for i in range(300)], 0)])
    store, clock, spawner = start_with_fake_writer(tmp_path / "kv.db")
    protocol, transport = spawner.writers[0]
    ds = [store.put("a", 1), store.put("b", 2)]
    clock.advance(0)
    (batch,) = transport.frames()
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [batch])
    ended(protocol)
    assert spawner.args[1][-2:] == ["--recover", "300"]
    assert [fired(d).mod_revision for d in ds] == [301, 302]
    assert store.stats()["recovery_rows"] == 4
    assert store.load("k0") == 0 and store.revision == 302


def test_read_tail_asks_only_for_rows_after_the_revision(tmp_path):
    """read_tail queries the events after the revision and the kv rows of
    their keys, and nothing else of kv; a file whose history was trimmed
    past that revision is read whole."""
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [make_batch([put_event(f"k{i}", i, i + 1) for i in range(300)], 0)])
        statements = []
        db.set_trace_callback(statements.append)
        tail = read_tail(db, 298)
        db.set_trace_callback(None)
        assert not tail["full"] and len(tail["events"]) == 2
        assert [row[0] for row in tail["kvs"]] == ["k298", "k299"]
        assert any("FROM events WHERE revision > 298" in s for s in statements)
        assert all("WHERE" in s for s in statements if "FROM kv" in s)
        assert read_tail(db, EVERYTHING)["full"]
        write_batches(db, [make_batch([put_event("k0", 0, 301, 2)], 250)])
        trimmed = read_tail(db, 200)
        assert trimmed["full"] and len(trimmed["kvs"]) == 300


def test_in_process_recovery_reads_only_the_tail(tmp_path):
    """With commits in process (on a Clock), a failed commit re-reads only
    what follows the last acknowledged revision, not the whole file."""
    clock = Clock()
    limits = Limits()
    store = Store(SQLiteBackend(str(tmp_path / "kv.db"), clock, limits), limits)
    store.start()
    for i in range(300):
        store.put(f"k{i}", i)
    clock.advance(0)
    assert store.revision == 300
    db = store.backend._db
    statements = []
    db.set_trace_callback(statements.append)
    db.execute("PRAGMA query_only = 1")  # a real sqlite write failure
    failed = store.put("k0", "new")
    clock.advance(0)
    db.set_trace_callback(None)
    assert fired(failed).check(Unavailable)
    assert any("FROM events WHERE revision > 300" in s for s in statements)
    assert all("WHERE" in s for s in statements if "FROM kv" in s)
    assert store.stats()["recovery_rows"] == 0 and store.load("k0") == 0
    store.stop()


def test_a_tail_that_contradicts_the_keyspace_makes_the_next_writer_read_everything(
        fake_writer, tmp_path):
    """If the kv rows of the tail disagree with its events (the file was
    changed by hand), the writer is replaced by one that reads the whole
    file, which decides."""
    store, clock, spawner = fake_writer
    protocol, transport = spawner.writers[0]
    d = store.put("a", 1)
    clock.advance(0)
    (batch,) = transport.frames()
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, [batch])
        db.execute("UPDATE kv SET raw = x'32' WHERE key = 'a'")  # 2
    ended(protocol)
    recovering, recovering_transport = spawner.writers[1]
    assert recovering_transport.signals == ["KILL"] and not d.called
    ended(recovering)
    clock.advance(1)
    assert [args[-2:] for args in spawner.args[1:]] == [["--recover", "0"],
                                                        ["--recover", str(EVERYTHING)]]
    assert fired(d).mod_revision == 1
    assert store.load("a") == 2


def test_a_corrupt_row_found_by_recovery_stops_writes_naming_it(fake_writer, tmp_path):
    """A row recovery cannot read fails the write in flight (may or may not
    have been applied) and every write after it, naming the file and key."""
    store, clock, spawner = fake_writer
    protocol, transport = spawner.writers[0]
    d = store.put("a", 1)
    clock.advance(0)
    with closing(open_db(str(tmp_path / "kv.db"))) as db:
        write_batches(db, transport.frames())
        db.execute("UPDATE events SET raw = x'7b' WHERE key = 'a'")
    ended(protocol)
    assert "may or may not have been applied" in str(fired(d).value)
    spawner.writers[1][0].outReceived(b"ready\n")
    refused = fired(store.put("b", 1))
    assert refused.check(Unavailable)
    assert "kv.db" in str(refused.value) and "'a'" in str(refused.value)


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
def test_commit_timeout_fails_the_waiting_writes_and_replaces_the_writer(
        fake_writer, tmp_path, committed):
    """A write whose commit takes longer than commit_timeout fails with
    Unavailable (may or may not have been applied), the writer is killed,
    writes fail fast until its successor is ready, and the keyspace then
    shows what the file holds, whether the stalled commit happened or not."""
    store, clock, spawner = fake_writer
    published = []
    store.feed.subscribe(published.append)
    protocol, transport = spawner.writers[0]
    d = store.put("a", 1)
    clock.advance(0)
    clock.advance(store.limits.commit_timeout - 0.1)
    assert not d.called and store.get("a") is None
    clock.advance(0.1)
    failure = fired(d)
    assert failure.check(Unavailable)
    assert "may or may not have been applied" in str(failure.value)
    assert transport.signals == ["KILL"] and store.stats()["commit_timeouts"] == 1
    assert fired(store.put("b", 1)).check(Unavailable)
    if committed:
        with closing(open_db(str(tmp_path / "kv.db"))) as db:
            write_batches(db, transport.frames())
    ended(protocol)
    assert (store.load("a"), store.revision) == ((1, 1) if committed else (None, 0))
    assert [e.key for e in published] == (["a"] if committed else [])
    successor, successor_transport = spawner.writers[1]
    successor.outReceived(b"ready\n")
    d = store.put("c", 1)
    clock.advance(0)
    successor.outReceived(b"ok\n")
    assert fired(d).mod_revision == store.revision


def test_stop_gives_up_on_a_stalled_writer_after_the_commit_timeout(fake_writer):
    """stop() waits for the writer at most commit_timeout, then kills it and
    fails what it had not committed."""
    store, clock, spawner = fake_writer
    protocol, transport = spawner.writers[0]
    d = store.put("a", 1)
    clock.advance(0)
    stopped = store.stop()
    assert transport.stdin_closed and not stopped.called
    clock.advance(store.limits.commit_timeout)
    assert transport.signals == ["KILL"]
    assert fired(d).check(Unavailable) and fired(stopped) is None


# The store's lock, and the writer's side of it.


def test_a_second_backend_on_a_locked_store_refuses_to_start(tmp_path):
    """While a store is open, opening it again fails with Unavailable naming
    the process holding it and the lock file; once closed, it opens."""
    path = str(tmp_path / "kv.db")
    first = Store(SQLiteBackend(path, Clock(), Limits()))
    first.start()
    with pytest.raises(Unavailable) as refused:
        Store(SQLiteBackend(path, Clock(), Limits())).start()
    assert f"in use by kvconfig server process {os.getpid()}" in str(refused.value)
    assert f"{path}-lock" in str(refused.value)
    first.stop()
    again = Store(SQLiteBackend(path, Clock(), Limits()))
    again.start()
    again.stop()


def test_the_writer_refuses_a_lock_it_does_not_hold(tmp_path):
    """A writer given a descriptor on the lock file that does not hold the
    lock (another process does) refuses to serve."""
    path = str(tmp_path / "kv.db")
    lock = StoreLock(path)
    other = os.open(f"{path}-lock", os.O_RDWR)
    try:
        check_held(lock.fd, path)
        with pytest.raises(StoreLocked):
            check_held(other, path)
    finally:
        os.close(other)
        lock.release()


@pytest.mark.parametrize("parent, code, revisions", [
    ("ours", 0, [1]), ("another", 3, []),
], ids=["its server alive", "orphaned"])
def test_an_orphaned_writer_commits_nothing(tmp_path, parent, code, revisions):
    """The writer commits a batch only while its parent is the server that
    started it; orphaned, it exits without committing."""
    path = str(tmp_path / "kv.db")
    lock = StoreLock(path)
    commands, replies = os.pipe(), os.pipe()
    payload = marshal.dumps(make_batch([put_event("k", 1, 1)], 0, writer=7, sequence=1))
    os.write(commands[1], len(payload).to_bytes(4, "big") + payload)
    os.close(commands[1])
    server = os.getppid() if parent == "ours" else os.getpid()
    try:
        assert serve(path, server, stdin=commands[0], stdout=replies[1], lock_fd=lock.fd) == code
    finally:
        os.close(commands[0])
        os.close(replies[1])
        os.close(replies[0])
        lock.release()
    with closing(sqlite3.connect(path)) as db:
        assert [r for (r,) in db.execute("SELECT revision FROM events")] == revisions


def test_the_write_ahead_log_is_truncated_once_no_reader_needs_it(tmp_path, monkeypatch):
    """A -wal file grown past WAL_SIZE_LIMIT while a reader held an old
    snapshot is checkpointed and truncated by the first commit after it
    let go."""
    monkeypatch.setattr(sqlitefile, "WAL_SIZE_LIMIT", 1 << 20)
    path = str(tmp_path / "kv.db")
    wal = f"{path}-wal"
    with closing(open_db(path)) as db, closing(sqlite3.connect(path)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM kv").fetchone()
        big = [put_event(f"big{i}", "x" * 100_000, i + 1) for i in range(30)]
        write_batches(db, [make_batch(big, 0)])
        sqlitefile.bound_wal(db, path)
        assert os.stat(wal).st_size > 3 << 20
        reader.rollback()
        write_batches(db, [make_batch([put_event("small", 1, 31)], 0)])
        sqlitefile.bound_wal(db, path)
        assert os.stat(wal).st_size <= 1 << 20
