"""
The sqlite backend, kvconfig's embedded default.

One file in WAL mode with ``synchronous=FULL`` (kvconfig.backends.sqlitefile).
A write is acknowledged (its Deferred fires, its event is published) only
after the transaction holding it has committed and been fsynced.

One server per store: ``start()`` takes the store's lock
(kvconfig.backends.sqlitelock) before it opens the file, and refuses with
Unavailable, naming the holder, if another server or an old writer of one
still holds it.

Group commit: the changes decided during one reactor turn form one batch,
flushed by a ``callLater(0)`` at the start of the next turn.  Each batch
carries an identity (this server's random nonce and a sequence number) that
is committed with it.  The batch is committed in one of two ways:

- by the **writer process** (the default under a real reactor): the batch
  is sent down a pipe to ``kvconfig.backends.sqlitewriter``, which holds the
  store's lock, commits every batch it has received in one transaction and
  answers ``ok`` per batch.  The reactor never waits on an fsync: while one
  commit's fsync runs, it goes on reading and deciding the next batch,
  which roughly doubles durable write throughput on a loaded server.
- **in process** (under a test Clock, with no process spawner): the batch
  is committed on the reactor, the only blocking call kvconfig then makes.

Writes that wait longer than ``commit_timeout`` for their commit fail with
Unavailable ("may or may not have been applied"), and the writer that kept
them is killed.  After that, a writer's death or a failed commit, the
backend recovers: it learns what the file holds after the last revision it
acknowledged (read_tail: the events after it and the kv rows of their
keys, never the whole file), acknowledges the batches in flight whose
identity the file shows it committed, fails the others, and takes in
whatever else the file holds as durable.  With a writer, the reading is
done by the next writer process, which sends the tail over its pipe
before it takes batches: the reactor goes on serving reads meanwhile,
whatever the disk does.  In process, it is read on the reactor.

Either way, reads are served from the keyspace in memory, which only ever
holds committed changes (see LocalBackend): no reader sees a change that a
failed commit could still take back.
"""

from __future__ import annotations

import marshal
import os
import secrets
import sqlite3
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

import kvconfig
from kvconfig.backends.base import IBackend, LocalBackend
from kvconfig.backends.sqlitefile import (
    EVERYTHING,
    CorruptStore,
    bound_wal,
    make_batch,
    open_db,
    read_state,
    read_tail,
    tail_contents,
    write_batches,
)
from kvconfig.backends.sqlitelock import StoreLock, StoreLocked
from kvconfig.backends.sqlitewriter import LOCK_FD
from kvconfig.errors import Unavailable
from kvconfig.limits import Limits
from kvconfig.model import Event, KeyValue

#: Changes decided, each with the Deferred of its answer (None for those of
#: a run answered with its last change: write_many).
Pending = list[tuple[Event, "Deferred | None"]]

#: Seconds before starting a new writer after one that had not committed
#: anything died too; doubles up to a minute.  (After a writer that was
#: committing dies, the next one starts at once.)
RESPAWN_DELAY = 0.1

NOT_COMMITTED = "the write could not be committed"
MAY_OR_MAY_NOT = "the write may or may not have been applied"


@dataclass
class _InFlight:
    """A batch sent to be committed, and the writes waiting on it."""

    sequence: int
    pending: Pending
    sent_at: float
    #: True once its writes have been answered (failed) before its outcome
    #: was known, after the commit timeout.
    answered: bool = False


