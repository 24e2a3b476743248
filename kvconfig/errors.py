"""
Every error kvconfig reports to a client, as a type with a stable wire code.

Each protocol maps the same type to its own wire form: the XML-RPC interface
sends ``Fault(code, message)``, the line protocol an ``ERR <name> <message>``
line, the UDP notifier an error datagram.  Codes and names never change
meaning once released; the README lists them.

Two families:

- store errors (positive codes): the request was understood but cannot be
  carried out as asked (bad key, value too large, compare-and-set lost ...);
- request errors (the XML-RPC interoperability codes, ``-32xxx``): the
  request itself could not be understood (malformed XML, unknown method,
  wrong arguments, body too large ...).
"""

from __future__ import annotations

import reprlib

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother = 3, 60, 60


def brief(value: object) -> str:
    """A short repr of client input for an error message: bounded in size
    and depth, whatever the client sent."""
    return _brief.repr(value)


class KVConfigError(Exception):
    """Base of every error kvconfig reports to a client."""

    code: int = 0
    name: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidKey(KVConfigError):
    """The key is empty, not a string, or holds whitespace or control characters."""

    code, name = 1, "invalid_key"


class KeyTooLarge(KVConfigError):
    """The key's UTF-8 encoding is longer than the configured maximum."""

    code, name = 2, "key_too_large"


class InvalidValue(KVConfigError):
    """The value holds something XML-RPC cannot carry (an int beyond 32 bits,
    a non-string dict key, a control character, a timezone ...)."""

    code, name = 3, "invalid_value"


class ValueTooLarge(KVConfigError):
    """The encoded value is longer than the configured maximum."""

    code, name = 4, "value_too_large"


class InvalidArgument(KVConfigError):
    """An argument other than key or value is out of range (a negative TTL,
    an unknown option, a revision that is not an integer ...)."""

    code, name = 5, "invalid_argument"


class CompareFailed(KVConfigError):
    """A compare-and-set found another mod_revision than the one required."""

    code, name = 6, "compare_failed"

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(
            f"compare failed for {key!r}: expected mod_revision {expected}, "
            f"found {actual}"
        )
        self.key, self.expected, self.actual = key, expected, actual


class Compacted(KVConfigError):
    """The revision asked for is older than the history window.

    The client should take a snapshot (a prefix listing, which carries its
    revision) and go on from that revision.
    """

    code, name = 7, "compacted"

    def __init__(self, since: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {since} is compacted: history starts after revision "
            f"{compact_revision}; take a snapshot and continue from its revision"
        )
        self.since, self.compact_revision = since, compact_revision


class Unavailable(KVConfigError):
    """The backend cannot take writes right now (disk error, lost quorum)."""

    code, name = 8, "unavailable"


class LimitExceeded(KVConfigError):
    """A configured limit (connections, watches, subscriptions ...) is reached."""

    code, name = 9, "limit_exceeded"


class RequestTooLarge(KVConfigError):
    """The request body is larger than the configured maximum; it was
    discarded unread."""

    code, name = 10, "request_too_large"


class BatchTooLarge(KVConfigError):
    """A ``system.multicall`` holds more calls than the configured maximum."""

    code, name = 11, "batch_too_large"


class SlowConsumer(KVConfigError):
    """A watcher fell more events behind than the configured backlog; its
    watches were ended.  It can watch again from the last revision it saw."""

    code, name = 12, "slow_consumer"


class PermissionDenied(KVConfigError):
    """The client may not do this: the key, or the subscription, is not its
    own to read or change."""

    code, name = 13, "permission_denied"


# Request errors use the XML-RPC fault code interoperability specification
# (xmlrpc-epi), which XML-RPC client libraries already know.


class MalformedRequest(KVConfigError):
    """The request body is not well-formed XML."""

    code, name = -32700, "malformed_request"


class BadEncoding(KVConfigError):
    """The request body is not valid in its declared encoding (UTF-8 by default)."""

    code, name = -32702, "bad_encoding"


class InvalidRequest(KVConfigError):
    """Well-formed XML that is not an XML-RPC method call."""

    code, name = -32600, "invalid_request"


class NoSuchMethod(KVConfigError):
    """No method of that name."""

    code, name = -32601, "no_such_method"


class WrongArguments(KVConfigError):
    """Wrong number or type of arguments for the method."""

    code, name = -32602, "wrong_arguments"


class InternalError(KVConfigError):
    """A bug in kvconfig; the server logged it and keeps serving."""

    code, name = -32603, "internal_error"


ALL_ERRORS: tuple[type[KVConfigError], ...] = (
    InvalidKey,
    KeyTooLarge,
    InvalidValue,
    ValueTooLarge,
    InvalidArgument,
    CompareFailed,
    Compacted,
    Unavailable,
    LimitExceeded,
    RequestTooLarge,
    BatchTooLarge,
    SlowConsumer,
    PermissionDenied,
    MalformedRequest,
    BadEncoding,
    InvalidRequest,
    NoSuchMethod,
    WrongArguments,
    InternalError,
)
