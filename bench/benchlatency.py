"""
What the benches that time change notifications share.

``udp_bench.py`` (kvconfig's UDP fan-out against a plain ``sendto`` loop) and
``cluster_bench.py`` (a write through node A to node B's UDP subscribers,
against etcd's own watch) both write a key on a schedule and time each write
until its receipt by subscribers.  This module holds that part, once:

* receipt times: the kernel's arrival timestamps (``SO_TIMESTAMPNS``) moved
  onto CLOCK_MONOTONIC, which is system-wide, so that they compare with the
  writer's times in any process;
* the pump: one epoll over the sockets of a run, each a channel whose
  ``on_readable(now)`` reads what has arrived, once per readiness;
* UDP subscribers (:class:`Subscribers`): N sockets, each subscribed to a
  prefix on one or more kvconfig servers through the wire format's own
  handshake (a padded ``subscribe``, the server's ``cookie``, a ``subscribe``
  with the cookie, ``subscribed``; unanswered requests sent again, at most
  HANDSHAKE_WINDOW in flight), leases renewed, and every event datagram
  recorded with its read time, ancillary data and sender;
* timed writes: a writer channel (:class:`LineWriter`, kvconfig's line
  protocol; a script may add its own) and the schedule of a run, one write
  every interval, pipelined or one at a time, each answer timed (:class:`Sent`);
* the analysis of a run (:func:`timing`): per write, its answer, each receipt,
  the last, the spread from first to last, loss and extras (:class:`Timing`),
  and medians of those over repeats.

Like benchlib, it is imported by the scripts run from this folder; it is not
part of the test run and is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import select
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import benchlib
from benchlib import HOST, RECV_BYTES

# SO_TIMESTAMPNS (also its cmsg type SCM_TIMESTAMPNS) on Linux; not in the socket module.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ANCILLARY_BYTES = socket.CMSG_SPACE(16)  # one struct timespec
EVENT_HEAD = b'{"v":1,"t":"event"'
PAD_TO = 256  # bytes of a subscribe request: room for the cookie answer
HANDSHAKE_WINDOW = 64  # requests in flight at once
RETRY_S = 0.2  # an unanswered request is sent again after this
ACK_TIMEOUT_S = 10.0  # a write unanswered after this ends its run
SETTLE_S = 1.0  # after a run, wait at most this for receipts still due

Address = tuple[str, int]


# Receipt times


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: the kernel stamps
    datagrams in the first; the best of a few readings."""
    best = None
    for _ in range(5):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, real - (before + after) // 2)
    return best[1]


def arrival_time(ancillary: list, offset_ns: int) -> float:
    """The kernel's arrival timestamp in a datagram's ancillary data, in
    monotonic seconds; nan if there is none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            return (seconds * 1_000_000_000 + nanoseconds - offset_ns) / 1e9
    return math.nan


def decoded(records: Iterable[tuple]) -> Iterator[tuple[int, int, Any, float, float]]:
    """(socket index, sender's port, the message or None if it is malformed,
    read time, kernel arrival time or nan) of recorded event datagrams."""
    offset = realtime_offset_ns()
    for index, read_at, data, ancillary, port in records:
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        yield index, port, message, read_at, arrival_time(ancillary, offset)


# The pump


class Pump:
    """One epoll over the sockets of a run; a channel has .sock (or is added
    with its fd) and on_readable(now), called once each time it is readable."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.channels: dict[int, Any] = {}

    def add(self, channel: Any, fd: int | None = None) -> None:
        fd = channel.sock.fileno() if fd is None else fd
        self.epoll.register(fd, select.EPOLLIN)
        self.channels[fd] = channel

    def remove(self, channel: Any) -> None:
        fd = channel.sock.fileno()
        self.epoll.unregister(fd)
        del self.channels[fd]

    def pump(self, timeout: float) -> None:
        channels, now = self.channels, time.monotonic
        for fd, _ in self.epoll.poll(max(timeout, 0.0)):
            channel = channels.get(fd)
            if channel is not None:
                channel.on_readable(now())

    def pump_until(self, done: Callable[[], bool], seconds: float) -> bool:
        """Pump until done() or seconds have passed; whether done()."""
        deadline = time.monotonic() + seconds
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(left)
        return True

    def close(self) -> None:
        self.epoll.close()


