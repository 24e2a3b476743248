"""
UDP change notifications: kvconfig's fan-out against a plain Python loop.

What it measures
================

kvconfig sends every change under a subscribed prefix to each UDP
subscriber as one datagram (the wire format is in kvconfig.notifier).  This
script measures how long that fan-out takes and whether datagrams are lost,
beside the floor of any Python server: a plain loop of ``socket.sendto``.

* The server: the installed ``twistd -n kvconfig``, a subprocess with its
  sqlite store in a temporary directory (durable, the default) and free
  ports for ``--xmlrpc``, ``--line`` and ``--udp``, all on 127.0.0.1.
* The subscribers: N UDP sockets on 127.0.0.1 (N = 10, 100, 1000 by
  default), all held by one receiver process (this script run with
  ``--receiver``: one epoll, RLIMIT_NOFILE raised as needed).  Each socket
  subscribes to the prefix ``udpbench/`` through the wire format's own
  handshake: a padded ``subscribe``, the server's ``cookie``, a ``subscribe``
  with the cookie, ``subscribed``.  A request not answered within 0.2 s is
  sent again (the server answers at most ``--max-cookie-rate`` cookie
  requests a second), with at most 64 in flight.  Leases are renewed before
  every run (the answer gives each subscription's last ``seq``) and, in a run
  longer than half a lease, during it.  For every event datagram the
  receiver records its socket, ``seq``, ``rev`` and key, and its receipt
  time: ``time.monotonic()`` when it read the datagram, and the kernel's
  arrival timestamp (``SO_TIMESTAMPNS``) moved onto the same clock.
  CLOCK_MONOTONIC is system-wide, so these compare with the writer's times.
* The writer, this script's own process: every ``--interval-ms`` (20 ms) it
  changes the key ``udpbench/key`` (a short JSON string) with ``SET`` over
  the line protocol on a raw socket, up to ``--changes`` (200) changes and
  ``--seconds`` (10 s) a run, recording when it sent each ``SET`` and when it
  read the ``OK <revision>``.  The revision names the change's datagrams.
* The floor, in the same run, the same receiver and the same sockets: this
  process sends the datagrams kvconfig would have sent, on the same schedule
  and of the same size and shape (``sub``, per-subscriber ``seq``, ``rev``,
  key and value), formatting each one and calling ``socket.sendto`` in a
  plain loop over the N addresses.

Per change: kvconfig's write-to-receipt time, from the ``OK`` to the last
subscriber's receipt (it can be negative: the datagrams may arrive before
the ``OK`` is read) and from the ``SET`` sent to the last receipt; its
fan-out spread, from the first receipt to the last; for the plain loop, the
spread measured the same way and the time from the loop's start to the last
receipt.  Lost datagrams: N per change minus those received, counted from
the ``seq`` numbers (each subscription's must run on by one per change).

Each run is checked: every ``SET`` must be answered ``OK``, every datagram
well-formed, under the key, within the run's ``seq`` range and not a
duplicate.  The notes give per N kvconfig's ``SET`` -> ``OK`` time, the
increase of the server's UDP counters (``STATS``: datagrams sent, events
skipped, send errors, renewals ...), the receiver's counts (requests sent
again, heartbeats ...), its lag, and the server log's error lines.

Receipt times are the kernel's arrival timestamps where the kernel gives
them (Linux; on loopback the stamp is taken as the sender's ``sendto``
hands the datagram over): one Python receiver reading 1000 sockets falls
behind now and then (by a few ms at p99), and its read times would then
measure the receiver, not the sender.  The notes give that lag.  ``--clock
read`` uses the read times instead.  The receiver runs without the cyclic
garbage collector (its pauses over a run's records were the worst of that
lag), and so does this process while it writes or loops.

Each N runs a short warm-up, then ``--repeat`` (3) repeats of a kvconfig run
and a plain run, taking turns.  The table gives per N the medians over the
repeats of each run's p50 and p99, the ratio of kvconfig's spread p50 to the
plain loop's, and the datagrams lost in all repeats.  Targets:

* fan-out: kvconfig's spread p50 at most 1.5x the plain loop's at 1000
  subscribers;
* no datagram lost on loopback at 1000 subscribers with a change every 20 ms;
* write-to-receipt (``OK`` to the last receipt) p50 under 1 ms with 10
  subscribers.

How to run it
=============

From the repository, with the project installed in the venv::

    .venv/bin/python bench/udp_bench.py            # full run, about 2 minutes
    .venv/bin/python bench/udp_bench.py --quick    # smoke run
    .venv/bin/python bench/udp_bench.py --help

It runs on loopback only, stops by itself, and stops the server and the
receiver on errors and Ctrl-C.  It is not part of the test run: nothing
imports it and pytest does not collect it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import resource
import select
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
from typing import Any

import benchlib

HOST = benchlib.HOST
PREFIX = "udpbench/"
KEY = "udpbench/key"
PAD_TO = 256  # bytes of a subscribe request: room for the cookie answer
HANDSHAKE_WINDOW = 64  # requests in flight at once
RETRY_S = 0.2  # an unanswered request is sent again after this
HANDSHAKE_S = 60.0  # bound on one handshake pass over every socket
SETTLE_S = 1.0  # after a run, wait at most this for datagrams still due
ACK_TIMEOUT_S = 10.0  # after the last SET, wait at most this for its OK
CONTROL_TIMEOUT_S = 30.0  # a receiver answering a simple command
RECV_BYTES = 65536
# SO_TIMESTAMPNS (also its cmsg type SCM_TIMESTAMPNS) on Linux; not in the socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ANCILLARY_BYTES = socket.CMSG_SPACE(16)  # one struct timespec
EVENT_HEAD = b'{"v":1,"t":"event"'
SIDES = ("kvconfig", "plain")
WARMUP_CHANGES = 20
TARGET_RATIO, TARGET_RATIO_N = 1.5, 1000
TARGET_LOSS_N = 1000
TARGET_LATENCY_MS, TARGET_LATENCY_N = 1.0, 10


def value_bytes(number: int) -> bytes:
    """The value of the number-th change: a short JSON string."""
    return b'"10.0.0.1 change %06d"' % number


# The control pipe between this process and the receiver: length-prefixed pickles
# (both ends are this script).


def send_message(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exactly(fd: int, size: int, deadline: float = math.inf) -> bytes:
    received = bytearray()
    while len(received) < size:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError
        if math.isfinite(wait) and not select.select([fd], [], [], wait)[0]:
            continue
        data = os.read(fd, min(size - len(received), 1 << 20))
        if not data:
            raise EOFError
        received += data
    return bytes(received)


def receive_message(fd: int, deadline: float = math.inf) -> Any:
    (size,) = struct.unpack(">I", read_exactly(fd, 4, deadline))
    return pickle.loads(read_exactly(fd, size, deadline))


# The receiver process


@dataclass(eq=False)
class Subscriber:
    """One of the receiver's sockets and what it knows of its subscription."""

    index: int
    sock: socket.socket
    cookie: str | None = None
    sub: str | None = None  # the subscription's id, once subscribed
    seq: int = 0  # the last seq the server said it had sent
    renewed_at: float = -math.inf
    wants: str | None = None  # the request in flight: "subscribe" or "unsubscribe"
    sent_at: float = 0.0
    error: str | None = None


