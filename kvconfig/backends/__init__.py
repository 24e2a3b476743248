"""Backends, chosen by a ``--store`` string: ``sqlite:PATH``, ``memory:`` or
``etcd:URL[,URL...]``.

The options are checked here without importing any backend: ``tap.py``
validates ``--store`` and ``--etcd-prefix`` with these functions, and only
``backend_from_string`` imports the backend chosen (and, for etcd, treq).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from kvconfig.backends.base import IBackend, LocalBackend
from kvconfig.limits import Limits

KINDS = ("sqlite", "memory", "etcd")


def parse_store(spec: str) -> tuple[str, str]:
    """Split a ``--store`` string into (kind, argument); ValueError if malformed."""
    kind, sep, argument = spec.partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(
            f"--store must be one of sqlite:PATH, memory: or etcd:URL[,URL...], not {spec!r}"
        )
    if kind == "sqlite" and not argument:
        raise ValueError("--store sqlite: needs a file path, as in sqlite:kvconfig.db")
    if kind == "memory" and argument:
        raise ValueError(f"--store memory: takes no argument, not {argument!r}")
    if kind == "etcd":
        parse_endpoints(argument)
    return kind, argument


def parse_endpoints(argument: str) -> list[str]:
    """The member URLs of ``etcd:URL[,URL...]``; ValueError if malformed."""
    endpoints = [part.strip() for part in argument.split(",")]
    if not argument or not all(endpoints):
        raise ValueError("--store etcd: needs member URLs, as in etcd:http://127.0.0.1:2379")
    for endpoint in endpoints:
        scheme, sep, rest = endpoint.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
            raise ValueError(f"--store etcd: {endpoint!r} is not an http://HOST:PORT URL")
    return endpoints


def check_etcd_prefix(prefix: str) -> str:
    """A valid ``--etcd-prefix``: printable, no whitespace; may be empty."""
    if prefix and (not prefix.isprintable() or " " in prefix):
        raise ValueError(f"--etcd-prefix must not hold whitespace or control characters: "
                         f"{prefix!r}")
    return prefix


def backend_from_string(spec: str, clock: IReactorTime, limits: Limits,
                        etcd_prefix: str = "kvconfig/", etcd_timeout: float = 5.0) -> IBackend:
    kind, argument = parse_store(spec)
    if kind == "sqlite":
        from kvconfig.backends.sqlite import SQLiteBackend

        return SQLiteBackend(argument, clock, limits)
    if kind == "etcd":
        from kvconfig.backends.etcd import EtcdBackend

        return EtcdBackend(parse_endpoints(argument), etcd_prefix, clock, limits, etcd_timeout)
    from kvconfig.backends.memory import MemoryBackend

    return MemoryBackend(clock, limits)


__all__ = ["IBackend", "LocalBackend", "backend_from_string", "check_etcd_prefix",
           "parse_endpoints", "parse_store"]
