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

import os
import selectors
import signal
import socket
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hostile import (
    MIB,
    PEAK_GROWTH_BOUND_MB,
    LineClient,
    Memory,
    build_store,
    connections,
    proxy_from,
    serving,
    wait_for,
    warmed_up,
    writer_pid,
)
from serverprocess import KVConfigProcess

#: Memory that may stay behind after an attack, once it has had a few seconds.
SETTLED_BOUND_MB = 50
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


# Item 2: writes in flight


class Pipeliner:
    """Clients that pipeline ``SET <own key> <1 MB>`` as fast as the server
    reads them, and read their replies: each keeps the server's socket
    full, so what the server holds is bounded only by what it chooses to
    read."""

    def __init__(self, port: int, clients: int, value_bytes: int = 1_000_000) -> None:
        self.value = b'"' + b"x" * value_bytes + b'"'
        self.selector = selectors.DefaultSelector()
        self.clients = []
        for i in range(clients):
            # Each from an address of its own, as from machines of a fleet
            # (one address may hold --max-buffer-bytes-per-address only).
            sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                            source_address=(f"127.0.1.{i + 1}", 0))
            sock.recv(1024)  # the greeting
            sock.setblocking(False)
            line = b"SET pipelined/%d %s\r\n" % (i, self.value)
            client = {"sock": sock, "line": line, "offset": 0, "sent": 0, "replies": [],
                      "inbox": bytearray(), "key": f"pipelined/{i}"}
            self.clients.append(client)
            self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def run(self, seconds: float, sending: bool = True) -> None:
        """Send (if *sending*; a line begun is always finished) and read for
        *seconds*."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            for key, mask in self.selector.select(min(left, 0.1)):
                client = key.data
                if mask & selectors.EVENT_READ:
                    self._receive(client)
                if mask & selectors.EVENT_WRITE and (sending or client["offset"]):
                    self._send(client)

    def _send(self, client: dict) -> None:
        line = client["line"]
        try:
            done = client["sock"].send(memoryview(line)[client["offset"]:])
        except BlockingIOError:
            return
        client["offset"] += done
        if client["offset"] == len(line):
            client["offset"] = 0
            client["sent"] += 1

    def _receive(self, client: dict) -> None:
        try:
            data = client["sock"].recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the server closed a pipelining client")
        inbox = client["inbox"]
        inbox += data
        *lines, rest = bytes(inbox).split(b"\n")
        client["replies"] += [line.rstrip(b"\r") for line in lines]
        client["inbox"] = bytearray(rest)

    @property
    def sent(self) -> int:
        return sum(client["sent"] for client in self.clients)

    def drain(self, timeout: float) -> None:
        """Read until every line sent is answered (at most *timeout*)."""
        deadline = time.monotonic() + timeout
        while any(len(c["replies"]) < c["sent"] for c in self.clients):
            if time.monotonic() > deadline:
                raise AssertionError("replies missing after the writer resumed: "
                                     f"{[(c['sent'], len(c['replies'])) for c in self.clients]}")
            self.run(0.2, sending=False)

    def close(self) -> None:
        for client in self.clients:
            client["sock"].close()
        self.selector.close()


def check_acknowledged(process: KVConfigProcess, pipeliner: Pipeliner) -> None:
    """Every SET was answered OK (or, held by a stall past a commit
    timeout, ERR unavailable: "may or may not be applied"), and each
    client's key holds its last acknowledged write."""
    with proxy_from(process) as proxy:
        for client in pipeliner.clients:
            replies = client["replies"]
            assert all(r.startswith((b"OK ", b"ERR unavailable 8 ")) for r in replies), \
                {r[:80] for r in replies}
            acknowledged = [int(r.split()[1]) for r in replies if r.startswith(b"OK ")]
            assert acknowledged, "no write was acknowledged"
            if replies[-1].startswith(b"OK "):
                stored = proxy.get(client["key"])
                assert stored["mod_revision"] == acknowledged[-1], (
                    f"{client['key']}: acknowledged at {acknowledged[-1]}, holds {stored}")


