"""
Hostile load: the attacks of issue 11 replayed against ``twistd kvconfig``, and what each costs.

What it measures
================

Each attack runs against a server of its own (``twistd -n kvconfig``, a
sqlite store, default limits) on loopback, so that what one leaves behind
does not count in the next.  While it runs:

* a **prober**, a process of its own connected from 127.0.0.2 before the
  attack starts, sends ``PING`` on the line protocol every 10 ms and waits
  for each ``PONG``: the longest wait is the attack's *PING stall* (a PING
  unanswered when the attack ends counts up to then);
* **legitimate clients** from 127.0.0.2 (another address: the attackers use
  127.0.0.1 and meet its per-address caps) make 20 XML-RPC calls and 12 line
  commands, each on a connection of its own with a 5 s timeout, a third of a
  second into the attack; writes (``put``, ``SET``) where the attack allows
  them, reads where it stalls the disk.  *legit ok* counts those answered
  rightly; some attacks say more (the handshakes through a cookie flood);
* the **memory** of the server and its sqlite writer (VmRSS, and VmHWM reset
  at the start): *peak RSS* is its highest growth over the baseline taken
  just before the attack, *RSS after* its growth 5 s after the attackers
  have gone (waiting less if it comes within 50 MB sooner);
* **writes lost**: every write acknowledged to anyone (attacker or
  legitimate) is checked once the attack is over, after a restart of the
  server on the same store: a key missing, or at an older revision than
  acknowledged, is lost.

The attacks (issue 11's items; counts as the issue's unless said):

====================  ======================================================
2 pipelined SETs      10 clients pipeline ``SET key <1 MB>`` as fast as the
                      server reads, reading their replies: 2 s, then 3 s with
                      the sqlite writer stopped (SIGSTOP, a stalled disk)
3 unread listings     a store of 1M keys; 20 line clients send ``LIST`` and 3
                      XML-RPC clients ``list("")``, none reads, held 5 s
3 listing read        a store of 1M keys; a ``list("")`` and a ``LIST`` read
                      to their end: the stall of the issue's "no request
                      stalls a PING for more than 100 ms at 1M keys"
4 entity bombs        3 bodies at once, each one 4 MB entity referred to 95
                      times, and a multicall of 200 saves of one 1 MB entity
5 slowloris           1,000 connections on each TCP port trickling a request
                      head or a line, a byte every 3 s, for 12 s; the
                      legitimate clients start after the first 3 s
1,6,9 sqlite          fencing, recovery without a freeze, the WAL bound: the
                      other half of the issue; its hook is attack_sqlite()
7 subscription slots  one line connection pipelines 10,000 SUBSCRIBEs;
                      legit: a subscribe from another host, and its event
7 cookie flood        20,000 cookie requests a second from 127.0.0.2-255 (a
                      process of its own) for the attack's length; legit:
                      50 cookie requests and 10 handshakes from 127.0.1.1,
                      and the real ``kvconfig-agent`` on 127.0.0.1
                      subscribed (over UDP or TCP) and told of a change
8 held bodies         150 connections each send all of an 8 MiB body but its
                      last byte, and hold it
8 unread watchers     100 line connections WATCH every key and never read,
                      while a client writes 60 values of 100 KB
held-body lockout     8 connections hold 8 MiB bodies (what the shared
                      budget holds), not 150
held-body rounds      12 rounds of 8 such connections, each round closing
====================  ======================================================

Every attack is bounded in count and time and stops by itself; everything
is on loopback.  With ``--baseline-twistd PATH`` each attack runs against
that install too (the code before the issue, say), and each cell reads
``kvconfig / baseline``.  Expect the baseline to take minutes: the attacks
are the ones that hurt it.

How to run it
=============

From the repository, with the project installed in the venv, as root (the
sqlite writer is stopped with a signal, and VmHWM is reset through
/proc/PID/clear_refs)::

    .venv/bin/python bench/attack_bench.py
    .venv/bin/python bench/attack_bench.py --attacks slowloris,held-bodies
    .venv/bin/python bench/attack_bench.py --baseline-twistd /work/base/.venv/bin/twistd

See benchlib for what the benches share; it is not part of the test run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import BASELINE, HOST, KVCONFIG, PeakMemory

LEGIT_HOST = "127.0.0.2"
OTHER_NETWORK_HOST = "127.0.1.1"
MIB = 1 << 20
PROBE_INTERVAL = 0.01
PROBE_GIVE_UP_S = 120.0
SETTLE_SECONDS = 5.0
SETTLED_MB = 50
CALL_TIMEOUT = 5.0
LARGE_STORE_KEYS = 1_000_000
FLOOD_RATE = 20_000


# Servers


@dataclass
class Target:
    """A kvconfig under attack."""

    name: str
    twistd: str
    directory: Path
    xmlrpc_port: int
    line_port: int
    udp_port: int
    server: benchlib.Server

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.xmlrpc_port}/RPC2"

    def proxy(self, source: str = LEGIT_HOST,
              timeout: float = CALL_TIMEOUT) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.url, allow_none=True,
                                         transport=SourceTransport(source, timeout))


class SourceTransport(xmlrpc.client.Transport):
    """xmlrpc.client's transport, connecting from *source*."""

    def __init__(self, source: str, timeout: float) -> None:
        super().__init__()
        self.source, self.timeout = source, timeout

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        connect_to, self._extra_headers, _ = self.get_host_info(host)
        self._connection = host, http.client.HTTPConnection(
            connect_to, timeout=self.timeout, source_address=(self.source, 0))
        return self._connection[1]


