"""
What the kvconfig agent knows and decides, without I/O: its local copy of
the keys under its prefix, which of its subscription's sequence numbers that
copy holds, and where it is in its subscription cycle.

The agent (kvconfig.agent) is the shell around these: it feeds them what
arrives and the time, and does what they decide (send a subscribe, apply a
datagram, pull, move to the next node).  Its listeners
(kvconfig.agentoutput) are handed the LocalCopy and each batch of Changes.
Values are kept as the tagged JSON of kvconfig.values, as the datagrams
carry them.

The subscription cycle (SubscriptionCycle, its table is TRANSITIONS)::

    unsubscribed --start--> awaiting cookie --cookie--> subscribing
        --subscribed--> subscribed --silence--> silent --cookie--> subscribing
    awaiting cookie | subscribing | silent --unanswered, another node--> next node

A subscribe that goes unanswered is sent again, backing off; while not
subscribed the agent pulls as often (polling), so the copy stays fresh when
notifications cannot come.  A heartbeat or event of a subscription the
agent holds a cookie for but never heard named (its "subscribed" answers
were lost) is taken up at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: Datagrams held while a gap waits to fill or a pull is under way.
MAX_HELD = 4096
#: Subscribe requests left unanswered before the agent moves to the next node.
SWITCH_AFTER = 2


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
    complete up to ``revision``.  ``synced`` once it holds a snapshot (until
    then, and once the server's history cannot be trusted, the next pull is
    a snapshot)."""

    items: dict[str, Any] = field(default_factory=dict)
    revision: int = 0
    synced: bool = False

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
        self.items, self.revision, self.synced = dict(items), revision, True
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