class Receiver:
    """N subscriber sockets on one epoll, driven by commands on stdin."""

    def __init__(self, server: tuple[str, int], count: int) -> None:
        raise_open_files(count + 64)
        self.server = server
        self.epoll = select.epoll()
        self.subscribers: list[Subscriber] = []
        self.by_fd: dict[int, Subscriber] = {}
        self.kernel_times = True
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST, 0))
            sock.setblocking(False)
            if self.kernel_times:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                except OSError:
                    self.kernel_times = False
            subscriber = Subscriber(index, sock)
            self.subscribers.append(subscriber)
            self.by_fd[sock.fileno()] = subscriber
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.epoll.register(sys.stdin.fileno(), select.EPOLLIN)
        # (socket index, read time, datagram, ancillary data, source port)
        self.events: list[tuple[int, float, bytes, list, int]] = []
        self.counters: Counter = Counter()
        self.lease = 30.0
        self.heartbeat = 2.0

    # Datagrams

    def pump(self, timeout: float) -> bool:
        """Read what has arrived, waiting at most timeout; whether a command
        (or the end of the control pipe) is waiting."""
        command = False
        events, by_fd, now = self.events, self.by_fd, time.monotonic
        for fd, _ in self.epoll.poll(max(timeout, 0)):
            subscriber = by_fd.get(fd)
            if subscriber is None:
                command = True
                continue
            try:
                data, ancillary, _, source = subscriber.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
            except BlockingIOError:
                continue
            except OSError as e:
                self.counters[f"recv error: {e.strerror}"] += 1
                continue
            if data.startswith(EVENT_HEAD):
                events.append((subscriber.index, now(), data, ancillary, source[1]))
            else:
                self.answer(subscriber, data, now())
        return command

    def answer(self, subscriber: Subscriber, data: bytes, now: float) -> None:
        """Handle a datagram that is not an event."""
        try:
            self.handle(subscriber, json.loads(data), now)
        except (ValueError, KeyError, TypeError):
            self.counters["malformed datagrams"] += 1

    def handle(self, subscriber: Subscriber, message: dict[str, Any], now: float) -> None:
        kind = message["t"]
        if kind == "heartbeat":
            self.counters["heartbeats"] += 1
        elif kind == "cookie":
            self.counters["cookies"] += 1
            subscriber.cookie = message["cookie"]
            if subscriber.wants is not None:
                self.request(subscriber, now)
        elif kind == "subscribed":
            if subscriber.sub is not None and subscriber.sub != message["sub"]:
                self.counters["subscriptions lost and made anew"] += 1
            subscriber.sub, subscriber.seq = message["sub"], message["seq"]
            subscriber.renewed_at = now
            self.lease, self.heartbeat = message["lease"], message["heartbeat"]
            if subscriber.wants == "subscribe":
                subscriber.wants = None
        elif kind == "unsubscribed":
            if subscriber.wants == "unsubscribe":
                subscriber.wants = None
                subscriber.sub = None
        elif kind == "error":
            subscriber.error = f"{message['error']}: {message['message']}"
            self.counters[f"refused: {subscriber.error}"] += 1
            subscriber.wants = None
        else:
            self.counters[f"unexpected {kind!r} datagrams"] += 1

    def request(self, subscriber: Subscriber, now: float) -> None:
        """Send the subscriber's request, with its cookie if it has one, padded."""
        body = benchlib.subscription_request(subscriber.wants, PREFIX, subscriber.cookie, PAD_TO)
        try:
            subscriber.sock.sendto(body, self.server)
        except OSError as e:
            self.counters[f"send error: {e.strerror}"] += 1
        subscriber.sent_at = now
        self.counters["requests"] += 1

    # Handshakes

    def handshake(self, kind: str, chosen: list[Subscriber]) -> dict[str, Any]:
        """Send kind ("subscribe", "unsubscribe") for each of chosen, at most
        HANDSHAKE_WINDOW in flight, again when unanswered, for at most HANDSHAKE_S."""
        began = time.monotonic()
        before = self.counters.copy()
        waiting, active = deque(chosen), []
        for subscriber in chosen:
            subscriber.error = None
        while waiting or active:
            now = time.monotonic()
            if now - began > HANDSHAKE_S:
                break
            active = [s for s in active if s.wants is not None]
            while waiting and len(active) < HANDSHAKE_WINDOW:
                subscriber = waiting.popleft()
                subscriber.wants = kind
                self.request(subscriber, now)
                active.append(subscriber)
            for subscriber in active:
                if now - subscriber.sent_at >= RETRY_S:
                    self.counters["requests sent again"] += 1
                    self.request(subscriber, now)
            self.pump(0.005)
        unanswered = [s for s in chosen if s.wants is not None]
        for subscriber in unanswered:
            subscriber.wants = None
        errors = Counter(s.error for s in chosen if s.error is not None)
        return {"seconds": time.monotonic() - began, "unanswered": len(unanswered),
                "errors": dict(errors), "counters": dict(self.counters - before),
                "totals": dict(self.counters),
                "subs": [(s.sub, s.seq) for s in self.subscribers],
                "lease": self.lease, "heartbeat": self.heartbeat}

    def keep_leases(self, now: float) -> None:
        """During a long run: renew leases past half their time, send again
        requests left unanswered, a few at a time."""
        in_flight = 0
        for subscriber in self.subscribers:
            if subscriber.wants is not None:
                in_flight += 1
                if now - subscriber.sent_at >= RETRY_S:
                    self.counters["requests sent again"] += 1
                    self.request(subscriber, now)
        for subscriber in self.subscribers:
            if in_flight >= HANDSHAKE_WINDOW:
                break
            if (subscriber.wants is None and subscriber.sub is not None
                    and now - subscriber.renewed_at >= self.lease / 2):
                subscriber.wants = "subscribe"
                self.counters["renewals during runs"] += 1
                self.request(subscriber, now)
                in_flight += 1

    # Runs

    def collect(self, expect: int, timeout: float) -> dict[str, Any]:
        """Wait until expect event datagrams are in or timeout has passed; the
        events of the run, parsed."""
        deadline = time.monotonic() + timeout
        while len(self.events) < expect and time.monotonic() < deadline:
            self.pump(min(0.05, deadline - time.monotonic()))
        offset = benchlib.realtime_offset_ns()
        records = []
        malformed = 0
        for index, read_at, data, ancillary, port in self.events:
            try:
                message = json.loads(data)
            except ValueError:
                malformed += 1
                continue
            arrived = math.nan
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", cdata[:16])
                    arrived = (seconds * 1_000_000_000 + nanoseconds - offset) / 1e9
            records.append((port, index, message.get("sub"), message.get("seq"),
                            message.get("rev"), message.get("key"), read_at, arrived))
        self.events = []
        return {"records": records, "malformed": malformed}

    def serve(self) -> None:
        """Answer commands until the control pipe closes."""
        control_in, control_out = sys.stdin.fileno(), sys.stdout.fileno()
        send_message(control_out, {"kernel_times": self.kernel_times,
                                   "addresses": [s.sock.getsockname() for s in self.subscribers]})
        next_check = time.monotonic() + 1
        while True:
            if self.pump(max(0.0, next_check - time.monotonic())):
                try:
                    command = receive_message(control_in)
                except EOFError:
                    return
                do = command["do"]
                if do == "subscribe":
                    reply = self.handshake("subscribe",
                                           [s for s in self.subscribers if s.sub is None])
                elif do == "renew":
                    reply = self.handshake("subscribe",
                                           [s for s in self.subscribers if s.sub is not None])
                elif do == "unsubscribe":
                    reply = self.handshake("unsubscribe",
                                           [s for s in self.subscribers if s.sub is not None])
                elif do == "start":
                    self.events = []
                    reply = {}
                elif do == "collect":
                    reply = self.collect(command["expect"], command["timeout"])
                else:
                    reply = {"error": f"unknown command {do!r}"}
                send_message(control_out, reply)
            now = time.monotonic()
            if now >= next_check:
                self.keep_leases(now)
                next_check = now + 1


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"receiver: {needed} open files needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def receiver_main(port: int, count: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench process stops it
    # A run holds a few hundred thousand records: the cyclic collector would
    # stop the receiver for tens of ms scanning them, and it makes no cycles.
    gc.disable()
    receiver = Receiver((HOST, port), count)
    receiver.serve()
    return 0