@contextmanager
def running(name: str, twistd: str, directory: Path, keys: int = 0) -> Iterator[Target]:
    """kvconfig (twistd given) on the store in directory, once it has
    loaded its keys and committed a first write (its writer then has its
    working size)."""
    ports = [benchlib.free_port() for _ in range(2)] + [benchlib.free_port(socket.SOCK_DGRAM)]
    command = benchlib.kvconfig_command(directory, twistd=twistd, xmlrpc_port=ports[0],
                                        line_port=ports[1], udp_port=ports[2])
    with benchlib.running_server(name, directory, command, ports[0]) as server:
        target = Target(name, twistd, directory, *ports, server)
        deadline = time.monotonic() + 120
        while True:
            with suppress(OSError, xmlrpc.client.Error), target.proxy(timeout=30) as proxy:
                if proxy.stats()["keys"] >= keys:
                    proxy.save("warm-up", 1)
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not load its {keys} keys")
            time.sleep(0.2)
        time.sleep(0.5)
        yield target


def build_store(path: Path, keys: int) -> None:
    """A store file of keys keys (big/0000001 ...), each its own revision,
    written with kvconfig's own batch writer (far quicker than through a
    server); its history holds only the last change."""
    from kvconfig.backends.sqlitefile import make_batch, open_db, write_batches
    from kvconfig.model import PUT, Event, KeyValue
    raw = b'"' + b"v" * 40 + b'"'
    db = open_db(str(path))
    try:
        for start in range(1, keys + 1, 100_000):
            events = [Event(PUT, f"big/{r:07d}", r, KeyValue(
                key=f"big/{r:07d}", raw=raw, version=1, create_revision=r, mod_revision=r))
                for r in range(start, min(start + 100_000, keys + 1))]
            last = events[-1].revision
            write_batches(db, [make_batch(events, keys - 1 if last == keys else 0)])
    finally:
        db.close()


def writer_of(target: Target) -> int:
    children = benchlib.process_tree(target.pid)[1:]
    if not children:
        raise RuntimeError(f"{target.name} has no sqlite writer")
    return children[0]


# What every attack is measured with


def probe(port: int, stop: multiprocessing.synchronize.Event, out) -> None:
    """The prober's process: PING every PROBE_INTERVAL until stop, then
    send (longest wait, PINGs answered, what went wrong or None)."""
    worst, answered, problem = 0.0, 0, None
    try:
        sock = socket.create_connection((HOST, port), timeout=PROBE_GIVE_UP_S,
                                        source_address=(LEGIT_HOST, 0))
        reader = sock.makefile("rb")
        reader.readline()
        while not stop.is_set():
            sent = time.perf_counter()
            sock.sendall(b"PING\r\n")
            reply = reader.readline()
            worst = max(worst, time.perf_counter() - sent)
            if reply.rstrip() != b"PONG":
                problem = f"answered {reply[:60]!r}"
                break
            answered += 1
            time.sleep(max(0.0, sent + PROBE_INTERVAL - time.perf_counter()))
    except OSError as e:
        problem = f"{type(e).__name__}: {e}"
    out.send((worst, answered, problem))


