"""Telnet's commands on the line port (kvconfig.telnet): a telnet client's
interrupt and timing mark are answered, so its session never goes silent."""

from __future__ import annotations

import os
import pty
import select
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_line_protocol import Line

from kvconfig.telnet import ERASE_CHAR, ERASE_LINE, TelnetFilter

#: What netkit telnet sends for a typed "☃" (e2 98 83): the 0x83 becomes
#: IAC IP, IAC DO TIMING-MARK; it then shows nothing until WILL TIMING-MARK.
SNOWMAN = b"\xe2\x98\xff\xf4\xff\xfd\x06"
WILL_TIMING_MARK = b"\xff\xfb\x06"


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 8, 9, None])
def test_timing_mark_is_answered_and_the_next_command_is_seen(chunk):
    """The exact bytes netkit telnet sends, at every chunk size: WILL
    TIMING-MARK goes back, the interrupted line is discarded, and the next
    command's reply is seen."""
    conn = Line()
    conn.feed(b"SET t/a 1" + SNOWMAN + b"\r\nPING\r\n", chunk)
    out = conn.transport.value()
    assert out.count(WILL_TIMING_MARK) == 1
    assert out.endswith(b"PONG\r\n")
    assert out.replace(WILL_TIMING_MARK, b"") == b"PONG\r\n"
    assert conn.store.get("t/a") is None  # the interrupted SET never ran


def test_options_are_refused_and_subnegotiations_dropped():
    """DO x gets WONT x and WILL x gets DONT x (no option is ever on); WONT,
    DONT, NOP and subnegotiations are dropped; IAC IAC is a 0xff data byte."""
    conn = Line()
    conn.feed(b"\xff\xfd\x01\xff\xfb\x22\xff\xfc\x03\xff\xfe\x05\xff\xf1"
              b"\xff\xfa\x18\x00xterm\xff\xf0PING a\r\n")
    assert conn.transport.value() == b"\xff\xfc\x01\xff\xfe\x22PONG a\r\n"
    conn.transport.clear()
    conn.feed(b"PING \xff\xff\r\n")
    assert conn.take()[0].startswith("ERR bad_encoding ")  # 0xff is not UTF-8


def test_erase_line_and_erase_char_edit_the_line_so_far():
    """IAC EL discards the line typed so far, IAC EC its last byte; complete
    lines before them are untouched."""
    conn = Line()
    conn.feed(b"PING 1\r\nPING nope\xff\xf8PING 2x\xff\xf7\r\n")
    assert conn.take() == ["PONG 1", "PONG 2"]


def test_a_line_feed_always_ends_a_line():
    """A LF where a command, an option or a subnegotiation would go ends the
    sequence and the line: a stray 0xff never swallows the next command."""
    conn = Line()
    conn.feed(b"PING a\xff\nPING b\xff\xfd\nPING c\r\n\xff\xfaxx\nPING d\r\n")
    assert conn.take() == ["PONG a", "PONG b", "PONG c", "PONG d"]


@given(st.binary(max_size=64), st.integers(1, 9))
def test_chunking_never_changes_what_the_filter_gives(data, chunk):
    """Fed whole or in chunks, any bytes give the same data and answers."""
    def run(pieces):
        telnet, parts, answers = TelnetFilter(), [], b""
        for piece in pieces:
            got, answer = telnet.feed(piece)
            parts += got
            answers += answer
        data_only = b"".join(p for p in parts if isinstance(p, bytes))
        return data_only, [p for p in parts if p in (ERASE_LINE, ERASE_CHAR)], answers

    whole = run([data])
    assert run([data[i:i + chunk] for i in range(0, len(data), chunk)]) == whole
    if b"\xff" not in data:
        assert whole == (data, [], b"")


def test_installed_server_answers_the_timing_mark(server):
    """Against the installed twistd kvconfig, over a real socket."""
    sock = socket.create_connection(("127.0.0.1", server.line_port), timeout=5)
    with sock:
        assert sock.recv(4096).startswith(b"HELLO kvconfig ")
        sock.sendall(SNOWMAN + b"\r\nPING after\r\n")
        received = b""
        while not received.endswith(b"PONG after\r\n"):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        assert received == WILL_TIMING_MARK + b"PONG after\r\n"


class Terminal:
    """A program on a pseudo-terminal: what a person types, what they see."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                        close_fds=True)
        os.close(slave)
        self.master = master
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def wait_for(self, wanted: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} never shown; the screen: {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.seen += os.read(self.master, 4096)
        return self.seen

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_a_netkit_telnet_session_goes_on_after_ctrl_c_and_a_snowman(server):
    """With the real telnet client on a terminal: after typing a "☃" and
    after Ctrl-C, the next command's reply still shows."""
    telnet = shutil.which("telnet")
    if telnet is None:
        if os.environ.get("KVCONFIG_REQUIRE_TOOLS"):
            pytest.fail("telnet is not installed (Debian package telnet)")
        pytest.skip("telnet is not installed (Debian package telnet)")
    terminal = Terminal([telnet, "127.0.0.1", str(server.line_port)])
    try:
        terminal.wait_for(b"HELLO kvconfig ")
        terminal.type("SET telnet/snow ☃\r")
        terminal.type("PING one\r")
        terminal.wait_for(b"PONG one")
        terminal.type("\x03")
        terminal.type("PING two\r")
        terminal.wait_for(b"PONG two")
    finally:
        terminal.close()
