"""The HTTP/1.1 channel, driven in memory through StringTransport and a Clock."""

from __future__ import annotations

import xmlrpc.client

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from kvconfig.xmlrpc import make_factory

from stores import clocked_store


def post(body: bytes, path: bytes = b"/RPC2", extra: bytes = b"",
         version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST %s %s\r\nHost: x\r\nContent-Type: text/xml\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, version, extra, len(body), body))


def chunked(body: bytes, sizes=(3, 5, 1000)) -> bytes:
    out, i = [b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"], 0
    for size in sizes:
        piece = body[i:i + size]
        if piece:
            out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        i += size
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def call(method: str, *params) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode()


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a byte stream into (status, headers, body) responses."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if status == 100:
            found.append((status, headers, b""))
            data = rest
            continue
        length = int(headers[b"content-length"])
        found.append((status, headers, rest[:length]))
        data = rest[length:]
    return found


def result(body: bytes):
    return xmlrpc.client.loads(body, use_builtin_types=True)[0][0]


def fault_code(body: bytes) -> int:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(body)
    return caught.value.faultCode


class Connection:
    """A channel on a StringTransport, over a memory (or sqlite) store."""

    def __init__(self, backend: str = "memory", tmp_path=None, **limits) -> None:
        self.store = clocked_store(backend, tmp_path, **limits)
        self.clock, self.limits = self.store.backend.clock, self.store.limits
        self.factory = make_factory(self.store, self.limits, self.clock)
        self.transport = StringTransport()
        self.channel = self.factory.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        chunk = chunk or len(data) or 1
        for i in range(0, len(data), chunk):
            self.channel.dataReceived(data[i:i + chunk])

    def take(self):
        out = self.transport.value()
        self.transport.clear()
        return responses(out)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


PIPELINE = (
    post(call("save", "a", "1"))
    + chunked(call("save", "b", [1, 2, {"x": b"\x00"}]))
    + post(call("load", "a"), path=b"/")
    + post(call("load", "b"), extra=b"Connection: keep-alive\r\n")
    + post(call("nope"))
    + post(call("delete", "a")) + post(call("load", "a"))
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 8, 9, 64, None])
def test_pipelined_requests_at_every_chunk_size(chunk):
    """The same pipelined requests, fed 1..9 bytes (or more) at a time, get
    the same answers in order, and the connection stays open."""
    conn = Connection()
    conn.feed(PIPELINE, chunk)
    got = conn.take()
    assert [status for status, _, _ in got] == [200] * 7
    assert result(got[0][2]) is None and result(got[1][2]) is None
    assert result(got[2][2]) == "1"
    assert result(got[3][2]) == [1, 2, {"x": b"\x00"}]
    assert fault_code(got[4][2]) == -32601
    assert result(got[6][2]) is None
    assert all(h[b"content-type"].startswith(b"text/xml") and b"date" in h for _, h, _ in got)
    assert not conn.closed


@pytest.mark.parametrize("chunk", [1, 3, 7, None])
def test_durable_writes_answer_in_order_after_the_commit(tmp_path, chunk):
    """With sqlite, a write is answered only after the commit turn, and the
    reads pipelined behind it wait their turn and see it."""
    conn = Connection("sqlite", tmp_path)
    conn.feed(post(call("save", "k", "v")) + post(call("load", "k")), chunk)
    assert conn.take() == []
    conn.clock.advance(0)
    got = conn.take()
    assert [result(body) for _, _, body in got] == [None, "v"]
    conn.store.stop()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /RPC2 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (post(call("load", "a"), path=b"/other"), 404),
    (b"POST /RPC2\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/2.0\r\n\r\n", 505),
    (b"POST /RPC2 SPDY\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /RPC2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX", 400),
    (b"POST /RPC2 HTTP/1.1\r\nX: " + b"a" * 20000, 431),
])
def test_http_errors_get_a_status_and_a_closed_connection(request_bytes, status):
    """Requests that are not XML-RPC POSTs get an HTTP error, then the
    connection closes; nothing reaches the store."""
    conn = Connection()
    conn.feed(request_bytes + post(call("save", "x", 1)))
    got = conn.take()
    assert [s for s, _, _ in got] == [status]
    assert got[0][1][b"connection"] == b"close"
    if status == 405:
        assert got[0][1][b"allow"] == b"POST"
    assert conn.closed and conn.store.revision == 0


