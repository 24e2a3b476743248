"""Listings are paged on every interface of the installed ``twistd kvconfig``:
at most --max-list-items keys (and --max-reply-bytes) a page, ``more`` when
keys follow, the next page ``after`` the last key."""

from __future__ import annotations

import socket
import xmlrpc.client

import pytest
from twisted.internet.task import Clock

from kvconfig.backends.memory import MemoryBackend
from kvconfig.limits import Limits
from kvconfig.session import Client, Session
from kvconfig.store import Store
from kvconfig.xmlrpc import SLICE_ITEMS, KVConfigXMLRPC

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


def test_a_long_page_is_marshalled_a_slice_a_turn():
    """An XML-RPC page of thousands of keys is made and marshalled
    SLICE_ITEMS items a reactor turn (other clients are served between
    them), and reads back as if made at once, inside a multicall too."""
    limits = Limits()
    clock = Clock()
    store = Store(MemoryBackend(clock, limits), limits)
    store.start()
    for i in range(1234):
        store.put(f"s/{i:05d}", {"i": i, "text": "x\r<&>"})
    clock.advance(0)
    turns = Turns()
    resource = KVConfigXMLRPC(store, limits, clock=turns)
    session = Session(store, Client("xmlrpc", "127.0.0.1"))
    calls = [{"methodName": "list", "params": ["s/"]}, {"methodName": "keys", "params": [""]},
             {"methodName": "changes", "params": ["", 1200]}]
    for body in (xmlrpc.client.dumps(("s/",), "list"),
                 xmlrpc.client.dumps((calls,), "system.multicall")):
        response = resource.respond(body.encode(), session)
        assert turns.run_all() >= 1234 // SLICE_ITEMS
        (result,), _ = xmlrpc.client.loads(response.result, use_builtin_types=True)
        pages = [result] if "items" in result else [entry[0] for entry in result]
        assert [item["value"] for item in pages[0]["items"]] == [
            {"i": i, "text": "x\r<&>"} for i in range(1234)]
    assert pages[1]["keys"] == [f"s/{i:05d}" for i in range(1234)]
    assert [event["revision"] for event in pages[2]["events"]] == list(range(1201, 1235))
    # Without a clock, (a resource mounted by hand) the same, at once.
    body = xmlrpc.client.dumps(("s/",), "list").encode()
    sliced = resource.respond(body, session)
    turns.run_all()
    assert KVConfigXMLRPC(store, limits).respond(body, session) == sliced.result


class Turns:
    """A reactor's turns, one at a time: the calls made for the next turn."""

    def __init__(self) -> None:
        self.calls: list = []

    def callLater(self, delay, f, *args) -> None:
        assert delay == 0
        self.calls.append((f, args))

    def run_all(self) -> int:
        """Run turn after turn until nothing is left to do; how many."""
        turns = 0
        while self.calls:
            calls, self.calls = self.calls, []
            for f, args in calls:
                f(*args)
            turns += 1
        return turns
