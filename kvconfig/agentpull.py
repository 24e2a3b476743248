"""
Where the kvconfig agent pulls from: the server's XML-RPC ``changes`` and
``list`` calls, over one kept-alive HTTP/1.1 connection.

The bodies are made and read by the stdlib's xmlrpc.client (``allow_none``;
bytes and datetimes come back as Python's own types, as the server sent
them) and carried by treq on a persistent connection pool, so each pull
reuses the connection the last one left open, and opening one is not
logged.  Values are handed on as kvconfig's tagged JSON, as the datagrams
carry them; a ``compacted`` fault becomes errors.Compacted.
"""

from __future__ import annotations

from typing import Any
from xmlrpc.client import Fault, dumps, loads

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

from kvconfig import __version__, errors, values
from kvconfig.agentstate import Change

_HEADERS = {"Content-Type": ["text/xml"], "User-Agent": [f"kvconfig-agent/{__version__}"]}


class PullFailed(Exception):
    """The server answered a pull with something other than XML-RPC."""


class _QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every connection it opens."""

    class _factory(HTTPConnectionPool._factory):
        noisy = False


class XMLRPCSource:
    """Pulls from the XML-RPC server at *url*; each call fails after
    *timeout* seconds (connecting included)."""

    def __init__(self, url: str, reactor: Any, timeout: float = 30) -> None:
        self.url, self.reactor, self.timeout = url, reactor, timeout
        self._pool = _QuietPool(reactor, persistent=True)
        # One pull at a time: one connection, kept open between pulls.
        self._pool.maxPersistentPerHost = 1
        self._http = HTTPClient(Agent(reactor, connectTimeout=timeout, pool=self._pool))

    def changes(self, prefix: str, since: int) -> Deferred:
        def parse(result: dict) -> tuple[int, list[Change]]:
            return result["revision"], [
                Change(event["type"], event["key"], event["revision"],
                       _tagged(event.get("value")))
                for event in result["events"]]
        return self._call("changes", prefix, since).addCallbacks(parse, _compacted)

    def snapshot(self, prefix: str) -> Deferred:
        """The prefix's keys, page after page (list() answers one page, with
        ``more`` when keys follow), and the first page's revision: later
        pages may be newer, which the changes pulled from that revision
        bring in step (a server without pages answers all in one)."""
        items: dict[str, Any] = {}
        first: list[int] = []

        def page(result: dict) -> Deferred | tuple[int, dict[str, Any]]:
            if not first:
                first.append(result["revision"])
            items.update((item["key"], _tagged(item["value"])) for item in result["items"])
            if result.get("more") and result["items"]:
                return self._call("list", prefix, {"after": result["items"][-1]["key"]}) \
                    .addCallback(page)
            return first[0], items

        return self._call("list", prefix).addCallback(page)

    def subscribe(self, prefix: str, udp_port: int, applied: int | None = None) -> Deferred:
        """subscribe(prefix, udp_port[, {applied}]) over XML-RPC: the server
        takes this host from the TCP connection."""
        if applied is None:
            return self._call("subscribe", prefix, udp_port)
        return self._call("subscribe", prefix, udp_port, {"applied": applied})

    def close(self) -> Deferred:
        """Close the kept-alive connection."""
        return self._pool.closeCachedConnections()

    def _call(self, method: str, *args: Any) -> Deferred:
        body = dumps(args, method, allow_none=True).encode("utf-8")

        def again(failure: Failure) -> Deferred | Failure:
            # The server may close the kept-alive connection (its idle
            # timeout) as the request goes out on it.  changes and list
            # change nothing: ask once more, on a new connection.
            if _cancelled(failure) or not failure.check(
                    RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived):
                return failure
            return self._post(body)

        d = self._post(body).addErrback(again).addErrback(_as_cancelled)
        return d.addTimeout(self.timeout, self.reactor)

    def _post(self, body: bytes) -> Deferred:
        return self._http.post(self.url, data=body, headers=_HEADERS).addCallback(self._read)

    def _read(self, response: Any) -> Deferred:
        def answer(body: bytes) -> Any:
            if response.code != 200:
                raise PullFailed(f"HTTP {response.code} {response.phrase.decode('latin-1')}")
            (result,), _ = loads(body, use_builtin_types=True)    # raises a Fault
            return result
        return response.content().addCallback(answer)


def _cancelled(failure: Failure) -> bool:
    """The request was cancelled (by the timeout), which the HTTP client
    reports wrapped in the failure of the request."""
    return bool(failure.check(CancelledError, ConnectingCancelledError)) or any(
        reason.check(CancelledError) for reason in getattr(failure.value, "reasons", ()))


def _as_cancelled(failure: Failure) -> Failure:
    """A cancelled request's failure as CancelledError, which addTimeout
    turns into a TimeoutError."""
    if _cancelled(failure):
        raise CancelledError()
    return failure


def _compacted(failure: Failure) -> Failure:
    if failure.check(Fault) and failure.value.faultCode == errors.Compacted.code:
        raise errors.Compacted(0, 0)
    return failure


def _tagged(value: Any) -> Any:
    """An XML-RPC value as the tagged JSON the datagrams carry."""
    return values.to_tagged(value, max_depth=1 << 16)
