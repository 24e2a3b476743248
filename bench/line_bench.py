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
import functools
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import CellKey, CellRun, CellSummary, Layout, LoadGeneratorBase, Row, Server

SERVERS = ("kvconfig", "redis")
TARGET_RATIO = 0.5
CONNECT_TIMEOUT_S = 10.0
PREFILL_DEPTH = 16
RECV_BYTES = 262144
BUSY_GENERATOR = 0.9  # cores: above this the load generator may be the bottleneck


# Servers


def server_command(name: str, directory: Path) -> Callable[[int], list[str]]:
    """What gives the command line of a server, given its port."""
    if name == "kvconfig":
        return lambda port: benchlib.kvconfig_command(directory, line_port=port)
    return functools.partial(redis_command, directory)


def redis_command(directory: Path, port: int) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", benchlib.HOST, "--dir", str(directory),
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


# Requests and replies


def bench_items() -> list[tuple[bytes, bytes]]:
    """The keys and their values: short JSON strings (addresses), as bytes."""
    return [(f"bench/k{i}".encode(), f'"10.0.{i // 250}.{i % 250 + 1}"'.encode())
            for i in range(benchlib.KEY_COUNT)]


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


class LoadGenerator(LoadGeneratorBase):
    """N connections on one selector, each keeping depth requests in flight,
    cycling through the pre-built requests."""

    def __init__(self, server: Server, requests: list[bytes], parse: Parser,
                 clients: int, depth: int) -> None:
        super().__init__(server, [Connection() for _ in range(clients)])
        self.requests = requests
        self.parse = parse
        self.depth = depth
        self.greeting = server.name == "kvconfig"
        self.next_request = 0

    def before_run(self) -> None:
        self.connect_all()

    def start_issuing(self) -> None:
        for connection in self.connections:
            if connection.sock is not None:
                self.issue(connection, self.depth, time.perf_counter())

    def on_event(self, connection: Connection, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self.receive(connection)
        if mask & selectors.EVENT_WRITE and connection.sock is not None:
            self.flush(connection)

    def most_in_flight(self) -> int:
        return len(self.connections) * self.depth

    def give_up_unfinished(self) -> None:
        now = time.perf_counter()
        for connection in self.connections:
            if connection.sent:
                self.result.unfinished.extend(now - t for t in connection.sent)
                self.in_flight -= len(connection.sent)
                connection.sent.clear()
                self.disconnect(connection)  # its late replies must not be read as new ones

    # Connections

    def connect_all(self) -> None:
        """(Re)connect every connection that has no socket; read kvconfig's greeting."""
        for connection in self.connections:
            if connection.sock is None:
                self.connect(connection)

    def connect(self, connection: Connection) -> None:
        sock = socket.create_connection((benchlib.HOST, self.server.port),
                                        timeout=CONNECT_TIMEOUT_S)
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
        count = min(count, self.issue_left)
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
        self.issue_left -= count
        self.in_flight += count
        self.flush(connection)

    def flush(self, connection: Connection) -> None:
        if connection.unsent:
            done = self.send_some(connection, connection.unsent)
            if done is None:
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
            result.good_in_window += count - len(bad)
        self.issue(connection, count, now)


# Cells


def measure(args: argparse.Namespace, server: Server, row: Row) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    op, clients, depth = row
    generator = LoadGenerator(server, build_requests(server.name, op),
                              parser_for(server.name, op), clients, depth)
    return benchlib.run_cell(generator, args.max_ops, args.seconds, "requests")


def progress_row(row: Row) -> str:
    op, clients, depth = row
    return f"{op} {clients:>3} clients depth {depth:>2}"


def progress_stats(run: CellRun) -> str:
    return (f"{run.per_s:7.0f} ops/s, p99 {run.p99_ms:7.2f} ms, max {run.max_ms:8.1f} ms, "
            f"{run.unfinished} given up, {sum(run.errors.values())} errors, "
            f"cpu server {run.server_cpu:.2f} generator {run.generator_cpu:.2f}")


# Report


def target_text(kvconfig: CellSummary | None, redis: CellSummary | None, _row: Row) -> str:
    """Whether a row meets its target (the same on every row), and if not, why."""
    given_up = ["given up"] if kvconfig and kvconfig.unfinished else []
    return benchlib.target_text(kvconfig, redis, "redis", TARGET_RATIO, given_up)


def layout(args: argparse.Namespace) -> Layout:
    return Layout(rows=[(op, clients, depth) for op in args.ops for clients in args.clients
                        for depth in args.depths],
                  columns=["op", "clients", "depth"],
                  label=lambda row: [row[0].upper(), str(row[1]), str(row[2])],
                  other="redis", rate="ops/s", target=target_text,
                  cpu_titles=("kvconfig server+writer", "redis server"))


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    """Errors, requests given up and a busy load generator, cell by cell."""
    lines = []
    for (name, op, clients, depth), cell in cells.items():
        where = f"{name} {op.upper()} {clients} clients depth {depth}"
        if cell.unfinished:
            lines.append(f"{where}: {cell.unfinished} request(s) given up after "
                         f">= {benchlib.DRAIN_TIMEOUT_S:g} s")
        for error, count in cell.errors.most_common():
            lines.append(f"{where}: {count} error(s): {error}")
        if cell.generator_cpu > BUSY_GENERATOR:
            lines.append(f"{where}: the load generator used {cell.generator_cpu:.2f} cores; "
                         "this cell may measure the generator more than the server")
    return lines or ["no errors, no request given up, the load generator never near "
                     "a full core"]


def header(args: argparse.Namespace, names: list[str], directory: Path,
           redis: str) -> list[str]:
    fsync = "both fsync" if len(names) > 1 else "it fsyncs"
    lines = [
        *benchlib.machine_info(),
        f"load average at start: {benchlib.load_average()} (other work on the machine adds noise)",
        f"redis: {redis}",
        (f"servers: {', '.join(names)}, on loopback {benchlib.HOST}; {fsync} every acknowledged "
         f"write; store{'s' if len(names) > 1 else ''} on {benchlib.filesystem_of(directory)}"),
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
         f"{','.join(map(str, args.depths))}, {benchlib.KEY_COUNT} keys, "
         "short JSON string values;"),
        ("  one Python thread for both servers (selectors, pre-built requests); latency "
         "from a request's send to its reply"),
        (f"  per cell {benchlib.WARMUP_SECONDS:g} s warm-up, then at most {args.max_ops} ops and "
         f"{args.seconds:g} s (replies still due are waited for up to "
         f"{benchlib.DRAIN_TIMEOUT_S:g} s more);"),
        f"  {args.repeat} repeat(s) of each cell, the servers taking turns",
        ("report: ops/s = good replies within the time bound / its length; medians over "
         "repeats of ops/s, p50, p99;"),
        (f"  max latency over all repeats; target: kvconfig ops/s >= {TARGET_RATIO:g} x "
         "redis on every row, no errors"),
    ]


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__.strip().split("\n")[0], [1, 50])
    parser.add_argument("--depths", type=benchlib.int_list, default=[1, 16],
                        help="requests in flight per client, comma-separated (default 1,16)")
    benchlib.add_cell_arguments(parser, ops=["set", "get"], fold_case=True, unit="op",
                                max_default=50000, other="redis")
    return benchlib.parse_checked(parser, argv, "op", [
        (lambda args: not args.depths or min(args.depths) < 1,
         "--depths must be positive numbers"),
        (lambda args: not args.ops, "--ops needs at least one of set, get"),
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, benchlib.exit_on_sigterm)
    names = list(SERVERS) if args.only == "both" else [args.only]
    table = layout(args)
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
    with benchlib.servers_running(names, functools.partial(header, args, names, redis=redis),
                                  server_command) as servers:
        for server in servers:
            generator = LoadGenerator(server, build_requests(server.name, "set"),
                                      parser_for(server.name, "set"),
                                      benchlib.PREFILL_CLIENTS, PREFILL_DEPTH)
            benchlib.prefill(generator, benchlib.KEY_COUNT, "setting", "set")
        runs = benchlib.run_all(table.rows, servers, args.repeat,
                                functools.partial(measure, args), progress_row, progress_stats)
    cells = benchlib.summaries(runs)
    benchlib.print_report(table, cells, notes(cells))
    print(f"load average at end: {benchlib.load_average()}")
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