SMUGGLED = call("save", "smuggled", 1)
SIZE = b"%x" % len(SMUGGLED)


def chunked_with_size(size_line: bytes) -> bytes:
    body = SMUGGLED
    return (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size_line + b"\r\n" + body + b"\r\n0\r\n\r\n")


# The request-smuggling leniencies Twisted fixed for CVE-2022-24801: chunk
# sizes int(x, 16) takes but RFC 9112's 1*HEXDIG does not, and header
# values whose "whitespace" is \v or \f.
SMUGGLING = {
    "0x_prefix": chunked_with_size(b"0x" + SIZE),
    "plus_sign": chunked_with_size(b"+" + SIZE),
    "underscore": chunked_with_size(b"0_" + SIZE),
    "leading_space": chunked_with_size(b" " + SIZE),
    "trailing_space": chunked_with_size(SIZE + b" "),
    "minus_zero": chunked_with_size(b"-0"),
    "too_many_digits": chunked_with_size(b"0" * 17 + b"1"),
    "control_in_extension": chunked_with_size(SIZE + b";a=\x01"),
    "vtab_in_content_length": post(SMUGGLED).replace(
        b"Content-Length: ", b"Content-Length: \x0b"),
    "formfeed_after_chunked": chunked_with_size(SIZE)
    .replace(b"chunked\r\n", b"chunked\x0c\r\n"),
    "transfer_encoding_twice": chunked_with_size(SIZE)
    .replace(b"Transfer-Encoding: chunked\r\n",
             b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    "space_before_colon": post(SMUGGLED).replace(b"Host:", b"Host :"),
    "no_host": post(SMUGGLED).replace(b"Host: x\r\n", b""),
    "two_hosts": post(SMUGGLED).replace(b"Host: x\r\n",
                                                           b"Host: x\r\nHost: y\r\n"),
    "nul_in_value": post(SMUGGLED).replace(b"Host: x", b"Host: x\x00y"),
    "bad_method_token": post(SMUGGLED).replace(b"POST", b"PO(ST", 1),
}


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=SMUGGLING)
def test_request_smuggling_leniencies_are_400(request_bytes):
    """Every framing the RFCs do not allow gets 400 and a closed connection;
    nothing reaches the store."""
    conn = Connection()
    conn.feed(request_bytes + post(call("save", "after", 1)))
    got = conn.take()
    assert [status for status, _, _ in got] == [400], got
    assert conn.closed and conn.store.revision == 0


