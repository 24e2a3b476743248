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
import functools
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from errno import EINPROGRESS
from pathlib import Path
from xmlrpc.client import Fault, dumps, loads

import benchlib
from benchlib import CellKey, CellRun, CellSummary, Layout, LoadGeneratorBase, Row, Server

SERVERS = ("kvconfig", "stdlib")
TARGET_RATIO = 1.5
TARGET_CLIENTS = (16, 64)
LATENCY_LIMIT_S = 1.0
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


def server_command(name: str, directory: Path) -> Callable[[int], list[str]]:
    """What gives the command line of a server, given its port."""
    if name == "kvconfig":
        return lambda port: benchlib.kvconfig_command(directory, xmlrpc_port=port)
    return reference_command


def reference_command(port: int) -> list[str]:
    return [sys.executable, "-c", REFERENCE_SERVER, str(port)]


# Requests and responses


def bench_items() -> list[tuple[str, object]]:
    """The keys and values saved and loaded: mostly addresses, some small lists."""
    items: list[tuple[str, object]] = []
    for i in range(benchlib.KEY_COUNT):
        address = f"10.0.{i // 250}.{i % 250 + 1}"
        value = [address, "10.0.0.5", 53] if i % 10 == 0 else address
        items.append((f"bench/k{i}", value))
    return items