class ReceiverProcess:
    """The receiver, a child process, as this process sees it."""

    def __init__(self, directory: Path, udp_port: int, count: int) -> None:
        self.log = directory / f"receiver-{count}.stderr"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--receiver",
                 f"{udp_port}:{count}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        hello = self.receive(CONTROL_TIMEOUT_S)
        self.kernel_times: bool = hello["kernel_times"]
        self.addresses: list[tuple[str, int]] = hello["addresses"]

    def call(self, wait: float = CONTROL_TIMEOUT_S, **command: Any) -> dict[str, Any]:
        """Send a command; its answer, within wait seconds."""
        try:
            send_message(self.process.stdin.fileno(), command)
        except BrokenPipeError:
            self.died()
        return self.receive(wait)

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            return receive_message(self.process.stdout.fileno(), time.monotonic() + timeout)
        except EOFError:
            self.died()
        except TimeoutError:
            raise RuntimeError(f"the receiver did not answer within {timeout:g} s") from None

    def died(self) -> None:
        self.process.wait(timeout=5)
        raise RuntimeError(f"the receiver exited with {self.process.returncode}:\n"
                           f"{benchlib.read_log(self.log)}")

    def close(self) -> None:
        """Stop it at once: it keeps nothing (its subscriptions end with their
        leases if they were not ended before)."""
        self.process.stdin.close()
        benchlib.stop(self.process)
        self.process.stdout.close()


