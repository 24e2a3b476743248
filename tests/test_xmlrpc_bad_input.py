"""
Bad input to the XML-RPC interface gets a clear error and changes nothing.

Every test sends one kind of bad input to a real ``twistd kvconfig`` and
checks that

- the answer is an XML-RPC Fault over HTTP 200, whose faultCode is the
  documented code of a kvconfig.errors type and whose faultString starts
  with that type's name;
- nothing changed: the key reads as before and the store made no change
  (no event after the revision taken before the request);
- the server keeps serving: the stdlib client's next call on its kept-alive
  connection, or the next request on the same raw HTTP/1.1 connection.

The stdlib ``ServerProxy`` sends what it can; bodies it cannot produce
(malformed XML, non-UTF-8 bytes, ints beyond 32 bits, oversized bodies ...)
go through ``http.client``.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import math
import re
import socket
import xmlrpc.client
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape
from xmlrpc.client import Fault, ServerProxy

import pytest

from faults import (
    BAD_ENCODING,
    COMPACTED,
    COMPARE_FAILED,
    INVALID_ARGUMENT,
    INVALID_KEY,
    INVALID_REQUEST,
    INVALID_VALUE,
    KEY_TOO_LARGE,
    MALFORMED_REQUEST,
    NO_SUCH_METHOD,
    REQUEST_TOO_LARGE,
    VALUE_TOO_LARGE,
    WRONG_ARGUMENTS,
    check_fault,
    expect_fault,
    unchanged,
)
from serverprocess import KVConfigProcess

# Limits of the module's small-limit server.
SMALL_KEY_BYTES = 16
SMALL_VALUE_BYTES = 64
SMALL_VALUE_DEPTH = 3
SMALL_BODY_BYTES = 2000
SMALL_HISTORY_EVENTS = 5


# Checks


# Raw requests


DECLARATION = b"<?xml version='1.0'?>\n"


def call(method: str | bytes, *params: bytes, declaration: bytes = DECLARATION) -> bytes:
    """A methodCall body with the given raw ``<value>`` params."""
    if isinstance(method, str):
        method = method.encode()
    return (
        declaration + b"<methodCall><methodName>" + method + b"</methodName><params>"
        + b"".join(b"<param>" + param + b"</param>" for param in params)
        + b"</params></methodCall>"
    )


def value(inner: bytes) -> bytes:
    return b"<value>" + inner + b"</value>"


def string(text: str) -> bytes:
    return value(b"<string>" + escape(text).encode() + b"</string>")


def struct(**members: bytes) -> bytes:
    return value(b"<struct>" + b"".join(
        b"<member><name>" + name.encode() + b"</name>" + member + b"</member>"
        for name, member in members.items()
    ) + b"</struct>")


def nested_array(depth: int) -> bytes:
    """An int inside *depth* nested arrays."""
    return (b"<value><array><data>" * depth + value(b"<int>1</int>")
            + b"</data></array></value>" * depth)


class Connection:
    """An HTTP/1.1 connection, for bodies the stdlib client cannot send.

    A 200 response (every XML-RPC answer, Faults included) must leave the
    connection open: the next request goes over the same socket.  After an
    HTTP error the server may close it; the next request then goes over a
    new one.
    """

    def __init__(self, process: KVConfigProcess) -> None:
        self.process = process
        self.connect()

    def connect(self) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", self.process.port, timeout=30)
        self.http.connect()
        self.sock = self.http.sock

    def close(self) -> None:
        self.http.close()

    def send(self, body, path: str = "/RPC2", method: str = "POST",
             headers: dict | None = None, chunked: bool = False) -> tuple[int, bytes]:
        headers = {"Content-Type": "text/xml", **(headers or {})}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        self.http.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = self.http.getresponse()
        data = response.read()
        if response.status == 200:
            assert not response.will_close, "the server closes the connection"
            assert self.http.sock is self.sock, "the connection was not kept"
        elif response.will_close:
            self.close()
            self.connect()
        return response.status, data

    def fault(self, body, error: tuple[int, str], **options) -> Fault:
        status, data = self.send(body, **options)
        assert status == 200, data
        with pytest.raises(Fault) as info:
            xmlrpc.client.loads(data)
        check_fault(info.value, error)
        return info.value

    def result(self, body, **options):
        status, data = self.send(body, **options)
        assert status == 200, data
        (result,), _ = xmlrpc.client.loads(data, use_builtin_types=True)
        return result

    def assert_serving(self) -> None:
        assert "revision" in self.result(call("stats"))


# Fixtures


@pytest.fixture
def proxy(server):
    with server.proxy() as proxy:
        yield proxy


@pytest.fixture
def conn(server):
    connection = Connection(server)
    yield connection
    connection.close()


@pytest.fixture
def key(request) -> str:
    """A key of the test's own on the shared server."""
    return "bad_input." + re.sub(r"[^\w.\-\[\]]", "_", request.node.name, flags=re.ASCII)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A server with small limits, shared by this module's tests (keys of
    at most 16 bytes, each test's own)."""
    process = KVConfigProcess(
        tmp_path_factory.mktemp("small"), None,
        f"--max-key-bytes={SMALL_KEY_BYTES}",
        f"--max-value-bytes={SMALL_VALUE_BYTES}",
        f"--max-value-depth={SMALL_VALUE_DEPTH}",
        f"--max-body-bytes={SMALL_BODY_BYTES}",
        f"--history-events={SMALL_HISTORY_EVENTS}",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
def small_proxy(small):
    with small.proxy() as proxy:
        yield proxy


@pytest.fixture
def small_conn(small):
    connection = Connection(small)
    yield connection
    connection.close()


# Unknown methods and argument counts


@pytest.mark.parametrize("name", [
    "nope", "Save", "save.extra", "xmlrpc_save", "system", "system.nope",
    "system.multicall.extra",
])
def test_unknown_method_is_no_such_method(proxy, name):
    """A method the server does not have is Fault -32601 no_such_method."""
    with unchanged(proxy):
        expect_fault(NO_SUCH_METHOD, getattr(proxy, name))


def test_empty_method_name_is_no_such_method(proxy, conn):
    """An empty methodName (which the stdlib client cannot send) is Fault
    -32601 no_such_method."""
    with unchanged(proxy):
        conn.fault(call(""), NO_SUCH_METHOD)
        conn.fault(call(" ", string("x")), NO_SUCH_METHOD)
        conn.assert_serving()


KEY = object()  # stands for the test's key in parameters

WRONG_COUNTS = {
    "load_none": ("load", ()),
    "load_two": ("load", (KEY, "x")),
    "get_none": ("get", ()),
    "save_one": ("save", (KEY,)),
    "save_three": ("save", (KEY, "v", "x")),
    "delete_two": ("delete", (KEY, KEY)),
    "put_one": ("put", (KEY,)),
    "put_four": ("put", (KEY, "v", {}, "x")),
    "remove_none": ("remove", ()),
    "remove_three": ("remove", (KEY, {}, "x")),
    "keys_none": ("keys", ()),
    "list_three": ("list", ("", {}, "x")),
    "changes_one": ("changes", ("",)),
    "changes_three": ("changes", ("", 0, "x")),
    "stats_one": ("stats", ("x",)),
    "listMethods_one": ("system.listMethods", ("x",)),
    "methodHelp_none": ("system.methodHelp", ()),
    "multicall_two": ("system.multicall", ([], "x")),
}


@pytest.mark.parametrize("method, args", WRONG_COUNTS.values(), ids=WRONG_COUNTS)
def test_wrong_argument_count_is_wrong_arguments(proxy, key, method, args):
    """Too few or too many arguments is Fault -32602 wrong_arguments, and
    nothing is written."""
    proxy.put(key, "before")
    args = tuple(key if arg is KEY else arg for arg in args)
    with unchanged(proxy, key):
        expect_fault(WRONG_ARGUMENTS, getattr(proxy, method), *args)


def test_wrong_argument_count_is_said_in_good_english(proxy):
    """One argument is "argument", several are "arguments"."""
    with pytest.raises(Fault, match=r"load takes 1 argument, not 0.>$"):
        proxy.load()
    with pytest.raises(Fault, match=r"put takes 2 to 3 arguments, not 1.>$"):
        proxy.put("k")


# Arguments of the wrong type or out of range

WRONG_TYPE_KEYS = {
    "int": 7,
    "list": ["k"],
    "struct": {"k": "v"},
    "nil": None,
    "boolean": True,
    "double": 1.5,
    "base64": b"k",
    "dateTime": datetime(2024, 1, 2, 3, 4, 5),
}


@pytest.mark.parametrize("bad", WRONG_TYPE_KEYS.values(), ids=WRONG_TYPE_KEYS)
def test_key_of_wrong_type_is_invalid_key(proxy, bad):
    """A key or prefix that is not a string is Fault 1 invalid_key for every
    method taking one."""
    with unchanged(proxy):
        for method, args in [
            ("save", (bad, "v")), ("put", (bad, "v")), ("put", (bad, "v", {"ttl": 60})),
            ("load", (bad,)), ("get", (bad,)), ("delete", (bad,)), ("remove", (bad,)),
            ("keys", (bad,)), ("list", (bad,)), ("changes", (bad, 0)),
        ]:
            expect_fault(INVALID_KEY, getattr(proxy, method), *args)


NOT_STRUCTS = {"array": [1], "string": "ttl", "int": 5, "boolean": False}


@pytest.mark.parametrize("options", NOT_STRUCTS.values(), ids=NOT_STRUCTS)
def test_options_not_a_struct_is_wrong_arguments(proxy, key, options):
    """Options that are not a struct are Fault -32602 wrong_arguments."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        expect_fault(WRONG_ARGUMENTS, proxy.put, key, "after", options)
        expect_fault(WRONG_ARGUMENTS, proxy.remove, key, options)
        expect_fault(WRONG_ARGUMENTS, proxy.keys, key, options)
        expect_fault(WRONG_ARGUMENTS, proxy.list, key, options)


def test_unknown_option_is_invalid_argument(proxy, key):
    """An option name the method does not know is Fault 5 invalid_argument,
    even beside known ones."""
    meta = proxy.put(key, "before")
    with unchanged(proxy, key):
        expect_fault(INVALID_ARGUMENT, proxy.put, key, "after", {"tll": 60})
        expect_fault(INVALID_ARGUMENT, proxy.put, key, "after",
                     {"prev_revision": meta["mod_revision"], "extra": 1})
        expect_fault(INVALID_ARGUMENT, proxy.remove, key, {"ttl": 60})
        expect_fault(INVALID_ARGUMENT, proxy.keys, key, {"prefix": "x"})
        expect_fault(INVALID_ARGUMENT, proxy.list, key, {"limit": 1, "since": 0})


BAD_TTLS = {
    "zero": 0, "negative": -1, "negative_fraction": -0.5, "string": "60", "nan": math.nan,
    "infinity": math.inf, "boolean": True, "array": [60], "struct": {},
}


@pytest.mark.parametrize("ttl", BAD_TTLS.values(), ids=BAD_TTLS)
def test_bad_ttl_is_invalid_argument(proxy, key, ttl):
    """A ttl that is not a finite number of seconds > 0 is Fault 5
    invalid_argument."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        expect_fault(INVALID_ARGUMENT, proxy.put, key, "after", {"ttl": ttl})


BAD_REVISIONS = {
    "negative": -1, "string": "1", "double": 1.0, "boolean": True, "array": [1],
    "struct": {"mod_revision": 1},
}


@pytest.mark.parametrize("revision", BAD_REVISIONS.values(), ids=BAD_REVISIONS)
def test_bad_prev_revision_is_invalid_argument(proxy, key, revision):
    """A prev_revision that is not an integer >= 0 is Fault 5 invalid_argument,
    for put and remove."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        expect_fault(INVALID_ARGUMENT, proxy.put, key, "after", {"prev_revision": revision})
        expect_fault(INVALID_ARGUMENT, proxy.remove, key, {"prev_revision": revision})


BAD_LIMITS = {"zero": 0, "negative": -1, "string": "1", "double": 1.5, "boolean": True}


@pytest.mark.parametrize("limit", BAD_LIMITS.values(), ids=BAD_LIMITS)
def test_bad_limit_is_invalid_argument(proxy, key, limit):
    """A limit that is not an integer >= 1 is Fault 5 invalid_argument."""
    proxy.put(key, "before")
    expect_fault(INVALID_ARGUMENT, proxy.keys, key, {"limit": limit})
    expect_fault(INVALID_ARGUMENT, proxy.list, key, {"limit": limit})
    assert proxy.keys(key, {"limit": 1})["keys"] == [key]


BAD_SINCES = {
    "negative": -1, "string": "0", "double": 0.0, "boolean": False, "nil": None,
    "array": [0],
}


@pytest.mark.parametrize("since", BAD_SINCES.values(), ids=BAD_SINCES)
def test_bad_since_is_invalid_argument(proxy, key, since):
    """A since that is not an integer >= 0 is Fault 5 invalid_argument."""
    expect_fault(INVALID_ARGUMENT, proxy.changes, key, since)
    assert proxy.changes(key, 0)["events"] == []


DEEP = nested_array(3000)
DEEP_ARGUMENTS = {
    "changes_since": lambda key: call("changes", string(key), DEEP),
    "put_ttl": lambda key: call("put", string(key), string("after"), struct(ttl=DEEP)),
    "put_prev_revision": lambda key: call(
        "put", string(key), string("after"), struct(prev_revision=DEEP)),
    "remove_prev_revision": lambda key: call("remove", string(key), struct(prev_revision=DEEP)),
    "keys_limit": lambda key: call("keys", string(key), struct(limit=DEEP)),
}


@pytest.mark.parametrize("body", DEEP_ARGUMENTS.values(), ids=DEEP_ARGUMENTS)
def test_deeply_nested_argument_is_invalid_argument(proxy, conn, key, body):
    """A deeply nested array where an integer argument belongs is Fault 5
    invalid_argument like any other wrong type, not an internal error."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        conn.fault(body(key), INVALID_ARGUMENT)
        conn.assert_serving()


# Bad keys

BAD_KEYS = {
    "empty": "",
    "space": " ",
    "inner_space": "a b",
    "leading_space": " a",
    "trailing_space": "a ",
    "tab": "a\tb",
    "newline": "a\nb",
    # A raw CR reaches the server as LF (XML end-of-line handling): still bad.
    "carriage_return": "a\rb",
    "delete_control": "a\x7fb",
    "next_line_c1_control": "a\x85b",
    "c1_control": "a\x9bb",
    "no_break_space": "a\xa0b",
    "line_separator": "a\u2028b",
    "paragraph_separator": "a\u2029b",
    "ideographic_space": "a\u3000b",
}


@pytest.mark.parametrize("bad", BAD_KEYS.values(), ids=BAD_KEYS)
def test_bad_key_is_invalid_key(proxy, bad):
    """An empty key, or one holding whitespace, a control character or a
    Unicode separator, is Fault 1 invalid_key for every method taking a key
    (and as a prefix, unless empty)."""
    with unchanged(proxy):
        for method, args in [
            ("save", (bad, "v")), ("put", (bad, "v")), ("load", (bad,)), ("get", (bad,)),
            ("delete", (bad,)), ("remove", (bad,)),
        ]:
            expect_fault(INVALID_KEY, getattr(proxy, method), *args)
        if bad:
            for method, args in [("keys", (bad,)), ("list", (bad,)), ("changes", (bad, 0))]:
                expect_fault(INVALID_KEY, getattr(proxy, method), *args)


# XML 1.0 forbids these characters even as character references, so expat
# rejects the whole request as not well-formed before any key or value check
# runs: the documented code is MalformedRequest -32700 (InvalidKey 1 and
# InvalidValue 3 cannot be reached for them over XML-RPC).
XML_FORBIDDEN = {
    "char_ref_1": b"a&#1;b",
    "char_ref_0": b"a&#0;b",
    "char_ref_1f": b"a&#x1F;b",
    "raw_byte_1": b"a\x01b",
    "raw_escape": b"a\x1bb",
    "char_ref_fffe": b"a&#xFFFE;b",
    "raw_fffe": "a\ufffeb".encode(),
    "char_ref_surrogate": b"a&#xD800;b",
}


@pytest.mark.parametrize("text", XML_FORBIDDEN.values(), ids=XML_FORBIDDEN)
def test_character_xml_cannot_carry_is_malformed_request(proxy, conn, key, text):
    """A key or value holding a character XML 1.0 forbids (raw or as a
    character reference) is Fault -32700 malformed_request."""
    proxy.put(key, "before")
    bad = value(b"<string>" + text + b"</string>")
    with unchanged(proxy, key):
        conn.fault(call("put", string(key), bad), MALFORMED_REQUEST)
        conn.fault(call("save", bad, string("v")), MALFORMED_REQUEST)
        conn.fault(call("load", bad), MALFORMED_REQUEST)
        conn.assert_serving()


def test_stdlib_client_string_with_control_character_is_malformed_request(proxy, key):
    """The stdlib client sends control characters and lone surrogates as they
    are (or as character references): Fault -32700 malformed_request."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        expect_fault(MALFORMED_REQUEST, proxy.put, key, "a\x01b")
        expect_fault(MALFORMED_REQUEST, proxy.put, key, ["ok", {"n": "\x1f"}])
        expect_fault(MALFORMED_REQUEST, proxy.put, key, "a\ud800b")
        expect_fault(MALFORMED_REQUEST, proxy.put, "a\x02b", "v")


ODD_BUT_ALLOWED = ["a\tb", "a\nb", "a\x7fb", "a\x85b", "a\xa0b", "a\u2028b", "\ufffd",
                   "\U0001f600", "]]>", "<&>'\""]


def test_characters_xml_allows_round_trip(proxy, key):
    """Unusual characters XML 1.0 allows are accepted in values and read back
    equal."""
    values = ODD_BUT_ALLOWED + [{text: text} for text in ODD_BUT_ALLOWED]
    proxy.put(key, values)
    assert proxy.load(key) == values


def test_carriage_return_in_value_reads_back_unchanged(proxy, conn, key):
    """A value holding a carriage return (sent as ``&#13;``, which XML 1.0
    allows) reads back with the carriage return, not turned into a newline."""
    assert conn.result(call("save", string(key), value(b"<string>a&#13;b</string>"))) is None
    assert conn.result(call("load", string(key))) == "a\rb"
    assert conn.result(call("get", string(key)))["value"] == "a\rb"


# Keys and values over the limits


def test_key_over_max_key_bytes_is_key_too_large(small_proxy):
    """A key longer than --max-key-bytes in UTF-8 bytes is Fault 2
    key_too_large for every method taking a key or prefix, also when it has
    fewer characters than the limit."""
    over = ["k" * (SMALL_KEY_BYTES + 1), "\xe9" * (SMALL_KEY_BYTES // 2) + "k",
            "\u20ac" * 6, "\U0001f600" * 5]
    with unchanged(small_proxy):
        for bad in over:
            assert len(bad.encode()) > SMALL_KEY_BYTES
            for method, args in [
                ("save", (bad, "v")), ("put", (bad, "v")), ("load", (bad,)),
                ("get", (bad,)), ("delete", (bad,)), ("remove", (bad,)), ("keys", (bad,)),
                ("list", (bad,)), ("changes", (bad, 0)),
            ]:
                expect_fault(KEY_TOO_LARGE, getattr(small_proxy, method), *args)


def test_key_at_max_key_bytes_is_accepted(small_proxy):
    """A key of exactly --max-key-bytes UTF-8 bytes is stored and read back."""
    for at in ["k" * SMALL_KEY_BYTES, "\xe9" * (SMALL_KEY_BYTES // 2),
               "\U0001f600" * (SMALL_KEY_BYTES // 4)]:
        assert len(at.encode()) == SMALL_KEY_BYTES
        assert small_proxy.put(at, "v")["key"] == at
        assert small_proxy.get(at)["value"] == "v"
        assert small_proxy.keys(at)["keys"] == [at]


def key_of(prefix: str, char: str, size: int) -> str:
    """A key of *size* UTF-8 bytes: *prefix*, then as many *char* as fit, then x's."""
    room = size - len(prefix.encode())
    count = room // len(char.encode())
    key = prefix + char * count
    return key + "x" * (size - len(key.encode()))


@pytest.mark.parametrize("char", ["\xe9", "\u20ac", "\U0001f600"], ids=["2_bytes",
                                                                          "3_bytes", "4_bytes"])
def test_default_max_key_bytes_counts_utf8_bytes(proxy, char):
    """With the default limit, a key of 1024 UTF-8 bytes of multi-byte
    characters is accepted; one of 1025 bytes, or one more such character,
    is Fault 2 key_too_large though it has far fewer than 1024 characters."""
    prefix = f"bad_input.max_key_bytes.{len(char.encode())}."
    at = key_of(prefix, char, 1024)
    assert len(at.encode()) == 1024
    assert proxy.put(at, "v")["key"] == at
    assert proxy.load(at) == "v"
    for over in [at + "x", at + char, key_of(prefix, char, 1025)]:
        assert len(over.encode()) > 1024 and len(over) < 1024
        with unchanged(proxy, at):
            expect_fault(KEY_TOO_LARGE, proxy.put, over, "v")
            expect_fault(KEY_TOO_LARGE, proxy.load, over)


# Each encodes (tagged JSON, compact, UTF-8) to SMALL_VALUE_BYTES + 1 = 65 bytes.
VALUES_OVER = {
    "ascii": "x" * 63,  # "xxx...": 63 + 2 quotes
    "two_byte_chars": "\xe9" * 31 + "x",  # 62 + 1 + 2
    "array": ["x" * 61],  # ["..."]: 61 + 4
    "struct": {"k": "x" * 57},  # {"k":"..."}: 57 + 8
    "base64": b"\0" * 39,  # {"$bytes":"<52 chars>"}: 52 + 13
}
# Each encodes to exactly SMALL_VALUE_BYTES = 64 bytes.
VALUES_AT = {
    "ascii": "x" * 62,
    "two_byte_chars": "\xe9" * 31,
    "array": ["x" * 60],
    "struct": {"k": "x" * 56},
}


@pytest.mark.parametrize("bad", VALUES_OVER.values(), ids=VALUES_OVER)
def test_value_over_max_value_bytes_is_value_too_large(small_proxy, bad):
    """A value whose stored encoding is longer than --max-value-bytes is
    Fault 4 value_too_large, through put and save."""
    key = "value_over"
    small_proxy.put(key, "before")
    with unchanged(small_proxy, key):
        expect_fault(VALUE_TOO_LARGE, small_proxy.put, key, bad)
        expect_fault(VALUE_TOO_LARGE, small_proxy.save, key, bad)


@pytest.mark.parametrize("good", VALUES_AT.values(), ids=VALUES_AT)
def test_value_at_max_value_bytes_is_accepted(small_proxy, good):
    """A value whose stored encoding is exactly --max-value-bytes long is
    stored and read back equal."""
    small_proxy.put("value_at", good)
    assert small_proxy.load("value_at") == good


def nested(depth: int, innermost=1):
    value = innermost
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_value_nested_over_max_value_depth_is_invalid_value(small_proxy):
    """A value nesting arrays and structs deeper than --max-value-depth is
    Fault 3 invalid_value; one exactly that deep is accepted."""
    key = "value_depth"
    for good in [[[["x"]]], {"a": {"b": {"c": 1}}}, nested(SMALL_VALUE_DEPTH), [[[]]]]:
        small_proxy.put(key, good)
        assert small_proxy.load(key) == good
    for bad in [[[[["x"]]]], {"a": {"b": {"c": {"d": 1}}}},
                nested(SMALL_VALUE_DEPTH + 1), [[[[]]]], [[[{}]]]]:
        with unchanged(small_proxy, key):
            expect_fault(INVALID_VALUE, small_proxy.put, key, bad)
            expect_fault(INVALID_VALUE, small_proxy.save, key, bad)


def test_default_max_value_depth_is_64(proxy, key):
    """With the default limit a value nested 64 deep is accepted and one
    nested 65 deep is Fault 3 invalid_value."""
    proxy.put(key, nested(64))
    assert proxy.load(key) == nested(64)
    with unchanged(proxy, key):
        expect_fault(INVALID_VALUE, proxy.put, key, nested(65))


# Ints XML-RPC cannot carry, and other values the unmarshaller refuses

BEYOND_32_BITS = {
    "i8_2**31": b"<i8>2147483648</i8>",
    "i8_-2**31-1": b"<i8>-2147483649</i8>",
    "i8_2**63-1": b"<i8>9223372036854775807</i8>",
    "i8_beyond_64_bits": b"<i8>" + b"9" * 30 + b"</i8>",
    "int_2**31": b"<int>2147483648</int>",
    "int_-2**31-1": b"<int>-2147483649</int>",
    "i4_2**32": b"<i4>4294967296</i4>",
    "in_array": b"<array><data><value><int>1</int></value>"
                b"<value><i8>4294967296</i8></value></data></array>",
    "in_struct": b"<struct><member><name>n</name>"
                 b"<value><int>2147483648</int></value></member></struct>",
}


@pytest.mark.parametrize("number", BEYOND_32_BITS.values(), ids=BEYOND_32_BITS)
def test_int_beyond_32_bits_is_invalid_value(proxy, conn, key, number):
    """An int outside XML-RPC's 32-bit range, sent as <i8>, <int> or <i4>,
    alone or inside a value, is Fault 3 invalid_value."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        conn.fault(call("put", string(key), value(number)), INVALID_VALUE)
        conn.fault(call("save", string(key), value(number)), INVALID_VALUE)
        conn.assert_serving()


def test_int_at_32_bit_bounds_is_accepted(conn, key):
    """The ints at the ends of the 32-bit range are accepted, as <i8> or
    <int>, and read back equal."""
    for number, expected in [(b"<i8>2147483647</i8>", 2**31 - 1),
                             (b"<int>-2147483648</int>", -(2**31)),
                             (b"<i4>0</i4>", 0)]:
        conn.result(call("put", string(key), value(number)))
        assert conn.result(call("load", string(key))) == expected


# The XML-RPC spec's dateTime.iso8601 carries no timezone and no fraction
# (YYYYMMDDTHH:MM:SS); text that the stdlib unmarshaller cannot read makes
# the request not a valid XML-RPC call: InvalidRequest -32600.
BAD_SCALARS = {
    "int_abc": b"<int>abc</int>",
    "i8_fraction": b"<i8>1.5</i8>",
    "double_x": b"<double>x</double>",
    "boolean_2": b"<boolean>2</boolean>",
    "base64_bad_length": b"<base64>a</base64>",
    "base64_not_base64": b"<base64>!!!!</base64>",
    "base64_not_ascii": "<base64>YWJj\u00e9</base64>".encode(),
    "datetime_year_only": b"<dateTime.iso8601>2020</dateTime.iso8601>",
    "datetime_dashes": b"<dateTime.iso8601>2020-01-01T00:00:00</dateTime.iso8601>",
    "datetime_timezone": b"<dateTime.iso8601>20200101T01:02:03Z</dateTime.iso8601>",
    "datetime_offset": b"<dateTime.iso8601>20200101T01:02:03+01:00</dateTime.iso8601>",
    "datetime_fraction": b"<dateTime.iso8601>20200101T01:02:03.5</dateTime.iso8601>",
    "datetime_month_13": b"<dateTime.iso8601>20201301T01:02:03</dateTime.iso8601>",
    "unknown_tag": b"<foo>1</foo>",
    "member_without_name": b"<struct><member><value>1</value></member></struct>",
}


@pytest.mark.parametrize("scalar", BAD_SCALARS.values(), ids=BAD_SCALARS)
def test_bad_value_text_is_invalid_request(proxy, conn, key, scalar):
    """A value whose text does not fit its XML-RPC type (``<int>abc</int>``,
    a dateTime with a timezone ...) is Fault -32600 invalid_request."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        conn.fault(call("put", string(key), value(scalar)), INVALID_REQUEST)
        conn.assert_serving()


def test_bad_datetime_says_which_format_is_accepted(proxy, conn, key):
    """A dateTime in another ISO 8601 form is refused with the format XML-RPC
    takes, not the parser's own words."""
    fault = conn.fault(call("put", string(key), value(
        b"<dateTime.iso8601>2024-01-02T03:04:05Z</dateTime.iso8601>")), INVALID_REQUEST)
    assert "YYYYMMDDTHH:MM:SS" in fault.faultString and "20240102T03:04:05" in fault.faultString
    assert "does not match format" not in fault.faultString


def test_base64_with_line_breaks_is_read(proxy, conn, key):
    """base64 as the stdlib writes it (a line break every 76 characters) and
    with spaces around it reads back as the bytes it encodes."""
    data = bytes(range(256))
    encoded = base64.encodebytes(data)
    assert b"\n" in encoded.strip()
    assert conn.result(call("save", string(key), value(b"<base64> " + encoded + b" </base64>"))) \
        is None
    assert proxy.load(key).data == data


def test_datetime_values_round_trip(server, key):
    """Naive whole-second datetimes, also before year 1000 and inside arrays
    and structs, are stored and read back equal."""
    with ServerProxy(server.url, allow_none=True, use_builtin_types=True) as proxy:
        stored = [datetime(2024, 2, 29, 23, 59, 58), datetime(999, 1, 2, 3, 4, 5),
                  {"at": datetime(1970, 1, 1)}]
        proxy.put(key, stored)
        assert proxy.load(key) == stored
        proxy.save(key, stored[0])
        assert proxy.get(key)["value"] == stored[0]


# Bodies that are not XML-RPC method calls


def bomb() -> bytes:
    """Nested entities expanding to 10**9 characters ("billion laughs")."""
    entities = b"".join(b'<!ENTITY %s "%s">' % (bytes([98 + i]), b"&%s;" % bytes([97 + i]) * 10)
                        for i in range(8))
    declaration = b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">' + entities + b"]>"
    return call("save", string("bomb"), value(b"<string>&i;</string>"), declaration=declaration)