class Prober:
    def __init__(self, target: Target) -> None:
        context = multiprocessing.get_context("fork")
        self.stop = context.Event()
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=probe, args=(target.line_port, self.stop, sender),
                                       daemon=True)
        self.process.start()
        self.started = time.monotonic()
        time.sleep(0.2)  # connected, greeted, pinging

    def result(self) -> tuple[float, str | None]:
        """(longest stall in seconds, what went wrong or None)."""
        self.stop.set()
        if self.receiver.poll(PROBE_GIVE_UP_S):
            worst, _, problem = self.receiver.recv()
        else:
            worst, problem = time.monotonic() - self.started, "no answer"
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        return worst, problem


class Ledger:
    """Writes acknowledged, anyone's: key -> the latest revision acknowledged."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.lock = threading.Lock()

    def ack(self, key: str, revision: int) -> None:
        with self.lock:
            self.acked[key] = max(revision, self.acked.get(key, 0))

    def lost(self, target: Target) -> int:
        lost = 0
        with target.proxy(timeout=60) as proxy:
            for key, revision in self.acked.items():
                kv = proxy.get(key)
                lost += kv is None or kv["mod_revision"] < revision
        return lost


class Legit(threading.Thread):
    """The legitimate clients: 20 XML-RPC calls and 12 line commands from
    LEGIT_HOST, each on a connection of its own, writes (put, SET) or
    reads (load, GET); extra, if given, runs after them and adds its
    words to the result."""

    def __init__(self, target: Target, ledger: Ledger, writes: bool = True,
                 delay: float = 0.3, extra: Callable[[], str] | None = None) -> None:
        super().__init__(daemon=True)
        self.target, self.ledger, self.writes, self.delay = target, ledger, writes, delay
        self.extra = extra
        self.xmlrpc_ok = self.line_ok = 0
        self.extra_text = ""
        self.start()

    def run(self) -> None:
        time.sleep(self.delay)
        for i in range(20):
            key = f"legit/x{i}"
            with suppress(OSError, xmlrpc.client.Error), self.target.proxy() as proxy:
                if self.writes:
                    self.ledger.ack(key, proxy.put(key, i)["revision"])
                    self.xmlrpc_ok += 1
                else:
                    proxy.load(key)
                    self.xmlrpc_ok += 1
        for i in range(12):
            key = f"legit/l{i}".encode()
            with suppress(OSError), socket.create_connection(
                    (HOST, self.target.line_port), timeout=CALL_TIMEOUT,
                    source_address=(LEGIT_HOST, 0)) as sock:
                reader = sock.makefile("rb")
                if not reader.readline().startswith(b"HELLO "):
                    continue
                sock.sendall(b"SET %s %d\r\n" % (key, i) if self.writes else b"GET %s\r\n" % key)
                reply = reader.readline()
                if self.writes and reply.startswith(b"OK "):
                    self.ledger.ack(key.decode(), int(reply.split()[1]))
                self.line_ok += reply.startswith((b"OK ", b"NIL ", b"VALUE "))
        if self.extra is not None:
            self.extra_text = self.extra()

    def result(self) -> str:
        self.join(timeout=120)
        text = f"{self.xmlrpc_ok}/20 + {self.line_ok}/12"
        return f"{text}, {self.extra_text}" if self.extra_text else text


@dataclass
class Measured:
    legit: str = "-"
    peak_mb: float = float("nan")
    after_mb: float = float("nan")
    stall_s: float = float("nan")
    lost: str = "-"
    notes: list[str] = field(default_factory=list)


# Attack helpers


def connect_many(count: int, port: int, source: str = HOST,
                 receive_buffer: int | None = None) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(10)
        sock.bind((source, 0))
        try:
            sock.connect((HOST, port))
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def send_all(socks: list[socket.socket], data: bytes, seconds: float) -> None:
    """data on every socket, round robin, for at most seconds."""
    view, offsets = memoryview(data), {sock: 0 for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
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
                    offsets[sock] = len(data)
                if offsets[sock] >= len(data):
                    selector.unregister(sock)
                    del offsets[sock]


def xmlrpc_post(body: bytes) -> bytes:
    return benchlib.http_post(0, "/RPC2", "text/xml", body).replace(b"Host: 127.0.0.1:0",
                                                                    b"Host: 127.0.0.1")


def read_replies(socks: list[socket.socket], seconds: float) -> None:
    """Read and drop what the server sends the sockets, for seconds."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                try:
                    if not key.fileobj.recv(1 << 20):
                        selector.unregister(key.fileobj)
                except BlockingIOError:
                    pass
                except OSError:
                    selector.unregister(key.fileobj)


