"""A server and agents on one Clock, joined by a network that can lose,
duplicate and reorder datagrams: for testing the agent's bookkeeping
deterministically."""

from __future__ import annotations

import json
import random

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred

from kvconfig.agent import Agent, Change
from kvconfig.notifier import Notifier
from kvconfig.subscriptions import Subscriptions
from kvconfig.udpwire import Sealer

SERVER = ("127.0.0.1", 15002)
AGENT = ("127.0.0.1", 40000)


class Network:
    """Carries datagrams between the notifier and the agent on the clock.

    Each datagram, either way, is dropped with probability *drop*, delivered
    twice with *duplicate*, and held back by up to *delay* seconds
    with *reorder* (otherwise after *latency*).
    """

    def __init__(self, clock, rng: random.Random, drop=0.0, duplicate=0.0, reorder=0.0,
                 latency=0.0005, delay=0.05) -> None:
        self.clock, self.rng = clock, rng
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.latency, self.delay = latency, delay
        self.endpoints: dict[tuple[str, int], object] = {}
        self.sent = self.dropped = self.duplicated = self.reordered = 0
        self.up = True
        #: Datagrams for which this returns True are dropped too.
        self.drop_if = lambda datagram: False

    def transport(self, source: tuple[str, int]) -> _Transport:
        return _Transport(self, source)

    def carry(self, datagram: bytes, source, destination) -> None:
        self.sent += 1
        if not self.up or self.rng.random() < self.drop or self.drop_if(datagram):
            self.dropped += 1
            return
        copies = 1
        if self.rng.random() < self.duplicate:
            copies, self.duplicated = 2, self.duplicated + 1
        for _ in range(copies):
            wait = self.latency
            if self.rng.random() < self.reorder:
                wait, self.reordered = self.rng.uniform(0, self.delay), self.reordered + 1
            self.clock.callLater(wait, self._deliver, datagram, source, destination)

    def _deliver(self, datagram, source, destination) -> None:
        receiver = self.endpoints.get(destination)
        if receiver is not None and self.up:
            receiver.received(datagram, source)


class _Transport:
    def __init__(self, network: Network, source) -> None:
        self.network, self.source = network, source

    def write(self, datagram: bytes, address) -> None:
        self.network.carry(datagram, self.source, address)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.source)


class StoreSource:
    """The agent's pulls, answered from the store after *latency* seconds
    (what the server's changes() and list() return), or failing while
    ``up`` is False."""

    def __init__(self, store, clock, latency=0.002, subscriptions=None) -> None:
        self.store, self.clock, self.latency = store, clock, latency
        self.up = True
        self.calls = 0
        #: The server's subscription registry, for subscribes over TCP (a
        #: function: the world replaces it when the server restarts).
        self.subscriptions = subscriptions

    def _later(self, answer) -> Deferred:
        self.calls += 1
        d: Deferred = Deferred()

        def run() -> None:
            if not self.up:
                d.errback(ConnectionRefusedError("server down"))
                return
            try:
                result = answer()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)

        self.clock.callLater(self.latency, run)
        return d

    def changes(self, prefix: str, since: int) -> Deferred:
        def answer():
            revision, events = self.store.changes(prefix, since)
            return revision, [
                Change(e.type, e.key, e.revision,
                       None if e.kv is None else json.loads(e.kv.raw))
                for e in events]
        return self._later(answer)

    def subscribe(self, prefix: str, udp_port: int, applied: int | None = None) -> Deferred:
        """subscribe() over TCP, from the agent's host."""
        def answer():
            registry = self.subscriptions()
            return registry.description(
                registry.subscribe_peer((AGENT[0], udp_port), prefix, "tcp"))
        return self._later(answer)

    def snapshot(self, prefix: str) -> Deferred:
        def answer():
            revision = self.store.revision
            return revision, expected_copy(self.store, prefix)
        return self._later(answer)


def expected_copy(store, prefix: str) -> dict:
    """The server's keys under *prefix*, as the agent keeps them (every
    page of the listing)."""
    return {kv.key: json.loads(kv.raw) for kv in store.backend.keyspace.range(prefix)}


class Recorder:
    """A listener that keeps every batch of changes it was given."""

    def __init__(self) -> None:
        self.batches: list[list[Change]] = []

    def copy_changed(self, local_copy, changes) -> None:
        self.batches.append(list(changes))


class World:
    """A store, its notifier and one agent on *prefix*, on the store's clock."""

    def __init__(self, store, prefix: str = "app/", secret: bytes | None = None,
                 seed: int = 0, listener=None, **network) -> None:
        self.store = store
        self.clock = store.backend.clock
        self.rng = random.Random(seed)
        self.network = Network(self.clock, self.rng, **network)
        self.secret = secret
        self.notifier = self.start_notifier()
        self.source = StoreSource(store, self.clock, subscriptions=lambda: self.subscriptions)
        self.listener = listener or Recorder()
        self.agent = Agent(prefix, SERVER, self.source, self.listener, self.clock,
                           Sealer(secret, self.clock))
        self.agent.transport = self.network.transport(AGENT)
        self.network.endpoints[AGENT] = self.agent
        self.agent.start()

    def start_notifier(self) -> Notifier:
        self.subscriptions = Subscriptions(self.store.limits, self.clock,
                                           lambda: self.store.revision)
        notifier = Notifier(self.store, self.subscriptions, self.store.limits, self.clock,
                            self.secret)
        notifier.transport = self.network.transport(SERVER)
        self.network.endpoints[SERVER] = notifier
        notifier.start()
        return notifier

    def restart_server(self) -> None:
        """A new notifier: no subscriptions, a new cookie key (the store,
        being durable, keeps its keys and revisions)."""
        self.notifier.stop()
        self.notifier = self.start_notifier()

    def until_subscribed(self, limit: float = 30) -> None:
        """Run until the agent holds a subscription (lost handshakes are
        retried with backoff)."""
        waited = 0.0
        while self.agent.cycle.sub is None:
            assert waited < limit, "the agent never subscribed"
            self.run(0.1)
            waited += 0.1

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
