"""
The etcd backend's health (kvconfig/backends/etcd/health.py): every line of
its transition table, the count of failed members and the retry delay, and
the transitions as the backend drives them on a Clock with a fake client.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from kvconfig.backends.etcd import EtcdBackend
from kvconfig.backends.etcd.health import (
    CATCHING_UP,
    FIRST_RETRY,
    IN_STEP,
    INPUTS,
    LOADED,
    LOADING,
    MAX_RETRY,
    MEMBER_FAILED,
    ROUND_FAILED,
    STATES,
    UNAVAILABLE,
    WATCH_BROKE,
    WATCH_CREATED,
    Health,
    NoTransition,
)
from kvconfig.errors import Unavailable
from kvconfig.limits import Limits

from fakeetcd import ENDPOINTS, PREFIX, TIMEOUT, FakeClient, answer_load, put, started

# state, input, next state, what the transition does besides:
#   "reason": keeps the input's reason; "forgets": clears the reason and the
#   failures; "counts": counts a failed member; "closes": closes the watch;
#   "logs unavailable" / "logs available": the log line.
LINES = [
    (LOADING, LOADED, CATCHING_UP, set()),
    (LOADING, MEMBER_FAILED, LOADING, {"counts"}),
    (LOADING, ROUND_FAILED, LOADING, {"reason"}),
    (CATCHING_UP, LOADED, CATCHING_UP, set()),
    (CATCHING_UP, WATCH_CREATED, IN_STEP, {"forgets"}),
    (CATCHING_UP, WATCH_BROKE, CATCHING_UP, set()),
    (CATCHING_UP, MEMBER_FAILED, CATCHING_UP, {"counts"}),
    (CATCHING_UP, ROUND_FAILED, UNAVAILABLE, {"reason", "logs unavailable", "closes"}),
    (IN_STEP, LOADED, IN_STEP, set()),
    (IN_STEP, WATCH_CREATED, IN_STEP, {"forgets"}),
    (IN_STEP, WATCH_BROKE, CATCHING_UP, {"reason"}),
    (IN_STEP, MEMBER_FAILED, IN_STEP, {"counts"}),
    (IN_STEP, ROUND_FAILED, UNAVAILABLE, {"reason", "logs unavailable", "closes"}),
    (UNAVAILABLE, LOADED, UNAVAILABLE, set()),
    (UNAVAILABLE, WATCH_CREATED, IN_STEP, {"forgets", "logs available"}),
    (UNAVAILABLE, WATCH_BROKE, UNAVAILABLE, set()),
    (UNAVAILABLE, MEMBER_FAILED, UNAVAILABLE, {"counts"}),
    (UNAVAILABLE, ROUND_FAILED, UNAVAILABLE, {"reason", "closes"}),
]

#: Inputs that cannot come in a state (a watch opens only once loaded).
IMPOSSIBLE = [(LOADING, WATCH_CREATED), (LOADING, WATCH_BROKE)]


def feed(health: Health, input_: str, detail: str) -> None:
    {LOADED: lambda _: health.loaded(), WATCH_CREATED: health.watch_created,
     WATCH_BROKE: health.watch_broke, MEMBER_FAILED: health.member_failed,
     ROUND_FAILED: health.round_failed}[input_](detail)


@pytest.mark.parametrize("state, input_, next_state, effects", LINES,
                         ids=[f"{line[0]}-{line[1]}" for line in LINES])
def test_each_line_of_the_table(state, input_, next_state, effects):
    """From *state*, *input_* leads to *next_state* and does *effects*, and
    nothing else."""
    closed: list[str] = []
    health = Health(3, closed.append)
    health.state, health.reason, health.failures = state, "before", 1
    with capturedLogs() as logs:
        feed(health, input_, "why")
    assert health.state == next_state
    done = set()
    if health.reason == "why":
        done.add("reason")
    if health.reason == "" and health.failures == 0:
        done.add("forgets")
    if health.failures == 2:
        done.add("counts")
    if closed == ["why"]:
        done.add("closes")
    text = " ".join(log["log_format"] for log in logs)
    if "etcd unavailable" in text:
        done.add("logs unavailable")
    if "available again" in text:
        done.add("logs available")
    assert done == effects


def test_the_tested_lines_are_the_table_and_the_rest_is_impossible():
    """Every line of the table is tested above, and each pair of a state and
    an input not in it is one that cannot happen."""
    assert {(state, input_) for state, input_, _, _ in LINES} == set(Health.transitions)
    assert set(Health.transitions) | set(IMPOSSIBLE) == {
        (state, input_) for state in STATES for input_ in INPUTS}


@pytest.mark.parametrize("state, input_", IMPOSSIBLE)
def test_an_impossible_input_is_an_error(state, input_):
    health = Health(3, lambda reason: None)
    health.state = state
    with pytest.raises(NoTransition):
        feed(health, input_, "why")


def test_the_states_say_what_may_be_read_and_written():
    health = Health(3, lambda reason: None)
    seen = {}
    for state in STATES:
        health.state = state
        seen[state] = (health.ready, health.stale, health.writable)
    assert seen == {LOADING: (False, True, False), CATCHING_UP: (True, True, True),
                    IN_STEP: (True, False, True), UNAVAILABLE: (True, True, False)}


def test_every_member_failing_in_a_row_is_a_failed_round_and_so_is_each_after():
    """The third of three members failing makes the node unavailable; each
    further failure is a failed round again (its reason kept, the watch
    closed), until a watch is created."""
    closed: list[str] = []
    health = Health(3, closed.append)
    health.loaded()
    health.watch_created(ENDPOINTS[0])
    health.watch_broke("the watch on a broke")
    health.member_failed("a")
    health.member_failed("b")
    assert health.state == CATCHING_UP and closed == []
    health.member_failed("c")
    assert health.state == UNAVAILABLE and health.reason == "c" and closed == ["c"]
    health.member_failed("a again")
    assert health.reason == "a again" and closed == ["c", "a again"]
    health.watch_created(ENDPOINTS[1])
    assert (health.state, health.reason, health.failures) == (IN_STEP, "", 0)


def test_retries_are_at_once_while_members_remain_then_after_a_doubling_delay():
    health = Health(3, lambda reason: None)
    health.loaded()
    delays = []
    for _ in range(9):
        health.member_failed("down")
        delays.append(health.retry_delay())
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:] == [FIRST_RETRY, 0.1, 0.2, 0.4, 0.8, MAX_RETRY, MAX_RETRY]
    health.watch_created(ENDPOINTS[0])
    health.member_failed("down")
    assert health.retry_delay() == 0.0
    health.member_failed("down")
    health.member_failed("down")
    assert health.retry_delay() == FIRST_RETRY


# Driven by the backend


def test_the_etcd_state_stat_follows_the_node_from_loading_to_in_step():
    clock, client = Clock(), FakeClient()
    backend = EtcdBackend(client.endpoints, PREFIX, clock, Limits(), TIMEOUT, client=client)
    backend.start()
    states = [backend.stats()["etcd_state"]]
    answer_load(client, 10)
    states.append(backend.stats()["etcd_state"])
    client.watch_.open()
    states.append(backend.stats()["etcd_state"])  # open, not yet created
    client.watch_.created(10)
    states.append(backend.stats()["etcd_state"])
    assert states == ["loading", "catching_up", "catching_up", "in_step"]


def test_quorum_lost_and_regained():
    """The watch breaks and no member will watch: once all three refused,
    the node is unavailable (writes refused at once, reads stale), retries
    after a growing delay, and is in step again, by itself, once a watch is
    created."""
    backend, client, clock = started()
    client.watch_.end(ConnectionError("connection lost"))
    assert backend.stats()["etcd_state"] == "catching_up"
    for _ in range(2):
        clock.advance(0)
        client.watch_.refuse(ConnectionError("etcdserver: no leader"))
    assert backend.stats()["etcd_state"] == "unavailable" and backend.stale
    with pytest.raises(Unavailable, match="etcdserver: no leader"):
        put(backend, "k", 1)
    watches = len(client.watches)
    clock.advance(0)
    assert len(client.watches) == watches  # now after a delay
    clock.advance(FIRST_RETRY)
    client.watch_.refuse(ConnectionError("etcdserver: no leader"))
    clock.advance(FIRST_RETRY)
    assert len(client.watches) == watches + 1  # the delay doubled
    clock.advance(FIRST_RETRY)
    client.watch_.open()
    with capturedLogs() as logs:
        client.watch_.created(10)
    assert backend.stats()["etcd_state"] == "in_step" and not backend.stale
    assert any("available again" in log["log_format"] for log in logs)
    put(backend, "k", 1)
