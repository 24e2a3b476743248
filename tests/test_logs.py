"""What ``twistd kvconfig`` logs, read from the installed server's log: at
start one line per interface with its address and one for the store; one
line per change with who made it; no "Starting factory" noise; and a busy
--http port is one line, as every other port."""

from __future__ import annotations

import re
import socket
import time

from test_agent_e2e import wait_for
from test_http import call

from serverprocess import KVConfigProcess
from test_twistd import cannot_start


def test_start_up_names_every_address_and_the_store(tmp_path):
    server = KVConfigProcess(tmp_path)
    server.start()
    try:
        server.proxy().save("k", 1)
        store = tmp_path / "kvconfig.db"
        wait_for(lambda: "store sqlite" in server.log(), "the store's line")
        log = server.log()
        for line in (f"XML-RPC at http://127.0.0.1:{server.port}/RPC2",
                     f"line protocol at telnet 127.0.0.1 {server.line_port}",
                     f"UDP notifications at udp 127.0.0.1:{server.udp_port}",
                     f"at http://127.0.0.1:{server.http_port}/ui/",
                     f"store sqlite {store}: 0 keys at revision 0"):
            assert line in log, line
        assert "Starting factory" not in log and "Starting protocol" not in log
    finally:
        server.stop()
    server.start()
    try:
        wait_for(lambda: "1 keys at revision 1" in server.log(), "the reloaded store's line",
                 logs=server.log)
    finally:
        server.stop()


def test_each_change_is_one_line_saying_who_made_it(tmp_path):
    server = KVConfigProcess(tmp_path, "memory:")
    server.start()
    try:
        server.proxy().save("by/xmlrpc", 1)
        assert call(server, "PUT", "/v1/kv/by/http", "2").status == 200
        with socket.create_connection(("127.0.0.1", server.line_port)) as line:
            line.sendall(b"SET by/line 3 EX 1\r\nDEL by/xmlrpc\r\nDEL nothing\r\nQUIT\r\n")
            while line.recv(4096):
                pass
        time.sleep(0.1)
        wait_for(lambda: "by ttl" in server.log(), "the expiry's line", logs=server.log)
        changes = [line.split("] ", 1)[1] for line in server.log().splitlines()
                   if "[kvconfig.changes#info]" in line]
        peer = r"127\.0\.0\.1:\d+"
        patterns = [rf"revision 1 put by/xmlrpc by xmlrpc:{peer} from {peer} via xmlrpc",
                    rf"revision 2 put by/http by http:{peer} from {peer} via http",
                    rf"revision 3 put by/line by line:{peer} from {peer} via line",
                    rf"revision 4 delete by/xmlrpc by line:{peer} from {peer} via line",
                    r"revision 5 delete by/line by ttl \(expired\)"]
        assert len(changes) == len(patterns), changes   # nothing for DEL of nothing
        for change, pattern in zip(changes, patterns, strict=True):
            assert re.fullmatch(pattern, change), (change, pattern)
    finally:
        server.stop()


def test_no_change_log_logs_no_change(tmp_path):
    server = KVConfigProcess(tmp_path, "memory:", "--no-change-log")
    server.start()
    try:
        server.proxy().save("quiet", 1)
        with socket.create_connection(("127.0.0.1", server.line_port)) as line:
            line.sendall(b"SET quiet 2 EX 1\r\nDEL quiet\r\nSET gone 3 EX 1\r\nQUIT\r\n")
            while line.recv(4096):
                pass
        wait_for(lambda: server.proxy().load("gone") is None, "the TTL key to expire")
        assert server.proxy().stats()["revision"] == 5
        assert "[kvconfig.changes#info]" not in server.log()
    finally:
        server.stop()


def test_an_http_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = cannot_start(tmp_path, f"--http=tcp:{port}:interface=127.0.0.1")
    assert f"--http: cannot listen on 127.0.0.1:{port}: Address already in use" in line
