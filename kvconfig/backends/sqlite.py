"""
The sqlite backend, kvconfig's embedded default.

One file in WAL mode with ``synchronous=FULL`` (kvconfig.backends.sqlitefile).
A write is acknowledged (its Deferred fires, its event is published) only
after the transaction holding it has committed and been fsynced.

Group commit: the changes decided during one reactor turn form one batch,
flushed by a ``callLater(0)`` at the start of the next turn.  The batch is
committed in one of two ways:

- by the **writer process** (the default under a real reactor): the batch
  is sent down a pipe to ``kvconfig.backends.sqlitewriter``, which commits
  every batch it has received in one transaction and answers ``ok`` per
  batch.  The reactor never waits on an fsync: while one commit's fsync
  runs, it goes on reading and deciding the next batch, which roughly
  doubles durable write throughput on a loaded server.  If the writer
  dies or a commit fails, the backend re-reads the file, acknowledges the
  batches that did commit, fails the rest with Unavailable, and starts a
  new writer.
- **in process** (under a test Clock, with no process spawner): the batch
  is committed on the reactor, the only blocking call kvconfig then makes.
  If the commit fails, its writes fail with Unavailable and the keyspace is
  re-read from the file.

Either way, reads are served from the keyspace in memory, which only ever
holds committed changes (see LocalBackend): no reader sees a change that a
failed commit could still take back.
"""

from __future__ import annotations

import marshal
import os
import sqlite3
import sys
from collections import deque
from collections.abc import Callable
from contextlib import closing

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

import kvconfig
from kvconfig.backends.base import IBackend, LocalBackend
from kvconfig.backends.sqlitefile import (
    CorruptStore,
    make_batch,
    open_db,
    read_state,
    write_batches,
)
from kvconfig.errors import Unavailable
from kvconfig.limits import Limits
from kvconfig.model import Event

Pending = list[tuple[Event, Deferred]]

