"""UDP subscriptions made through the TCP interfaces, and the notifier wired
into ``twistd kvconfig``.

In memory: the line protocol's SUBSCRIBE/UNSUBSCRIBE and XML-RPC's
subscribe/unsubscribe on a StringTransport, over a Clock store, with a fake
datagram transport capturing what the notifier sends.  Against the installed
``twistd kvconfig``: the stdlib xmlrpc.client with a real UDP socket, and the
UDP cookie handshake from a raw socket, unsigned and signed.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
import xmlrpc.client
from io import BytesIO

import pytest
import pytest_twisted
from twisted.application.internet import UDPServer
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from kvconfig.backends.memory import MemoryBackend
from kvconfig.limits import Limits
from kvconfig.line import LineFactory
from kvconfig.notifier import Notifier, NotifierProtocol
from kvconfig.session import Client, Session
from kvconfig.store import Store
from kvconfig.subscriptions import Subscriptions
from kvconfig.tap import Options, makeService
from kvconfig.udpwire import Sealer
from kvconfig.xmlrpc import KVConfigXMLRPC, make_factory

from faults import (
    INVALID_ARGUMENT,
    INVALID_KEY,
    KEY_TOO_LARGE,
    WRONG_ARGUMENTS,
    check_fault,
    expect_fault,
    unchanged,
)
from serverprocess import KVConfigProcess
from stores import clocked_store

LIMIT_EXCEEDED = (9, "limit_exceeded")
UNAVAILABLE = (8, "unavailable")
SUBSCRIBED = re.compile(r"OK subscribed ([0-9a-f]{16}) (\d+) (\d+) (\d+) (\d+) (\d+)\Z")
PEER = "10.1.2.3"


class FakeDatagramTransport:
    """The UDP port the notifier writes to: keeps every (datagram, address)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.sent.append((datagram, address))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", 15002)

    def take(self) -> list[tuple[dict, tuple[str, int]]]:
        """The messages sent since the last take, decoded."""
        sent, self.sent = self.sent, []
        return [(json.loads(datagram), address) for datagram, address in sent]


class Notified:
    """A Clock store with a started notifier on a fake datagram transport."""

    def __init__(self, **limits) -> None:
        self.store = clocked_store(**limits)
        self.clock, self.limits = self.store.backend.clock, self.store.limits
        self.registry = Subscriptions(self.limits, self.clock, lambda: self.store.revision)
        self.notifier = Notifier(self.store, self.registry, self.limits, self.clock)
        self.udp = FakeDatagramTransport()
        NotifierProtocol(self.notifier).makeConnection(self.udp)
        self.notifier.start()

    def put(self, key: str, value) -> None:
        failures: list = []
        self.store.put(key, value).addErrback(failures.append)
        self.clock.advance(0)   # the fan-out's turn, after the acknowledgement
        assert failures == []

    def subscriptions(self) -> int:
        return self.notifier.stats()["subscriptions"]


