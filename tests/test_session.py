"""The client session (kvconfig.session): the ordering rule every interface
shares, the connection limit, watches and subscriptions, without a protocol."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from kvconfig import errors
from kvconfig.model import PUT
from kvconfig.session import MAX_QUEUED_REQUESTS, Client, Session, Sessions
from kvconfig.subscriptions import Subscriptions

from stores import clocked_store


class Recorder:
    """A session over a sqlite store on a Clock (commits on advance(0)), and
    the outcomes it hands back, in the order they arrive."""

    def __init__(self, tmp_path, **limits) -> None:
        self.store = clocked_store("sqlite", tmp_path, **limits)
        self.clock = self.store.backend.clock
        self.session = Session(self.store, Client("test", "127.0.0.1", 4000))
        self.answers: list = []

    def submit(self, name: str, operation, writes: bool) -> None:
        outcome = self.session.submit(operation, writes)
        if isinstance(outcome, Deferred):
            outcome.addCallback(lambda outcome: self.answers.append((name, outcome)))
        else:
            self.answers.append((name, outcome))

    def put(self, name: str, key: str, value) -> None:
        self.submit(name, lambda: self.session.put(key, value), writes=True)

    def get(self, name: str, key: str) -> None:
        self.submit(name, lambda: self.session.load(key), writes=False)

    def commit(self) -> None:
        for _ in range(5):
            self.clock.advance(0)


def test_a_read_waits_for_the_writes_before_it(tmp_path):
    """A read submitted behind a pending write runs once it is answered, and
    sees it; alone it answers at once."""
    r = Recorder(tmp_path)
    r.get("first read", "k")
    assert r.answers == [("first read", None)]
    r.put("write", "k", 1)
    r.get("read", "k")
    assert r.answers == [("first read", None)]
    assert r.session.busy and r.session.queued == 1
    r.commit()
    assert [(name, getattr(outcome, "value", outcome)) for name, outcome in r.answers[1:]] \
        == [("write", 1), ("read", 1)]
    assert not r.session.busy


def test_consecutive_writes_start_together_and_share_one_commit(tmp_path):
    """A run of writes is decided at once (each seeing the ones before) and
    committed in one batch; their answers come in request order."""
    r = Recorder(tmp_path)
    for i in range(5):
        r.put(f"w{i}", f"k{i}", i)
    assert r.session.queued == 0  # none waits: all decided
    commits = r.store.backend.commits
    r.commit()
    assert r.store.backend.commits == commits + 1
    assert [name for name, _ in r.answers] == [f"w{i}" for i in range(5)]
    assert [kv.mod_revision for _, kv in r.answers] == [1, 2, 3, 4, 5]


def test_a_write_after_a_waiting_read_waits_for_it(tmp_path):
    """W1, R, W2: R waits for W1, and W2 for R, so R does not see W2."""
    r = Recorder(tmp_path)
    r.put("w1", "k", 1)
    r.get("r", "k")
    r.put("w2", "k", 2)
    assert r.session.queued == 2
    r.commit()
    assert [(name, getattr(o, "value", o)) for name, o in r.answers] == [
        ("w1", 1), ("r", 1), ("w2", 2)]


def test_errors_are_outcomes_in_their_turn(tmp_path):
    """An operation that raises a KVConfigError, or whose Deferred fails with
    one, answers with the error, in order; anything else is an internal error."""
    r = Recorder(tmp_path)
    r.put("w", "k", 1)
    r.submit("bad key", lambda: r.session.load(""), writes=False)
    r.submit("cas", lambda: r.session.put("k", 2, prev_revision=7), writes=True)

    def buggy():
        raise ZeroDivisionError()

    r.submit("bug", buggy, writes=False)
    r.commit()
    names = [name for name, _ in r.answers]
    assert names == ["w", "bad key", "cas", "bug"]
    kinds = [type(outcome) for _, outcome in r.answers[1:]]
    assert kinds == [errors.InvalidKey, errors.CompareFailed, errors.InternalError]


def test_answers_come_in_request_order_whatever_finishes_first(tmp_path):
    """Operations whose Deferreds fire in reverse order are answered in the
    order they were submitted."""
    r = Recorder(tmp_path)
    pending = [Deferred() for _ in range(4)]
    for i, d in enumerate(pending):
        r.submit(f"w{i}", lambda d=d: d, writes=True)
    for i, d in reversed(list(enumerate(pending))):
        d.callback(i)
        if i:
            assert r.answers == []
    assert r.answers == [(f"w{i}", i) for i in range(4)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), min_size=1, max_size=30))
def test_any_mix_of_reads_and_writes_reads_as_if_run_one_by_one(tmp_path_factory, script):
    """Every read sees exactly the writes submitted before it, and answers
    come in request order, for any pipelined mix."""
    r = Recorder(tmp_path_factory.mktemp("mix"))
    expected = []
    state: dict = {}
    for index, (writes, key) in enumerate(script):
        if writes:
            r.put(index, f"k{key}", index)
            state[key] = index
            expected.append((index, index))
        else:
            r.get(index, f"k{key}")
            expected.append((index, state.get(key)))
    r.commit()
    got = [(name, getattr(outcome, "value", outcome)) for name, outcome in r.answers]
    assert got == expected


def test_backlogged_when_too_much_waits(tmp_path):
    """Past MAX_QUEUED_REQUESTS waiting requests the session is backlogged
    (the protocol stops reading); answered, it is not."""
    r = Recorder(tmp_path)
    r.put("w", "k", 1)
    for i in range(MAX_QUEUED_REQUESTS):
        assert not r.session.backlogged
        r.get(i, "k")
    assert r.session.backlogged
    r.commit()
    assert not r.session.backlogged and len(r.answers) == MAX_QUEUED_REQUESTS + 1


def test_close_drops_what_waits_and_ends_watches(tmp_path):
    """After close() no queued operation runs and the watches are gone."""
    r = Recorder(tmp_path)
    ran = []
    r.put("w", "k", 1)
    r.submit("r", lambda: ran.append(1), writes=False)
    r.session.watch("", None, lambda watch_id, event: None)
    assert r.store.feed.consumers == 1
    r.session.close()
    r.commit()
    assert ran == [] and r.store.feed.consumers == 0


def test_watch_replays_then_follows_without_gap_or_duplicate(tmp_path):
    """watch(prefix, start) replays the committed history from *start*, then
    hands later changes to the consumer with the watch's id."""
    store = clocked_store()
    for i in range(3):
        store.put(f"w/{i}", i)
    session = Session(store, Client("test"))
    live = []
    watch_id, revision, replay = session.watch("w/", 2, lambda wid, e: live.append((wid, e)))
    assert (watch_id, revision) == (1, 3)
    assert [event.revision for event in replay] == [2, 3]
    store.put("w/3", 3)
    store.put("other", 0)
    assert [(wid, event.revision) for wid, event in live] == [(1, 4)]
    assert session.unwatch(watch_id) == 1
    with pytest.raises(errors.InvalidArgument):
        session.unwatch(watch_id)
    with pytest.raises(errors.InvalidArgument):
        session.watch("w/", 0, lambda wid, e: None)