@contextmanager
def writer_stopped(process: KVConfigProcess) -> Iterator[None]:
    """The server's sqlite writer stopped (SIGSTOP: a stalled disk), and
    continued after, whatever happens."""
    writer = writer_pid(process)
    os.kill(writer, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(writer, signal.SIGCONT)


def test_a_client_pipelining_1mb_writes_to_a_stalled_writer_is_not_read_further(kvserver):
    """One client pipelines ``SET key <1 MB>`` as fast as it can for 4 s,
    reading its replies, while the writer is stopped (issue 11: the server
    grew by 110 MB/s).  Past --max-client-writes/--max-client-write-bytes
    the server stops reading it, so its peak growth stays under the bound;
    once the writer resumes, every SET is answered and the key holds the
    last acknowledged one."""
    pipeliner = Pipeliner(kvserver.line_port, clients=1)
    try:
        with Memory(kvserver) as memory:
            with writer_stopped(kvserver):
                pipeliner.run(4.0)
            pipeliner.run(0.5, sending=False)
            peak = memory.peak_growth_mb
        pipeliner.drain(timeout=60)
        assert peak < PEAK_GROWTH_BOUND_MB, (
            f"peak RSS grew by {peak:.0f} MB for {pipeliner.sent} SETs of 1 MB")
        check_acknowledged(kvserver, pipeliner)
    finally:
        pipeliner.close()


def test_ten_clients_pipelining_1mb_writes_stay_under_the_bound(kvserver):
    """Ten clients pipeline ``SET key <1 MB>``, reading their replies: 2 s
    with the writer committing, then 3 s with it stopped.  (Ten, as 10 x
    --max-client-write-bytes is more than --max-write-bytes.)  Issue 11:
    2.4 GB after 20 s from one client.  The peak growth stays under the
    bound, and once the writer resumes every SET is answered."""
    pipeliner = Pipeliner(kvserver.line_port, clients=10)
    try:
        with Memory(kvserver) as memory:
            pipeliner.run(2.0)
            with writer_stopped(kvserver):
                pipeliner.run(3.0)
            pipeliner.run(0.5, sending=False)
            peak = memory.peak_growth_mb
        pipeliner.drain(timeout=60)
        check_acknowledged(kvserver, pipeliner)
        assert peak < PEAK_GROWTH_BOUND_MB, (
            f"peak RSS grew by {peak:.0f} MB for {pipeliner.sent} SETs of 1 MB")
    finally:
        pipeliner.close()


def test_the_history_holds_about_history_bytes(kvserver):
    """100 saves of 1 MB values, one after another: the history keeps
    --history-bytes (64 MiB) of them, and the server grows by not much more
    than that (a quarter more, and 16 MB).  (Before the keyspace kept values
    encoded only, each was held twice: ~130 MB.)"""
    value = "h" * 1_000_000
    with Memory(kvserver) as memory, proxy_from(kvserver) as proxy:
        for i in range(100):
            proxy.save(f"history/{i % 4}", value)
        held = memory.settles(0, timeout=1)
    assert held < 64 * 1.25 + 16, f"RSS grew by {held:.0f} MB"


# Item 3: listings of a large store

STORE_KEYS = 200_000


@pytest.fixture
def large_server(tmp_path):
    """A server on a store of STORE_KEYS keys (big/0000001 ...), made in its file."""
    build_store(tmp_path / "kvconfig.db", STORE_KEYS)
    process = KVConfigProcess(tmp_path)
    process.start()
    serving(process, STORE_KEYS)
    yield process
    process.stop()


def test_listings_of_a_large_store_are_pages_and_unread_ones_cost_little(large_server):
    """On a store of 200,000 keys: 20 line clients send ``LIST`` and 6
    XML-RPC clients ``list("")``, and none of them reads (issue 11: at 1M
    keys, +1.07 GB and +2.4 GB, and another client's PING held 64 s).  The
    server's peak growth stays under the bound while they wait, a
    legitimate client meanwhile gets its PONG, and ``list("")`` and ``LIST``
    each answer one page of --max-list-items (10,000) keys saying ``more``
    (so that no call formats the whole store: the mechanism behind "no
    request stalls a PING for more than 100 ms at 1M keys", which
    bench/attack_bench.py measures)."""
    with Memory(large_server) as memory, \
            connections(20, large_server.line_port, receive_buffer=4096) as line_clients, \
            connections(6, large_server.port, receive_buffer=4096) as xmlrpc_clients:
        for sock in line_clients:
            sock.sendall(b"LIST\r\n")
        for sock in xmlrpc_clients:
            sock.sendall(xmlrpc_post(call_body("list", "")))
        with LineClient(large_server, timeout=30) as legit:
            assert legit.command(b"PING still there") == b"PONG still there"
            time.sleep(2)  # the unread listings have had their chance to grow
            assert legit.command(b"PING") == b"PONG"
        peak = memory.peak_growth_mb
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"

    with proxy_from(large_server, timeout=60) as proxy:
        page = proxy.list("")
        assert len(page["items"]) == 10_000 and page["more"] is True
        assert page["items"][-1]["key"] == "big/0010000"
        keys = proxy.keys("", {"after": "big/0199990"})
        assert keys["keys"] == [f"big/{i:07d}" for i in range(199_991, 200_001)]
        assert keys["more"] is False
    with LineClient(large_server, timeout=60) as legit:
        lines, end = legit.listing(b"LIST")
        assert len(lines) == 10_000 and end.endswith(b" 10000 more"), end
        assert lines[-1].startswith(b"VALUE big/0010000 ")


# Item 4: XML entities


def entity_bomb(entity_bytes: int, call: str) -> bytes:
    """A body that defines one entity ``e`` of *entity_bytes*, then *call*
    (a methodCall that refers to it)."""
    return (b'<?xml version="1.0"?><!DOCTYPE methodCall [<!ENTITY e "'
            + b"x" * entity_bytes + b'">]>' + call.encode())


def save_call(key: str, value: str) -> str:
    return ("<methodCall><methodName>save</methodName><params>"
            f"<param><value><string>{key}</string></value></param>"
            f"<param><value><string>{value}</string></value></param></params></methodCall>")


def multicall_of_saves(count: int, value: str) -> str:
    calls = "".join(
        "<value><struct><member><name>methodName</name><value>save</value></member>"
        "<member><name>params</name><value><array><data>"
        f"<value><string>bomb/m{i}</string></value><value><string>{value}</string></value>"
        "</data></array></value></member></struct></value>" for i in range(count))
    return ("<methodCall><methodName>system.multicall</methodName><params><param><value>"
            f"<array><data>{calls}</data></array></value></param></params></methodCall>")


def test_entity_bombs_are_refused_before_they_expand(kvserver):
    """Three 4 MB bodies at once, each defining one 4 MB entity and
    referring to it 95 times (issue 11: a 380 MB string each, 31 s frozen
    and 2.6 GB for the three), and a multicall of 200 saves of one 1 MB
    entity: each is malformed_request, no key is written, and the peak
    growth stays under the bound."""
    bombs = [entity_bomb(4_000_000, save_call("bomb/one", "&e;" * 95))] * 3
    bombs.append(entity_bomb(1_000_000, multicall_of_saves(200, "&e;")))
    with Memory(kvserver) as memory, connections(len(bombs), kvserver.port) as socks:
        for sock, bomb in zip(socks, bombs, strict=True):
            try:
                sock.sendall(xmlrpc_post(bomb))
            except OSError:
                pass  # answered and closed before the body was all sent
        codes = [fault_code(read_response(sock)) for sock in socks]
        peak = memory.peak_growth_mb
    assert codes == [MALFORMED_REQUEST] * len(bombs)
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"
    with proxy_from(kvserver) as proxy:
        assert proxy.keys("bomb/")["keys"] == []


# Item 8: per-connection limits times the connections

BODY_BYTES = 8 * MIB
BODY_PREFIX = (b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
               b"Content-Length: %d\r\n\r\n" % BODY_BYTES) + b"<" * (BODY_BYTES - 1)


def test_bodies_held_by_many_connections_share_one_budget(kvserver):
    """150 connections (from two addresses, as one address may have 128)
    each send the head of an 8 MiB body and all of it but its last byte,
    and hold it (issue 11: +1.2 GB).  The bodies share --max-buffer-bytes
    (64 MiB): the peak growth stays under the bound, and the server still
    answers."""
    with Memory(kvserver) as memory:
        with connections(75, kvserver.port) as first, \
                connections(75, kvserver.port, source="127.0.0.3") as second:
            unsent = send_all_or_blocked(first + second, BODY_PREFIX, seconds=30)
            time.sleep(1)
            peak = memory.peak_growth_mb
    assert unsent == 0, f"{unsent} bytes could not be sent in 30 s"
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"
    with proxy_from(kvserver) as proxy:
        assert "revision" in proxy.stats()


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
            if memory.peak_growth_mb >= PEAK_GROWTH_BOUND_MB:
                break  # the test has failed: no need to go on
        return memory.peak_growth_mb


def test_bodies_of_closed_connections_are_freed_at_once(kvserver):
    """12 rounds of 8 connections, each holding all of an 8 MiB body but its
    last byte (the 64 MiB the budget allows), then closing: what they held
    is freed as they close, so the peak growth over all rounds stays under
    the bound (as in one)."""
    peak = held_and_dropped(kvserver, kvserver.port, BODY_PREFIX, 12, 8)
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"


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


WATCHED_VALUE = b'"' + b"w" * 100_000 + b'"'
WATCHED_WRITES = 60


def watched_by_non_readers(process: KVConfigProcess) -> tuple[list[bytes], int]:
    """100 line connections WATCH every key and never read, while a client
    writes WATCHED_WRITES values of 100 KB (6 MB of events for each
    watcher); then they close.  (The writer's replies, the watchers
    dropped.)"""
    with connections(100, process.line_port, receive_buffer=4096) as watchers:
        for sock in watchers:
            sock.sendall(b"WATCH\r\n")
        with LineClient(process) as writer:
            wait_for(lambda: watching(writer) >= 100, "the 100 watches")
            writer.send(*(b"SET watched/%d %s" % (i % 10, WATCHED_VALUE)
                          for i in range(WATCHED_WRITES)))
            replies = [writer.line() for _ in range(WATCHED_WRITES)]
            dropped = wait_for(lambda: stat(writer, b"line_watchers_dropped"),
                               "watchers to be dropped")
        time.sleep(1)
    return replies, dropped


#: What the heap may keep after the watchers have gone: the memory is free,
#: but their event lines (100 KB, under glibc's mmap threshold) came from a
#: heap that fragments, and it is not all given back to the system (58-89 MB
#: on the development machine; malloc_trim(0) brought 89 MB to 15 MB).
HEAP_KEPT_MB = 2 * SETTLED_BOUND_MB


def test_watchers_that_do_not_read_share_one_budget(kvserver):
    """100 watchers that never read, 6 MB of events for each (issue 11:
    +1.2 GB, which stayed after they closed).  Their backlogs share
    --max-buffer-bytes: the peak growth stays under the bound, the watchers
    are told slow_consumer, the writer's SETs are answered (OK, or
    limit_exceeded while the budget is full), and once the watchers have
    gone the server keeps no more than HEAP_KEPT_MB."""
    with Memory(kvserver) as memory:
        replies, dropped = watched_by_non_readers(kvserver)
        peak = memory.peak_growth_mb
        settled = memory.settles(SETTLED_BOUND_MB, timeout=5)
    assert dropped > 0
    assert peak < PEAK_GROWTH_BOUND_MB, f"peak RSS grew by {peak:.0f} MB"
    assert settled < HEAP_KEPT_MB, f"RSS still {settled:.0f} MB above its baseline"
    assert all(reply.startswith((b"OK ", b"ERR limit_exceeded 9 ")) for reply in replies), \
        {reply[:100] for reply in replies}
    assert any(reply.startswith(b"OK ") for reply in replies)


def stat(client: LineClient, name: bytes) -> int:
    client.send(b"STATS")
    value = 0
    while (line := client.line()) != b"END":
        if line.startswith(b"STAT " + name + b" "):
            value = int(line.split()[2])
    return value


def watching(client: LineClient) -> int:
    return stat(client, b"line_watches")
