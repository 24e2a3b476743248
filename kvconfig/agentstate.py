"""
What the kvconfig agent knows, without I/O: its local copy of the keys under
its prefix, and the changes it applies to it.

The agent (kvconfig.agent) keeps a LocalCopy in step with the server; its
listeners (kvconfig.agentoutput) are handed the copy and each batch of
Changes.  Values are kept as the tagged JSON of kvconfig.values, as the
datagrams carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Change:
    """One change the agent applied to its local copy."""

    op: str               # "put" or "delete"
    key: str
    revision: int
    value: Any = None     # tagged JSON, for a put


@dataclass
class LocalCopy:
    """The agent's copy of the keys under its prefix: values as tagged JSON,
    complete up to ``revision``."""

    items: dict[str, Any] = field(default_factory=dict)
    revision: int = 0

    def put(self, key: str, value: Any, revision: int) -> Change | None:
        self.revision = max(self.revision, revision)
        if key in self.items and _same(self.items[key], value):
            return None
        self.items[key] = value
        return Change("put", key, revision, value)

    def delete(self, key: str, revision: int) -> Change | None:
        self.revision = max(self.revision, revision)
        if self.items.pop(key, _ABSENT) is _ABSENT:
            return None
        return Change("delete", key, revision)

    def replace(self, items: dict[str, Any], revision: int) -> list[Change]:
        """Become the snapshot *items* at *revision*; returns the differences."""
        changes = [Change("delete", key, revision) for key in self.items if key not in items]
        changes += [Change("put", key, revision, value) for key, value in items.items()
                    if key not in self.items or not _same(self.items[key], value)]
        self.items, self.revision = dict(items), revision
        return changes


_ABSENT = object()


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: Python's == takes 1, 1.0 and True for one value."""
    return a == b and _canonical(a) == _canonical(b)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)