class Backoff:
    """A delay that doubles each time it is used, up to *maximum*, until reset."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.delay = initial

    def next(self) -> float:
        """The delay to wait now; the next one is twice as long."""
        delay = self.delay
        self.delay = min(delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.delay = self.initial


class State(Enum):
    UNSUBSCRIBED = "unsubscribed"           # not started, or stopped
    AWAITING_COOKIE = "awaiting cookie"     # asking the node for a cookie
    SUBSCRIBING = "subscribing"             # the node's cookie sent; no subscription yet
    SUBSCRIBED = "subscribed"               # renewing every third of the lease
    SILENT = "silent"                       # heartbeats stopped; subscribing again
    OVER_TCP = "over tcp"                   # UDP subscribes unanswered: subscribing over TCP
    NEXT_NODE = "next node"                 # moved to the next node; asking it for a cookie


class Event(Enum):
    START = "start"
    STOP = "stop"
    COOKIE = "cookie"                       # the node sent a cookie
    RENEWED = "renewed"                     # "subscribed", naming the subscription held
    NEW_SUBSCRIPTION = "new subscription"   # "subscribed", naming another one
    UNKNOWN_SUBSCRIPTION = "unknown subscription"   # a heartbeat or event of one not named yet
    SILENCE = "silence"                     # no heartbeat for three intervals and a second
    RENEW_DUE = "renew due"                 # a third of the lease has gone
    RETRY_DUE = "retry due"                 # a subscribe went unanswered; the backoff is over
    UNANSWERED = "unanswered"               # SWITCH_AFTER of them
    TCP_FAILED = "tcp failed"               # a subscribe over TCP failed, and there is another node
    POLL_DUE = "poll due"                   # not subscribed: time to pull anyway


class Action(Enum):
    """What the shell does for a transition."""

    SUBSCRIBE = "subscribe"                 # send a subscribe, with the cookie if there is one
                                            # (and, once over TCP, make the call too)
    SUBSCRIBE_OVER_TCP = "subscribe over tcp"   # from now on subscribe over TCP as well
    UNSUBSCRIBE = "unsubscribe"             # send an unsubscribe
    PULL = "pull"                           # bring the copy up to date over TCP
    RESYNC = "resync"                       # numbers restart at the answer's seq; pull
    ADOPT = "adopt"                         # the same, for a subscription taken up unnamed
    CATCH_UP = "catch up"                   # the answer's seq may show a gap: pull if so
    FOLLOW_NEXT_NODE = "follow next node"   # subscribe and pull at the next node from now on
    REPORT_SILENCE = "report silence"       # log that the node went quiet


S, E, A = State, Event, Action

#: The subscription cycle, one line per transition: (state, event): (next
#: state, what the shell does, in order).  An event without a line in the
#: current state changes nothing.
TRANSITIONS: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (S.UNSUBSCRIBED, E.START):                (S.AWAITING_COOKIE, (A.PULL, A.SUBSCRIBE)),

    (S.SUBSCRIBED, E.COOKIE):                 (S.SUBSCRIBED, (A.SUBSCRIBE,)),
    (S.SUBSCRIBED, E.RENEWED):                (S.SUBSCRIBED, (A.CATCH_UP,)),
    (S.SUBSCRIBED, E.NEW_SUBSCRIPTION):       (S.SUBSCRIBED, (A.RESYNC,)),
    (S.SUBSCRIBED, E.RENEW_DUE):              (S.SUBSCRIBED, (A.SUBSCRIBE,)),
    (S.SUBSCRIBED, E.SILENCE):                (S.SILENT, (A.REPORT_SILENCE,)),
    (S.SUBSCRIBED, E.STOP):                   (S.UNSUBSCRIBED, (A.UNSUBSCRIBE,)),

    # Only with the node's cookie sent can a subscription exist unnamed.
    (S.SUBSCRIBING, E.UNKNOWN_SUBSCRIPTION):  (S.SUBSCRIBED, (A.ADOPT,)),
    (S.SILENT, E.UNKNOWN_SUBSCRIPTION):       (S.SUBSCRIBED, (A.ADOPT,)),
}
# Not subscribed, wherever in the cycle: a cookie is sent back at once, a
# subscription taken, unanswered subscribes retried (backing off) until the
# agent moves on, and meanwhile the copy is polled.
for _state in (S.AWAITING_COOKIE, S.SUBSCRIBING, S.SILENT, S.OVER_TCP, S.NEXT_NODE):
    TRANSITIONS.update({
        (_state, E.COOKIE):                   (S.SUBSCRIBING, (A.SUBSCRIBE,)),
        (_state, E.NEW_SUBSCRIPTION):         (S.SUBSCRIBED, (A.RESYNC,)),
        (_state, E.RETRY_DUE):                (_state, (A.SUBSCRIBE,)),
        # The UDP handshake goes unanswered (a filter, a cookie flood from
        # the agent's network): the node is asked over TCP, which proves
        # the agent's host as well; if that fails too, the next node.
        (_state, E.UNANSWERED):               (S.OVER_TCP, (A.SUBSCRIBE_OVER_TCP,)),
        (_state, E.TCP_FAILED):               (S.NEXT_NODE, (A.FOLLOW_NEXT_NODE, A.SUBSCRIBE)),
        (_state, E.POLL_DUE):                 (_state, (A.PULL,)),
        (_state, E.STOP):                     (S.UNSUBSCRIBED, ()),
    })
del _state


class SubscriptionCycle:
    """The agent's subscription to one node of *nodes*, as a state machine.

    Its inputs are the methods below, each given the time; each returns the
    Actions the shell must take, in order.  It keeps the cycle's data: the
    node's cookie, the subscription's id, lease and heartbeat interval, when
    it was last heard from, and when the next subscribe is due (every third
    of the lease when subscribed, backing off from one second to
    *max_backoff* when not).
    """

    def __init__(self, nodes: int = 1, max_backoff: float = 30) -> None:
        self.nodes = nodes
        self.state = S.UNSUBSCRIBED
        self.cookie: str | None = None
        self.sub: str | None = None
        self.lease, self.heartbeat = 30.0, 2.0
        self.last_heard = 0.0
        self.renew_at = 0.0
        self.next_poll = 0.0
        self.unanswered = 0
        #: UDP subscribes went unanswered: subscribe over TCP as well (UDP
        #: still, to see it answer again, with a cookie).
        self.over_tcp = False
        self.backoff = Backoff(1.0, max_backoff)

    # Inputs

    def start(self, now: float) -> list[Action]:
        return self._fire(E.START, now)

    def stop(self, now: float) -> list[Action]:
        return self._fire(E.STOP, now)

    def cookie_arrived(self, cookie: str, now: float) -> list[Action]:
        return self._fire(E.COOKIE, now, cookie)

    def subscribed(self, sub: str, lease: float, heartbeat: float,
                   now: float) -> list[Action]:
        """The node answered a subscribe: subscription *sub* holds."""
        event = E.RENEWED if sub == self.sub else E.NEW_SUBSCRIPTION
        return self._fire(event, now, sub, lease, heartbeat)

    def tcp_failed(self, now: float) -> list[Action]:
        """A subscribe over TCP failed: with another node, move to it; with
        none, the next retry (backing off) tries again."""
        return self._fire(E.TCP_FAILED, now) if self.nodes > 1 else []

    def heard(self, sub: Any, now: float) -> tuple[bool, list[Action]]:
        """A heartbeat or an event of subscription *sub* arrived.  Whether
        it is the subscription the agent holds (or has just taken up), and
        what to do."""
        if self.sub is not None and sub == self.sub:
            self.last_heard = now
            return True, []
        if type(sub) is not str:
            return False, []
        actions = self._fire(E.UNKNOWN_SUBSCRIPTION, now, sub)
        return bool(actions), actions

    def tick(self, now: float, can_poll: bool) -> list[Action]:
        """Time passed: is the node silent, a subscribe due, a poll due (only
        if *can_poll*: the copy holds a snapshot)?"""
        if self.state is S.UNSUBSCRIBED:
            return []
        actions = []
        if self.state is S.SUBSCRIBED and now - self.last_heard > 3 * self.heartbeat + 1:
            actions += self._fire(E.SILENCE, now)
        if self.state is not S.SUBSCRIBED and can_poll and now >= self.next_poll:
            actions += self._fire(E.POLL_DUE, now)
        if now >= self.renew_at:
            if self.state is S.SUBSCRIBED:
                actions += self._fire(E.RENEW_DUE, now)
            else:
                self.unanswered += 1
                unanswered = self.unanswered > SWITCH_AFTER and not self.over_tcp
                actions += self._fire(E.UNANSWERED if unanswered else E.RETRY_DUE, now)
        return actions

    # The machine

    def _fire(self, event: Event, now: float, *data: Any) -> list[Action]:
        transition = TRANSITIONS.get((self.state, event))
        if transition is None:
            return []
        self.state, actions = transition
        self._record(event, now, *data)
        return list(actions)

    def _record(self, event: Event, now: float, *data: Any) -> None:
        """What *event* changes in the cycle's data, in whichever state."""
        if event is E.START:
            self.backoff.reset()
            self.renew_at = self.next_poll = now + self.backoff.delay
        elif event is E.COOKIE:
            (self.cookie,) = data
            self.over_tcp = False   # UDP answers again
        elif event in (E.RENEWED, E.NEW_SUBSCRIPTION):
            self.sub, self.lease, self.heartbeat = data
            self.last_heard = now
            self.renew_at = now + self.lease / 3
            self.backoff.reset()
            self.unanswered = 0
        elif event is E.UNKNOWN_SUBSCRIPTION:
            (self.sub,) = data
            self.last_heard = now
            self.renew_at = now             # renew at once, to learn the lease
        elif event is E.SILENCE:
            self.sub = None
            self.renew_at = now
            self.backoff.reset()
        elif event is E.RENEW_DUE:
            self.unanswered = 0
            self.renew_at = now + self.lease / 3
        elif event is E.RETRY_DUE:
            self.renew_at = now + self.backoff.next()
        elif event is E.UNANSWERED:
            self.over_tcp = True
            self.unanswered = 0
            self.renew_at = now + self.backoff.next()
        elif event is E.TCP_FAILED:
            # A new node knows nothing of the old one's cookie.
            self.cookie = None
            self.over_tcp = False
            self.unanswered = 0
            self.backoff.reset()
            self.renew_at = now + self.backoff.next()
        elif event is E.POLL_DUE:
            self.next_poll = now + self.backoff.delay
