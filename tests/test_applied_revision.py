"""What a subscriber applied, on a Clock: the registry keeps the revision
each subscriber reports and when it was last heard, and says its lag; the
agent reports the revision its copy (and its file) holds, which its
heartbeats bring up to the store's when nothing under its prefix changed;
a failed reload keeps the report at the last good file."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from kvconfig import errors
from kvconfig.agentoutput import FileOutput
from kvconfig.agentstate import LocalCopy
from kvconfig.limits import Limits
from kvconfig.subscriptions import Subscriptions

from agentworld import World
from stores import clocked_store


def test_the_registry_keeps_what_a_subscriber_applied_and_its_lag():
    clock, revision = Clock(), [10]
    subs = Subscriptions(Limits(), clock, lambda: revision[0])
    silent = subs.subscribe(("192.0.2.1", 4000), "app/")
    assert silent.applied is None and subs.lag(silent) is None
    clock.advance(5)
    reporting = subs.subscribe(("192.0.2.2", 4000), "app/", applied=7)
    assert (reporting.applied, reporting.last_heard, subs.lag(reporting)) == (7, 5, 3)
    assert subs.stats() == {"reporting": 1, "max_lag": 3}
    clock.advance(5)
    # A renewal without a report keeps the last one; with one, takes it.
    subs.subscribe(("192.0.2.2", 4000), "app/")
    assert (reporting.applied, reporting.last_heard) == (7, 10)
    subs.subscribe_peer(("192.0.2.1", 4000), "app/", "udp", applied=10)
    assert subs.lag(silent) == 0
    revision[0] = 12
    assert subs.stats() == {"reporting": 2, "max_lag": 5}


@pytest.mark.parametrize("applied", [-1, "7", 1.5, True, [1]])
def test_a_bad_applied_revision_is_refused(applied):
    subs = Subscriptions(Limits(), Clock(), lambda: 0)
    with pytest.raises(errors.InvalidArgument, match="applied must be a revision"):
        subs.subscribe(("192.0.2.1", 4000), "app/", applied=applied)


def test_the_agent_reports_its_revision_and_heartbeats_bring_it_to_the_stores():
    store = clocked_store(lease_seconds=6, heartbeat_seconds=1)
    world = World(store)
    world.run(0.5)
    store.put("app/a", 1)
    store.put("other/b", 1)
    store.put("other/c", 1)
    world.run(3)    # heartbeats, and a renewal (every 2 s)
    [subscription] = list(world.subscriptions)
    assert world.agent.applied_revision == store.revision == 3
    assert subscription.applied == 3 and world.subscriptions.lag(subscription) == 0


def test_a_lost_event_is_not_vouched_for_by_a_heartbeat():
    """A heartbeat whose seq the agent has not applied up to does not move
    its revision: the pull that the gap starts does."""
    store = clocked_store(heartbeat_seconds=1)
    world = World(store)
    world.run(0.5)
    world.network.drop = 1.0     # the event datagram is lost, and heartbeats too
    store.put("app/a", 1)
    world.run(0.01)
    assert world.agent.local_copy.revision == 0
    world.network.drop = 0.0
    world.run(3)
    assert world.agent.local_copy.items == {"app/a": 1}
    assert world.agent.applied_revision == 1


def test_file_output_reports_the_revision_its_file_holds(tmp_path):
    clock = Clock()
    results = []

    def run(command):
        from twisted.internet.defer import succeed
        return succeed(results.pop(0))

    output = FileOutput(str(tmp_path / "out.json"), clock, "reload", debounce=0.1, run=run)
    copy = LocalCopy({"app/a": 1}, 5, synced=True)
    results.append(None)
    output.copy_changed(copy, [object()])
    assert output.applied(copy) == 0        # not written yet
    clock.advance(0.1)
    assert output.applied(copy) == 5
    copy.revision = 9                        # (a heartbeat: the file holds 9 too)
    assert output.applied(copy) == 9
    copy.items = {"app/a": 2}
    copy.revision = 10
    results.append("exit status 1")          # this reload fails
    output.copy_changed(copy, [object()])
    clock.advance(0.1)
    assert output.counters["restores"] == 1
    assert output.applied(copy) == 5
