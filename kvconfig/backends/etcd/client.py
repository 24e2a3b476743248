"""
A small client for etcd v3's JSON gateway, on treq: no threads, no gRPC.

Only what the etcd backend needs: unary calls (``/v3/kv/range``,
``/v3/kv/txn``, ``/v3/lease/grant``) against one member at a time, moving
to the next member when one cannot be reached, and the streaming
``/v3/watch``.

Gateway facts this module relies on (etcd 3.4 and 3.5):

- keys and values are base64; int64 fields (revisions, versions, lease
  IDs) are JSON strings; fields holding their default value (0, false,
  empty) are left out, so a failed txn has no ``succeeded`` and a PUT
  event no ``type``;
- an error is a non-200 answer whose JSON body holds ``code`` (the gRPC
  status) and ``message`` (or ``error``);
- the watch answer is one long chunked body of newline-separated JSON
  objects, ``{"result": {...}}`` or ``{"error": {...}}``, whose boundaries
  do not line up with TCP reads;
- a watch sent with the header ``Grpc-Metadata-hasleader: true`` is
  refused, or cancelled, when its member has no leader; without it, a
  watch on a member that lost quorum stays open and silent forever.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

#: Seconds to wait for a TCP connection to a member.
CONNECT_TIMEOUT = 2.0

_JSON_HEADERS = Headers({b"Content-Type": [b"application/json"]})
_WATCH_HEADERS = Headers({b"Content-Type": [b"application/json"],
                          b"Grpc-Metadata-hasleader": [b"true"]})

_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with *prefix* (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # the empty prefix: every key


class EtcdError(Exception):
    """etcd answered with an error: ``code`` is the gRPC status code."""

    def __init__(self, endpoint: str, status: int, code: int, message: str) -> None:
        super().__init__(f"{endpoint}: {message} (HTTP {status}, code {code})")
        self.endpoint = endpoint
        self.status = status
        self.code = code
        self.message = message


class Unreachable(Exception):
    """No member could be reached (each refused or could not be connected to)."""


class NoAnswer(Exception):
    """A call was sent to *endpoint* and no answer came: it may have been applied."""

    def __init__(self, endpoint: str, error: Exception, timeout: float) -> None:
        reasons = getattr(error, "reasons", None) or []
        timed_out = isinstance(error, CancelledError) or any(
            reason.check(CancelledError) for reason in reasons)
        what = (f"no answer within {timeout:g} s" if timed_out
                else f"the connection failed: {error.__class__.__name__}")
        super().__init__(f"{endpoint}: {what}")
        self.endpoint = endpoint


class MessageTooLarge(Exception):
    """A watch message grew past the bound: reopening would only repeat it."""


class _QuietPool(HTTPConnectionPool):
    """A connection pool that does not log every connection it opens."""

    class _factory(HTTPConnectionPool._factory):
        noisy = False


class EtcdClient:
    """Unary calls to one member of a cluster, moving on when it is unreachable.

    A call that failed to *connect* never reached etcd, so it is safe to
    send to the next member; a call that was sent and then lost its
    connection or its answer may have been applied, and fails as it is.
    """

    log = Logger()

    def __init__(self, reactor, endpoints: list[str], timeout: float,
                 max_connections: int = 128) -> None:
        self.reactor = reactor
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self.timeout = timeout
        #: Index in endpoints of the member calls go to first.
        self.current = 0
        self._pool = _QuietPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._pool.retryAutomatically = False
        agent = Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=self._pool)
        self._http = HTTPClient(agent)
        # Watches get connections of their own: a watch holds its
        # connection for as long as it lives.
        self._watch_http = HTTPClient(
            Agent(reactor, connectTimeout=CONNECT_TIMEOUT,
                  pool=_QuietPool(reactor, persistent=False)))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    def move_on(self) -> None:
        """Send later calls (and the next watch) to the next member."""
        self.current = (self.current + 1) % len(self.endpoints)

    @inlineCallbacks
    def call(self, path: str, body: dict[str, Any]):
        """POST *body* to *path* on a reachable member; the decoded answer.

        Fails with EtcdError (etcd said no), Unreachable (no member could
        be connected to), or the transport's error (sent, outcome unknown).
        """
        data = _encode(body).encode("ascii")
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoint
            try:
                answer = yield self._post(endpoint, path, data)
            except (ConnectError, DNSLookupError) as e:
                self.log.info("etcd member {endpoint} unreachable: {error}",
                              endpoint=endpoint, error=e)
                if self.endpoint == endpoint:
                    self.move_on()
                continue
            except EtcdError:
                raise
            except Exception as e:
                # Sent, and then no answer (a timeout, a lost connection): the
                # member may be hung or gone, so later calls go elsewhere.
                if self.endpoint == endpoint:
                    self.move_on()
                raise NoAnswer(endpoint, e, self.timeout) from None
            return answer
        raise Unreachable(f"no etcd member could be reached ({', '.join(self.endpoints)})")

    def status(self, endpoint: str) -> Deferred:
        """The status of the member at *endpoint* (its ``leader`` is "0", or
        absent, when it has none); fails if it does not answer in time."""
        return self._post(endpoint, "/v3/maintenance/status", b"{}")

    @inlineCallbacks
    def _post(self, endpoint: str, path: str, data: bytes):
        response = yield self._http.post(endpoint + path, data=data, headers=_JSON_HEADERS,
                                         timeout=self.timeout)
        content = yield response.content()
        try:
            answer = _decode(content.decode("utf-8"))
        except ValueError:
            raise EtcdError(endpoint, response.code, -1,
                            f"not JSON: {content[:200]!r}") from None
        if response.code != 200:
            raise EtcdError(endpoint, response.code, int(answer.get("code", -1)),
                            str(answer.get("message") or answer.get("error")))
        return answer

    def watch(self, endpoint: str, create_request: dict[str, Any],
              on_message: Callable[[dict], None], max_message_bytes: int) -> Deferred:
        """Open a watch on *endpoint*; fires with a WatchStream once the
        answer's headers arrive.  *on_message* gets each decoded message;
        the stream's ``done`` Deferred fires (with the reason) when it ends."""
        data = _encode({"create_request": create_request}).encode("ascii")
        d = self._watch_http.post(endpoint + "/v3/watch", data=data, headers=_WATCH_HEADERS,
                                  timeout=self.timeout, unbuffered=True)

        def started(response):
            if response.code != 200:
                return response.content().addCallback(
                    lambda content: _raise(EtcdError(
                        endpoint, response.code, -1,
                        content[:200].decode("utf-8", "replace"))))
            stream = WatchStream(on_message, max_message_bytes, endpoint)
            response.deliverBody(stream)
            return stream

        return d.addCallback(started)

    def close(self) -> Deferred:
        return self._pool.closeCachedConnections()