@contextmanager
def receiver_running(directory: Path, udp_port: int, count: int) -> Iterator[ReceiverProcess]:
    receiver = ReceiverProcess(directory, udp_port, count)
    try:
        yield receiver
    finally:
        receiver.close()


# The writer and the plain loop


@dataclass
class Sent:
    """What one run sent: per change, its revision and times (monotonic s)."""

    changes: list[tuple[int, float, float]] = field(default_factory=list)
    # kvconfig: (revision, SET sent, OK read); plain: (revision, loop start, loop end)
    unanswered: int = 0
    errors: Counter = field(default_factory=Counter)


class Writer:
    """The line-protocol connection that makes the changes, and reads STATS."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = bytearray()
        greeting = self.read_line(time.monotonic() + 10)
        if not greeting.startswith(b"HELLO "):
            raise RuntimeError(f"kvconfig greeted with {greeting[:80]!r}")
        self.changes_made = 0
        self.revision = int(greeting.split()[4])

    def close(self) -> None:
        self.sock.close()

    def read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.inbox:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self.sock], [], [], wait)[0]:
                raise RuntimeError("kvconfig did not answer in time")
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("kvconfig closed the line-protocol connection")
            self.inbox += data
        line, _, rest = bytes(self.inbox).partition(b"\n")
        self.inbox[:] = rest
        return line.rstrip(b"\r")

    def stats(self) -> dict[str, Any]:
        self.sock.sendall(b"STATS\r\n")
        stats, deadline = {}, time.monotonic() + 10
        while (line := self.read_line(deadline)) != b"END":
            _, name, value = line.decode().split(" ", 2)
            stats[name] = json.loads(value)
        return stats

    def run(self, count: int, interval: float, seconds: float) -> Sent:
        """Up to count SETs of KEY, one every interval, for at most seconds;
        then wait for the OKs still due."""
        sent, result, in_flight = 0, Sent(), deque()
        start = time.monotonic()
        stop_at, give_up_at = start + seconds, math.inf
        while True:
            now = time.monotonic()
            if sent < count and now < stop_at:
                due = start + sent * interval
                if now >= due:
                    self.changes_made += 1
                    line = b"SET %s %s\r\n" % (KEY.encode(), value_bytes(self.changes_made))
                    in_flight.append(time.monotonic())
                    self.sock.sendall(line)
                    sent += 1
                    continue
                wake = due
            elif not in_flight:
                break
            else:
                give_up_at = min(give_up_at, now + ACK_TIMEOUT_S)
                if now >= give_up_at:
                    result.unanswered = len(in_flight)
                    break
                wake = give_up_at
            if not select.select([self.sock], [], [], max(0.0, wake - now))[0]:
                continue
            data = self.sock.recv(65536)
            answered = time.monotonic()
            if not data:
                raise RuntimeError("kvconfig closed the line-protocol connection")
            self.inbox += data
            *lines, rest = bytes(self.inbox).split(b"\n")
            self.inbox[:] = rest
            for line in lines:
                line = line.rstrip(b"\r")
                if not in_flight:
                    result.errors[f"unexpected line {line[:60]!r}"] += 1
                    continue
                sent_at = in_flight.popleft()
                if line.startswith(b"OK "):
                    self.revision = int(line.split()[1])
                    result.changes.append((self.revision, sent_at, answered))
                else:
                    result.errors[line.decode("utf-8", "replace")[:80]] += 1
        return result


def plain_run(sock: socket.socket, addresses: list[tuple[str, int]],
              subs: list[tuple[str, int]], first_revision: int, first_value: int,
              count: int, interval: float, seconds: float) -> Sent:
    """The floor: the datagrams kvconfig would send for count changes, one
    change every interval, each to every address in a plain sendto loop."""
    result = Sent()
    ids = [sub.encode() for sub, _ in subs]
    seqs = [seq for _, seq in subs]
    key = json.dumps(KEY).encode()
    start = time.monotonic()
    for number in range(count):
        due = start + number * interval
        now = time.monotonic()
        if now >= start + seconds:
            break
        if due > now:
            time.sleep(due - now)
        revision = first_revision + number
        tail = b',"rev":%d,"op":"put","key":%s,"value":%s}' % (
            revision, key, value_bytes(first_value + number))
        began = time.monotonic()
        for i, address in enumerate(addresses):
            seqs[i] += 1
            try:
                sock.sendto(b'{"v":1,"t":"event","sub":"%s","seq":%d%s' % (ids[i], seqs[i], tail),
                            address)
            except OSError as e:
                result.errors[f"sendto: {e.strerror}"] += 1
        result.changes.append((revision, began, time.monotonic()))
    return result


# Analysis


@dataclass
class Run:
    """One measured run of one side; times in ms."""

    latency: list[float]  # kvconfig: OK -> last receipt; plain: loop start -> last receipt
    from_sent: list[float]  # kvconfig: SET sent -> last receipt; plain: loop time
    spread: list[float]  # first receipt -> last receipt
    ack: list[float]  # kvconfig: SET sent -> OK read; plain: nothing
    expected: int  # datagrams
    lost: int
    extra: int  # duplicates, or outside the run's seq range
    lag: list[float]  # receiver's read time - kernel arrival time, per datagram
    errors: Counter


def analyse(side: str, sent: Sent, received: dict[str, Any], subs: list[tuple[str, int]],
            server_port: int, use_kernel: bool) -> Run:
    """The figures of one run from what was sent and what the receiver got.
    subs holds each socket's (sub, last seq) before the run."""
    count = len(sent.changes)
    wanted = {revision for revision, _, _ in sent.changes}
    by_revision: dict[int, list[float]] = {}
    seen: list[set[int]] = [set() for _ in subs]
    extra, lag = 0, []
    for port, index, _, seq, revision, key, read_at, arrived in received["records"]:
        if (port == server_port) != (side == "kvconfig"):
            continue
        if key != KEY or revision not in wanted:
            extra += 1
            continue
        base = subs[index][1]
        if type(seq) is not int or not base < seq <= base + count or seq in seen[index]:
            extra += 1
            continue
        seen[index].add(seq)
        if not math.isnan(arrived):
            lag.append((read_at - arrived) * 1000)
        at = arrived if use_kernel and not math.isnan(arrived) else read_at
        by_revision.setdefault(revision, []).append(at)
    latency, from_sent, spread = [], [], []
    for revision, began, ended in sent.changes:
        times = by_revision.get(revision)
        if not times:
            continue
        first, last = min(times), max(times)
        spread.append((last - first) * 1000)
        if side == "kvconfig":
            latency.append((last - ended) * 1000)
            from_sent.append((last - began) * 1000)
        else:
            latency.append((last - began) * 1000)
            from_sent.append((ended - began) * 1000)
    expected = count * len(subs)
    errors = sent.errors.copy()
    if sent.unanswered:
        errors[f"SET unanswered after {ACK_TIMEOUT_S:g} s"] += sent.unanswered
    if received["malformed"]:
        errors["malformed event datagrams"] += received["malformed"]
    ack = [(ended - began) * 1000 for _, began, ended in sent.changes] if side == "kvconfig" else []
    return Run(latency=sorted(latency), from_sent=sorted(from_sent), spread=sorted(spread),
               ack=sorted(ack), expected=expected, lost=expected - sum(map(len, seen)), extra=extra,
               lag=sorted(lag), errors=errors)


