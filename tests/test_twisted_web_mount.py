"""The XML-RPC resource mounted in a plain twisted.web Site, called over a
real socket with twisted.web's Agent."""

from __future__ import annotations

from io import BytesIO
from xmlrpc.client import Fault, dumps, loads

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from kvconfig.backends.memory import MemoryBackend
from kvconfig.limits import Limits
from kvconfig.store import Store
from kvconfig.xmlrpc import KVConfigXMLRPC


@pytest.fixture
def proxy():
    limits = Limits(max_body_bytes=2000)
    store = Store(MemoryBackend(reactor, limits), limits)
    store.start()
    port = reactor.listenTCP(0, Site(KVConfigXMLRPC(store, limits)), interface="127.0.0.1")
    yield XMLRPCClient(b"http://127.0.0.1:%d/RPC2" % port.getHost().port)
    port.stopListening()


class XMLRPCClient:
    """XML-RPC over twisted.web's Agent (Twisted's own Proxy is deprecated)."""

    def __init__(self, url: bytes) -> None:
        self.url = url
        self.agent = Agent(reactor)

    async def callRemote(self, method: str, *params):
        body = dumps(params, method, allow_none=True).encode()
        response = await self.agent.request(
            b"POST", self.url, Headers({b"content-type": [b"text/xml"]}),
            FileBodyProducer(BytesIO(body)),
        )
        received: Deferred = Deferred()
        response.deliverBody(_Collect(received))
        ((result,), _) = loads(await received, use_builtin_types=True)
        return result


class _Collect(Protocol):
    def __init__(self, done: Deferred) -> None:
        self.done, self.chunks = done, []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason=None) -> None:
        self.done.callback(b"".join(self.chunks))


@pytest_twisted.ensureDeferred
async def test_classic_calls_through_a_twisted_web_site(proxy):
    """save/load/delete and the richer calls work the same in any twisted.web Site."""
    assert await proxy.callRemote("save", "ports", [4050, 5100]) is None
    assert await proxy.callRemote("load", "ports") == [4050, 5100]
    assert (await proxy.callRemote("put", "ports", [1], {"prev_revision": 1}))["revision"] == 2
    assert await proxy.callRemote("delete", "ports") is None
    assert await proxy.callRemote("load", "ports") is None


@pytest_twisted.ensureDeferred
async def test_errors_are_the_same_faults(proxy):
    """Errors map to the same Fault codes, including an oversized body."""
    for call, code in [(("nope",), -32601), (("save", ""), -32602), (("save", "", 1), 1),
                       (("save", "big", "x" * 5000), 10)]:
        with pytest.raises(Fault) as caught:
            await proxy.callRemote(*call)
        assert caught.value.faultCode == code
