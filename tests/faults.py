"""The documented wire codes, spelled out, and checks of XML-RPC Faults.

The codes (kvconfig/errors.py, README) must never change meaning, so tests
state them here rather than importing them.
"""

from __future__ import annotations

from contextlib import contextmanager
from xmlrpc.client import Fault, ServerProxy

import pytest

INVALID_KEY = (1, "invalid_key")
KEY_TOO_LARGE = (2, "key_too_large")
INVALID_VALUE = (3, "invalid_value")
VALUE_TOO_LARGE = (4, "value_too_large")
INVALID_ARGUMENT = (5, "invalid_argument")
COMPARE_FAILED = (6, "compare_failed")
COMPACTED = (7, "compacted")
UNAVAILABLE = (8, "unavailable")
REQUEST_TOO_LARGE = (10, "request_too_large")
BATCH_TOO_LARGE = (11, "batch_too_large")
MALFORMED_REQUEST = (-32700, "malformed_request")
BAD_ENCODING = (-32702, "bad_encoding")
INVALID_REQUEST = (-32600, "invalid_request")
NO_SUCH_METHOD = (-32601, "no_such_method")
WRONG_ARGUMENTS = (-32602, "wrong_arguments")


def check_fault(fault: Fault, error: tuple[int, str]) -> None:
    code, name = error
    assert fault.faultCode == code, fault
    assert fault.faultString.startswith(f"{name}: "), fault


def expect_fault(error: tuple[int, str], method, *args) -> Fault:
    """Call *method* and check that it fails with the Fault of *error*."""
    with pytest.raises(Fault) as info:
        method(*args)
    check_fault(info.value, error)
    return info.value


@contextmanager
def unchanged(proxy: ServerProxy, *keys: str):
    """Check that the block changed nothing: each key reads as before, and
    the store made no change (TTL expiries, which no client asks for, aside).

    The calls made afterwards also show that the server still serves.
    """
    before = [proxy.get(key) for key in keys]
    revision = proxy.stats()["revision"]
    yield
    assert [proxy.get(key) for key in keys] == before
    events = proxy.changes("", revision)["events"]
    assert [event for event in events if not event["expired"]] == []
