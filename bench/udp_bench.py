"""
UDP change notifications: kvconfig's fan-out against a plain Python loop.

What it measures
================

kvconfig sends every change under a subscribed prefix to each UDP
subscriber as one datagram (the wire format is in kvconfig.udpwire).  This
script measures how long that fan-out takes and whether datagrams are lost,
beside the floor of any Python server: a plain loop of ``socket.sendto``.

* The server: the installed ``twistd -n kvconfig``, a subprocess with its
  sqlite store in a temporary directory (durable, the default) and free
  ports for ``--xmlrpc``, ``--line`` and ``--udp``, all on 127.0.0.1.
* The subscribers: N UDP sockets on 127.0.0.1 (N = 10, 100, 1000 by
  default), all held by one receiver process (this script run with
  ``--receiver``: one epoll, RLIMIT_NOFILE raised as needed; benchlatency's
  Subscribers).  Each socket subscribes to the prefix ``udpbench/`` through
  the wire format's own handshake: a padded ``subscribe``, the server's
  ``cookie``, a ``subscribe`` with the cookie, ``subscribed``.  A request not
  answered within 0.2 s is
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

Before and after: ``--baseline-twistd PATH`` runs a second server, the
kvconfig of another install (the code before a change, say), with the same
options; every socket subscribes on both servers, and a baseline run (its own
writer, the same schedule) takes its turn between kvconfig's and the plain
loop's.  The table gains the baseline's OK->last, spread and loss, and
kvconfig's spread p50 over the baseline's ("spread kv/base").

How to run it
=============

From the repository, with the project installed in the venv (see benchlib
and benchlatency for what the benches share; it is not part of the test
run)::

    .venv/bin/python bench/udp_bench.py            # full run, about 2 minutes
    .venv/bin/python bench/udp_bench.py --quick    # smoke run
    .venv/bin/python bench/udp_bench.py --baseline-twistd /work/base/.venv/bin/twistd

It runs on loopback only, stops by itself, and stops the servers and the
receiver on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import benchlatency
import benchlib
from benchlatency import Sent, Timing, median_of, medians_text
from benchlib import BASELINE, HOST, KVCONFIG

PREFIX = "udpbench/"
KEY = "udpbench/key"
PLAIN = "plain"
HANDSHAKE_S = 60.0  # bound on one handshake pass over every socket
CONTROL_TIMEOUT_S = 30.0  # a receiver answering a simple command
WARMUP_CHANGES = 20
TARGET_RATIO, TARGET_RATIO_N = 1.5, 1000
TARGET_LOSS_N = 1000
TARGET_LATENCY_MS, TARGET_LATENCY_N = 1.0, 10
UDP_COUNTERS_BAD = ("udp_events_skipped", "udp_send_errors", "udp_expired", "udp_refused")


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


class Receiver:
    """N subscriber sockets on one epoll, subscribed on every server, driven
    by commands on stdin (itself a channel of the pump)."""

    def __init__(self, servers: list[tuple[str, int]], count: int) -> None:
        self.pump = benchlatency.Pump()
        self.subscribers = benchlatency.Subscribers(self.pump, count, servers, PREFIX,
                                                    HANDSHAKE_S)
        self.command_waiting = False
        self.pump.add(self, fd=sys.stdin.fileno())

    def on_readable(self, now: float) -> None:
        self.command_waiting = True

    def answer(self, command: dict[str, Any]) -> dict[str, Any]:
        do, subscribers = command["do"], self.subscribers
        if do in ("subscribe", "renew", "unsubscribe"):
            handshake = getattr(subscribers, do)()
            return {"handshake": handshake, "totals": dict(subscribers.counters),
                    "subs": {port: subscribers.state(port)
                             for port in subscribers.sockets[0].subscriptions},
                    "lease": subscribers.lease, "heartbeat": subscribers.heartbeat}
        if do == "start":
            subscribers.records.clear()
            return {}
        if do == "collect":
            return self.collect(command["expect"], command["timeout"])
        return {"error": f"unknown command {do!r}"}

    def collect(self, expect: int, timeout: float) -> dict[str, Any]:
        """Wait until expect event datagrams are in or timeout has passed; the
        events of the run, parsed: (sender's port, socket, sub, seq, rev, key,
        read time, kernel arrival time or nan)."""
        records = self.subscribers.records
        self.pump.pump_until(lambda: len(records) >= expect, timeout)
        events, malformed = [], 0
        for index, port, message, read_at, arrived in benchlatency.decoded(records):
            if message is None:
                malformed += 1
                continue
            events.append((port, index, message.get("sub"), message.get("seq"),
                           message.get("rev"), message.get("key"), read_at, arrived))
        records.clear()
        return {"events": events, "malformed": malformed}

    def serve(self) -> None:
        """Answer commands until the control pipe closes."""
        control_in, control_out = sys.stdin.fileno(), sys.stdout.fileno()
        send_message(control_out, {"kernel_times": self.subscribers.kernel_times,
                                   "addresses": self.subscribers.addresses})
        next_check = time.monotonic() + 1
        while True:
            self.pump.pump(next_check - time.monotonic())
            if self.command_waiting:
                self.command_waiting = False
                try:
                    command = receive_message(control_in)
                except EOFError:
                    return
                send_message(control_out, self.answer(command))
            now = time.monotonic()
            if now >= next_check:
                self.subscribers.keep_leases(now)
                next_check = now + 1


def receiver_main(ports: list[int], count: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench process stops it
    # A run holds a few hundred thousand records: the cyclic collector would
    # stop the receiver for tens of ms scanning them, and it makes no cycles.
    gc.disable()
    Receiver([(HOST, port) for port in ports], count).serve()
    return 0


class ReceiverProcess:
    """The receiver, a child process, as this process sees it."""

    def __init__(self, directory: Path, udp_ports: list[int], count: int) -> None:
        self.log = directory / f"receiver-{count}.stderr"
        with open(self.log, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--receiver",
                 f"{','.join(map(str, udp_ports))}:{count}"],
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

    def handshake(self, do: str) -> dict[str, Any]:
        return self.call(HANDSHAKE_S + CONTROL_TIMEOUT_S, do=do)

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
def receiver_running(directory: Path, udp_ports: list[int],
                     count: int) -> Iterator[ReceiverProcess]:
    receiver = ReceiverProcess(directory, udp_ports, count)
    try:
        yield receiver
    finally:
        receiver.close()


# The plain loop


def plain_run(sock: socket.socket, addresses: list[tuple[str, int]],
              subs: list[tuple[str, int]], first_revision: int, values: Sequence[bytes],
              interval: float, seconds: float) -> Sent:
    """The floor: the datagrams kvconfig would send for each of values, one
    change every interval, each to every address in a plain sendto loop.  A
    change's "answer" is its revision, its times the loop's start and end."""
    result = Sent()
    ids = [sub.encode() for sub, _ in subs]
    seqs = [seq for _, seq in subs]
    key = json.dumps(KEY).encode()
    start = time.monotonic()
    for number, value in enumerate(values):
        due = start + number * interval
        now = time.monotonic()
        if now >= start + seconds:
            break
        if due > now:
            time.sleep(due - now)
        revision = first_revision + number
        tail = b',"rev":%d,"op":"put","key":%s,"value":%s}' % (revision, key, value)
        began = time.monotonic()
        for i, address in enumerate(addresses):
            seqs[i] += 1
            try:
                sock.sendto(b'{"v":1,"t":"event","sub":"%s","seq":%d%s' % (ids[i], seqs[i], tail),
                            address)
            except OSError as e:
                result.errors[f"sendto: {e.strerror}"] += 1
        result.writes.append((value, revision, began, time.monotonic()))
    return result


# Analysis and report


def analyse(sent: Sent, received: dict[str, Any], port: int, subs: list[tuple[str, int]],
            use_kernel: bool) -> Timing:
    """The figures of one run of the side whose datagrams come from port.
    subs holds each socket's (sub, last seq) before the run: a datagram counts
    if it is on KEY, within the run's seq range, for a revision written."""
    count = len(sent.writes)
    receipts = []
    for sender, index, _, seq, revision, key, read_at, arrived in received["events"]:
        if sender != port:
            continue
        base = subs[index][1]
        ours = key == KEY and type(seq) is int and base < seq <= base + count
        receipts.append((index, revision if ours else None, read_at, arrived))
    run = benchlatency.timing(sent, receipts, len(subs), by_answer=True, use_kernel=use_kernel)
    if received["malformed"]:
        run.errors["malformed event datagrams"] += received["malformed"]
    return run


