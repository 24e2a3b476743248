"""The agent end to end: the installed ``twistd kvconfig`` and ``twistd
kvconfig-agent`` (and the ``kvconfig-agent`` command) as real processes on
127.0.0.1, talking UDP and XML-RPC, with a real reload command.

Every wait polls for a condition under a generous deadline; nothing asserts
on wall-clock time.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from xmlrpc.client import Binary, MultiCall, ServerProxy

import pytest

from kvconfig import values

from serverprocess import KVConfigProcess, twistd_path

#: Heartbeats every second, so that an agent notices a dead server in ~4 s.
FAST_HEARTBEAT = "--heartbeat-seconds=1"
TESTS = Path(__file__).parent


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0,
             logs: Callable[[], str] = lambda: "") -> Any:
    """Poll *condition* until it returns something true; fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(0.02)


def read_json(path: Path) -> Any:
    """The file's JSON, or None while it does not exist.  The agent replaces
    the file atomically, so a file that does not parse is a failure."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def tagged(value: Any) -> Any:
    """A value as the stdlib client (use_builtin_types=True) returns it, in
    the tagged JSON of the agent's file."""
    return values.to_tagged(value, max_depth=1 << 16)


def server_items(server: KVConfigProcess, prefix: str) -> dict[str, Any]:
    """The server's keys under *prefix*, as the agent's file should hold them."""
    result = ServerProxy(server.url, allow_none=True, use_builtin_types=True).list(prefix)
    return {item["key"]: tagged(item["value"]) for item in result["items"]}


class AgentProcess:
    """One ``twistd -n kvconfig-agent``, with a pidfile and log of its own."""

    def __init__(self, directory: Path, name: str, server: KVConfigProcess, prefix: str,
                 *extra: str, udp_port: int | None = None) -> None:
        self.directory, self.name = directory, name
        self.log_path = directory / f"{name}.log"
        self.pid_path = directory / f"{name}.pid"
        self.args = [
            twistd_path(), "-n", f"--pidfile={self.pid_path}", f"--logfile={self.log_path}",
            "kvconfig-agent", "--server=127.0.0.1",
            f"--udp-port={udp_port or server.udp_port}", f"--xmlrpc={server.url}",
            f"--prefix={prefix}", *extra,
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, cwd=self.directory, env=dict(os.environ))

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else "(no log)"
        return f"--- {self.name} log ---\n{text}"

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.running():
            _terminate(self.process)


@pytest.fixture(scope="module")
def kvserver(tmp_path_factory):
    """One ``twistd kvconfig`` with one-second heartbeats for the tests that
    do not restart it; each test follows a prefix of its own."""
    process = KVConfigProcess(tmp_path_factory.mktemp("e2e-server"), None, FAST_HEARTBEAT)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def start_agent(tmp_path):
    """Starts agents (``start_agent(server, prefix, *options, name=...)``);
    every one is stopped when the test ends, pass or fail."""
    started: list[AgentProcess] = []

    def start(server: KVConfigProcess, prefix: str, *extra: str, name: str = "agent",
              udp_port: int | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path, name, server, prefix, *extra, udp_port=udp_port)
        started.append(agent)
        agent.start()
        return agent

    yield start
    for agent in started:
        agent.stop()


class Relay:
    """tests/lossyudp.py as a subprocess, and what it reports sending."""

    def __init__(self, server_port: int, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "lossyudp.py"), f"--server-port={server_port}",
             *options], stdout=subprocess.PIPE, text=True)
        first = self.process.stdout.readline().split()
        if first[:1] != ["listening"]:
            self.stop()
            raise RuntimeError(f"the relay did not start: {first}")
        self.port = int(first[1])
        self.sent: list[str] = []
        self.counters: dict | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "sent":
                self.sent.append(rest)
            elif word == "counters":
                self.counters = json.loads(rest)

    def delivered(self, kind: str) -> int:
        """How many datagrams of type *kind* it has sent on to the agent."""
        return self.sent.count(f"to_client {kind}")

    def stop(self) -> dict | None:
        """Stops the relay; returns its counters."""
        _terminate(self.process)
        if hasattr(self, "_reader"):
            self._reader.join(timeout=10)
        return self.counters


