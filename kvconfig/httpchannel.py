"""
A lean HTTP/1.1 server channel for XML-RPC POSTs.

Why not twisted.web's Site: each request there goes through generic
machinery an XML-RPC call never uses (Content-Type parsed with the email
package for form decoding, canonicalised header objects, sessions, the
resource tree); measured, that is most of each call's cost.  This channel
parses exactly what XML-RPC over HTTP needs and hands the body to the
handler (the twisted.web.xmlrpc resource in kvconfig.xmlrpc), whose
``respond(body, session)`` returns the response body or a Deferred of it;
``session`` is the connection's kvconfig.session.Session, which knows the
client and orders its requests.

What it speaks:

- ``POST <path> HTTP/1.1`` (or 1.0) with ``Content-Length`` or
  ``Transfer-Encoding: chunked``; keep-alive by default on 1.1, on 1.0 only
  with ``Connection: keep-alive``; ``Connection: close`` honoured (the
  header is a list of tokens); ``Expect: 100-continue`` answered; pipelined
  requests answered in order.
- Framing is strict, as RFC 9110/9112 write it, so that no proxy in front
  can read a request differently (request smuggling, cf. CVE-2022-24801):
  a chunk size is hex digits only; header names are tokens; a value's
  whitespace is SP and HTAB only and it holds no control character;
  ``Content-Length`` is digits; ``Transfer-Encoding`` is ``chunked`` once;
  an HTTP/1.1 request has exactly one ``Host``.  Anything else is 400.
- Paths other than the handler's (``/RPC2``, ``/``) get 404, methods other
  than POST 405, malformed requests 400, a compressed body (a
  ``Content-Encoding`` other than identity) 415 once it is read, and the
  connection is closed.
- A head larger than ``MAX_HEAD_BYTES`` gets 431.  A body larger than
  ``max_body_bytes`` is never held: it is read and discarded (so the client,
  which sends the whole body before reading, gets its answer) and the
  handler is asked for the "too large" response; with ``Expect:
  100-continue`` it is refused before the client sends it.
- An idle connection is closed after ``idle_timeout`` seconds.  A client
  that does not read its responses stops being read (the channel is its
  transport's producer), so neither direction buffers without bound.
"""

from __future__ import annotations

import re
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.web.http import datetimeToString

from kvconfig.errors import KVConfigError, LimitExceeded, RequestTooLarge
from kvconfig.limits import Limits
from kvconfig.session import Deadline, Session, Sessions, budget_full

MAX_HEAD_BYTES = 16 * 1024
#: Bytes of pipelined requests read ahead while a response is being made.
READ_AHEAD = 64 * 1024

_STATUS = {
    400: b"400 Bad Request",
    404: b"404 Not Found",
    408: b"408 Request Timeout",
    405: b"405 Method Not Allowed",
    415: b"415 Unsupported Media Type",
    431: b"431 Request Header Fields Too Large",
    500: b"500 Internal Server Error",
    505: b"505 HTTP Version Not Supported",
}


class Handler(TypingProtocol):
    paths: tuple[bytes, ...]

    def respond(self, body: bytes | KVConfigError, session: Session) -> bytes | Deferred:
        """The response body for a request body, or for the error that
        refused it unread (too large, no room), from the client of *session*."""


class HTTPError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# RFC 9110 5.6.2: a token (header names, methods).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB, which no header value (RFC 9110 5.5)
# or request target may hold.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 7.1: chunk-size = 1*HEXDIG, then extensions after a ";".  int(x,
# 16) would also take "0x1f", "+1f", "1_f" and spaces (CVE-2022-24801).
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?")


def _chunk_size(line: bytes) -> int:
    match = _CHUNK_SIZE_LINE.fullmatch(line)
    if match is None:
        raise HTTPError(400, "bad chunk size")
    return int(match.group(1), 16)


# Parser states
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(6)


