"""The agent's pulls (kvconfig.agentpull.XMLRPCSource) against the installed
``twistd kvconfig``: one kept-alive connection for every pull, values as the
server sent them, ``compacted`` as errors.Compacted, timeouts, a dropped
kept-alive connection, and an agent that imports nothing of the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from xmlrpc.client import ServerProxy, dumps

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

import kvconfig
from kvconfig import errors
from kvconfig.agentpull import XMLRPCSource
from kvconfig.agentstate import Change

from serverprocess import KVConfigProcess


@pytest.fixture(scope="module")
def short_history(tmp_path_factory):
    """A ``twistd kvconfig`` keeping only the last 5 events of history."""
    process = KVConfigProcess(tmp_path_factory.mktemp("pull"), None, "--history-events=5")
    process.start()
    yield process
    process.stop()


class CountingServer(ProxyServer):
    def connectionMade(self) -> None:
        self.factory.connections += 1
        super().connectionMade()


class Forwarder:
    """A TCP forwarder to *port* on 127.0.0.1 that counts the connections
    made through it."""

    def __init__(self, port: int) -> None:
        self.factory = ProxyFactory("127.0.0.1", port)
        self.factory.protocol = CountingServer
        self.factory.noisy = False
        self.factory.connections = 0
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/RPC2"


@pytest_twisted.ensureDeferred
async def test_pulls_share_one_kept_alive_connection_and_log_nothing(short_history):
    """A snapshot and ten changes() calls go over one TCP connection, and
    none of them logs a line (no "Starting factory")."""
    proxy = ServerProxy(short_history.url, allow_none=True)
    proxy.save("pool/a", 1)
    forwarder = Forwarder(short_history.port)
    source = XMLRPCSource(forwarder.url, reactor)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        revision, items = await source.snapshot("pool/")
        assert items == {"pool/a": 1}
        for n in range(10):
            proxy.save("pool/a", n)
            after, changes = await source.changes("pool/", revision)
            assert changes == [Change("put", "pool/a", after, n)]
            revision = after
    finally:
        globalLogPublisher.removeObserver(logged)
        await source.close()
        await forwarder.port.stopListening()
    assert [event.get("log_format") for event in logged
            if event.get("log_namespace", "").startswith(("twisted.web", "kvconfig"))] == []
    assert forwarder.factory.connections == 1


@pytest_twisted.ensureDeferred
async def test_values_come_back_as_the_tagged_json_of_the_datagrams(short_history):
    """bytes, datetimes, None, nested values and a one-key "$" dict arrive
    as the server sent them, in kvconfig's tagged JSON."""
    proxy = ServerProxy(short_history.url, allow_none=True, use_builtin_types=True)
    written = {
        "types/bytes": b"\x00\xff",
        "types/when": datetime(2024, 1, 2, 3, 4, 5),
        "types/none": None,
        "types/nested": {"list": [b"x", 1.5, True], "name": "héllo"},
        "types/dollar": {"$ref": 1},
    }
    for key, value in written.items():
        proxy.save(key, value)
    source = XMLRPCSource(short_history.url, reactor)
    try:
        revision, items = await source.snapshot("types/")
        proxy.delete("types/none")
        _, changes = await source.changes("types/", revision)
    finally:
        await source.close()
    assert items == {
        "types/bytes": {"$bytes": "AP8="},
        "types/when": {"$datetime": "20240102T03:04:05"},
        "types/none": None,
        "types/nested": {"list": [{"$bytes": "eA=="}, 1.5, True], "name": "héllo"},
        "types/dollar": {"$dict": {"$ref": 1}},
    }
    assert [(c.op, c.key, c.value) for c in changes] == [("delete", "types/none", None)]


@pytest_twisted.ensureDeferred
async def test_a_compacted_fault_is_compacted(short_history):
    proxy = ServerProxy(short_history.url, allow_none=True)
    for n in range(10):
        proxy.save("compact/k", n)
    source = XMLRPCSource(short_history.url, reactor)
    try:
        with pytest.raises(errors.Compacted):
            await source.changes("compact/", 0)
    finally:
        await source.close()


class Silent(Protocol):
    """Accepts a connection and never answers."""


@pytest_twisted.ensureDeferred
async def test_a_server_that_does_not_answer_times_out():
    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    source = XMLRPCSource(f"http://127.0.0.1:{port.getHost().port}/RPC2", reactor,
                          timeout=0.3)
    try:
        with pytest.raises(TimeoutError):
            await source.snapshot("app/")
    finally:
        await source.close()
        await port.stopListening()


class ClosesKeptAlive(Resource):
    """Answers the first request of each connection; closes the connection
    without answering the next one, as a server timing out an idle
    connection does just as a request arrives on it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answered: set[int] = set()
        self.connections = 0

    def render_POST(self, request) -> bytes | int:
        channel = id(request.channel)
        if channel in self.answered:
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        self.answered.add(channel)
        self.connections += 1
        request.setHeader(b"content-type", b"text/xml")
        return dumps(({"revision": 3, "events": []},), methodresponse=True).encode()


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_closed_by_the_server_is_replaced():
    resource = ClosesKeptAlive()
    site = Site(resource)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    source = XMLRPCSource(f"http://127.0.0.1:{port.getHost().port}/RPC2", reactor)
    try:
        for _ in range(3):
            assert await source.changes("app/", 1) == (3, [])
    finally:
        await source.close()
        await port.stopListening()
    assert resource.connections == 3


def test_the_agent_imports_nothing_of_the_server(server):
    """The agent's modules, started and pulling in a process of their own,
    import of kvconfig only udpwire, values, errors and their own modules,
    and not twisted.web.xmlrpc."""
    code = f"""
import json, sys
from twisted.internet import task
import kvconfig.agenttap
from kvconfig.agentpull import XMLRPCSource

async def main(reactor):
    source = XMLRPCSource({server.url!r}, reactor)
    await source.snapshot("app/")
    await source.close()
    print(json.dumps(sorted(m for m in sys.modules
                            if m.startswith("kvconfig") or m == "twisted.web.xmlrpc")))

task.react(lambda reactor: __import__("twisted.internet.defer").internet.defer
           .ensureDeferred(main(reactor)))
"""
    # The kvconfig under test, wherever the process is started.
    path = os.path.dirname(os.path.dirname(kvconfig.__file__))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [
        "kvconfig", "kvconfig.agent", "kvconfig.agentoutput", "kvconfig.agentpull",
        "kvconfig.agentstate", "kvconfig.agenttap", "kvconfig.errors", "kvconfig.udpwire",
        "kvconfig.values"]
