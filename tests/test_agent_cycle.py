"""The agent's subscription cycle (kvconfig.agentstate.SubscriptionCycle) on a
Clock: every line of its transition table, its timing (backoff, renewal,
silence, polling, moving on), and the agent shell carrying out its moves
between the nodes of a cluster."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from kvconfig.agent import TICK, Agent
from kvconfig.agentstate import (
    SWITCH_AFTER,
    TRANSITIONS,
    Action,
    Event,
    State,
    SubscriptionCycle,
)
from kvconfig.udpwire import Sealer

from agentworld import Recorder

S, E, A = State, Event, Action
LEASE, HEARTBEAT = 30.0, 5.0


def cycle_in(state: State, nodes: int = 2) -> tuple[SubscriptionCycle, Clock]:
    """A cycle brought into *state* by its inputs, on a Clock at 100 s."""
    clock = Clock()
    clock.advance(100)
    cycle = SubscriptionCycle(nodes, max_backoff=30)
    if state is S.UNSUBSCRIBED:
        return cycle, clock
    cycle.start(clock.seconds())
    if state in (S.OVER_TCP, S.NEXT_NODE):
        while cycle.state is not S.OVER_TCP:
            clock.advance(cycle.renew_at - clock.seconds())
            cycle.tick(clock.seconds(), can_poll=False)
        if state is S.NEXT_NODE:
            cycle.tcp_failed(clock.seconds())
    if state in (S.AWAITING_COOKIE, S.OVER_TCP, S.NEXT_NODE):
        return cycle, clock
    cycle.cookie_arrived("cookie-1", clock.seconds())
    if state is S.SUBSCRIBING:
        return cycle, clock
    cycle.subscribed("sub-1", LEASE, HEARTBEAT, clock.seconds())
    if state is S.SILENT:
        clock.advance(3 * HEARTBEAT + 1.01)
        cycle.tick(clock.seconds(), can_poll=False)
    assert cycle.state is state
    return cycle, clock


def provoke(cycle: SubscriptionCycle, clock: Clock, event: Event) -> list[Action]:
    """Make *event* happen to *cycle* through its inputs; what it returns."""
    def now() -> float:
        return clock.seconds()

    def until(moment: float) -> None:
        clock.advance(max(moment - now(), 0))

    if event is E.START:
        return cycle.start(now())
    if event is E.STOP:
        return cycle.stop(now())
    if event is E.COOKIE:
        return cycle.cookie_arrived("cookie-2", now())
    if event is E.RENEWED:
        return cycle.subscribed(cycle.sub, LEASE, HEARTBEAT, now())
    if event is E.NEW_SUBSCRIPTION:
        return cycle.subscribed("sub-2", LEASE, HEARTBEAT, now())
    if event is E.UNKNOWN_SUBSCRIPTION:
        return cycle.heard("sub-2", now())[1]
    if event is E.SILENCE:
        until(cycle.last_heard + 3 * cycle.heartbeat + 1.01)
        return cycle.tick(now(), can_poll=False)
    if event in (E.RENEW_DUE, E.RETRY_DUE):
        until(cycle.renew_at)
        return cycle.tick(now(), can_poll=False)
    if event is E.UNANSWERED:
        cycle.unanswered = SWITCH_AFTER       # the attempts before went unanswered
        cycle.over_tcp = False
        until(cycle.renew_at)
        return cycle.tick(now(), can_poll=False)
    if event is E.TCP_FAILED:
        return cycle.tcp_failed(now())
    if event is E.POLL_DUE:
        if cycle.renew_at <= cycle.next_poll:
            # An attempt first, so that the poll is all that is due.
            until(cycle.renew_at)
            cycle.tick(now(), can_poll=False)
        until(cycle.next_poll)
        return cycle.tick(now(), can_poll=True)
    raise AssertionError(event)


@pytest.mark.parametrize("state, event", list(TRANSITIONS), ids=lambda x: x.value)
def test_each_transition(state, event):
    """Each line of the table: the event, provoked through the cycle's
    inputs in that state, leads to the line's state and actions."""
    cycle, clock = cycle_in(state)
    after, actions = TRANSITIONS[state, event]
    returned = provoke(cycle, clock, event)
    assert cycle.state is after
    assert returned[:len(actions)] == list(actions)
    if event is E.SILENCE:
        # The subscribe that follows at once: silence makes it due now.
        assert returned[len(actions):] == [A.SUBSCRIBE]
    else:
        assert returned == list(actions)


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_events_without_a_line_change_nothing(state):
    for event in Event:
        if (state, event) in TRANSITIONS or event in (E.SILENCE, E.RENEW_DUE, E.RETRY_DUE,
                                                      E.UNANSWERED, E.POLL_DUE):
            continue
        cycle, clock = cycle_in(state)
        before = vars(cycle).copy()
        assert provoke(cycle, clock, event) == []
        assert cycle.state is state
        assert {k: v for k, v in vars(cycle).items() if k != "backoff"} == \
            {k: v for k, v in before.items() if k != "backoff"}