#: Seconds before starting a new writer after one died; doubles up to a minute.
RESPAWN_DELAY = 0.1


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
        self._db: sqlite3.Connection | None = None   # in-process mode only
        self._writer: _WriterProtocol | None = None
        self._respawn: IDelayedCall | None = None
        self._respawn_delay = RESPAWN_DELAY
        self._pending: Pending = []                    # decided this turn
        self._in_flight: deque[Pending] = deque()      # sent to the writer
        self._flush_call: IDelayedCall | None = None
        self._trimmed_revision = 0
        self._stopped: Deferred | None = None
        self.commits = 0
        self.commit_failures = 0
        #: Called with (seconds from a batch's flush to its commit, writes in
        #: it) for each batch committed (metrics), and the flush times of the
        #: batches not yet committed.
        self.commit_observer: Callable[[float, int], None] | None = None
        self._flushed_at: deque[float] = deque()

    # Life

    def start(self) -> Deferred:
        try:
            db = open_db(self.path)
            self._load(db)
            self.feed.revision = self.keyspace.revision
            if self.use_writer:
                db.close()
                self._spawn_writer()
            else:
                self._db = db
        except (sqlite3.Error, CorruptStore) as e:
            raise Unavailable(f"cannot open sqlite store {self.path}: "
                              f"{_why_not_open(self.path, e)}") from None
        return super().start()

    def stop(self) -> Deferred:
        super().stop()
        self._flush()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        if self._writer is None:
            return succeed(None)
        # The writer commits what it has, then exits at the end of its input.
        self._stopped = Deferred()
        self._writer.transport.closeStdin()
        return self._stopped

    def _load(self, db: sqlite3.Connection) -> None:
        kvs, history, revision, compact_revision = read_state(db)
        self.keyspace.load(kvs, history, revision, compact_revision)
        self._trimmed_revision = compact_revision
        # The feed's revision is left alone: after a failed commit, the
        # batches found in the file are published (in order) by _recover.

    # Group commit

    def _check_writable(self) -> None:
        if self._stopped is not None or (self._db is None and not self.use_writer):
            raise Unavailable("the sqlite store is closed")
        if self.use_writer and self._writer is None:
            raise Unavailable("the sqlite writer is restarting; try again")

    def _persist(self, event: Event) -> Deferred:
        d = Deferred()
        self._pending.append((event, d))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        pending, self._pending = self._pending, []
        if not pending:
            return
        compact = self.keyspace.compact_revision
        batch = make_batch([event for event, _ in pending],
                           compact if compact > self._trimmed_revision else 0)
        self._trimmed_revision = compact
        self._flushed_at.append(self.clock.seconds())
        if self.use_writer:
            # A writer is running: _check_writable refused the writes
            # otherwise, and _recover failed the ones decided before it died.
            self._in_flight.append(pending)
            self._writer.send(batch)
            return
        try:
            write_batches(self._db, [batch])
        except sqlite3.Error as e:
            self._recover(e, failed=[pending])
            return
        self._committed(pending)

    def _committed(self, pending: Pending, reread: bool = False) -> None:
        self.commits += 1
        if self._flushed_at:
            flushed_at = self._flushed_at.popleft()
            if self.commit_observer is not None:
                self.commit_observer(self.clock.seconds() - flushed_at, len(pending))
        events = [event for event, _ in pending]
        if reread:
            self._publish(events)  # the keyspace re-read from the file holds them
        else:
            self._make_durable(events)
        for event, d in pending:
            d.callback(event)

    def _recover(self, error: object, failed: list[Pending]) -> None:
        """After a failed commit or a dead writer: re-read the file, then
        acknowledge the batches it holds and fail the others."""
        self.commit_failures += 1
        undecided = failed + [self._pending]
        self._pending = []
        try:
            if self._db is not None:
                self._load(self._db)
            else:
                with closing(open_db(self.path)) as db:
                    self._load(db)
        except (sqlite3.Error, CorruptStore) as e:
            self.log.error("sqlite store unreadable after a failed commit: {error}", error=e)
        self._forget_undecided()
        durable = self.keyspace.revision
        self._flushed_at.clear()  # what recovery acknowledges is not timed
        failure = Unavailable(f"the write could not be committed: {error}")
        for pending in undecided:
            if pending and pending[-1][0].revision <= durable:
                self._committed(pending, reread=True)
            else:
                for _, d in pending:
                    d.errback(failure)

    # The writer process

    def _spawn_writer(self) -> None:
        self._respawn = None
        env = dict(os.environ)
        # The writer imports this same kvconfig, wherever it was loaded from.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(kvconfig.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        writer = _WriterProtocol(self)
        try:
            self.spawner.spawnProcess(
                writer, sys.executable,
                [sys.executable, "-m", "kvconfig.backends.sqlitewriter", self.path],
                env=env, childFDs={0: "w", 1: "r", 2: "r"},
            )
        except Exception as e:
            self.log.error("cannot start the sqlite writer: {error}", error=e)
            self._schedule_respawn()
            return
        self._writer = writer

    def _schedule_respawn(self) -> None:
        if self._stopped is None:
            self._respawn = self.clock.callLater(self._respawn_delay, self._spawn_writer)
            self._respawn_delay = min(self._respawn_delay * 2, 60.0)

    def _writer_ready(self) -> None:
        self._respawn_delay = RESPAWN_DELAY

    def _writer_acked(self) -> None:
        if not self._in_flight:
            self.log.error("sqlite writer acknowledged a batch it was not sent")
            return
        self._committed(self._in_flight.popleft())

    def _writer_ended(self, reason: str) -> None:
        self._writer = None
        if self._stopped is not None and not self._in_flight:
            self._stopped.callback(None)
            return
        self.log.error("sqlite writer process ended: {reason}", reason=reason)
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        self._recover(reason, failed=in_flight)
        if self._stopped is not None:
            self._stopped.callback(None)
            return
        self._schedule_respawn()

    def stats(self) -> dict[str, int]:
        return dict(super().stats(), commits=self.commits,
                    commit_failures=self.commit_failures)

    @property
    def writer_pid(self) -> int | None:
        return self._writer.transport.pid if self._writer is not None else None


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


class _WriterProtocol(ProcessProtocol):
    """The server's end of the pipes to the writer process."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self.backend = backend
        self._lines = bytearray()
        self._errors = bytearray()

    def send(self, batch) -> None:
        payload = marshal.dumps(batch)
        self.transport.write(len(payload).to_bytes(4, "big") + payload)

    def outReceived(self, data: bytes) -> None:
        self._lines += data
        *lines, rest = self._lines.split(b"\n")
        self._lines = bytearray(rest)
        for line in lines:
            if line == b"ok":
                self.backend._writer_acked()
            elif line == b"ready":
                self.backend._writer_ready()

    def errReceived(self, data: bytes) -> None:
        self._errors += data[: max(0, 4096 - len(self._errors))]

    def processEnded(self, reason) -> None:
        message = self._errors.decode("utf-8", "replace").strip() or str(reason.value)
        self.backend._writer_ended(message)