def test_strict_framing_still_takes_what_the_rfcs_allow():
    """Upper-case hex, chunk extensions with spaces before the ";", tabs
    around header values, HTTP/1.0 without Host: all served."""
    body = call("save", "ok", 1)
    conn = Connection()
    conn.feed(chunked_with_size(SIZE.upper() + b" \t;name=value"))
    conn.feed(post(call("save", "tabbed", 2)).replace(b"Host: x", b"Host:\tx\t"))
    conn.feed(b"POST /RPC2 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    got = conn.take()
    assert [status for status, _, _ in got] == [200, 200, 200]
    assert conn.store.load("smuggled") == 1 and conn.store.load("tabbed") == 2


@pytest.mark.parametrize("header, closes", [
    (b"Connection: close", True),
    (b"Connection: keep-alive, close", True),
    (b"Connection: Upgrade,CLOSE", True),
    (b"Connection: closed", False),
    (b"Connection: x-close-please", False),
    (b"Connection: keep-alive", False),
])
def test_connection_is_a_token_list(header, closes):
    """Connection is a comma-separated list of tokens: "close" among them
    closes; a token merely containing "close" does not."""
    conn = Connection()
    conn.feed(post(call("save", "k", 1), extra=header + b"\r\n"))
    (status, headers, _), = conn.take()
    assert status == 200
    assert (headers.get(b"connection") == b"close") is closes
    assert conn.closed is closes


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_over_the_limit_is_discarded_and_answered_with_fault_10(framing):
    """A body over max_body_bytes is never kept: it is read past and answered
    with Fault 10, and the connection serves the next request."""
    conn = Connection(max_body_bytes=500)
    big = call("save", "big", "x" * 2000)
    conn.feed((post(big) if framing == "length" else chunked(big, (300, 300, 5000)))
              + post(call("save", "small", 1)), 97)
    got = conn.take()
    assert fault_code(got[0][2]) == 10
    assert result(got[1][2]) is None
    assert conn.store.load("big") is None and conn.store.load("small") == 1
    assert not conn.closed


def test_expect_continue():
    """Expect: 100-continue gets 100 Continue, or for a body over the limit,
    Fault 10 at once and a closed connection."""
    conn = Connection(max_body_bytes=500)
    body = call("save", "k", 1)
    head = post(body, extra=b"Expect: 100-continue\r\n")[: -len(body)]
    conn.feed(head)
    assert [s for s, _, _ in conn.take()] == [100]
    conn.feed(body)
    assert result(conn.take()[0][2]) is None
    conn.feed(post(call("save", "k", "x" * 1000), extra=b"Expect: 100-continue\r\n")
              [: -1000])
    got = conn.take()
    assert fault_code(got[0][2]) == 10 and got[0][1][b"connection"] == b"close"
    assert conn.closed


@pytest.mark.parametrize("version, extra, closes", [
    (b"HTTP/1.1", b"", False),
    (b"HTTP/1.1", b"Connection: close\r\n", True),
    (b"HTTP/1.0", b"", True),
    (b"HTTP/1.0", b"Connection: keep-alive\r\n", False),
])
def test_keep_alive_rules(version, extra, closes):
    """HTTP/1.1 keeps the connection unless told to close; 1.0 closes unless
    told to keep it."""
    conn = Connection()
    conn.feed(post(call("load", "a"), version=version, extra=extra))
    ((status, headers, _),) = conn.take()
    assert status == 200
    assert conn.closed == closes
    assert (headers.get(b"connection") == b"close") == closes


def test_idle_connection_is_closed_after_the_timeout():
    """A connection with no request for idle_timeout seconds is closed; activity resets it."""
    conn = Connection(idle_timeout=30)
    conn.clock.advance(20)
    conn.feed(post(call("load", "a")))
    conn.clock.advance(20)
    assert not conn.closed
    conn.clock.advance(10)
    assert conn.closed


def refused(factory, addr=None) -> bytes:
    """What a connection that buildProtocol refuses hears before it closes."""
    transport = StringTransport()
    protocol = factory.buildProtocol(addr)
    protocol.makeConnection(transport)
    assert transport.disconnecting, "a refused connection is closed"
    return transport.value()


def test_connection_limit():
    """Past max_connections, new connections are refused (told why, with
    503 and Retry-After, then closed) and counted."""
    conn = Connection(max_connections=2)
    second = conn.factory.buildProtocol(None)
    second.makeConnection(StringTransport())
    answer = refused(conn.factory)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in answer
    assert b"2 connections" in answer
    assert conn.factory.counters["refused"] == 1
    stats = conn.store.stats()
    assert stats["xmlrpc_refused"] == 1 and stats["xmlrpc_connections"] == 2
    second.connectionLost(None)
    assert isinstance(conn.factory.buildProtocol(None), type(second))


def test_connections_per_address_are_capped():
    """One address gets at most max_connections_per_address; others still
    get in; a closed connection frees its address's place."""
    conn = Connection(max_connections_per_address=2)
    mine = [conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
            for port in (1, 2)]
    for channel in mine:
        channel.makeConnection(StringTransport())
    answer = refused(conn.factory, IPv4Address("TCP", "10.0.0.1", 3))
    assert answer.startswith(b"HTTP/1.1 503 ") and b"10.0.0.1 has 2 connections" in answer
    other = conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1))
    assert isinstance(other, type(mine[0]))
    mine[0].connectionLost(None)
    assert isinstance(conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4)),
                      type(mine[0]))