MALFORMED = {
    "empty": lambda key: b"",
    "not_xml": lambda key: b"hello",
    "truncated": lambda key: call("save", string(key), string("after"))[:-20],
    "mismatched_tags": lambda key: b"<methodCall><methodName>stats</methodCall></methodName>",
    "unclosed_value": lambda key: call("save", string(key), b"<value><string>after</value>"),
    "junk_after_root": lambda key: call("stats") + b"<methodCall/>",
    "text_before_root": lambda key: call("stats", declaration=b"x"),
    "undefined_entity": lambda key: call("save", string(key), b"<value>&nope;</value>"),
    "nul_byte": lambda key: call("save", string(key), b"<value>a\0b</value>"),
    # XML-RPC has no use for a DTD: any DOCTYPE is refused before it is read.
    "entity_bomb": lambda key: bomb(),
    "entity_repeated": lambda key: call(
        "save", string(key), value(b"<string>" + b"&e;" * 95 + b"</string>"),
        declaration=b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY e "' + b"x" * 4000 + b'">]>'),
    "external_entity": lambda key: call(
        "save", string(key), value(b"<string>&e;</string>"),
        declaration=b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY e SYSTEM "file:///etc/passwd">]>'),
    "doctype_alone": lambda key: call("save", string(key), string("x"),
                                      declaration=b"<?xml version='1.0'?><!DOCTYPE methodCall>"),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED)
