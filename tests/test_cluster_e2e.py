"""Cluster mode end to end: real etcd clusters (tests/etcdcluster.py), the
installed ``twistd kvconfig`` as several nodes on one cluster, the installed
``twistd kvconfig-agent``, and real clients on 127.0.0.1: the stdlib
``xmlrpc.client``, raw TCP for the line protocol, raw UDP for notifications.

What is checked is what a client of the cluster can see: a write through one
node reaches every other node's WATCH streams and UDP subscribers with the
revision it was acknowledged with, exactly once and in revision order; etcd
losing quorum makes writes fail with ``unavailable`` while reads go on and say
they may be stale; etcd members and kvconfig nodes dying under load lose no
acknowledged write.  Every wait polls under a deadline; nothing asserts on
wall-clock time (durations only appear in failure messages).
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple
from xmlrpc.client import Fault, ServerProxy

import pytest
from test_agent_e2e import AgentProcess, read_json, server_items, wait_for

from etcdcluster import EtcdCluster
from serverprocess import KVConfigProcess

pytest_plugins = ["etcdcluster"]

#: Heartbeats every second, so that an agent notices a dead node in a few seconds.
FAST_HEARTBEAT = "--heartbeat-seconds=1"
UNAVAILABLE = 8
WAIT = 30.0


# Clients -------------------------------------------------------------------


class Change(NamedTuple):
    """One change as a client saw it acknowledged, or as a watcher saw it."""

    op: str            # "put" or "delete"
    key: str
    revision: int
    value: Any = None


def parse_event(line: str) -> Change:
    """An ``EVENT <id> put|delete ...`` line of the line protocol."""
    words = line.split(" ", 8)
    if words[2] == "put":
        # EVENT id put key revision version create_revision expires_at json
        return Change("put", words[3], int(words[4]), json.loads(words[8]))
    return Change("delete", words[3], int(words[4]))


class LineError(Exception):
    """An ``ERR name code message`` reply."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        words = line.split(" ", 3)
        self.line = line
        self.name = words[1]
        self.code = int(words[2])


