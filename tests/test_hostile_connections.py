"""
Connections under attack (issue 11, items 5 and 9), against the installed
``twistd kvconfig`` at its default limits: slowloris on both TCP ports,
request smuggling framings, and XML the fast parser must refuse as the full
one does.

Attackers connect from 127.0.0.1 and legitimate clients from
hostile.LEGIT_HOST (127.0.0.2): the per-address caps are what keep the
attackers from taking every slot.
"""

from __future__ import annotations

import selectors
import socket
import time
import xmlrpc.client

import pytest

from hostile import (
    MIB,
    LineClient,
    connections,
    proxy_from,
    raise_open_files_limit,
    warmed_up,
)
from serverprocess import KVConfigProcess

#: Seconds between the bytes an attacker trickles (issue 11: 3).
TRICKLE_INTERVAL = 3.0
MALFORMED_REQUEST = -32700


@pytest.fixture
def kvserver(tmp_path):
    """A server of the test's own, for the attacks."""
    raise_open_files_limit()
    process = KVConfigProcess(tmp_path)
    process.start()
    warmed_up(process)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the module's single requests."""
    process = KVConfigProcess(tmp_path_factory.mktemp("hostile-requests"))
    process.start()
    yield process
    process.stop()


# Item 5: slowloris


class Tricklers:
    """*count* connections from 127.0.0.1 to *port*, each sending one more
    byte of *text* every time ``drip`` is called, and keeping what the
    server says to it until it closes."""

    def __init__(self, port: int, count: int, text: bytes) -> None:
        self.text = text
        self.sent = 0
        self.heard: dict[socket.socket, bytearray] = {}
        self.closed: set[socket.socket] = set()
        with selectors.DefaultSelector() as selector:
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind(("127.0.0.1", 0))
                sock.connect_ex(("127.0.0.1", port))
                selector.register(sock, selectors.EVENT_WRITE)
                self.heard[sock] = bytearray()
            deadline = time.monotonic() + 20
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(0.5):
                    selector.unregister(key.fileobj)
        self.drip()

    def drip(self) -> None:
        self.listen()
        byte = self.text[self.sent:self.sent + 1]
        self.sent += 1
        for sock in self.heard:
            if sock not in self.closed:
                try:
                    sock.send(byte)
                except OSError:
                    self.closed.add(sock)

    def listen(self) -> None:
        """Take what the server has said, and see which it closed."""
        for sock, heard in self.heard.items():
            while sock not in self.closed:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self.closed.add(sock)
                heard += data

    def open(self) -> int:
        return len(self.heard) - len(self.closed)

    def told(self, line: int = 0) -> list[bytes]:
        """What each connection the server closed was told: that line of it
        (the first by default; -1, the last)."""
        return [bytes(self.heard[sock]).rstrip(b"\r\n").split(b"\r\n")[line]
                for sock in self.closed]

    def close(self) -> None:
        for sock in self.heard:
            sock.close()


def legitimate_calls(process: KVConfigProcess, xmlrpc_calls: int = 20,
                     line_commands: int = 12) -> tuple[int, int]:
    """(XML-RPC calls, line commands) that succeeded from LEGIT_HOST, each
    on a connection of its own and with a timeout of a few seconds."""
    xmlrpc_ok = line_ok = 0
    for i in range(xmlrpc_calls):
        try:
            with proxy_from(process, timeout=5) as proxy:
                proxy.save(f"legit/x{i}", i)
                xmlrpc_ok += proxy.load(f"legit/x{i}") == i
        except (OSError, xmlrpc.client.Error):
            pass
    for i in range(line_commands):
        try:
            with LineClient(process, timeout=5) as client:
                line_ok += client.command(b"SET legit/l%d %d" % (i, i)).startswith(b"OK ")
        except (OSError, AssertionError):
            pass
    return xmlrpc_ok, line_ok


def test_legitimate_clients_get_through_slowloris(kvserver):
    """1,000 connections on each TCP port trickle a request head (XML-RPC)
    or a line (line protocol) a byte every 3 s (issue 11: legitimate
    clients then got 0 of 20 XML-RPC calls and 0 of 12 line commands).
    Meanwhile 20 XML-RPC calls and 12 line commands from another address
    all succeed.  One address gets --max-connections-per-address (128) of
    them, and the rest are told why they are refused; those kept are told
    that the deadline passed and closed --request-timeout (10 s) after
    their first byte."""
    head = b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
    xmlrpc_attack = Tricklers(kvserver.port, 1000, head)
    line_attack = Tricklers(kvserver.line_port, 1000, b"PING " + b"z" * 20)
    try:
        started = time.monotonic()
        for tick in range(1, 5):  # to 12 s, past the deadline
            time.sleep(max(0.0, started + tick * TRICKLE_INTERVAL - time.monotonic()))
            xmlrpc_attack.drip()
            line_attack.drip()
            if tick == 1:  # every attacker connected has been let in, or refused
                xmlrpc_ok, line_ok = legitimate_calls(kvserver)
        assert (xmlrpc_ok, line_ok) == (20, 12)
        xmlrpc_attack.listen()
        line_attack.listen()
        assert (xmlrpc_attack.open(), line_attack.open()) == (0, 0)
        assert sorted(set(xmlrpc_attack.told())) == [b"HTTP/1.1 408 Request Timeout",
                                                     b"HTTP/1.1 503 Service Unavailable"]
        assert sum(told.startswith(b"HTTP/1.1 408") for told in xmlrpc_attack.told()) == 128
        told = line_attack.told(-1)  # after the greeting, if it was let in
        assert all(line.startswith(b"ERR limit_exceeded 9 ") for line in told), set(told)
        assert sum(b"within 10 s" in line for line in told) == 128
    finally:
        xmlrpc_attack.close()
        line_attack.close()