class LineConn:
    """A line-protocol connection from *peer* on a StringTransport; its
    factory has the notifier unless *with_notifier* is false."""

    def __init__(self, notified: Notified | None = None, peer=None, with_notifier: bool = True,
                 **limits) -> None:
        self.notified = notified or Notified(**limits)
        store = self.notified.store
        subscriptions = self.notified.registry if with_notifier else None
        factory = LineFactory(store, store.limits, self.notified.clock, subscriptions)
        self.transport = StringTransport(peerAddress=peer or IPv4Address("TCP", PEER, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.take()

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        chunk = chunk or len(data)
        for i in range(0, len(data), chunk):
            self.protocol.dataReceived(data[i:i + chunk])

    def take(self) -> list[str]:
        out = self.transport.value()
        self.transport.clear()
        return out.decode().split("\r\n")[:-1] if out else []

    def send(self, line: str) -> list[str]:
        self.feed(line.encode() + b"\r\n")
        return self.take()


def events(sent: list[tuple[dict, tuple[str, int]]]) -> list[tuple[dict, tuple[str, int]]]:
    return [(message, address) for message, address in sent if message["t"] == "event"]


# The line protocol, in memory


def test_line_subscribe_sends_events_to_the_peer_host_until_unsubscribed():
    """SUBSCRIBE port prefix subscribes this connection's peer host at that
    UDP port: changes under the prefix (only) arrive there as event
    datagrams with the value; UNSUBSCRIBE ends it (OK 1, then OK 0)."""
    notified = Notified()
    notified.put("app/before", 0)
    conn = LineConn(notified)
    (reply,) = conn.send("SUBSCRIBE 4000 app/")
    match = SUBSCRIBED.match(reply)
    assert match, reply
    sub = match.group(1)
    assert [int(n) for n in match.groups()[1:]] == [0, 0, 1, 30, 2]
    notified.put("app/x", {"a": [1, "two"]})
    notified.put("other/y", 1)
    assert notified.udp.take() == [(
        {"v": 1, "t": "event", "sub": sub, "seq": 1, "rev": 2, "op": "put", "key": "app/x",
         "value": {"a": [1, "two"]}},
        (PEER, 4000))]
    assert conn.send("UNSUBSCRIBE 4000 app/") == ["OK 1"]
    assert conn.send("UNSUBSCRIBE 4000 app/") == ["OK 0"]
    notified.put("app/x", 2)
    notified.clock.advance(10)  # heartbeat time: none either
    assert notified.udp.take() == []
    assert notified.subscriptions() == 0


def test_line_subscribe_again_renews_the_lease_of_the_same_subscription():
    """SUBSCRIBE again keeps the subscription (same sub, its seq and rev)
    and renews the lease; without renewal the lease runs out."""
    notified = Notified()
    conn = LineConn(notified)
    sub = SUBSCRIBED.match(conn.send("SUBSCRIBE 4000")[0]).group(1)
    notified.put("k", 1)
    notified.clock.advance(20)
    again = SUBSCRIBED.match(conn.send("subscribe 4000")[0])
    assert again.group(1) == sub and again.group(2, 3) == ("1", "1")
    notified.clock.advance(20)  # 40 s after subscribing, 20 after renewing
    notified.udp.take()
    notified.put("k", 2)
    assert [m["seq"] for m, _ in events(notified.udp.take())] == [2]
    notified.clock.advance(12)  # 32 s after renewing: expired at a heartbeat
    notified.udp.take()
    notified.put("k", 3)
    assert notified.udp.take() == []
    assert notified.subscriptions() == 0
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000")[0]).group(1) != sub


def test_line_subscriptions_are_per_port_and_prefix_and_the_default_prefix_is_all():
    """Two ports of one host, and two prefixes of one port, are separate
    subscriptions; no prefix means every key."""
    notified = Notified()
    conn = LineConn(notified)
    conn.send("SUBSCRIBE 4000")
    conn.send("SUBSCRIBE 4001 a/")
    conn.send("SUBSCRIBE 4001 b/")
    assert notified.subscriptions() == 3
    notified.put("a/1", 1)
    notified.put("c/1", 1)
    got = sorted((address[1], m["key"]) for m, address in events(notified.udp.take()))
    assert got == [(4000, "a/1"), (4000, "c/1"), (4001, "a/1")]


def test_line_subscribe_uses_an_ipv6_peer_host():
    """The subscription's host is the peer's, IPv6 included."""
    notified = Notified()
    notified.registry.bound_host = "::"
    conn = LineConn(notified, IPv6Address("TCP", "::1", 40000))
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000")[0])
    notified.put("k", 1)
    assert [address for _, address in notified.udp.take()] == [("::1", 4000)]


@pytest.mark.parametrize("bound, peer", [
    ("0.0.0.0", IPv6Address("TCP", "::1", 40000)),
    ("::", IPv4Address("TCP", "10.1.2.3", 40000)),
    ("127.0.0.1", IPv4Address("TCP", "10.1.2.3", 40000)),
    ("::1", IPv6Address("TCP", "fe80::1", 40000)),
])
def test_subscriptions_the_udp_port_cannot_serve_are_refused(bound, peer):
    """A subscription for a host the UDP port cannot send to (another
    address family, or a remote host from a loopback port) is refused
    rather than failing every send."""
    notified = Notified()
    notified.registry.bound_host = bound
    conn = LineConn(notified, peer)
    assert conn.send("SUBSCRIBE 4000")[0].startswith("ERR invalid_argument 5 ")
    assert notified.notifier.stats()["subscriptions"] == 0


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 8, 9, None])
def test_line_subscribe_pipelined_at_every_chunk_size(chunk):
    """Pipelined SUBSCRIBE/UNSUBSCRIBE, fed 1..9 bytes at a time or whole,
    get the same replies in order."""
    conn = LineConn()
    conn.feed(b"SUBSCRIBE 4000 p/\nsubscribe\t4000  p/\r\nUNSUBSCRIBE 4000 p/\n"
              b"UnSubscribe 4000 p/\r\nSUBSCRIBE x\nPING\n", chunk)
    lines = conn.take()
    assert len(lines) == 6, lines
    first, second = SUBSCRIBED.match(lines[0]), SUBSCRIBED.match(lines[1])
    assert first and second and first.group(1) == second.group(1)
    assert lines[2:4] == ["OK 1", "OK 0"]
    assert lines[4].startswith("ERR invalid_argument 5 ")
    assert lines[5] == "PONG"


LINE_BAD_INPUT = [
    ("SUBSCRIBE", "wrong_arguments", -32602),
    ("SUBSCRIBE 4000 p/ extra", "wrong_arguments", -32602),
    ("UNSUBSCRIBE", "wrong_arguments", -32602),
    ("SUBSCRIBE port", "invalid_argument", 5),
    ("SUBSCRIBE 4000.5", "invalid_argument", 5),
    ("SUBSCRIBE 0", "invalid_argument", 5),
    ("SUBSCRIBE -1 p/", "invalid_argument", 5),
    ("SUBSCRIBE 65536 p/", "invalid_argument", 5),
    ("UNSUBSCRIBE 70000", "invalid_argument", 5),
    ("SUBSCRIBE 4000 a\x01b", "invalid_key", 1),
    ("SUBSCRIBE 4000 " + "k" * 201, "key_too_large", 2),
    ("UNSUBSCRIBE 4000 " + "k" * 201, "key_too_large", 2),
    ("SUBSCRIBE 4001 full/", "limit_exceeded", 9),
]


@pytest.mark.parametrize(("line", "name", "code"), LINE_BAD_INPUT,
                         ids=[line[:24] for line, _, _ in LINE_BAD_INPUT])
def test_line_bad_subscribe_gets_one_err_line_and_changes_nothing(line, name, code):
    """Each bad SUBSCRIBE/UNSUBSCRIBE gets one ERR line with the
    kvconfig.errors name and code; no subscription is made or ended, the
    store is unchanged, nothing is sent, and the connection goes on."""
    conn = LineConn(max_key_bytes=200, max_subscriptions_per_prefix=1)
    notified = conn.notified
    conn.send("SUBSCRIBE 4000 full/")
    notified.udp.take()
    before = notified.notifier.stats()
    lines = conn.send(line + "\r\nPING")
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"ERR {name} {code} ") and len(lines[0]) > len(name) + 10
    assert lines[1] == "PONG"
    after = notified.notifier.stats()
    assert after["subscriptions"] == 1 and after == before
    assert notified.store.revision == 0 and notified.udp.take() == []


def test_line_max_subscriptions_is_limit_exceeded():
    """Past --max-subscriptions, SUBSCRIBE is ERR limit_exceeded; renewing
    an existing subscription is still allowed."""
    conn = LineConn(max_subscriptions=2)
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000 a/")[0])
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000 b/")[0])
    assert conn.send("SUBSCRIBE 4000 c/")[0].startswith("ERR limit_exceeded 9 ")
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000 a/")[0])
    assert conn.notified.subscriptions() == 2


