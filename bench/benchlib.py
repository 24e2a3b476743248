"""
What every benchmark script in this folder shares.

The scripts measure different protocols the same way: servers started side
by side on loopback, a load generator in the script's own process, cells
(server x op x clients ...) each warmed up, run up to an op bound and a time
bound and repeated with the servers taking turns, the repeats summarised as
medians, and tables printed under a header.  This module holds that generic
part, once:

* servers: free ports, the twistd to run, the kvconfig command line, starting
  a server in its own directory and waiting until it listens, stopping it
  (SIGTERM, then SIGKILL), the warnings and errors in its logs;
* CPU accounting of a process and its descendants, and their resident
  memory now and at its peak (Linux);
* the wire, as far as more than one script speaks it: HTTP/1.1 requests and
  responses (Content-Length or chunked, whole or streamed) and the replies of
  kvconfig's line protocol;
* the load generator (:class:`LoadGenerator`): connections on one selector,
  each keeping ``depth`` requests in flight, a measured window up to the op
  and time bounds, then a bounded drain; a :class:`Speaker` says what to send
  and reads the replies;
* cells: percentiles, one run's summary, the warm-up, prefill, the repeats of
  every cell, and their combination;
* the report: verdicts, table formatting, the results and CPU tables (with a
  baseline's column where there is one), machine info;
* the command line: the options the scripts share and their checks, and the
  frame of a script's main.

A baseline (``--baseline-twistd PATH``) is a second kvconfig, the twistd of
another install (older code, say), run as one more server beside kvconfig and
the rival, taking turns with them in the same repeats, so that a change is
measured against the code before it side by side, in one run, on the same
machine load.  The tables then give kvconfig's ratio to it.

The scripts are run as ``python bench/<script>.py``, which puts this folder on
``sys.path``; they import this module as ``benchlib`` (and the two that time
UDP notifications ``benchlatency`` too).  It is not part of the test run and is
not installed.
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
import threading
import time
import xmlrpc.client
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from errno import EINPROGRESS
from itertools import repeat
from pathlib import Path
from typing import Any, NoReturn

HOST = "127.0.0.1"
KVCONFIG, BASELINE = "kvconfig", "baseline"
KEY_COUNT = 1000
WARMUP_SECONDS = 0.3
DRAIN_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
PREFILL_CLIENTS = 8
PREFILL_SECONDS = 60.0
RECV_BYTES = 262144
BUSY_GENERATOR = 0.9  # cores: above this the load generator may be the bottleneck
LOG_MARKS = ("#warn]", "#error]", "#critical]", "Traceback", "Unhandled")
GREETING = b"HELLO "  # how kvconfig's line protocol greets a new connection

# A row of a script's tables, the cell's parameters but the server: (op, clients)
# or (op, clients, depth).  A cell is keyed by (server name, *row).
Row = tuple
CellKey = tuple


# Servers


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on HOST now, for TCP (the default) or, with SOCK_DGRAM, UDP."""
    with socket.socket(socket.AF_INET, kind) as s:
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


def twistd_of(name: str, args: argparse.Namespace) -> str:
    """The twistd of kvconfig, or of the baseline (--baseline-twistd)."""
    return args.baseline_twistd if name == BASELINE else twistd_path()


def known_options(twistd: str, options: dict[str, object]) -> list[str]:
    """``--name=value`` for each of *options* that this twistd's kvconfig
    takes (an older install, the baseline, may not know a newer limit)."""
    usage = subprocess.run([twistd, "kvconfig", "--help"], capture_output=True, text=True,
                           timeout=60).stdout
    return [f"{name}={value}" for name, value in options.items() if f"{name}=" in usage]


def kvconfig_command(directory: Path, *, twistd: str | None = None, store: str | None = None,
                     xmlrpc_port: int = 0, line_port: int = 0, udp_port: int = 0,
                     options: Iterable[str] = ()) -> list[str]:
    """``twistd -n kvconfig`` (twistd: that of this venv unless given) with its
    log in directory and a sqlite store there unless store is given; port 0
    for an interface not measured (any free port, so that a bench never
    collides with a server on the default ports; no --http port, where
    that twistd has one)."""
    twistd = twistd or twistd_path()
    return [
        twistd, "-n", "--pidfile=", f"--logfile={directory / 'twistd.log'}",
        "kvconfig", f"--store={store or 'sqlite:' + str(directory / 'kvconfig.db')}",
        f"--xmlrpc=tcp:{xmlrpc_port}:interface={HOST}",
        f"--line=tcp:{line_port}:interface={HOST}",
        f"--udp=udp:{udp_port}:interface={HOST}",
        *known_options(twistd, {"--http": "none"}), *options,
    ]


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