def _raise(error: Exception) -> None:
    raise error


class WatchStream(Protocol):
    """A watch answer's body: newline-separated JSON messages, split and
    decoded whatever the TCP reads look like, each held in memory only
    until its newline arrives (and never beyond *max_message_bytes*)."""

    def __init__(self, on_message: Callable[[dict], None], max_message_bytes: int,
                 endpoint: str = "") -> None:
        self.on_message = on_message
        #: The member this watch is on.
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.done: Deferred = Deferred()
        #: Set when it is closed to re-read the prefix (not a failure).
        self.resyncing = False
        self._buffer = bytearray()
        self._closed = False

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        while not self._closed:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            if line.strip():
                try:
                    message = _decode(line.decode("utf-8"))
                except ValueError:
                    self.close(ValueError(f"watch sent something not JSON: {line[:200]!r}"))
                    return
                self.on_message(message)
        del buffer[:start]
        if len(buffer) > self.max_message_bytes:
            self.close(MessageTooLarge(f"a watch message grew past {self.max_message_bytes} bytes"))

    def close(self, reason: Exception | None = None) -> None:
        """Stop reading and drop the connection; ``done`` fires with *reason*."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        if self.transport is not None:
            self.transport.stopProducing()
        self._finish(reason or ConnectionAbortedByUs())

    def connectionLost(self, reason: Failure) -> None:
        self._finish(reason.value if not reason.check(ResponseDone)
                     else ConnectionError("the watch's answer ended"))

    def _finish(self, reason: BaseException) -> None:
        self._closed = True
        if not self.done.called:
            self.done.callback(reason)


class ConnectionAbortedByUs(Exception):
    """The watch was closed on purpose (stopping, or moving to another member)."""