class LineClient:
    """A raw TCP connection to a node's line protocol.

    A reader thread files EVENT lines (parsed, in arrival order) apart from
    replies, so one connection can both watch and send commands.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        self.events: list[Change] = []
        self.raw_events: list[str] = []
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.hello = self._reply()
        assert self.hello.startswith("HELLO kvconfig "), self.hello

    def _read(self) -> None:
        try:
            with self.sock.makefile("rb") as lines:
                for raw in lines:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("EVENT "):
                        self.raw_events.append(line)
                        self.events.append(parse_event(line))
                    else:
                        self._replies.put(line)
        except OSError:
            pass
        self._replies.put(None)

    def _reply(self, timeout: float = WAIT) -> str:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply from the line protocol in {timeout} s") from None
        if line is None:
            raise AssertionError("the line-protocol connection closed")
        return line

    def request(self, command: str, multi: bool = False) -> list[str]:
        """Send one command; its reply lines (up to END for a listing)."""
        self.sock.sendall(command.encode("utf-8") + b"\n")
        lines = [self._reply()]
        while multi and not lines[-1].startswith(("END", "ERR ")):
            lines.append(self._reply())
        return lines

    def set(self, key: str, value: Any) -> int:
        """SET; the acknowledged revision, or LineError."""
        [reply] = self.request(f"SET {key} {json.dumps(value, separators=(',', ':'))}")
        if not reply.startswith("OK "):
            raise LineError(reply)
        return int(reply.split()[1])

    def delete(self, key: str) -> int:
        """DEL of a key that exists; the acknowledged revision, or LineError."""
        [reply] = self.request(f"DEL {key}")
        if not reply.startswith("OK "):
            raise LineError(reply)
        assert reply.endswith(" deleted"), reply
        return int(reply.split()[1])

    def watch(self, prefix: str) -> int:
        """WATCH prefix; the revision the watch starts after."""
        [reply] = self.request(f"WATCH {prefix}")
        assert reply.startswith("OK watching "), reply
        return int(reply.split()[4])

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=10)


class UDPSubscriber:
    """A raw UDP subscriber: the cookie handshake of kvconfig/notifier.py's
    wire format, then every datagram kept, with the lease renewed every 5 s."""

    def __init__(self, server_udp_port: int, prefix: str) -> None:
        self.server = ("127.0.0.1", server_udp_port)
        self.prefix = prefix
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A large buffer: loss on loopback would only come from overflowing it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.cookie: str | None = None
        self.subscribed: list[dict] = []
        self.events: list[dict] = []
        self.heartbeats: list[dict] = []
        self.other: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ask(self) -> None:
        request = {"v": 1, "t": "subscribe", "prefix": self.prefix, "pad": "-" * 256}
        if self.cookie is not None:
            request["cookie"] = self.cookie
        self.sock.sendto(json.dumps(request).encode(), self.server)

    def _run(self) -> None:
        renew_at = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= renew_at:
                self._ask()
                renew_at = time.monotonic() + (5.0 if self.subscribed else 0.5)
            try:
                message = json.loads(self.sock.recv(65536))
            except (TimeoutError, OSError):
                continue
            kind = message.get("t")
            if kind == "cookie":
                self.cookie = message["cookie"]
                self._ask()
            elif kind == "subscribed":
                self.subscribed.append(message)
            elif kind == "event":
                self.events.append(message)
            elif kind == "heartbeat":
                self.heartbeats.append(message)
            else:
                self.other.append(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()


# Processes -----------------------------------------------------------------


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """The processes of one test, for failure messages and cleanup."""

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        self.tmp_path = tmp_path
        self.stack = stack
        self.etcd: EtcdCluster | None = None
        self.nodes: dict[str, KVConfigProcess] = {}
        self.agents: list[AgentProcess] = []

    def node(self, name: str, urls: list[str], *extra: str) -> KVConfigProcess:
        """Start ``twistd kvconfig`` on etcd at *urls* (in that order) and wait
        until it is in step with etcd."""
        directory = self.tmp_path / name
        directory.mkdir()
        node = KVConfigProcess(directory, "etcd:" + ",".join(urls), FAST_HEARTBEAT, *extra)
        self.nodes[name] = node
        self.stack.callback(stop_process, node)
        node.start()
        self.wait_in_step(node)
        return node

    def agent(self, server: KVConfigProcess, prefix: str, output: Path,
              *extra: str) -> AgentProcess:
        agent = AgentProcess(self.tmp_path, "agent", server, prefix, f"--output={output}",
                             "--debounce=0.05", "--max-delay=0.5", *extra)
        self.agents.append(agent)
        self.stack.callback(agent.stop)
        agent.start()
        return agent

    def line(self, node: KVConfigProcess) -> LineClient:
        client = LineClient(node.line_port)
        self.stack.callback(client.close)
        return client

    def subscriber(self, node: KVConfigProcess, prefix: str) -> UDPSubscriber:
        subscriber = UDPSubscriber(node.udp_port, prefix)
        self.stack.callback(subscriber.close)
        return subscriber

    def logs(self) -> str:
        parts = [f"--- node {name} log ---\n{tail(node.log())}"
                 for name, node in self.nodes.items()]
        parts += [tail(agent.log()) for agent in self.agents]
        if self.etcd is not None:
            parts += [f"--- etcd {m.name} ({'up' if m.running else 'down'}) ---\n"
                      f"{m.log_tail(10)}" for m in self.etcd.members]
        return "\n".join(parts)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        return wait_for(condition, what, timeout=timeout, logs=self.logs)

    def wait_in_step(self, node: KVConfigProcess) -> None:
        self.wait(lambda: state(node) == ("in_step", False), f"{node.url} in step with etcd")


def stop_process(node: KVConfigProcess) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 10 s."""
    if node.process is None or node.process.poll() is not None:
        return
    node.process.terminate()
    try:
        node.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait(timeout=10)