@pytest.mark.parametrize("partial", [b"P", b"POST /RPC2 HTTP/1.1\r\nHost: x\r\n"])
def test_a_request_head_trickled_in_has_request_timeout(partial):
    """A head that is not complete within request_timeout gets 408 and the
    connection closes, though each byte restarts the idle timer."""
    conn = Connection(request_timeout=10, idle_timeout=300)
    for byte in partial:
        conn.feed(bytes([byte]))
        conn.clock.advance(9 / len(partial))
    assert not conn.closed
    conn.clock.advance(1.5)
    (status, headers, body), = conn.take()
    assert status == 408 and b"within 10 s" in body and conn.closed


def test_the_head_deadline_does_not_run_between_requests_or_while_answering():
    """A kept-alive connection idle between requests, and a complete request
    being answered, are not cut by the head deadline."""
    conn = Connection(request_timeout=10)
    conn.feed(post(call("save", "k", 1)))
    conn.clock.advance(60)
    conn.feed(post(call("load", "k")))
    assert [result(body) for _, _, body in conn.take()] == [None, 1]
    assert not conn.closed


def test_a_client_that_does_not_read_is_not_read_either():
    """When the transport pauses the channel (its write buffer is full), no
    further pipelined request is answered until it resumes."""
    conn = Connection()
    conn.channel.pauseProducing()
    assert conn.transport.producerState == "paused"
    conn.feed(post(call("save", "a", 1)) * 3)
    assert conn.take() == [] and conn.store.revision == 0
    conn.channel.resumeProducing()
    assert len(conn.take()) == 3 and conn.store.revision == 3


def test_pipelining_behind_a_slow_write_stops_reading_past_the_limit(tmp_path):
    """While a write waits for its commit, a client racing ahead is not read
    past max_body_bytes of buffered requests; reading resumes after."""
    conn = Connection("sqlite", tmp_path, max_body_bytes=1000)
    conn.feed(post(call("save", "a", 1)) + post(call("load", "a")) * 20)
    assert conn.transport.producerState == "paused"
    conn.clock.advance(0)
    assert conn.transport.producerState == "producing"
    assert len(conn.take()) == 21
    conn.store.stop()


def test_a_slow_write_does_not_resume_a_client_that_is_not_reading(tmp_path):
    """When the transport has paused the channel (responses not read), the
    answer to a slow write does not resume reading; the buffer stays bounded."""
    conn = Connection("sqlite", tmp_path, max_body_bytes=1000)
    conn.feed(post(call("save", "a", 1)) + post(call("load", "a")) * 20)
    conn.channel.pauseProducing()
    conn.clock.advance(0)
    assert conn.transport.producerState == "paused"
    conn.feed(post(call("load", "a")) * 200)
    conn.channel.resumeProducing()
    assert conn.transport.producerState == "producing"
    assert len(conn.take()) == 221
    conn.store.stop()


def test_counters_beyond_32_bits_are_sent_as_i8():
    """Revisions and counters that outgrow XML-RPC's <int> go out as <i8>,
    which the stdlib client reads as an int, instead of failing to marshal."""
    conn = Connection()
    conn.store.counters["reads"] = 2**31 + 5
    conn.feed(post(call("stats")))
    ((_, _, body),) = conn.take()
    assert b"<i8>2147483653</i8>" in body
    assert result(body)["reads"] >= 2**31 + 5


def test_bodies_of_all_connections_share_one_budget():
    """Request bodies being read count against --max-buffer-bytes for all
    connections together: a body that does not fit is read past unkept and
    answered with Fault 9 limit_exceeded naming the option, while the first
    is served; the budget is whole again after."""
    conn = Connection(max_buffer_bytes=1500)
    other = conn.factory.buildProtocol(None)
    other_transport = StringTransport()
    other.makeConnection(other_transport)
    first, second = post(call("save", "a", "x" * 900)), post(call("save", "b", "y" * 900))
    head_end = first.index(b"\r\n\r\n") + 4
    conn.feed(first[:head_end + 800])            # 800 bytes of a body held
    other.dataReceived(second)                    # does not fit beside it
    (_, _, body), = responses(other_transport.value())
    assert fault_code(body) == 9
    assert b"--max-buffer-bytes" in body
    conn.feed(first[head_end + 800:])
    assert [result(body) for _, _, body in conn.take()] == [None]
    assert conn.store.load("a") == "x" * 900 and conn.store.load("b") is None
    assert conn.store.budget.held == 0
    assert conn.store.stats()["buffers_refused"] == 1