def p(values: list[float], fraction: float) -> float:
    return benchlib.percentile(values, fraction)


def median_of(runs: list[Run], what: Callable[[Run], list[float]], fraction: float) -> float:
    figures = [p(what(run), fraction) for run in runs]
    figures = [f for f in figures if not math.isnan(f)]
    return statistics.median(figures) if figures else math.nan


def run_text(side: str, run: Run) -> str:
    what = "OK->last" if side == "kvconfig" else "start->last"
    return (f"{what} p50/p99 {p(run.latency, .5):7.3f}/{p(run.latency, .99):7.3f} ms, "
            f"spread p50/p99 {p(run.spread, .5):6.3f}/{p(run.spread, .99):6.3f} ms, "
            f"lost {run.lost}/{run.expected}, extra {run.extra}, "
            f"errors {sum(run.errors.values())}")


# Report


def pair(low: float, high: float) -> str:
    return f"{low:.3f}/{high:.3f}"


def target_text(count: int, kvconfig: list[Run], plain: list[Run]) -> str:
    failures, checked = [], False
    if count == TARGET_RATIO_N:
        checked = True
        ratio = median_of(kvconfig, lambda r: r.spread, .5) / median_of(plain, lambda r: r.spread,
                                                                         .5)
        if not ratio <= TARGET_RATIO:
            failures.append(f"ratio>{TARGET_RATIO:g}")
    if count == TARGET_LOSS_N:
        checked = True
        if sum(r.lost for r in kvconfig):
            failures.append("loss")
    if count == TARGET_LATENCY_N:
        checked = True
        if not median_of(kvconfig, lambda r: r.latency, .5) < TARGET_LATENCY_MS:
            failures.append(f"p50>={TARGET_LATENCY_MS:g}ms")
    if any(r.errors for r in kvconfig):
        failures.append("errors")
    if failures:
        return f"NO ({', '.join(failures)})"
    return "yes" if checked else "-"


