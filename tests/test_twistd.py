"""The installed ``twistd kvconfig``: discovery, the classic session, crashes, daemon mode."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from xmlrpc.client import Fault, ServerProxy

import pytest
from hypothesis import HealthCheck, given, settings
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.plugins import kvconfig_plugin
from twisted.python import usage

from kvconfig.backends.sqlitefile import SCHEMA
from kvconfig.tap import Options, with_backlog

from serverprocess import free_port, twistd_path
from test_values import xmlrpc_values


def test_plugin_is_discoverable_and_imports_no_server_code():
    """getPlugins(IServiceMaker) finds the kvconfig service maker, whose
    options build; the plugin module itself only declares it."""
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "kvconfig" in makers
    options = makers["kvconfig"].options()
    options.parseOptions(["--store", "memory:"])
    assert options["xmlrpc"] == "tcp:15000:interface=127.0.0.1"
    assert options["udp"] == "udp:15002:interface=127.0.0.1"
    assert (options["udp_port"], options["udp_interface"]) == (15002, "127.0.0.1")
    assert options["secret"] is None
    assert "kvconfig.tap" not in vars(kvconfig_plugin)


def test_classic_exercise_session(fresh_server):
    """The stdlib kvstore exercise's session works unchanged, across clients."""
    fresh_server.start()
    url = f"http://localhost:{fresh_server.port}"
    s = ServerProxy(url, allow_none=True)
    assert s.save("name", "Guido") is None
    s.save("nameserver", "8.8.8.8")
    s.save("ports", [4050, 5100, 5200])
    other = ServerProxy(url, allow_none=True)
    assert other.load("name") == "Guido"
    assert other.load("nameserver") == "8.8.8.8"
    assert other.load("ports") == [4050, 5100, 5200]
    assert s.delete("name") is None
    assert s.load("name") is None
    assert s.delete("name") is None  # no error for a missing key
    assert s.load("never-saved") is None


def test_sigkill_loses_no_acknowledged_write(fresh_server):
    """Every write acknowledged before a SIGKILL is there after a restart on
    the same store, with its revision; revisions go on from there."""
    fresh_server.start()
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(name: str) -> None:
        proxy = fresh_server.proxy()
        for i in range(100_000):
            if stop.is_set():
                return
            key = f"crash/{name}/{i}"
            try:
                meta = proxy.put(key, {"writer": name, "i": i})
            except (OSError, Fault, Exception):
                return  # the server died mid-call: this write was not acknowledged
            with lock:
                acknowledged[key] = meta["revision"]

    with ThreadPoolExecutor(8) as pool:
        for n in range(8):
            pool.submit(writer, f"w{n}")
        deadline = time.monotonic() + 10
        while len(acknowledged) < 400 and time.monotonic() < deadline:
            time.sleep(0.01)
        fresh_server.kill(signal.SIGKILL)
        stop.set()
    assert len(acknowledged) >= 400
    fresh_server.start()
    proxy = fresh_server.proxy()
    for key, revision in acknowledged.items():
        got = proxy.get(key)
        assert got is not None, f"acknowledged write {key} lost"
        assert got["mod_revision"] == revision
    latest = proxy.stats()["revision"]
    assert latest >= max(acknowledged.values())
    assert proxy.put("crash/after", 1)["revision"] == latest + 1


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=xmlrpc_values)
def test_every_value_type_round_trips_through_the_server(server, value):
    """Any value the stdlib client can send reads back equal, by load and by get."""
    proxy = server.proxy()
    proxy.save("roundtrip/v", value)
    assert proxy.load("roundtrip/v") == value
    assert proxy.get("roundtrip/v")["value"] == value


def test_datetime_and_bytes_come_back_as_the_stdlib_types(server):
    """A client without use_builtin_types gets DateTime and Binary, as from any server."""
    proxy = server.proxy()
    proxy.save("types/dt", datetime(2026, 11, 22, 10, 0, 0))
    proxy.save("types/bytes", b"\x00\x01")
    assert proxy.load("types/dt") == datetime(2026, 11, 22, 10, 0, 0)
    assert proxy.load("types/bytes").data == b"\x00\x01"


