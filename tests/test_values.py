"""Keys and the tagged JSON value encoding."""

from __future__ import annotations

import math
import xmlrpc.client
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvconfig import values
from kvconfig.errors import InvalidKey, InvalidValue, KeyTooLarge, ValueTooLarge

from stores import clocked_store

# Text XML-RPC carries: XML 1.0 characters (no "\r", which XML parsers
# normalise to "\n" in transit).
xml_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\ufffe\uffff")
    .filter(lambda c: c in "\t\n" or ord(c) >= 0x20)
)
scalars = (
    st.none() | st.booleans() | xml_text
    | st.integers(min_value=values.INT_MIN, max_value=values.INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.binary()
    | st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31))
    .map(lambda d: d.replace(microsecond=0))
)
xmlrpc_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(xml_text, children, max_size=5),
    max_leaves=20,
)


@given(xmlrpc_values)
def test_every_xmlrpc_value_round_trips_through_the_encoding(value):
    """decode(encode(v)) == v for every value XML-RPC carries, nested too."""
    assert values.decode(values.encode(value, 1 << 30, 64)) == value


def _typed(value):
    """*value* with the type of every part spelled out (1, 1.0 and True differ)."""
    if type(value) is list:
        return ["list", [_typed(item) for item in value]]
    if type(value) is dict:
        return ["dict", {name: _typed(item) for name, item in value.items()}]
    return [type(value).__name__, value]


@given(xmlrpc_values)
def test_a_stored_value_reads_back_as_a_copy_of_its_own(value):
    """The store keeps only the encoding: every read decodes a copy of its
    own, equal type for type to what was written as any interface reads it
    (lists, not tuples; bytes, not bytearray), sharing nothing with it."""
    store = clocked_store()
    store.put("v", value)
    first, second = store.load("v"), store.load("v")
    assert _typed(first) == _typed(values.decode(values.encode(value, 1 << 30, 64)))
    if isinstance(value, (list, dict)):
        assert first is not value and first is not second
    store.put("t", (b"a", bytearray(b"b")))
    assert store.load("t") == [b"a", b"b"] and type(store.load("t")[1]) is bytes


@given(xmlrpc_values)
def test_encoded_values_round_trip_through_xmlrpc_marshalling(value):
    """What the store returns marshals and unmarshals back equal with the stdlib."""
    decoded = values.decode(values.encode(value, 1 << 30, 64))
    body = xmlrpc.client.dumps((decoded,), allow_none=True)
    ((back,), _) = xmlrpc.client.loads(body, use_builtin_types=True)
    assert back == value


def test_one_key_dollar_dicts_are_not_mistaken_for_tags():
    """A user dict that looks like a tag is wrapped, and reads back as the dict."""
    for value in [{"$bytes": "AA=="}, {"$datetime": "x"}, {"$dict": {}}, {"$": 1}]:
        raw = values.encode(value, 1000, 5)
        assert raw.startswith(b'{"$dict":')
        assert values.decode(raw) == value


def test_float_and_int_stay_distinct():
    """1.0 reads back as a float and 1 as an int."""
    assert type(values.decode(values.encode(1.0, 100, 5))) is float
    assert type(values.decode(values.encode(1, 100, 5))) is int


@pytest.mark.parametrize("bad", [
    2**31, -(2**31) - 1, {1: "x"}, {"a": {2: 3}}, "a\x00b", "\ud800", {"k\x01": 1},
    datetime(2026, 1, 1, 0, 0, 0, 5), object(), {1, 2}, 1j,
    math.inf, -math.inf, math.nan, [1.0, math.nan],
])
def test_values_xmlrpc_cannot_carry_are_invalid(bad):
    """ints over 32 bits, non-finite floats, non-string dict keys, XML-illegal
    characters, sub-second datetimes and other types raise InvalidValue."""
    with pytest.raises(InvalidValue):
        values.encode(bad, 1 << 20, 64)


def test_value_size_and_depth_limits():
    """A value encoding over max_bytes, or nested over max_depth, is refused."""
    assert values.encode("x" * 8, 10, 5) == b'"xxxxxxxx"'
    with pytest.raises(ValueTooLarge):
        values.encode("x" * 9, 10, 5)
    nested = []  # six lists, one inside the other
    for _ in range(5):
        nested = [nested]
    with pytest.raises(InvalidValue):
        values.encode(nested, 1000, 5)
    values.encode(nested, 1000, 6)


@pytest.mark.parametrize("bad", ["$x", '{"$bytes": "!!"}', '{"$datetime": "tomorrow"}'])
def test_malformed_tags_are_invalid(bad):
    """Unknown tags, bad base64 and bad datetimes in tagged JSON are InvalidValue."""
    with pytest.raises(InvalidValue):
        values.from_tagged({"$x": 1} if bad == "$x" else __import__("json").loads(bad))


@pytest.mark.parametrize("key", ["app/db/host", "é/✓", "a" * 1024, "x=1,y"])
def test_valid_keys(key):
    """Printable keys without whitespace, up to 1 KiB of UTF-8, are keys."""
    assert values.check_key(key, 1024) == key


@pytest.mark.parametrize("key", ["", "a b", "a\tb", "a\nb", "a\x00", "\u00a0", "\u2028",
                                 "\ud800", None, 5, b"bytes", ["a"]])
def test_invalid_keys(key):
    """Empty keys, whitespace, control characters and non-strings are InvalidKey."""
    with pytest.raises(InvalidKey):
        values.check_key(key, 1024)


def test_key_size_counts_utf8_bytes():
    """The key limit counts bytes: 341 three-byte characters fit 1024, 342 do not."""
    values.check_key("✓" * 341, 1024)
    with pytest.raises(KeyTooLarge):
        values.check_key("✓" * 342, 1024)
    with pytest.raises(KeyTooLarge):
        values.check_key("a" * 1025, 1024)
