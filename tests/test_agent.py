"""The agent's bookkeeping on a Clock: subscribing, gaps, pulls, restarts.

A store, its notifier and an agent talk through an in-memory network that
can drop, duplicate and reorder datagrams (tests/agentworld.py); pulls are
answered from the same store.
"""

from __future__ import annotations

import json
import random

import pytest
from twisted.logger import Logger, LogLevel, formatEvent

from kvconfig.agentstate import MAX_HELD, LocalCopy

from agentworld import World, expected_copy
from stores import clocked_store


def random_writes(world: World, count: int, seed: int, prefix: str = "app/") -> None:
    """*count* random puts and deletes, a few outside the prefix, some with
    values too large for a datagram, committed one reactor turn at a time
    with small random pauses."""
    rng = random.Random(seed)
    store, clock = world.store, world.clock
    keys = [f"{prefix}k{i}" for i in range(40)] + ["other/x", "apple"]
    for n in range(count):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.2:
            store.delete(key)
        elif roll < 0.25:
            store.put(key, "x" * rng.randint(1200, 3000))
        else:
            store.put(key, {"n": n, "bytes": bytes([n % 256]), "list": [n, str(n)]})
        clock.advance(0)        # commit
        clock.advance(rng.choice([0, 0, 0.0001, 0.001, 0.005]))


def test_agent_takes_a_snapshot_then_follows_datagrams():
    store = clocked_store()
    store.put("app/a", 1)
    store.put("other/b", 2)
    store.backend.clock.advance(0)
    world = World(store)
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/a": 1}
    assert world.agent.cycle.sub is not None
    pulls = world.source.calls
    store.put("app/c", [1, 2])
    store.delete("app/a")
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/c": [1, 2]}
    assert world.agent.local_copy.revision == store.revision
    # Both came by datagram: no pull was needed.
    assert world.source.calls == pulls
    assert world.agent.counters["applied"] == 2


def test_a_value_too_large_for_a_datagram_is_pulled():
    store = clocked_store()
    world = World(store)
    world.run(0.1)
    pulls = world.source.calls
    store.put("app/big", "x" * 5000)
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/big": "x" * 5000}
    assert world.source.calls == pulls + 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_copy_converges_through_20_percent_loss_duplication_and_reordering(seed):
    """1,000 random writes while 20% of datagrams each way are dropped, 20%
    duplicated and 20% reordered: the copy ends equal to the server's
    prefix, at the server's revision."""
    store = clocked_store()
    world = World(store, seed=seed, drop=0.2, duplicate=0.2, reorder=0.2)
    world.until_subscribed()
    random_writes(world, 1000, seed)
    world.run(3 * world.agent.cycle.heartbeat)
    assert world.network.dropped > 100 and world.network.reordered > 100
    assert world.agent.local_copy.items == expected_copy(store, "app/")
    assert world.agent.local_copy.revision == store.revision
    counters = world.agent.counters
    assert counters["gaps"] > 0 and counters["duplicates"] > 0


def test_copy_converges_with_a_signed_lossy_link():
    store = clocked_store()
    world = World(store, secret=b"s3cret", seed=7, drop=0.2, duplicate=0.2, reorder=0.2)
    world.until_subscribed()
    random_writes(world, 300, 7)
    world.run(6)
    assert world.agent.local_copy.items == expected_copy(store, "app/")
    # Duplicates were refused as replays before the sequence check saw them.
    assert world.agent.sealer.dropped["replayed"] > 0
    assert world.notifier.sealer.dropped["replayed"] >= 0


def test_compacted_history_falls_back_to_a_snapshot():
    store = clocked_store(history_events=20)
    world = World(store, seed=4)
    world.run(0.5)
    world.network.up = False            # the agent hears nothing
    random_writes(world, 200, 4)
    world.network.up = True
    world.run(3 * world.agent.cycle.heartbeat + 2)
    assert world.agent.local_copy.items == expected_copy(store, "app/")
    assert world.agent.counters["snapshots"] >= 2


def test_tail_loss_is_found_by_the_heartbeat():
    store = clocked_store()
    world = World(store)
    world.run(0.5)
    world.network.drop = 1.0            # the last events are lost ...
    store.put("app/last", "lost")
    world.run(0.1)
    world.network.drop = 0.0
    assert "app/last" not in world.agent.local_copy.items
    world.run(world.agent.cycle.heartbeat + 0.1)   # ... until the next heartbeat
    assert world.agent.local_copy.items == {"app/last": "lost"}
    assert world.agent.counters["gaps"] == 1