def test_malformed_xml_is_malformed_request(proxy, conn, key, body):
    """A body that is not well-formed XML is Fault -32700 malformed_request."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        conn.fault(body(key), MALFORMED_REQUEST)
        conn.assert_serving()


NOT_UTF8 = {
    "latin1": b"caf\xe9",
    "ff_fe": b"\xff\xfe",
    "encoded_surrogate": b"\xed\xa0\x80",
    "overlong_slash": b"\xc0\xaf",
    "truncated_sequence": b"\xe2\x82",
    "continuation_byte": b"\x80",
}


@pytest.mark.parametrize("text", NOT_UTF8.values(), ids=NOT_UTF8)
def test_non_utf8_body_is_bad_encoding(proxy, conn, key, text):
    """A body without an encoding declaration that is not valid UTF-8 is
    Fault -32702 bad_encoding, wherever the bad bytes are."""
    proxy.put(key, "before")
    bad = value(b"<string>" + text + b"</string>")
    with unchanged(proxy, key):
        conn.fault(call("put", string(key), bad), BAD_ENCODING)
        conn.fault(call("put", bad, string("after")), BAD_ENCODING)
        conn.fault(call(b"lo" + text + b"ad", string(key)), BAD_ENCODING)
        conn.assert_serving()


@pytest.mark.parametrize("declaration", [
    b'<?xml version="1.0" encoding="UTF-8"?>', b"<?xml version='1.0' encoding='utf-8'?>",
])
def test_non_utf8_body_declared_utf8_is_bad_encoding(proxy, conn, key, declaration):
    """A body that declares UTF-8 but is not valid UTF-8 is Fault -32702
    bad_encoding ("not valid in its declared encoding"), as without the
    declaration."""
    proxy.put(key, "before")
    body = call("put", string(key), value(b"<string>caf\xe9</string>"), declaration=declaration)
    with unchanged(proxy, key):
        conn.fault(body, BAD_ENCODING)
        conn.assert_serving()


def test_utf8_body_declared_ascii_is_bad_encoding(proxy, conn, key):
    """UTF-8 bytes in a body that declares US-ASCII are Fault -32702
    bad_encoding naming the declared encoding, not malformed_request."""
    body = call("put", string(key), value("<string>\u00e9t\u00e9</string>".encode()),
                declaration=b'<?xml version="1.0" encoding="us-ascii"?>')
    with unchanged(proxy, key):
        fault = conn.fault(body, BAD_ENCODING)
        conn.assert_serving()
    assert "us-ascii" in fault.faultString


def test_compressed_body_is_refused_with_415(server, proxy, conn, key):
    """A gzip body (the stdlib client compresses with encode_threshold set)
    gets HTTP 415 naming Content-Encoding and offering identity, not a
    bad_encoding fault about UTF-8; nothing is stored."""
    transport = xmlrpc.client.Transport()
    transport.encode_threshold = 0
    with unchanged(proxy, key):
        with ServerProxy(server.url, transport=transport, allow_none=True) as gzipping:
            with pytest.raises(xmlrpc.client.ProtocolError) as info:
                gzipping.save(key, "compressed")
        assert info.value.errcode == 415
        assert info.value.headers["Accept-Encoding"] == "identity"
        status, data = conn.send(gzip.compress(call("save", string(key), string("x"))),
                                 headers={"Content-Encoding": "gzip"})
        assert status == 415 and b"Content-Encoding gzip" in data
        conn.assert_serving()


def test_body_in_declared_latin1_is_accepted(proxy, conn, key):
    """A body in the encoding it declares (ISO-8859-1) is read in that encoding."""
    body = call("save", string(key), value(b"<string>caf\xe9</string>"),
                declaration=b"<?xml version='1.0' encoding='iso-8859-1'?>")
    assert conn.result(body) is None
    assert proxy.load(key) == "caf\xe9"


NOT_A_CALL = {
    "method_response": b"<methodResponse><params><param><value><string>x</string></value>"
                       b"</param></params></methodResponse>",
    "fault_response": b"<methodResponse><fault><value><struct><member><name>faultCode</name>"
                      b"<value><int>1</int></value></member><member><name>faultString</name>"
                      b"<value><string>x</string></value></member></struct></value></fault>"
                      b"</methodResponse>",
    "other_root": b"<foo/>",
    "html": b"<html><body>save</body></html>",
    "call_without_method_name": b"<methodCall><params><param><value><string>x</string>"
                                b"</value></param></params></methodCall>",
}


@pytest.mark.parametrize("body", NOT_A_CALL.values(), ids=NOT_A_CALL)
def test_well_formed_non_method_call_is_invalid_request(proxy, conn, body):
    """Well-formed XML that is not a methodCall (a methodResponse, another
    document, a call without methodName) is Fault -32600 invalid_request."""
    with unchanged(proxy):
        conn.fault(body, INVALID_REQUEST)
        conn.assert_serving()


# Request bodies over --max-body-bytes


def padded(body: bytes, size: int) -> bytes:
    """*body* with trailing whitespace (allowed after the root) to *size* bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def in_chunks(body: bytes, size: int):
    return (body[i:i + size] for i in range(0, len(body), size))


