"""The memory backend: for tests and throwaway use; nothing survives a restart."""

from __future__ import annotations

from zope.interface import implementer

from kvconfig.backends.base import IBackend, LocalBackend


@implementer(IBackend)
class MemoryBackend(LocalBackend):
    """Changes are "durable" as soon as they are in memory."""

    name = "memory"
    durable = False