def state(node: KVConfigProcess) -> tuple[str, bool]:
    """(etcd_state, stale) from the node's stats()."""
    stats = node.proxy().stats()
    return stats["etcd_state"], stats["stale"]


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """The test's nodes, agents and connections, all stopped at the end."""
    with ExitStack() as stack:
        yield Cluster(tmp_path, stack)


def member_urls(etcd: EtcdCluster, *order: int) -> list[str]:
    return [etcd.members[i].client_url for i in order]


def replay(changes: list[Change]) -> dict[str, Any]:
    """The keys a sequence of changes leaves behind."""
    keys: dict[str, Any] = {}
    for change in changes:
        if change.op == "put":
            keys[change.key] = change.value
        else:
            keys.pop(change.key, None)
    return keys


def after(changes: list[Change], revision: int) -> list[Change]:
    return [change for change in changes if change.revision > revision]


def ordered(changes: list[Change]) -> list[Change]:
    """Changes in revision order.  Writes made through one node in one
    reactor turn share a revision (one etcd txn); among them, by key."""
    return sorted(changes, key=lambda c: (c.revision, c.key, c.op))


def eventually(condition: Callable[[], Any], timeout: float = WAIT) -> bool:
    """Whether *condition* becomes true within *timeout*; the caller asserts,
    with a message that says what differs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def describe_mismatch(seen: list[Change], expected: list[Change]) -> str:
    """What differs between two lists of changes, briefly."""
    def keyed(changes: list[Change]) -> dict[tuple, str]:
        return {(c.revision, c.key): f"{c.op} {json.dumps(c.value)}" for c in changes}

    have, want = keyed(seen), keyed(expected)
    missing = [(k, want[k]) for k in sorted(set(want) - set(have))]
    unexpected = [(k, have[k]) for k in sorted(set(have) - set(want))]
    different = [(k, have[k], want[k]) for k in sorted(set(have) & set(want))
                 if have[k] != want[k]]
    identities = [(c.revision, c.key) for c in seen]
    repeated = sorted({k for k in identities if identities.count(k) > 1})
    revisions = [c.revision for c in seen]
    return (f"{len(seen)} events seen, {len(expected)} expected; missing {missing[:10]}; "
            f"unexpected {unexpected[:10]}; different {different[:10]}; "
            f"seen more than once {repeated[:10]}; "
            f"in revision order: {revisions == sorted(revisions)}")


def assert_same_changes(seen: list[Change], expected: list[Change], what: str) -> None:
    """*seen* holds each expected change exactly once, in revision order."""
    revisions = [c.revision for c in seen]
    assert revisions == sorted(revisions), \
        f"{what} out of revision order: {describe_mismatch(seen, expected)}"
    assert ordered(seen) == ordered(expected), f"{what}: {describe_mismatch(seen, expected)}"


def assert_one_write_per_key_and_revision(acked: list[Change]) -> None:
    """Writes sharing a revision (one etcd txn) are to different keys."""
    identities = [(c.revision, c.key) for c in acked]
    shared = sorted({k for k in identities if identities.count(k) > 1})
    assert not shared, f"writes acknowledged with the same key and revision: {shared[:10]}"


def run_concurrently(*jobs: Callable[[], list]) -> list:
    """Run the jobs in threads of their own; every result, concatenated."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [item for future in futures for item in future.result()]


# Tests ---------------------------------------------------------------------


