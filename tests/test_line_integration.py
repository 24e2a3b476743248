"""The line protocol of the installed ``twistd kvconfig``, over real sockets."""

from __future__ import annotations

import json
import re
import socket
import uuid
from xmlrpc.client import ServerProxy

import pytest
from hypothesis import HealthCheck, given, settings

from kvconfig import __version__, errors, values

from serverprocess import KVConfigProcess
from test_values import xmlrpc_values

FAULT_CODES = {error.name: error.code for error in errors.ALL_ERRORS}
ERR = re.compile(r"ERR (\S+) (-?\d+) \S")


class LineClient:
    """A raw socket speaking the line protocol as telnet does (CRLF)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8") + b"\r\n"
        self.sock.sendall(data)

    def readline(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8")

    def until_end(self) -> list[str]:
        """Lines up to and including the END terminating a listing."""
        lines = [self.readline()]
        while not lines[-1].startswith("END"):
            lines.append(self.readline())
        return lines

    def ask(self, line: bytes | str) -> str:
        self.send(line)
        return self.readline()

    def closed_by_server(self) -> bool:
        """True once the server has closed and nothing more was sent."""
        return self.buffer == b"" and self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def line(server):
    client = LineClient(server.line_port)
    assert client.readline().startswith("HELLO kvconfig ")
    yield client
    client.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}/"


def error(line: str) -> tuple[str, int]:
    match = ERR.match(line)
    assert match, line
    name, code = match.group(1), int(match.group(2))
    assert FAULT_CODES.get(name) == code, line
    return name, code


def builtin_proxy(server) -> ServerProxy:
    return ServerProxy(server.url, allow_none=True, use_builtin_types=True)


def test_telnet_session(server):
    """The issue's telnet session: greeting, SET of a bare word and of JSON,
    GET with metadata, KEYS, WATCH receiving changes made through XML-RPC,
    UNWATCH, HELP, HELP SET, and QUIT closing the connection."""
    app = unique("session") + "app/"
    proxy = server.proxy()
    client = LineClient(server.line_port)
    greeting = client.readline()
    match = re.fullmatch(r"HELLO kvconfig (\S+) revision (\d+) - type HELP for commands",
                         greeting)
    assert match and match.group(1) == __version__, greeting

    reply = client.ask(f"SET {app}name Guido")
    assert re.fullmatch(r"OK \d+ 1", reply), reply
    name_rev = int(reply.split()[1])
    assert name_rev > int(match.group(2))
    assert proxy.load(app + "name") == "Guido"

    reply = client.ask(f"SET {app}ports [4050,5100,5200]")
    ports_rev = int(reply.split()[1])
    assert reply == f"OK {ports_rev} 1" and ports_rev > name_rev
    assert client.ask(f"GET {app}ports") == (
        f"VALUE {app}ports {ports_rev} 1 {ports_rev} - [4050,5100,5200]")
    assert client.ask(f"GET {app}name") == f'VALUE {app}name {name_rev} 1 {name_rev} - "Guido"'

    client.send(f"KEYS {app}")
    lines = client.until_end()
    assert lines[:2] == [f"KEY {app}name", f"KEY {app}ports"]
    assert re.fullmatch(r"END \d+ 2", lines[2]) and len(lines) == 3

    reply = client.ask(f"WATCH {app}")
    assert re.fullmatch(rf"OK watching 1 {re.escape(app)} \d+", reply), reply
    proxy.save(app + "name", "Barry")
    event = client.readline()
    assert re.fullmatch(rf'EVENT 1 put {re.escape(app)}name (\d+) 2 {name_rev} - "Barry"',
                        event), event
    proxy.save(unique("elsewhere") + "k", 1)  # another prefix: no event
    proxy.delete(app + "ports")
    event = client.readline()
    assert re.fullmatch(rf"EVENT 1 delete {re.escape(app)}ports \d+ deleted", event), event
    assert client.ask("PING") == "PONG"

    assert client.ask("UNWATCH") == "OK 1"
    proxy.save(app + "name", "Tim")
    assert client.ask("PING still") == "PONG still"  # no EVENT before it

    client.send("HELP")
    lines = client.until_end()
    assert lines[-1] == "END" and all(line.startswith("HELP ") for line in lines[:-1])
    assert any(line.startswith("HELP   WATCH") for line in lines)
    client.send("HELP SET")
    lines = client.until_end()
    assert lines[0] == "HELP SET key value [EX seconds] [IF mod_revision]" and len(lines) > 2

    assert client.ask("QUIT") == "OK bye"
    assert client.closed_by_server()
    client.close()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=xmlrpc_values)
def test_saved_through_xmlrpc_reads_back_through_line_get(server, line, value):
    """Any value saved through XML-RPC reads back equal through the line
    protocol's GET, as tagged JSON."""
    key = unique("x2l") + "v"
    builtin_proxy(server).save(key, value)
    reply = line.ask(f"GET {key}")
    word, got_key, mod, version, create, expires, raw = reply.split(" ", 6)
    assert (word, got_key, version, expires) == ("VALUE", key, "1", "-")
    assert mod == create
    assert values.from_tagged(json.loads(raw)) == value


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=xmlrpc_values)
def test_set_through_line_reads_back_through_xmlrpc(server, line, value):
    """Any value written with line SET as compact tagged JSON reads back
    equal through XML-RPC load."""
    key = unique("l2x") + "v"
    encoded = json.dumps(values.to_tagged(value, 64), ensure_ascii=False,
                         separators=(",", ":"))
    reply = line.ask(f"SET {key} {encoded}")
    assert re.fullmatch(r"OK \d+ 1", reply), reply
    assert builtin_proxy(server).load(key) == value