BODY_BYTES = 8 * MIB


def test_legitimate_clients_get_through_while_bodies_are_held(kvserver):
    """8 connections each send the head of an 8 MiB body and all of it but
    its last byte, and hold it: 20 XML-RPC calls and a 100 KB SET from
    another address still succeed."""
    head = (b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
    with connections(8, kvserver.port) as holders:
        for sock in holders:
            sock.sendall(head + b"<" * (BODY_BYTES - 1))
        time.sleep(0.5)
        xmlrpc_ok, _ = legitimate_calls(kvserver, line_commands=0)
        with LineClient(kvserver) as client:
            big_set = client.command(b"SET legit/big \"%s\"" % (b"b" * 100_000))
    assert xmlrpc_ok == 20
    assert big_set.startswith(b"OK "), big_set


# Item 9: request smuggling, against the installed server

SMUGGLED = xmlrpc.client.dumps(("smuggled", 1), "save").encode()
SIZE = b"%x" % len(SMUGGLED)


def chunked(size_line: bytes) -> bytes:
    return (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n" + SMUGGLED
            + b"\r\n0\r\n\r\n")


def posted(body: bytes, extra: bytes = b"", host: bytes = b"Host: x\r\n") -> bytes:
    return (b"POST /RPC2 HTTP/1.1\r\n" + host + b"Content-Type: text/xml\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


# Issue 11 item 9: the chunk sizes int(x, 16) took, header values stripped of
# \v and \f, and HTTP/1.1 without Host.
SMUGGLING = {
    "0x_prefix": chunked(b"0x" + SIZE),
    "plus_sign": chunked(b"+" + SIZE),
    "underscore": chunked(b"0_" + SIZE),
    "leading_space": chunked(b" " + SIZE),
    "vtab_in_content_length": posted(SMUGGLED).replace(b"Content-Length: ",
                                                       b"Content-Length: \x0b"),
    "formfeed_after_chunked": chunked(SIZE).replace(b"chunked\r\n", b"chunked\x0c\r\n"),
    "no_host": posted(SMUGGLED, host=b""),
}


def exchange(process: KVConfigProcess, request: bytes) -> tuple[bytes, int]:
    """Send *request*, then a ``stats()`` call on the same connection: (the
    first response's status line, how many XML-RPC answers came back)."""
    follow = posted(xmlrpc.client.dumps((), "stats").encode())
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(request + follow)
        data = bytearray()
        while data.count(b"</methodResponse>") < 2:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data).partition(b"\r\n")[0], data.count(b"</methodResponse>")


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=SMUGGLING)
def test_smuggling_framings_are_400_and_close(shared, request_bytes):
    """Each framing a proxy could read differently is 400, the connection
    is closed (nothing after it is read), and nothing is written."""
    status, answers = exchange(shared, request_bytes)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert answers == 0
    with proxy_from(shared) as proxy:
        assert proxy.load("smuggled") is None


@pytest.mark.parametrize("header, closes", [
    (b"Connection: keep-alive, close\r\n", True),
    (b"Connection: x-close-please\r\n", False),
    (b"Connection: closed\r\n", False),
])
def test_connection_is_read_as_a_list_of_tokens(shared, header, closes):
    """``close`` among the tokens of Connection closes after the answer; a
    token that merely contains it does not."""
    status, answers = exchange(shared, posted(SMUGGLED, extra=header))
    assert status == b"HTTP/1.1 200 OK"
    assert answers == (1 if closes else 2)


# Item 9: what the fast XML-RPC parser took and the full parser refuses

REFUSED_XML = {
    "formfeed_between_tags": b'<?xml version="1.0"?><methodCall>\x0c<methodName>load'
                             b"</methodName><params><param><value><string>k</string>"
                             b"</value></param></params></methodCall>",
    "vtab_between_tags": b"<methodCall><methodName>load</methodName>\x0b<params><param>"
                         b"<value><string>k</string></value></param></params></methodCall>",
    "cdata_end_in_text": b"<methodCall><methodName>load</methodName><params><param>"
                         b"<value><string>a]]>b</string></value></param></params>"
                         b"</methodCall>",
}


@pytest.mark.parametrize("body", REFUSED_XML.values(), ids=REFUSED_XML)
def test_xml_the_full_parser_refuses_is_malformed_request(shared, body):
    """The fast parser refuses what the full parser refuses: \\f or \\v as
    whitespace, and ``]]>`` in text, are malformed_request."""
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as sock:
        sock.sendall(posted(body))
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        with pytest.raises(xmlrpc.client.Fault) as info:
            xmlrpc.client.loads(reader.read(length))
    assert info.value.faultCode == MALFORMED_REQUEST

