"""
What the benchmark scripts in this folder share.

``xmlrpc_bench.py`` (kvconfig against the stdlib XML-RPC server) and
``line_bench.py`` (kvconfig's line protocol against Redis) measure different
protocols the same way: two servers side by side on loopback, cells (server x
op x clients, and for the line protocol x depth) each warmed up, then run up to
an op bound and a time bound and repeated with the servers taking turns, the
repeats summarised as medians, and two tables (results, CPU use) printed under
a header.  This module holds that generic part, once:

* servers: free ports, the twistd to run, the kvconfig command line, starting a
  server and waiting until it listens, stopping it (SIGTERM, then SIGKILL),
  all of them in a temporary directory;
* CPU accounting of a process, or of a process and its descendants (Linux);
* the frame of a load generator (:class:`LoadGeneratorBase`): one selector, a
  measured window up to the op and time bounds, then a bounded drain, and a
  non-blocking send; subclasses speak the protocol;
* cells: percentiles, one run's summary, the warm-up, prefill, the repeats of
  every cell, and their combination;
* the report: table formatting, the results and CPU tables, the target
  column's verdict, machine info;
* the command line: the options both scripts take and their checks, and
  SIGTERM turned into an exit that stops the servers.

The scripts are run as ``python bench/<script>.py``, which puts this folder on
``sys.path``; they import this module as ``benchlib``.  It is not part of the
test run and is not installed.
"""

from __future__ import annotations

import argparse
import json
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
KEY_COUNT = 1000
WARMUP_SECONDS = 0.3
DRAIN_TIMEOUT_S = 10.0
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PREFILL_CLIENTS = 8
PREFILL_SECONDS = 60.0

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


def kvconfig_command(directory: Path, *, xmlrpc_port: int = 0, line_port: int = 0,
                     udp_port: int = 0) -> list[str]:
    """``twistd -n kvconfig`` with a sqlite store in directory; port 0 for an
    interface not measured (any free port, so that a bench never collides
    with a server on the default ports)."""
    udp = [f"--udp=udp:{udp_port}:interface={HOST}"]
    return [
        twistd_path(), "-n", "--pidfile=", f"--logfile={directory / 'twistd.log'}",
        "kvconfig", f"--store=sqlite:{directory / 'kvconfig.db'}",
        f"--xmlrpc=tcp:{xmlrpc_port}:interface={HOST}",
        f"--line=tcp:{line_port}:interface={HOST}", *udp,
    ]


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


@contextmanager
def running_server(name: str, directory: Path,
                   command: Callable[[int], list[str]]) -> Iterator[Server]:
    """Start a server, command(port) on a free port with its stderr in directory;
    yield it once it accepts connections, stop it after."""
    port = free_port()
    log = directory / f"{name}.stderr"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command(port), cwd=directory, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until_listening(process, port, name, log)
        yield Server(name, port, process.pid)
    finally:
        stop(process)


@contextmanager
def servers_running(names: list[str], header: Callable[[Path], list[str]],
                    command: Callable[[str, Path], Callable[[int], list[str]]],
                    ) -> Iterator[list[Server]]:
    """A temporary directory; the header, which may speak of it, printed; then
    the servers named, command(name, directory)(port) each, started in it.
    Yields them; stops them and removes the directory after."""
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvbench-")))
        print("\n".join(header(directory)), flush=True)
        yield [stack.enter_context(running_server(name, directory, command(name, directory)))
               for name in names]


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


def no_cpu_seconds() -> float:
    return math.nan


# Load generator


@dataclass
class PhaseResult:
    """What one run of a load generator saw; times in seconds."""

    latencies: list[float] = field(default_factory=list)  # good ones, drain included
    unfinished: list[float] = field(default_factory=list)  # given up, time so far
    errors: Counter = field(default_factory=Counter)
    window: float = 0.0  # up to the time bound, or to the last reply if that came sooner
    good_in_window: int = 0  # good calls (replies) completed within the window
    generator_cpu: float = 0.0  # CPU time of the load generator within the window
    server_cpu: float = math.nan  # CPU time of the server within the window