def result_table(counts: list[int], runs: dict[tuple[int, str], list[Run]]) -> str:
    rows = [["subscribers", "kv OK->last", "kv SET->last", "kv spread", "plain spread",
             "plain start->last", "ratio", "kv lost", "plain lost", "target"]]
    for count in counts:
        kvconfig, plain = runs.get((count, "kvconfig")), runs.get((count, "plain"))
        if not kvconfig or not plain:
            continue

        def medians(side: list[Run], what: Callable[[Run], list[float]]) -> str:
            return pair(median_of(side, what, .5), median_of(side, what, .99))

        ratio = (median_of(kvconfig, lambda r: r.spread, .5)
                 / median_of(plain, lambda r: r.spread, .5))
        rows.append([
            str(count),
            medians(kvconfig, lambda r: r.latency),
            medians(kvconfig, lambda r: r.from_sent),
            medians(kvconfig, lambda r: r.spread),
            medians(plain, lambda r: r.spread),
            medians(plain, lambda r: r.latency),
            f"{ratio:.2f}",
            f"{sum(r.lost for r in kvconfig)}/{sum(r.expected for r in kvconfig)}",
            f"{sum(r.lost for r in plain)}/{sum(r.expected for r in plain)}",
            target_text(count, kvconfig, plain),
        ])
    return benchlib.format_table(rows)