# UDP subscribers


def subscription_request(kind: str, prefix: str, cookie: str | None, pad_to: int = PAD_TO) -> bytes:
    """A notifier request datagram (kind: subscribe or unsubscribe), with the
    cookie if there is one, padded to pad_to bytes: the server answers an
    unproven address only with a cookie no larger than the request."""
    message: dict[str, Any] = {"v": 1, "t": kind, "prefix": prefix}
    if cookie is not None:
        message["cookie"] = cookie
    message["pad"] = ""
    body = json.dumps(message, separators=(",", ":")).encode()
    return body[:-2] + b"x" * max(0, pad_to - len(body)) + b'"}'


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"{needed} open files needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass(eq=False)
class Subscription:
    """One socket's subscription on one server, as the socket knows it."""

    sock: socket.socket
    server: Address
    cookie: str | None = None
    sub: str | None = None  # the subscription's id, once subscribed
    seq: int = 0  # the last seq the server said it had sent
    renewed_at: float = -math.inf
    wants: str | None = None  # the request in flight: "subscribe" or "unsubscribe"
    sent_at: float = 0.0
    error: str | None = None


class SubscriberSocket:
    """One socket of a Subscribers group, a channel of its pump: an event
    datagram is recorded, another goes to the subscription of its sender."""

    def __init__(self, index: int, group: Subscribers, servers: list[Address]) -> None:
        self.index = index
        self.group = group
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.setblocking(False)
        self.subscriptions = {server[1]: Subscription(self.sock, server) for server in servers}

    def on_readable(self, now: float) -> None:
        try:
            data, ancillary, _, sender = self.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self.group.counters[f"recv error: {e.strerror}"] += 1
            return
        if data.startswith(EVENT_HEAD):
            self.group.records.append((self.index, now, data, ancillary, sender[1]))
        else:
            self.group.answer(self.subscriptions.get(sender[1]), data, now)


@dataclass
class Handshake:
    """What one handshake pass did."""

    kind: str  # subscribe (renewals too) or unsubscribe
    seconds: float
    unanswered: int
    refused: Counter  # the servers' errors
    counters: Counter  # what the sockets counted during it

    def problems(self) -> list[str]:
        return ([f"{count} x {self.kind} refused: {error}"
                 for error, count in self.refused.items()]
                + ([f"{self.unanswered} {self.kind} request(s) unanswered after "
                    f"{self.seconds:.0f} s"] if self.unanswered else []))