def test_server_restart_resubscribes_and_resynchronises():
    store = clocked_store()
    world = World(store)
    world.run(0.5)
    old = world.agent.cycle.sub
    store.put("app/before", 1)
    world.run(0.1)
    world.restart_server()
    # Written while the new server has no subscription for the agent.
    store.put("app/during", 2)
    store.delete("app/before")
    world.run(3 * world.agent.cycle.heartbeat + 2)
    assert world.agent.cycle.sub not in (None, old)
    assert world.agent.local_copy.items == {"app/during": 2}
    store.put("app/after", 3)
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/during": 2, "app/after": 3}


def test_a_subscription_whose_answers_are_lost_is_adopted_from_a_heartbeat():
    """The server holds the agent's subscription but every "subscribed"
    answer is lost: the agent takes it up from the first heartbeat instead
    of staying deaf through its backoff."""
    store = clocked_store()
    world = World(store)
    world.network.drop_if = lambda datagram: b'"t":"subscribed"' in datagram
    world.run(0.5)
    assert world.agent.cycle.sub is None
    assert world.notifier.stats()["subscriptions"] == 1
    world.run(world.agent.cycle.heartbeat)
    assert world.agent.cycle.sub is not None
    store.put("app/k", "v")
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/k": "v"}


def test_server_down_backs_off_then_picks_up_where_it_left_off():
    store = clocked_store()
    world = World(store)
    world.run(0.5)
    world.network.up = world.source.up = False
    store.put("app/x", "while down")
    world.run(60)
    agent = world.agent
    assert agent.cycle.sub is None
    # Subscribe attempts backed off: far fewer than one per tick.
    attempts = agent.counters["subscribes"]
    world.run(60)
    assert agent.counters["subscribes"] - attempts <= 60 / agent.max_backoff + 2
    world.network.up = world.source.up = True
    world.run(agent.max_backoff + 5)
    assert agent.cycle.sub is not None
    assert agent.local_copy.items == {"app/x": "while down"}


def test_pull_failures_retry_with_backoff():
    store = clocked_store()
    world = World(store)
    world.source.up = False
    world.run(10)
    failures = world.agent.counters["pull_failures"]
    # 0.1, 0.2, 0.4 ... doubling: about log2(10 / 0.1) attempts in 10 s.
    assert 4 <= failures <= 9
    world.source.up = True
    store.put("app/k", "v")
    world.run(31)
    assert world.agent.local_copy.items == {"app/k": "v"}


def test_lease_is_renewed_before_it_expires():
    store = clocked_store(lease_seconds=6)
    world = World(store)
    world.run(0.5)
    sub = world.agent.cycle.sub
    world.run(60)
    assert world.agent.cycle.sub == sub
    assert world.subscriptions.counters["expired"] == 0
    assert world.subscriptions.counters["renewals"] >= 60 // 2 - 2


def test_a_store_that_went_back_in_time_is_resnapshotted():
    store = clocked_store()
    world = World(store)
    world.run(0.5)
    for n in range(5):
        store.put(f"app/{n}", n)
    world.run(0.1)
    assert len(world.agent.local_copy.items) == 5
    # The server comes back on an empty store: its revisions restart.
    fresh = clocked_store(clock=world.clock)
    fresh.put("app/new", "only")
    world.clock.advance(0)
    world.store = world.source.store = fresh
    world.restart_server()
    world.run(3 * world.agent.cycle.heartbeat + 2)
    assert world.agent.local_copy.items == {"app/new": "only"}


def test_garbage_and_foreign_datagrams_change_nothing():
    store = clocked_store()
    store.put("app/a", 1)
    store.backend.clock.advance(0)
    world = World(store)
    world.run(0.5)
    agent = world.agent
    rng = random.Random(5)
    for size in range(0, 3000, 7):
        agent.received(rng.randbytes(size), ("127.0.0.1", 15002))
    sub, next_seq = agent.cycle.sub, agent.sequence.last_seq + 1
    for message in [{"v": 1, "t": "event", "sub": sub, "seq": "x"},
                    {"v": 1, "t": "event", "sub": sub, "seq": next_seq},
                    {"v": 1, "t": "heartbeat"}, {"v": 1, "t": "nonsense"}, [1, 2],
                    {"v": 2, "t": "event"}]:
        agent.received(json.dumps(message).encode(), ("127.0.0.1", 15002))
    forged = {"v": 1, "t": "event", "sub": agent.cycle.sub, "seq": agent.sequence.last_seq + 1,
              "rev": 99, "op": "put", "key": "app/evil", "value": 1}
    agent.received(json.dumps(forged).encode(), ("10.9.9.9", 15002))
    assert agent.counters["foreign"] == 1
    world.run(1)
    assert agent.local_copy.items == {"app/a": 1}
    assert agent.sealer.dropped["malformed"] > 400