def test_daemon_mode_with_pidfile(tmp_path):
    """``twistd kvconfig`` daemonises, writes its pidfile, serves, and stops on SIGTERM."""
    port = free_port()
    pidfile = tmp_path / "kvconfig.pid"
    subprocess.run(
        [twistd_path(), f"--pidfile={pidfile}", f"--logfile={tmp_path / 'log'}",
         "kvconfig", f"--store=sqlite:{tmp_path / 'kv.db'}",
         f"--xmlrpc=tcp:{port}:interface=127.0.0.1", "--line=tcp:0:interface=127.0.0.1",
         "--udp=udp:0:interface=127.0.0.1", "--http=tcp:0:interface=127.0.0.1"],
        cwd=tmp_path, check=True, timeout=30,
    )
    deadline = time.monotonic() + 20
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        proxy = ServerProxy(f"http://127.0.0.1:{port}", allow_none=True)
        for _ in range(200):
            try:
                proxy.save("daemon", "yes")
                break
            except OSError:
                time.sleep(0.05)
        assert proxy.load("daemon") == "yes"
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()


@pytest.mark.parametrize("args, message", [
    (["--store", "redis:x"], "--store must be one of"),
    (["--store", "sqlite:"], "needs a file path"),
    (["--max-key-bytes", "0"], "max-key-bytes must be a positive integer"),
    (["--max-value-bytes", "lots"], "max-value-bytes"),
    (["--xmlrpc", "tcp:notaport"], "--xmlrpc: bad endpoint"),
    (["--store", "sqlite:/nonexistent/dir/kv.db"], "cannot open sqlite store"),
    (["--udp", "tcp:15002"], "--udp: bad endpoint 'tcp:15002': it must start with udp:"),
    (["--udp", "udp:notaport"], "--udp: bad endpoint"),
    (["--udp", "udp:15002:interface=localhost"], "interface must be an IP address"),
    (["--secret-file", "no-such-file"], "--secret-file: cannot read 'no-such-file'"),
    (["--max-datagram-bytes", "100"], "max-datagram-bytes must be 512..65507"),
    (["--lease-seconds", "0"], "lease-seconds must be a positive integer"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    """Bad options, or a store that cannot be opened, stop twistd with an
    error that names the problem."""
    # Free ports, so that only the option under test can fail.
    ports = ["--xmlrpc=tcp:0:interface=127.0.0.1", "--line=tcp:0:interface=127.0.0.1",
             "--udp=udp:0:interface=127.0.0.1", "--http=tcp:0:interface=127.0.0.1"]
    result = subprocess.run([twistd_path(), "-n", "--pidfile=", "kvconfig", *ports, *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize("description, port, interface", [
    ("udp:15002:interface=127.0.0.1", 15002, "127.0.0.1"),
    ("udp:0", 0, ""),
    ("udp:65535:interface=0.0.0.0", 65535, "0.0.0.0"),
    ("udp:15002:interface=::1", 15002, "::1"),
    ("udp:15002:interface=\\:\\:1", 15002, "::1"),
])
def test_udp_option_gives_port_and_interface(description, port, interface):
    """--udp udp:PORT[:interface=ADDR] gives the port and interface to bind
    (none: every interface); IPv6 colons may be escaped as in endpoint strings."""
    options = Options()
    options.parseOptions(["--udp", description])
    assert (options["udp_port"], options["udp_interface"]) == (port, interface)


@pytest.mark.parametrize("description", [
    "", "udp", "udp:", "udp6:15002", "tcp:15002:interface=127.0.0.1", "udp:-1", "udp:65536",
    "udp: 15002", "udp:15002:", "udp:15002:interface=", "udp:15002:interface=localhost",
    "udp:15002:interface=127.0.0.1:backlog=5", "udp:15002:backlog=5", "udp:0x10",
    "udp:\u0661\u0665",
])
def test_bad_udp_option_is_a_usage_error(description):
    """Anything but udp:PORT[:interface=IP] is a usage error naming --udp."""
    with pytest.raises(usage.UsageError, match="^--udp: bad endpoint"):
        Options().parseOptions(["--udp", description])


def test_secret_file_gives_its_bytes_without_surrounding_whitespace(tmp_path):
    """--secret-file reads the secret from a file only its owner (and
    group) may read, stripped of surrounding whitespace."""
    path = tmp_path / "secret"
    path.write_bytes(b" \n s3 cr\xffet\t\n")
    for mode in (0o600, 0o640, 0o400):
        path.chmod(mode)
        options = Options()
        options.parseOptions(["--secret-file", str(path)])
        assert options["secret"] == b"s3 cr\xffet"


@pytest.mark.parametrize("content, mode, message", [
    (b"s3cret", 0o644, "is readable by everyone"),
    (b"s3cret", 0o604, "is readable by everyone"),
    (b"", 0o600, "is empty"),
    (b" \n\t\n", 0o600, "is empty"),
    (None, 0o600, "cannot read"),
])
def test_bad_secret_file_is_a_usage_error(tmp_path, content, mode, message):
    """A secret file that is missing, empty or world-readable is a usage error."""
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(usage.UsageError, match=f"^--secret-file: .*{message}"):
        Options().parseOptions(["--secret-file", str(path)])


def test_secret_file_that_is_a_directory_is_a_usage_error(tmp_path):
    """A directory is not a secret file."""
    tmp_path.chmod(0o700)
    with pytest.raises(usage.UsageError, match="is not a regular file"):
        Options().parseOptions(["--secret-file", str(tmp_path)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_secret_file_is_a_usage_error(tmp_path):
    """A secret file the server may not read is a usage error."""
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret")
    path.chmod(0o000)
    with pytest.raises(usage.UsageError, match="cannot read .*Permission denied"):
        Options().parseOptions(["--secret-file", str(path)])


def test_world_readable_secret_file_stops_twistd(tmp_path):
    """twistd kvconfig refuses to start with a world-readable secret file."""
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret")
    path.chmod(0o644)
    result = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "kvconfig", "--store=memory:",
         "--xmlrpc=tcp:0:interface=127.0.0.1", "--line=tcp:0:interface=127.0.0.1",
         "--udp=udp:0:interface=127.0.0.1", "--http=none", f"--secret-file={path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "is readable by everyone" in result.stdout + result.stderr
    assert "s3cret" not in result.stdout + result.stderr


def test_datagram_limit_beyond_udp_is_a_usage_error():
    """--max-datagram-bytes above what one UDP datagram carries is refused."""
    with pytest.raises(usage.UsageError, match="max-datagram-bytes must be 512..65507"):
        Options().parseOptions(["--max-datagram-bytes", "65508"])
    options = Options()
    options.parseOptions(["--max-datagram-bytes", "65507", "--max-send-rate", "7",
                          "--heartbeat-seconds", "9"])
    limits = options["limits"]
    assert (limits.max_datagram_bytes, limits.max_send_rate, limits.heartbeat_seconds) == \
        (65507, 7, 9)


def cannot_start(tmp_path, *args: str) -> str:
    """Run twistd kvconfig with *args* (free ports and a memory store unless
    given); it must exit non-zero with one line saying why and no traceback.
    Returns that line."""
    defaults = {"--store": "memory:", "--xmlrpc": "tcp:0:interface=127.0.0.1",
                "--line": "tcp:0:interface=127.0.0.1", "--udp": "udp:0:interface=127.0.0.1",
                "--http": "tcp:0:interface=127.0.0.1"}
    for arg in args:
        defaults.pop(arg.split("=", 1)[0], None)
    result = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "kvconfig",
         *(f"{name}={value}" for name, value in defaults.items()), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if "kvconfig cannot start" in line]
    assert not [line for line in output.splitlines() if "#error]" in line
                or "#critical]" in line and "kvconfig cannot start" not in line], output
    return line


def test_port_in_use_stops_twistd(tmp_path, server):
    """A second server on a port already in use exits with one line naming
    the option, the address and why, instead of running without its
    interface."""
    line = cannot_start(tmp_path, f"--xmlrpc=tcp:{server.port}:interface=127.0.0.1")
    assert f"--xmlrpc: cannot listen on 127.0.0.1:{server.port}: Address already in use" \
        in line
    line = cannot_start(tmp_path, f"--line=tcp:{server.line_port}:interface=127.0.0.1")
    assert f"--line: cannot listen on 127.0.0.1:{server.line_port}: Address already in use" \
        in line


def test_udp_port_in_use_stops_twistd(tmp_path, server):
    """A second server on a UDP port already in use exits with the error
    instead of running without notifications."""
    line = cannot_start(tmp_path, f"--udp=udp:{server.udp_port}:interface=127.0.0.1")
    assert f"--udp: cannot listen on 127.0.0.1:{server.udp_port}: Address already in use" \
        in line


def test_missing_store_directory_is_one_line(tmp_path):
    line = cannot_start(tmp_path, "--store=sqlite:/nonexistent/dir/kv.db")
    assert "--store sqlite:/nonexistent/dir/kv.db: cannot open sqlite store" in line
    assert "the directory /nonexistent/dir does not exist" in line


def test_file_that_is_not_a_store_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes, not a database\n" * 100)
    line = cannot_start(tmp_path, "--store=sqlite:notes.txt")
    assert "notes.txt" in line and "is not a kvconfig (sqlite) store, or it is corrupt" in line


def test_corrupt_row_names_the_file_and_the_key(tmp_path):
    """A store whose row does not hold what kvconfig wrote stops start-up
    with one line naming the file, the table and the key."""
    store = tmp_path / "kv.db"
    with sqlite3.connect(store) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO kv VALUES ('app/broken', x'7b6e6f74206a736f6e', 1, 1, 1, NULL)")
    line = cannot_start(tmp_path, f"--store=sqlite:{store}")
    assert str(store) in line and "'app/broken'" in line and "table kv" in line


@pytest.mark.parametrize("flag, value, message", [
    ("--max-key-bytes", "abc", "--max-key-bytes must be a whole number, not 'abc'"),
    ("--idle-timeout", "1.5", "--idle-timeout must be a whole number, not '1.5'"),
    ("--etcd-timeout", "soon", "--etcd-timeout must be a number, not 'soon'"),
])
def test_bad_option_value_names_the_option(tmp_path, flag, value, message):
    result = subprocess.run([twistd_path(), "-n", "--pidfile=", "kvconfig", flag, value],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert message in result.stdout + result.stderr
    assert "invalid literal" not in result.stdout + result.stderr


def test_tcp_ports_listen_with_a_backlog_of_1024(server):
    """Both TCP ports queue 1024 connections (Twisted's default of 50 made 64
    clients connecting at once wait a second for SYN retries); ss shows a
    listening socket's backlog as its Send-Q."""
    for port in (server.port, server.line_port):
        listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
        assert listing[0] == "LISTEN" and listing[2] == "1024", listing


def test_an_endpoint_that_says_its_backlog_keeps_it():
    assert with_backlog("tcp:0:interface=127.0.0.1", 1024) == \
        "tcp:0:interface=127.0.0.1:backlog=1024"
    assert with_backlog("tcp:0:backlog=5", 1024) == "tcp:0:backlog=5"
    assert with_backlog("unix:/run/kv.sock", 7) == "unix:/run/kv.sock:backlog=7"