def header(args: argparse.Namespace, directory: Path) -> list[str]:
    clock = "kernel arrival (SO_TIMESTAMPNS)" if args.clock == "kernel" else "receiver read"
    return [
        *benchlib.machine_info(),
        f"load average at start: {benchlib.load_average()} (other work on the machine adds noise)",
        (f"server: twistd -n kvconfig --store sqlite:<tmp> on "
         f"{benchlib.filesystem_of(directory)}, --udp/--line/--xmlrpc on free ports of "
         f"{HOST}; a SET is answered once committed (WAL, synchronous=FULL)"),
        (f"subscribers: {','.join(map(str, args.subscribers))} UDP sockets in one receiver "
         f"process (epoll), each subscribed to {PREFIX!r} by the cookie handshake"),
        (f"load: per run up to {args.changes} changes of {KEY!r}, one every "
         f"{args.interval_ms:g} ms, for at most {args.seconds:g} s (line protocol SET); the "
         "plain loop sends"),
        ("  the same datagrams with socket.sendto from this process; "
         f"{args.repeat} repeat(s) of each, kvconfig and plain taking turns, after a "
         f"{WARMUP_CHANGES}-change warm-up"),
        (f"receipt times: {clock} times on CLOCK_MONOTONIC; times are p50/p99 in ms, "
         "medians over repeats of each run's;"),
        ("  kv = kvconfig, ratio = kv spread p50 / plain spread p50, lost = datagrams lost / "
         "sent in all repeats;"),
        (f"  target: spread ratio <= {TARGET_RATIO:g} and no loss at {TARGET_RATIO_N}, "
         f"OK->last p50 < {TARGET_LATENCY_MS:g} ms at {TARGET_LATENCY_N}"),
    ]


UDP_COUNTERS = ("datagrams_sent", "events_skipped", "send_errors", "heartbeats_sent",
                "cookies_sent", "cookies_withheld", "subscribes", "renewals", "unsubscribes",
                "expired", "refused")


