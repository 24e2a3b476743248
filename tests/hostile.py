"""
What the hostile-load tests (tests/test_hostile_*.py) share.

* The memory of a server: the resident set of ``twistd kvconfig`` and of its
  descendants (the sqlite writer), now and at its peak, from
  /proc/PID/status (Linux).  The peak is the kernel's VmHWM, reset when a
  measurement starts (``clear_refs``), and a sampler's, whichever is higher.
* A large store, written straight into its sqlite file with kvconfig's own
  batch writer before the server starts: far quicker than through a server.
* Clients of the other, legitimate side: XML-RPC and line-protocol
  connections from LEGIT_HOST, another loopback address (all of 127/8 is
  local), so that attackers on 127.0.0.1 meeting the per-address caps do
  not stand in their way.

Everything here talks to loopback only, and every wait has a bound.
"""

from __future__ import annotations

import http.client
import resource
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvconfig.backends.sqlitefile import make_batch, open_db, write_batches
from kvconfig.model import PUT, Event, KeyValue

from serverprocess import KVConfigProcess, child_pids

#: Where legitimate clients connect from.
LEGIT_HOST = "127.0.0.2"
#: The bound of the issue on peak RSS growth under an attack, at default limits.
PEAK_GROWTH_BOUND_MB = 200
MIB = 1 << 20


def raise_open_files_limit() -> None:
    """As many open files as the hard limit allows, for this process and the
    servers it starts (an attack holds a thousand connections or more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0,
             interval: float = 0.05) -> Any:
    """Poll *condition* until it is true (returned), or fail saying *what*."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# Memory


def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(child_pids(current))
    return tree


def status_kib(pid: int, name: str) -> int:
    """A VmXXX line of /proc/PID/status in KiB (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def writer_pid(process: KVConfigProcess) -> int:
    """The pid of the server's sqlite writer (its one child)."""
    children = wait_for(lambda: process_tree(process.process.pid)[1:], "the sqlite writer")
    return children[0]


class Memory:
    """The resident memory of a server's process tree, in MB, against its
    baseline when the measurement started (``with Memory(process) as
    memory``)."""

    def __init__(self, process: KVConfigProcess, interval: float = 0.02) -> None:
        self.pid = process.process.pid
        self.interval = interval
        self.baseline_kib = 0
        self._sampled_kib = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._hwm_reset = False

    def __enter__(self) -> Memory:
        pids = process_tree(self.pid)
        try:
            for pid in pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM
            self._hwm_reset = True
        except OSError:
            pass
        self.baseline_kib = self._sampled_kib = self.rss_kib()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._sampler.join(timeout=5)

    def _sample(self) -> None:
        pids, refreshed = process_tree(self.pid), time.monotonic()
        while not self._stop.wait(self.interval):
            if time.monotonic() - refreshed > 0.5:  # a writer started anew
                pids, refreshed = process_tree(self.pid), time.monotonic()
            self._sampled_kib = max(self._sampled_kib,
                                    sum(status_kib(pid, "VmRSS") for pid in pids))

    def rss_kib(self) -> int:
        return sum(status_kib(pid, "VmRSS") for pid in process_tree(self.pid))

    @property
    def peak_growth_mb(self) -> float:
        """The highest the tree's resident memory has been since the start,
        less the baseline (VmHWM of each process, summed, when the kernel's
        peak could be reset: a bound from above)."""
        peak = self._sampled_kib
        if self._hwm_reset:
            peak = max(peak, sum(status_kib(pid, "VmHWM") for pid in process_tree(self.pid)))
        return (peak - self.baseline_kib) / 1024

    @property
    def growth_mb(self) -> float:
        """The tree's resident memory now, less the baseline."""
        return (self.rss_kib() - self.baseline_kib) / 1024

    def settles(self, within_mb: float, timeout: float = 10.0) -> float:
        """Wait (at most *timeout*) for the growth to be within *within_mb*
        of the baseline; returns the last growth seen."""
        deadline = time.monotonic() + timeout
        while (growth := self.growth_mb) > within_mb and time.monotonic() < deadline:
            time.sleep(0.2)
        return growth