class XMLRPCChannel(Protocol, TimeoutMixin):
    """One client connection: parse requests, answer them in order."""

    log = Logger()

    def __init__(self, factory: XMLRPCChannelFactory, session: Session) -> None:
        self.factory = factory
        self.session = session
        self._head_deadline = Deadline(factory.clock, factory.limits.request_timeout,
                                       self._head_too_slow)
        self.callLater = factory.clock.callLater  # TimeoutMixin's clock
        self._buffer = bytearray()
        self._state = _HEAD
        self._busy = False           # a response is being computed
        self._paused_by_transport = False
        self._reading_paused = False
        self._keep_alive = True
        # The request being read
        self._remaining = 0          # body (or chunk) bytes still to read
        self._body: bytearray | None = None   # None while discarding
        self._refusal: tuple[int, str] | None = None   # to answer once the body is read
        self._body_error: KVConfigError | None = None  # why the body is discarded

    # Connection life

    def connectionMade(self) -> None:
        self.session.connected_from(self.transport.getPeer())
        if hasattr(self.transport, "setTcpNoDelay"):
            # Responses are written whole; waiting for more (Nagle) only adds latency.
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.setTimeout(self.factory.limits.idle_timeout)

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        self.session.close()
        self._head_deadline.stop()
        self.setTimeout(None)
        # Freed now, not when the collector finds this channel's cycle with
        # its transport: the budget they were held under is given back now.
        self._buffer = bytearray()
        self._body = None

    def timeoutConnection(self) -> None:
        self.transport.loseConnection()

    # IPushProducer, for our own transport: it pauses us when the client
    # stops reading responses.

    def pauseProducing(self) -> None:
        self._paused_by_transport = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._paused_by_transport = False
        self._process()

    def stopProducing(self) -> None:
        self._buffer.clear()

    # Reading requests

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        try:
            while not self._busy and not self._paused_by_transport and self._step():
                pass
        except HTTPError as e:
            self._fail(e.status, str(e))
        self._update_reading()
        # A request head trickling in a byte at a time (slowloris) has
        # --request-timeout to be complete; the idle timer restarts with
        # every byte.
        if self._state == _HEAD and self._buffer and not self._busy:
            self._head_deadline.start()
        else:
            self._head_deadline.stop()

    def _head_too_slow(self) -> None:
        self._fail(408, f"no complete request head within {self.factory.limits.request_timeout}"
                        " s; closing")

    def _update_reading(self) -> None:
        """Read from the client unless it is not reading our responses, or it
        is racing ahead of a slow response with a full buffer."""
        pause = self._paused_by_transport or (
            self._busy
            and len(self._buffer) > min(READ_AHEAD, self.factory.limits.max_body_bytes))
        if pause != self._reading_paused and self.connected:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _step(self) -> bool:
        """Consume what the buffer allows; False when more data is needed."""
        state, buffer = self._state, self._buffer
        if state == _HEAD:
            end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buffer) >= MAX_HEAD_BYTES + 4:
                    raise HTTPError(431, "request head too large")
                return False
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._start_request(head)
            return True
        if state == _BODY:
            return self._read_body(self._end_body)
        if state == _CHUNK_SIZE or state == _TRAILER:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HTTPError(400, "chunk header too long")
                return False
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if state == _TRAILER:
                if not line:
                    self._end_body()
                return True
            size = _chunk_size(line)
            if size == 0:
                self._state = _TRAILER
            else:
                self._remaining = size
                self._state = _CHUNK_DATA
            return True
        if state == _CHUNK_DATA:
            return self._read_body(self._end_chunk)
        # _CHUNK_END: the CRLF after a chunk's data
        if len(buffer) < 2:
            return False
        if buffer[:2] != b"\r\n":
            raise HTTPError(400, "chunk not followed by CRLF")
        del buffer[:2]
        self._state = _CHUNK_SIZE
        return True

    def _read_body(self, done) -> bool:
        buffer = self._buffer
        if not buffer and self._remaining:
            return False
        take = min(self._remaining, len(buffer))
        body = self._body
        if body is not None:
            limits = self.factory.limits
            if len(body) + take > limits.max_body_bytes:
                self._refuse_body(RequestTooLarge(
                    f"request body is larger than {limits.max_body_bytes} bytes"))
            elif not self.session.hold("body", len(body) + take):
                self._refuse_body(budget_full("request body not read", self.session.budget))
            else:
                body += buffer[:take]
        del buffer[:take]
        self._remaining -= take
        if self._remaining:
            return False
        done()
        return True

    def _refuse_body(self, error: KVConfigError) -> None:
        """Discard the rest of this body unread, and answer *error* for it."""
        self._body, self._body_error = None, error
        self.session.hold("body", 0)

    def _end_chunk(self) -> None:
        self._state = _CHUNK_END

    def _end_body(self) -> None:
        self._state = _HEAD
        body, self._body = self._body, bytearray()
        self.session.hold("body", 0)
        if self._refusal is not None:
            # Refused once its body was read (discarded), so that the
            # client, which sends it whole before reading, hears why.
            self._fail(*self._refusal)
            return
        self._dispatch(self._body_error if body is None else bytes(body))

    def _start_request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or _CONTROL.search(parts[1]):
            raise HTTPError(400, "malformed request line")
        method, path, version = parts
        if version == b"HTTP/1.1":
            keep_alive = True
        elif version == b"HTTP/1.0":
            keep_alive = False
        else:
            raise HTTPError(505 if version.startswith(b"HTTP/") else 400, "unsupported version")
        length = None
        chunked = expect_continue = False
        encoding = b"identity"
        hosts = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise HTTPError(400, "malformed header line")
            name = name.lower()
            # Only SP and HTAB are whitespace around a value (RFC 9110 5.5),
            # and no control character may be in it: bytes.strip() would
            # take \v and \f too, a request-smuggling leniency.
            value = value.strip(b" \t")
            if _CONTROL.search(value):
                raise HTTPError(400, "control character in a header value")
            if name == b"content-length":
                if (not value.isdigit() or len(value) > 18
                        or (length is not None and int(value) != length)):
                    raise HTTPError(400, "bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked" or chunked:
                    raise HTTPError(400, "unsupported Transfer-Encoding")
                chunked = True
            elif name == b"connection":
                tokens = {token.strip(b" \t") for token in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"host":
                hosts += 1
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
            elif name == b"content-encoding":
                encoding = value.lower()
        if chunked and length is not None:
            raise HTTPError(400, "both Content-Length and chunked")
        if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
            # RFC 9112 3.2: an HTTP/1.1 request carries exactly one Host.
            raise HTTPError(400, "an HTTP/1.1 request needs one Host header")
        self._keep_alive = keep_alive
        if method != b"POST":
            raise HTTPError(405, "only POST is allowed")
        if path.split(b"?", 1)[0] not in self.factory.handler.paths:
            raise HTTPError(404, "no such XML-RPC path; use /RPC2")
        self._refusal = None
        if encoding != b"identity":
            self._refusal = (415, f"Content-Encoding {encoding.decode('latin-1')} is not "
                                  "supported: send the XML-RPC body uncompressed")
            if expect_continue:
                raise HTTPError(*self._refusal)
        limits = self.factory.limits
        too_large = length is not None and length > limits.max_body_bytes
        self._body_error = RequestTooLarge(
            f"request body is larger than {limits.max_body_bytes} bytes")
        if too_large and expect_continue:
            # Refused before the client sends it; the connection cannot be
            # reused since the client may send the body anyway.
            self._keep_alive = False
            self._dispatch(self._body_error)
            return
        if expect_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body = None if too_large or self._refusal else bytearray()
        if chunked:
            self._state = _CHUNK_SIZE
        else:
            self._remaining = length or 0
            self._state = _BODY

    # Answering

    def _dispatch(self, body: bytes | KVConfigError) -> None:
        try:
            result = self.factory.handler.respond(body, self.session)
        except Exception:
            self.log.failure("XML-RPC handler failed")
            self._fail(500, "internal error")
            return
        if isinstance(result, Deferred):
            self._busy = True
            result.addCallback(self._answer_later).addErrback(self._handler_failed)
        else:
            self._send(result)

    def _answer_later(self, response: bytes) -> None:
        self._busy = False
        if self.transport is None or not self.connected:
            return
        self._send(response)
        self._process()

    def _handler_failed(self, failure) -> None:
        self.log.failure("XML-RPC handler failed", failure)
        self._busy = False
        if self.connected:
            self._fail(500, "internal error")

    def _send(self, body: bytes) -> None:
        close = not self._keep_alive
        self.transport.write(
            b"HTTP/1.1 200 OK\r\n%sContent-Type: text/xml; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n%s"
            % (self.factory.date_header(), len(body),
               b"Connection: close\r\n" if close else b"", body)
        )
        if close:
            self._close()

    def _fail(self, status: int, reason: str) -> None:
        body = reason.encode("utf-8") + b"\n"
        # What the client may send instead (RFC 9110 15.5.6, RFC 7694).
        allow = {405: b"Allow: POST\r\n", 415: b"Accept-Encoding: identity\r\n"}.get(status, b"")
        self.transport.write(
            b"HTTP/1.1 %s\r\n%s%sContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (_STATUS[status], self.factory.date_header(), allow, len(body), body)
        )
        self._close()

    def _close(self) -> None:
        self._busy = True  # read no further requests
        self._buffer.clear()
        self.transport.loseConnection()


class _Refusal(Protocol):
    """A connection past a connection limit: told why (503), then closed."""

    def __init__(self, factory: XMLRPCChannelFactory, reason: str) -> None:
        self.factory, self.reason = factory, reason

    def connectionMade(self) -> None:
        body = self.reason.encode("utf-8") + b"\n"
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\n%sRetry-After: 1\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (self.factory.date_header(), len(body), body))
        self.transport.loseConnection()


class XMLRPCChannelFactory(Factory):
    """Builds channels, each with a session of its own (None past the
    connection limit: *sessions* refuses it)."""

    noisy = False  # no "Starting factory" line: start-up logs the address

    def __init__(self, handler: Handler, limits: Limits, clock: IReactorTime,
                 sessions: Sessions) -> None:
        self.handler = handler
        self.limits = limits
        self.clock = clock
        self.sessions = sessions
        self.counters = sessions.counters
        self._date_second = -1
        self._date = b""

    def buildProtocol(self, addr) -> Protocol:
        try:
            session = self.sessions.open(getattr(addr, "host", None))
        except LimitExceeded as e:
            return _Refusal(self, str(e))
        return XMLRPCChannel(self, session)

    def date_header(self) -> bytes:
        """The Date header line, formatted once a second."""
        now = int(self.clock.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = b"Date: %s\r\nServer: kvconfig\r\n" % datetimeToString(now)
        return self._date