class Subscribers:
    """count UDP sockets on a pump, each subscribed to prefix on every one of
    servers by the cookie handshake.  Event datagrams go to records as
    (socket index, read time, datagram, ancillary data, sender's port)."""

    def __init__(self, pump: Pump, count: int, servers: list[Address], prefix: str,
                 handshake_s: float) -> None:
        raise_open_files(count + 64)
        self.pump = pump
        self.prefix = prefix
        self.handshake_s = handshake_s  # bound on one handshake pass
        self.records: list[tuple[int, float, bytes, list, int]] = []
        self.counters: Counter = Counter()
        self.lease, self.heartbeat = 30.0, 2.0  # until the server says
        self.sockets = [SubscriberSocket(index, self, servers) for index in range(count)]
        self.kernel_times = True
        for subscriber in self.sockets:
            if self.kernel_times:
                try:
                    subscriber.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                except OSError:
                    self.kernel_times = False
            pump.add(subscriber)

    @property
    def addresses(self) -> list[Address]:
        return [subscriber.sock.getsockname() for subscriber in self.sockets]

    def subscriptions(self, port: int | None = None) -> list[Subscription]:
        """Every socket's subscription on the server at port, or on all servers."""
        return [subscription for subscriber in self.sockets
                for server_port, subscription in subscriber.subscriptions.items()
                if port is None or server_port == port]

    def state(self, port: int) -> list[tuple[str | None, int]]:
        """(sub, last seq) of each socket's subscription on the server at port."""
        return [(s.sub, s.seq) for s in self.subscriptions(port)]

    def subscribed(self) -> int:
        return sum(1 for s in self.subscriptions() if s.sub is not None)

    def answer(self, subscription: Subscription | None, data: bytes, now: float) -> None:
        """Handle a datagram that is not an event."""
        try:
            message = json.loads(data)
            kind = message["t"]
            if subscription is None:
                self.counters["datagrams from unknown senders"] += 1
            elif kind == "heartbeat":
                self.counters["heartbeats"] += 1
            elif kind == "cookie":
                self.counters["cookies"] += 1
                subscription.cookie = message["cookie"]
                if subscription.wants is not None:
                    self.request(subscription, now)
            elif kind == "subscribed":
                if subscription.sub is not None and subscription.sub != message["sub"]:
                    self.counters["subscriptions lost and made anew"] += 1
                subscription.sub, subscription.seq = message["sub"], message["seq"]
                subscription.renewed_at = now
                self.lease, self.heartbeat = message["lease"], message["heartbeat"]
                if subscription.wants == "subscribe":
                    subscription.wants = None
            elif kind == "unsubscribed":
                if subscription.wants == "unsubscribe":
                    subscription.wants = subscription.sub = None
            elif kind == "error":
                subscription.error = f"{message['error']}: {message['message']}"
                self.counters[f"refused: {subscription.error}"] += 1
                subscription.wants = None
            else:
                self.counters[f"unexpected {kind!r} datagrams"] += 1
        except (ValueError, KeyError, TypeError):
            self.counters["malformed datagrams"] += 1

    def request(self, subscription: Subscription, now: float) -> None:
        """Send the subscription's request, with its cookie if it has one, padded."""
        body = subscription_request(subscription.wants, self.prefix, subscription.cookie)
        try:
            subscription.sock.sendto(body, subscription.server)
        except OSError as e:
            self.counters[f"send error: {e.strerror}"] += 1
        subscription.sent_at = now
        self.counters["requests"] += 1

    def handshake(self, kind: str, chosen: list[Subscription]) -> Handshake:
        """Send kind ("subscribe", "unsubscribe") for each of chosen, at most
        HANDSHAKE_WINDOW in flight, again when unanswered, for at most
        handshake_s."""
        began = time.monotonic()
        before = self.counters.copy()
        waiting, active = deque(chosen), []
        for subscription in chosen:
            subscription.error = None
        while waiting or active:
            now = time.monotonic()
            if now - began > self.handshake_s:
                break
            active = [s for s in active if s.wants is not None]
            while waiting and len(active) < HANDSHAKE_WINDOW:
                subscription = waiting.popleft()
                subscription.wants = kind
                self.request(subscription, now)
                active.append(subscription)
            for subscription in active:
                if now - subscription.sent_at >= RETRY_S:
                    self.counters["requests sent again"] += 1
                    self.request(subscription, now)
            self.pump.pump(0.005)
        unanswered = [s for s in chosen if s.wants is not None]
        for subscription in unanswered:
            subscription.wants = None
        return Handshake(kind, time.monotonic() - began, len(unanswered),
                         Counter(s.error for s in chosen if s.error is not None),
                         self.counters - before)

    def subscribe(self) -> Handshake:
        """Subscribe the subscriptions that are not."""
        return self.handshake("subscribe", [s for s in self.subscriptions() if s.sub is None])

    def renew(self) -> Handshake:
        """Renew the leases of the subscriptions there are."""
        return self.handshake("subscribe", [s for s in self.subscriptions() if s.sub])

    def unsubscribe(self) -> Handshake:
        return self.handshake("unsubscribe", [s for s in self.subscriptions() if s.sub])

    def keep_leases(self, now: float) -> None:
        """During a long run: renew leases past half their time, send again
        requests left unanswered, a few at a time."""
        in_flight = 0
        subscriptions = self.subscriptions()
        for subscription in subscriptions:
            if subscription.wants is not None:
                in_flight += 1
                if now - subscription.sent_at >= RETRY_S:
                    self.counters["requests sent again"] += 1
                    self.request(subscription, now)
        for subscription in subscriptions:
            if in_flight >= HANDSHAKE_WINDOW:
                break
            if (subscription.wants is None and subscription.sub is not None
                    and now - subscription.renewed_at >= self.lease / 2):
                subscription.wants = "subscribe"
                self.counters["renewals during runs"] += 1
                self.request(subscription, now)
                in_flight += 1

    def close(self) -> None:
        for subscriber in self.sockets:
            self.pump.remove(subscriber)
            subscriber.sock.close()


