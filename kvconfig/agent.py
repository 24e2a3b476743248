"""
The kvconfig agent: keeps a machine's copy of a key prefix exactly in step
with the server, and tells the application when it changes.

It subscribes to the server's UDP notifications (kvconfig.udpwire holds the
wire format) and renews the lease.  Datagrams are only a hint that something
changed: each carries a per-subscription sequence number, and whatever the
agent cannot vouch for (a gap in the numbers that does not fill within
``reorder_wait``, a heartbeat announcing a later number, a value too large to
travel, a new subscription after a server restart or an expired lease) it
pulls over XML-RPC with ``changes(prefix, since)``, or ``list(prefix)`` after
``compacted``.  Events are applied in revision order and idempotently, so
loss, duplication and reordering only cost a pull.

Why the bookkeeping is sound: the server sends an event's datagram when the
event is durable, so a pull sent after datagram *n* was received answers at
a revision that includes every event numbered up to *n*.  A pull therefore
covers every number seen (or announced by a heartbeat) before it was sent;
datagrams that arrive while it is under way wait, and are applied after it
if they are newer than its answer.

What changed is handed to a listener (kvconfig.agentoutput); the copy itself
is kvconfig.agentstate's LocalCopy, and the pulls go through
kvconfig.agentpull.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvconfig import errors
from kvconfig.agentstate import Change, LocalCopy, SequenceTracker
from kvconfig.udpwire import BadDatagram, Sealer, pad

#: Seconds between the agent's checks of its subscription (renewal, silence).
TICK = 0.5
#: Subscribe requests left unanswered before the agent moves to the next node.
SWITCH_AFTER = 2


class Source(Protocol):
    """Where the agent pulls from: the server's ``changes`` and ``list``."""

    def changes(self, prefix: str, since: int) -> Deferred:
        """Fires with (revision, [Change, ...]); fails with errors.Compacted."""

    def snapshot(self, prefix: str) -> Deferred:
        """Fires with (revision, {key: tagged value})."""


class Listener(Protocol):
    def copy_changed(self, local_copy: LocalCopy, changes: list[Change]) -> None:
        """*changes* were applied; *local_copy* is complete at its revision."""



