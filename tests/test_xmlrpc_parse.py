"""The XML-RPC request parser: the fast path for simple calls agrees with
the full parser (and so with the stdlib's) on every input, or steps aside."""

from __future__ import annotations

import xmlrpc.client

from hypothesis import given
from hypothesis import strategies as st

from kvconfig import errors
from kvconfig.xmlrpc import KVConfigXMLRPC, _parse_simple_call, parse_call

simple_params = st.lists(
    st.none() | st.integers(-(2**31), 2**31 - 1) | st.text(max_size=30), max_size=4
)
method_names = st.sampled_from(["save", "load", "delete", "get", "system.listMethods"])


def stdlib_parse(body: bytes):
    params, method = xmlrpc.client.loads(body, use_builtin_types=True)
    return method, params


@given(method_names, simple_params)
def test_simple_calls_parse_as_the_stdlib_parses_them(method, params):
    """For calls the stdlib client writes with string, int and nil params,
    the parse equals xmlrpc.client.loads, whichever path takes it."""
    body = xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode()
    try:
        expected = stdlib_parse(body)
    except Exception:
        expected = None
    fast = _parse_simple_call(body)
    if fast is not None:
        assert fast == expected
    if expected is not None:
        assert KVConfigXMLRPC.parse(body) == expected


def full_parse(body: bytes):
    try:
        return parse_call(body)
    except errors.KVConfigError as e:
        return type(e)


#: Bytes that fool a lax fast path: whitespace XML does not have (\f, \v),
#: text XML forbids ("]]>"), entities, CRs, markup.
TRICKY = [b"\f", b"\v", b"]]>", b"]]", b">", b"&amp;", b"\r", b"<", b"\xa0", b" ", b"\n"]


@given(method_names, simple_params, st.data())
def test_damaged_simple_calls_never_parse_differently(method, params, data):
    """A simple call with bytes replaced or cut is either parsed exactly as
    the full parser (and the stdlib) parses it, or left to the full parser
    (which gives the error): the fast path accepts only what it accepts."""
    body = bytearray(xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(body) - 1))
        body[where:where + 1] = data.draw(st.binary(max_size=3) | st.sampled_from(TRICKY))
    body = bytes(body)
    fast = _parse_simple_call(body)
    if fast is None:
        return
    assert fast == full_parse(body)
    assert fast == stdlib_parse(body)


@given(st.lists(st.sampled_from([b"", *TRICKY]), min_size=5, max_size=5))
def test_the_fast_path_refuses_what_xml_refuses(fills):
    """Whitespace and text the full parser refuses, wherever the simple
    call's grammar lets them in, are never accepted by the fast path."""
    body = (b"<?xml version='1.0'?>%s<methodCall>%s<methodName>save</methodName>%s<params>"
            b"<param><value><string>a%sb</string></value></param>%s</params></methodCall>"
            % tuple(fills))
    fast = _parse_simple_call(body)
    if fast is not None:
        assert fast == full_parse(body)


def test_form_feed_and_cdata_end_go_to_the_full_parser():
    template = (b"<methodCall>%s<methodName>load</methodName><params><param><value>"
                b"<string>%s</string></value></param></params></methodCall>")
    for body in (template % (b"\f", b"k"), template % (b"\v", b"k"), template % (b"", b"a]]>b")):
        assert _parse_simple_call(body) is None
        assert full_parse(body) is errors.MalformedRequest


def test_the_fast_path_takes_the_classic_calls():
    """The classic calls with string keys and values take the fast path."""
    for call in [("save", "name", "Guido"), ("load", "name"), ("delete", "name"),
                 ("save", "empty", ""), ("save", "n", None), ("save", "i", 7)]:
        body = xmlrpc.client.dumps(call[1:], call[0], allow_none=True).encode()
        assert _parse_simple_call(body) == (call[0], call[1:])


def test_what_the_fast_path_leaves_gets_the_full_parsers_errors():
    """Entities, control characters and bad UTF-8 go to the full parser."""
    template = b"<methodCall><methodName>save</methodName><params><param><value>" \
               b"<string>%s</string></value></param></params></methodCall>"
    assert _parse_simple_call(template % b"a&amp;b") is None
    assert KVConfigXMLRPC.parse(template % b"a&amp;b") == ("save", ("a&b",))
    for bad, error in [(b"a\x01b", errors.MalformedRequest),
                       (b"caf\xe9", errors.BadEncoding)]:
        assert _parse_simple_call(template % bad) is None
        try:
            KVConfigXMLRPC.parse(template % bad)
        except error:
            pass
        else:
            raise AssertionError(f"{bad!r} parsed")