def test_write_through_one_node_reaches_watch_and_agent_of_another(
        etcd_cluster3, cluster, tmp_path):
    """Two nodes on one 3-member etcd (member URLs in different orders): a
    put through node A's XML-RPC reaches node B's WATCH stream with the
    revision A acknowledged, and the kvconfig-agent following B over UDP
    writes it to its file.  A concurrent burst of puts and deletes through A
    (XML-RPC) and B (XML-RPC and line protocol) reaches B's WATCH exactly
    once each, in revision order, and the agent's file ends equal to A's
    list()."""
    cluster.etcd = etcd_cluster3
    a = cluster.node("A", member_urls(etcd_cluster3, 0, 1, 2))
    b = cluster.node("B", member_urls(etcd_cluster3, 2, 1, 0))
    config = tmp_path / "config.json"
    cluster.agent(b, "app/", config)
    watcher = cluster.line(b)
    start = watcher.watch("app/")
    cluster.wait(lambda: read_json(config) == {} and b.proxy().stats()["udp_subscriptions"],
                 "the agent's first file and its subscription to B")
    sent_before = b.proxy().stats()["udp_datagrams_sent"]

    s = a.proxy()
    put = s.put("app/db/host", "10.0.0.5")
    s.save("app/db/port", 5432)
    first = Change("put", "app/db/host", put["revision"], "10.0.0.5")
    cluster.wait(lambda: [e for e in watcher.events if e.key == "app/db/host"],
                 "A's put in B's WATCH stream")
    assert [e for e in watcher.events if e.key == "app/db/host"] == [first], \
        watcher.raw_events
    cluster.wait(lambda: read_json(config) == {"app/db/host": "10.0.0.5", "app/db/port": 5432},
                 "A's writes in the file of the agent following B")
    # It came to the agent as a UDP event datagram sent by B.
    assert b.proxy().stats()["udp_datagrams_sent"] > sent_before
    cluster.wait(lambda: any(e.key == "app/db/port" for e in watcher.events),
                 "A's save in B's WATCH stream")
    head = watcher.events[-1].revision
    assert start < first.revision <= head

    def xmlrpc_writer(node: KVConfigProcess, name: str, count: int) -> Callable[[], list]:
        def write() -> list[Change]:
            proxy, acked = node.proxy(), []
            for j in range(count):
                if j in (12, 20):
                    key = f"app/{name}/{(j + 1) % 8}"
                    result = proxy.remove(key)
                    assert result["deleted"], (key, result)
                    acked.append(Change("delete", key, result["revision"]))
                key, value = f"app/{name}/{j % 8}", {"by": name, "j": j}
                acked.append(Change("put", key, proxy.put(key, value)["revision"], value))
            return acked
        return write

    def line_writer() -> list[Change]:
        client, acked = cluster.line(b), []
        for j in range(6):
            key = f"app/line/{j % 3}"
            acked.append(Change("put", key, client.set(key, [j, "line"]), [j, "line"]))
        acked.append(Change("delete", "app/line/0", client.delete("app/line/0")))
        return acked

    acked = run_concurrently(*(xmlrpc_writer(a, f"a{w}", 25) for w in range(4)),
                             xmlrpc_writer(b, "b", 21), line_writer)
    assert_one_write_per_key_and_revision(acked)
    eventually(lambda: len(after(watcher.events, head)) >= len(acked))
    assert_same_changes(after(watcher.events, head), acked, "B's WATCH")

    wanted = server_items(a, "app/")
    assert wanted == replay([first, Change("put", "app/db/port", 0, 5432), *ordered(acked)])
    cluster.wait(lambda: read_json(config) == wanted, "the agent's file to equal A's list()")
    cluster.wait(lambda: b.proxy().list("app/")["items"] == a.proxy().list("app/")["items"],
                 "B's list() to equal A's, metadata included")