def after_ack_or_last(side: str) -> Callable[[Timing], list[float]]:
    """kvconfig's and the baseline's headline time, OK -> last receipt; the
    plain loop's, its start -> last receipt."""
    return (lambda r: r.last) if side == PLAIN else (lambda r: r.after_ack)


def run_text(side: str, run: Timing) -> str:
    what = benchlatency.p
    headline = after_ack_or_last(side)(run)
    return (f"{'start' if side == PLAIN else 'OK'}->last p50/p99 "
            f"{what(headline, .5):7.3f}/{what(headline, .99):7.3f} ms, "
            f"spread p50/p99 {what(run.spread, .5):6.3f}/{what(run.spread, .99):6.3f} ms, "
            f"lost {run.lost}/{run.expected}, extra {run.extra}, "
            f"errors {sum(run.errors.values())}")


def spread_ratio(runs: list[Timing], to: list[Timing]) -> float:
    return median_of(runs, lambda r: r.spread, .5) / median_of(to, lambda r: r.spread, .5)


def target_text(count: int, kvconfig: list[Timing], plain: list[Timing]) -> str:
    failures, checked = [], False
    if count == TARGET_RATIO_N:
        checked = True
        if not spread_ratio(kvconfig, plain) <= TARGET_RATIO:
            failures.append(f"ratio>{TARGET_RATIO:g}")
    if count == TARGET_LOSS_N:
        checked = True
        if sum(r.lost for r in kvconfig):
            failures.append("loss")
    if count == TARGET_LATENCY_N:
        checked = True
        if not median_of(kvconfig, lambda r: r.after_ack, .5) < TARGET_LATENCY_MS:
            failures.append(f"p50>={TARGET_LATENCY_MS:g}ms")
    if any(r.errors for r in kvconfig):
        failures.append("errors")
    return benchlib.verdict(failures) if checked or failures else "-"