# A large store


def build_store(path: Path, keys: int, prefix: str = "big/", value_bytes: int = 40,
                chunk: int = 100_000) -> None:
    """A store file holding *keys* keys (prefix + 7 digits, in order, each
    made by its own revision, values strings of *value_bytes*), written with
    kvconfig's own batch writer; its history holds only the last change."""
    raw = b'"' + b"v" * value_bytes + b'"'
    db = open_db(str(path))
    try:
        for start in range(1, keys + 1, chunk):
            events = []
            for revision in range(start, min(start + chunk, keys + 1)):
                key = f"{prefix}{revision:07d}"
                events.append(Event(PUT, key, revision, KeyValue(
                    key=key, raw=raw, version=1, create_revision=revision,
                    mod_revision=revision)))
            last = start + len(events) - 1
            write_batches(db, [make_batch(events, keys - 1 if last == keys else 0)])
    finally:
        db.close()


def serving(process: KVConfigProcess, keys: int, timeout: float = 60.0) -> None:
    """Wait until the server has loaded its store of *keys* keys."""
    def loaded() -> bool:
        try:
            with process.proxy() as proxy:
                return proxy.stats()["keys"] >= keys
        except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
            return False
    wait_for(loaded, f"the server to load {keys} keys", timeout, interval=0.2)


def warmed_up(process: KVConfigProcess) -> None:
    """Once the server has committed a first write, its writer has grown to
    its working size: a baseline taken after that is the server's."""
    with process.proxy() as proxy:
        proxy.save("warm-up", 1)
    time.sleep(0.5)


# Legitimate clients


class _SourceTransport(xmlrpc.client.Transport):
    """xmlrpc.client's keep-alive transport, connecting from *source*."""

    def __init__(self, source: str, timeout: float) -> None:
        super().__init__()
        self.source = source
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        connect_to, self._extra_headers, _ = self.get_host_info(host)
        self._connection = host, http.client.HTTPConnection(
            connect_to, timeout=self.timeout, source_address=(self.source, 0))
        return self._connection[1]


def proxy_from(process: KVConfigProcess, source: str = LEGIT_HOST,
               timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
    """The stdlib client, from *source*."""
    return xmlrpc.client.ServerProxy(process.url, allow_none=True,
                                     transport=_SourceTransport(source, timeout))


class LineClient:
    """A line-protocol connection from *source*, greeted."""

    def __init__(self, process: KVConfigProcess, source: str = LEGIT_HOST,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", process.line_port), timeout,
                                             source_address=(source, 0))
        self.reader = self.sock.makefile("rb")
        greeting = self.reader.readline()
        if not greeting.startswith(b"HELLO "):
            raise AssertionError(f"greeted with {greeting[:200]!r}")

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, *lines: bytes) -> None:
        self.sock.sendall(b"".join(line + b"\r\n" for line in lines))

    def line(self) -> bytes:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        return line.rstrip(b"\r\n")

    def command(self, line: bytes) -> bytes:
        """Send one command; its (first) reply line."""
        self.send(line)
        return self.line()

    def listing(self, line: bytes) -> tuple[list[bytes], bytes]:
        """Send a listing command: (its lines, its END line)."""
        self.send(line)
        lines = []
        while not (reply := self.line()).startswith((b"END", b"ERR")):
            lines.append(reply)
        return lines, reply


@contextmanager
def connections(count: int, port: int, source: str = "127.0.0.1",
                receive_buffer: int | None = None) -> Iterator[list[socket.socket]]:
    """*count* blocking TCP connections to *port* from *source* (with a small
    receive buffer if *receive_buffer* is given: a client that does not
    read then leaves its bytes to the server sooner); closed after."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            opened.append(sock)
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        yield opened
    finally:
        for sock in opened:
            sock.close()