class LoadGeneratorBase:
    """The frame of a load generator: connections on one selector, and runs that
    issue requests until an op bound or a time bound (the window, over which
    the CPU times are taken), then wait at most DRAIN_TIMEOUT_S for the ones
    still in flight.

    A subclass speaks the protocol.  It keeps self.in_flight, issues no more
    than self.issue_left requests and none once self.stop_issuing_at has
    passed, records into self.result (counting good ones in good_in_window
    while self.window_open), and provides start_issuing, on_event,
    give_up_unfinished, disconnect, fail and server_cpu_clock.  A connection
    has its socket, or None, in .sock."""

    def __init__(self, server: Server, connections: list[Any]) -> None:
        self.server = server
        self.connections = connections
        self.selector = selectors.DefaultSelector()
        self.in_flight = 0
        self.issue_left = 0
        self.stop_issuing_at = 0.0
        self.result = PhaseResult()
        self.server_cpu_seconds: Callable[[], float] = no_cpu_seconds
        self.window_open = False
        self.window_start = (0.0, 0.0, 0.0)  # wall clock, generator CPU, server CPU

    def run(self, max_count: int, seconds: float, measure_server: bool = False) -> PhaseResult:
        """Issue requests until max_count are issued or seconds have passed, then
        wait (at most DRAIN_TIMEOUT_S) for those in flight.  With measure_server,
        measure the server's CPU time within the window too."""
        self.before_run()
        self.result = result = PhaseResult()
        self.server_cpu_seconds = self.server_cpu_clock() if measure_server else no_cpu_seconds
        start = time.perf_counter()
        self.window_start = (start, time.process_time(), self.server_cpu_seconds())
        self.window_open = True
        self.issue_left = max_count
        self.stop_issuing_at = start + seconds
        give_up_at = self.stop_issuing_at + DRAIN_TIMEOUT_S
        self.start_issuing()
        while self.in_flight:
            now = time.perf_counter()
            if self.window_open and now >= self.stop_issuing_at:
                self.close_window(now)
            if now >= give_up_at:
                break
            wake_at = self.stop_issuing_at if self.window_open else give_up_at
            for key, mask in self.selector.select(wake_at - now):
                self.on_event(key.data, mask)
            self.after_events()
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

    def close(self) -> None:
        for connection in self.connections:
            self.disconnect(connection)
        self.selector.close()

    def most_in_flight(self) -> int:
        """How many requests can be in flight at once."""
        return len(self.connections)

    def send_some(self, connection: Any, data: bytes | bytearray | memoryview) -> int | None:
        """Send what the connection's non-blocking socket takes of data now: the
        number of bytes sent, or None if the connection broke (then fail has
        been called)."""
        try:
            return connection.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.fail(connection, f"send: {e.strerror}")
            return None

    # What a subclass provides

    def before_run(self) -> None:
        """Before the window opens (connecting, say)."""

    def start_issuing(self) -> None:
        """Issue the first requests of a run."""
        raise NotImplementedError

    def on_event(self, connection: Any, mask: int) -> None:
        """Handle what the selector reports for a connection."""
        raise NotImplementedError

    def after_events(self) -> None:
        """After the events of one select."""

    def give_up_unfinished(self) -> None:
        """Count what is still in flight after the drain as given up."""
        raise NotImplementedError

    def disconnect(self, connection: Any) -> None:
        raise NotImplementedError

    def fail(self, connection: Any, error: str) -> None:
        """Count error for what is in flight on a broken connection, and drop it."""
        raise NotImplementedError

    def server_cpu_clock(self) -> Callable[[], float]:
        """What reads the server's CPU seconds so far, for one measured run:
        the server's process and its children (kvconfig's sqlite writer)."""
        pids = process_tree(self.server.pid)
        return lambda: tree_cpu_seconds(pids)


# Cells


@dataclass
class CellRun:
    """One measured run of one cell; latencies in ms."""

    per_s: float  # good calls (replies) completed within the time bound, per second
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