def result_table(counts: list[int], runs: dict[tuple[int, str], list[Timing]],
                 baseline: bool) -> str:
    rows = [["subscribers", "kv OK->last", "kv SET->last", "kv spread", "plain spread",
             "plain start->last", "ratio", "kv lost", "plain lost",
             *(["base OK->last", "base spread", "spread kv/base", "base lost"] if baseline
               else []), "target"]]
    for count in counts:
        kvconfig, plain = runs.get((count, KVCONFIG)), runs.get((count, PLAIN))
        base = runs.get((count, BASELINE))
        if not kvconfig or not plain or (baseline and not base):
            continue
        rows.append([
            str(count),
            medians_text(kvconfig, lambda r: r.after_ack, 3),
            medians_text(kvconfig, lambda r: r.last, 3),
            medians_text(kvconfig, lambda r: r.spread, 3),
            medians_text(plain, lambda r: r.spread, 3),
            medians_text(plain, lambda r: r.last, 3),
            f"{spread_ratio(kvconfig, plain):.2f}",
            benchlatency.lost_text(kvconfig), benchlatency.lost_text(plain),
            *([medians_text(base, lambda r: r.after_ack, 3),
               medians_text(base, lambda r: r.spread, 3),
               f"{spread_ratio(kvconfig, base):.2f}",
               benchlatency.lost_text(base)] if baseline else []),
            target_text(count, kvconfig, plain),
        ])
    return benchlib.format_table(rows)


def header(args: argparse.Namespace, directory: Path) -> list[str]:
    clock = "kernel arrival (SO_TIMESTAMPNS)" if args.clock == "kernel" else "receiver read"
    sides = f"kvconfig{', baseline' if args.baseline_twistd else ''} and plain"
    return [
        *benchlib.machine_info(),
        (f"server: twistd -n kvconfig --store sqlite:<tmp> on "
         f"{benchlib.filesystem_of(directory)}, --udp/--line/--xmlrpc on free ports of "
         f"{HOST}; a SET is answered once committed (WAL, synchronous=FULL)"),
        *benchlib.baseline_info(args),
        (f"subscribers: {','.join(map(str, args.subscribers))} UDP sockets in one receiver "
         f"process (epoll), each subscribed to {PREFIX!r} by the cookie handshake"),
        (f"load: per run up to {args.changes} changes of {KEY!r}, one every "
         f"{args.interval_ms:g} ms, for at most {args.seconds:g} s (line protocol SET); the "
         "plain loop sends"),
        ("  the same datagrams with socket.sendto from this process; "
         f"{args.repeat} repeat(s) of each, {sides} taking turns, after a "
         f"{WARMUP_CHANGES}-change warm-up"),
        (f"receipt times: {clock} times on CLOCK_MONOTONIC; times are p50/p99 in ms, "
         "medians over repeats of each run's;"),
        ("  kv = kvconfig, ratio = kv spread p50 / plain spread p50, lost = datagrams lost / "
         "sent in all repeats;"),
        (f"  target: spread ratio <= {TARGET_RATIO:g} and no loss at {TARGET_RATIO_N}, "
         f"OK->last p50 < {TARGET_LATENCY_MS:g} ms at {TARGET_LATENCY_N}"),
    ]


