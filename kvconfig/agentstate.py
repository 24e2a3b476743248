"""
What the kvconfig agent knows and decides, without I/O: its local copy of
the keys under its prefix, and which of its subscription's sequence numbers
that copy holds.

The agent (kvconfig.agent) is the shell around these: it feeds them what
arrives and does what they decide (apply a datagram, pull, wait for a gap
to fill).  Its listeners (kvconfig.agentoutput) are handed the LocalCopy and
each batch of Changes.  Values are kept as the tagged JSON of
kvconfig.values, as the datagrams carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Datagrams held while a gap waits to fill or a pull is under way.
MAX_HELD = 4096


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



class SequenceTracker:
    """Which of a subscription's sequence numbers the local copy holds, and
    when one is missing.

    Every number up to ``last_seq`` is applied or covered by a pull.  An
    event datagram that does not follow on is held (at most ``max_held``)
    until the numbers before it arrive or a pull covers it.  Why a pull
    covers what it does: the server sends an event's datagram once the event
    is durable, so a pull sent after number *n* was seen (or announced by a
    heartbeat) answers at a revision that includes it.  Only within one
    subscription, though: a new one starts a new epoch, its numbers start
    afresh, and a pull sent for an earlier epoch covers none of them.
    """

    def __init__(self, max_held: int = MAX_HELD) -> None:
        self.max_held = max_held
        self.last_seq = 0
        #: The highest number seen or announced: what a pull sent now covers.
        self.highest_seen = 0
        self.held: dict[int, Any] = {}
        self.epoch = 0
        self._pull: tuple[int, int] | None = None     # (covers, epoch) of the pull under way

    @property
    def pulling(self) -> bool:
        """A pull is under way: held datagrams wait for its answer."""
        return self._pull is not None

    def restart(self, seq: int) -> None:
        """A new subscription whose last number sent is *seq*: what came
        before it is for a pull to bring."""
        self.epoch += 1
        self.last_seq = self.highest_seen = seq
        self.held.clear()

    def saw(self, seq: int) -> None:
        """The server has sent up to *seq*: the next pull covers it."""
        self.highest_seen = max(self.highest_seen, seq)

    def offer(self, seq: int, datagram: Any) -> bool:
        """Event datagram *seq* arrived; False if it is a duplicate.  It is
        held if there is room; if not, the pull that covers it (it was seen)
        or the gap it leaves brings its change."""
        if seq <= self.last_seq or seq in self.held:
            return False
        self.saw(seq)
        if len(self.held) < self.max_held:
            self.held[seq] = datagram
        return True

    def announced(self, seq: int) -> bool:
        """A heartbeat or a subscribe answer says the server has sent up to
        *seq*.  True if some of those numbers are neither applied nor held:
        a gap, to pull now."""
        if seq <= self.last_seq:
            return False
        self.saw(seq)
        return not all(n in self.held for n in range(self.last_seq + 1, seq + 1))

    def next_in_order(self) -> Any | None:
        """The held datagram that follows on from ``last_seq``, counted as
        applied; None if there is none, or a pull is under way (its answer
        comes first)."""
        if self._pull is not None or self.last_seq + 1 not in self.held:
            return None
        self.last_seq += 1
        return self.held.pop(self.last_seq)

    def pull_started(self) -> None:
        self._pull = (self.highest_seen, self.epoch)

    def pull_done(self) -> None:
        """The pull's answer is applied: the numbers it covers are done with."""
        covers, epoch = self._pull
        self._pull = None
        if epoch == self.epoch:
            self.last_seq = max(self.last_seq, covers)
        for seq in [n for n in self.held if n <= self.last_seq]:
            del self.held[seq]

    def pull_failed(self) -> None:
        self._pull = None