def http_post(port: int, body: bytes) -> bytes:
    head = (
        f"POST /RPC2 HTTP/1.1\r\n"
        f"Host: {benchlib.HOST}:{port}\r\n"
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


def response_error(response: benchlib.HttpReply, expect_value: bool) -> str | None:
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


class LoadGenerator(LoadGeneratorBase):
    """N clients on one selector, each sending one call at a time, cycling
    through the pre-built requests."""

    def __init__(self, server: Server, requests: list[bytes], clients: int,
                 expect_value: bool) -> None:
        super().__init__(server, [Client() for _ in range(clients)])
        self.address = (benchlib.HOST, server.port)
        self.requests = requests
        self.expect_value = expect_value
        self.next_request = 0
        self.ready: list[Client] = []

    def start_issuing(self) -> None:
        self.ready = list(self.connections)
        self.start_ready_calls()

    def after_events(self) -> None:
        self.start_ready_calls()

    def give_up_unfinished(self) -> None:
        now = time.perf_counter()
        for client in self.connections:
            if client.busy:
                self.result.unfinished.append(now - client.started)
                self.disconnect(client)
                self.finish(client)
        self.ready.clear()

    # Calls

    def start_ready_calls(self) -> None:
        ready, self.ready = self.ready, []
        for client in ready:
            if self.issue_left > 0 and time.perf_counter() < self.stop_issuing_at:
                self.start_call(client)

    def start_call(self, client: Client) -> None:
        self.issue_left -= 1
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

    def complete(self, client: Client, response: benchlib.HttpReply) -> None:
        error = response_error(response, self.expect_value)
        if error is None:
            now = time.perf_counter()
            self.result.latencies.append(now - client.started)
            if self.window_open:
                self.result.good_in_window += 1
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
        sent = self.send_some(client, client.unsent)
        if sent is None:
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
            response = benchlib.parse_http(client.inbox)
        except ValueError as e:
            self.fail(client, f"bad response: {e}")
            return
        if response is not None:
            self.complete(client, response)


# Cells


def measure(args: argparse.Namespace, requests: dict[tuple[str, str], list[bytes]],
            server: Server, row: Row) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    op, clients = row
    generator = LoadGenerator(server, requests[server.name, op], clients,
                              expect_value=(op == "load"))
    return benchlib.run_cell(generator, args.max_calls, args.seconds, "calls", LATENCY_LIMIT_S)


def progress_row(row: Row) -> str:
    op, clients = row
    return f"{op} {clients:>3} clients"


def progress_stats(run: CellRun) -> str:
    return (f"{run.per_s:6.0f} calls/s, p99 {run.p99_ms:7.2f} ms, max {run.max_ms:8.1f} ms, "
            f"{run.unfinished} given up, {sum(run.errors.values())} errors")


# Report


def target_text(kvconfig: CellSummary | None, stdlib: CellSummary | None, row: Row) -> str:
    """Whether a row meets its target, and if not, why: the ratio counts at
    TARGET_CLIENTS clients only."""
    ratio = TARGET_RATIO if row[1] in TARGET_CLIENTS else None
    slow = [f"max>{LATENCY_LIMIT_S:g}s"] if kvconfig and kvconfig.slow else []
    return benchlib.target_text(kvconfig, stdlib, "stdlib", ratio, slow)


def layout(args: argparse.Namespace) -> Layout:
    return Layout(rows=[(op, clients) for op in args.ops for clients in args.clients],
                  columns=["op", "clients"], label=lambda row: [row[0], str(row[1])],
                  other="stdlib", rate="calls/s", target=target_text,
                  cpu_titles=("kvconfig server+writer", "stdlib server"))


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    """Errors and calls slower than the limit, cell by cell."""
    lines = []
    for (name, op, clients), cell in cells.items():
        where = f"{name} {op} {clients} clients"
        if cell.slow:
            given_up = (f", {cell.unfinished} of them given up after "
                        f">= {benchlib.DRAIN_TIMEOUT_S:g} s" if cell.unfinished else "")
            lines.append(f"{where}: {cell.slow} call(s) slower than "
                         f"{LATENCY_LIMIT_S:g} s{given_up}; max >= {cell.max_ms / 1000:.2f} s")
        for error, count in cell.errors.most_common():
            lines.append(f"{where}: {count} error(s): {error}")
    return lines or [f"no errors, no call slower than {LATENCY_LIMIT_S:g} s"]


def header(args: argparse.Namespace, names: list[str], directory: Path) -> list[str]:
    return [
        *benchlib.machine_info(),
        f"servers: {', '.join(names)}, on loopback {benchlib.HOST}",
        (f"  kvconfig: twistd -n kvconfig --store sqlite:<tmp> (durable save), "
         f"HTTP/1.1 keep-alive; store on {benchlib.filesystem_of(directory)}"),
        ("  stdlib:   classic SimpleXMLRPCServer dict store, allow_none=True, "
         "logRequests=False (generous to it: no stderr line per call);"),
        ("            HTTP/1.0, so every call reconnects, and the reconnection counts "
         "in its latency"),
        (f"load: clients {','.join(map(str, args.clients))}, ops {','.join(args.ops)}, "
         f"{benchlib.KEY_COUNT} keys, one call at a time per connection;"),
        (f"  per cell {benchlib.WARMUP_SECONDS:g} s warm-up, then at most {args.max_calls} "
         f"calls and {args.seconds:g} s (calls still running are waited for up to "
         f"{benchlib.DRAIN_TIMEOUT_S:g} s more);"),
        f"  {args.repeat} repeat(s) of each cell, the servers taking turns",
        ("report: calls/s = good calls completed within the time bound / its length; "
         "medians over repeats"),
        ("  of calls/s, p50, p99; max latency over all repeats; "
         f"target: ratio >= {TARGET_RATIO:g} at "
         f"{' and '.join(map(str, TARGET_CLIENTS))} clients, no kvconfig call > "
         f"{LATENCY_LIMIT_S:g} s"),
    ]


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__.strip().split("\n")[0], [1, 16, 64])
    benchlib.add_cell_arguments(parser, ops=["save", "load"], fold_case=False, unit="call",
                                max_default=20000, other="stdlib")
    return benchlib.parse_checked(parser, argv, "call")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, benchlib.exit_on_sigterm)
    names = list(SERVERS) if args.only == "both" else [args.only]
    table = layout(args)
    began = time.monotonic()
    with benchlib.servers_running(names, functools.partial(header, args, names),
                                  server_command) as servers:
        requests = {(server.name, op): build_requests(op, server.port)
                    for server in servers for op in ("save", "load")}
        for server in servers:
            saves = requests[server.name, "save"]
            generator = LoadGenerator(server, saves, benchlib.PREFILL_CLIENTS,
                                      expect_value=False)
            benchlib.prefill(generator, len(saves), "saving", "saved")
        runs = benchlib.run_all(table.rows, servers, args.repeat,
                                functools.partial(measure, args, requests),
                                progress_row, progress_stats)
    cells = benchlib.summaries(runs)
    benchlib.print_report(table, cells, notes(cells))
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