def test_quorum_loss_refuses_writes_serves_stale_reads_and_recovers(etcd_cluster3, cluster):
    """With two of three etcd members killed, both nodes notice by
    themselves: writes on either interface of either node fail with
    unavailable (Fault 8, ERR unavailable 8); reads answer the values written
    before, marked stale (get/list/keys/changes structs, the line protocol's
    END lines, STATS).  With the members back the nodes recover by
    themselves, a write through B reaches a WATCH on A opened before the
    outage, no acknowledged write is lost and no refused one appears."""
    etcd = cluster.etcd = etcd_cluster3
    a = cluster.node("A", member_urls(etcd, 0, 1, 2))
    b = cluster.node("B", member_urls(etcd, 2, 1, 0))
    sa, sb = a.proxy(), b.proxy()
    line_a, line_b = cluster.line(a), cluster.line(b)
    line_a.watch("q/")

    acked = []
    for i in range(5):
        acked.append(Change("put", f"q/a{i}", sa.put(f"q/a{i}", f"A{i}")["revision"], f"A{i}"))
        acked.append(Change("put", f"q/b{i}", line_b.set(f"q/b{i}", i), i))
    acked.append(Change("delete", "q/a4", sa.remove("q/a4")["revision"]))
    before = replay(acked)
    for node in (a, b):
        cluster.wait(lambda node=node: {i["key"]: i["value"]
                                        for i in node.proxy().list("q/")["items"]} == before,
                     f"{node.url} to have every write")

    etcd.kill_member(0)
    etcd.kill_member(1)
    for node in (a, b):
        cluster.wait(lambda node=node: state(node) == ("unavailable", True),
                     f"{node.url} to say etcd is unavailable")

    refused = []

    def refused_by_xmlrpc(proxy: ServerProxy, key: str) -> None:
        began = time.monotonic()
        with pytest.raises(Fault) as fault:
            proxy.put(key, "during the outage")
        took = time.monotonic() - began
        assert fault.value.faultCode == UNAVAILABLE, \
            f"{fault.value} (after {took:.3f} s)"
        assert fault.value.faultString.startswith("unavailable:"), fault.value
        refused.append(key)

    def refused_by_line(client: LineClient, key: str) -> None:
        began = time.monotonic()
        [reply] = client.request(f"SET {key} during")
        took = time.monotonic() - began
        assert reply.startswith("ERR unavailable 8 "), f"{reply!r} (after {took:.3f} s)"
        refused.append(key)

    refused_by_xmlrpc(sa, "q/refused-a")
    refused_by_line(line_b, "q/refused-b")
    refused_by_xmlrpc(sb, "q/refused-b2")
    refused_by_line(line_a, "q/refused-a2")
    [reply] = line_b.request("DEL q/a0")
    assert reply.startswith("ERR unavailable 8 "), reply
    with pytest.raises(Fault) as fault:
        sa.remove("q/b0")
    assert fault.value.faultCode == UNAVAILABLE

    for node, client in ((a, line_a), (b, line_b)):
        s = node.proxy()
        for key, value in before.items():
            assert s.load(key) == value, (node.url, key)
            got = s.get(key)
            assert got["value"] == value and got["stale"] is True, (node.url, got)
        assert s.load("q/a4") is None
        listing = s.list("q/")
        assert listing["stale"] is True
        assert {item["key"]: item["value"] for item in listing["items"]} == before
        assert s.keys("q/")["stale"] is True
        changes = s.changes("q/", acked[0].revision - 1)
        assert changes["stale"] is True
        assert [e["revision"] for e in changes["events"]] == [c.revision for c in acked]
        stats = s.stats()
        assert (stats["stale"], stats["etcd_state"]) == (True, "unavailable"), stats
        lines = client.request("LIST q/", multi=True)
        assert lines[-1].startswith("END ") and lines[-1].endswith(" stale"), lines
        assert len(lines) - 1 == len(before), lines
        assert client.request("KEYS q/", multi=True)[-1].endswith(" stale")
        lines = client.request(f"CHANGES {acked[0].revision - 1} q/", multi=True)
        assert lines[-1] == f"END {lines[-1].split()[1]} {len(acked)} stale", lines
        assert "STAT stale true" in client.request("STATS", multi=True)

    etcd.restart_member(0)
    etcd.restart_member(1)
    for node in (a, b):
        cluster.wait(lambda node=node: state(node) == ("in_step", False),
                     f"{node.url} to recover by itself")
    for node, client in ((a, line_a), (b, line_b)):
        assert "stale" not in node.proxy().get("q/a0")
        assert "stale" not in node.proxy().list("q/")
        assert not client.request("LIST q/", multi=True)[-1].endswith("stale")
        assert "STAT stale false" in client.request("STATS", multi=True)

    result = sb.put("q/after", "recovered")
    acked.append(Change("put", "q/after", result["revision"], "recovered"))
    cluster.wait(lambda: any(e.key == "q/after" for e in line_a.events),
                 "B's write after recovery in A's WATCH")
    assert_same_changes(line_a.events, acked, "A's WATCH")
    for node in (a, b):
        s = node.proxy()
        cluster.wait(lambda s=s: s.load("q/after") == "recovered", f"{node.url} to catch up")
        assert {item["key"]: item["value"] for item in s.list("q/")["items"]} == replay(acked)
        for change in acked:
            if change.op == "put" and change.key != "q/a4":
                assert s.get(change.key)["mod_revision"] == change.revision, change
        for key in refused:
            assert s.load(key) is None, f"{key} was refused but is in {node.url}"