@dataclass
class Server:
    """A server a bench drives: the port it is measured on, the process whose
    CPU counts, and, if this module started it, its directory and process."""

    name: str
    port: int
    pid: int
    directory: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def log_files(self) -> list[Path]:
        return [self.directory / "stderr", self.directory / "twistd.log"] if self.directory else []

    def logs(self) -> str:
        return "\n".join(f"--- {self.name} {log.name}:\n{read_log(log)}"
                         for log in self.log_files())

    def log_problems(self, most: int = 20) -> list[str]:
        """The lines of its logs that speak of warnings or errors (at most most)."""
        problems = [f"{self.name} {log.name}: {line[:220]}"
                    for log in self.log_files() if log.exists()
                    for line in log.read_text(errors="replace").splitlines()
                    if any(mark in line for mark in LOG_MARKS)]
        return problems[:most] or [f"{self.name} log: no warnings, errors or tracebacks"]


def wait_until_listening(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n"
                               f"{server.logs()}")
        try:
            socket.create_connection((HOST, server.port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not listen on port {server.port}:\n{server.logs()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after a while."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(name: str, directory: Path, command: list[str], port: int) -> Iterator[Server]:
    """Start command in directory (made if need be) with its stderr there;
    yield the server once it accepts connections on port, stop it after."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "stderr", "wb") as stderr:
        process = subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(name, port, process.pid, directory, process)
    try:
        wait_until_listening(server)
        yield server
    finally:
        stop(process)


@contextmanager
def servers_running(names: list[str], header: Callable[[Path], list[str]],
                    command: Callable[[str, Path, int], list[str]]) -> Iterator[list[Server]]:
    """A temporary directory; the header, which may speak of it, printed; then
    the servers named, command(name, their directory, a free port) each, each
    in a directory of its own in it.  Yields them; stops them and removes the
    directory after."""
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        print("\n".join(header(directory)), flush=True)
        servers = []
        for name in names:
            port = free_port()
            servers.append(stack.enter_context(running_server(
                name, directory / name, command(name, directory / name, port), port)))
        yield servers


# CPU accounting


def stat_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far, in clock ticks
    (Linux; else nan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    return stat_cpu_seconds(pid)


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


# Memory


def status_kib(pid: int, name: str) -> int:
    """A VmXXX line of /proc/PID/status (VmRSS, VmHWM ...) in KiB; 0 once
    the process is gone or off Linux."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """The resident memory of a process and its descendants (kvconfig's
    sqlite writer) in MB against a baseline taken when the watch starts
    (``with PeakMemory(pid) as memory``): its peak, from a sampler and the
    kernel's VmHWM (reset at the start through ``clear_refs``, where this
    process may), and what it is now."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline_kib = 0
        self._sampled_kib = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        try:
            for pid in process_tree(self.pid):
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM
            self._hwm_reset = True
        except OSError:
            pass
        self.baseline_kib = self._sampled_kib = self.rss_kib()
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
        less the baseline (with VmHWM, each process's peak summed: a bound
        from above)."""
        peak = self._sampled_kib
        if self._hwm_reset:
            peak = max(peak, sum(status_kib(pid, "VmHWM") for pid in process_tree(self.pid)))
        return (peak - self.baseline_kib) / 1024

    @property
    def growth_mb(self) -> float:
        return (self.rss_kib() - self.baseline_kib) / 1024

    def settles(self, within_mb: float, timeout: float) -> float:
        """Wait (at most timeout) for the growth to come within within_mb of
        the baseline; the last growth seen."""
        deadline = time.monotonic() + timeout
        while (growth := self.growth_mb) > within_mb and time.monotonic() < deadline:
            time.sleep(0.2)
        return growth


# The wire: HTTP/1.1 and kvconfig's line protocol


def http_post(port: int, path: str, content_type: str, body: bytes) -> bytes:
    """A keep-alive HTTP/1.1 POST of body to path on HOST:port."""
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: kvconfig-bench\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("ascii") + body


@dataclass
class HttpHead:
    status: int
    version: str
    headers: dict[str, str]  # names in lower case
    end: int  # where the body starts

    @property
    def chunked(self) -> bool:
        return self.headers.get("transfer-encoding", "").lower() == "chunked"


@dataclass
class HttpReply:
    status: int
    body: bytes
    keep_alive: bool
    end: int  # where the buffer goes on after it


def parse_head(buffer: bytearray, start: int = 0) -> HttpHead | None:
    """The head of the HTTP response at start in buffer, or None if it is not
    complete yet; ValueError if it is too large."""
    head_end = buffer.find(b"\r\n\r\n", start)
    if head_end < 0:
        if len(buffer) - start > 65536:
            raise ValueError("response head over 64 KiB")
        return None
    status_line, *header_lines = bytes(buffer[start:head_end]).decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpHead(int(status), version, headers, head_end + 4)


def dechunk(buffer: bytearray, position: int) -> tuple[bytes, int, bool]:
    """The data of the complete chunks of a chunked body from position on:
    (their data, where they end, whether the last chunk was among them)."""
    data = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return bytes(data), position, False
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        data_end = line_end + 2 + size
        if len(buffer) < data_end + 2:
            return bytes(data), position, False
        if size == 0:
            if buffer[data_end:data_end + 2] != b"\r\n":
                raise ValueError("chunked response with trailers")
            return bytes(data), data_end + 2, True
        data += buffer[line_end + 2:data_end]
        position = data_end + 2


def parse_http(buffer: bytearray, start: int = 0) -> HttpReply | None:
    """The HTTP response at start in buffer (Content-Length or chunked), or None
    if it is not complete yet; ValueError if it is not one."""
    head = parse_head(buffer, start)
    if head is None:
        return None
    if head.chunked:
        body, end, complete = dechunk(buffer, head.end)
        if not complete:
            return None
    elif "content-length" in head.headers:
        end = head.end + int(head.headers["content-length"])
        if len(buffer) < end:
            return None
        body = bytes(buffer[head.end:end])
    else:
        raise ValueError(f"response {head.status} without Content-Length")
    connection = head.headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" or (head.version == "HTTP/1.1"
                                                and connection != "close")
    return HttpReply(head.status, body, keep_alive, end)


# A reply parser takes the bytes received so far and returns (replies complete,
# [(index of a bad reply, what is wrong)], bytes used, whether the connection
# stays open).  It raises ValueError for bytes that are no reply.
Parsed = tuple[int, list[tuple[int, str]], int, bool]
Parser = Callable[[bytearray], Parsed]


def http_parser(check: Callable[[HttpReply], str | None]) -> Parser:
    """Reads HTTP responses; check says what is wrong with one, or None."""

    def parse(buffer: bytearray) -> Parsed:
        count, bad, used, keep_alive = 0, [], 0, True
        while keep_alive and (reply := parse_http(buffer, used)) is not None:
            error = check(reply)
            if error is not None:
                bad.append((count, error))
            count, used, keep_alive = count + 1, reply.end, reply.keep_alive
        return count, bad, used, keep_alive

    return parse


def xmlrpc_error(reply: HttpReply, expect_value: bool = False) -> str | None:
    """What is wrong with an XML-RPC response, or None if it is a good answer
    (with expect_value, one that is not nil)."""
    if reply.status != 200:
        return f"HTTP status {reply.status}"
    if b"<fault>" in reply.body:
        try:
            xmlrpc.client.loads(reply.body)
        except xmlrpc.client.Fault as fault:
            return f"fault {fault.faultCode}: {fault.faultString[:80]}"
        return "fault"
    if expect_value and b"<nil/>" in reply.body:
        return "answered nil"
    return None


def line_error(line: bytes) -> str:
    """What a kvconfig line-protocol reply that is not the one expected says."""
    text = line.decode("utf-8", "replace").strip()
    if text.startswith("ERR "):
        return " ".join(text.split()[:3])  # ERR <name> <code>
    if text.startswith("NIL "):
        return "GET answered NIL"
    return f"unexpected reply {text[:60]!r}"


def line_parser(expect: bytes) -> Parser:
    """Reads kvconfig line-protocol replies, one line each, that should start
    with expect (b"OK " for SET, b"VALUE " for GET)."""

    def parse(buffer: bytearray) -> Parsed:
        end = buffer.rfind(b"\n")
        if end < 0:
            return 0, [], 0, True
        lines = bytes(buffer[:end]).split(b"\n")
        bad = [(i, line_error(line)) for i, line in enumerate(lines)
               if not line.startswith(expect)]
        return len(lines), bad, end + 1, True

    return parse


def greeted(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read kvconfig's line-protocol greeting on a new blocking connection:
    (the greeting line, what came after it)."""
    received = bytearray()
    while b"\n" not in received:
        data = sock.recv(RECV_BYTES)
        if not data:
            raise RuntimeError("kvconfig closed the connection before its greeting")
        received += data
    line, _, rest = bytes(received).partition(b"\n")
    if not line.startswith(GREETING):
        raise RuntimeError(f"kvconfig greeted with {line[:80]!r}")
    return line.rstrip(b"\r"), rest


# Load generator


@dataclass
class PhaseResult:
    """What one run of a load generator saw; times in seconds."""

    latencies: list[float] = field(default_factory=list)  # good ones, drain included
    unfinished: list[float] = field(default_factory=list)  # given up, time so far
    errors: Counter = field(default_factory=Counter)
    window: float = 0.0  # up to the time bound, or to the last reply if that came sooner
    good_in_window: int = 0  # good replies completed within the window
    generator_cpu: float = 0.0  # CPU time of the load generator within the window
    server_cpu: float = math.nan  # CPU time of the servers measured within the window


@dataclass(eq=False)
class Connection:
    """One client connection of a load generator."""

    index: int
    sock: socket.socket | None = None
    events: int = 0  # what the selector watches for, 0 when not registered
    connecting: bool = False
    greeted: bool = True  # False until the greeting, if the server sends one, is read
    issued: int = 0  # requests made on it so far, in all runs
    sent: deque = field(default_factory=deque)  # issue times of the requests in flight
    unsent: bytearray = field(default_factory=bytearray)
    inbox: bytearray = field(default_factory=bytearray)


class Speaker:
    """How a load generator speaks to one server: the requests and how to read
    the replies (parse, a Parser).  greeting: what the first line the server
    sends on a new connection starts with, if it sends one."""

    greeting: bytes | None = None

    def requests(self, connection: Connection, count: int) -> bytes:
        """The next count requests of a connection."""
        raise NotImplementedError

    def parse(self, buffer: bytearray) -> Parsed:
        raise NotImplementedError


class Cycle(Speaker):
    """Pre-built requests, taken in turn by all connections."""

    def __init__(self, requests: list[bytes], parse: Parser,
                 greeting: bytes | None = None) -> None:
        self.all = requests
        self.parse = parse
        self.greeting = greeting
        self.next = 0

    def requests(self, connection: Connection, count: int) -> bytes:
        index, total = self.next, len(self.all)
        end = index + count
        if end <= total:
            taken = self.all[index:end]
        else:  # round the end of the list
            taken = [self.all[i % total] for i in range(index, end)]
        self.next = end % total
        return taken[0] if count == 1 else b"".join(taken)


class LoadGenerator:
    """N connections to a server on one selector, each keeping depth requests
    in flight: it sends depth requests, then one new request per reply.  A run
    issues requests until an op bound or a time bound (the window, over which
    the CPU times are taken), then waits at most DRAIN_TIMEOUT_S for those
    still in flight.  A request's latency runs from its issue to its reply; a
    connection the server closed (HTTP/1.0, say) is made anew by the next
    request, and that counts in its latency, as a real client would see it.
    The server's CPU is that of the processes cpu_pids (default the server's)
    with their descendants, kept per process for cpu_cores."""

    def __init__(self, server: Server, speaker: Speaker, clients: int, depth: int = 1,
                 cpu_pids: list[int] | None = None) -> None:
        self.server = server
        self.address = (HOST, server.port)
        self.speaker = speaker
        self.depth = depth
        self.connections = [Connection(i) for i in range(clients)]
        self.selector = selectors.DefaultSelector()
        self.in_flight = 0
        self.issue_left = 0
        self.stop_issuing_at = 0.0
        self.result = PhaseResult()
        self.window_open = False
        self.window_start = (0.0, 0.0, 0.0)  # wall clock, generator CPU, server CPU
        self.cpu_pids = cpu_pids or [server.pid]
        self.cpu_trees: list[list[int]] = []
        self.cpu_marks: list[list[float]] = []

    def most_in_flight(self) -> int:
        return len(self.connections) * self.depth

    def run(self, max_count: int, seconds: float, measure_server: bool = False) -> PhaseResult:
        """Issue requests until max_count are issued or seconds have passed, then
        wait (at most DRAIN_TIMEOUT_S) for those in flight.  With measure_server,
        measure the servers' CPU time within the window too."""
        self.result = result = PhaseResult()
        self.cpu_trees = [process_tree(pid) for pid in self.cpu_pids] if measure_server else []
        self.cpu_marks = []
        start = time.perf_counter()
        self.window_start = (start, time.process_time(), self.server_cpu_seconds())
        self.window_open = True
        self.issue_left = max_count
        self.stop_issuing_at = start + seconds
        give_up_at = self.stop_issuing_at + DRAIN_TIMEOUT_S
        for connection in self.connections:
            self.issue(connection, self.depth, time.perf_counter())
        while self.in_flight:
            now = time.perf_counter()
            if self.window_open and now >= self.stop_issuing_at:
                self.close_window(now)
            if now >= give_up_at:
                break
            wake_at = self.stop_issuing_at if self.window_open else give_up_at
            for key, mask in self.selector.select(wake_at - now):
                self.on_event(key.data, mask)
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
        if not self.cpu_trees:
            return math.nan
        mark = [tree_cpu_seconds(tree) for tree in self.cpu_trees]
        self.cpu_marks.append(mark)
        return sum(mark)

    def cpu_cores(self) -> list[float]:
        """Cores used by each of cpu_pids within the last measured window."""
        if len(self.cpu_marks) < 2 or not self.result.window:
            return [math.nan] * len(self.cpu_pids)
        first, last = self.cpu_marks[0], self.cpu_marks[-1]
        return [(b - a) / self.result.window for a, b in zip(first, last, strict=True)]

    def close(self) -> None:
        for connection in self.connections:
            self.disconnect(connection)
        self.selector.close()

    # Requests and replies

    def issue(self, connection: Connection, count: int, now: float) -> None:
        """Make up to count new requests, issued at now, and send them."""
        if now >= self.stop_issuing_at:
            return
        count = min(count, self.issue_left)
        if count <= 0 or (connection.sock is None and not self.connect(connection)):
            return
        connection.unsent += self.speaker.requests(connection, count)
        connection.sent.extend(repeat(now, count))
        connection.issued += count
        self.issue_left -= count
        self.in_flight += count
        if not connection.connecting:
            self.flush(connection)

    def receive(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(connection, f"recv: {e.strerror}")
            return
        if not data:
            if connection.sent:
                self.fail(connection, "connection closed before the reply")
            else:  # the server closed an idle connection; the next request reconnects
                self.disconnect(connection)
            return
        inbox = connection.inbox
        inbox += data
        if not connection.greeted:
            end = inbox.find(b"\n")
            if end < 0:
                return
            if not inbox.startswith(self.speaker.greeting):
                self.fail(connection, f"greeted with {bytes(inbox[:min(end, 80)])!r}")
                return
            del inbox[:end + 1]
            connection.greeted = True
            if not inbox:
                return
        if not connection.sent:
            self.fail(connection, "unexpected bytes between requests")
            return
        try:
            count, bad, used, keep_alive = self.speaker.parse(inbox)
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
            result.good_in_window += count - len(bad)
        if not keep_alive or (inbox and not sent):
            if sent:
                self.fail(connection, "connection closed with requests in flight")
            else:
                self.disconnect(connection)
        self.issue(connection, count, now)

    def give_up_unfinished(self) -> None:
        now = time.perf_counter()
        for connection in self.connections:
            if connection.sent:
                self.result.unfinished.extend(now - t for t in connection.sent)
                self.in_flight -= len(connection.sent)
                connection.sent.clear()
                self.disconnect(connection)  # its late replies must not be read as new ones

    def fail(self, connection: Connection, error: str) -> None:
        """Count the requests in flight on a broken connection as errors and drop it."""
        lost = len(connection.sent)
        self.result.errors[error] += max(lost, 1)
        self.in_flight -= lost
        connection.sent.clear()
        self.disconnect(connection)

    # Sockets

    def connect(self, connection: Connection) -> bool:
        """Start connecting (non-blocking); whether that could start."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(self.address)
        if error not in (0, EINPROGRESS):
            sock.close()
            self.result.errors[f"connect: {os.strerror(error)}"] += 1
            return False
        connection.sock = sock
        connection.connecting = True
        connection.greeted = self.speaker.greeting is None
        self.watch(connection, selectors.EVENT_WRITE)
        return True

    def disconnect(self, connection: Connection) -> None:
        if connection.sock is None:
            return
        if connection.events:
            self.selector.unregister(connection.sock)
        connection.sock.close()
        connection.sock = None
        connection.events = 0
        connection.connecting = False
        connection.unsent.clear()
        connection.inbox.clear()

    def watch(self, connection: Connection, events: int) -> None:
        if events == connection.events:
            return
        if connection.events == 0:
            self.selector.register(connection.sock, events, connection)
        else:
            self.selector.modify(connection.sock, events, connection)
        connection.events = events

    def flush(self, connection: Connection) -> None:
        """Send what the socket takes of what is unsent now."""
        if connection.unsent:
            try:
                done = connection.sock.send(connection.unsent)
            except BlockingIOError:
                done = 0
            except OSError as e:
                self.fail(connection, f"send: {e.strerror}")
                return
            del connection.unsent[:done]
        self.watch(connection, selectors.EVENT_READ
                   | (selectors.EVENT_WRITE if connection.unsent else 0))

    def on_event(self, connection: Connection, mask: int) -> None:
        if connection.connecting:
            error = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.fail(connection, f"connect: {os.strerror(error)}")
                return
            connection.connecting = False
            self.flush(connection)
            return
        if mask & selectors.EVENT_READ:
            self.receive(connection)
        if mask & selectors.EVENT_WRITE and connection.sock and not connection.connecting:
            self.flush(connection)


# Cells


@dataclass
class CellRun:
    """One measured run of one cell; latencies in ms."""

    per_s: float  # good replies completed within the time bound, per second
    p50_ms: float
    p99_ms: float
    max_ms: float  # a lower bound if requests were given up
    slow: int  # slower than the latency limit, given-up ones included
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


def median(values: Iterable[float]) -> float:
    """The median of the values that are not nan; nan if there are none."""
    figures = [value for value in values if not math.isnan(value)]
    return statistics.median(figures) if figures else math.nan


def summarize(result: PhaseResult, warmup: PhaseResult, unit: str,
              latency_limit: float = math.inf) -> CellRun:
    """A measured run, with the warm-up's errors; unit names what is given up
    ("calls", "requests")."""
    latencies = sorted(result.latencies)
    every_time = latencies + result.unfinished
    window = result.window or math.nan
    errors = result.errors + Counter({f"warm-up: {e}": n for e, n in warmup.errors.items()})
    if warmup.unfinished:
        errors[f"warm-up: {unit} given up after {DRAIN_TIMEOUT_S:g} s"] += len(warmup.unfinished)
    return CellRun(
        per_s=result.good_in_window / window,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=max(every_time, default=math.nan) * 1000,
        slow=sum(1 for t in every_time if t > latency_limit),
        unfinished=len(result.unfinished),
        errors=errors,
        generator_cpu=result.generator_cpu / window,
        server_cpu=result.server_cpu / window,
    )


def run_cell(generator: LoadGenerator, max_count: int, seconds: float, unit: str,
             latency_limit: float = math.inf) -> CellRun:
    """Warm up, then measure, on the same connections; close the generator."""
    try:
        warmup = generator.run(max(generator.most_in_flight(), max_count // 10), WARMUP_SECONDS)
        result = generator.run(max_count, seconds, measure_server=True)
    finally:
        generator.close()
    return summarize(result, warmup, unit, latency_limit)


def prefill(generator: LoadGenerator, doing: str, done: str) -> None:
    """Run KEY_COUNT writes, one per key, so that reads find every key whatever
    ops are run; close the generator.  doing and done word the error
    ("saving", "saved")."""
    try:
        result = generator.run(KEY_COUNT, seconds=PREFILL_SECONDS)
    finally:
        generator.close()
    if result.errors or len(result.latencies) != KEY_COUNT:
        raise RuntimeError(f"{generator.server.name}: {doing} the {KEY_COUNT} keys failed: "
                           f"{len(result.latencies)} {done}, errors {dict(result.errors)}")


def run_all(rows: list[Row], servers: list[Server], repeat_count: int,
            run_one: Callable[[Server, Row], CellRun], where: Callable[[Row], str],
            rate: str) -> dict[CellKey, list[CellRun]]:
    """Every cell, repeated, the servers taking turns; a progress line a run
    (where the row is, then the run's figures)."""
    runs: dict[CellKey, list[CellRun]] = {}
    for row in rows:
        for i in range(repeat_count):
            for server in servers:
                run = run_one(server, row)
                runs.setdefault((server.name, *row), []).append(run)
                progress(f"  {where(row)} {server.name:<8} run {i + 1}/{repeat_count}: "
                         f"{run.per_s:7.0f} {rate}, p50/p99 {run.p50_ms:6.2f}/"
                         f"{run.p99_ms:6.2f} ms, max {run.max_ms:7.1f} ms, "
                         f"{run.unfinished} given up, {sum(run.errors.values())} errors, "
                         f"cpu server {run.server_cpu:.2f} generator {run.generator_cpu:.2f}")
    return runs


@dataclass
class CellSummary:
    """The repeats of one cell, combined."""

    per_s: float  # median
    p50_ms: float  # median
    p99_ms: float  # median
    max_ms: float  # max
    slow: int  # sum
    unfinished: int  # sum
    errors: Counter  # sum
    generator_cpu: float  # max
    server_cpu: float  # median

    @classmethod
    def of(cls, runs: list[CellRun]) -> CellSummary:
        return cls(
            per_s=statistics.median(r.per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            max_ms=max(r.max_ms for r in runs),
            slow=sum(r.slow for r in runs),
            unfinished=sum(r.unfinished for r in runs),
            errors=sum((r.errors for r in runs), Counter()),
            generator_cpu=max(r.generator_cpu for r in runs),
            server_cpu=statistics.median(r.server_cpu for r in runs),
        )

    def latency_text(self) -> str:
        at_least = ">=" if self.unfinished else ""
        return f"{self.p50_ms:.2f}/{self.p99_ms:.2f}/{at_least}{self.max_ms:.1f}"


def summaries(runs: dict[CellKey, list[CellRun]]) -> dict[CellKey, CellSummary]:
    return {key: CellSummary.of(cell_runs) for key, cell_runs in runs.items()}


def cell_notes(cells: dict[CellKey, CellSummary], where: Callable[[CellKey], str], unit: str,
               none: str, slow: str | None = None) -> list[str]:
    """Per cell: requests slower than slow (the latency limit's words, if
    there is one) or given up, errors, and a busy load generator; none if
    there is nothing to say."""
    lines = []
    given_up = f"given up after >= {DRAIN_TIMEOUT_S:g} s"
    for key, cell in cells.items():
        place = where(key)
        if slow is not None and cell.slow:
            of_them = f", {cell.unfinished} of them {given_up}" if cell.unfinished else ""
            lines.append(f"{place}: {cell.slow} {unit}(s) slower than {slow}{of_them}; "
                         f"max >= {cell.max_ms / 1000:.2f} s")
        elif cell.unfinished:
            lines.append(f"{place}: {cell.unfinished} {unit}(s) {given_up}")
        for error, count in cell.errors.most_common(5):
            lines.append(f"{place}: {count} error(s): {error}")
        if cell.generator_cpu > BUSY_GENERATOR:
            lines.append(f"{place}: the load generator used {cell.generator_cpu:.2f} cores; "
                         "this cell may measure the generator more than the server")
    return lines or [none]


# Report


def verdict(failures: list[str]) -> str:
    """A target column's text: "yes", or "NO (what failed)"."""
    return f"NO ({', '.join(failures)})" if failures else "yes"


def target_text(kvconfig: CellSummary | None, rival: CellSummary | None, other: str,
                ratio: float | None, failures: list[str]) -> str:
    """A row's target column: "-" without kvconfig; "NO (why)" if kvconfig had
    errors, failed in other ways (failures), or, where a ratio is wanted, had
    less than ratio x the other server's throughput; "?" if a ratio is wanted
    but the other did not run; else "yes"."""
    if kvconfig is None:
        return "-"
    failures = (["errors"] if kvconfig.errors else []) + failures
    if ratio is not None and rival and kvconfig.per_s < ratio * rival.per_s:
        failures.append(f"ratio<{ratio:g}")
    if not failures and ratio is not None and rival is None:
        return f"? (no {other} run)"
    return verdict(failures)


Target = Callable[[CellSummary | None, CellSummary | None, Row], str]


def by_server(name: str, row: Row) -> CellKey:
    return (name, *row)


@dataclass(frozen=True)
class Layout:
    """How a script's results and CPU tables read."""

    rows: list[Row]
    columns: list[str]  # the headers of the columns that name a row
    label: Callable[[Row], list[str]]  # a row's cells under those
    other: str  # the server kvconfig is compared with
    rate: str  # what throughput counts: "calls/s", "ops/s"
    target: Target  # the target column: (kvconfig, other, row) -> text
    cpu_titles: tuple[str, str]  # the CPU table's headers for kvconfig and the other
    baseline: bool = False  # whether a baseline kvconfig ran
    key: Callable[[str, Row], CellKey] = by_server  # a server's cell of a row

    def cell(self, cells: dict[CellKey, CellSummary], name: str, row: Row) -> CellSummary | None:
        return cells.get(self.key(name, row))

    def servers(self) -> list[str]:
        return [KVCONFIG, *([BASELINE] if self.baseline else []), self.other]


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


def rate_text(cell: CellSummary | None) -> str:
    return f"{cell.per_s:.0f}" if cell else "-"


def ratio_text(cell: CellSummary | None, to: CellSummary | None) -> str:
    return f"{cell.per_s / to.per_s:.2f}" if cell and to and to.per_s else "-"


def result_table(layout: Layout, cells: dict[CellKey, CellSummary]) -> str:
    """Throughput, kvconfig's ratios to the baseline and to the other server,
    latencies and the target, row by row."""
    other, rate, with_baseline = layout.other, layout.rate, layout.baseline
    table = [[*layout.columns, f"kvconfig {rate}",
              *([f"baseline {rate}", "vs baseline"] if with_baseline else []),
              f"{other} {rate}", "ratio",
              *(f"{name} p50/p99/max ms" for name in layout.servers()), "target"]]
    for row in layout.rows:
        kvconfig, baseline, rival = (layout.cell(cells, name, row)
                                     for name in (KVCONFIG, BASELINE, other))
        shown = [kvconfig, baseline, rival] if with_baseline else [kvconfig, rival]
        table.append([
            *layout.label(row), rate_text(kvconfig),
            *([rate_text(baseline), ratio_text(kvconfig, baseline)] if with_baseline else []),
            rate_text(rival), ratio_text(kvconfig, rival),
            *(cell.latency_text() if cell else "-" for cell in shown),
            layout.target(kvconfig, rival, row),
        ])
    return format_table(table)


def cpu_table(layout: Layout, cells: dict[CellKey, CellSummary]) -> str:
    """The cores used by each server and by the load generator, row by row."""
    kvconfig_title, other_title = layout.cpu_titles
    titles = [kvconfig_title, *(["baseline server+writer"] if layout.baseline else []),
              other_title]
    table = [[*layout.columns, *titles, "load generator (max)"]]
    for row in layout.rows:
        row_cells = [layout.cell(cells, name, row) for name in layout.servers()]
        generator = max((c.generator_cpu for c in row_cells if c), default=math.nan)
        table.append([*layout.label(row),
                      *(f"{c.server_cpu:.2f}" if c else "-" for c in row_cells),
                      f"{generator:.2f}"])
    return format_table(table)


def baseline_notes(layout: Layout, cells: dict[CellKey, CellSummary]) -> list[str]:
    """kvconfig's throughput against the baseline's over all rows, in a line."""
    ratios = []
    for row in layout.rows:
        kvconfig, base = (layout.cell(cells, name, row) for name in (KVCONFIG, BASELINE))
        if kvconfig and base and kvconfig.per_s and base.per_s:
            ratios.append((kvconfig.per_s / base.per_s, " ".join(layout.label(row))))
    if not layout.baseline or not ratios:
        return []
    lowest, where = min(ratios)
    highest, high_where = max(ratios)
    mean = math.exp(statistics.fmean(math.log(ratio) for ratio, _ in ratios))
    return [f"kvconfig / baseline {layout.rate}: geometric mean {mean:.2f} over {len(ratios)} "
            f"row(s); lowest {lowest:.2f} ({where}), highest {highest:.2f} ({high_where})"]


def print_report(layout: Layout, cells: dict[CellKey, CellSummary], notes: list[str]) -> None:
    """The results table, the CPU table and the notes."""
    print()
    print(result_table(layout, cells))
    print()
    print("CPU use within the time bound, in cores (servers: median over repeats):")
    print(cpu_table(layout, cells))
    print()
    print("\n".join(baseline_notes(layout, cells) + notes))


def throughput_bench(args: argparse.Namespace, names: list[str],
                     header: Callable[[Path], list[str]],
                     command: Callable[[str, Path, int], list[str]],
                     prefill_one: Callable[[Server], None],
                     measure: Callable[[Server, Row], CellRun], layout: Layout,
                     where: Callable[[Row], str],
                     notes: Callable[[dict[CellKey, CellSummary]], list[str]]) -> int:
    """A script that measures cells: its servers running (servers_running),
    each prefilled, every cell measured (run_all), then the report."""
    began = time.monotonic()
    with servers_running(names, header, command) as servers:
        for server in servers:
            prefill_one(server)
        runs = run_all(layout.rows, servers, args.repeat, measure, where, layout.rate)
    cells = summaries(runs)
    print_report(layout, cells, notes(cells))
    footer(began)
    return 0


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
    """The machine, the Python, and the load average now."""
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


def baseline_info(args: argparse.Namespace) -> list[str]:
    """The header's line on the baseline, if one runs."""
    if not getattr(args, "baseline_twistd", None):
        return []
    return [f"  baseline: {args.baseline_twistd} -n kvconfig, the same options as kvconfig "
            "(its own store), taking turns with it"]


def load_average() -> str:
    try:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "?"


def footer(began: float) -> None:
    print(f"load average at end: {load_average()}")
    print(f"total time: {time.monotonic() - began:.0f} s")


# Command line


BASELINE_HELP = (
    "the twistd of another kvconfig install (the code before a change, say: "
    "/work/base/.venv/bin/twistd): that kvconfig runs beside this one and {other}, with the "
    "same options and its own store, taking turns with them in the same repeats; the tables "
    "gain its figures and kvconfig's ratio to it (before and after, side by side)")


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def op_list(known: Iterable[str], fold_case: bool) -> Callable[[str], list[str]]:
    """The argparse type of --ops: a comma-separated list of known ops
    (case-insensitive with fold_case)."""
    known = set(known)

    def parse(text: str) -> list[str]:
        ops = [part.lower() if fold_case else part for part in text.split(",") if part]
        unknown = set(ops) - known
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown op(s): {', '.join(sorted(unknown))}")
        return ops

    return parse


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of a script's docstring."""
    return argparse.ArgumentParser(description=doc.strip().split("\n")[0])


def add_counts(parser: argparse.ArgumentParser, option: str, default: list[int],
               what: str) -> None:
    """A comma-separated list of counts (--clients, --subscribers ...)."""
    parser.add_argument(option, type=int_list, default=default,
                        help=f"{what}, comma-separated (default {','.join(map(str, default))})")


def add_bounds(parser: argparse.ArgumentParser, *, seconds: float, seconds_of: str,
               repeats: str, quick: str) -> None:
    """--seconds (the time bound of seconds_of), --repeat (repeats says of
    what) and --quick (quick says what it does)."""
    parser.add_argument("--seconds", type=float, default=seconds,
                        help=f"time bound of {seconds_of} (default {seconds:g})")
    parser.add_argument("--repeat", type=int, default=3,
                        help=f"runs of {repeats} (default 3)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")


def add_cell_arguments(parser: argparse.ArgumentParser, *, ops: list[str], fold_case: bool,
                       unit: str, max_default: int, other: str) -> None:
    """--ops (default all of ops), --max-<unit>s (default max_default),
    --seconds, --repeat, --quick, --only (kvconfig, other or both) and
    --baseline-twistd."""
    parser.add_argument("--ops", type=op_list(ops, fold_case), default=list(ops),
                        help=f"operations, comma-separated (default {','.join(ops)})")
    parser.add_argument(f"--max-{unit}s", type=int, default=max_default,
                        help=f"{unit} bound of a cell (default {max_default})")
    add_bounds(parser, seconds=3.0, seconds_of="a cell",
               repeats="each cell, the servers taking turns", quick="1 s per cell, 1 repeat")
    parser.add_argument("--only", choices=[KVCONFIG, other, "both"], default="both",
                        help="which server(s) to run (default both)")
    add_baseline_argument(parser, f"the {other} server")


def add_baseline_argument(parser: argparse.ArgumentParser, other: str) -> None:
    parser.add_argument("--baseline-twistd", metavar="PATH",
                        help=BASELINE_HELP.format(other=other))


def server_names(args: argparse.Namespace, other: str) -> list[str]:
    """The servers --only and --baseline-twistd ask for, in the order they take turns."""
    names = [KVCONFIG, other] if args.only == "both" else [args.only]
    if args.baseline_twistd:
        names.insert(1, BASELINE)
    return names


Check = tuple[Callable[[argparse.Namespace], bool], str]  # (is it wrong, the error)


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None, *,
                  quick: dict[str, Any], counts: Iterable[str], positive: list[str],
                  checks: Iterable[Check] = ()) -> argparse.Namespace:
    """Parse; apply --quick (the values it sets); check the lists of counts,
    then the script's own checks, then that the options positive are; make
    --baseline-twistd, if there is one, an absolute path to a program."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    for option in counts:
        values = getattr(args, option[2:].replace("-", "_"))
        if not values or min(values) < 1:
            parser.error(f"{option} must be positive numbers")
    for wrong, message in checks:
        if wrong(args):
            parser.error(message)
    if any(getattr(args, option[2:].replace("-", "_")) <= 0 for option in positive):
        parser.error(f"{', '.join(positive[:-1])} and {positive[-1]} must be positive")
    if getattr(args, "baseline_twistd", None):
        if getattr(args, "only", "both") not in ("both", KVCONFIG):
            parser.error("--baseline-twistd runs beside kvconfig: not with --only "
                         f"{args.only}")
        path = shutil.which(args.baseline_twistd)
        if path is None:
            parser.error(f"--baseline-twistd: no program at {args.baseline_twistd}")
        args.baseline_twistd = os.path.abspath(path)
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally clauses, which stop the servers.
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int]) -> NoReturn:
    """A script's main, with SIGTERM and Ctrl-C ending it through the finally
    clauses that stop its servers."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
