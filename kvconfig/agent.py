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

This module is the shell: it reads and writes datagrams, starts pulls and
sets timers.  What to do is decided without I/O in kvconfig.agentstate: the
subscription cycle (SubscriptionCycle, a state machine), the sequence
numbers (SequenceTracker) and the copy itself (LocalCopy).  What changed is
handed to a listener (kvconfig.agentoutput); pulls go through a Source
(kvconfig.agentpull).
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
from kvconfig.agentstate import (
    Action,
    Backoff,
    Change,
    LocalCopy,
    SequenceTracker,
    State,
    SubscriptionCycle,
)
from kvconfig.udpwire import BadDatagram, Sealer, pad

#: Seconds between the agent's checks of its subscription (renewal, silence).
TICK = 0.5


class Source(Protocol):
    """Where the agent pulls from: the server's ``changes`` and ``list``."""

    def changes(self, prefix: str, since: int) -> Deferred:
        """Fires with (revision, [Change, ...]); fails with errors.Compacted."""

    def snapshot(self, prefix: str) -> Deferred:
        """Fires with (revision, {key: tagged value})."""

    def subscribe(self, prefix: str, udp_port: int, applied: int | None = None) -> Deferred:
        """Subscribes this host's *udp_port* over TCP, reporting the revision
        *applied* if given; fires with what the server says of the
        subscription (the fields of "subscribed")."""