def test_etcd_member_killed_under_load_loses_no_acknowledged_write(etcd_cluster3, cluster):
    """Several XML-RPC and line-protocol clients write a few hundred keys
    through node A while the etcd member A talks to first (the leader when
    the test began) is killed with SIGKILL, then restarted.  Writes fail only
    with unavailable; every acknowledged write is on both nodes with its
    acknowledged revision; node B's WATCH and node A's UDP subscriber saw
    each change exactly once, in revision order, every acknowledged revision
    among them; the subscriber's copy ends equal to list()."""
    etcd = cluster.etcd = etcd_cluster3
    leader = etcd.wait_for_leader()
    order = [leader, (leader + 1) % 3, (leader + 2) % 3]
    a = cluster.node("A", member_urls(etcd, *order), "--etcd-timeout=2")
    b = cluster.node("B", member_urls(etcd, *reversed(order)), "--etcd-timeout=2")
    prefix = "load/"
    subscriber = cluster.subscriber(a, prefix)
    cluster.wait(lambda: subscriber.subscribed, "the UDP subscription to A")
    watcher = cluster.line(b)
    watcher.watch(prefix)

    progress = {"acked": 0, "done": 0}
    lock = threading.Lock()

    def count(acked: bool) -> None:
        with lock:
            progress["done"] += 1
            progress["acked"] += acked

    def xmlrpc_client(name: str, writes: int) -> Callable[[], list]:
        def write() -> list[tuple]:
            proxy, results = a.proxy(), []
            for j in range(writes):
                key, value = f"{prefix}{name}/{j}", {"c": name, "j": j}
                try:
                    results.append(("ok", key, proxy.put(key, value)["revision"], value))
                except Fault as fault:
                    results.append(("failed", key, fault.faultCode, fault.faultString))
                count(results[-1][0] == "ok")
            return results
        return write

    def line_client(name: str, writes: int) -> Callable[[], list]:
        def write() -> list[tuple]:
            client, results = cluster.line(a), []
            for j in range(writes):
                key, value = f"{prefix}{name}/{j}", [name, j]
                try:
                    results.append(("ok", key, client.set(key, value), value))
                except LineError as error:
                    results.append(("failed", key, error.code, error.line))
                count(results[-1][0] == "ok")
            return results
        return write

    total = 6 * 70

    def chaos() -> list:
        cluster.wait(lambda: progress["acked"] >= 100, "100 acknowledged writes")
        etcd.kill_member(leader)
        killed_at = dict(progress)
        cluster.wait(lambda: progress["done"] >= killed_at["done"] + 100
                     or progress["done"] == total, "100 more writes tried")
        etcd.restart_member(leader)
        return [killed_at, dict(progress)]

    results = run_concurrently(*(xmlrpc_client(f"x{i}", 70) for i in range(4)),
                               *(line_client(f"l{i}", 70) for i in range(2)), chaos)
    killed_at, restarted_at = results[-2:]
    outcomes = results[:-2]
    ok = [Change("put", key, revision, value) for kind, key, revision, value in outcomes
          if kind == "ok"]
    failed = [outcome for outcome in outcomes if outcome[0] == "failed"]
    summary = (f"{len(ok)} acknowledged, {len(failed)} failed; member killed after "
               f"{killed_at}, restarted after {restarted_at}")
    assert len(ok) + len(failed) == total
    assert all(code == UNAVAILABLE for _, _, code, _ in failed), (summary, failed[:5])
    assert killed_at["done"] < total, f"the member was killed after the load ({summary})"
    assert len(ok) >= 200, summary

    for node in (a, b):
        cluster.wait_in_step(node)
    items = {item["key"]: item for item in a.proxy().list(prefix)["items"]}
    cluster.wait(lambda: {i["key"]: i for i in b.proxy().list(prefix)["items"]} == items,
                 "B's list() to equal A's")
    lost = [c for c in ok if c.key not in items or items[c.key]["value"] != c.value
            or items[c.key]["mod_revision"] != c.revision]
    assert not lost, f"acknowledged writes lost: {lost[:5]} ({summary})"
    # Any other key can only be from a write whose outcome was unknown.
    failed_keys = {key for _, key, _, _ in failed}
    assert set(items) - {c.key for c in ok} <= failed_keys
    final = [Change("put", key, item["mod_revision"], item["value"])
             for key, item in items.items()]

    # B's WATCH: each change once, in order; every acknowledged one with its revision.
    eventually(lambda: len(watcher.events) >= len(final))
    assert_same_changes(watcher.events, final, "B's WATCH")

    # A's UDP subscriber: the same, with no gap in its sequence numbers, up
    # to the last one a heartbeat announces.
    eventually(lambda: len(subscriber.events) >= len(final) and subscriber.heartbeats
               and subscriber.heartbeats[-1]["seq"] == max(m["seq"] for m in subscriber.events))
    assert len({m["sub"] for m in subscriber.subscribed}) == 1, subscriber.subscribed
    events = sorted(subscriber.events, key=lambda m: m["seq"])
    seqs = [m["seq"] for m in events]
    announced = subscriber.heartbeats[-1]["seq"] if subscriber.heartbeats else 0
    assert seqs == list(range(1, max(len(events), announced) + 1)), \
        f"UDP sequence gaps or duplicates: {sorted(set(range(1, announced + 1)) - set(seqs))}"
    udp = [Change(m["op"], m["key"], m["rev"], m.get("value")) for m in events]
    assert_same_changes(udp, final, "A's UDP notifications")
    assert replay(udp) == {c.key: c.value for c in final}
    assert not subscriber.other, subscriber.other


