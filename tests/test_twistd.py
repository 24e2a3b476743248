"""The installed ``twistd kvconfig``: discovery, the classic session, crashes, daemon mode."""

from __future__ import annotations

import os
import signal
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
         f"--xmlrpc=tcp:{port}:interface=127.0.0.1", "--line=tcp:0:interface=127.0.0.1"],
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
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    """Bad options, or a store that cannot be opened, stop twistd with an
    error that names the problem."""
    result = subprocess.run([twistd_path(), "-n", "--pidfile=", "kvconfig", *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_port_in_use_stops_twistd(tmp_path, server):
    """A second server on a port already in use exits with an error instead
    of running without its interface."""
    result = subprocess.run(
        [twistd_path(), "-n", "--pidfile=", "kvconfig", "--store=memory:",
         f"--xmlrpc=tcp:{server.port}:interface=127.0.0.1",
         "--line=tcp:0:interface=127.0.0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr
