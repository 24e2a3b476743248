"""UDP subscriptions made through the TCP interfaces.

In memory: the line protocol's SUBSCRIBE/UNSUBSCRIBE and XML-RPC's
subscribe/unsubscribe on a StringTransport, over a Clock store, with a fake
datagram transport capturing what the notifier sends.
"""

from __future__ import annotations

import json
import re
import xmlrpc.client
from io import BytesIO

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from kvconfig.backends.memory import MemoryBackend
from kvconfig.limits import Limits
from kvconfig.line import LineFactory
from kvconfig.notifier import Notifier, NotifierProtocol
from kvconfig.store import Store
from kvconfig.xmlrpc import KVConfigXMLRPC, make_factory

from faults import check_fault
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

    def take(self) -> list[tuple[dict, tuple[str, int]]]:
        """The messages sent since the last take, decoded."""
        sent, self.sent = self.sent, []
        return [(json.loads(datagram), address) for datagram, address in sent]


class Notified:
    """A Clock store with a started notifier on a fake datagram transport."""

    def __init__(self, **limits) -> None:
        self.store = clocked_store(**limits)
        self.clock, self.limits = self.store.backend.clock, self.store.limits
        self.notifier = Notifier(self.store, self.limits, self.clock)
        self.udp = FakeDatagramTransport()
        NotifierProtocol(self.notifier).makeConnection(self.udp)
        self.notifier.start()

    def put(self, key: str, value) -> None:
        failures: list = []
        self.store.put(key, value).addErrback(failures.append)
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
        notifier = self.notified.notifier if with_notifier else None
        factory = LineFactory(store, store.limits, self.notified.clock, notifier)
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
    conn = LineConn(notified, IPv6Address("TCP", "::1", 40000))
    assert SUBSCRIBED.match(conn.send("SUBSCRIBE 4000")[0])
    notified.put("k", 1)
    assert [address for _, address in notified.udp.take()] == [("::1", 4000)]


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
        factory = make_factory(store, store.limits, notified.clock, notified.notifier)
        self.transport = StringTransport(peerAddress=peer or IPv4Address("TCP", PEER, 40000))
        self.channel = factory.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def call(self, method: str, *params):
        body = call(method, *params)
        self.channel.dataReceived(b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
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
        body = resource.respond(call(method, "", 4000), "127.0.0.1")
        with pytest.raises(xmlrpc.client.Fault) as info:
            xmlrpc.client.loads(body)
        check_fault(info.value, UNAVAILABLE)
    notified = Notified()
    resource = KVConfigXMLRPC(notified.store, notifier=notified.notifier)
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(resource.respond(call("subscribe", "", 4000), None))
    check_fault(info.value, UNAVAILABLE)
    assert notified.subscriptions() == 0


@pytest.fixture
def site():
    """The XML-RPC resource, with a notifier, mounted in a twisted.web Site
    on a real socket; the notifier's datagrams are captured."""
    limits = Limits()
    store = Store(MemoryBackend(reactor, limits), limits)
    store.start()
    notifier = Notifier(store, limits, reactor)
    udp = FakeDatagramTransport()
    NotifierProtocol(notifier).makeConnection(udp)
    notifier.start()
    port = reactor.listenTCP(0, Site(KVConfigXMLRPC(store, limits, notifier)),
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
