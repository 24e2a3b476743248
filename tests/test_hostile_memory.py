"""
Memory under attack (issue 11, items 2, 3, 4 and 8), against the installed
``twistd kvconfig`` at its default limits: whatever clients send or leave
unread, the server's process tree (twistd and its sqlite writer) grows by
less than PEAK_GROWTH_BOUND_MB at its peak, and comes back near its
baseline once the attackers have gone.

Each test has a server of its own, so that what one leaves behind does not
count in another's figures.  Counts are the issue's where the property
needs them (150 bodies and 100 watchers: more than the budget holds) and
smaller where fewer show it (10 pipelining writers, against the 8 it takes
to fill --max-write-bytes; a 200,000-key store, where a listing of every
key is already 20 pages; the stall at 1M keys is measured by
bench/attack_bench.py, as tests do not assert on time).
"""

from __future__ import annotations

import selectors
import socket
import time
import xmlrpc.client

import pytest

from hostile import (
    MIB,
    PEAK_GROWTH_BOUND_MB,
    Memory,
    connections,
    warmed_up,
)
from serverprocess import KVConfigProcess

MALFORMED_REQUEST = -32700


@pytest.fixture
def kvserver(tmp_path):
    process = KVConfigProcess(tmp_path)
    process.start()
    warmed_up(process)
    yield process
    process.stop()


def xmlrpc_post(body: bytes, host: str = "127.0.0.1") -> bytes:
    return (b"POST /RPC2 HTTP/1.1\r\nHost: %s\r\nContent-Type: text/xml\r\n"
            b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body))) + body


def call_body(method: str, *params: object) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def read_response(sock: socket.socket, timeout: float = 60.0) -> bytes:
    """One HTTP response with a Content-Length (its body), read whole."""
    sock.settimeout(timeout)
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {bytes(data[:200])!r}")
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = bytearray(body)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed within a response")
        body += chunk
    return bytes(body[:length])


def fault_code(response_body: bytes) -> int | None:
    try:
        xmlrpc.client.loads(response_body)
    except xmlrpc.client.Fault as fault:
        return fault.faultCode
    return None


# Item 8: per-connection limits times the connections


def held_and_dropped(process: KVConfigProcess, port: int, data: bytes, rounds: int,
                     per_round: int) -> float:
    """*rounds* times: *per_round* connections send *data* (a request not
    complete: what the budget lets the server hold for them), then close.
    The peak growth."""
    with Memory(process) as memory:
        for _ in range(rounds):
            with connections(per_round, port) as socks:
                send_all_or_blocked(socks, data, seconds=30)
                time.sleep(0.2)
        return memory.peak_growth_mb


def test_partial_lines_of_closed_connections_are_freed_at_once(kvserver):
    """8 rounds of 60 line connections, each sending 1 MB of a line without
    its end, then closing: the budget lets the server hold about 64 MiB of
    them at once, and what a connection held is freed as it closes, so the
    peak growth over all rounds stays under the bound, as in one (it was
    485 MB when they were freed only by a collection of cycles).  What
    stays after is the heap's: see the watchers' test below."""
    partial_line = b"SET partial " + b"x" * 1_000_000
    peak = held_and_dropped(kvserver, kvserver.line_port, partial_line, 8, 60)
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"


def send_all_or_blocked(socks: list[socket.socket], data: bytes, seconds: float) -> int:
    """Send *data* on every socket, round robin, for at most *seconds*;
    the bytes left unsent."""
    view = memoryview(data)
    offsets = dict.fromkeys(socks, 0)
    for sock in socks:
        sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + seconds
        while offsets and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                sock = key.fileobj
                try:
                    offsets[sock] += sock.send(view[offsets[sock]:offsets[sock] + MIB])
                except BlockingIOError:
                    continue
                except OSError:
                    offsets[sock] = len(data)  # refused and closed: nothing held
                if offsets[sock] == len(data):
                    selector.unregister(sock)
                    del offsets[sock]
    return sum(len(data) - offset for offset in offsets.values())