def test_unanswered_subscribes_back_off_from_one_second_to_the_maximum():
    """Unanswered subscribes back off; after SWITCH_AFTER of them over UDP,
    the agent subscribes over TCP as well, and goes on backing off."""
    cycle, clock = cycle_in(S.AWAITING_COOKIE, nodes=1)
    attempts = []
    for _ in range(400):
        clock.advance(TICK)
        actions = cycle.tick(clock.seconds(), can_poll=False)
        if actions in ([A.SUBSCRIBE], [A.SUBSCRIBE_OVER_TCP]):
            attempts.append((clock.seconds(), actions[0]))
    moments = [moment for moment, _ in attempts]
    gaps = [round(b - a, 1) for a, b in zip([100.0, *moments], moments, strict=False)]
    assert gaps[:7] == [1, 1, 2, 4, 8, 16, 30]
    assert set(gaps[6:]) == {30}
    # The first went out at start; the third after it is SWITCH_AFTER + 1.
    assert [action for _, action in attempts[:5]] == [A.SUBSCRIBE] * 2 + [
        A.SUBSCRIBE_OVER_TCP, A.SUBSCRIBE, A.SUBSCRIBE]
    assert cycle.state is S.OVER_TCP and cycle.over_tcp    # one node: nowhere to move
    assert cycle.tcp_failed(clock.seconds()) == []         # ... even if TCP fails too


def test_a_subscription_is_renewed_every_third_of_its_lease_and_answers_reset_it():
    cycle, clock = cycle_in(S.SUBSCRIBED)
    renewals = []
    for _ in range(int(60 / TICK)):
        clock.advance(TICK)
        if cycle.tick(clock.seconds(), can_poll=True) == [A.SUBSCRIBE]:
            renewals.append(clock.seconds())
            assert cycle.subscribed("sub-1", LEASE, HEARTBEAT, clock.seconds()) == \
                [A.CATCH_UP]
    assert renewals == [110.0, 120.0, 130.0, 140.0, 150.0, 160.0]
    assert cycle.state is S.SUBSCRIBED and cycle.unanswered == 0


def test_silence_is_three_heartbeats_and_a_second_without_a_word():
    cycle, clock = cycle_in(S.SUBSCRIBED)
    clock.advance(3 * HEARTBEAT)
    assert cycle.heard("sub-1", clock.seconds()) == (True, [])
    clock.advance(3 * HEARTBEAT + 1)
    assert cycle.tick(clock.seconds(), can_poll=False) == [A.SUBSCRIBE]   # a renewal
    assert cycle.state is S.SUBSCRIBED
    clock.advance(0.01)
    assert cycle.tick(clock.seconds(), can_poll=False) == [A.REPORT_SILENCE, A.SUBSCRIBE]
    assert cycle.state is S.SILENT and cycle.sub is None
    assert cycle.cookie == "cookie-1"            # kept: the node may still know it
    # After silence every "subscribed" is a new subscription: what happened
    # while the agent heard nothing must be pulled.
    assert cycle.subscribed("sub-1", LEASE, HEARTBEAT, clock.seconds()) == [A.RESYNC]