def server_notes(name: str, count: int, before: dict[str, Any],
                 after: dict[str, Any]) -> list[str]:
    """What a server's STATS say happened on its UDP side while count
    subscribers were measured."""
    changed = {key: after[key] - before.get(key, 0) for key in after
               if key.startswith("udp_") and isinstance(after[key], int)
               and after[key] != before.get(key, 0)}
    where = f"{count} subscribers{'' if name == KVCONFIG else ', ' + name}"
    if not changed:
        return [f"{where}: the server's STATS have no UDP counters"]
    parts = [f"{key[4:]} {value}" for key, value in changed.items()]
    return [f"{where}, server STATS (increase): {', '.join(parts)}",
            *(f"  the server counted {changed[bad]} {bad[4:].replace('_', ' ')}"
              for bad in UDP_COUNTERS_BAD if changed.get(bad))]


# Main


class Bench:
    """What the runs of every subscriber count share: the kvconfig servers'
    UDP ports and writers, the plain loop's socket, the values' numbering."""

    def __init__(self, args: argparse.Namespace, directory: Path, udp_ports: dict[str, int],
                 writers: dict[str, benchlatency.LineWriter], plain_sock: socket.socket) -> None:
        self.args = args
        self.directory = directory
        self.udp_ports = udp_ports  # per side; the plain loop's is its socket's
        self.writers = writers
        self.plain_sock = plain_sock
        self.pump = benchlatency.Pump()
        for writer in writers.values():
            self.pump.add(writer)
        self.changes_made = 0
        self.runs: dict[tuple[int, str], list[Timing]] = {}
        self.notes: list[str] = []

    def sides(self) -> list[str]:
        return [*self.writers, PLAIN]

    def one(self, receiver: ReceiverProcess, count: int, side: str, changes: int) -> Timing:
        """One run of a side, after renewing the leases."""
        renewed = receiver.handshake("renew")
        if renewed["handshake"].problems():
            self.notes.append(f"{count} subscribers: renewal: "
                              f"{'; '.join(renewed['handshake'].problems())}")
        subs = renewed["subs"][self.udp_ports[KVCONFIG if side == PLAIN else side]]
        values = [value_bytes(self.changes_made + n) for n in range(1, changes + 1)]
        self.changes_made += changes
        interval, seconds = self.args.interval_ms / 1000, self.args.seconds
        receiver.call(do="start")
        gc.collect()
        gc.disable()  # no pause of this process's own in the measured part
        try:
            if side == PLAIN:
                sent = plain_run(self.plain_sock, receiver.addresses, subs,
                                 self.writers[KVCONFIG].revision + 1, values, interval, seconds)
            else:
                sent = benchlatency.timed_writes(self.pump, self.writers[side], values,
                                                 interval, seconds, one_at_a_time=False)
        finally:
            gc.enable()
        got = receiver.call(benchlatency.SETTLE_S + CONTROL_TIMEOUT_S, do="collect",
                            expect=len(sent.writes) * count, timeout=benchlatency.SETTLE_S)
        return analyse(sent, got, self.udp_ports[side], subs, self.args.clock == "kernel")

    def measure(self, count: int) -> None:
        """Subscribe count sockets, warm up, run the repeats, unsubscribe."""
        ports = [self.udp_ports[side] for side in self.writers]
        notes = self.notes
        with receiver_running(self.directory, ports, count) as receiver:
            if not receiver.kernel_times and self.args.clock == "kernel":
                notes.append(f"{count} subscribers: no kernel timestamps; read times used")
            reply = receiver.handshake("subscribe")
            handshake = reply["handshake"]
            wanted = count * len(ports)
            subscribed = sum(1 for subs in reply["subs"].values() for sub, _ in subs if sub)
            benchlib.progress(
                f"{count} subscribers: {subscribed} subscriptions made in "
                f"{handshake.seconds:.2f} s (lease {reply['lease']} s, heartbeat "
                f"{reply['heartbeat']} s; {dict(handshake.counters)})")
            if handshake.refused:
                notes.append(f"{count} subscribers: subscribe refused: {dict(handshake.refused)}")
            if subscribed < wanted:
                raise RuntimeError(f"only {subscribed} of {wanted} subscriptions made in "
                                   f"{HANDSHAKE_S:g} s: {reply}")
            stats_before = {side: writer.stats() for side, writer in self.writers.items()}
            runs = benchlatency.take_turns(
                self.sides(), self.args.repeat, WARMUP_CHANGES, self.args.changes,
                lambda side, changes: self.one(receiver, count, side, changes),
                lambda side: f"{count:>4} subscribers, {side:<8}", run_text, notes)
            self.runs.update({(count, side): side_runs for side, side_runs in runs.items()})
            for side, writer in self.writers.items():
                notes.extend(server_notes(side, count, stats_before[side], writer.stats()))
            reply = receiver.handshake("unsubscribe")
            left = sum(1 for subs in reply["subs"].values() for sub, _ in subs if sub)
            if left:
                notes.append(f"{count} subscribers: {left} not unsubscribed (their leases "
                             "run out)")
            notes.append(f"{count} subscribers, the receiver's counts: {reply['totals']}")
        for side in self.writers:
            runs = self.runs[count, side]
            early = sum(1 for run in runs for t in run.after_ack if t < 0)
            notes.append(f"{count} subscribers: {side} SET->OK p50/p99 "
                         f"{medians_text(runs, lambda r: r.ack, 3)} ms; the last datagram "
                         f"arrived before the OK was read for {early} of "
                         f"{sum(len(run.after_ack) for run in runs)} changes")
        lag = sorted(t for side in self.sides() for run in self.runs[count, side]
                     for t in run.lag)
        if lag:
            notes.append(f"{count} subscribers: receiver lag (read - kernel arrival) "
                         f"p50/p99/max {benchlatency.p(lag, .5):.3f}/"
                         f"{benchlatency.p(lag, .99):.3f}/{lag[-1]:.3f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__)
    benchlib.add_counts(parser, "--subscribers", [10, 100, 1000], "subscriber counts")
    parser.add_argument("--changes", type=int, default=200,
                        help="changes per run (default 200)")
    benchlatency.add_schedule_arguments(parser)
    benchlib.add_bounds(parser, seconds=10.0, seconds_of="a run",
                        repeats="each side per subscriber count, taking turns",
                        quick="50 changes a run, 1 repeat")
    benchlib.add_baseline_argument(parser, "the plain loop")
    parser.add_argument("--receiver", metavar="PORTS:COUNT", help=argparse.SUPPRESS)
    return benchlib.parse_checked(
        parser, argv, quick={"changes": 50, "repeat": 1}, counts=["--subscribers"],
        positive=["--changes", "--repeat", "--seconds", "--interval-ms"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.receiver:
        ports, count = args.receiver.split(":")
        return receiver_main([int(port) for port in ports.split(",")], int(count))
    began = time.monotonic()
    names = [KVCONFIG, *([BASELINE] if args.baseline_twistd else [])]
    with tempfile.TemporaryDirectory(prefix="kvbench-") as name:
        directory = Path(name)
        print("\n".join(header(args, directory)), flush=True)
        with ExitStack() as stack:
            servers, udp_ports, writers = [], {}, {}
            # Every subscriber is on one host and prefix: the limits must
            # allow the most measured.
            most = max(args.subscribers) + 100
            limits = {"--max-subscriptions": most, "--max-subscriptions-per-prefix": most,
                      "--max-subscriptions-per-host": most}
            for side in names:
                udp_ports[side] = benchlib.free_port(socket.SOCK_DGRAM)
                line_port = benchlib.free_port()
                twistd = benchlib.twistd_of(side, args)
                command = benchlib.kvconfig_command(
                    directory / side, twistd=twistd, line_port=line_port,
                    udp_port=udp_ports[side], options=benchlib.known_options(twistd, limits))
                servers.append(stack.enter_context(benchlib.running_server(
                    side, directory / side, command, line_port)))
                writers[side] = benchlatency.LineWriter(line_port, KEY)
                stack.callback(writers[side].close)
            plain_sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            plain_sock.bind((HOST, 0))
            udp_ports[PLAIN] = plain_sock.getsockname()[1]
            bench = Bench(args, directory, udp_ports, writers, plain_sock)
            stack.callback(bench.pump.close)
            for count in args.subscribers:
                bench.measure(count)
        for server in servers:  # stopped now: their whole logs
            bench.notes.extend(server.log_problems())
    print()
    print(result_table(args.subscribers, bench.runs, bool(args.baseline_twistd)))
    print()
    print("\n".join(bench.notes or ["no notes"]))
    benchlib.footer(began)
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
