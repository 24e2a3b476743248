"""Backends, chosen by a ``--store`` string: ``sqlite:PATH``, ``memory:`` or
``etcd:URL[,URL...]``."""

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
        from kvconfig.backends.etcd import parse_endpoints

        parse_endpoints(argument)
    return kind, argument


def backend_from_string(spec: str, clock: IReactorTime, limits: Limits,
                        etcd_prefix: str = "kvconfig/", etcd_timeout: float = 5.0) -> IBackend:
    kind, argument = parse_store(spec)
    if kind == "sqlite":
        from kvconfig.backends.sqlite import SQLiteBackend

        return SQLiteBackend(argument, clock, limits)
    if kind == "etcd":
        from kvconfig.backends.etcd import EtcdBackend, parse_endpoints

        return EtcdBackend(parse_endpoints(argument), etcd_prefix, clock, limits, etcd_timeout)
    from kvconfig.backends.memory import MemoryBackend

    return MemoryBackend(clock, limits)


__all__ = ["IBackend", "LocalBackend", "backend_from_string", "parse_store"]