def test_without_the_secret_forged_events_are_refused():
    store = clocked_store()
    world = World(store, secret=b"k1")
    world.run(0.5)
    agent = world.agent
    forged = {"v": 1, "t": "event", "sub": agent.cycle.sub, "seq": agent.sequence.last_seq + 1,
              "rev": 99, "op": "put", "key": "app/evil", "value": 1}
    agent.received(json.dumps(forged).encode(), ("127.0.0.1", 15002))
    agent.received(json.dumps(forged).encode() + b"\n" + b"0" * 64, ("127.0.0.1", 15002))
    assert agent.sealer.dropped["unsigned"] == 1
    assert agent.sealer.dropped["bad_signature"] == 1
    world.run(1)
    assert agent.local_copy.items == {}


def test_held_datagrams_are_bounded():
    store = clocked_store(max_send_rate=100_000)
    world = World(store, reorder=0.0)
    world.run(0.5)
    agent = world.agent
    world.source.up = False             # pulls fail: the gap cannot close
    world.network.drop = 0.0
    # Lose one datagram, then send many more than can be held.
    world.network.up = False
    store.put("app/lost", 0)
    world.clock.advance(0)
    world.network.up = True
    for n in range(MAX_HELD + 100):
        store.put("app/k", n)
        world.clock.advance(0)
    world.run(0.2)
    assert len(agent.sequence.held) <= MAX_HELD
    world.source.up = True
    world.run(35)
    assert agent.local_copy.items == expected_copy(store, "app/")


def test_local_copy_replace_reports_differences():
    local_copy = LocalCopy({"a": 1, "b": 2}, 5)
    changes = local_copy.replace({"b": 2, "c": 3, "a": 0}, 9)
    assert {(c.op, c.key) for c in changes} == {("put", "c"), ("put", "a")}
    changes = local_copy.replace({}, 10)
    assert {(c.op, c.key) for c in changes} == {("delete", "a"), ("delete", "b"),
                                                ("delete", "c")}
    assert local_copy.revision == 10



def test_one_true_and_one_point_zero_are_different_values():
    """JSON tells 1, 1.0 and true apart, and so must the local copy (Python's
    == does not)."""
    store = clocked_store()
    world = World(store)
    world.until_subscribed()
    for value in (1, True, 1.0, {"a": 1}, {"a": True}):
        store.put("app/x", value)
        world.run(0.1)
        assert json.dumps(world.agent.local_copy.items) == json.dumps({"app/x": value})



def test_stopping_abandons_a_pull_under_way_without_complaint():
    """Stopped while its first snapshot is under way (as ``--count`` stops
    it), the agent neither logs the abandoned pull as a failure nor retries."""
    store = clocked_store()
    world = World(store)
    events: list[dict] = []
    world.agent.log = Logger(observer=events.append)
    world.agent.stop()
    world.source.up = False         # the process exits: its connection is lost
    world.run(1)
    assert world.agent.counters["pull_failures"] == 0
    assert [formatEvent(event) for event in events] == []
    assert world.source.calls == 1 and world.agent.local_copy.items == {}


def test_the_first_compacted_history_is_news_and_the_next_a_warning():
    """A node's history starting after the copy is normal once (a cluster
    node's history starts with the node): logged as information.  Falling
    behind the history again is worth a warning."""
    store = clocked_store(history_events=20)
    world = World(store, seed=4)
    events: list[dict] = []
    world.agent.log = Logger(observer=events.append)
    world.run(0.5)
    for _ in range(2):
        world.network.up = False
        random_writes(world, 100, 4)
        world.network.up = True
        world.run(3 * world.agent.cycle.heartbeat + 2)
    assert world.agent.local_copy.items == expected_copy(store, "app/")
    snapshots = [(event["log_level"], formatEvent(event)) for event in events
                 if "taking a snapshot" in formatEvent(event)]
    assert [level for level, _ in snapshots] == [LogLevel.info, LogLevel.warn], snapshots
    assert "normal" in snapshots[0][1] and "compacted" not in snapshots[0][1]


def test_an_agent_whose_udp_subscribes_are_lost_subscribes_over_tcp():
    """Every subscribe datagram from the agent is lost (a filter; or the
    cookie answers shut out by a flood from its network): it subscribes
    over TCP instead, and follows the prefix by datagrams all the same."""
    store = clocked_store()
    world = World(store)
    world.network.drop_if = lambda datagram: b'"t":"subscribe"' in datagram
    world.run(10)
    assert world.agent.cycle.sub is not None
    assert world.agent.counters["tcp_subscribes"] >= 1
    store.put("app/x", "over tcp")
    world.run(0.1)
    assert world.agent.local_copy.items == {"app/x": "over tcp"}
    assert world.agent.counters["applied"] == 1   # by datagram, not a pull
    world.run(60)                                 # renewed over TCP: still held
    assert len(world.subscriptions) == 1 and world.subscriptions.counters["expired"] == 0