class Agent:
    """Subscribes to one prefix and keeps a LocalCopy of it in step.

    ``transport`` is a UDP port (AgentProtocol sets it); ``server`` the
    notifier's (ip, port).  Time comes only from *clock*.
    """

    log = Logger()

    def __init__(self, prefix: str, server: tuple[str, int], source: Source,
                 listener: Listener, clock: IReactorTime, sealer: Sealer,
                 reorder_wait: float = 0.05, max_backoff: float = 30,
                 alternates: Sequence[tuple[tuple[str, int], Source]] = ()) -> None:
        self.prefix, self.server, self.source, self.listener = prefix, server, source, listener
        # The nodes of one cluster to follow, in order of preference: the
        # agent moves to the next when its node stops answering.  Revisions
        # are the cluster's, so its copy stays valid across nodes.
        self.nodes = [(server, source), *alternates]
        self._node = 0
        self._unanswered = 0
        self.clock, self.sealer = clock, sealer
        self.reorder_wait, self.max_backoff = reorder_wait, max_backoff
        self.transport = None
        self.local_copy = LocalCopy()
        self.synced = False            # the copy holds a snapshot
        self.counters = dict.fromkeys(
            ("datagrams", "applied", "duplicates", "gaps", "pulls", "snapshots",
             "pull_failures", "subscribes", "resubscriptions", "foreign", "node_switches"), 0)
        # The subscription
        self.cookie: str | None = None
        self.sub: str | None = None
        self.lease, self.heartbeat = 30.0, 2.0
        self.last_heard = 0.0
        self._renew_at = 0.0
        self._subscribe_backoff = 1.0
        self.sequence = SequenceTracker()
        self._gap_timer = None
        # Pulls
        self._pull_again = False
        self._pull_backoff = 0.1
        self._retry_call = None
        self._next_poll = 0.0
        self._tick_call = None
        self._running = False

    # Life

    def start(self) -> None:
        self._running = True
        self.pull()
        self._subscribe()
        self._renew_at = self.clock.seconds() + self._subscribe_backoff
        self._next_poll = self._renew_at
        self._tick_call = self.clock.callLater(TICK, self._tick)

    def stop(self) -> None:
        self._running = False
        for call in (self._tick_call, self._gap_timer, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        if self.sub is not None and self.cookie is not None:
            self._send({"t": "unsubscribe", "prefix": self.prefix, "cookie": self.cookie},
                       padded=True)

    # Subscribing

    def _subscribe(self) -> None:
        message = {"t": "subscribe", "prefix": self.prefix}
        if self.cookie is not None:
            message["cookie"] = self.cookie
        self.counters["subscribes"] += 1
        self._send(message, padded=True)

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self.sub is not None and now - self.last_heard > 3 * self.heartbeat + 1:
            # Heartbeats stopped: the server is down, restarted, or the path
            # is lost.  Keep the copy and subscribe again, backing off.
            self.log.warn("no word from the server for {seconds:.1f} s; subscribing again",
                          seconds=now - self.last_heard)
            self.sub = None
            self._renew_at = now
            self._subscribe_backoff = 1.0
        if self.sub is None and self.synced and now >= self._next_poll:
            # No notifications are coming (UDP blocked, the server busy):
            # keep the copy fresh by pulling, as often as subscribing.
            self._next_poll = now + self._subscribe_backoff
            self.pull()
        if now >= self._renew_at:
            if self.sub is not None:
                self._unanswered = 0
            else:
                self._unanswered += 1
                if self._unanswered > SWITCH_AFTER and len(self.nodes) > 1:
                    self._switch_node()
            self._subscribe()
            if self.sub is None:
                self._renew_at = now + self._subscribe_backoff
                self._subscribe_backoff = min(self._subscribe_backoff * 2, self.max_backoff)
            else:
                self._renew_at = now + self.lease / 3
        if self._running:
            self._tick_call = self.clock.callLater(TICK, self._tick)

    def _switch_node(self) -> None:
        """Follow the next node: subscribe there (with a new cookie) and
        pull from it what this copy lacks."""
        self._node = (self._node + 1) % len(self.nodes)
        old = self.server
        self.server, self.source = self.nodes[self._node]
        self.log.warn("node {old} does not answer; following {new}", old=old, new=self.server)
        self.counters["node_switches"] += 1
        self.cookie = None
        self._unanswered = 0
        self._subscribe_backoff = 1.0
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._pull_backoff = 0.1
        if self.synced:
            self.pull()

    # Datagrams

    def received(self, datagram: bytes, address: tuple[str, int]) -> None:
        if address != self.server:
            self.counters["foreign"] += 1
            return
        try:
            message = self.sealer.open(datagram)
        except BadDatagram:
            return
        self.counters["datagrams"] += 1
        handler = getattr(self, "_on_" + message["t"], None)
        if handler is None:
            self.sealer.dropped["malformed"] += 1
            return
        try:
            handler(message)
        except (KeyError, TypeError, ValueError, AttributeError):
            # A well-signed but ill-formed datagram: a bug or another version.
            self.sealer.dropped["malformed"] += 1
            self.log.failure("ill-formed datagram {datagram!r}", datagram=datagram[:200])

    def _on_cookie(self, message: dict[str, Any]) -> None:
        cookie = message["cookie"]
        if type(cookie) is not str:
            raise TypeError("cookie")
        self.cookie = cookie
        self._subscribe()

    def _on_subscribed(self, message: dict[str, Any]) -> None:
        if message["prefix"] != self.prefix:
            return
        now = self.clock.seconds()
        lease, heartbeat = _seconds(message["lease"]), _seconds(message["heartbeat"])
        sub, seq = _sub_id(message["sub"]), _seq(message["seq"])
        self.last_heard = now
        self.lease, self.heartbeat = lease, heartbeat
        self._renew_at = now + self.lease / 3
        self._subscribe_backoff = 1.0
        self._unanswered = 0
        if sub != self.sub:
            # A new subscription (first, or after a restart or an expired
            # lease): its numbers start afresh, and what happened before it
            # must be pulled.
            if self.sub is not None or self.counters["resubscriptions"]:
                self.log.info("new subscription {sub}; resynchronising", sub=sub)
            self.counters["resubscriptions"] += 1
            self.sub = sub
            self.sequence.restart(seq)
            self.pull(seq)
        else:
            self._announced(seq)

    def _on_heartbeat(self, message: dict[str, Any]) -> None:
        if message["sub"] != self.sub and not self._adopt(message):
            return
        self.last_heard = self.clock.seconds()
        self._announced(_seq(message["seq"]))

    def _on_event(self, message: dict[str, Any]) -> None:
        if message["sub"] != self.sub and not self._adopt(message):
            return
        self.last_heard = self.clock.seconds()
        seq = _seq(message["seq"])
        if not self.sequence.offer(seq, message):
            self.counters["duplicates"] += 1
            return
        self._drain()

    def _adopt(self, message: dict[str, Any]) -> bool:
        """Take up a subscription the server holds for this socket although
        its "subscribed" answers were lost: the socket serves one prefix,
        and waiting for the next answer could take the whole backoff."""
        if self.sub is not None or self.cookie is None or type(message["sub"]) is not str:
            return False
        seq = _seq(message["seq"])
        self.log.info("subscription {sub} adopted from a {kind}", sub=message["sub"],
                      kind=message["t"])
        self.counters["resubscriptions"] += 1
        self.sub = message["sub"]
        self.sequence.restart(seq)
        self._renew_at = self.clock.seconds()       # renew now, learning the lease
        self.pull(seq)
        # The datagram that revealed it is covered by that pull.
        return message["t"] == "heartbeat"

    def _on_error(self, message: dict[str, Any]) -> None:
        self.log.error("the server refused the subscription to {prefix!r}: {error} {message}",
                       prefix=self.prefix, error=message["error"], message=message["message"])

    def _on_unsubscribed(self, message: dict[str, Any]) -> None:
        pass

    def _announced(self, seq: int) -> None:
        """The server has sent up to *seq*: pull now if some are missing."""
        if self.sequence.announced(seq):
            self.counters["gaps"] += 1
            self.pull(seq)

    def _drain(self) -> None:
        """Apply held datagrams that follow on without a gap."""
        if not self.synced:
            return          # nothing is applied before the first snapshot
        while (message := self.sequence.next_in_order()) is not None:
            self._apply(message)
        if self.sequence.pulling:
            return
        if self.sequence.held:
            if self._gap_timer is None or not self._gap_timer.active():
                self._gap_timer = self.clock.callLater(self.reorder_wait, self._gap)
        elif self._gap_timer is not None and self._gap_timer.active():
            self._gap_timer.cancel()

    def _gap(self) -> None:
        if self.sequence.held:
            self.counters["gaps"] += 1
            self.pull()

    def _apply(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        revision = _seq(message["rev"])
        if op is None or message.get("pull"):
            self.pull()
            return
        if revision < self.local_copy.revision:
            return          # a pull already brought something newer
        key = message["key"]
        if type(key) is not str or not key.startswith(self.prefix):
            raise ValueError(f"key {key!r} is not under {self.prefix!r}")
        if op == "put":
            change = self.local_copy.put(key, message["value"], revision)
        elif op == "delete":
            change = self.local_copy.delete(key, revision)
        else:
            raise ValueError(f"unknown op {op!r}")
        self.counters["applied"] += 1
        self.listener.copy_changed(self.local_copy, [change] if change else [])

    # Pulling

    def pull(self, announced: int = 0) -> None:
        """Bring the copy up to date over TCP: covers every sequence
        number seen or announced before the request goes out."""
        self.sequence.saw(announced)
        if self._gap_timer is not None and self._gap_timer.active():
            self._gap_timer.cancel()
        if self._retry_call is not None and self._retry_call.active():
            return          # the retry, when its backoff is over, covers this
        if self.sequence.pulling:
            self._pull_again = True
            return
        self.sequence.pull_started()
        self._pull_again = False
        # From the revision before: the rest of a revision whose first
        # events came by datagram may be what was lost.
        since = max(self.local_copy.revision - 1, 0)
        if not self.synced:
            self.counters["snapshots"] += 1
            d = self.source.snapshot(self.prefix).addCallback(self._snapshot_arrived)
        else:
            self.counters["pulls"] += 1
            d = self.source.changes(self.prefix, since).addCallback(self._changes_arrived,
                                                                     since)
        d.addCallbacks(self._pulled, self._pull_failed)

    def _snapshot_arrived(self, result: tuple[int, dict[str, Any]]) -> None:
        revision, items = result
        items = {key: value for key, value in items.items() if key.startswith(self.prefix)}
        changes = self.local_copy.replace(items, revision)
        self.synced = True
        self.listener.copy_changed(self.local_copy, changes)

    def _changes_arrived(self, result: tuple[int, list[Change]], since: int) -> None:
        revision, events = result
        if revision < since:
            # The server's history went backwards (its store was replaced):
            # only a snapshot can be trusted.
            self.log.warn("server revision {revision} is behind ours ({since}); "
                          "taking a snapshot", revision=revision, since=since)
            self.synced = False
            raise _Resnapshot()
        applied = []
        local_copy = self.local_copy
        for change in events:
            if not change.key.startswith(self.prefix):
                continue
            if change.op == "put":
                applied.append(local_copy.put(change.key, change.value, change.revision))
            else:
                applied.append(local_copy.delete(change.key, change.revision))
        local_copy.revision = max(local_copy.revision, revision)
        self.listener.copy_changed(local_copy, [c for c in applied if c])

    def _pulled(self, _: Any) -> None:
        self.sequence.pull_done()
        self._pull_backoff = 0.1
        if self._pull_again:
            self.pull()
        else:
            self._drain()

    def _pull_failed(self, failure: Failure) -> None:
        self.sequence.pull_failed()
        if failure.check(errors.Compacted):
            self.log.info("history compacted; taking a snapshot of {prefix!r}",
                          prefix=self.prefix)
            self.synced = False
            self.pull()
            return
        if failure.check(_Resnapshot):
            self.pull()
            return
        self.counters["pull_failures"] += 1
        self.log.warn("cannot pull from the server ({error}); retrying in {delay:.1f} s",
                      error=failure.getErrorMessage() or failure.type.__name__,
                      delay=self._pull_backoff)
        delay = self._pull_backoff
        self._pull_backoff = min(self._pull_backoff * 2, self.max_backoff)
        if self._running:
            self._retry_call = self.clock.callLater(delay, self.pull)

    def _send(self, message: dict[str, Any], padded: bool = False) -> None:
        if self.transport is None:
            return
        datagram = pad(message, self.sealer) if padded else self.sealer.seal(message)
        try:
            self.transport.write(datagram, self.server)
        except Exception as e:  # no route, a full buffer: the next tick retries
            self.log.warn("cannot send to the server: {error}", error=e)


def _seq(number: Any) -> int:
    if type(number) is not int or not 0 <= number < 1 << 63:
        raise ValueError(f"not a sequence number or revision: {number!r}")
    return number


def _seconds(number: Any) -> float:
    if type(number) not in (int, float) or not 0 < number <= 86400:
        raise ValueError(f"not a number of seconds: {number!r}")
    return float(number)


def _sub_id(sub: Any) -> str:
    if type(sub) is not str or not 0 < len(sub) <= 64:
        raise ValueError(f"not a subscription id: {sub!r}")
    return sub


class _Resnapshot(Exception):
    pass


class AgentProtocol(DatagramProtocol):
    """The agent's UDP socket."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def startProtocol(self) -> None:
        self.agent.transport = self.transport

    def stopProtocol(self) -> None:
        self.agent.transport = None

    def datagramReceived(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.agent.received(datagram, address)