@pytest.fixture
def start_relay():
    """Starts lossy relays (``start_relay(server_udp_port, *options)``),
    stopped when the test ends."""
    started: list[Relay] = []

    def start(server_port: int, *options: str) -> Relay:
        relay = Relay(server_port, *options)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def logs_of(*processes) -> Callable[[], str]:
    return lambda: "\n".join(p.log() for p in processes)


def following_with_a_first_write(start_agent, server: KVConfigProcess, prefix: str,
                                 config: Path, *extra: str):
    """Start an agent keeping *prefix* in *config*; once a first save
    (``<prefix>a`` = 1) is in the file, the agent, its logs and a proxy."""
    agent = start_agent(server, prefix, f"--output={config}", *extra)
    logs = logs_of(agent)
    s = server.proxy()
    s.save(f"{prefix}a", 1)
    wait_for(lambda: read_json(config) == {f"{prefix}a": 1}, "the first save", logs=logs)
    return agent, logs, s


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def same_bytes(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.read_bytes() == b.read_bytes()


def test_agent_writes_the_prefix_to_a_file_and_reloads_once_per_burst(
        kvserver, start_agent, tmp_path):
    """The headline: each change under the prefix reaches the output file
    as full keys and tagged JSON values; the reload command runs after the
    file is written, once for a burst of saves; keys outside the prefix never
    appear; a delete removes the key."""
    config, runs, copy = tmp_path / "config.json", tmp_path / "runs", tmp_path / "copy.json"
    command = (f"echo run >> {shlex.quote(str(runs))} && "
               f"cp {shlex.quote(str(config))} {shlex.quote(str(copy))}")
    agent = start_agent(kvserver, "app/", f"--output={config}", f"--exec={command}",
                        "--debounce=0.2")
    logs = logs_of(agent, kvserver)
    s = kvserver.proxy()

    s.save("app/db/host", "10.0.0.5")
    wait_for(lambda: read_json(config) == {"app/db/host": "10.0.0.5"}, "the first save", logs=logs)
    # The command ran, and after the write: its copy is the file.
    wait_for(lambda: same_bytes(config, copy), "the reload command's copy", logs=logs)
    assert count_lines(runs) >= 1

    s.save("app/blob", Binary(b"\x00\xffkv"))
    wait_for(lambda: read_json(config) == {"app/db/host": "10.0.0.5",
                                          "app/blob": {"$bytes": "AP9rdg=="}},
             "bytes as tagged JSON", logs=logs)
    # Too large for a datagram: the agent pulls it.
    s.save("app/big", "x" * 5000)
    wait_for(lambda: (read_json(config) or {}).get("app/big") == "x" * 5000,
             "the large value", logs=logs)
    s.delete("app/big")

    # Outside the prefix: other trees, and keys that only share its letters.
    for key in ("other/x", "appx/y", "ap", "app"):
        s.save(key, "outside")
    s.save("app/marker", 1)
    wait_for(lambda: "app/marker" in (read_json(config) or {}), "the marker", logs=logs)
    assert all(key.startswith("app/") for key in read_json(config))

    wait_for(lambda: same_bytes(config, copy), "the reload after the marker", logs=logs)
    before = count_lines(runs)
    for i in range(20):
        s.save("app/burst", i)
    wait_for(lambda: (read_json(config) or {}).get("app/burst") == 19 and same_bytes(config, copy),
             "the burst's last value, reloaded", logs=logs)
    reloads = count_lines(runs) - before
    assert 1 <= reloads <= 3, f"{reloads} reloads for a burst of 20 saves"

    s.delete("app/db/host")
    wait_for(lambda: "app/db/host" not in read_json(config), "the delete", logs=logs)
    assert read_json(config) == {"app/blob": {"$bytes": "AP9rdg=="}, "app/marker": 1,
                                 "app/burst": 19}
    wait_for(lambda: same_bytes(config, copy), "the reload after the delete", logs=logs)
    assert agent.running()


def test_failed_reload_restores_the_last_known_good_file(kvserver, start_agent, tmp_path):
    """When the reload command fails, the agent puts the previous file back,
    keeps running, and writes the next change that reloads cleanly."""
    config, rejected, copy = (tmp_path / "config.json", tmp_path / "rejected.json",
                              tmp_path / "copy.json")
    q = shlex.quote
    command = (f"if grep -q BROKEN {q(str(config))}; then cp {q(str(config))} "
               f"{q(str(rejected))}; exit 1; fi; cp {q(str(config))} {q(str(copy))}")
    agent = start_agent(kvserver, "lkg/", f"--output={config}", f"--exec={command}",
                        "--debounce=0.1")
    logs = logs_of(agent)
    s = kvserver.proxy()

    s.save("lkg/flag", "fine")
    wait_for(lambda: read_json(config) == {"lkg/flag": "fine"} and same_bytes(config, copy),
             "the good value, reloaded", logs=logs)
    good = config.read_bytes()

    s.save("lkg/flag", "BROKEN")
    wait_for(lambda: read_json(rejected) == {"lkg/flag": "BROKEN"},
             "the command to reject the bad file", logs=logs)
    wait_for(lambda: config.read_bytes() == good, "the known-good file back", logs=logs)
    wait_for(lambda: "restored the last known-good" in agent.log(), "the restore logged",
             logs=logs)
    assert agent.running()

    s.save("lkg/flag", "fixed")
    wait_for(lambda: read_json(config) == {"lkg/flag": "fixed"} and same_bytes(config, copy),
             "the next good value, reloaded", logs=logs)
    assert agent.running()


def test_agent_follows_a_server_killed_and_restarted(tmp_path, start_agent):
    """After the server is SIGKILLed and started again on the same ports and
    store, the running agent notices the silence, subscribes again and
    receives changes made after the restart."""
    server = KVConfigProcess(tmp_path, None, FAST_HEARTBEAT)
    try:
        server.start()
        config = tmp_path / "config.json"
        agent = start_agent(server, "app/", f"--output={config}", "--debounce=0.1")
        logs = logs_of(agent, server)
        server.proxy().save("app/before", 1)
        wait_for(lambda: read_json(config) == {"app/before": 1}, "the first save", logs=logs)

        server.kill(signal.SIGKILL)
        # No writes while it is down; the agent notices the missing heartbeats.
        wait_for(lambda: "subscribing again" in agent.log(), "the agent to notice",
                 logs=logs)
        server.start()
        server.proxy().save("app/after", 2)
        wait_for(lambda: read_json(config) == {"app/before": 1, "app/after": 2},
                 "the save after the restart", timeout=30, logs=logs)
        # While unsubscribed it polls, which may bring the save first; it
        # subscribes again all the same.
        wait_for(lambda: "resynchronising" in agent.log(), "the new subscription",
                 timeout=30, logs=logs)
        assert agent.running()
    finally:
        server.stop()


def test_restarted_agent_catches_up_with_writes_made_while_it_was_down(
        kvserver, start_agent, tmp_path):
    """Changes made while the agent was dead are in the file once it starts again."""
    config = tmp_path / "config.json"
    agent, logs, s = following_with_a_first_write(start_agent, kvserver, "down/", config,
                                                  "--debounce=0.1")

    agent.kill(signal.SIGKILL)
    s.save("down/b", 2)
    s.delete("down/a")
    agent.start()
    wait_for(lambda: read_json(config) == {"down/b": 2}, "the writes made while down",
             logs=logs)


def _random_value(rng: random.Random, n: int) -> Any:
    roll = rng.random()
    if roll < 0.12:
        return "x" * rng.randint(1300, 4000) + str(n)      # too large for a datagram
    if roll < 0.25:
        return Binary(rng.randbytes(rng.randint(0, 64)))
    if roll < 0.35:
        return rng.uniform(-1e9, 1e9)
    if roll < 0.45:
        return rng.randint(-2**31, 2**31 - 1)
    if roll < 0.5:
        return rng.choice([None, True, False, ""])
    if roll < 0.55:
        return datetime(2020 + n % 10, 1 + n % 12, 1 + n % 28, n % 24, n % 60, n % 60)
    if roll < 0.7:
        return {"n": n, "name": f"héllo {n} ✓", "ports": [n, n + 1]}
    if roll < 0.75:
        return {"$ref": n}                                   # wrapped as {"$dict": ...}
    return f"value {n} " + "é" * rng.randint(0, 30)


def test_agent_converges_through_a_lossy_reordering_relay(kvserver, start_agent, start_relay,
                                                         tmp_path):
    """Through a relay that drops 20% of datagrams both ways, duplicates and
    reorders others, 1,000 random puts and deletes (some too large for a
    datagram) end with the agent's file exactly the server's keys."""
    prefix = "lossy/"
    relay = start_relay(kvserver.udp_port, "--seed=3", "--drop=0.2", "--duplicate=0.1",
                        "--reorder=0.2")
    config = tmp_path / "config.json"
    agent = start_agent(kvserver, prefix, f"--output={config}", "--debounce=0.1",
                        udp_port=relay.port)
    logs = logs_of(agent, kvserver)
    # Write once the agent holds its subscription, so that the changes
    # travel through the relay to an agent that is listening.
    wait_for(lambda: relay.delivered("subscribed"), "the agent's subscription", logs=logs)
    wait_for(lambda: read_json(config) is not None, "the agent's first write", logs=logs)

    rng = random.Random(1000)
    keys = [f"{prefix}k{i}" for i in range(60)] + ["lossy", "lossyx/k", "other/k"]
    s = ServerProxy(kvserver.url, allow_none=True, use_builtin_types=True)
    n = 0
    while n < 1000:
        batch = MultiCall(s)
        for _ in range(rng.choice([1, 5, 25, 50])):
            key = rng.choice(keys)
            if rng.random() < 0.2:
                batch.delete(key)
            else:
                batch.save(key, _random_value(rng, n))
            n += 1
        for _ in batch():       # raises the first Fault, if any
            pass

    expected = server_items(kvserver, prefix)
    assert len(expected) > 20
    wait_for(lambda: read_json(config) == expected, "the file to equal the server's keys",
             timeout=30, logs=logs)
    assert agent.running()
    counters = relay.stop()
    # The changes went through the relay, which did what it says.
    to_client = counters["to_client"]
    assert to_client["received"] > 500, counters
    assert min(to_client["dropped"], to_client["duplicated"], to_client["reordered"]) > 0, counters


def test_agent_follows_its_subscription_when_subscribed_answers_are_lost(
        kvserver, start_agent, start_relay, tmp_path):
    """The server holds the agent's subscription and its heartbeats reach the
    agent, but the first 'subscribed' answers are lost: a change still
    reaches the file within a few heartbeats."""
    relay = start_relay(kvserver.udp_port, "--drop=0", "--duplicate=0", "--reorder=0",
                        "--drop-first=subscribed=6")
    config = tmp_path / "config.json"
    agent = start_agent(kvserver, "deaf/", f"--output={config}", "--debounce=0.1",
                        udp_port=relay.port)
    logs = logs_of(agent)
    wait_for(lambda: relay.delivered("heartbeat") and read_json(config) == {},
             "the subscription's first heartbeat at the agent", logs=logs)
    kvserver.proxy().save("deaf/key", 1)
    heard = relay.delivered("heartbeat")
    wait_for(lambda: relay.delivered("heartbeat") >= heard + 3,
             "three more heartbeats at the agent", logs=logs)
    assert read_json(config) == {"deaf/key": 1}


def _read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def agent_command() -> str:
    """The installed ``kvconfig-agent`` command, beside the running Python."""
    return os.path.join(os.path.dirname(sys.executable), "kvconfig-agent")


class AgentCommand:
    """One ``kvconfig-agent`` process following *prefix* on *server*, its
    standard output and error read line by line."""

    def __init__(self, server: KVConfigProcess, prefix: str, *extra: str) -> None:
        self.process = subprocess.Popen(
            [agent_command(), "--server=127.0.0.1", f"--udp-port={server.udp_port}",
             f"--xmlrpc={server.url}", f"--prefix={prefix}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: queue.Queue = queue.Queue()
        self.stderr: queue.Queue = queue.Queue()
        for stream, into in ((self.process.stdout, self.stdout),
                             (self.process.stderr, self.stderr)):
            threading.Thread(target=_read_lines, args=(stream, into), daemon=True).start()

    def next_line(self) -> dict:
        """The next change printed, as JSON."""
        try:
            line = self.stdout.get(timeout=20)
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError("no line on standard output; standard error:\n"
                                 + self.errors())
        return json.loads(line)

    def rest(self) -> list[str]:
        """What it printed after the lines read so far, once it has exited."""
        lines = []
        while (line := self.stdout.get(timeout=5)) is not None:
            lines.append(line)
        return lines

    def errors(self) -> str:
        """Its standard error so far (all of it, once it has exited)."""
        lines = []
        while True:
            try:
                line = self.stderr.get(timeout=5 if self.process.poll() is not None else 0)
            except queue.Empty:
                break
            if line is None:
                break
            lines.append(line)
        return "".join(lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def test_kvconfig_agent_command_prints_keys_then_changes_and_exits_after_count(kvserver):
    """``kvconfig-agent --count N`` prints the current keys, then each change,
    as JSON lines on standard output, and exits by itself after N."""
    s = ServerProxy(kvserver.url, allow_none=True, use_builtin_types=True)
    s.save("cli/a", "one")
    s.save("cli/b", b"\x01")
    s.save("clix", "outside")
    command = AgentCommand(kvserver, "cli/", "--count=4")
    try:
        first = [command.next_line(), command.next_line()]
        assert [(e["op"], e["key"], e["value"]) for e in first] == [
            ("put", "cli/a", "one"), ("put", "cli/b", {"$bytes": "AQ=="})]
        s.save("cli/c", [1, 2])
        s.delete("cli/a")
        assert [(e["op"], e["key"], e.get("value"))
                for e in (command.next_line(), command.next_line())] == [
            ("put", "cli/c", [1, 2]), ("delete", "cli/a", None)]
        assert command.process.wait(timeout=20) == 0
        assert command.rest() == []     # nothing after the fourth
    finally:
        command.stop()


def test_kvconfig_agent_count_prints_exactly_n_lines_when_events_share_a_revision(tmp_path):
    """``kvconfig-agent --count 3``: the current key, one change, then a
    multicall of three saves (one revision, three datagrams): exactly three
    lines in all, and a clean exit."""
    server = KVConfigProcess(tmp_path, None, FAST_HEARTBEAT)
    try:
        server.start()
        s = ServerProxy(server.url, allow_none=True, use_builtin_types=True)
        s.save("multi/a", 0)
        command = AgentCommand(server, "multi/", "--count=3")
        try:
            assert command.next_line()["key"] == "multi/a"
            wait_for(lambda: s.stats()["udp_subscriptions"] == 1, "the agent's subscription")
            s.save("multi/b", 1)
            assert command.next_line()["key"] == "multi/b"
            batch = MultiCall(s)
            for n in range(3):
                batch.save(f"multi/c{n}", n)
            batch()
            assert command.next_line()["key"] == "multi/c0"
            assert command.process.wait(timeout=20) == 0
            assert command.rest() == [], "lines after the third"
        finally:
            command.stop()
    finally:
        server.stop()


def test_kvconfig_agent_count_exits_without_complaint(kvserver):
    """``kvconfig-agent --count 1`` satisfied by the first snapshot exits 0
    with one line, and does not log the pull it abandons on the way out as
    "cannot pull from the server"."""
    kvserver.proxy().save("quiet/a", 1)
    command = AgentCommand(kvserver, "quiet/", "--count=1")
    try:
        assert command.next_line()["key"] == "quiet/a"
        assert command.process.wait(timeout=20) == 0
        assert command.rest() == []
        errors = command.errors()
        assert "cannot pull" not in errors, errors
    finally:
        command.stop()


def _secret(path: Path, secret: bytes) -> Path:
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def test_signed_datagrams_keep_out_an_agent_with_the_wrong_secret(tmp_path, start_agent):
    """With --secret-file on both ends the agent follows changes; an agent
    with another secret never gets a subscription (it can only poll over
    XML-RPC, which the secret does not cover), and the server counts the
    datagrams it dropped."""
    secret = _secret(tmp_path / "secret", b"correct horse battery staple")
    wrong = _secret(tmp_path / "wrong", b"incorrect horse")
    server = KVConfigProcess(tmp_path, None, FAST_HEARTBEAT, f"--secret-file={secret}")
    try:
        server.start()
        s = server.proxy()
        good_file, bad_file = tmp_path / "good.json", tmp_path / "bad.json"
        good = start_agent(server, "sec/", f"--output={good_file}", f"--secret-file={secret}",
                           "--debounce=0.1", name="good")
        bad = start_agent(server, "sec/", f"--output={bad_file}", f"--secret-file={wrong}",
                          "--debounce=0.1", name="bad")
        logs = logs_of(good, bad, server)
        # Both take the (empty) snapshot over XML-RPC, which the secret does not cover.
        wait_for(lambda: read_json(good_file) == {} and read_json(bad_file) == {},
                 "both agents' first writes", logs=logs)

        def bad_signatures() -> int:
            return s.stats()["udp_dropped_bad_signature"]

        s.save("sec/key", "value")
        wait_for(lambda: read_json(good_file) == {"sec/key": "value"}, "the signed agent",
                 logs=logs)
        # The wrong agent keeps trying to subscribe; wait for two more of its
        # attempts to be dropped: only the signed agent is subscribed.
        dropped = bad_signatures()
        wait_for(lambda: bad_signatures() >= dropped + 2, "the wrong agent's retries",
                 logs=logs)
        assert s.stats()["udp_subscriptions"] == 1
        assert good.running() and bad.running()

        # An unsigned request is dropped and counted too.
        unsigned = s.stats()["udp_dropped_unsigned"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(json.dumps({"v": 1, "t": "subscribe", "prefix": "sec/",
                                 "pad": "-" * 256}).encode(), ("127.0.0.1", server.udp_port))
        wait_for(lambda: s.stats()["udp_dropped_unsigned"] > unsigned,
                 "the unsigned datagram counted", logs=logs)
    finally:
        server.stop()


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def test_a_missing_output_directory_is_one_line_and_a_non_zero_exit(kvserver, tmp_path):
    """``twistd -n kvconfig-agent --output DIR/c.json`` and the
    ``kvconfig-agent`` command, with DIR missing, exit at once with a
    non-zero status and one line naming the directory, instead of running on
    without ever writing the file."""
    missing = tmp_path / "nonexistent" / "dir"
    output = missing / "c.json"
    common = ["--server=127.0.0.1", f"--udp-port={kvserver.udp_port}",
              f"--xmlrpc={kvserver.url}", "--prefix=app/", f"--output={output}"]
    for argv in ([twistd_path(), "-n", "--pidfile=", "kvconfig-agent", *common],
                 [agent_command(), *common]):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                                    cwd=tmp_path)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{argv[0]} still running after 20 s: {e.stderr}") from None
        lines = (result.stdout + result.stderr).splitlines()
        assert result.returncode != 0, lines
        assert len(lines) == 1, lines
        assert str(missing) in lines[0] and "does not exist" in lines[0], lines


def test_a_write_that_fails_later_is_one_error_line_per_attempt_and_retried(
        kvserver, start_agent, tmp_path):
    """When the output directory goes away while the agent runs, each
    attempt to write is one error line (no traceback), the agent keeps
    running and retries, and writes the file once the directory is back."""
    directory = tmp_path / "out"
    directory.mkdir()
    config = directory / "config.json"
    agent, logs, s = following_with_a_first_write(start_agent, kvserver, "gone/", config,
                                                  "--debounce=0.05")

    config.unlink()
    directory.rmdir()
    s.save("gone/a", 2)
    wait_for(lambda: agent.log().count("cannot write") >= 2, "two failed attempts logged",
             logs=logs)
    failed = [line for line in agent.log().splitlines() if "cannot write" in line]
    assert all("#error" in line for line in failed), failed
    assert "Traceback" not in agent.log()
    assert agent.running()

    directory.mkdir()
    wait_for(lambda: read_json(config) == {"gone/a": 2}, "the write once the directory is back",
             timeout=40, logs=logs)
    assert "Traceback" not in agent.log()
    assert agent.running()