def test_bad_input_keeps_the_connection_usable(server, line):
    """Over a real socket, unknown commands, wrong arity, invalid JSON, bad
    keys, invalid UTF-8 and binary garbage each get one ERR line, and the
    connection goes on answering (LF and CRLF alike)."""
    prefix = unique("badinput")
    bad = [
        (b"FROB\r\n", "no_such_method"),
        (b"get\n", "wrong_arguments"),
        (b"SET " + prefix.encode() + b"k {nope\r\n", "invalid_value"),
        (b"GET a\x01b\n", "invalid_key"),
        (b"SET \xff\xfe\x00garbage\x80\r\n", "bad_encoding"),
        (b"\x00\x01\x02\x03\r\n", "no_such_method"),
    ]
    line.send(b"".join(data for data, _ in bad) + b"PING one\n")
    for _, name in bad:
        assert error(line.readline())[0] == name
    assert line.readline() == "PONG one"
    proxy = builtin_proxy(server)
    assert proxy.load(prefix + "k") is None
    assert re.fullmatch(r"OK \d+ 1", line.ask(f"SET {prefix}k ok"))
    assert proxy.load(prefix + "k") == "ok"


def test_over_long_line_resynchronises_at_the_next_newline(tmp_path):
    """On a server with a small --max-line-bytes, a 200 kB line gets one ERR
    request_too_large and the stream resumes at the next newline; the
    connection stays open."""
    process = KVConfigProcess(tmp_path, "memory:", "--max-line-bytes=256",
                              "--max-value-bytes=128", "--max-key-bytes=64")
    process.start()
    try:
        client = LineClient(process.line_port)
        client.readline()
        client.send(b"SET big " + b"x" * 100_000)
        client.send(b"y" * 100_000 + b"\r\nPING after\r\n")
        assert error(client.readline()) == ("request_too_large", 10)
        assert client.readline() == "PONG after"
        assert client.ask("SET small 1") == "OK 1 1"
        assert client.ask("GET big") == "NIL big"
        client.close()
    finally:
        process.stop()
