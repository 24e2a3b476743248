"""
XML-RPC throughput and latency: kvconfig against the classic stdlib server.

What it measures
================

Two servers run side by side on loopback in the same run:

* kvconfig: ``twistd -n kvconfig`` with a sqlite store in a temporary
  directory, so ``save`` is durable (acknowledged only after the commit);
* the reference: the classic exercise's server, a module-level dict behind the
  stdlib ``SimpleXMLRPCServer`` with ``allow_none=True`` (single-threaded,
  HTTP/1.0, one connection per call, listen backlog 5).  It runs with
  ``logRequests=False``, which is generous to it: it writes no line to stderr
  per call.

Both are driven with the same load: 1, 16 and 64 concurrent keep-alive
clients, each sending one call at a time (no pipelining), for ``save`` and
then ``load``.  The load generator is this script's own process: one thread,
non-blocking sockets and ``selectors``, pre-built HTTP requests, so that it
costs the servers as little CPU as possible.  A client whose connection the
server closes (the stdlib server closes it after every response) reconnects,
and that reconnection counts in the latency of its call, as a real client
would see it.

Each cell (server x op x clients) runs after a short warm-up for at most
``--max-calls`` calls and at most ``--seconds`` seconds, and is repeated
``--repeat`` times, alternating the two servers so that noise hits both alike.
calls/s counts the good calls completed within the time bound; the calls still
running then are waited for (up to 10 s, then given up) and count in the
latencies, so a server that stalls shows it in its max latency.  The table
shows the medians of calls/s, p50 and p99 over the repeats and the largest
latency seen in any of them, the ratio kvconfig/stdlib, and whether the row
meets the target: kvconfig at least 1.5x the stdlib server's calls/s at 16
and 64 clients, and no kvconfig call slower than 1 s.  A second table gives
the CPU used by each server and by the load generator, to show whether the
generator left the servers enough of the machine.

How to run it
=============

From the repository, with the project installed in the venv::

    .venv/bin/python bench/xmlrpc_bench.py            # full run, about 4 minutes
    .venv/bin/python bench/xmlrpc_bench.py --quick    # smoke run
    .venv/bin/python bench/xmlrpc_bench.py --help

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
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from errno import EINPROGRESS
from pathlib import Path
from xmlrpc.client import Fault, dumps, loads

HOST = "127.0.0.1"
KEY_COUNT = 1000
SERVERS = ("kvconfig", "stdlib")
TARGET_RATIO = 1.5
TARGET_CLIENTS = (16, 64)
LATENCY_LIMIT_S = 1.0
WARMUP_SECONDS = 0.3
DRAIN_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PREFILL_CLIENTS = 8
RECV_BYTES = 65536

# The classic exercise's server, run with ``python -c`` and the port as argv[1].
REFERENCE_SERVER = """\
import sys
from xmlrpc.server import SimpleXMLRPCServer

_store = {}


def save(key, value):
    _store[key] = value


def load(key):
    return _store.get(key)


def delete(key):
    if key in _store:
        del _store[key]


# logRequests=False is generous to the reference: no stderr line per call.
server = SimpleXMLRPCServer(("127.0.0.1", int(sys.argv[1])), allow_none=True,
                            logRequests=False)