def test_watch_on_a_fresh_node_reports_the_node_revision(etcd_single, cluster):
    """On a node that has loaded its copy but seen no change yet, WATCH
    answers with the store's revision (the one HELLO and list() give), so
    that a client can later continue with CHANGES or WATCH ... from."""
    cluster.etcd = etcd_single
    etcd_single.put("elsewhere/key", "moves etcd's revision on")
    node = cluster.node("N", etcd_single.client_urls,
                        f"--etcd-prefix=kvconfig-{uuid.uuid4().hex[:8]}/")
    revision = node.proxy().list("")["revision"]
    assert revision > 0
    client = cluster.line(node)
    assert client.hello.split()[4] == str(revision), client.hello
    assert client.request("WATCH app/") == [f"OK watching 1 app/ {revision}"]
    assert client.request(f"CHANGES {revision} app/", multi=True) == [f"END {revision} 0"]


def test_agent_resyncs_after_its_node_is_killed_and_restarted(etcd_single, cluster, tmp_path):
    """An agent follows node B.  B is SIGKILLed; writes go on through node A
    while it is down; B is started again on the same ports and loads its
    copy afresh from etcd.  The agent subscribes again and its file ends
    equal to A's list(), the writes made while B was down included, and it
    follows B's changes from then on."""
    cluster.etcd = etcd_single
    prefix = f"kvconfig-{uuid.uuid4().hex[:8]}/"
    urls = etcd_single.client_urls
    a = cluster.node("A", urls, f"--etcd-prefix={prefix}")
    b = cluster.node("B", urls, f"--etcd-prefix={prefix}")
    config = tmp_path / "config.json"
    agent = cluster.agent(b, "app/", config)
    sa = a.proxy()
    sa.save("app/before", 1)
    sa.save("app/gone", "soon")
    cluster.wait(lambda: read_json(config) == {"app/before": 1, "app/gone": "soon"},
                 "the writes before the kill in the agent's file")

    ports = (b.port, b.line_port, b.udp_port)
    b.kill(signal.SIGKILL)
    for i in range(10):
        sa.save(f"app/while-down/{i}", i)
    sa.delete("app/gone")
    sa.save("app/before", "rewritten")
    cluster.wait(lambda: "subscribing again" in agent.log(), "the agent to notice B is gone")

    b.start()
    assert (b.port, b.line_port, b.udp_port) == ports
    cluster.wait_in_step(b)
    wanted = server_items(a, "app/")
    assert wanted == {"app/before": "rewritten", **{f"app/while-down/{i}": i for i in range(10)}}
    cluster.wait(lambda: read_json(config) == wanted,
                 "the agent's file to equal A's list() after B's restart")

    sa.save("app/after", "live")
    cluster.wait(lambda: read_json(config) == {**wanted, "app/after": "live"},
                 "a write through A after B's restart in the agent's file")
    assert agent.running()


