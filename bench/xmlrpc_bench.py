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
then ``load``.  The load generator is this script's own process (benchlib's):
one thread, non-blocking sockets and ``selectors``, pre-built HTTP requests,
so that it costs the servers as little CPU as possible.  A client whose
connection the server closes (the stdlib server closes it after every
response) reconnects, and that reconnection counts in the latency of its call,
as a real client would see it.

Each cell (server x op x clients) runs after a short warm-up for at most
``--max-calls`` calls and at most ``--seconds`` seconds, and is repeated
``--repeat`` times, alternating the servers so that noise hits them alike.
calls/s counts the good calls completed within the time bound; the calls still
running then are waited for (up to 10 s, then given up) and count in the
latencies, so a server that stalls shows it in its max latency.  The table
shows the medians of calls/s, p50 and p99 over the repeats and the largest
latency seen in any of them, the ratio kvconfig/stdlib, and whether the row
meets the target: kvconfig at least 1.5x the stdlib server's calls/s at 16
and 64 clients, and no kvconfig call slower than 1 s.  A second table gives
the CPU used by each server and by the load generator, to show whether the
generator left the servers enough of the machine.

Before and after, side by side: with ``--baseline-twistd PATH`` the kvconfig
of another install (the code before a change, say) runs as a third server,
same options, taking its turn in every repeat; the tables gain its columns
and "vs baseline", kvconfig's calls/s over the baseline's.

How to run it
=============

From the repository, with the project installed in the venv (see benchlib
for what the benches share; it is not part of the test run)::

    .venv/bin/python bench/xmlrpc_bench.py            # full run, about 4 minutes
    .venv/bin/python bench/xmlrpc_bench.py --quick    # smoke run
    .venv/bin/python bench/xmlrpc_bench.py --baseline-twistd /work/base/.venv/bin/twistd
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from xmlrpc.client import dumps

import benchlib
from benchlib import CellKey, CellRun, CellSummary, Layout, Row, Server

OTHER = "stdlib"
TARGET_RATIO = 1.5
TARGET_CLIENTS = (16, 64)
LATENCY_LIMIT_S = 1.0

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


def server_command(args: argparse.Namespace, name: str, directory: Path,
                   port: int) -> list[str]:
    if name == OTHER:
        return [sys.executable, "-c", REFERENCE_SERVER, str(port)]
    return benchlib.kvconfig_command(directory, twistd=benchlib.twistd_of(name, args),
                                     xmlrpc_port=port)


def bench_items() -> list[tuple[str, object]]:
    """The keys and values saved and loaded: mostly addresses, some small lists."""
    items: list[tuple[str, object]] = []
    for i in range(benchlib.KEY_COUNT):
        address = f"10.0.{i // 250}.{i % 250 + 1}"
        value = [address, "10.0.0.5", 53] if i % 10 == 0 else address
        items.append((f"bench/k{i}", value))
    return items


@functools.cache
def build_requests(op: str, port: int) -> list[bytes]:
    """One pre-built HTTP request per key."""
    return [benchlib.http_post(port, "/RPC2", "text/xml", dumps(
                (key, value) if op == "save" else (key,), op, allow_none=True).encode("utf-8"))
            for key, value in bench_items()]


def generator(server: Server, op: str, clients: int) -> benchlib.LoadGenerator:
    parse = benchlib.http_parser(functools.partial(benchlib.xmlrpc_error,
                                                   expect_value=(op == "load")))
    speaker = benchlib.Cycle(build_requests(op, server.port), parse)
    return benchlib.LoadGenerator(server, speaker, clients)


def measure(args: argparse.Namespace, server: Server, row: Row) -> CellRun:
    """One run of one cell: warm up, then measure, on the same connections."""
    op, clients = row
    return benchlib.run_cell(generator(server, op, clients), args.max_calls, args.seconds,
                             "calls", LATENCY_LIMIT_S)


def target_text(kvconfig: CellSummary | None, stdlib: CellSummary | None, row: Row) -> str:
    """Whether a row meets its target, and if not, why: the ratio counts at
    TARGET_CLIENTS clients only."""
    ratio = TARGET_RATIO if row[1] in TARGET_CLIENTS else None
    slow = [f"max>{LATENCY_LIMIT_S:g}s"] if kvconfig and kvconfig.slow else []
    return benchlib.target_text(kvconfig, stdlib, OTHER, ratio, slow)


def layout(args: argparse.Namespace) -> Layout:
    return Layout(rows=[(op, clients) for op in args.ops for clients in args.clients],
                  columns=["op", "clients"], label=lambda row: [row[0], str(row[1])],
                  other=OTHER, rate="calls/s", target=target_text,
                  cpu_titles=("kvconfig server+writer", "stdlib server"),
                  baseline=bool(args.baseline_twistd))


def notes(cells: dict[CellKey, CellSummary]) -> list[str]:
    return benchlib.cell_notes(cells, lambda key: f"{key[0]} {key[1]} {key[2]} clients", "call",
                               f"no errors, no call slower than {LATENCY_LIMIT_S:g} s",
                               slow=f"{LATENCY_LIMIT_S:g} s")


def header(args: argparse.Namespace, names: list[str], directory: Path) -> list[str]:
    return [
        *benchlib.machine_info(),
        f"servers: {', '.join(names)}, on loopback {benchlib.HOST}",
        (f"  kvconfig: twistd -n kvconfig --store sqlite:<tmp> (durable save), "
         f"HTTP/1.1 keep-alive; store on {benchlib.filesystem_of(directory)}"),
        *benchlib.baseline_info(args),
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__)
    benchlib.add_counts(parser, "--clients", [1, 16, 64], "concurrent clients per cell")
    benchlib.add_cell_arguments(parser, ops=["save", "load"], fold_case=False, unit="call",
                                max_default=20000, other=OTHER)
    return benchlib.parse_checked(parser, argv, quick={"seconds": 1.0, "repeat": 1},
                                  counts=["--clients"],
                                  positive=["--seconds", "--max-calls", "--repeat"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = benchlib.server_names(args, OTHER)
    return benchlib.throughput_bench(
        args, names, functools.partial(header, args, names),
        functools.partial(server_command, args),
        lambda server: benchlib.prefill(generator(server, "save", benchlib.PREFILL_CLIENTS),
                                        "saving", "saved"),
        functools.partial(measure, args), layout(args),
        lambda row: f"{row[0]} {row[1]:>3} clients", notes)


if __name__ == "__main__":
    benchlib.run_main(main)