# Timed writes


class Writer:
    """A TCP connection that makes timed writes, a channel of a pump.
    write(value) sends one write whole (blocking: it is small); parse_replies
    puts the answers read into replies as (what is wrong or None, read time,
    what the answer says: a revision, say)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=benchlib.CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inbox = bytearray()
        self.replies: deque[tuple[str | None, float, Any]] = deque()
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

    def write(self, value: bytes) -> None:
        raise NotImplementedError

    def parse_replies(self, now: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class LineWriter(Writer):
    """kvconfig's line protocol: SET key value, answered OK <revision>
    <version>; the answer says the revision.  stats() between runs."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(port)
        greeting, rest = benchlib.greeted(self.sock)
        self.revision = int(greeting.split()[4])  # HELLO kvconfig <version> revision <n>
        self.inbox += rest
        self.key = key.encode()
        self.sock.setblocking(False)

    def write(self, value: bytes) -> None:
        self.send(b"SET %s %s\r\n" % (self.key, value))

    def lines(self) -> list[bytes]:
        *lines, rest = bytes(self.inbox).split(b"\n")
        self.inbox[:] = rest
        return [line.rstrip(b"\r") for line in lines]

    def parse_replies(self, now: float) -> None:
        for line in self.lines():
            if line.startswith(b"OK "):
                self.revision = int(line.split()[1])
                self.replies.append((None, now, self.revision))
            else:
                self.replies.append((benchlib.line_error(line), now, None))

    def stats(self) -> dict[str, Any]:
        """The server's STATS (between runs: it reads the socket itself)."""
        self.send(b"STATS\r\n")
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + benchlib.CONNECT_TIMEOUT_S
        lines: deque[bytes] = deque()
        while True:
            while not lines:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([self.sock], [], [], wait)[0]:
                    raise RuntimeError("kvconfig did not answer STATS in time")
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    raise RuntimeError("kvconfig closed the line-protocol connection")
                self.inbox += data
                lines.extend(self.lines())
            line = lines.popleft()
            if line == b"END":
                return stats
            _, name, value = line.decode().split(" ", 2)
            stats[name] = json.loads(value)