def server_notes(count: int, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What the server's STATS say happened on its UDP side while count
    subscribers were measured."""
    changed = {name: after[name] - before.get(name, 0) for name in after
               if name.startswith("udp_") and isinstance(after[name], int)
               and after[name] != before.get(name, 0)}
    if not changed:
        return [f"{count} subscribers: the server's STATS have no UDP counters"]
    parts = [f"{name[4:]} {value}" for name, value in changed.items()]
    lines = [f"{count} subscribers, server STATS (increase): {', '.join(parts)}"]
    for bad in ("udp_events_skipped", "udp_send_errors", "udp_expired", "udp_refused"):
        if changed.get(bad):
            lines.append(f"  the server counted {changed[bad]} {bad[4:].replace('_', ' ')}")
    return lines


def log_problems(directory: Path) -> list[str]:
    """The lines of the server's log and stderr that speak of errors (at most 20)."""
    marks = ("#warn]", "#error]", "#critical]", "Traceback", "Unhandled")
    problems = []
    for name in ("twistd.log", "kvconfig.stderr"):
        log = directory / name
        if log.exists():
            problems += [f"server {name}: {line[:200]}"
                         for line in log.read_text(errors="replace").splitlines()
                         if any(mark in line for mark in marks)]
    return problems[:20] or ["server log: no warnings, errors or tracebacks"]


# Main


def measure(count: int, args: argparse.Namespace, directory: Path, udp_port: int,
            writer: Writer, plain_sock: socket.socket, runs: dict[tuple[int, str], list[Run]],
            notes: list[str]) -> None:
    """Subscribe count sockets, warm up, run the repeats, unsubscribe."""
    interval = args.interval_ms / 1000
    with receiver_running(directory, udp_port, count) as receiver:
        if not receiver.kernel_times and args.clock == "kernel":
            notes.append(f"{count} subscribers: no kernel timestamps; read times used")
        reply = receiver.call(HANDSHAKE_S + CONTROL_TIMEOUT_S, do="subscribe")
        subscribed = sum(1 for sub, _ in reply["subs"] if sub is not None)
        benchlib.progress(
            f"{count} subscribers: {subscribed} subscribed in {reply['seconds']:.2f} s "
            f"(lease {reply['lease']} s, heartbeat {reply['heartbeat']} s; "
            f"{dict(reply['counters'])})")
        if reply["errors"]:
            notes.append(f"{count} subscribers: subscribe refused: {reply['errors']}")
        if subscribed < count:
            raise RuntimeError(f"only {subscribed} of {count} sockets subscribed in "
                               f"{HANDSHAKE_S:g} s: {reply}")
        stats_before = writer.stats()
        lag: list[float] = []

        def one(side: str, changes: int) -> Run:
            renewed = receiver.call(HANDSHAKE_S + CONTROL_TIMEOUT_S, do="renew")
            if renewed["unanswered"] or renewed["errors"]:
                notes.append(f"{count} subscribers: renewal: {renewed['unanswered']} "
                             f"unanswered, errors {renewed['errors']}")
            subs = renewed["subs"]
            receiver.call(do="start")
            gc.collect()
            gc.disable()  # no pause of this process's own in the measured part
            try:
                if side == "kvconfig":
                    sent = writer.run(changes, interval, args.seconds)
                else:
                    sent = plain_run(plain_sock, receiver.addresses, subs, writer.revision + 1,
                                     writer.changes_made + 1, changes, interval, args.seconds)
                    writer.changes_made += len(sent.changes)
            finally:
                gc.enable()
            got = receiver.call(SETTLE_S + CONTROL_TIMEOUT_S, do="collect",
                                expect=len(sent.changes) * count, timeout=SETTLE_S)
            return analyse(side, sent, got, subs, udp_port, args.clock == "kernel")

        for side in SIDES:
            one(side, WARMUP_CHANGES)
        for i in range(args.repeat):
            for side in SIDES:
                run = one(side, args.changes)
                runs.setdefault((count, side), []).append(run)
                lag.extend(run.lag)
                benchlib.progress(f"  {count:>4} subscribers {side:<8} run {i + 1}/{args.repeat}: "
                                  f"{run_text(side, run)}")
                for error, times in run.errors.items():
                    notes.append(f"{count} subscribers, {side}: {times} x {error}")
        stats_after = writer.stats()
        reply = receiver.call(HANDSHAKE_S + CONTROL_TIMEOUT_S, do="unsubscribe")
        left = sum(1 for sub, _ in reply["subs"] if sub is not None)
        if left:
            notes.append(f"{count} subscribers: {left} not unsubscribed (their leases run out)")
        notes.append(f"{count} subscribers, the receiver's counts: {reply['totals']}")
        kvconfig = runs[count, "kvconfig"]
        early = sum(1 for run in kvconfig for t in run.latency if t < 0)
        notes.append(f"{count} subscribers: kvconfig SET->OK p50/p99 "
                     f"{median_of(kvconfig, lambda r: r.ack, .5):.3f}/"
                     f"{median_of(kvconfig, lambda r: r.ack, .99):.3f} ms; the last datagram "
                     f"arrived before the OK was read for {early} of "
                     f"{sum(len(run.latency) for run in kvconfig)} changes")
        notes.extend(server_notes(count, stats_before, stats_after))
        if lag:
            lag.sort()
            notes.append(f"{count} subscribers: receiver lag (read - kernel arrival) "
                         f"p50/p99/max {p(lag, .5):.3f}/{p(lag, .99):.3f}/{lag[-1]:.3f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--subscribers", type=benchlib.int_list, default=[10, 100, 1000],
                        help="subscriber counts, comma-separated (default 10,100,1000)")
    parser.add_argument("--changes", type=int, default=200,
                        help="changes per run (default 200)")
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="milliseconds between changes (default 20)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="time bound of a run (default 10)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each side per subscriber count, taking turns (default 3)")
    parser.add_argument("--clock", choices=["kernel", "read"], default="kernel",
                        help=("receipt times: the kernel's arrival timestamps (default) or "
                              "the receiver's read times"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 50 changes a run, 1 repeat")
    parser.add_argument("--receiver", metavar="PORT:COUNT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver:
        return args
    if args.quick:
        args.changes, args.repeat = 50, 1
    if not args.subscribers or min(args.subscribers) < 1:
        parser.error("--subscribers must be positive numbers")
    if args.changes < 1 or args.repeat < 1 or args.seconds <= 0 or args.interval_ms <= 0:
        parser.error("--changes, --repeat, --seconds and --interval-ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.receiver:
        port, count = args.receiver.split(":")
        return receiver_main(int(port), int(count))
    signal.signal(signal.SIGTERM, benchlib.exit_on_sigterm)
    began = time.monotonic()
    runs: dict[tuple[int, str], list[Run]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kvbench-") as name:
        directory = Path(name)
        print("\n".join(header(args, directory)), flush=True)
        udp_port = benchlib.free_port(socket.SOCK_DGRAM)
        with ExitStack() as stack:
            server = stack.enter_context(benchlib.running_server(
                "kvconfig", directory,
                lambda port: benchlib.kvconfig_command(
                    directory, xmlrpc_port=benchlib.free_port(), line_port=port,
                    udp_port=udp_port)))
            writer = Writer(server.port)
            stack.callback(writer.close)
            plain_sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            plain_sock.bind((HOST, 0))
            for count in args.subscribers:
                measure(count, args, directory, udp_port, writer, plain_sock, runs, notes)
        notes.extend(log_problems(directory))  # the server has stopped: its whole log
    print()
    print(result_table(args.subscribers, runs))
    print()
    print("\n".join(notes or ["no notes"]))
    print(f"load average at end: {benchlib.load_average()}")
    print(f"total time: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