def test_body_at_max_body_bytes_is_served(small_conn):
    """A body of exactly --max-body-bytes, with Content-Length or chunked, is
    read and answered."""
    body = padded(call("stats"), SMALL_BODY_BYTES)
    assert "revision" in small_conn.result(body)
    assert "revision" in small_conn.result(in_chunks(body, 300), chunked=True)


def test_body_over_max_body_bytes_is_request_too_large(small_proxy, small_conn):
    """A body one byte over --max-body-bytes, or a valid write well over it,
    sent with Content-Length, is Fault 10 request_too_large and is not
    carried out."""
    key = "body_over"
    small_proxy.put(key, "before")
    with unchanged(small_proxy, key):
        small_conn.fault(padded(call("stats"), SMALL_BODY_BYTES + 1), REQUEST_TOO_LARGE)
        write = padded(call("save", string(key), string("after")), 3 * SMALL_BODY_BYTES)
        small_conn.fault(write, REQUEST_TOO_LARGE)
        small_conn.assert_serving()


def test_chunked_body_over_max_body_bytes_is_request_too_large(small_proxy, small_conn):
    """A chunked body (no Content-Length) over --max-body-bytes is Fault 10
    request_too_large and is not carried out."""
    key = "chunked_over"
    small_proxy.put(key, "before")
    with unchanged(small_proxy, key):
        body = padded(call("stats"), SMALL_BODY_BYTES + 1)
        small_conn.fault(in_chunks(body, 300), REQUEST_TOO_LARGE, chunked=True)
        write = padded(call("save", string(key), string("after")), 3 * SMALL_BODY_BYTES)
        small_conn.fault(in_chunks(write, 1000), REQUEST_TOO_LARGE, chunked=True)
        small_conn.fault(in_chunks(write, len(write)), REQUEST_TOO_LARGE, chunked=True)
        small_conn.assert_serving()