def test_line_subscribe_without_a_notifier_or_an_ip_peer_is_unavailable():
    """A line factory built without a notifier, or a connection whose peer
    has no IP address (a UNIX socket), answers ERR unavailable."""
    conn = LineConn(with_notifier=False)
    assert conn.send("SUBSCRIBE 4000")[0].startswith("ERR unavailable 8 ")
    assert conn.send("UNSUBSCRIBE 4000")[0].startswith("ERR unavailable 8 ")
    notified = Notified()
    conn = LineConn(notified, UNIXAddress(b"/tmp/kvconfig.sock"))
    assert conn.send("SUBSCRIBE 4000")[0].startswith("ERR unavailable 8 ")
    assert notified.subscriptions() == 0


def test_line_help_explains_subscribe():
    """HELP SUBSCRIBE gives its usage and what it answers."""
    lines = LineConn().send("HELP SUBSCRIBE")
    assert lines[0] == "HELP SUBSCRIBE port [prefix]"
    assert any("OK subscribed" in line for line in lines) and lines[-1] == "END"


# XML-RPC, in memory: the lean channel and a twisted.web Site


def call(method: str, *params) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def result(body: bytes):
    return xmlrpc.client.loads(body, use_builtin_types=True)[0][0]


class XMLRPCConn:
    """The lean HTTP channel from *peer* on a StringTransport."""

    def __init__(self, notified: Notified, peer=None) -> None:
        self.notified = notified
        store = notified.store
        factory = make_factory(store, store.limits, notified.clock, notified.registry)
        self.transport = StringTransport(peerAddress=peer or IPv4Address("TCP", PEER, 40000))
        self.channel = factory.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def call(self, method: str, *params):
        body = call(method, *params)
        self.channel.dataReceived(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                  % (len(body), body))
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.transport.clear()
        assert head.startswith(b"HTTP/1.1 200 "), head
        return result(body)


def test_xmlrpc_subscribe_in_the_lean_channel_is_for_the_peer_host():
    """subscribe(prefix, udp_port) over the lean channel subscribes the TCP
    peer's host, returns the subscription's description, and renews on a
    second call; unsubscribe says whether there was one."""
    notified = Notified()
    notified.put("x", 1)
    conn = XMLRPCConn(notified)
    description = conn.call("subscribe", "app/", 4000)
    assert set(description) == {"sub", "prefix", "seq", "rev", "head", "lease", "heartbeat"}
    assert description["prefix"] == "app/" and description["head"] == 1
    assert (description["lease"], description["heartbeat"]) == (30, 2)
    assert conn.call("subscribe", "app/", 4000)["sub"] == description["sub"]
    assert notified.notifier.stats()["renewals"] == 1
    notified.put("app/k", "v")
    ((message, address),) = events(notified.udp.take())
    assert address == (PEER, 4000) and message["value"] == "v"
    assert conn.call("unsubscribe", "app/", 4000) == {"unsubscribed": True}
    assert conn.call("unsubscribe", "app/", 4000) == {"unsubscribed": False}


def test_xmlrpc_multicall_subscribes_for_the_peer_host():
    """subscribe and unsubscribe inside system.multicall are for the
    caller's host too, and a bad one is a fault of its own."""
    notified = Notified()
    conn = XMLRPCConn(notified, IPv4Address("TCP", "192.0.2.7", 1))
    results = conn.call("system.multicall", [
        {"methodName": "subscribe", "params": ["m/", 4000]},
        {"methodName": "subscribe", "params": ["m/", 0]},
    ])
    assert results[0][0]["prefix"] == "m/" and results[1]["faultCode"] == 5
    notified.put("m/k", 1)
    assert [address for _, address in notified.udp.take()] == [("192.0.2.7", 4000)]
    assert conn.call("system.multicall", [
        {"methodName": "unsubscribe", "params": ["m/", 4000]}]) == [[{"unsubscribed": True}]]
    assert notified.subscriptions() == 0