def test_watches_are_limited_per_session():
    store = clocked_store(max_watches=2)
    session = Session(store, Client("test"))
    for _ in range(2):
        session.watch("", None, lambda wid, e: None)
    with pytest.raises(errors.LimitExceeded):
        session.watch("", None, lambda wid, e: None)
    assert session.unwatch() == 2


def test_subscribe_is_for_the_clients_own_host():
    """A session subscribes its client's host, at the port asked for; without
    a registry or an IP address it is unavailable."""
    store = clocked_store()
    registry = Subscriptions(store.limits, store.backend.clock, lambda: store.revision)
    session = Session(store, Client("test", "192.0.2.7", 50000), subscriptions=registry)
    description = session.subscribe(4000, "app/")
    assert description["prefix"] == "app/" and description["head"] == 0
    assert [s.address for s in registry] == [("192.0.2.7", 4000)]
    assert session.unsubscribe(4000, "app/") is True
    assert session.unsubscribe(4000, "app/") is False
    with pytest.raises(errors.InvalidArgument):
        session.subscribe(53, "")
    for other in (Session(store, Client("test", "192.0.2.7")),
                  Session(store, Client("test", None), subscriptions=registry)):
        with pytest.raises(errors.Unavailable):
            other.subscribe(4000, "")


def test_sessions_keep_the_connection_limit_and_register_stats():
    """Sessions.open refuses past max_connections and, for one address,
    past max_connections_per_address (counted, saying which); a closed
    session frees its place; the counters are in the store's stats."""
    store = clocked_store(max_connections=3, max_connections_per_address=2)
    sessions = Sessions(store, "test", counters=("commands",))
    first, second = sessions.open("10.0.0.1"), sessions.open("10.0.0.1")
    with pytest.raises(errors.LimitExceeded, match="10.0.0.1 has 2 connections"):
        sessions.open("10.0.0.1")
    third = sessions.open(None)
    with pytest.raises(errors.LimitExceeded, match="its 3 connections"):
        sessions.open("10.0.0.2")
    assert store.stats()["test_refused"] == 2 and store.stats()["test_connections"] == 3
    first.close()
    first.close()  # twice is once
    assert sessions.connections == 2
    assert sessions.open("10.0.0.1").client.host == "10.0.0.1"
    second.close()
    third.close()
    assert store.stats()["test_commands"] == 0