@implementer(IBackend)
class SQLiteBackend(LocalBackend):
    """Durable keyspace in one sqlite file, with group commit per reactor turn."""

    name = "sqlite"
    durable = True
    log = Logger()

    def __init__(self, path: str, clock: IReactorTime, limits: Limits,
                 spawner: IReactorProcess | None = None) -> None:
        """*spawner* starts the writer process: by default the reactor given
        as *clock*, if it can; without one, batches commit in process."""
        super().__init__(clock, limits)
        self.path = path
        if spawner is None and IReactorProcess.providedBy(clock):
            spawner = clock
        self.spawner = spawner
        self.use_writer = spawner is not None
        self._lock: StoreLock | None = None
        self._db: sqlite3.Connection | None = None    # in-process mode only
        # The batch identity: a nonce of this server's, and a sequence.
        self._nonce = 0
        self._sequence = 0
        self._writer: _WriterProtocol | None = None   # the writer of the moment
        self._dying: _WriterProtocol | None = None    # killed, not yet ended
        self._respawn: IDelayedCall | None = None
        self._respawn_delay = 0.0
        self._full_recovery = False
        self._pending: Pending = []                    # decided this turn
        self._in_flight: deque[_InFlight] = deque()    # sent, outcome not known
        self._flush_call: IDelayedCall | None = None
        self._deadline_call: IDelayedCall | None = None
        self._trimmed_revision = 0
        self._stopped: Deferred | None = None
        self._stop_started = 0.0
        #: Why the store takes no writes until a restart, if it does not.
        self._broken: str | None = None
        self.commits = 0
        self.commit_failures = 0
        self.commit_timeouts = 0
        #: Rows the last recovery read from the file.
        self.recovery_rows = 0
        #: Called with (seconds from a batch's flush to its commit, writes in
        #: it) for each batch committed (metrics).
        self.commit_observer: Callable[[float, int], None] | None = None

    # Life

    def start(self) -> Deferred:
        try:
            self._lock = StoreLock(self.path)
        except StoreLocked as e:
            raise Unavailable(f"cannot open sqlite store {self.path}: {e}") from None
        except OSError as e:
            raise Unavailable(f"cannot open sqlite store {self.path}: "
                              f"{_why_not_open(self.path, e)}") from None
        db = None
        try:
            db = open_db(self.path)
            self._load(db)
        except (sqlite3.Error, CorruptStore) as e:
            if db is not None:
                db.close()
            self._lock.release()
            raise Unavailable(f"cannot open sqlite store {self.path}: "
                              f"{_why_not_open(self.path, e)}") from None
        self._nonce = secrets.randbits(62) + 1
        self.feed.revision = self.keyspace.revision
        if self.use_writer:
            db.close()
            self._spawn_writer(recovering=False)
        else:
            self._db = db
        return super().start()

    def stop(self) -> Deferred:
        if self._stopped is not None:
            return self._when_stopped()
        super().stop()
        self._flush()
        self._stopped = Deferred()
        self._stop_started = self.clock.seconds()
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        if self._writer is not None:
            # The writer commits what it has, then exits at the end of its input.
            self._writer.transport.closeStdin()
        if self._writer is None and self._dying is None:
            self._finish_stop()
        else:
            self._reschedule_deadline()
        return self._when_stopped()

    def _when_stopped(self) -> Deferred:
        """A Deferred of its own for each caller of stop()."""
        d: Deferred = Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self._stopped.addBoth(fire)
        return d

    def _finish_stop(self) -> None:
        if self._lock is None:
            return
        self._give_up(Unavailable(f"the server stopped: {MAY_OR_MAY_NOT}"))
        for call in (self._deadline_call, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        if self._db is not None:
            self._db.close()
            self._db = None
        # A writer still alive (in a disk write) keeps the lock until it dies.
        self._lock.release()
        self._lock = None
        self._stopped.callback(None)

    def _load(self, db: sqlite3.Connection) -> None:
        kvs, history, revision, compact_revision = read_state(db)
        self.keyspace.load(kvs, history, revision, compact_revision)
        self._trimmed_revision = compact_revision

    # Group commit

    def _check_writable(self) -> None:
        if self._stopped is not None or (self._db is None and not self.use_writer):
            raise Unavailable("the sqlite store is closed")
        if self._broken is not None:
            raise Unavailable(self._broken)
        if self.use_writer and (self._writer is None or not self._writer.accepting):
            raise Unavailable("the sqlite writer is restarting; try again")

    def _persist(self, event: Event) -> Deferred:
        d = Deferred()
        self._pending.append((event, d))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return d

    def _persist_many(self, events: list[Event]) -> Deferred:
        # One answer for the run, with its last event: they share a commit.
        self._pending.extend((event, None) for event in events[:-1])
        return self._persist(events[-1])

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self.use_writer and (self._writer is None or not self._writer.accepting):
            # Decided in the turn its writer failed, and never sent.
            _fail(pending, Unavailable(f"{NOT_COMMITTED}: the sqlite writer failed"))
            return
        compact = self.keyspace.compact_revision
        self._sequence += 1
        batch = make_batch([event for event, _ in pending],
                           compact if compact > self._trimmed_revision else 0,
                           self._nonce, self._sequence)
        self._trimmed_revision = compact
        self._in_flight.append(_InFlight(self._sequence, pending, self.clock.seconds()))
        if self.use_writer:
            self._writer.send(batch)
            if self._deadline_call is None:
                self._reschedule_deadline()
            return
        try:
            write_batches(self._db, [batch])
        except sqlite3.Error as e:
            self.commit_failures += 1
            self._recover_in_process(e)
            return
        self._committed(self._in_flight.popleft())
        try:
            bound_wal(self._db, self.path)
        except sqlite3.Error as e:
            self.log.error("sqlite checkpoint failed: {error}", error=e)

    def _committed(self, flight: _InFlight) -> None:
        self.commits += 1
        pending = flight.pending
        if self.commit_observer is not None:
            self.commit_observer(self.clock.seconds() - flight.sent_at, len(pending))
        self._make_durable([event for event, _ in pending])
        for event, d in pending:
            if d is not None:
                d.callback(event)

    # Recovery: after a failed commit, a dead writer or a commit timeout,
    # learn from the file what is durable.  Only what follows the last
    # acknowledged revision is read (read_tail), by the next writer
    # process: the reactor neither reads the whole file nor waits on it.

    def _recover_in_process(self, error: Exception) -> None:
        self.log.error("sqlite commit failed: {error}", error=error)
        since = self.keyspace.revision
        for attempt in (since, EVERYTHING):
            try:
                tail = read_tail(self._db, attempt)
            except sqlite3.Error as e:
                self.log.error("sqlite store unreadable after a failed commit: {error}",
                               error=e)
                tail = None
            if self._recovered(tail):
                return

    def _recovered(self, tail: dict | None) -> bool:
        """Make the keyspace what *tail* (a read_tail after the last
        acknowledged revision) says the file holds, acknowledge the batches
        in flight that the file proves this server committed, and fail the
        others (all of them if *tail* is None: the file could not be read).
        Returns False, having changed nothing, if the tail contradicts what
        this server knows: the caller then reads everything."""
        since = self.keyspace.revision
        news: list[Event] = []
        if tail is not None:
            try:
                learnt = self._learn(tail, since)
            except CorruptStore as e:
                # Writing on would build on a keyspace that may lag the file.
                self._broken = f"the sqlite store {self.path} cannot be read: {e}"
                self.log.critical("{why}", why=self._broken)
                learnt = []
            if learnt is None:
                return False
            news = learnt
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        in_file = {event.revision: event for event in news}
        ours = tail is not None and tail["writer"] == self._nonce
        if ours or not news:
            committed = tail["batch"] if ours else 0
            unproven = Unavailable(NOT_COMMITTED)
        else:
            self.log.error("the sqlite store {path} was written by another process "
                           "(writer {writer}) despite its lock", path=self.path,
                           writer=tail["writer"])
            committed = 0
            unproven = Unavailable(f"the store file was changed by another process: "
                                   f"{MAY_OR_MAY_NOT}")
        if tail is None:
            unproven = Unavailable(f"{MAY_OR_MAY_NOT}: the sqlite store cannot be read")
        if self._broken is not None:
            committed, unproven = 0, Unavailable(f"{MAY_OR_MAY_NOT}: {self._broken}")
        # Before any answer: a write an answer's callback makes must be
        # decided on durable state only.
        self._forget_undecided()
        for flight in in_flight:
            if flight.answered:
                continue
            if flight.sequence <= committed and all(
                    _same(event, in_file.get(event.revision)) for event, _ in flight.pending):
                self.commits += 1
                for event, d in flight.pending:
                    if d is not None:
                        d.callback(event)
            else:
                _fail(flight.pending, unproven)
        self._reschedule_deadline()
        return True

    def _learn(self, tail: dict, since: int) -> list[Event] | None:
        """Apply *tail* to the keyspace; the events after *since* it holds,
        published.  None, changing nothing, if it contradicts the keyspace."""
        events, kvs = tail_contents(tail)
        self.recovery_rows = len(events) + len(kvs)
        if tail["full"]:
            if tail["revision"] < since:
                # Acknowledged writes are not in it: it was replaced.
                self._broken = (f"the sqlite store {self.path} went back from revision "
                                f"{since} to {tail['revision']}: restart the server")
                self.log.critical("{why}", why=self._broken)
                return []
            self.log.warn("re-reading all of the sqlite store {path}", path=self.path)
            self.keyspace.load(kvs, events, tail["revision"], tail["compact_revision"])
            self._trimmed_revision = tail["compact_revision"]
            news = [event for event in events if event.revision > since]
            self._publish(news)
            return news
        if tail["since"] != since:
            return None
        found = {row[0]: KeyValue(*row) for row in kvs}
        last = {event.key: event for event in events}
        if any(event.kv != found.get(key) for key, event in last.items()):
            self.log.error("the sqlite store {path}'s keys disagree with its history",
                           path=self.path)
            return None
        self._make_durable(events)
        return events

    def _give_up(self, error: Unavailable) -> None:
        """Fail every write whose outcome is not known (and will not be)."""
        self._fail_pending(error)
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        for flight in in_flight:
            if not flight.answered:
                _fail(flight.pending, error)

    def _fail_pending(self, error: Unavailable) -> None:
        pending, self._pending = self._pending, []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        _fail(pending, error)

    # The commit timeout

    def _reschedule_deadline(self) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        deadline = self._next_deadline()
        if deadline is not None:
            self._deadline_call = self.clock.callLater(
                max(0.0, deadline - self.clock.seconds()), self._deadline_passed)

    def _next_deadline(self) -> float | None:
        timeout = self.limits.commit_timeout
        deadlines = []
        oldest = next((flight for flight in self._in_flight if not flight.answered), None)
        if oldest is not None:
            deadlines.append(oldest.sent_at + timeout)
        writer = self._writer
        if writer is not None and writer.recovering:
            deadlines.append(writer.started_at + timeout)
        if self._stopped is not None and (writer or self._dying) is not None:
            deadlines.append(self._stop_started + timeout)
        return min(deadlines) if deadlines else None

    def _deadline_passed(self) -> None:
        """Answer the writes that waited commit_timeout for their commit (it
        may have happened: the file will tell), and replace the writer that
        has not answered in time."""
        self._deadline_call = None
        timeout = self.limits.commit_timeout
        now = self.clock.seconds()
        overdue = any(not flight.answered and flight.sent_at + timeout <= now
                      for flight in self._in_flight)
        writer = self._writer
        stopping = self._stopped is not None and self._stop_started + timeout <= now
        if writer is not None and (stopping or (writer.accepting and overdue)
                                   or (writer.recovering and writer.started_at + timeout <= now)):
            self.log.error("sqlite writer did not answer in {timeout} s; killing it",
                           timeout=timeout)
            self._writer_failed(writer)
        if stopping:
            self._finish_stop()
            return
        if overdue:
            self.commit_timeouts += 1
            error = Unavailable(f"the commit did not finish within {timeout} s "
                                f"(--commit-timeout): {MAY_OR_MAY_NOT}")
            self._fail_pending(error)
            self._forget_undecided()
            for flight in self._in_flight:
                if not flight.answered:
                    flight.answered = True
                    _fail(flight.pending, error)
        self._reschedule_deadline()

    # The writer process

    def _spawn_writer(self, recovering: bool) -> None:
        self._respawn = None
        env = dict(os.environ)
        # The writer imports this same kvconfig, wherever it was loaded from.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(kvconfig.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        args = [sys.executable, "-m", "kvconfig.backends.sqlitewriter", self.path,
                str(os.getpid())]
        if recovering:
            since = EVERYTHING if self._full_recovery else self.keyspace.revision
            args += ["--recover", str(since)]
        writer = _WriterProtocol(self, recovering, self.clock.seconds())
        # Current before it is spawned: its first words may come at once.
        self._writer = writer
        try:
            self.spawner.spawnProcess(writer, sys.executable, args, env=env,
                                      childFDs={0: "w", 1: "r", 2: "r", LOCK_FD: self._lock.fd})
        except Exception as e:
            self.log.error("cannot start the sqlite writer: {error}", error=e)
            if self._writer is writer:
                self._writer = None
            self._schedule_respawn()
            return
        self._reschedule_deadline()

    def _schedule_respawn(self) -> None:
        if self._stopped is not None or self._broken is not None:
            return
        delay = self._respawn_delay
        self._respawn_delay = min(max(RESPAWN_DELAY, delay * 2), 60.0)
        if delay == 0:
            self._spawn_writer(recovering=True)
        else:
            self._respawn = self.clock.callLater(delay, self._spawn_writer, True)

    def _writer_failed(self, writer: _WriterProtocol) -> None:
        """Stop trusting *writer*: kill it; recovery starts once it has ended."""
        if writer is self._writer:
            self._writer = None
            self.commit_failures += 1
        self._dying = writer
        writer.kill()
        self._fail_pending(Unavailable(f"{NOT_COMMITTED}: the sqlite writer failed"))

    def _writer_tail(self, writer: _WriterProtocol, payload: bytes) -> None:
        if writer is not self._writer or not writer.recovering:
            self.log.error("unexpected recovery data from a sqlite writer")
            return
        writer.recovering = False
        try:
            tail = marshal.loads(payload)
        except (ValueError, EOFError, TypeError) as e:
            self.log.error("sqlite writer sent unreadable recovery data: {error}", error=e)
            self._writer_failed(writer)
            return
        if not self._recovered(tail):
            self._full_recovery = True
            self._writer_failed(writer)
            return
        self._full_recovery = False

    def _writer_ready(self, writer: _WriterProtocol) -> None:
        if writer is self._writer and not writer.recovering:
            writer.accepting = True

    def _writer_acked(self, writer: _WriterProtocol) -> None:
        if writer is not self._writer:
            return  # a writer given up on: recovery reads what it did
        if not self._in_flight or self._in_flight[0].answered:
            self.log.error("sqlite writer acknowledged a batch it was not sent")
            return
        self._respawn_delay = 0.0
        self._committed(self._in_flight.popleft())

    def _writer_ended(self, writer: _WriterProtocol, reason: str) -> None:
        if writer is self._dying:
            self._dying = None
        elif writer is self._writer:
            self._writer = None
            if self._stopped is None or self._in_flight:
                self.log.error("sqlite writer process ended: {reason}", reason=reason)
                self.commit_failures += 1
            self._fail_pending(Unavailable(f"{NOT_COMMITTED}: the sqlite writer failed"))
        else:
            return
        if self._stopped is not None:
            self._finish_stop()
        else:
            self._schedule_respawn()

    def stats(self) -> dict[str, int]:
        return dict(super().stats(), commits=self.commits,
                    commit_failures=self.commit_failures,
                    commit_timeouts=self.commit_timeouts,
                    recovery_rows=self.recovery_rows)

    @property
    def writer_pid(self) -> int | None:
        """The pid of the writer taking writes, or None while it restarts."""
        writer = self._writer
        return writer.transport.pid if writer is not None and writer.accepting else None


