"""Listings are paged on every interface of the installed ``twistd kvconfig``:
at most --max-list-items keys (and --max-reply-bytes) a page, ``more`` when
keys follow, the next page ``after`` the last key."""

from __future__ import annotations

import socket

import pytest

from serverprocess import KVConfigProcess


@pytest.fixture(scope="module")
def paged(tmp_path_factory):
    process = KVConfigProcess(tmp_path_factory.mktemp("paged"), None,
                              "--max-list-items=5", "--max-reply-bytes=2000")
    process.start()
    with process.proxy() as proxy:
        proxy.system.multicall([{"methodName": "save", "params": [f"p/{i:02d}", i]}
                                for i in range(12)])
    yield process
    process.stop()


def test_xmlrpc_keys_and_list_page_with_after_and_more(paged):
    """keys() and list() with the stdlib client: pages of at most 5, more
    until the last; after takes the next; the pages make the whole listing."""
    with paged.proxy() as proxy:
        first = proxy.keys("p/")
        assert first["keys"] == [f"p/{i:02d}" for i in range(5)] and first["more"] is True
        keys, after = [], None
        while True:
            page = proxy.list("p/", {"after": after} if after else {})
            keys += [item["key"] for item in page["items"]]
            if not page["more"]:
                break
            after = page["items"][-1]["key"]
        assert keys == [f"p/{i:02d}" for i in range(12)]
        assert proxy.keys("p/", {"limit": 100, "after": "p/09"}) == {
            "revision": first["revision"], "keys": ["p/10", "p/11"], "more": False}
        assert len(proxy.keys("p/", {"limit": 100})["keys"]) == 5  # limit is capped


def test_line_keys_pages_with_after(paged):
    with socket.create_connection(("127.0.0.1", paged.line_port), timeout=5) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"KEYS p/ 3 p/10\r\nKEYS p/\r\n")
        lines = [reader.readline().strip() for _ in range(2 + 6)]
    assert lines[:2] == [b"KEY p/11", b"END 12 1"]
    assert lines[2:] == [b"KEY p/00", b"KEY p/01", b"KEY p/02", b"KEY p/03", b"KEY p/04",
                         b"END 12 5 more"]


def test_a_page_holds_at_most_max_reply_bytes_of_values(paged):
    with paged.proxy() as proxy:
        proxy.save("big/a", "x" * 900)
        proxy.save("big/b", "x" * 900)
        proxy.save("big/c", "x" * 900)
        page = proxy.list("big/")
        assert [item["key"] for item in page["items"]] == ["big/a", "big/b"] and page["more"]
