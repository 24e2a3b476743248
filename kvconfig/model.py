"""The records the store, its backends and every consumer of the change feed share.

They are never changed once made (treat them as frozen); they are not
declared frozen because a frozen dataclass costs five times as much to make,
and one of each is made for every write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvconfig import values

PUT = "put"
DELETE = "delete"


@dataclass(slots=True)
class KeyValue:
    """A key's current value and its metadata, as in etcd.

    ``raw`` is the value's tagged JSON encoding: what backends persist, the
    line protocol and datagrams carry, and the keyspace holds (a million
    decoded values would take several times the memory); ``value`` decodes
    it, for the interfaces that hand out values themselves.
    """

    key: str
    raw: bytes
    #: Writes to this key since it was (last) created, starting at 1.
    version: int
    #: The revision that created the key.
    create_revision: int
    #: The revision of the latest write to the key.
    mod_revision: int
    #: Wall-clock time (clock.seconds()) at which the key expires, or None.
    expires_at: float | None = None

    @property
    def value(self) -> Any:
        """The value (decoded afresh: each reader gets a copy of its own)."""
        return values.decode(self.raw)

    def metadata(self) -> dict[str, Any]:
        """The metadata fields, as the interfaces report them."""
        meta = {
            "key": self.key,
            "version": self.version,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
        }
        if self.expires_at is not None:
            meta["expires_at"] = self.expires_at
        return meta


@dataclass(slots=True)
class Event:
    """One change: the key's new state after a put, or its deletion.

    ``revision`` is the store's revision after the change.  ``kv`` is the new
    KeyValue for a put and None for a delete; ``expired`` says a delete was
    done by a TTL running out rather than by a client.
    """

    type: str
    key: str
    revision: int
    kv: KeyValue | None = None
    expired: bool = False

    @property
    def size(self) -> int:
        """Approximate bytes this event holds, for bounding history."""
        return len(self.key) + (len(self.kv.raw) if self.kv is not None else 0) + 64


@dataclass(slots=True)
class Absent:
    """The outcome of deleting a key that was absent: as of ``revision``."""

    revision: int