# The attacks: each runs against a target, with a ledger, and says how the
# legitimate clients fared (and anything to note).


def attack_pipelined_sets(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    value = b'"' + b"x" * 1_000_000 + b'"'
    clients = []
    selector = selectors.DefaultSelector()
    for i in range(10):
        sock = socket.create_connection((HOST, target.line_port), timeout=10)
        sock.recv(1024)
        sock.setblocking(False)
        client = {"sock": sock, "line": b"SET pipelined/%d %s\r\n" % (i, value), "offset": 0,
                  "sent": 0, "replies": [], "inbox": bytearray(), "key": f"pipelined/{i}"}
        clients.append(client)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def pump(seconds: float, sending: bool = True) -> None:
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            for key, mask in selector.select(min(left, 0.1)):
                client = key.data
                if mask & selectors.EVENT_READ:
                    with suppress(BlockingIOError):
                        data = client["sock"].recv(1 << 20)
                        client["inbox"] += data
                        *lines, rest = bytes(client["inbox"]).split(b"\n")
                        client["replies"] += lines
                        client["inbox"] = bytearray(rest)
                if mask & selectors.EVENT_WRITE and (sending or client["offset"]):
                    with suppress(BlockingIOError):
                        client["offset"] += client["sock"].send(
                            memoryview(client["line"])[client["offset"]:])
                        if client["offset"] == len(client["line"]):
                            client["offset"], client["sent"] = 0, client["sent"] + 1

    try:
        pump(2.0)
        writer = writer_of(target)
        os.kill(writer, signal.SIGSTOP)
        try:
            legit = Legit(target, ledger, writes=False)
            pump(3.0)
        finally:
            os.kill(writer, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while any(len(c["replies"]) < c["sent"] for c in clients) and time.monotonic() < deadline:
            pump(0.2, sending=False)
        notes, errors = [], 0
        for client in clients:
            for reply in client["replies"]:
                if reply.startswith(b"OK "):
                    ledger.ack(client["key"], int(reply.split()[1]))
                else:
                    errors += 1
        sent = sum(c["sent"] for c in clients)
        unanswered = sent - sum(len(c["replies"]) for c in clients)
        notes.append(f"{sent} SETs of 1 MB sent, {errors} refused, {unanswered} unanswered "
                     "after the drain")
        return legit.result(), notes
    finally:
        for client in clients:
            client["sock"].close()
        selector.close()


def list_body() -> bytes:
    return xmlrpc_post(xmlrpc.client.dumps(("",), "list").encode())


def attack_unread_listings(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    line_socks = connect_many(20, target.line_port, receive_buffer=4096)
    xmlrpc_socks = connect_many(3, target.xmlrpc_port, receive_buffer=4096)
    try:
        for sock in line_socks:
            sock.sendall(b"LIST\r\n")
        for sock in xmlrpc_socks:
            sock.sendall(list_body())
        legit = Legit(target, ledger)
        time.sleep(5)
        return legit.result(), []
    finally:
        close_all(line_socks + xmlrpc_socks)


def attack_listing_read(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    notes = []
    with target.proxy(source=HOST, timeout=PROBE_GIVE_UP_S) as proxy:
        started = time.perf_counter()
        page = proxy.list("")
        notes.append(f'list(""): {len(page["items"])} items, more={page.get("more")}, '
                     f"{time.perf_counter() - started:.2f} s")
    with socket.create_connection((HOST, target.line_port), timeout=PROBE_GIVE_UP_S) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        started = time.perf_counter()
        sock.sendall(b"LIST\r\n")
        count = 0
        while not (line := reader.readline()).startswith((b"END", b"ERR")) and line:
            count += 1
        notes.append(f"LIST: {count} lines, {line.strip().decode()!r}, "
                     f"{time.perf_counter() - started:.2f} s")
    legit = Legit(target, ledger, delay=0)
    return legit.result(), notes


def entity_bomb(entity_bytes: int, call: str) -> bytes:
    return (b'<?xml version="1.0"?><!DOCTYPE methodCall [<!ENTITY e "' + b"x" * entity_bytes
            + b'">]>' + call.encode())


def attack_entity_bombs(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    save = ("<methodCall><methodName>save</methodName><params><param><value><string>bomb/one"
            "</string></value></param><param><value><string>" + "&e;" * 95
            + "</string></value></param></params></methodCall>")
    calls = "".join(
        "<value><struct><member><name>methodName</name><value>save</value></member>"
        "<member><name>params</name><value><array><data>"
        f"<value><string>bomb/m{i}</string></value><value><string>&e;</string></value>"
        "</data></array></value></member></struct></value>" for i in range(200))
    multicall = ("<methodCall><methodName>system.multicall</methodName><params><param>"
                 f"<value><array><data>{calls}</data></array></value></param></params>"
                 "</methodCall>")
    bombs = [entity_bomb(4_000_000, save)] * 3 + [entity_bomb(1_000_000, multicall)]
    socks = connect_many(len(bombs), target.xmlrpc_port)
    try:
        legit = Legit(target, ledger)
        for sock, bomb in zip(socks, bombs, strict=True):
            with suppress(OSError):
                sock.sendall(xmlrpc_post(bomb))
        answers = []
        for sock in socks:
            sock.settimeout(PROBE_GIVE_UP_S)
            with suppress(OSError):
                answers.append(sock.recv(65536).partition(b"\r\n\r\n")[2][:300])
        refused = sum(b"malformed_request" in answer for answer in answers)
        with target.proxy(timeout=60) as proxy:
            written = len(proxy.keys("bomb/")["keys"])
        return legit.result(), [f"{refused}/4 refused malformed_request, {written} bomb keys "
                                "written"]
    finally:
        close_all(socks)


def attack_slowloris(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    texts = {target.xmlrpc_port: b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\n",
             target.line_port: b"PING " + b"z" * 20}
    socks: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for port, text in texts.items():
            for _ in range(1000):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((HOST, port))
                selector.register(sock, selectors.EVENT_WRITE)
                socks[sock] = text
        deadline = time.monotonic() + 20
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                selector.unregister(key.fileobj)
    closed: set[socket.socket] = set()

    def drip(index: int) -> None:
        for sock, text in socks.items():
            if sock in closed:
                continue
            try:
                while sock.recv(65536):
                    pass
                closed.add(sock)  # recv gave b"": closed by the server
                continue
            except BlockingIOError:
                pass
            except OSError:
                closed.add(sock)
                continue
            with suppress(OSError):
                sock.send(text[index:index + 1])

    try:
        drip(0)
        started = time.monotonic()
        for tick in range(1, 5):
            time.sleep(max(0.0, started + 3 * tick - time.monotonic()))
            drip(tick)
            if tick == 1:  # every attacker connected has been let in, or refused
                legit = Legit(target, ledger, delay=0)
        result = legit.result()
        return result, [f"{len(socks) - len(closed)} of {len(socks)} attackers still "
                        "connected after 12 s"]
    finally:
        close_all(list(socks))


def attack_sqlite(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    """The hook for issue 11's items 1, 6 and the WAL line of 9 (the sqlite
    backend's fencing, commit timeout, recovery without a freeze, the WAL
    bound), which the engineer doing that work fills in: a stale writer
    SIGSTOPped then continued after a SIGKILL and restart, two servers on
    one store, writer deaths at 1M keys.  It should record every
    acknowledged write in the ledger, so that "writes lost" counts them."""
    raise NotImplementedError("the sqlite attacks are not written yet")


def attack_subscription_slots(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    with socket.create_connection((HOST, target.line_port), timeout=60) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"".join(b"SUBSCRIBE %d %s\r\n" % (1024 + i, b"a/" if i % 2 else b"b/")
                              for i in range(10_000)))
        taken = sum(reader.readline().startswith(b"OK subscribed") for _ in range(10_000))

    def subscribe_from_another_host() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LEGIT_HOST, 0))
            udp.settimeout(5)
            try:
                with target.proxy() as proxy:
                    proxy.subscribe("legit/", udp.getsockname()[1])
                    proxy.save("legit/event", 1)
                while json.loads(udp.recv(65536))["t"] != "event":
                    pass
            except (OSError, xmlrpc.client.Error, ValueError):
                return "subscribe from 127.0.0.2 failed"
        return "subscribe from 127.0.0.2 ok"

    legit = Legit(target, ledger, delay=0, extra=subscribe_from_another_host)
    return legit.result(), [f"the attacker took {taken} of the 10,000 slots"]


def cookie_request(prefix: str, cookie: str | None = None) -> bytes:
    message = {"v": 1, "t": "subscribe", "prefix": prefix, "pad": "." * 256}
    if cookie:
        message["cookie"] = cookie
    return json.dumps(message).encode()


def udp_answer(sock: socket.socket, kind: str, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            message = json.loads(sock.recv(65536))
        except (TimeoutError, ValueError):
            return None
        if message.get("t") == kind:
            return message
    return None


def handshake(sock: socket.socket, server: tuple[str, int], prefix: str) -> bool:
    """The cookie round trip and the subscribe, each tried up to 5 times."""
    cookie = None
    for _ in range(5):
        sock.sendto(cookie_request(prefix), server)
        if (cookie := udp_answer(sock, "cookie", 0.2)) is not None:
            break
    if cookie is None:
        return False
    for _ in range(5):
        sock.sendto(cookie_request(prefix, cookie["cookie"]), server)
        if udp_answer(sock, "subscribed", 0.2) is not None:
            return True
    return False


def flood(server: tuple[str, int], stop: multiprocessing.synchronize.Event, sent) -> None:
    """The flood's process: FLOOD_RATE cookie requests a second from
    127.0.0.2-255, in ticks of a millisecond (the time a network's bucket
    takes to earn a token), for at most a minute or until stop."""
    socks = []
    for host in range(2, 256):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.0.{host}", 0))
        socks.append(sock)
    request = cookie_request("flood/")
    per_tick, started, count = FLOOD_RATE // 1000, time.monotonic(), 0
    while not stop.is_set() and time.monotonic() - started < 60:
        for i in range(per_tick):
            with suppress(OSError):
                socks[(count + i) % len(socks)].sendto(request, server)
        count += per_tick
        sent.value = count
        time.sleep(max(0.0, started + 0.001 * count / per_tick - time.monotonic()))


def attack_cookie_flood(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    server = (HOST, target.udp_port)

    def through_the_flood() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as legit_udp:
            legit_udp.bind((OTHER_NETWORK_HOST, 0))
            answered = 0
            for _ in range(50):
                legit_udp.sendto(cookie_request("legit/"), server)
                answered += udp_answer(legit_udp, "cookie", 0.05) is not None
            handshakes = sum(handshake(legit_udp, server, f"legit{i}/") for i in range(10))
        agent = subprocess.Popen(
            [str(Path(target.twistd).with_name("kvconfig-agent")), "--server=127.0.0.1",
             f"--udp-port={target.udp_port}", f"--xmlrpc={target.url}", "--prefix=agent/",
             "--count=1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        told = False
        try:
            deadline = time.monotonic() + 20
            with target.proxy(timeout=30) as proxy:
                before = proxy.stats()["udp_subscribes"]
                while time.monotonic() < deadline and proxy.stats()["udp_subscribes"] <= before:
                    time.sleep(0.2)
                proxy.save("agent/k", "through the flood")
            with suppress(subprocess.TimeoutExpired):
                told = b"through the flood" in agent.communicate(timeout=10)[0]
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        return (f"{answered}/50 cookies, {handshakes}/10 handshakes, agent "
                f"{'told' if told else 'NOT told'}")

    context = multiprocessing.get_context("fork")
    stop, sent = context.Event(), context.Value("l", 0)
    flooder = context.Process(target=flood, args=(server, stop, sent), daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)
        legit = Legit(target, ledger, extra=through_the_flood)
        result = legit.result()
    finally:
        stop.set()
        flooder.join(timeout=10)
        if flooder.is_alive():
            flooder.kill()
    return result, [f"{sent.value} cookie requests sent"]


BODY_PREFIX = (b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
               b"Content-Length: %d\r\n\r\n" % (8 * MIB)) + b"<" * (8 * MIB - 1)


def attack_held_bodies(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    socks = (connect_many(75, target.xmlrpc_port)
             + connect_many(75, target.xmlrpc_port, source="127.0.0.3"))
    try:
        send_all(socks, BODY_PREFIX, seconds=30)
        legit = Legit(target, ledger, delay=0)
        return legit.result(), [f"{len(socks)} connections held bodies"]
    finally:
        close_all(socks)


def attack_unread_watchers(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    watchers = connect_many(100, target.line_port, receive_buffer=4096)
    value = b'"' + b"w" * 100_000 + b'"'
    try:
        for sock in watchers:
            sock.sendall(b"WATCH\r\n")
        time.sleep(0.5)
        legit = Legit(target, ledger)
        acked = 0
        with socket.create_connection((HOST, target.line_port), timeout=60,
                                      source_address=(LEGIT_HOST, 0)) as writer:
            reader = writer.makefile("rb")
            reader.readline()
            writer.sendall(b"".join(b"SET watched/%d %s\r\n" % (i, value) for i in range(60)))
            for i in range(60):
                reply = reader.readline()
                if reply.startswith(b"OK "):
                    acked += 1
                    ledger.ack(f"watched/{i}", int(reply.split()[1]))
        return f"{legit.result()}, {acked}/60 SETs of 100 KB", []
    finally:
        close_all(watchers)


def attack_held_body_lockout(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    socks = connect_many(8, target.xmlrpc_port)
    try:
        send_all(socks, BODY_PREFIX, seconds=30)
        legit = Legit(target, ledger, delay=0)
        return legit.result(), []
    finally:
        close_all(socks)


def attack_held_body_rounds(target: Target, ledger: Ledger) -> tuple[str, list[str]]:
    for _ in range(12):
        socks = connect_many(8, target.xmlrpc_port)
        send_all(socks, BODY_PREFIX, seconds=30)
        time.sleep(0.2)
        close_all(socks)
    legit = Legit(target, ledger, delay=0)
    return legit.result(), []


@dataclass(frozen=True)
class Attack:
    name: str
    item: str
    run: Callable[[Target, Ledger], tuple[str, list[str]]]
    keys: int = 0  # the store it needs: that many keys


ATTACKS = [
    Attack("pipelined-sets", "2", attack_pipelined_sets),
    Attack("unread-listings", "3", attack_unread_listings, LARGE_STORE_KEYS),
    Attack("listing-read", "3", attack_listing_read, LARGE_STORE_KEYS),
    Attack("entity-bombs", "4", attack_entity_bombs),
    Attack("slowloris", "5", attack_slowloris),
    Attack("sqlite", "1,6,9", attack_sqlite),
    Attack("subscription-slots", "7", attack_subscription_slots),
    Attack("cookie-flood", "7", attack_cookie_flood),
    Attack("held-bodies", "8", attack_held_bodies),
    Attack("unread-watchers", "8", attack_unread_watchers),
    Attack("held-body-lockout", "new", attack_held_body_lockout),
    Attack("held-body-rounds", "new", attack_held_body_rounds),
]


# Running them


def measure(attack: Attack, name: str, twistd: str, directory: Path,
            template: Path | None) -> Measured:
    """One attack against one install, on a server of its own."""
    directory.mkdir(parents=True)
    if attack.keys:
        shutil.copy(template, directory / "kvconfig.db")
    ledger, measured = Ledger(), Measured()
    try:
        with running(name, twistd, directory, attack.keys) as target:
            prober = Prober(target)
            with PeakMemory(target.pid) as memory:
                try:
                    measured.legit, measured.notes = attack.run(target, ledger)
                finally:
                    measured.stall_s, problem = prober.result()
                    if problem:
                        measured.notes.append(f"prober: {problem}")
                measured.peak_mb = memory.peak_growth_mb
                measured.after_mb = memory.settles(SETTLED_MB, SETTLE_SECONDS)
            measured.notes += [line for line in target.server.log_problems(5)
                               if "no warnings" not in line]
        if ledger.acked:
            with running(name, twistd, directory, attack.keys) as target:
                lost = ledger.lost(target)
            measured.lost = f"{lost}/{len(ledger.acked)}"
        else:
            measured.lost = "0/0"
    except NotImplementedError as e:
        measured.stall_s = measured.peak_mb = measured.after_mb = float("nan")
        measured.legit = measured.lost = "-"
        measured.notes.append(f"not run: {e}")
    return measured


def cell(measured: list[Measured], text: Callable[[Measured], str]) -> str:
    return " / ".join(text(m) for m in measured)


def mb(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def stall(value: float) -> str:
    if value != value:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def report(results: dict[str, list[Measured]], names: list[str]) -> None:
    rows = [["attack", "item", "legit ok (xmlrpc + line, ...)", "peak RSS MB", "RSS after MB",
             "longest PING stall", "writes lost"]]
    for attack in ATTACKS:
        if attack.name not in results:
            continue
        measured = results[attack.name]
        rows.append([attack.name, attack.item, cell(measured, lambda m: m.legit),
                     cell(measured, lambda m: mb(m.peak_mb)),
                     cell(measured, lambda m: mb(m.after_mb)),
                     cell(measured, lambda m: stall(m.stall_s)),
                     cell(measured, lambda m: m.lost)])
    print()
    if len(names) > 1:
        print(f"each cell: {' / '.join(names)}")
    print(benchlib.format_table(rows))
    print()
    for attack in ATTACKS:
        for name, measured in zip(names, results.get(attack.name, []), strict=False):
            for note in measured.notes:
                print(f"{attack.name} {name}: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__)
    names = [attack.name for attack in ATTACKS]
    parser.add_argument("--attacks", type=benchlib.op_list(names, fold_case=True),
                        default=names,
                        help=f"attacks, comma-separated (default all: {','.join(names)})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the attacks that need no store of 1M keys")
    benchlib.add_baseline_argument(parser, "nothing else")
    return benchlib.parse_checked(
        parser, argv, quick={"attacks": [a.name for a in ATTACKS if not a.keys]}, counts=(),
        positive=[])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    names = [KVCONFIG] + ([BASELINE] if args.baseline_twistd else [])
    twistds = {KVCONFIG: benchlib.twistd_path(), BASELINE: args.baseline_twistd}
    results: dict[str, list[Measured]] = {}
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvattack-")))
        print("\n".join([
            "kvconfig under the attacks of issue 11, each on a server of its own (sqlite store,",
            f"default limits) in {directory}",
            f"  kvconfig: {twistds[KVCONFIG]} -n kvconfig",
            *benchlib.baseline_info(args), *benchlib.machine_info()]), flush=True)
        template = None
        if any(ATTACKS_BY_NAME[name].keys for name in args.attacks):
            template = directory / "large.db"
            started = time.monotonic()
            build_store(template, LARGE_STORE_KEYS)
            benchlib.progress(f"built a store of {LARGE_STORE_KEYS} keys in "
                              f"{time.monotonic() - started:.0f} s")
        for attack in ATTACKS:
            if attack.name not in args.attacks:
                continue
            for name in names:
                started = time.monotonic()
                measured = measure(attack, name, twistds[name], directory / attack.name / name,
                                   template)
                results.setdefault(attack.name, []).append(measured)
                took = time.monotonic() - started
                benchlib.progress(f"  {attack.name:<20} {name:<8} {took:5.0f} s: "
                                  f"legit {measured.legit}, peak {mb(measured.peak_mb)} MB, "
                                  f"stall {stall(measured.stall_s)}, lost {measured.lost}")
            shutil.rmtree(directory / attack.name, ignore_errors=True)
    report(results, names)
    benchlib.footer(began)
    return 0


ATTACKS_BY_NAME = {attack.name: attack for attack in ATTACKS}

if __name__ == "__main__":
    benchlib.run_main(main)