def test_xmlrpc_subscribe_without_a_notifier_or_an_ip_peer_is_unavailable():
    """A resource built without a notifier, or a caller without an IP
    address, gets Fault 8 unavailable from both calls."""
    store = clocked_store()
    resource = KVConfigXMLRPC(store)
    for method in ("subscribe", "unsubscribe"):
        body = resource.respond(call(method, "", 4000), Session(store, Client("xmlrpc",
                                                                               "127.0.0.1")))
        with pytest.raises(xmlrpc.client.Fault) as info:
            xmlrpc.client.loads(body)
        check_fault(info.value, UNAVAILABLE)
    notified = Notified()
    resource = KVConfigXMLRPC(notified.store, subscriptions=notified.registry)
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(resource.respond(call("subscribe", "", 4000),
                                             Session(notified.store, Client("xmlrpc"))))
    check_fault(info.value, UNAVAILABLE)
    assert notified.subscriptions() == 0


@pytest.fixture
def site():
    """The XML-RPC resource, with a notifier, mounted in a twisted.web Site
    on a real socket; the notifier's datagrams are captured."""
    limits = Limits()
    store = Store(MemoryBackend(reactor, limits), limits)
    store.start()
    subscriptions = Subscriptions(limits, reactor, lambda: store.revision)
    notifier = Notifier(store, subscriptions, limits, reactor)
    udp = FakeDatagramTransport()
    NotifierProtocol(notifier).makeConnection(udp)
    notifier.start()
    port = reactor.listenTCP(0, Site(KVConfigXMLRPC(store, limits, subscriptions)),
                             interface="127.0.0.1")
    yield SiteClient(b"http://127.0.0.1:%d/RPC2" % port.getHost().port), udp
    notifier.stop()
    port.stopListening()


class SiteClient:
    """XML-RPC calls over twisted.web's Agent."""

    def __init__(self, url: bytes) -> None:
        self.url, self.agent = url, Agent(reactor)

    async def callRemote(self, method: str, *params):
        response = await self.agent.request(
            b"POST", self.url, Headers({b"content-type": [b"text/xml"]}),
            FileBodyProducer(BytesIO(call(method, *params))))
        received: Deferred = Deferred()
        response.deliverBody(_Collect(received))
        return result(await received)


class _Collect(Protocol):
    def __init__(self, done: Deferred) -> None:
        self.done, self.chunks = done, []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason=None) -> None:
        self.done.callback(b"".join(self.chunks))


@pytest_twisted.ensureDeferred
async def test_xmlrpc_subscribe_in_a_twisted_web_site_is_for_the_client_address(site):
    """Mounted in a twisted.web Site, subscribe uses the request's client
    address, and events go there."""
    proxy, udp = site
    description = await proxy.callRemote("subscribe", "web/", 4000)
    assert description["seq"] == 0
    assert await proxy.callRemote("save", "web/k", [1]) is None
    ((message, address),) = events(udp.take())
    assert address == ("127.0.0.1", 4000) and message["value"] == [1]
    assert await proxy.callRemote("unsubscribe", "web/", 4000) == {"unsubscribed": True}


# Wiring: makeService, in memory