def test_body_over_max_body_bytes_with_expect_continue_is_refused_unsent(small):
    """A request that announces (Content-Length, Expect: 100-continue) a body
    over --max-body-bytes is Fault 10 request_too_large at once, before the
    client sends any of it; the server goes on serving."""
    head = (b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        sock.sendall(head)
        response = http.client.HTTPResponse(sock)
        response.begin()  # skips a "100 Continue" and would then time out
        data = response.read()
    assert response.status == 200, data
    with pytest.raises(Fault) as info:
        xmlrpc.client.loads(data)
    check_fault(info.value, REQUEST_TOO_LARGE)
    connection = Connection(small)
    connection.assert_serving()
    connection.close()


def peak_rss_kib(process: KVConfigProcess) -> int | None:
    status = Path(f"/proc/{process.process.pid}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def test_huge_body_is_discarded_unread(small, small_conn):
    """A 64 MiB body, with Content-Length or chunked, is Fault 10
    request_too_large; the server discards it rather than keeping it (its
    peak memory grows by far less than the body) and serves the next
    request on the same connection."""
    huge = b"<" * (64 << 20)
    before = peak_rss_kib(small)
    small_conn.fault(huge, REQUEST_TOO_LARGE)
    small_conn.fault(in_chunks(huge, 1 << 16), REQUEST_TOO_LARGE, chunked=True)
    small_conn.assert_serving()
    after = peak_rss_kib(small)
    if before is not None and after is not None:
        assert after - before < 16 << 10, f"peak RSS grew by {after - before} KiB"


# Compare-and-set and history


def test_failed_compare_is_compare_failed(proxy, key):
    """A put or remove whose prev_revision is not the key's mod_revision
    (0 for an existing key, anything but 0 for a missing one) is Fault 6
    compare_failed and changes nothing; the right one succeeds."""
    meta = proxy.put(key, "before")
    missing = key + ".missing"
    with unchanged(proxy, key, missing):
        for wrong in (meta["mod_revision"] + 1, meta["mod_revision"] - 1, 0):
            expect_fault(COMPARE_FAILED, proxy.put, key, "after", {"prev_revision": wrong})
            expect_fault(COMPARE_FAILED, proxy.remove, key, {"prev_revision": wrong})
        current = {"prev_revision": meta["mod_revision"]}
        expect_fault(COMPARE_FAILED, proxy.put, missing, "v", current)
        expect_fault(COMPARE_FAILED, proxy.remove, missing, current)
    assert proxy.put(key, "after", {"prev_revision": meta["mod_revision"]})["version"] == 2
    assert proxy.load(key) == "after"


def test_changes_since_compacted_revision_is_compacted(small_proxy):
    """changes() since a revision older than the history window (here
    --history-events=5, after 20 writes) is Fault 7 compacted; since the
    window's start it answers."""
    key = "compacted"
    for i in range(20):
        small_proxy.put(key, i)
    stats = small_proxy.stats()
    compact = stats["compact_revision"]
    assert compact >= stats["revision"] - SMALL_HISTORY_EVENTS
    with unchanged(small_proxy, key):
        expect_fault(COMPACTED, small_proxy.changes, key, 1)
        expect_fault(COMPACTED, small_proxy.changes, "", compact - 1)
    events = small_proxy.changes(key, compact)["events"]
    assert [event["value"] for event in events][-1] == 19
    assert all(event["revision"] > compact for event in events)


# HTTP level


def test_post_to_unknown_path_is_not_found(proxy, conn, key):
    """A call POSTed to a path other than /RPC2 or / is HTTP 404 and is not
    carried out."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        status, _ = conn.send(call("save", string(key), string("after")), path="/nope")
        assert status == 404
        conn.assert_serving()


def test_get_is_not_allowed(proxy, conn):
    """A GET is HTTP 405 method not allowed."""
    with unchanged(proxy):
        status, _ = conn.send(None, method="GET")
        assert status == 405
        conn.assert_serving()