server.register_function(save)
server.register_function(load)
server.register_function(delete)
server.serve_forever()
"""


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
        f"--xmlrpc=tcp:{port}:interface={HOST}",
        f"--line=tcp:0:interface={HOST}",  # not measured here; any free port
    ]


def reference_command(port: int) -> list[str]:
    return [sys.executable, "-c", REFERENCE_SERVER, str(port)]


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
    """User + system CPU time of a process and its threads so far (Linux; else nan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running_server(name: str, directory: Path) -> Iterator[Server]:
    """Start one of the two servers; yield it once it accepts connections."""
    port = free_port()
    log = directory / f"{name}.stderr"
    if name == "kvconfig":
        command = kvconfig_command(directory, port)
    else:
        command = reference_command(port)
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until_listening(process, port, name, log)
        yield Server(name, port, process.pid)
    finally:
        stop(process)


# Requests and responses


def bench_items() -> list[tuple[str, object]]:
    """The keys and values saved and loaded: mostly addresses, some small lists."""
    items: list[tuple[str, object]] = []
    for i in range(KEY_COUNT):
        address = f"10.0.{i // 250}.{i % 250 + 1}"
        value = [address, "10.0.0.5", 53] if i % 10 == 0 else address
        items.append((f"bench/k{i}", value))
    return items


def http_post(port: int, body: bytes) -> bytes:
    head = (
        f"POST /RPC2 HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"User-Agent: kvconfig-bench\r\n"
        f"Content-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"\r\n"
    )
    return head.encode("ascii") + body


def build_requests(op: str, port: int) -> list[bytes]:
    """One pre-built HTTP request per key."""
    requests = []
    for key, value in bench_items():
        params = (key, value) if op == "save" else (key,)
        body = dumps(params, op, allow_none=True).encode("utf-8")
        requests.append(http_post(port, body))
    return requests


@dataclass
class Response:
    status: int
    keep_alive: bool
    body: bytes
    size: int  # bytes of the buffer it took


def parse_response(buffer: bytearray) -> Response | None:
    """The response at the start of buffer, or None if it is not complete yet."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    status_line, *header_lines = bytes(buffer[:head_end]).decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ValueError(f"response without Content-Length: {status_line}")
    body_start = head_end + 4
    body_end = body_start + int(headers["content-length"])
    if len(buffer) < body_end:
        return None
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
    return Response(int(status), keep_alive, bytes(buffer[body_start:body_end]), body_end)


def response_error(response: Response, expect_value: bool) -> str | None:
    """What is wrong with a response, or None if it is a good answer."""
    if response.status != 200:
        return f"HTTP status {response.status}"
    if b"<fault>" in response.body:
        try:
            loads(response.body)
        except Fault as fault:
            return f"fault {fault.faultCode}: {fault.faultString[:80]}"
        return "fault"
    if expect_value and b"<nil/>" in response.body:
        return "load returned nil"
    return None


# Load generator


@dataclass
class Client:
    """One connection, sending one request at a time."""

    sock: socket.socket | None = None
    events: int = 0  # what the selector watches for, 0 when not registered
    connecting: bool = False
    busy: bool = False
    started: float = 0.0  # when the current call started to connect or send
    unsent: memoryview = field(default_factory=lambda: memoryview(b""))
    inbox: bytearray = field(default_factory=bytearray)


@dataclass
class PhaseResult:
    """What one run of the load generator saw; times in seconds."""

    latencies: list[float] = field(default_factory=list)  # good calls, drain included
    unfinished: list[float] = field(default_factory=list)  # calls given up, time so far
    errors: Counter = field(default_factory=Counter)
    window: float = 0.0  # up to the time bound, or to the last call if that came sooner
    calls_in_window: int = 0  # good calls completed within the window
    generator_cpu: float = 0.0  # CPU time of the load generator within the window
    server_cpu: float = math.nan  # CPU time of the server within the window


class LoadGenerator:
    """N clients on one selector, cycling through the pre-built requests."""

    def __init__(self, port: int, requests: list[bytes], clients: int,
                 expect_value: bool) -> None:
        self.address = (HOST, port)
        self.requests = requests
        self.expect_value = expect_value
        self.selector = selectors.DefaultSelector()
        self.clients = [Client() for _ in range(clients)]
        self.next_request = 0
        self.ready: list[Client] = []
        self.in_flight = 0
        self.calls_left = 0
        self.stop_issuing_at = 0.0
        self.result = PhaseResult()
        self.server_pid: int | None = None
        self.window_open = False
        self.window_start = (0.0, 0.0, 0.0)  # wall clock, generator CPU, server CPU

    def run(self, max_calls: int, seconds: float, server_pid: int | None = None) -> PhaseResult:
        """Run calls until max_calls are started or seconds have passed, then
        wait (at most DRAIN_TIMEOUT_S) for the calls in flight.  With the
        server's pid, measure its CPU time within the window too."""
        self.result = result = PhaseResult()
        self.server_pid = server_pid
        start = time.perf_counter()
        self.window_start = (start, time.process_time(), self.server_cpu_seconds())
        self.window_open = True
        self.calls_left = max_calls
        self.stop_issuing_at = start + seconds
        give_up_at = self.stop_issuing_at + DRAIN_TIMEOUT_S
        self.ready = list(self.clients)
        self.start_ready_calls()
        while self.in_flight:
            now = time.perf_counter()
            if self.window_open and now >= self.stop_issuing_at:
                self.close_window(now)
            if now >= give_up_at:
                break
            wake_at = self.stop_issuing_at if self.window_open else give_up_at
            for key, mask in self.selector.select(wake_at - now):
                self.on_event(key.data, mask)
            self.start_ready_calls()
        if self.window_open:
            self.close_window(time.perf_counter())
        self.give_up_unfinished_calls()
        return result

    def close_window(self, now: float) -> None:
        start, generator_cpu, server_cpu = self.window_start
        self.window_open = False
        self.result.window = now - start
        self.result.generator_cpu = time.process_time() - generator_cpu
        self.result.server_cpu = self.server_cpu_seconds() - server_cpu

    def server_cpu_seconds(self) -> float:
        return math.nan if self.server_pid is None else cpu_seconds(self.server_pid)

    def give_up_unfinished_calls(self) -> None:
        now = time.perf_counter()
        for client in self.clients:
            if client.busy:
                self.result.unfinished.append(now - client.started)
                self.disconnect(client)
                self.finish(client)
        self.ready.clear()

    def close(self) -> None:
        for client in self.clients:
            self.disconnect(client)
        self.selector.close()

    # Calls

    def start_ready_calls(self) -> None:
        ready, self.ready = self.ready, []
        for client in ready:
            if self.calls_left > 0 and time.perf_counter() < self.stop_issuing_at:
                self.start_call(client)

    def start_call(self, client: Client) -> None:
        self.calls_left -= 1
        self.in_flight += 1
        client.busy = True
        request = self.requests[self.next_request]
        self.next_request = (self.next_request + 1) % len(self.requests)
        client.unsent = memoryview(request)
        client.started = time.perf_counter()
        if client.sock is None:
            self.connect(client)
        else:
            self.send(client)

    def finish(self, client: Client) -> None:
        client.busy = False
        self.in_flight -= 1
        self.ready.append(client)

    def fail(self, client: Client, error: str) -> None:
        self.result.errors[error] += 1
        self.disconnect(client)
        self.finish(client)

    def complete(self, client: Client, response: Response) -> None:
        error = response_error(response, self.expect_value)
        if error is None:
            now = time.perf_counter()
            self.result.latencies.append(now - client.started)
            if self.window_open:
                self.result.calls_in_window += 1
        else:
            self.result.errors[error] += 1
        del client.inbox[:response.size]
        if not response.keep_alive or client.inbox:
            self.disconnect(client)
        self.finish(client)

    # Sockets

    def watch(self, client: Client, events: int) -> None:
        if events == client.events:
            return
        if client.events == 0:
            self.selector.register(client.sock, events, client)
        else:
            self.selector.modify(client.sock, events, client)
        client.events = events

    def connect(self, client: Client) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock = sock
        client.connecting = True
        error = sock.connect_ex(self.address)
        if error not in (0, EINPROGRESS):
            self.fail(client, f"connect: {os.strerror(error)}")
            return
        self.watch(client, selectors.EVENT_WRITE)

    def disconnect(self, client: Client) -> None:
        if client.sock is None:
            return
        if client.events:
            self.selector.unregister(client.sock)
        client.sock.close()
        client.sock = None
        client.events = 0
        client.connecting = False
        client.inbox.clear()

    def send(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.unsent)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self.fail(client, f"send: {e.strerror}")
            return
        client.unsent = client.unsent[sent:]
        self.watch(client, selectors.EVENT_READ | (selectors.EVENT_WRITE if client.unsent else 0))

    def on_event(self, client: Client, mask: int) -> None:
        if client.connecting:
            error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.fail(client, f"connect: {os.strerror(error)}")
                return
            client.connecting = False
            self.send(client)
        elif mask & selectors.EVENT_READ:
            self.receive(client)
        elif mask & selectors.EVENT_WRITE:
            self.send(client)

    def receive(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            if client.busy:
                self.fail(client, f"recv: {e.strerror}")
            else:
                self.disconnect(client)
            return
        if not client.busy:
            # The server closed an idle connection; the next call reconnects.
            if data:
                self.result.errors["unexpected bytes between calls"] += 1
            self.disconnect(client)
            return
        if not data:
            self.fail(client, "connection closed before the response")
            return
        client.inbox += data
        try:
            response = parse_response(client.inbox)
        except ValueError as e:
            self.fail(client, f"bad response: {e}")
            return
        if response is not None:
            self.complete(client, response)


# Cells


@dataclass
class CellRun:
    """One measured run of one server x op x clients; latencies in ms."""

    calls_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float  # a lower bound if calls were given up
    slow_calls: int  # slower than LATENCY_LIMIT_S, given-up calls included
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
        errors[f"warm-up: calls given up after {DRAIN_TIMEOUT_S:g} s"] += len(warmup.unfinished)
    return CellRun(
        calls_per_s=result.calls_in_window / window,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=max(every_time, default=math.nan) * 1000,
        slow_calls=sum(1 for t in every_time if t > LATENCY_LIMIT_S),
        unfinished=len(result.unfinished),
        errors=errors,
        generator_cpu=result.generator_cpu / window,
        server_cpu=result.server_cpu / window,
    )


def run_cell(server: Server, requests: list[bytes], op: str, clients: int,
             max_calls: int, seconds: float) -> CellRun:
    """Warm up, then measure, on the same connections."""
    generator = LoadGenerator(server.port, requests, clients, expect_value=(op == "load"))
    try:
        warmup = generator.run(max(clients, max_calls // 10), WARMUP_SECONDS)
        result = generator.run(max_calls, seconds, server.pid)
    finally:
        generator.close()
    return summarize(result, warmup)


def prefill(server: Server, requests: list[bytes]) -> None:
    """Save every key once, so that load finds them whatever ops are run."""
    generator = LoadGenerator(server.port, requests, PREFILL_CLIENTS, expect_value=False)
    try:
        result = generator.run(len(requests), seconds=60.0)
    finally:
        generator.close()
    if result.errors or len(result.latencies) != len(requests):
        raise RuntimeError(f"{server.name}: saving the {len(requests)} keys failed: "
                           f"{len(result.latencies)} saved, errors {dict(result.errors)}")


CellKey = tuple[str, str, int]  # server name, op, clients


def run_all(args: argparse.Namespace, servers: list[Server],
            requests: dict[tuple[str, str], list[bytes]]) -> dict[CellKey, list[CellRun]]:
    """Every cell, repeated, the servers taking turns."""
    runs: dict[CellKey, list[CellRun]] = {}
    for op in args.ops:
        for clients in args.clients:
            for repeat in range(args.repeat):
                for server in servers:
                    run = run_cell(server, requests[server.name, op], op, clients,
                                   args.max_calls, args.seconds)
                    runs.setdefault((server.name, op, clients), []).append(run)
                    progress(f"  {op} {clients:>3} clients {server.name:<8} run "
                             f"{repeat + 1}/{args.repeat}: {run.calls_per_s:6.0f} calls/s, "
                             f"p99 {run.p99_ms:7.2f} ms, max {run.max_ms:8.1f} ms, "
                             f"{run.unfinished} given up, {sum(run.errors.values())} errors")
    return runs


# Aggregation and report


@dataclass
class CellSummary:
    """The repeats of one server x op x clients, combined."""

    calls_per_s: float  # median
    p50_ms: float  # median
    p99_ms: float  # median
    max_ms: float  # max
    slow_calls: int  # sum
    unfinished: int  # sum
    errors: Counter  # sum
    generator_cpu: float  # max
    server_cpu: float  # median

    @classmethod
    def of(cls, runs: list[CellRun]) -> CellSummary:
        return cls(
            calls_per_s=statistics.median(r.calls_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            max_ms=max(r.max_ms for r in runs),
            slow_calls=sum(r.slow_calls for r in runs),
            unfinished=sum(r.unfinished for r in runs),
            errors=sum((r.errors for r in runs), Counter()),
            generator_cpu=max(r.generator_cpu for r in runs),
            server_cpu=statistics.median(r.server_cpu for r in runs),
        )

    def latency_text(self) -> str:
        at_least = ">=" if self.unfinished else ""
        return f"{self.p50_ms:.2f}/{self.p99_ms:.2f}/{at_least}{self.max_ms:.1f}"


def target_text(kvconfig: CellSummary | None, stdlib: CellSummary | None,
                clients: int) -> str:
    """Whether a row meets its target, and if not, why."""
    if kvconfig is None:
        return "-"
    failures = []
    if kvconfig.errors:
        failures.append("errors")
    if kvconfig.slow_calls:
        failures.append(f"max>{LATENCY_LIMIT_S:g}s")
    needs_ratio = clients in TARGET_CLIENTS
    if needs_ratio and stdlib and kvconfig.calls_per_s < TARGET_RATIO * stdlib.calls_per_s:
        failures.append(f"ratio<{TARGET_RATIO:g}")
    if failures:
        return f"NO ({', '.join(failures)})"
    return "? (no stdlib run)" if needs_ratio and stdlib is None else "yes"


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


def result_table(ops: list[str], client_counts: list[int],
                 cells: dict[CellKey, CellSummary]) -> str:
    rows = [["op", "clients", "kvconfig calls/s", "stdlib calls/s", "ratio",
             "kvconfig p50/p99/max ms", "stdlib p50/p99/max ms", "target"]]
    for op in ops:
        for clients in client_counts:
            kvconfig = cells.get(("kvconfig", op, clients))
            stdlib = cells.get(("stdlib", op, clients))
            ratio = "-"
            if kvconfig and stdlib and stdlib.calls_per_s:
                ratio = f"{kvconfig.calls_per_s / stdlib.calls_per_s:.2f}"
            rows.append([
                op, str(clients),
                f"{kvconfig.calls_per_s:.0f}" if kvconfig else "-",
                f"{stdlib.calls_per_s:.0f}" if stdlib else "-",
                ratio,
                kvconfig.latency_text() if kvconfig else "-",
                stdlib.latency_text() if stdlib else "-",
                target_text(kvconfig, stdlib, clients),
            ])
    return format_table(rows)


def cpu_table(ops: list[str], client_counts: list[int],
              cells: dict[CellKey, CellSummary]) -> str:
    rows = [["op", "clients", "kvconfig server", "stdlib server", "load generator (max)"]]
    for op in ops:
        for clients in client_counts:
            kvconfig = cells.get(("kvconfig", op, clients))
            stdlib = cells.get(("stdlib", op, clients))
            generator = max(c.generator_cpu for c in (kvconfig, stdlib) if c)
            rows.append([
                op, str(clients),
                f"{kvconfig.server_cpu:.2f}" if kvconfig else "-",
                f"{stdlib.server_cpu:.2f}" if stdlib else "-",
                f"{generator:.2f}",
            ])
    return format_table(rows)


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    """Errors and calls slower than the limit, cell by cell."""
    lines = []
    for (name, op, clients), cell in cells.items():
        where = f"{name} {op} {clients} clients"
        if cell.slow_calls:
            given_up = (f", {cell.unfinished} of them given up after >= {DRAIN_TIMEOUT_S:g} s"
                        if cell.unfinished else "")
            lines.append(f"{where}: {cell.slow_calls} call(s) slower than "
                         f"{LATENCY_LIMIT_S:g} s{given_up}; max >= {cell.max_ms / 1000:.2f} s")
        for error, count in cell.errors.most_common():
            lines.append(f"{where}: {count} error(s): {error}")
    return lines or [f"no errors, no call slower than {LATENCY_LIMIT_S:g} s"]


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
    ]


def header(args: argparse.Namespace, names: list[str], directory: Path) -> list[str]:
    return [
        *machine_info(),
        f"servers: {', '.join(names)}, on loopback {HOST}",
        (f"  kvconfig: twistd -n kvconfig --store sqlite:<tmp> (durable save), "
         f"HTTP/1.1 keep-alive; store on {filesystem_of(directory)}"),
        ("  stdlib:   classic SimpleXMLRPCServer dict store, allow_none=True, "
         "logRequests=False (generous to it: no stderr line per call);"),
        ("            HTTP/1.0, so every call reconnects, and the reconnection counts "
         "in its latency"),
        (f"load: clients {','.join(map(str, args.clients))}, ops {','.join(args.ops)}, "
         f"{KEY_COUNT} keys, one call at a time per connection;"),
        (f"  per cell {WARMUP_SECONDS:g} s warm-up, then at most {args.max_calls} calls and "
         f"{args.seconds:g} s (calls still running are waited for up to "
         f"{DRAIN_TIMEOUT_S:g} s more);"),
        f"  {args.repeat} repeat(s) of each cell, the servers taking turns",
        ("report: calls/s = good calls completed within the time bound / its length; "
         "medians over repeats"),
        ("  of calls/s, p50, p99; max latency over all repeats; "
         f"target: ratio >= {TARGET_RATIO:g} at "
         f"{' and '.join(map(str, TARGET_CLIENTS))} clients, no kvconfig call > "
         f"{LATENCY_LIMIT_S:g} s"),
    ]


# Main


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def op_list(text: str) -> list[str]:
    ops = [part for part in text.split(",") if part]
    unknown = set(ops) - {"save", "load"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s): {', '.join(sorted(unknown))}")
    return ops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--clients", type=int_list, default=[1, 16, 64],
                        help="concurrent clients per cell, comma-separated (default 1,16,64)")
    parser.add_argument("--ops", type=op_list, default=["save", "load"],
                        help="operations, comma-separated (default save,load)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time bound of a cell (default 3)")
    parser.add_argument("--max-calls", type=int, default=20000,
                        help="call bound of a cell (default 20000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each cell, the servers taking turns (default 3)")
    parser.add_argument("--only", choices=["kvconfig", "stdlib", "both"], default="both",
                        help="which server(s) to run (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per cell, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 1.0, 1
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients must be positive numbers")
    if args.seconds <= 0 or args.max_calls < 1 or args.repeat < 1:
        parser.error("--seconds, --max-calls and --repeat must be positive")
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
    began = time.monotonic()
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        print("\n".join(header(args, names, directory)), flush=True)
        servers = [stack.enter_context(running_server(name, directory)) for name in names]
        requests = {(server.name, op): build_requests(op, server.port)
                    for server in servers for op in ("save", "load")}
        for server in servers:
            prefill(server, requests[server.name, "save"])
        runs = run_all(args, servers, requests)
    cells = {key: CellSummary.of(cell_runs) for key, cell_runs in runs.items()}
    print()
    print(result_table(args.ops, args.clients, cells))
    print()
    print("CPU use within the time bound, in cores (servers: median over repeats):")
    print(cpu_table(args.ops, args.clients, cells))
    print()
    print("\n".join(notes(cells)))
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