def test_agent_moves_to_another_node_when_its_node_dies(etcd_single, cluster, tmp_path):
    """An agent given nodes B and A (``--server`` HOST:UDPPORT,HOST:UDPPORT
    and one ``--xmlrpc`` URL each) follows B.  B is SIGKILLed for good; the
    agent notices the silence, moves to A, catches up through it (the
    writes made while it was moving included) and follows A's changes from
    then on."""
    cluster.etcd = etcd_single
    prefix = f"kvconfig-{uuid.uuid4().hex[:8]}/"
    urls = etcd_single.client_urls
    a = cluster.node("A", urls, f"--etcd-prefix={prefix}")
    b = cluster.node("B", urls, f"--etcd-prefix={prefix}")
    config = tmp_path / "config.json"
    agent = cluster.agent(b, "app/", config,
                          f"--server=127.0.0.1:{b.udp_port},127.0.0.1:{a.udp_port}",
                          f"--xmlrpc={b.url},{a.url}")
    sa = a.proxy()
    sa.save("app/before", 1)
    cluster.wait(lambda: read_json(config) == {"app/before": 1}, "B's agent has the first write")
    assert b.proxy().stats()["udp_subscriptions"] == 1

    b.kill(signal.SIGKILL)
    for i in range(5):
        sa.save(f"app/while-moving/{i}", i)
    cluster.wait(lambda: "does not answer; following" in agent.log(),
                 "the agent to move to node A")
    wanted = server_items(a, "app/")
    cluster.wait(lambda: read_json(config) == wanted,
                 "the agent's file to equal A's list() after the move")
    cluster.wait(lambda: a.proxy().stats()["udp_subscriptions"] == 1,
                 "the agent subscribed to node A")
    sa.save("app/after", "live")
    cluster.wait(lambda: read_json(config) == {**wanted, "app/after": "live"},
                 "a write through A after the move in the agent's file")
    assert agent.running()


def test_agent_starting_on_a_fresh_node_logs_no_fault(etcd_single, cluster, tmp_path):
    """An agent started on a node whose history begins at the node's own
    start takes its snapshot and follows the node without a line that reads
    like a fault: no "history compacted", no warning or error."""
    cluster.etcd = etcd_single
    prefix = f"kvconfig-{uuid.uuid4().hex[:8]}/"
    a = cluster.node("A", etcd_single.client_urls, f"--etcd-prefix={prefix}")
    config = tmp_path / "config.json"
    agent = cluster.agent(a, "app/", config)
    cluster.wait(lambda: read_json(config) == {} and a.proxy().stats()["udp_subscriptions"],
                 "the agent's first file and its subscription")
    a.proxy().save("app/k", 1)
    cluster.wait(lambda: read_json(config) == {"app/k": 1}, "a write in the agent's file")
    lines = [line for line in agent.log().splitlines() if "[kvconfig." in line]
    assert not [line for line in lines if "compacted" in line], lines
    assert not [line for line in lines
                if "#warn" in line or "#error" in line or "#critical" in line], lines