def run_cell(generator: LoadGeneratorBase, max_count: int, seconds: float, unit: str,
             latency_limit: float = math.inf) -> CellRun:
    """Warm up, then measure, on the same connections; close the generator."""
    try:
        warmup = generator.run(max(generator.most_in_flight(), max_count // 10), WARMUP_SECONDS)
        result = generator.run(max_count, seconds, measure_server=True)
    finally:
        generator.close()
    return summarize(result, warmup, unit, latency_limit)


def prefill(generator: LoadGeneratorBase, count: int, doing: str, done: str) -> None:
    """Run count writes, one per key, so that reads find every key whatever ops
    are run; close the generator.  doing and done word the error ("saving",
    "saved")."""
    try:
        result = generator.run(count, seconds=PREFILL_SECONDS)
    finally:
        generator.close()
    if result.errors or len(result.latencies) != count:
        raise RuntimeError(f"{generator.server.name}: {doing} the {count} keys failed: "
                           f"{len(result.latencies)} {done}, errors {dict(result.errors)}")


def run_all(rows: list[Row], servers: list[Server], repeat: int,
            run_cell: Callable[[Server, Row], CellRun],
            where: Callable[[Row], str],
            stats: Callable[[CellRun], str]) -> dict[CellKey, list[CellRun]]:
    """Every cell, repeated, the servers taking turns; a progress line a run
    (where the row is, then the run's stats)."""
    runs: dict[CellKey, list[CellRun]] = {}
    for row in rows:
        for i in range(repeat):
            for server in servers:
                run = run_cell(server, row)
                runs.setdefault((server.name, *row), []).append(run)
                progress(f"  {where(row)} {server.name:<8} run {i + 1}/{repeat}: {stats(run)}")
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


# Report


Target = Callable[[CellSummary | None, CellSummary | None, Row], str]


@dataclass(frozen=True)
class Layout:
    """How a script's two tables read."""

    rows: list[Row]
    columns: list[str]  # the headers of the columns that name a row
    label: Callable[[Row], list[str]]  # a row's cells under those
    other: str  # the server kvconfig is compared with
    rate: str  # what throughput counts: "calls/s", "ops/s"
    target: Target  # the target column: (kvconfig, other, row) -> text
    cpu_titles: tuple[str, str]  # the CPU table's headers for kvconfig and the other


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
    if failures:
        return f"NO ({', '.join(failures)})"
    return f"? (no {other} run)" if ratio is not None and rival is None else "yes"


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


def result_table(layout: Layout, cells: dict[CellKey, CellSummary]) -> str:
    """Throughput, the ratio kvconfig/other, latencies and the target, row by row."""
    other, rate = layout.other, layout.rate
    table = [[*layout.columns, f"kvconfig {rate}", f"{other} {rate}", "ratio",
              "kvconfig p50/p99/max ms", f"{other} p50/p99/max ms", "target"]]
    for row in layout.rows:
        kvconfig = cells.get(("kvconfig", *row))
        rival = cells.get((other, *row))
        ratio = "-"
        if kvconfig and rival and rival.per_s:
            ratio = f"{kvconfig.per_s / rival.per_s:.2f}"
        table.append([
            *layout.label(row),
            f"{kvconfig.per_s:.0f}" if kvconfig else "-",
            f"{rival.per_s:.0f}" if rival else "-",
            ratio,
            kvconfig.latency_text() if kvconfig else "-",
            rival.latency_text() if rival else "-",
            layout.target(kvconfig, rival, row),
        ])
    return format_table(table)


def cpu_table(layout: Layout, cells: dict[CellKey, CellSummary]) -> str:
    """The cores used by each server and by the load generator, row by row."""
    table = [[*layout.columns, *layout.cpu_titles, "load generator (max)"]]
    for row in layout.rows:
        kvconfig = cells.get(("kvconfig", *row))
        rival = cells.get((layout.other, *row))
        generator = max(c.generator_cpu for c in (kvconfig, rival) if c)
        table.append([
            *layout.label(row),
            f"{kvconfig.server_cpu:.2f}" if kvconfig else "-",
            f"{rival.server_cpu:.2f}" if rival else "-",
            f"{generator:.2f}",
        ])
    return format_table(table)


def print_report(layout: Layout, cells: dict[CellKey, CellSummary], notes: list[str]) -> None:
    """The results table, the CPU table and the notes."""
    print()
    print(result_table(layout, cells))
    print()
    print("CPU use within the time bound, in cores (servers: median over repeats):")
    print(cpu_table(layout, cells))
    print()
    print("\n".join(notes))


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


def load_average() -> str:
    try:
        return " ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "?"


# Command line


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


def argument_parser(description: str, clients: list[int]) -> argparse.ArgumentParser:
    """A parser with --clients (default clients); the script adds its own options
    after it, then add_cell_arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--clients", type=int_list, default=clients,
                        help=("concurrent clients per cell, comma-separated "
                              f"(default {','.join(map(str, clients))})"))
    return parser


def add_cell_arguments(parser: argparse.ArgumentParser, *, ops: list[str], fold_case: bool,
                       unit: str, max_default: int, other: str) -> None:
    """--ops (default all of ops), --seconds, --max-<unit>s (default max_default),
    --repeat, --only (kvconfig, other or both) and --quick."""
    parser.add_argument("--ops", type=op_list(ops, fold_case), default=list(ops),
                        help=f"operations, comma-separated (default {','.join(ops)})")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time bound of a cell (default 3)")
    parser.add_argument(f"--max-{unit}s", type=int, default=max_default,
                        help=f"{unit} bound of a cell (default {max_default})")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each cell, the servers taking turns (default 3)")
    parser.add_argument("--only", choices=["kvconfig", other, "both"], default="both",
                        help="which server(s) to run (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per cell, 1 repeat")


Check = tuple[Callable[[argparse.Namespace], bool], str]  # (is it wrong, the error)


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None, unit: str,
                  checks: Iterable[Check] = ()) -> argparse.Namespace:
    """Parse; apply --quick; check --clients, then the script's own checks, then
    --seconds, --max-<unit>s and --repeat."""
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 1.0, 1
    if not args.clients or min(args.clients) < 1:
        parser.error("--clients must be positive numbers")
    for wrong, message in checks:
        if wrong(args):
            parser.error(message)
    if args.seconds <= 0 or getattr(args, f"max_{unit}s") < 1 or args.repeat < 1:
        parser.error(f"--seconds, --max-{unit}s and --repeat must be positive")
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the finally clauses, which stop the servers.
    raise SystemExit(128 + signum)


@dataclass
class HttpReply:
    status: int
    body: bytes
    keep_alive: bool
    size: int  # bytes of the buffer it took


def parse_http(buffer: bytearray) -> HttpReply | None:
    """The HTTP response at the start of buffer (Content-Length or chunked), or
    None if it is not complete yet; ValueError if it is not one."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buffer) > 65536:
            raise ValueError("response head over 64 KiB")
        return None
    status_line, *header_lines = bytes(buffer[:head_end]).decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    position = head_end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
            data_end = line_end + 2 + size
            if len(buffer) < data_end + 2:
                return None
            if size == 0:
                if buffer[data_end:data_end + 2] != b"\r\n":
                    raise ValueError("chunked response with trailers")
                position = data_end + 2
                break
            body += buffer[line_end + 2:data_end]
            position = data_end + 2
        body_bytes = bytes(body)
    elif "content-length" in headers:
        end = position + int(headers["content-length"])
        if len(buffer) < end:
            return None
        body_bytes, position = bytes(buffer[position:end]), end
    else:
        raise ValueError(f"response without Content-Length: {status_line}")
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
    return HttpReply(int(status), body_bytes, keep_alive, position)


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


def subscription_request(kind: str, prefix: str, cookie: str | None, pad_to: int) -> bytes:
    """A notifier request datagram (kind: subscribe or unsubscribe), with the
    cookie if there is one, padded to pad_to bytes: the server answers an
    unproven address only with a cookie no larger than the request."""
    message: dict[str, Any] = {"v": 1, "t": kind, "prefix": prefix}
    if cookie is not None:
        message["cookie"] = cookie
    message["pad"] = ""
    body = json.dumps(message, separators=(",", ":")).encode()
    return body[:-2] + b"x" * max(0, pad_to - len(body)) + b'"}'
