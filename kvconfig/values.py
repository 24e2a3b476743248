"""
Keys and values: what kvconfig accepts, and how values are encoded.

A value is anything XML-RPC carries: str, int (32-bit, as XML-RPC's
``<int>``), float (finite), bool, None, list, dict with string keys, datetime (naive,
whole seconds, as XML-RPC's ``dateTime.iso8601``) and bytes.  Strings hold
only characters XML 1.0 allows, so that a value written through one interface
reads back equal through every other.

Values are stored, and carried by the line protocol, as *tagged JSON*:

- null, booleans, numbers, strings and arrays are plain JSON; a float always
  has a fraction or exponent (``1.0``), an int never does;
- bytes are ``{"$bytes": "<base64>"}``;
- a datetime is ``{"$datetime": "YYYYMMDDTHH:MM:SS"}`` (XML-RPC's format);
- a dict is a JSON object, except that a dict of exactly one key starting
  with ``$`` is wrapped as ``{"$dict": {...}}`` so it cannot be mistaken for
  a tag.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import datetime
from typing import Any

from kvconfig.errors import InvalidKey, InvalidValue, KeyTooLarge, ValueTooLarge, brief

INT_MIN, INT_MAX = -(2**31), 2**31 - 1

# Characters XML 1.0 forbids (and lone surrogates, which UTF-8 cannot carry).
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DATETIME_FORMAT = "%Y%m%dT%H:%M:%S"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


def check_key(key: object, max_bytes: int) -> str:
    """Return *key* if it is a valid key, else raise InvalidKey or KeyTooLarge."""
    if type(key) is not str:
        raise InvalidKey(f"a key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKey("a key must not be empty")
    # isprintable() is False for control characters, surrogates and every
    # Unicode separator except the ASCII space, which we exclude too.
    if not key.isprintable() or " " in key:
        raise InvalidKey(f"a key must not hold whitespace or control characters: {brief(key)}")
    if len(key) * 4 > max_bytes and len(key.encode("utf-8")) > max_bytes:
        raise KeyTooLarge(f"key is longer than {max_bytes} bytes")
    return key


def check_prefix(prefix: object, max_bytes: int) -> str:
    """Like check_key, but the empty prefix (everything) is allowed."""
    if prefix == "":
        return ""
    return check_key(prefix, max_bytes)


def encode(value: Any, max_bytes: int, max_depth: int) -> bytes:
    """Check *value* and return its tagged JSON encoding.

    Raises InvalidValue for anything XML-RPC cannot carry and ValueTooLarge
    when the encoding is longer than *max_bytes*.
    """
    raw = _dumps(to_tagged(value, max_depth)).encode("utf-8")
    if len(raw) > max_bytes:
        raise ValueTooLarge(f"value encodes to {len(raw)} bytes; the limit is {max_bytes}")
    return raw


def decode(raw: bytes) -> Any:
    """Return the value whose tagged JSON encoding is *raw*."""
    return from_tagged(_loads(raw.decode("utf-8")))


def _check_text(text: str, what: str) -> None:
    if NOT_XML.search(text):
        raise InvalidValue(f"{what} holds a character XML-RPC cannot carry: {brief(text)}")


def to_tagged(value: Any, max_depth: int) -> Any:
    """Check *value* and return it as plain JSON data, tags included."""
    kind = type(value)
    if kind is str:
        _check_text(value, "a string")
        return value
    if kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise InvalidValue(f"int {value} does not fit XML-RPC's 32-bit <int>")
        return value
    if value is None or kind is bool:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise InvalidValue(f"{value} is not a number XML-RPC's <double> or JSON can carry")
        return value
    if kind is list or kind is tuple:
        if max_depth <= 0:
            raise InvalidValue("value is nested too deeply")
        return [to_tagged(item, max_depth - 1) for item in value]
    if kind is dict:
        if max_depth <= 0:
            raise InvalidValue("value is nested too deeply")
        tagged = {}
        for name, item in value.items():
            if type(name) is not str:
                raise InvalidValue(f"dict keys must be strings, not {type(name).__name__}")
            _check_text(name, "a dict key")
            tagged[name] = to_tagged(item, max_depth - 1)
        if len(tagged) == 1 and next(iter(tagged)).startswith("$"):
            return {"$dict": tagged}
        return tagged
    if kind is bytes or kind is bytearray:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if kind is datetime:
        if value.tzinfo is not None or value.microsecond:
            raise InvalidValue(
                "a datetime must be naive and whole seconds, as XML-RPC carries it"
            )
        return {"$datetime": format_datetime(value)}
    raise InvalidValue(f"values of type {kind.__name__} cannot be stored")


def from_tagged(data: Any) -> Any:
    """Return the value that the tagged JSON data *data* stands for.

    Raises InvalidValue for a malformed tag.
    """
    kind = type(data)
    if kind is list:
        return [from_tagged(item) for item in data]
    if kind is not dict:
        return data
    if len(data) == 1:
        ((tag, inner),) = data.items()
        if tag.startswith("$"):
            return _from_tag(tag, inner)
    return {name: from_tagged(item) for name, item in data.items()}


def _from_tag(tag: str, inner: Any) -> Any:
    if tag == "$dict" and type(inner) is dict:
        return {name: from_tagged(item) for name, item in inner.items()}
    if tag == "$bytes" and type(inner) is str:
        try:
            return base64.b64decode(inner, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII text
            raise InvalidValue(f"bad base64 in $bytes: {brief(inner)}") from None
    if tag == "$datetime" and type(inner) is str:
        try:
            return datetime.strptime(inner, _DATETIME_FORMAT)
        except ValueError:
            raise InvalidValue(f"bad $datetime {brief(inner)}; use YYYYMMDDTHH:MM:SS") from None
    raise InvalidValue(f"unknown tag {brief(tag)}; wrap a one-key dict as {{\"$dict\": ...}}")


def format_datetime(value: datetime) -> str:
    # strftime's %Y does not zero-pad years before 1000 on every platform.
    return (
        f"{value.year:04d}{value.month:02d}{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