class UDPMemoryReactor(MemoryReactorClock):
    """A MemoryReactorClock that also records listenUDP."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[tuple] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udp_ports.append((port, protocol, interface))
        listening = FakeDatagramTransport()
        listening.stopListening = lambda: None
        protocol.makeConnection(listening)
        return listening


def record_calls(target, name: str, order: list[str]) -> None:
    """Note "start <name>" and "stop <name>" in *order* as they are called."""
    def recording(original, label: str):
        def call_through():
            order.append(label)
            return original()
        return call_through

    for step in ("start", "stop"):
        setattr(target, step, recording(getattr(target, step), f"{step} {name}"))


def test_make_service_wires_the_notifier_between_the_store_and_the_interfaces():
    """makeService listens on --udp with the notifier, starts it after the
    store and stops it before, hands it to both TCP interfaces, and puts its
    counters in stats() as udp_*."""
    options = Options()
    options.parseOptions(["--store", "memory:", "--udp", "udp:4321:interface=127.0.0.2",
                          "--xmlrpc", "tcp:0", "--line", "tcp:0", "--heartbeat-seconds", "5",
                          "--http", "none"])
    memory = UDPMemoryReactor()
    top = makeService(options, memory)
    names = [child.name for child in top]
    assert names == ["store", "notifier", "udp", "xmlrpc", "line"]
    assert isinstance(top.getServiceNamed("udp"), UDPServer)
    store = top.getServiceNamed("store").store
    notifier = top.getServiceNamed("notifier").notifier
    assert notifier.limits.heartbeat_seconds == 5 and notifier.sealer.secret is None
    order: list[str] = []
    record_calls(store, "store", order)
    record_calls(notifier, "notifier", order)
    top.privilegedStartService()
    top.startService()
    ((port, protocol, interface),) = memory.udp_ports
    assert (port, interface) == (4321, "127.0.0.2") and protocol.notifier is notifier
    assert order == ["start store", "start notifier"]
    line_factory = memory.tcpServers[1][1]
    xmlrpc_factory = memory.tcpServers[0][1]
    subscriptions = notifier.subscriptions
    assert (line_factory.sessions.subscriptions is subscriptions
            and xmlrpc_factory.handler.subscriptions is subscriptions)
    stats = store.stats()
    assert stats["udp_subscriptions"] == 0 and "udp_dropped_unsigned" in stats
    top.stopService()
    assert order == ["start store", "start notifier", "stop notifier", "stop store"]


# Against the installed twistd kvconfig


def udp_socket(timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


def kind(datagram: bytes) -> str:
    """The type of a datagram, signed or not (the JSON holds no raw newline)."""
    return json.loads(datagram.split(b"\n", 1)[0])["t"]


def receive(sock: socket.socket, wanted: str, timeout: float = 5.0) -> bytes:
    """The next datagram of type *wanted*, skipping heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        datagram = sock.recv(65536)
        if kind(datagram) == wanted:
            return datagram
        assert kind(datagram) == "heartbeat", datagram


