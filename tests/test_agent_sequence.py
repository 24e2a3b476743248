"""The agent's sequence tracker (kvconfig.agentstate.SequenceTracker), alone:
which numbers the local copy holds, what is held, what a pull covers, and
when a gap is declared."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvconfig.agentstate import MAX_HELD, SequenceTracker


def tracker_at(seq: int = 0, max_held: int = MAX_HELD) -> SequenceTracker:
    tracker = SequenceTracker(max_held)
    tracker.restart(seq)
    return tracker


def drain(tracker: SequenceTracker) -> list[int]:
    """The numbers the shell would apply now, in order."""
    applied = []
    while (datagram := tracker.next_in_order()) is not None:
        applied.append(datagram)
    return applied


def test_datagrams_in_order_are_applied_one_by_one():
    tracker = tracker_at(0)
    for seq in (1, 2, 3):
        assert tracker.offer(seq, seq)
        assert drain(tracker) == [seq]
    assert tracker.last_seq == 3 and not tracker.held


def test_a_datagram_out_of_order_waits_for_the_ones_before_it():
    tracker = tracker_at(0)
    assert tracker.offer(3, 3) and tracker.offer(2, 2)
    assert drain(tracker) == [] and sorted(tracker.held) == [2, 3]
    assert tracker.offer(1, 1)
    assert drain(tracker) == [1, 2, 3]
    assert tracker.last_seq == 3 and not tracker.held


def test_duplicates_are_refused_whether_applied_or_held():
    tracker = tracker_at(5)
    assert not tracker.offer(5, "old")          # before the subscription's start
    assert tracker.offer(7, 7)
    assert not tracker.offer(7, "again")        # held
    assert tracker.offer(6, 6)
    assert drain(tracker) == [6, 7]
    assert not tracker.offer(6, "again")        # applied
    assert tracker.highest_seen == 7


def test_an_announced_number_not_held_is_a_gap():
    tracker = tracker_at(0)
    assert not tracker.announced(0)
    tracker.pull_started()                      # nothing is applied while it runs
    tracker.offer(1, 1)
    tracker.offer(2, 2)
    assert not tracker.announced(2)             # both are here, only waiting
    assert tracker.announced(3)                 # the tail was lost
    assert tracker.highest_seen == 3


def test_a_pull_covers_what_was_seen_before_it_was_sent():
    tracker = tracker_at(0)
    tracker.offer(3, 3)                         # 1 and 2 are missing
    tracker.pull_started()
    tracker.offer(6, 6)                         # seen after the pull went out
    assert tracker.pulling and drain(tracker) == []
    tracker.pull_done()
    assert tracker.last_seq == 3                # 1..3, not 4..6
    assert sorted(tracker.held) == [6] and drain(tracker) == []


def test_a_pull_covers_numbers_announced_before_it():
    tracker = tracker_at(0)
    assert tracker.announced(4)
    tracker.pull_started()
    tracker.pull_done()
    assert tracker.last_seq == 4


def test_a_failed_pull_covers_nothing():
    tracker = tracker_at(0)
    tracker.offer(2, 2)
    tracker.pull_started()
    tracker.pull_failed()
    assert not tracker.pulling and tracker.last_seq == 0 and sorted(tracker.held) == [2]


def test_a_pull_sent_for_an_earlier_subscription_covers_none_of_the_next():
    """Numbers restart with each subscription: a pull sent when the old one
    had reached 50 says nothing of the new one's 11..50."""
    tracker = tracker_at(0)
    tracker.announced(50)
    tracker.pull_started()
    tracker.restart(10)
    tracker.offer(12, 12)
    tracker.pull_done()
    assert tracker.last_seq == 10 and sorted(tracker.held) == [12]
    assert tracker.epoch == 2


def test_held_datagrams_are_bounded_and_those_left_out_are_still_seen():
    tracker = tracker_at(0, max_held=3)
    for seq in range(2, 11):
        assert tracker.offer(seq, seq)
    assert len(tracker.held) == 3 and tracker.highest_seen == 10
    tracker.pull_started()
    tracker.pull_done()
    assert tracker.last_seq == 10 and not tracker.held


class Shell:
    """The agent shell's rules, in miniature, around a tracker: a server
    sending numbered events, a network that drops, duplicates and reorders
    them, heartbeats, pulls that answer or fail, and the reorder timer.

    ``has`` is what the local copy really holds: numbers applied from a
    datagram, and every number sent before a pull was answered."""

    def __init__(self, max_held: int) -> None:
        self.tracker = tracker_at(0, max_held)
        self.sent = 0
        self.network: list[int] = []
        self.has: set[int] = set()
        self.again = False
        self.retry_pending = False

    def check(self) -> None:
        """What the tracker vouches for, the copy holds."""
        assert set(range(1, self.tracker.last_seq + 1)) <= self.has, (
            self.tracker.last_seq, sorted(set(range(1, self.tracker.last_seq + 1)) - self.has))

    def send(self, copies: int) -> None:
        self.sent += 1
        self.network += [self.sent] * copies

    def deliver(self, index: int) -> None:
        if self.network:
            seq = self.network.pop(index % len(self.network))
            if self.tracker.offer(seq, seq):
                self.drain()

    def heartbeat(self) -> None:
        if self.tracker.announced(self.sent):
            self.pull()

    def drain(self) -> None:
        while (seq := self.tracker.next_in_order()) is not None:
            self.has.add(seq)
            self.check()

    def pull(self) -> None:
        if self.retry_pending:
            return
        if self.tracker.pulling:
            self.again = True
            return
        self.again = False
        self.tracker.pull_started()

    def answer(self) -> None:
        if self.tracker.pulling:
            self.has |= set(range(1, self.sent + 1))
            self.tracker.pull_done()
            self.check()
            if self.again:
                self.pull()
            else:
                self.drain()

    def fail(self) -> None:
        if self.tracker.pulling:
            self.tracker.pull_failed()
            self.retry_pending = True

    def retry(self) -> None:
        if self.retry_pending:
            self.retry_pending = False
            self.pull()

    def reorder_timer(self) -> None:
        if self.tracker.held and not self.tracker.pulling:
            self.pull()


operations = st.one_of(
    st.tuples(st.just("send"), st.sampled_from([0, 1, 1, 1, 2])),   # dropped, once, twice
    st.tuples(st.just("deliver"), st.integers(0, 1000)),             # any one in flight
    st.tuples(st.just("heartbeat"), st.none()),
    st.tuples(st.just("answer"), st.none()),
    st.tuples(st.just("fail"), st.none()),
    st.tuples(st.just("retry"), st.none()),
    st.tuples(st.just("reorder_timer"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, max_size=200), st.sampled_from([1, 4, MAX_HELD]))
def test_any_interleaving_ends_with_everything_covered(ops, max_held):
    """Whatever is delivered, dropped, duplicated or reordered, and however
    pulls interleave and fail: the tracker never vouches for a number the
    copy lacks, and once the datagrams in flight have arrived, a heartbeat,
    the pulls it starts and the reorder timer cover every number sent."""
    shell = Shell(max_held)
    for name, argument in ops:
        method = getattr(shell, name)
        method() if argument is None else method(argument)
        shell.check()
    while shell.network:
        shell.deliver(0)
    shell.heartbeat()
    for _ in range(10):
        shell.retry()
        shell.answer()
        shell.reorder_timer()
        shell.answer()
    assert shell.tracker.last_seq == shell.sent
    assert not shell.tracker.held and not shell.tracker.pulling
    assert shell.has >= set(range(1, shell.sent + 1))