def _fail(pending: Pending, error: Exception) -> None:
    for _, d in pending:
        if d is not None:
            d.errback(error)


def _same(ours: Event, in_file: Event | None) -> bool:
    """True if the file's event at our event's revision is ours."""
    return (in_file is not None and in_file.key == ours.key and in_file.type == ours.type
            and (in_file.kv.raw if in_file.kv else None) == (ours.kv.raw if ours.kv else None))

def _why_not_open(path: str, error: Exception) -> str:
    """What a person can act on, for an error opening the store at *path*."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable by this user"
    if isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
        return "the file is not a kvconfig (sqlite) store, or it is corrupt"
    return str(error)


@implementer(IPushProducer)
class _WriterProtocol(ProcessProtocol):
    """The server's end of the pipes to one writer process.

    Batches wait here, in a queue, until the writer's pipe has room, and
    are marshalled only then: a stalled writer costs the batches' values
    once (the events hold them anyway), not again as bytes queued for the
    pipe, and never as one concatenation of everything queued."""

    def __init__(self, backend: SQLiteBackend, recovering: bool, started_at: float) -> None:
        self.backend = backend
        #: True while it owes the backend its tail (see sqlitewriter).
        self.recovering = recovering
        #: True once batches may be sent to it: at once for the first writer
        #: (they wait in the pipe), after its tail and ``ready`` for the next.
        self.accepting = not recovering
        self.started_at = started_at
        self._received = bytearray()
        self._tail_size: int | None = None
        self._errors = bytearray()
        self._queue: deque = deque()
        self._pipe_full = False

    def connectionMade(self) -> None:
        # Told when the pipe to the writer is full, and when it has room.
        self.transport.registerProducer(self, True)

    def send(self, batch) -> None:
        self._queue.append(batch)
        self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue and not self._pipe_full:
            payload = marshal.dumps(queue.popleft())
            self.transport.writeSequence([len(payload).to_bytes(4, "big"), payload])

    def pauseProducing(self) -> None:
        self._pipe_full = True

    def resumeProducing(self) -> None:
        self._pipe_full = False
        self._drain()

    def stopProducing(self) -> None:
        self._queue.clear()

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def outReceived(self, data: bytes) -> None:
        received = self._received
        received += data
        while True:
            if self._tail_size is not None:
                if len(received) < self._tail_size:
                    return
                payload = bytes(received[: self._tail_size])
                del received[: self._tail_size]
                self._tail_size = None
                self.backend._writer_tail(self, payload)
                continue
            end = received.find(b"\n")
            if end < 0:
                return
            line = bytes(received[:end])
            del received[: end + 1]
            if line == b"ok":
                self.backend._writer_acked(self)
            elif line == b"ready":
                self.backend._writer_ready(self)
            elif line.startswith(b"tail ") and line[5:].isdigit():
                self._tail_size = int(line[5:])

    def errReceived(self, data: bytes) -> None:
        self._errors += data[: max(0, 4096 - len(self._errors))]

    def processEnded(self, reason) -> None:
        message = self._errors.decode("utf-8", "replace").strip() or str(reason.value)
        self.backend._writer_ended(self, message)