def test_writes_queued_behind_a_read_start_together_once_it_has_run(tmp_path):
    """W1, R, W2, W3: once R has run, W2 and W3 are decided together and
    share one commit, as any run of consecutive writes does."""
    r = Recorder(tmp_path)
    commits = r.store.backend.commits
    r.put("w1", "k", 1)
    r.get("r", "k")
    r.put("w2", "a", 2)
    r.put("w3", "b", 3)
    assert r.session.queued == 3
    r.commit()
    assert r.store.backend.commits == commits + 2  # w1's, then w2's and w3's
    assert [name for name, _ in r.answers] == ["w1", "r", "w2", "w3"]


def test_a_clients_writes_in_flight_are_bounded_in_count(tmp_path):
    """Past max_client_writes decided and uncommitted writes, the next ones
    wait (not decided) until a commit answers some; all are answered in
    order."""
    r = Recorder(tmp_path, max_client_writes=3)
    for i in range(10):
        r.put(f"w{i}", f"k{i}", i)
    assert r.store.writes_in_flight == 3 and r.session.queued == 7
    r.commit()
    assert [name for name, _ in r.answers] == [f"w{i}" for i in range(10)]
    assert [kv.mod_revision for _, kv in r.answers] == list(range(1, 11))


def test_a_run_of_writes_counts_each_write_against_the_bound(tmp_path):
    """A run (write_many, as the line protocol makes of pipelined writes)
    counts as its writes against max_client_writes: a second run that would
    pass the bound waits for the first's commit."""
    r = Recorder(tmp_path, max_client_writes=5)
    runs = [[(PUT, f"run{n}/{i}", i, None, None) for i in range(3)] for n in range(2)]
    for n, run in enumerate(runs):
        r.session.submit(lambda run=run: r.session.write_many(run), writes=len(run),
                         size=30).addCallback(lambda o, n=n: r.answers.append((n, o)))
    assert r.store.writes_in_flight == 3 and r.session.queued == 1
    r.commit()
    assert [n for n, _ in r.answers] == [0, 1]
    assert [kv.mod_revision for _, run in r.answers for kv in run] == list(range(1, 7))


def test_a_clients_writes_in_flight_are_bounded_in_bytes(tmp_path):
    """A client's writes in flight stay under max_client_write_bytes (one
    always goes); the rest wait, and the client is backlogged (not read)
    once what waits is over the line limit; all are answered in order."""
    r = Recorder(tmp_path, max_client_write_bytes=5000, max_line_bytes=7000,
                 max_value_bytes=2000)
    for i in range(8):
        outcome = r.session.submit(lambda i=i: r.session.put(f"k{i}", "x" * 1900),
                                   writes=True, size=2000)
        outcome.addCallback(lambda o, i=i: r.answers.append((i, o)))
    assert r.store.writes_in_flight == 2  # 2 x 2000 fit in 5000, a third does not
    assert r.session.queued == 6 and r.session.backlogged
    r.commit()
    assert [i for i, _ in r.answers] == list(range(8)) and not r.session.backlogged


def test_writes_in_flight_are_bounded_for_all_clients_together(tmp_path):
    """Past max_write_bytes in flight for everyone, another client's write
    waits, and starts once a commit makes room."""
    store = clocked_store("sqlite", tmp_path, max_write_bytes=3000, max_value_bytes=2000)
    first = Session(store, Client("test", "10.0.0.1"))
    second = Session(store, Client("test", "10.0.0.2"))
    answers = []
    first.submit(lambda: first.put("a", "x" * 1990), writes=True, size=2000) \
        .addCallback(lambda o: answers.append(("a", o.mod_revision)))
    second.submit(lambda: second.put("b", "y" * 1990), writes=True, size=2000) \
        .addCallback(lambda o: answers.append(("b", o.mod_revision)))
    assert store.writes_in_flight == 1 and second.queued == 1
    for _ in range(5):
        store.backend.clock.advance(0)
    assert answers == [("a", 1), ("b", 2)] and store.writes_in_flight == 0
    assert store.stats()["write_bytes_in_flight"] == 0