def silence(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within *seconds*."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            break
    return got


def drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass


@pytest.fixture(scope="module")
def udp_server(tmp_path_factory):
    """A ``twistd kvconfig`` with a one-second heartbeat and at most two
    subscriptions to one prefix."""
    process = KVConfigProcess(tmp_path_factory.mktemp("udp"), "memory:",
                              "--heartbeat-seconds=1", "--max-subscriptions-per-prefix=2")
    process.start()
    yield process
    process.stop()


def prefix() -> str:
    return f"sub-{uuid.uuid4().hex[:8]}/"


def test_xmlrpc_subscribe_save_receive_unsubscribe_with_the_installed_server(udp_server):
    """With the stdlib client: subscribe a real UDP socket, save a key and
    receive its event datagram with the value, delete it and receive that;
    after unsubscribe nothing more arrives, not even heartbeats."""
    proxy, sock, p = udp_server.proxy(), udp_socket(), prefix()
    port = sock.getsockname()[1]
    description = proxy.subscribe(p, port)
    assert description["prefix"] == p and description["seq"] == 0
    assert description["heartbeat"] == 1 and description["lease"] == 30
    proxy.save(p + "db/host", {"addr": "10.0.0.5", "ports": [5432]})
    event = json.loads(receive(sock, "event"))
    assert event == {"v": 1, "t": "event", "sub": description["sub"], "seq": 1,
                     "rev": event["rev"], "op": "put", "key": p + "db/host",
                     "value": {"addr": "10.0.0.5", "ports": [5432]}}
    assert event["rev"] == proxy.get(p + "db/host")["mod_revision"]
    proxy.save("elsewhere/" + p, 1)
    proxy.delete(p + "db/host")
    event = json.loads(receive(sock, "event"))
    assert (event["seq"], event["op"], event["key"]) == (2, "delete", p + "db/host")
    heartbeat = json.loads(receive(sock, "heartbeat", timeout=3))
    assert (heartbeat["sub"], heartbeat["seq"]) == (description["sub"], 2)
    assert proxy.unsubscribe(p, port) == {"unsubscribed": True}
    drain(sock)
    proxy.save(p + "db/host", "again")
    assert silence(sock, 1.5) == []
    assert proxy.unsubscribe(p, port) == {"unsubscribed": False}


def test_xmlrpc_subscribe_is_documented_and_introspectable(udp_server):
    """subscribe and unsubscribe are listed, with help and signatures."""
    proxy = udp_server.proxy()
    assert {"subscribe", "unsubscribe"} <= set(proxy.system.listMethods())
    assert proxy.system.methodHelp("subscribe").startswith("subscribe(prefix, udp_port)")
    assert proxy.system.methodSignature("unsubscribe") == [["struct", "string", "int"]]


@pytest.mark.parametrize(("args", "error"), [
    (("bad key", 4000), INVALID_KEY),
    ((None, 4000), INVALID_KEY),
    (("k" * 1025, 4000), KEY_TOO_LARGE),
    (("p/", 0), INVALID_ARGUMENT),
    (("p/", 65536), INVALID_ARGUMENT),
    (("p/", -5), INVALID_ARGUMENT),
    (("p/", "4000"), INVALID_ARGUMENT),
    (("p/", True), INVALID_ARGUMENT),
    (("p/", 4000.0), INVALID_ARGUMENT),
    (("p/",), WRONG_ARGUMENTS),
    (("p/", 4000, "127.0.0.9"), WRONG_ARGUMENTS),
])
def test_xmlrpc_bad_subscribe_is_a_typed_fault_and_changes_nothing(udp_server, args, error):
    """Bad arguments to subscribe/unsubscribe are Faults with the documented
    codes (the host can never be given), and make or end no subscription."""
    proxy = udp_server.proxy()
    before = proxy.stats()["udp_subscriptions"]
    with unchanged(proxy):
        expect_fault(error, proxy.subscribe, *args)
        expect_fault(error, proxy.unsubscribe, *args)
    assert proxy.stats()["udp_subscriptions"] == before


def test_xmlrpc_subscriptions_past_the_limit_are_limit_exceeded(udp_server):
    """--max-subscriptions-per-prefix reaches the server: a third host:port
    on one prefix is Fault 9 limit_exceeded; renewing the others is not."""
    proxy, p = udp_server.proxy(), prefix()
    first, second, third = udp_socket(), udp_socket(), udp_socket()
    ports = [s.getsockname()[1] for s in (first, second, third)]
    proxy.subscribe(p, ports[0])
    proxy.subscribe(p, ports[1])
    expect_fault(LIMIT_EXCEEDED, proxy.subscribe, p, ports[2])
    proxy.subscribe(p, ports[0])
    for port in ports[:2]:
        proxy.unsubscribe(p, port)


def request(kind: str, prefix: str, cookie: str | None = None, pad: int = 0) -> dict:
    message = {"t": kind, "prefix": prefix}
    if cookie is not None:
        message["cookie"] = cookie
    if pad:
        message["pad"] = "." * pad
    return message


class WallClock:
    @staticmethod
    def seconds() -> float:
        return time.time()


def test_udp_cookie_handshake_against_the_installed_server(udp_server):
    """From a raw UDP socket: an unpadded subscribe gets nothing (a cookie
    would be larger); a padded one gets a cookie no larger than itself; the
    subscribe with that cookie gets 'subscribed', and then events arrive.
    A refused subscribe gets an error datagram; unsubscribe with the cookie
    ends the subscription."""
    proxy, sock, p = udp_server.proxy(), udp_socket(), prefix()
    sealer = Sealer(None, WallClock())
    server = ("127.0.0.1", udp_server.udp_port)
    withheld = proxy.stats()["udp_cookies_withheld"]
    sock.sendto(sealer.seal(request("subscribe", p)), server)
    assert silence(sock, 0.5) == []
    assert proxy.stats()["udp_cookies_withheld"] == withheld + 1

    padded = sealer.seal(request("subscribe", p, pad=256))
    sock.sendto(padded, server)
    answer = receive(sock, "cookie")
    assert len(answer) <= len(padded)
    cookie = json.loads(answer)["cookie"]

    sock.sendto(sealer.seal(request("subscribe", p, cookie)), server)
    subscribed = json.loads(receive(sock, "subscribed"))
    assert subscribed["prefix"] == p and subscribed["seq"] == 0
    assert subscribed["head"] == proxy.stats()["revision"]
    proxy.save(p + "k", b"\x00\x01")
    event = json.loads(receive(sock, "event"))
    assert (event["sub"], event["seq"], event["key"]) == (subscribed["sub"], 1, p + "k")
    assert event["value"] == {"$bytes": "AAE="}

    sock.sendto(sealer.seal(request("subscribe", "bad key", cookie)), server)
    error = json.loads(receive(sock, "error"))
    assert (error["code"], error["error"]) == INVALID_KEY

    sock.sendto(sealer.seal(request("unsubscribe", p, cookie)), server)
    assert json.loads(receive(sock, "unsubscribed")) == {
        "v": 1, "t": "unsubscribed", "prefix": p, "sub": subscribed["sub"]}


@pytest.fixture(scope="module")
def signed_server(tmp_path_factory):
    """A ``twistd kvconfig`` signing with the secret b"s3cret" (the file
    holds it with surrounding whitespace)."""
    directory = tmp_path_factory.mktemp("signed")
    secret_file = directory / "secret"
    secret_file.write_bytes(b"  s3cret\n\n")
    secret_file.chmod(0o600)
    process = KVConfigProcess(directory, "memory:", f"--secret-file={secret_file}")
    process.start()
    yield process
    process.stop()


def test_signed_handshake_with_secret_file(signed_server):
    """With --secret-file, signed requests are answered with datagrams
    signed under the stripped secret (checked by a Sealer with that secret),
    events included; unsigned, wrongly signed and replayed requests are
    ignored and counted."""
    proxy, sock, p = signed_server.proxy(), udp_socket(), prefix()
    server = ("127.0.0.1", signed_server.udp_port)
    ours = Sealer(b"s3cret", WallClock())
    stats = proxy.stats()

    sock.sendto(Sealer(None, WallClock()).seal(request("subscribe", p, pad=512)), server)
    sock.sendto(Sealer(b"wrong", WallClock()).seal(request("subscribe", p, pad=512)), server)
    assert silence(sock, 0.5) == []
    after = proxy.stats()
    assert after["udp_dropped_unsigned"] == stats["udp_dropped_unsigned"] + 1
    assert after["udp_dropped_bad_signature"] == stats["udp_dropped_bad_signature"] + 1

    sock.sendto(ours.seal(request("subscribe", p, pad=512)), server)
    cookie = ours.open(receive(sock, "cookie"))["cookie"]
    signed = ours.seal(request("subscribe", p, cookie))
    sock.sendto(signed, server)
    subscribed = ours.open(receive(sock, "subscribed"))
    assert subscribed["prefix"] == p
    sock.sendto(signed, server)  # a replay
    assert [kind(d) for d in silence(sock, 0.5) if kind(d) != "heartbeat"] == []
    assert proxy.stats()["udp_dropped_replayed"] == stats["udp_dropped_replayed"] + 1

    proxy.save(p + "k", "signed")
    event = ours.open(receive(sock, "event"))
    assert (event["sub"], event["value"]) == (subscribed["sub"], "signed")
    sock.sendto(ours.seal(request("unsubscribe", p, cookie)), server)
    assert ours.open(receive(sock, "unsubscribed"))["sub"] == subscribed["sub"]


def test_the_send_rate_is_per_address_not_per_subscription():
    """Subscribing one port to many prefixes does not multiply what it is
    sent: the rate limit holds for the address."""
    notified = Notified(max_send_rate=5)
    conn = LineConn(notified)
    for prefix in ["", "k", "kk", "kkk", "kkkk", "kkkkk", "kkkkkk", "kkkkkkk"]:
        assert SUBSCRIBED.match(conn.send(f"SUBSCRIBE 4000 {prefix}")[0])
    notified.put("kkkkkkkk", 1)
    assert len(notified.udp.take()) == 5


def test_tcp_subscriptions_to_well_known_ports_are_refused():
    """A TCP caller proves its host, not its port: ports below 1024 (DNS,
    NTP, syslog ...) are refused."""
    notified = Notified()
    conn = LineConn(notified)
    assert conn.send("SUBSCRIBE 53")[0].startswith("ERR invalid_argument 5 ")
    assert notified.notifier.stats()["subscriptions"] == 0