def test_the_agent_asks_over_tcp_then_moves_to_the_next_node():
    """Unanswered UDP subscribes make the agent subscribe over TCP; when that
    fails too, it moves to the next node (without the old node's cookie),
    and round the nodes while none answers."""
    cycle, clock = cycle_in(S.SUBSCRIBING)
    over_tcp = []
    for _ in range(40):
        clock.advance(TICK)
        actions = cycle.tick(clock.seconds(), can_poll=False)
        if A.SUBSCRIBE_OVER_TCP in actions:
            over_tcp.append((clock.seconds(), actions))
            assert cycle.tcp_failed(clock.seconds()) == [A.FOLLOW_NEXT_NODE, A.SUBSCRIBE]
            assert cycle.state is S.NEXT_NODE and not cycle.over_tcp
    assert over_tcp[0] == (104.0, [A.SUBSCRIBE_OVER_TCP])
    assert cycle.cookie is None                  # the next node never issued it
    assert len(over_tcp) >= 2


def test_a_cookie_after_subscribing_over_tcp_goes_back_to_udp():
    cycle, clock = cycle_in(S.OVER_TCP, nodes=1)
    assert cycle.subscribed("sub-t", LEASE, HEARTBEAT, clock.seconds()) == [A.RESYNC]
    assert cycle.state is S.SUBSCRIBED and cycle.over_tcp   # renewals over TCP too
    assert cycle.cookie_arrived("cookie-3", clock.seconds()) == [A.SUBSCRIBE]
    assert not cycle.over_tcp


def test_polls_only_when_the_copy_can_be_pulled_and_at_the_subscribe_backoff():
    cycle, clock = cycle_in(S.AWAITING_COOKIE, nodes=1)
    polls = []
    for _ in range(int(20 / TICK)):
        clock.advance(TICK)
        actions = cycle.tick(clock.seconds(), can_poll=clock.seconds() >= 103)
        if A.PULL in actions:
            polls.append(clock.seconds())
    # Attempts at 101, 102, 104, 112 (the backoff doubling); each poll waits
    # the backoff of its moment: 103, 107, 115.
    assert polls == [103.0, 107.0, 115.0]
    cycle.subscribed("sub-1", LEASE, HEARTBEAT, clock.seconds())
    clock.advance(TICK)
    assert A.PULL not in cycle.tick(clock.seconds(), can_poll=True)


def test_a_subscription_taken_up_unnamed_is_renewed_at_once():
    cycle, clock = cycle_in(S.SUBSCRIBING)
    assert cycle.heard("sub-9", clock.seconds()) == (True, [A.ADOPT])
    assert cycle.sub == "sub-9" and cycle.renew_at == clock.seconds()
    clock.advance(TICK)
    assert cycle.tick(clock.seconds(), can_poll=False) == [A.SUBSCRIBE]
    assert cycle.heard("sub-8", clock.seconds()) == (False, [])


def test_a_subscription_cannot_be_taken_up_without_a_cookie():
    """Only an address that proved it receives (the cookie) may have a
    subscription: a heartbeat naming one before that is ignored."""
    cycle, clock = cycle_in(S.AWAITING_COOKIE)
    assert cycle.heard("sub-9", clock.seconds()) == (False, [])
    assert cycle.heard(None, clock.seconds()) == (False, [])
    assert cycle.state is S.AWAITING_COOKIE and cycle.sub is None


# The shell carrying out the cycle's moves


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, tuple[str, int]]] = []

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "10.0.0.9", 40000)

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.sent.append((json.loads(datagram), address))


class Source:
    """Answers snapshots at once; counts the calls."""

    def __init__(self, answer: dict | None = None) -> None:
        self.snapshots = self.changes_calls = 0
        self.tcp_subscribes: list[tuple[str, int]] = []
        self.answer = answer

    def snapshot(self, prefix: str) -> Deferred:
        self.snapshots += 1
        return succeed((7, {"app/k": 1}))

    def changes(self, prefix: str, since: int) -> Deferred:
        self.changes_calls += 1
        return succeed((7, []))

    def subscribe(self, prefix: str, udp_port: int, applied: int | None = None) -> Deferred:
        self.tcp_subscribes.append((prefix, udp_port))
        if self.answer is None:
            return fail(ConnectionRefusedError("the node is down"))
        return succeed(self.answer)


