"""Stores on a test Clock, for driving protocols and backends in memory."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from kvconfig.backends.memory import MemoryBackend
from kvconfig.backends.sqlite import SQLiteBackend
from kvconfig.limits import Limits
from kvconfig.store import Store


def clocked_store(kind: str = "memory", directory: Path | None = None,
                  clock: Clock | None = None, **limits) -> Store:
    """A started Store on a Clock (``store.backend.clock``): memory, or
    sqlite in *directory* committing in process on ``clock.advance(0)``."""
    clock = clock or Clock()
    limits = Limits(**limits)
    if kind == "memory":
        backend = MemoryBackend(clock, limits)
    else:
        backend = SQLiteBackend(str(directory / "kv.db"), clock, limits)
    store = Store(backend, limits)
    store.start()
    return store
