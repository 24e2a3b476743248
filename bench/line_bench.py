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
as an op.  kvconfig's greeting line is read on each connection before its
replies.

Each cell (server x op x clients x depth) runs after a short warm-up for at
most ``--max-ops`` requests and at most ``--seconds`` seconds, and is repeated
``--repeat`` times, the servers taking turns so that noise hits them alike.
``GET`` cells find every key: all are ``SET`` once before the first cell.
ops/s counts the good replies received within the time bound (or up to
the last reply, if the op bound came first); the requests still in flight are
waited for (up to 10 s, then given up) and count in the latencies.  The table
shows the medians of ops/s, p50 and p99 over the repeats, the largest latency
seen in any of them, the ratio kvconfig/Redis, and whether the row meets the
target: kvconfig at least 0.5x Redis's ops/s, with no error and no request
given up.  A second table gives the CPU used by each server (kvconfig's
includes its writer process) and by the load generator, to show whether the
generator, a single Python thread, was the bottleneck.

To measure a change against the code before it, ``--baseline-twistd PATH``
(another install's twistd) adds that kvconfig as a third server with the same
options and its own store, in the same repeats: its columns, and kvconfig's
ops/s over its in "vs baseline", join the tables.

How to run it
=============

From the repository, with the project installed in the venv and Redis from
Debian (``apt-get install redis-server``; its system service need not run)::

    .venv/bin/python bench/line_bench.py            # full run, about 2 minutes
    .venv/bin/python bench/line_bench.py --quick    # smoke run
    .venv/bin/python bench/line_bench.py --baseline-twistd /work/base/.venv/bin/twistd

See benchlib for what the benches share; it is not part of the test run.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
from pathlib import Path

import benchlib
from benchlib import CellKey, CellRun, CellSummary, Layout, Parsed, Row, Server

OTHER = "redis"
TARGET_RATIO = 0.5
PREFILL_DEPTH = 16


def server_command(args: argparse.Namespace, name: str, directory: Path,
                   port: int) -> list[str]:
    if name == OTHER:
        return [
            "redis-server", "--port", str(port), "--bind", benchlib.HOST,
            "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(directory / "redis.log"),
        ]
    return benchlib.kvconfig_command(directory, twistd=benchlib.twistd_of(name, args),
                                     line_port=port)


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


def resp_parser(op: str) -> benchlib.Parser:
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
        return count, bad, pos, True

    return parse


def generator(server: Server, op: str, clients: int, depth: int) -> benchlib.LoadGenerator:
    """Pre-built requests, one per key, and how to read their replies: the
    line protocol's SET key value / GET key, or Redis's RESP arrays."""
    words = [(b"SET", key, value) if op == "set" else (b"GET", key)
             for key, value in bench_items()]
    if server.name == OTHER:
        speaker = benchlib.Cycle([resp_command(*w) for w in words], resp_parser(op))
    else:
        speaker = benchlib.Cycle([b" ".join(w) + b"\r\n" for w in words],
                                 benchlib.line_parser(b"OK " if op == "set" else b"VALUE "),
                                 benchlib.GREETING)
    return benchlib.LoadGenerator(server, speaker, clients, depth)


def measure(args: argparse.Namespace, server: Server, row: Row) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    op, clients, depth = row
    return benchlib.run_cell(generator(server, op, clients, depth), args.max_ops,
                             args.seconds, "requests")


# Report


def target_text(kvconfig: CellSummary | None, redis: CellSummary | None, _row: Row) -> str:
    """Whether a row meets its target (the same on every row), and if not, why."""
    given_up = ["given up"] if kvconfig and kvconfig.unfinished else []
    return benchlib.target_text(kvconfig, redis, OTHER, TARGET_RATIO, given_up)


def layout(args: argparse.Namespace) -> Layout:
    return Layout(rows=[(op, clients, depth) for op in args.ops for clients in args.clients
                        for depth in args.depths],
                  columns=["op", "clients", "depth"],
                  label=lambda row: [row[0].upper(), str(row[1]), str(row[2])],
                  other=OTHER, rate="ops/s", target=target_text,
                  cpu_titles=("kvconfig server+writer", "redis server"),
                  baseline=bool(args.baseline_twistd))


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    return benchlib.cell_notes(
        cells, lambda key: f"{key[0]} {key[1].upper()} {key[2]} clients depth {key[3]}",
        "request", "no errors, no request given up, the load generator never near a full core")


def header(args: argparse.Namespace, names: list[str], directory: Path,
           redis: str) -> list[str]:
    fsync = "all fsync" if len(names) > 1 else "it fsyncs"
    lines = [
        *benchlib.machine_info(),
        f"redis: {redis}",
        (f"servers: {', '.join(names)}, on loopback {benchlib.HOST}; {fsync} every acknowledged "
         f"write; store{'s' if len(names) > 1 else ''} on {benchlib.filesystem_of(directory)}"),
    ]
    if benchlib.KVCONFIG in names:
        lines.append("  kvconfig: twistd -n kvconfig --store sqlite:<tmp>, line protocol; SET "
                     "answered once committed (WAL, synchronous=FULL, group commit)")
        lines.extend(benchlib.baseline_info(args))
    if OTHER in names:
        lines.append("  redis:    redis-server --appendonly yes --appendfsync always --save \"\"; "
                     "SET answered once the AOF is fsynced")
    return [
        *lines,
        (f"load: ops {','.join(op.upper() for op in args.ops)}, clients "
         f"{','.join(map(str, args.clients))}, pipeline depths "
         f"{','.join(map(str, args.depths))}, {benchlib.KEY_COUNT} keys, "
         "short JSON string values;"),
        ("  one Python thread for all servers (selectors, pre-built requests); latency "
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
    parser = benchlib.argument_parser(__doc__)
    benchlib.add_counts(parser, "--clients", [1, 50], "concurrent clients per cell")
    benchlib.add_counts(parser, "--depths", [1, 16], "requests in flight per client")
    benchlib.add_cell_arguments(parser, ops=["set", "get"], fold_case=True, unit="op",
                                max_default=50000, other=OTHER)
    return benchlib.parse_checked(
        parser, argv, quick={"seconds": 1.0, "repeat": 1}, counts=["--clients", "--depths"],
        positive=["--seconds", "--max-ops", "--repeat"],
        checks=[(lambda args: not args.ops, "--ops needs at least one of set, get")])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = benchlib.server_names(args, OTHER)
    if OTHER in names and shutil.which("redis-server") is None:
        message = ("redis-server is not installed (not on PATH; on Debian: "
                   "apt-get install redis-server)")
        if args.only == OTHER:
            raise SystemExit(f"{message}: nothing to measure")
        print(f"{message}: measuring kvconfig only, without ratios", flush=True)
        names.remove(OTHER)
        redis = "not installed, not run"
    else:
        redis = redis_version() if OTHER in names else "not run (--only kvconfig)"
    return benchlib.throughput_bench(
        args, names, functools.partial(header, args, names, redis=redis),
        functools.partial(server_command, args),
        lambda server: benchlib.prefill(generator(server, "set", benchlib.PREFILL_CLIENTS,
                                                  PREFILL_DEPTH), "setting", "set"),
        functools.partial(measure, args), layout(args),
        lambda row: f"{row[0]} {row[1]:>3} clients depth {row[2]:>2}", notes)


if __name__ == "__main__":
    benchlib.run_main(main)