class Listener(Protocol):
    def copy_changed(self, local_copy: LocalCopy, changes: list[Change]) -> None:
        """*changes* were applied; *local_copy* is complete at its revision."""

    # A listener may also say which revision it has made its own (FileOutput:
    # the one its file holds), with ``applied(local_copy) -> int``; without
    # it, the copy's revision is what the agent reports as applied.


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
        self.prefix, self.listener, self.clock, self.sealer = prefix, listener, clock, sealer
        self.reorder_wait, self.max_backoff = reorder_wait, max_backoff
        # The nodes of one cluster to follow, in order of preference: the
        # agent moves to the next when its node stops answering.  Revisions
        # are the cluster's, so its copy stays valid across nodes.
        self.nodes = [(server, source), *alternates]
        self._node = 0
        self.transport = None
        self.local_copy = LocalCopy()
        self.cycle = SubscriptionCycle(len(self.nodes), max_backoff)
        self.sequence = SequenceTracker()
        self.counters = dict.fromkeys(
            ("datagrams", "applied", "duplicates", "gaps", "pulls", "snapshots", "compacted",
             "pull_failures", "subscribes", "tcp_subscribes", "resubscriptions", "foreign",
             "node_switches"), 0)
        self._pull_backoff = Backoff(0.1, max_backoff)
        self._pull_again = False
        self._pulling: Deferred | None = None
        self._tick_call = self._gap_timer = self._retry_call = None

    @property
    def applied_revision(self) -> int | None:
        """The revision the agent has applied (and its listener written:
        its file holds it), which it reports when it renews; None before
        its first snapshot."""
        if not self.local_copy.synced:
            return None
        applied = getattr(self.listener, "applied", None)
        return self.local_copy.revision if applied is None else applied(self.local_copy)

    @property
    def server(self) -> tuple[str, int]:
        """The node followed: its notifier's (ip, port)."""
        return self.nodes[self._node][0]

    @property
    def source(self) -> Source:
        """The node followed: where to pull from."""
        return self.nodes[self._node][1]

    # Life

    def start(self) -> None:
        self._do(self.cycle.start(self.clock.seconds()))
        self._tick_call = self.clock.callLater(TICK, self._tick)

    def stop(self) -> None:
        for call in (self._tick_call, self._gap_timer, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._do(self.cycle.stop(self.clock.seconds()))
        if self._pulling is not None:
            self._pulling.cancel()      # its failure, now, is not news

    def _tick(self) -> None:
        self._do(self.cycle.tick(self.clock.seconds(), can_poll=self.local_copy.synced))
        if self.cycle.state is not State.UNSUBSCRIBED:
            self._tick_call = self.clock.callLater(TICK, self._tick)

    def _do(self, actions: list[Action], seq: int = 0, kind: str = "") -> None:
        """What the subscription cycle decided; *seq* and *kind* are those
        of the datagram that made it decide."""
        for action in actions:
            if action is Action.SUBSCRIBE or action is Action.SUBSCRIBE_OVER_TCP:
                self._subscribe()
            elif action is Action.UNSUBSCRIBE:
                if self.cycle.cookie is not None:
                    self._send({"t": "unsubscribe", "prefix": self.prefix,
                                "cookie": self.cycle.cookie}, padded=True)
            elif action is Action.PULL:
                self.pull()
            elif action is Action.RESYNC:
                if self.counters["resubscriptions"]:
                    self.log.info("new subscription {sub}; resynchronising", sub=self.cycle.sub)
                self._resync(seq)
            elif action is Action.ADOPT:
                # Its "subscribed" answers were lost: the socket serves one
                # prefix, and waiting for the next answer could take the
                # whole backoff.
                self.log.info("subscription {sub} adopted from a {kind}", sub=self.cycle.sub,
                              kind=kind)
                self._resync(seq)
            elif action is Action.CATCH_UP:
                self._announced(seq)
            elif action is Action.FOLLOW_NEXT_NODE:
                self._follow_next_node()
            elif action is Action.REPORT_SILENCE:
                # The server is down, restarted, or the path is lost: keep
                # the copy and subscribe again, backing off.
                self.log.warn("no word from the server for {seconds:.1f} s; subscribing again",
                              seconds=self.clock.seconds() - self.cycle.last_heard)

    def _subscribe(self) -> None:
        message = {"t": "subscribe", "prefix": self.prefix}
        if self.cycle.cookie is not None:
            message["cookie"] = self.cycle.cookie
        applied = self.applied_revision
        if applied is not None:
            message["applied"] = applied
        self.counters["subscribes"] += 1
        self._send(message, padded=True)
        if self.cycle.over_tcp and self.transport is not None:
            self._subscribe_over_tcp()

    def _subscribe_over_tcp(self) -> None:
        """Subscribe over XML-RPC: the server takes the host from the TCP
        connection, and the port is the agent's UDP socket's."""
        self.counters["tcp_subscribes"] += 1
        node = self._node
        d = self.source.subscribe(self.prefix, self.transport.getHost().port,
                                  self.applied_revision)

        def answered(description: dict[str, Any]) -> None:
            if node == self._node:
                self._on_subscribed(description)

        def failed(failure: Failure) -> None:
            if node != self._node or self.cycle.state is State.UNSUBSCRIBED:
                return
            self.log.warn("cannot subscribe over TCP either ({error})",
                          error=failure.getErrorMessage() or failure.type.__name__)
            self._do(self.cycle.tcp_failed(self.clock.seconds()))

        d.addCallbacks(answered, failed)

    def _resync(self, seq: int) -> None:
        """A new subscription: its numbers start afresh after *seq*, and
        what happened before it must be pulled."""
        self.counters["resubscriptions"] += 1
        self.sequence.restart(seq)
        self.pull(seq)

    def _follow_next_node(self) -> None:
        """Pull from the next node what this copy lacks (the cycle
        subscribes there)."""
        old = self.server
        self._node = (self._node + 1) % len(self.nodes)
        self.log.warn("node {old} does not answer; following {new}", old=old, new=self.server)
        self.counters["node_switches"] += 1
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._pull_backoff.reset()
        if self.local_copy.synced:
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
        self._do(self.cycle.cookie_arrived(cookie, self.clock.seconds()))

    def _on_subscribed(self, message: dict[str, Any]) -> None:
        if message["prefix"] != self.prefix:
            return
        lease, heartbeat = _seconds(message["lease"]), _seconds(message["heartbeat"])
        sub, seq = _sub_id(message["sub"]), _seq(message["seq"])
        self._do(self.cycle.subscribed(sub, lease, heartbeat, self.clock.seconds()), seq)

    def _on_heartbeat(self, message: dict[str, Any]) -> None:
        sub, seq = message["sub"], _seq(message["seq"])
        ours, actions = self.cycle.heard(sub, self.clock.seconds())
        if ours:
            self._do(actions, seq, "heartbeat")
            self._announced(seq)
            head = message.get("head")
            sequence = self.sequence
            if (type(head) is int and self.local_copy.synced and not sequence.pulling
                    and not sequence.held and sequence.last_seq >= seq):
                # Every change up to the store's revision has a number up to
                # seq, and all of those are applied: the copy is complete
                # at that revision, which is what the agent reports applied.
                self.local_copy.revision = max(self.local_copy.revision, head)

    def _on_event(self, message: dict[str, Any]) -> None:
        sub, seq = message["sub"], _seq(message["seq"])
        ours, actions = self.cycle.heard(sub, self.clock.seconds())
        if not ours:
            return
        if actions:
            # Taken up just now: the pull that starts covers this event.
            self._do(actions, seq, "event")
            return
        if not self.sequence.offer(seq, message):
            self.counters["duplicates"] += 1
            return
        self._drain()

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
        if not self.local_copy.synced:
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
        if not self.local_copy.synced:
            self.counters["snapshots"] += 1
            d = self.source.snapshot(self.prefix).addCallback(self._snapshot_arrived)
        else:
            self.counters["pulls"] += 1
            d = self.source.changes(self.prefix, since).addCallback(self._changes_arrived,
                                                                     since)
        self._pulling = d
        d.addCallbacks(self._pulled, self._pull_failed)

    def _snapshot_arrived(self, result: tuple[int, dict[str, Any]]) -> None:
        revision, items = result
        items = {key: value for key, value in items.items() if key.startswith(self.prefix)}
        changes = self.local_copy.replace(items, revision)
        self.listener.copy_changed(self.local_copy, changes)

    def _changes_arrived(self, result: tuple[int, list[Change]], since: int) -> None:
        revision, events = result
        local_copy = self.local_copy
        if revision < since:
            # The server's history went backwards (its store was replaced):
            # only a snapshot can be trusted.
            self.log.warn("server revision {revision} is behind ours ({since}); "
                          "taking a snapshot", revision=revision, since=since)
            local_copy.synced = False
            raise _Resnapshot()
        applied = []
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
        self._pulling = None
        self.sequence.pull_done()
        self._pull_backoff.reset()
        if self._pull_again:
            self.pull()
        else:
            self._drain()

    def _pull_failed(self, failure: Failure) -> None:
        self._pulling = None
        self.sequence.pull_failed()
        if self.cycle.state is State.UNSUBSCRIBED:
            return          # stopped: the pull was abandoned
        if failure.check(errors.Compacted):
            self.counters["compacted"] += 1
            if self.counters["compacted"] == 1:
                # A cluster node's history starts when the node does.
                self.log.info("the server's history starts after revision {revision}; "
                              "taking a snapshot of {prefix!r} (normal after a start)",
                              revision=self.local_copy.revision, prefix=self.prefix)
            else:
                self.log.warn("history compacted: the server no longer has the changes "
                              "after revision {revision}; taking a snapshot of {prefix!r}",
                              revision=self.local_copy.revision, prefix=self.prefix)
            self.local_copy.synced = False
            self.pull()
            return
        if failure.check(_Resnapshot):
            self.pull()
            return
        self.counters["pull_failures"] += 1
        delay = self._pull_backoff.next()
        self.log.warn("cannot pull from the server ({error}); retrying in {delay:.1f} s",
                      error=failure.getErrorMessage() or failure.type.__name__, delay=delay)
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

    noisy = False

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def startProtocol(self) -> None:
        self.agent.transport = self.transport

    def stopProtocol(self) -> None:
        self.agent.transport = None

    def datagramReceived(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.agent.received(datagram, address)

