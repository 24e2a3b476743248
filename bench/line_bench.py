"""
Line protocol throughput and latency: kvconfig against Redis, both durable.

What it measures
================

Two servers run side by side on loopback in the same run:

* kvconfig: ``twistd -n kvconfig`` with a sqlite store in a temporary
  directory, spoken to over its line protocol (kvconfig.line).  ``SET`` is
  answered ``OK`` only once the write is committed and fsynced (WAL,
  ``synchronous=FULL``, group commit in the writer process);
* Redis: the ``redis-server`` on PATH (Debian's package), started on a spare
  port with ``appendonly yes`` and ``appendfsync always``, so it too answers a
  write only after its append-only file is fsynced, and with ``save ""`` (no
  RDB snapshots).  If ``redis-server`` is not installed, the script says so and
  measures kvconfig alone (it installs nothing).

Both are driven by the same load generator, this script's own process: one
thread, non-blocking sockets and ``selectors``, pre-built request bytes (the
line protocol's ``SET key value`` / ``GET key``, Redis's RESP arrays) for
1000 keys ``bench/k0`` .. ``bench/k999`` holding short JSON strings (the same
bytes in both servers).  Each of N connections keeps ``depth`` requests in
flight: it sends ``depth`` requests, then one new request per reply.  A
request's latency runs from its send to its reply.  Replies are checked: a
kvconfig ``ERR`` or ``NIL``, a Redis ``-ERR`` or nil, counts as an error, not
as an op.  kvconfig's greeting line is read when connecting, before any
request.

Each cell (server x op x clients x depth) runs after a short warm-up for at
most ``--max-ops`` requests and at most ``--seconds`` seconds, and is repeated
``--repeat`` times, the two servers taking turns so that noise hits both
alike.  ``GET`` cells find every key: all are ``SET`` once before the first
cell.  ops/s counts the good replies received within the time bound (or up to
the last reply, if the op bound came first); the requests still in flight are
waited for (up to 10 s, then given up) and count in the latencies.  The table
shows the medians of ops/s, p50 and p99 over the repeats, the largest latency
seen in any of them, the ratio kvconfig/Redis, and whether the row meets the
target: kvconfig at least 0.5x Redis's ops/s, with no error and no request
given up.  A second table gives the CPU used by each server (kvconfig's
includes its writer process) and by the load generator, to show whether the
generator, a single Python thread, was the bottleneck.

How to run it
=============

From the repository, with the project installed in the venv and Redis from
Debian (``apt-get install redis-server``; its system service need not run)::

    .venv/bin/python bench/line_bench.py            # full run, about 2 minutes
    .venv/bin/python bench/line_bench.py --quick    # smoke run
    .venv/bin/python bench/line_bench.py --help

It is not part of the test run: nothing imports it and pytest does not
collect it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
KEY_COUNT = 1000
SERVERS = ("kvconfig", "redis")
TARGET_RATIO = 0.5
WARMUP_SECONDS = 0.3
DRAIN_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
PREFILL_CLIENTS = 8
PREFILL_DEPTH = 16
RECV_BYTES = 262144
BUSY_GENERATOR = 0.9  # cores: above this the load generator may be the bottleneck


# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def twistd_path() -> str:
    """The twistd installed beside the running Python, else the one on PATH."""
    candidate = Path(sys.executable).with_name("twistd")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if found is None:
        raise SystemExit("twistd not found: run with the venv's python (.venv/bin/python)")
    return found


def kvconfig_command(directory: Path, port: int) -> list[str]:
    return [
        twistd_path(), "-n", "--pidfile=", f"--logfile={directory / 'twistd.log'}",
        "kvconfig", f"--store=sqlite:{directory / 'kvconfig.db'}",
        f"--xmlrpc=tcp:0:interface={HOST}",  # not measured here; any free port
        f"--line=tcp:{port}:interface={HOST}",
    ]


def redis_command(directory: Path, port: int) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", HOST, "--dir", str(directory),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        "--daemonize", "no", "--protected-mode", "yes",
        "--logfile", str(directory / "redis.log"),
    ]


def redis_version() -> str:
    """What ``redis-server --version`` says, or why it could not say."""
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return out.stdout.strip() or out.stderr.strip() or "?"


def wait_until_listening(process: subprocess.Popen, port: int, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{read_log(log)}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port}:\n{read_log(log)}")


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after a while."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Server:
    """A running server process."""

    name: str
    port: int
    pid: int


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its threads so far (Linux; else nan): from
    schedstat (nanoseconds, so that windows of a fraction of a second read
    well), else user + system time in clock ticks."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except FileNotFoundError:
                continue  # a thread that has just ended
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (kvconfig's sqlite writer is a child of twistd)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


@contextmanager
def running_server(name: str, directory: Path) -> Iterator[Server]:
    """Start one of the two servers; yield it once it accepts connections."""
    port = free_port()
    log = directory / f"{name}.stderr"
    if name == "kvconfig":
        command = kvconfig_command(directory, port)
    else:
        command = redis_command(directory, port)
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until_listening(process, port, name, log)
        yield Server(name, port, process.pid)
    finally:
        stop(process)


# Requests and replies


def bench_items() -> list[tuple[bytes, bytes]]:
    """The keys and their values: short JSON strings (addresses), as bytes."""
    return [(f"bench/k{i}".encode(), f'"10.0.{i // 250}.{i % 250 + 1}"'.encode())
            for i in range(KEY_COUNT)]


def resp_command(*words: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        parts.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(parts)


def build_requests(server: str, op: str) -> list[bytes]:
    """One pre-built request per key."""
    requests = []
    for key, value in bench_items():
        if server == "kvconfig":
            line = b"SET %s %s" % (key, value) if op == "set" else b"GET %s" % key
            requests.append(line + b"\r\n")
        elif op == "set":
            requests.append(resp_command(b"SET", key, value))
        else:
            requests.append(resp_command(b"GET", key))
    return requests


# A reply parser takes the bytes received so far and returns (replies complete,
# [(index of a bad reply, what is wrong)], bytes used).
Parsed = tuple[int, list[tuple[int, str]], int]
Parser = Callable[[bytearray], Parsed]


def line_error(line: bytes) -> str:
    text = line.decode("utf-8", "replace").strip()
    if text.startswith("ERR "):
        return " ".join(text.split()[:3])  # ERR <name> <code>
    if text.startswith("NIL "):
        return "GET answered NIL"
    return f"unexpected reply {text[:60]!r}"


def line_parser(op: str) -> Parser:
    """kvconfig: one line per reply, OK for SET, VALUE for GET."""
    expect = b"OK " if op == "set" else b"VALUE "

    def parse(buffer: bytearray) -> Parsed:
        end = buffer.rfind(b"\n")
        if end < 0:
            return 0, [], 0
        lines = bytes(buffer[:end]).split(b"\n")
        bad = [(i, line_error(line)) for i, line in enumerate(lines)
               if not line.startswith(expect)]
        return len(lines), bad, end + 1

    return parse


def resp_parser(op: str) -> Parser:
    """Redis: +OK for SET, a bulk string for GET; -ERR, nil or others are bad."""

    def parse(buffer: bytearray) -> Parsed:
        count, bad, pos, size = 0, [], 0, len(buffer)
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            kind = buffer[pos]
            following = eol + 2
            problem = None
            if kind == 0x24:  # $: bulk string
                length = int(buffer[pos + 1:eol])
                if length >= 0:
                    following = eol + 2 + length + 2
                    if following > size:
                        break
                    if op != "get":
                        problem = "unexpected bulk reply"
                else:
                    problem = "GET answered nil"
            elif kind == 0x2B:  # +: simple string
                if op != "set" or buffer[pos:eol] != b"+OK":
                    problem = f"unexpected reply {bytes(buffer[pos:eol])[:60]!r}"
            elif kind == 0x2D:  # -: error
                problem = bytes(buffer[pos:eol]).decode("utf-8", "replace")[:80]
            else:
                problem = f"unexpected reply {bytes(buffer[pos:eol])[:60]!r}"
            if problem is not None:
                bad.append((count, problem))
            count += 1
            pos = following
        return count, bad, pos

    return parse


def parser_for(server: str, op: str) -> Parser:
    return line_parser(op) if server == "kvconfig" else resp_parser(op)


# Load generator


@dataclass
class Connection:
    """One client connection, with up to depth requests in flight."""

    sock: socket.socket | None = None
    writing: bool = False  # whether the selector also waits for it to be writable
    sent: deque = field(default_factory=deque)  # send times of the requests in flight
    unsent: bytearray = field(default_factory=bytearray)
    inbox: bytearray = field(default_factory=bytearray)


@dataclass
class PhaseResult:
    """What one run of the load generator saw; times in seconds."""

    latencies: list[float] = field(default_factory=list)  # good replies, drain included
    unfinished: list[float] = field(default_factory=list)  # requests given up, time so far
    errors: Counter = field(default_factory=Counter)
    window: float = 0.0  # up to the time bound, or to the last reply if that came sooner
    ops_in_window: int = 0  # good replies received within the window
    generator_cpu: float = 0.0  # CPU time of the load generator within the window
    server_cpu: float = math.nan  # CPU time of the server (and children) within the window


class LoadGenerator:
    """N connections on one selector, each keeping depth requests in flight,
    cycling through the pre-built requests."""

    def __init__(self, server: Server, requests: list[bytes], parse: Parser,
                 clients: int, depth: int) -> None:
        self.server = server
        self.requests = requests
        self.parse = parse
        self.depth = depth
        self.greeting = server.name == "kvconfig"
        self.selector = selectors.DefaultSelector()
        self.connections = [Connection() for _ in range(clients)]
        self.next_request = 0
        self.in_flight = 0
        self.ops_left = 0
        self.stop_issuing_at = 0.0
        self.result = PhaseResult()
        self.server_pids: list[int] = []
        self.window_open = False
        self.window_start = (0.0, 0.0, 0.0)  # wall clock, generator CPU, server CPU

    def run(self, max_ops: int, seconds: float, measure_server: bool = False) -> PhaseResult:
        """Send requests until max_ops are sent or seconds have passed, then wait
        (at most DRAIN_TIMEOUT_S) for the replies still due.  With
        measure_server, measure the server's CPU time within the window too."""
        self.connect_all()
        self.result = result = PhaseResult()
        self.server_pids = process_tree(self.server.pid) if measure_server else []
        start = time.perf_counter()
        self.window_start = (start, time.process_time(), self.server_cpu_seconds())
        self.window_open = True
        self.ops_left = max_ops
        self.stop_issuing_at = start + seconds
        give_up_at = self.stop_issuing_at + DRAIN_TIMEOUT_S
        for connection in self.connections:
            if connection.sock is not None:
                self.issue(connection, self.depth, time.perf_counter())
        while self.in_flight:
            now = time.perf_counter()
            if self.window_open and now >= self.stop_issuing_at:
                self.close_window(now)
            if now >= give_up_at:
                break
            wake_at = self.stop_issuing_at if self.window_open else give_up_at
            for key, mask in self.selector.select(wake_at - now):
                connection = key.data
                if mask & selectors.EVENT_READ:
                    self.receive(connection)
                if mask & selectors.EVENT_WRITE and connection.sock is not None:
                    self.flush(connection)
        if self.window_open:
            self.close_window(time.perf_counter())
        self.give_up_unfinished()
        return result

    def close_window(self, now: float) -> None:
        start, generator_cpu, server_cpu = self.window_start
        self.window_open = False
        self.result.window = now - start
        self.result.generator_cpu = time.process_time() - generator_cpu
        self.result.server_cpu = self.server_cpu_seconds() - server_cpu

    def server_cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.server_pids) if self.server_pids else math.nan

    def give_up_unfinished(self) -> None:
        now = time.perf_counter()
        for connection in self.connections:
            if connection.sent:
                self.result.unfinished.extend(now - t for t in connection.sent)
                self.in_flight -= len(connection.sent)
                connection.sent.clear()
                self.disconnect(connection)  # its late replies must not be read as new ones

    def close(self) -> None:
        for connection in self.connections:
            self.disconnect(connection)
        self.selector.close()

    # Connections

    def connect_all(self) -> None:
        """(Re)connect every connection that has no socket; read kvconfig's greeting."""
        for connection in self.connections:
            if connection.sock is None:
                self.connect(connection)

    def connect(self, connection: Connection) -> None:
        sock = socket.create_connection((HOST, self.server.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.greeting:
                received = bytearray()
                while b"\n" not in received:
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        raise RuntimeError(f"{self.server.name} closed the connection "
                                           "before its greeting")
                    received += data
                line, _, rest = bytes(received).partition(b"\n")
                if not line.startswith(b"HELLO "):
                    raise RuntimeError(f"{self.server.name} greeted with {line[:80]!r}")
                connection.inbox += rest
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        connection.sock = sock
        connection.writing = False
        self.selector.register(sock, selectors.EVENT_READ, connection)

    def disconnect(self, connection: Connection) -> None:
        if connection.sock is None:
            return
        self.selector.unregister(connection.sock)
        connection.sock.close()
        connection.sock = None
        connection.writing = False
        connection.unsent.clear()
        connection.inbox.clear()

    def fail(self, connection: Connection, error: str) -> None:
        """Count the requests in flight on a broken connection as errors and drop it
        (it reconnects at the next run)."""
        lost = len(connection.sent)
        self.result.errors[error] += max(lost, 1)
        self.in_flight -= lost
        connection.sent.clear()
        self.disconnect(connection)

    # Requests and replies

    def issue(self, connection: Connection, count: int, now: float) -> None:
        """Queue up to count new requests, sent at now, and send them."""
        if now >= self.stop_issuing_at:
            return
        count = min(count, self.ops_left)
        if count <= 0:
            return
        requests, total = self.requests, len(self.requests)
        unsent, sent = connection.unsent, connection.sent
        index = self.next_request
        for _ in range(count):
            unsent += requests[index]
            sent.append(now)
            index += 1
            if index == total:
                index = 0
        self.next_request = index
        self.ops_left -= count
        self.in_flight += count
        self.flush(connection)

    def flush(self, connection: Connection) -> None:
        if connection.unsent:
            try:
                done = connection.sock.send(connection.unsent)
            except BlockingIOError:
                done = 0
            except OSError as e:
                self.fail(connection, f"send: {e.strerror}")
                return
            del connection.unsent[:done]
        writing = bool(connection.unsent)
        if writing != connection.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.selector.modify(connection.sock, events, connection)
            connection.writing = writing

    def receive(self, connection: Connection) -> None:
        if connection.sock is None:
            return
        try:
            data = connection.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(connection, f"recv: {e.strerror}")
            return
        if not data:
            self.fail(connection, "connection closed by the server")
            return
        inbox = connection.inbox
        inbox += data
        try:
            count, bad, used = self.parse(inbox)
        except ValueError as e:
            self.fail(connection, f"bad reply: {e}")
            return
        if not count:
            return
        if count > len(connection.sent):
            self.fail(connection, "more replies than requests")
            return
        del inbox[:used]
        now = time.perf_counter()
        sent, result = connection.sent, self.result
        if not bad:
            result.latencies.extend([now - sent.popleft() for _ in range(count)])
        else:
            errors = dict(bad)
            for i in range(count):
                started = sent.popleft()
                if i in errors:
                    result.errors[errors[i]] += 1
                else:
                    result.latencies.append(now - started)
        self.in_flight -= count
        if self.window_open:
            result.ops_in_window += count - len(bad)
        self.issue(connection, count, now)


# Cells


@dataclass
class CellRun:
    """One measured run of one server x op x clients x depth; latencies in ms."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float  # a lower bound if requests were given up
    unfinished: int  # given up DRAIN_TIMEOUT_S after the time bound
    errors: Counter
    generator_cpu: float  # cores used by the load generator within the window
    server_cpu: float  # cores used by the server within the window


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(result: PhaseResult, warmup: PhaseResult) -> CellRun:
    latencies = sorted(result.latencies)
    every_time = latencies + result.unfinished
    window = result.window or math.nan
    errors = result.errors + Counter({f"warm-up: {e}": n for e, n in warmup.errors.items()})
    if warmup.unfinished:
        errors[f"warm-up: requests given up after {DRAIN_TIMEOUT_S:g} s"] += \
            len(warmup.unfinished)
    return CellRun(
        ops_per_s=result.ops_in_window / window,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=max(every_time, default=math.nan) * 1000,
        unfinished=len(result.unfinished),
        errors=errors,
        generator_cpu=result.generator_cpu / window,
        server_cpu=result.server_cpu / window,
    )


def run_cell(server: Server, op: str, clients: int, depth: int,
             max_ops: int, seconds: float) -> CellRun:
    """Warm up, then measure, on the same connections."""
    generator = LoadGenerator(server, build_requests(server.name, op),
                              parser_for(server.name, op), clients, depth)
    try:
        warmup = generator.run(max(clients * depth, max_ops // 10), WARMUP_SECONDS)
        result = generator.run(max_ops, seconds, measure_server=True)
    finally:
        generator.close()
    return summarize(result, warmup)


def prefill(server: Server) -> None:
    """SET every key once, so that GET finds them whatever ops are run."""
    generator = LoadGenerator(server, build_requests(server.name, "set"),
                              parser_for(server.name, "set"), PREFILL_CLIENTS, PREFILL_DEPTH)
    try:
        result = generator.run(KEY_COUNT, seconds=60.0)
    finally:
        generator.close()
    if result.errors or len(result.latencies) != KEY_COUNT:
        raise RuntimeError(f"{server.name}: setting the {KEY_COUNT} keys failed: "
                           f"{len(result.latencies)} set, errors {dict(result.errors)}")


CellKey = tuple[str, str, int, int]  # server name, op, clients, depth


def run_all(args: argparse.Namespace, servers: list[Server]) -> dict[CellKey, list[CellRun]]:
    """Every cell, repeated, the servers taking turns."""
    runs: dict[CellKey, list[CellRun]] = {}
    for op in args.ops:
        for clients in args.clients:
            for depth in args.depths:
                for repeat in range(args.repeat):
                    for server in servers:
                        run = run_cell(server, op, clients, depth, args.max_ops, args.seconds)
                        runs.setdefault((server.name, op, clients, depth), []).append(run)
                        progress(f"  {op} {clients:>3} clients depth {depth:>2} "
                                 f"{server.name:<8} run {repeat + 1}/{args.repeat}: "
                                 f"{run.ops_per_s:7.0f} ops/s, p99 {run.p99_ms:7.2f} ms, "
                                 f"max {run.max_ms:8.1f} ms, {run.unfinished} given up, "
                                 f"{sum(run.errors.values())} errors, "
                                 f"cpu server {run.server_cpu:.2f} "
                                 f"generator {run.generator_cpu:.2f}")
    return runs


# Aggregation and report


@dataclass
class CellSummary:
    """The repeats of one server x op x clients x depth, combined."""

    ops_per_s: float  # median
    p50_ms: float  # median
    p99_ms: float  # median
    max_ms: float  # max
    unfinished: int  # sum
    errors: Counter  # sum
    generator_cpu: float  # max
    server_cpu: float  # median

    @classmethod
    def of(cls, runs: list[CellRun]) -> CellSummary:
        return cls(
            ops_per_s=statistics.median(r.ops_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            max_ms=max(r.max_ms for r in runs),
            unfinished=sum(r.unfinished for r in runs),
            errors=sum((r.errors for r in runs), Counter()),
            generator_cpu=max(r.generator_cpu for r in runs),
            server_cpu=statistics.median(r.server_cpu for r in runs),
        )

    def latency_text(self) -> str:
        at_least = ">=" if self.unfinished else ""
        return f"{self.p50_ms:.2f}/{self.p99_ms:.2f}/{at_least}{self.max_ms:.1f}"


def target_text(kvconfig: CellSummary | None, redis: CellSummary | None) -> str:
    """Whether a row meets its target, and if not, why."""
    if kvconfig is None:
        return "-"
    failures = []
    if kvconfig.errors:
        failures.append("errors")
    if kvconfig.unfinished:
        failures.append("given up")
    if redis and kvconfig.ops_per_s < TARGET_RATIO * redis.ops_per_s:
        failures.append(f"ratio<{TARGET_RATIO:g}")
    if failures:
        return f"NO ({', '.join(failures)})"
    return "? (no redis run)" if redis is None else "yes"


def format_table(rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rows_of(args: argparse.Namespace) -> Iterator[tuple[str, int, int]]:
    for op in args.ops:
        for clients in args.clients:
            for depth in args.depths:
                yield op, clients, depth


def result_table(args: argparse.Namespace, cells: dict[CellKey, CellSummary]) -> str:
    rows = [["op", "clients", "depth", "kvconfig ops/s", "redis ops/s", "ratio",
             "kvconfig p50/p99/max ms", "redis p50/p99/max ms", "target"]]
    for op, clients, depth in rows_of(args):
        kvconfig = cells.get(("kvconfig", op, clients, depth))
        redis = cells.get(("redis", op, clients, depth))
        ratio = "-"
        if kvconfig and redis and redis.ops_per_s:
            ratio = f"{kvconfig.ops_per_s / redis.ops_per_s:.2f}"
        rows.append([
            op.upper(), str(clients), str(depth),
            f"{kvconfig.ops_per_s:.0f}" if kvconfig else "-",
            f"{redis.ops_per_s:.0f}" if redis else "-",
            ratio,
            kvconfig.latency_text() if kvconfig else "-",
            redis.latency_text() if redis else "-",
            target_text(kvconfig, redis),
        ])
    return format_table(rows)


def cpu_table(args: argparse.Namespace, cells: dict[CellKey, CellSummary]) -> str:
    rows = [["op", "clients", "depth", "kvconfig server+writer", "redis server",
             "load generator (max)"]]
    for op, clients, depth in rows_of(args):
        kvconfig = cells.get(("kvconfig", op, clients, depth))
        redis = cells.get(("redis", op, clients, depth))
        generator = max(c.generator_cpu for c in (kvconfig, redis) if c)
        rows.append([
            op.upper(), str(clients), str(depth),
            f"{kvconfig.server_cpu:.2f}" if kvconfig else "-",
            f"{redis.server_cpu:.2f}" if redis else "-",
            f"{generator:.2f}",
        ])
    return format_table(rows)


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    """Errors, requests given up and a busy load generator, cell by cell."""
    lines = []
    for (name, op, clients, depth), cell in cells.items():
        where = f"{name} {op.upper()} {clients} clients depth {depth}"
        if cell.unfinished:
            lines.append(f"{where}: {cell.unfinished} request(s) given up after "
                         f">= {DRAIN_TIMEOUT_S:g} s")
        for error, count in cell.errors.most_common():
            lines.append(f"{where}: {count} error(s): {error}")
        if cell.generator_cpu > BUSY_GENERATOR:
            lines.append(f"{where}: the load generator used {cell.generator_cpu:.2f} cores; "
                         "this cell may measure the generator more than the server")
    return lines or ["no errors, no request given up, the load generator never near "
                     "a full core"]


def filesystem_of(path: Path) -> str:
    """The type of the filesystem path is on, from /proc/mounts ("?" if unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    target = str(path.resolve())
    best_mount, kind = "", "?"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount, fs_type = fields[1], fields[2]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best_mount):
            best_mount, kind = mount, fs_type
    return kind


def machine_info() -> list[str]:
    cpu = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return [
        f"machine: nproc {usable} (cpu_count {os.cpu_count()}), {cpu}, {platform.platform()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"load average at start: {load_average()} (other work on the machine adds noise)",
    ]


def load_average() -> str:
    try:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "?"


def header(args: argparse.Namespace, names: list[str], directory: Path,
           redis: str) -> list[str]:
    fsync = "both fsync" if len(names) > 1 else "it fsyncs"
    lines = [
        *machine_info(),
        f"redis: {redis}",
        (f"servers: {', '.join(names)}, on loopback {HOST}; {fsync} every acknowledged "
         f"write; store{'s' if len(names) > 1 else ''} on {filesystem_of(directory)}"),
    ]
    if "kvconfig" in names:
        lines.append("  kvconfig: twistd -n kvconfig --store sqlite:<tmp>, line protocol; SET "
                     "answered once committed (WAL, synchronous=FULL, group commit)")
    if "redis" in names:
        lines.append("  redis:    redis-server --appendonly yes --appendfsync always --save \"\"; "
                     "SET answered once the AOF is fsynced")
    return [
        *lines,
        (f"load: ops {','.join(op.upper() for op in args.ops)}, clients "
         f"{','.join(map(str, args.clients))}, pipeline depths "
         f"{','.join(map(str, args.depths))}, {KEY_COUNT} keys, short JSON string values;"),
        ("  one Python thread for both servers (selectors, pre-built requests); latency "
         "from a request's send to its reply"),
        (f"  per cell {WARMUP_SECONDS:g} s warm-up, then at most {args.max_ops} ops and "
         f"{args.seconds:g} s (replies still due are waited for up to "
         f"{DRAIN_TIMEOUT_S:g} s more);"),
        f"  {args.repeat} repeat(s) of each cell, the servers taking turns",
        ("report: ops/s = good replies within the time bound / its length; medians over "
         "repeats of ops/s, p50, p99;"),
        (f"  max latency over all repeats; target: kvconfig ops/s >= {TARGET_RATIO:g} x "
         "redis on every row, no errors"),
    ]


# Main


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def op_list(text: str) -> list[str]:
    ops = [part.lower() for part in text.split(",") if part]
    unknown = set(ops) - {"set", "get"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s): {', '.join(sorted(unknown))}")
    return ops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--clients", type=int_list, default=[1, 50],
                        help="concurrent clients per cell, comma-separated (default 1,50)")
    parser.add_argument("--depths", type=int_list, default=[1, 16],
                        help="requests in flight per client, comma-separated (default 1,16)")
    parser.add_argument("--ops", type=op_list, default=["set", "get"],
                        help="operations, comma-separated (default set,get)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time bound of a cell (default 3)")
    parser.add_argument("--max-ops", type=int, default=50000,
                        help="op bound of a cell (default 50000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each cell, the servers taking turns (default 3)")
    parser.add_argument("--only", choices=["kvconfig", "redis", "both"], default="both",
                        help="which server(s) to run (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per cell, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 1.0, 1
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients must be positive numbers")
    if not args.depths or min(args.depths) < 1:
        parser.error("--depths must be positive numbers")
    if not args.ops:
        parser.error("--ops needs at least one of set, get")
    if args.seconds <= 0 or args.max_ops < 1 or args.repeat < 1:
        parser.error("--seconds, --max-ops and --repeat must be positive")
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally clauses, which stop the servers.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    names = list(SERVERS) if args.only == "both" else [args.only]
    if "redis" in names and shutil.which("redis-server") is None:
        message = ("redis-server is not installed (not on PATH; on Debian: "
                   "apt-get install redis-server)")
        if args.only == "redis":
            raise SystemExit(f"{message}: nothing to measure")
        print(f"{message}: measuring kvconfig only, without ratios", flush=True)
        names.remove("redis")
        redis = "not installed, not run"
    else:
        redis = redis_version() if "redis" in names else "not run (--only kvconfig)"
    began = time.monotonic()
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        print("\n".join(header(args, names, directory, redis)), flush=True)
        servers = [stack.enter_context(running_server(name, directory)) for name in names]
        for server in servers:
            prefill(server)
        runs = run_all(args, servers)
    cells = {key: CellSummary.of(cell_runs) for key, cell_runs in runs.items()}
    print()
    print(result_table(args, cells))
    print()
    print("CPU use within the time bound, in cores (servers: median over repeats):")
    print(cpu_table(args, cells))
    print()
    print("\n".join(notes(cells)))
    print(f"load average at end: {load_average()}")
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
