"""
One server per sqlite store, and writers that stall, outlive their server or
die: the installed ``twistd kvconfig`` under SIGKILL, SIGSTOP and a second
server on the same file.

Each test reproduces a way acknowledged writes were lost or clients waited
for ever: a writer that committed after a new server had loaded the file,
two servers on one file, a writer that went on committing once orphaned, a
stalled writer nobody gave up on, a recovery that re-read the whole file on
the reactor, and a write-ahead log that kept its largest size.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sqlite3
import threading
import time
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from xmlrpc.client import Fault, MultiCall

import pytest

from kvconfig.backends.sqlitefile import SCHEMA, WAL_SIZE_LIMIT

from faults import UNAVAILABLE, check_fault
from serverprocess import KVConfigProcess, is_running
from test_twistd import cannot_start

#: A server whose writers Linux does not kill when it dies: they outlive it
#: as one stuck in a disk write does (see kvconfig.backends.sqlitewriter).
NO_DEATH_SIGNAL = {"KVCONFIG_WRITER_NO_DEATH_SIGNAL": "1"}


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host):
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


def proxy(server: KVConfigProcess, timeout: float = 30.0) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(server.url, allow_none=True,
                                     transport=_TimeoutTransport(timeout))


class Writers:
    """Clients putting keys of their own, one write at a time each, as fast
    as the server answers; ``acknowledged`` maps each key whose put was
    answered to its revision."""

    def __init__(self, server: KVConfigProcess, clients: int = 4, prefix: str = "load") -> None:
        self.acknowledged: dict[str, int] = {}
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(server, f"{prefix}/{n}"))
                         for n in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, server: KVConfigProcess, name: str) -> None:
        client = proxy(server)
        for i in itertools.count():
            if self._stop.is_set():
                return
            key = f"{name}/{i}"
            try:
                meta = client.put(key, i)
            except Fault:
                with self._lock:
                    self.failed += 1
                continue
            except (OSError, xmlrpc.client.ProtocolError, EOFError):
                return  # the server died mid-call: this write was not acknowledged
            with self._lock:
                self.acknowledged[key] = meta["revision"]

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} writes"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def lost_writes(server: KVConfigProcess, acknowledged: dict[str, int]) -> list[str]:
    """The acknowledged writes the server does not show, with their revision."""
    client, keys, lost = proxy(server), list(acknowledged), []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        calls = MultiCall(client)
        for key in chunk:
            calls.get(key)
        for key, got in zip(chunk, calls(), strict=True):
            if got is None or got["mod_revision"] != acknowledged[key]:
                lost.append(key)
    return lost


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.02)


def file_revision(path: Path) -> int:
    """The newest revision committed to the store file."""
    with sqlite3.connect(path) as db:
        (newest,) = db.execute("SELECT max(revision) FROM events").fetchone()
    return newest or 0


def signal_if_running(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LineClient:
    """A line-protocol connection (greeting read)."""

    def __init__(self, server: KVConfigProcess, timeout: float = 30.0) -> None:
        self.socket = socket.create_connection(("127.0.0.1", server.line_port), timeout=timeout)
        self.file = self.socket.makefile("rb")
        self.file.readline()

    def send(self, line: bytes) -> None:
        self.socket.sendall(line + b"\n")

    def reply(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.socket.close()


@pytest.fixture
def servers(tmp_path):
    """Makes servers on the test's store (``servers(*options, env=...)``),
    and stops those still running at the end."""
    made: list[KVConfigProcess] = []

    def make(*extra: str, env: dict[str, str] | None = None) -> KVConfigProcess:
        made.append(KVConfigProcess(tmp_path, None, *extra, env=env))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_a_second_server_on_the_same_store_refuses_to_start(fresh_server, tmp_path):
    """A second server on a store in use exits with one line naming the
    process that holds it; the first goes on serving and loses nothing."""
    fresh_server.start()
    load = Writers(fresh_server)
    try:
        load.wait_for(100)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        line = cannot_start(elsewhere, f"--store={fresh_server.store}")
        assert f"in use by kvconfig server process {fresh_server.process.pid}" in line
        assert "kvconfig.db-lock" in line
        load.wait_for(len(load.acknowledged) + 100)
    finally:
        load.stop()
    fresh_server.stop()
    fresh_server.start()
    assert lost_writes(fresh_server, load.acknowledged) == []


@pytest.mark.parametrize("end", [signal.SIGCONT, signal.SIGKILL], ids=["SIGCONT", "SIGKILL"])
def test_a_writer_that_outlives_its_server_keeps_a_new_server_out(tmp_path, servers, end):
    """A server SIGKILLed under load while its writer is stalled (SIGSTOP,
    as on a stuck disk): a new server refuses to start, naming the writer,
    for as long as that writer lives; once it has gone (SIGCONT or
    SIGKILL), the new server starts and every acknowledged write is there."""
    server = servers(env=NO_DEATH_SIGNAL)
    server.start()
    writer = server.writer_pid()
    try:
        load = Writers(server)
        try:
            load.wait_for(300)
            os.kill(writer, signal.SIGSTOP)
            time.sleep(0.2)  # writes queue up for it
            old_pid = server.process.pid
            server.kill(signal.SIGKILL)
        finally:
            load.stop()
        assert is_running(writer)
        line = cannot_start(tmp_path, f"--store={server.store}")
        assert f"process {writer}, the sqlite writer of kvconfig server process {old_pid}" \
            in line
        os.kill(writer, end)
        wait_until(lambda: not is_running(writer), what="the old writer exits")
        server.start()
        assert len(load.acknowledged) >= 300
        assert lost_writes(server, load.acknowledged) == []
    finally:
        signal_if_running(writer, signal.SIGKILL)


@pytest.mark.parametrize("env, dies_with_server", [({}, True), (NO_DEATH_SIGNAL, False)],
                         ids=["death signal", "parent check"])
def test_an_orphaned_writer_exits_and_commits_nothing(tmp_path, servers, env, dies_with_server):
    """When its server is SIGKILLed, the writer exits by itself, and commits
    none of the batches waiting in its pipe: killed by Linux with its
    parent (even stalled), or, where that does not reach it, by seeing that
    it is orphaned before it commits."""
    server = servers(env=env)
    server.start()
    writer = server.writer_pid()
    try:
        client = proxy(server)
        for i in range(20):
            client.put(f"before/{i}", i)
        time.sleep(0.2)  # the writer is idle, waiting for its next batch
        os.kill(writer, signal.SIGSTOP)
        # Writes sent to the stalled writer, never acknowledged.
        load = Writers(server, prefix="unacknowledged")
        time.sleep(0.3)
        server.kill(signal.SIGKILL)
        load.stop()
        assert load.acknowledged == {}
        committed = file_revision(tmp_path / "kvconfig.db")
        if dies_with_server:
            wait_until(lambda: not is_running(writer), what="the writer dies with its server")
        else:
            assert is_running(writer)
            os.kill(writer, signal.SIGCONT)
            wait_until(lambda: not is_running(writer), what="the orphaned writer exits")
        assert file_revision(tmp_path / "kvconfig.db") == committed == 20
    finally:
        signal_if_running(writer, signal.SIGKILL)


def test_a_stalled_writer_fails_writes_after_the_commit_timeout(servers):
    """With the writer stalled (SIGSTOP), writes fail ``unavailable`` (may or
    may not have been applied) after --commit-timeout, on both interfaces,
    while reads and PING are answered; the server then replaces the writer,
    and what it reports is what the file holds after a restart."""
    server = servers("--commit-timeout=2")
    server.start()
    client = proxy(server)
    client.put("before", 1)
    writer = server.writer_pid()
    line = LineClient(server)
    try:
        os.kill(writer, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            stalled = pool.submit(proxy(server, timeout=20).put, "stalled", 1)
            line.send(b"SET stalled-line 1")
            time.sleep(0.5)
            assert not stalled.done()
            assert client.load("before") == 1
            line.send(b"PING still-there")
            line_reply = line.reply()
            assert line.reply() == b"PONG still-there"
            with pytest.raises(Fault) as fault:
                stalled.result(timeout=20)
            waited = time.monotonic() - started
        check_fault(fault.value, UNAVAILABLE)
        assert "may or may not have been applied" in fault.value.faultString
        assert line_reply.startswith(b"ERR unavailable 8 ")
        assert b"may or may not have been applied" in line_reply
        print(f"a write to a stalled writer failed after {waited:.1f} s "
              "(--commit-timeout=2)")
    finally:
        signal_if_running(writer, signal.SIGCONT)
        line.close()
    wait_until(lambda: server.writer_pid() != writer, what="a new writer")

    def writable() -> bool:
        try:
            client.put("after", 1)
        except Fault:
            return False
        return True

    wait_until(writable, what="writes succeed again")
    reported = {key: client.get(key) for key in ("before", "stalled", "stalled-line", "after")}
    revision = client.stats()["revision"]
    assert client.stats()["commit_timeouts"] == 1
    server.stop()
    server.start()
    client = proxy(server)
    assert {key: client.get(key) for key in reported} == reported
    assert client.stats()["revision"] == revision


def test_a_writer_kill_at_200k_keys_recovers_from_the_tail(tmp_path, servers):
    """A writer killed under load on a 200,000-key store: recovery reads the
    few rows after the last acknowledged revision (not the whole file, off
    the reactor), nothing acknowledged is lost, and PING goes on being
    answered (the longest round trip is printed)."""
    keys = 200_000
    with sqlite3.connect(tmp_path / "kvconfig.db") as db:
        db.executescript(SCHEMA)
        db.executemany("INSERT INTO kv VALUES (?, ?, 1, ?, ?, NULL)",
                       ((f"many/{i:06d}", b'"v"', i + 1, i + 1) for i in range(keys)))
        db.execute("INSERT INTO meta VALUES ('compact_revision', ?)", (keys,))
    server = servers()
    server.start(timeout=120)
    client = proxy(server)
    wait_until(lambda: client.stats()["keys"] == keys, timeout=120, what="loaded")
    pings, stop = [], threading.Event()

    def ping() -> None:
        line = LineClient(server)
        while not stop.is_set():
            sent = time.monotonic()
            line.send(b"PING")
            line.reply()
            pings.append((sent, time.monotonic() - sent))
            time.sleep(0.005)
        line.close()

    pinger = threading.Thread(target=ping)
    pinger.start()
    load = Writers(server, clients=2)
    try:
        load.wait_for(200)
        writer = server.writer_pid()
        killed = time.monotonic()
        os.kill(writer, signal.SIGKILL)
        wait_until(lambda: client.stats()["commit_failures"] == 1, what="the recovery")
        wait_until(lambda: server.writer_pid() != writer, what="a new writer")
        load.wait_for(len(load.acknowledged) + 200)
    finally:
        load.stop()
        stop.set()
        pinger.join()
    stats = client.stats()
    longest = max(took for sent, took in pings if sent >= killed - 0.1)
    print(f"longest PING round trip while the writer was killed at {keys:,} keys: "
          f"{longest * 1000:.0f} ms; recovery read {stats['recovery_rows']} rows")
    assert stats["recovery_rows"] < 1000
    assert lost_writes(server, load.acknowledged) == []


def test_the_write_ahead_log_stays_bounded(fresh_server):
    """After a reader outside kvconfig (a backup, say) has held an old
    snapshot while ~100 MB were written, the -wal file goes back under
    WAL_SIZE_LIMIT and stays under it while writes go on."""
    fresh_server.start()
    path = fresh_server.directory / "kvconfig.db"
    wal = Path(f"{path}-wal")
    line = LineClient(fresh_server)
    backup = sqlite3.connect(path)
    try:
        backup.execute("BEGIN")
        backup.execute("SELECT count(*) FROM kv").fetchone()
        value = b'"' + b"x" * 1_000_000 + b'"'
        for start in range(0, 96, 8):
            for i in range(start, start + 8):
                line.send(b"SET big/%d %s" % (i, value))
            for _ in range(8):
                assert line.reply().startswith(b"OK")
        grown = wal.stat().st_size
        assert grown > WAL_SIZE_LIMIT
        backup.rollback()
        sizes = []
        for start in range(0, 3000, 50):
            for i in range(start, start + 50):
                line.send(b"SET small/%d %d" % (i % 500, i))
            for _ in range(50):
                assert line.reply().startswith(b"OK")
            sizes.append(wal.stat().st_size)
    finally:
        backup.close()
        line.close()
    print(f"-wal file: {grown / 2**20:.0f} MiB while held, then at most "
          f"{max(sizes[1:]) / 2**20:.1f} MiB under load")
    assert max(sizes[1:]) <= WAL_SIZE_LIMIT