def test_the_agent_follows_the_next_node_when_its_node_does_not_answer():
    """Two nodes, the first silent: after the unanswered subscribes (and a
    subscribe over TCP that fails) the agent subscribes to the second
    (without the first's cookie) and pulls from it from then on."""
    clock = Clock()
    first, second = ("10.0.0.1", 15002), ("10.0.0.2", 15002)
    sources = Source(), Source()
    agent = Agent("app/", first, sources[0], Recorder(), clock, Sealer(None, clock),
                  alternates=[(second, sources[1])])
    agent.transport = transport = Transport()
    agent.start()
    assert agent.cycle.state is S.AWAITING_COOKIE and sources[0].snapshots == 1
    # The first node answers with a cookie, then nothing more.
    agent.received(json.dumps({"v": 1, "t": "cookie", "cookie": "c1"}).encode(), first)
    # (The snapshot's revision, 7, is reported as applied.)
    assert transport.sent[-1] == ({"v": 1, "t": "subscribe", "prefix": "app/", "cookie": "c1",
                                   "applied": 7, "pad": transport.sent[-1][0]["pad"]}, first)
    while agent.server == first:
        clock.advance(TICK)
        assert clock.seconds() < 10
    assert agent.cycle.state is S.NEXT_NODE and agent.counters["node_switches"] == 1
    assert sources[0].tcp_subscribes == [("app/", 40000)]
    message, address = transport.sent[-1]
    assert address == second and message["t"] == "subscribe" and "cookie" not in message
    assert sources[1].changes_calls == 1         # caught up from the next node
    # Datagrams from the node it left are no longer its server's.
    agent.received(json.dumps({"v": 1, "t": "cookie", "cookie": "c9"}).encode(), first)
    assert agent.counters["foreign"] == 1 and agent.cycle.cookie is None
    agent.received(json.dumps({"v": 1, "t": "cookie", "cookie": "c2"}).encode(), second)
    agent.received(json.dumps({"v": 1, "t": "subscribed", "sub": "s2", "prefix": "app/",
                               "seq": 0, "rev": 7, "head": 7, "lease": 30,
                               "heartbeat": 2}).encode(), second)
    assert agent.cycle.state is S.SUBSCRIBED and agent.cycle.sub == "s2"
    agent.stop()
    assert transport.sent[-1][0]["t"] == "unsubscribe" and transport.sent[-1][1] == second
    assert agent.cycle.state is S.UNSUBSCRIBED
    assert not clock.getDelayedCalls()


def test_the_agent_subscribes_over_tcp_when_its_udp_handshake_goes_unanswered():
    """One node whose cookie answers never come (a filter, a cookie flood
    from the agent's network): after SWITCH_AFTER subscribes the agent
    calls subscribe() over TCP for its own UDP port, takes the subscription
    it answers, and renews over TCP (and UDP) from then on."""
    clock = Clock()
    node = ("10.0.0.1", 15002)
    source = Source({"sub": "t1", "prefix": "app/", "seq": 0, "rev": 7, "head": 7,
                     "lease": 30, "heartbeat": 2})
    agent = Agent("app/", node, source, Recorder(), clock, Sealer(None, clock))
    agent.transport = transport = Transport()
    agent.start()
    while agent.cycle.state is not S.SUBSCRIBED:
        clock.advance(TICK)
        assert clock.seconds() < 10
    assert source.tcp_subscribes == [("app/", 40000)] and agent.cycle.sub == "t1"
    assert agent.counters["tcp_subscribes"] == 1
    clock.advance(10.01)                         # a third of the lease
    agent.received(json.dumps({"v": 1, "t": "heartbeat", "sub": "t1", "seq": 0, "rev": 7,
                               "head": 7}).encode(), node)
    assert len(source.tcp_subscribes) == 2 and transport.sent[-1][0]["t"] == "subscribe"
    agent.stop()