@dataclass
class Sent:
    """What one run wrote: per answered write, (its value, what its answer
    said, when it was sent, when it was answered), in monotonic seconds."""

    writes: list[tuple[bytes, Any, float, float]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    stopped_after: int | None = None  # writes made when the time bound stopped the run


def timed_writes(pump: Pump, writer: Writer, values: Sequence[bytes], interval: float,
                 seconds: float, one_at_a_time: bool) -> Sent:
    """values[i] written at i x interval from the start, as long as seconds
    have not passed: one_at_a_time, each only once the one before is answered
    (later than due if that took long), else without waiting.  Then wait at
    most ACK_TIMEOUT_S for the answers still due."""
    sent, pending = Sent(), deque()
    writer.replies.clear()  # late answers to the writes that ended an earlier run

    def answered() -> bool:
        while writer.replies:
            error, at, answer = writer.replies.popleft()
            if not pending:
                sent.errors[f"an answer to no write: {error or answer}"] += 1
                continue
            value, began = pending.popleft()
            if error is None:
                sent.writes.append((value, answer, began, at))
            else:
                sent.errors[error] += 1
        return not pending or writer.closed

    start = time.monotonic()
    for number, value in enumerate(values):
        due = start + number * interval
        while (now := time.monotonic()) < due:
            pump.pump(due - now)
            answered()
        if now >= start + seconds:
            sent.stopped_after = number
            break
        pending.append((value, time.monotonic()))
        writer.write(value)
        if one_at_a_time:
            pump.pump_until(answered, ACK_TIMEOUT_S)
        if writer.closed or (one_at_a_time and pending):
            break
    if not one_at_a_time:
        pump.pump_until(answered, ACK_TIMEOUT_S)
    if pending:
        sent.errors["connection closed" if writer.closed
                    else f"write unanswered after {ACK_TIMEOUT_S:g} s"] += len(pending)
    return sent


# Analysis


@dataclass
class Timing:
    """One run of timed writes and their receipts; times in ms, sorted."""

    ack: list[float]  # write sent -> its answer
    after_ack: list[float]  # its answer -> the last receipt (< 0 if the receipts came first)
    last: list[float]  # write sent -> the last receipt, per write
    receipt: list[float]  # write sent -> each receipt
    spread: list[float]  # first receipt -> the last, per write
    lag: list[float]  # read time - kernel arrival time, per receipt that has both
    expected: int  # receipts: writes answered x receivers
    lost: int
    extra: int  # receipts of no write of the run, or of one again
    errors: Counter


def timing(sent: Sent, receipts: Iterable[tuple[int, Any, float, float]], receivers: int,
           by_answer: bool, use_kernel: bool) -> Timing:
    """A run's figures from its writes and its receipts: (receiver index,
    the write's value, or with by_answer what its answer said, read time,
    kernel arrival time or nan).  use_kernel: time receipts by the kernel's
    arrival time where there is one."""
    writes = {answer if by_answer else value: (began, answered)
              for value, answer, began, answered in sent.writes}
    seen: set[tuple[int, Any]] = set()
    times: dict[Any, list[float]] = {}
    extra, lag = 0, []
    for index, name, read_at, arrived in receipts:
        if name not in writes or (index, name) in seen:
            extra += 1
            continue
        seen.add((index, name))
        if not math.isnan(arrived):
            lag.append((read_at - arrived) * 1000)
        times.setdefault(name, []).append(arrived if use_kernel and not math.isnan(arrived)
                                          else read_at)
    ack, after_ack, last, receipt, spread = [], [], [], [], []
    for name, (began, answered) in writes.items():
        ack.append((answered - began) * 1000)
        arrivals = times.get(name)
        if arrivals:
            first, final = min(arrivals), max(arrivals)
            receipt.extend((t - began) * 1000 for t in arrivals)
            last.append((final - began) * 1000)
            after_ack.append((final - answered) * 1000)
            spread.append((final - first) * 1000)
    expected = len(writes) * receivers
    return Timing(ack=sorted(ack), after_ack=sorted(after_ack), last=sorted(last),
                  receipt=sorted(receipt), spread=sorted(spread), lag=sorted(lag),
                  expected=expected, lost=expected - len(seen), extra=extra,
                  errors=sent.errors.copy())


def take_turns(sides: list[str], repeat: int, warmup: int, writes: int,
               run: Callable[[str, int], Timing], where: Callable[[str], str],
               text: Callable[[str, Timing], str], notes: list[str]) -> dict[str, list[Timing]]:
    """A warm-up run of each side (of warmup writes), then repeat runs of each
    (of writes), the sides taking turns so that noise hits them alike; a
    progress line a run (where the side is, then text), a note an error."""
    for side in sides:
        run(side, warmup)
    runs: dict[str, list[Timing]] = {}
    for i in range(repeat):
        for side in sides:
            timing = run(side, writes)
            runs.setdefault(side, []).append(timing)
            benchlib.progress(f"  {where(side)} run {i + 1}/{repeat}: {text(side, timing)}")
            notes.extend(f"{where(side).strip()}: {times} x {error}"
                         for error, times in timing.errors.items())
    return runs


def p(values: list[float], fraction: float) -> float:
    return benchlib.percentile(values, fraction)


def median_of(runs: list[Timing], what: Callable[[Timing], list[float]],
              fraction: float) -> float:
    """The median over runs of one percentile of one figure."""
    return benchlib.median(p(what(run), fraction) for run in runs)


def medians_text(runs: list[Timing], what: Callable[[Timing], list[float]],
                 digits: int = 2) -> str:
    """The medians over runs of a figure's p50 and p99, as "p50/p99"."""
    return f"{median_of(runs, what, .5):.{digits}f}/{median_of(runs, what, .99):.{digits}f}"


def lost_text(runs: list[Timing]) -> str:
    return f"{sum(r.lost for r in runs)}/{sum(r.expected for r in runs)}"


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """--interval-ms between writes and --clock, what receipt times are."""
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="milliseconds between writes (default 20)")
    parser.add_argument("--clock", choices=["kernel", "read"], default="kernel",
                        help=("UDP receipt times: the kernel's arrival timestamps (default) or "
                              "the receiver's read times"))
