"""PendingAnswers (kvconfig/backends/answers.py): answers that wait until a
condition of the keyspace holds, with an optional timeout, on a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvconfig.backends.answers import PendingAnswers
from kvconfig.errors import CompareFailed, Unavailable


class State:
    """A stand-in for a keyspace: one revision the conditions look at."""

    revision = 0

    def at(self, revision: int):
        return lambda: self.revision >= revision


def result_of(d):
    results = []
    d.addBoth(results.append)
    return results[0] if results else "not fired"


def test_an_answer_whose_condition_holds_fires_at_once():
    """The condition is looked at when the answer is made: if it holds,
    the answer fires then, with its outcome."""
    answers = PendingAnswers()
    assert result_of(answers.when(lambda: True, "done")) == "done"
    assert len(answers) == 0


def test_an_answer_waits_for_its_condition_and_fires_on_release():
    """An answer whose condition does not hold waits; release() fires it
    once the condition holds, and not before."""
    state, answers = State(), PendingAnswers()
    d = answers.when(state.at(2), "two")
    state.revision = 1
    answers.release()
    assert not d.called
    state.revision = 2
    answers.release()
    assert result_of(d) == "two" and len(answers) == 0


def test_outcomes_that_are_exceptions_fail_and_functions_are_called_only_then():
    """An exception outcome fails the answer; a function outcome is called
    when the condition holds (not before) and its result is the answer."""
    state, answers = State(), PendingAnswers()
    calls = []

    def outcome():
        calls.append(state.revision)
        return "made"

    failed = answers.when(state.at(1), CompareFailed("k", 1, 2))
    made = answers.when(state.at(1), outcome)
    assert calls == []
    state.revision = 1
    answers.release()
    assert result_of(failed).check(CompareFailed)
    assert result_of(made) == "made" and calls == [1]


def test_release_fires_only_the_answers_that_hold_oldest_first():
    """Of several waiting answers, release() fires those whose condition
    holds, in the order they were made, and leaves the others waiting."""
    state, answers = State(), PendingAnswers()
    fired = []
    for revision in (3, 1, 2, 1):
        answers.when(state.at(revision), revision).addCallback(fired.append)
    state.revision = 1
    answers.release()
    assert fired == [1, 1] and len(answers) == 2
    state.revision = 3
    answers.release()
    assert fired == [1, 1, 3, 2] and len(answers) == 0


def test_fail_fails_every_waiting_answer():
    """fail() fails every answer still waiting with the error given; those
    that fired already are not touched."""
    state, answers = State(), PendingAnswers()
    done = answers.when(state.at(0), "done")
    waiting = [answers.when(state.at(5), "five"), answers.when(state.at(6), "six")]
    answers.fail(Unavailable("lost"))
    assert result_of(done) == "done"
    assert all(result_of(d).check(Unavailable) for d in waiting)
    assert len(answers) == 0


def test_without_a_timeout_answers_wait_for_ever():
    """Without a timeout no timer is set: an answer waits however long."""
    clock = Clock()
    answers = PendingAnswers()
    d = answers.when(lambda: False, "never")
    clock.advance(10**6)
    assert not d.called and not clock.getDelayedCalls()


def test_a_timeout_needs_a_clock():
    with pytest.raises(ValueError):
        PendingAnswers(timeout=1.0)


def test_an_answer_that_waits_too_long_fails_with_what_too_late_says():
    """With a timeout, an answer whose condition has not held for that long
    fails with what its too_late returns (Unavailable by default); expired
    is told how many failed so."""
    clock = Clock()
    told = []
    answers = PendingAnswers(clock, 5.0, expired=told.append)
    own = answers.when(lambda: False, "x", too_late=lambda: Unavailable("own words"))
    default = answers.when(lambda: False, "y")
    clock.advance(4.9)
    assert not own.called and not default.called
    clock.advance(0.1)
    assert "own words" in str(result_of(own).value)
    assert result_of(default).check(Unavailable)
    assert told == [2] and len(answers) == 0


def test_one_timer_serves_every_answer_and_each_gets_its_full_timeout():
    """One timer at a time, whatever the number of answers; each answer
    fails its own timeout after it was made, not earlier, and the timer
    goes when nothing waits any more."""
    clock = Clock()
    state = State()
    answers = PendingAnswers(clock, 5.0)
    first = answers.when(state.at(9), "first")
    clock.advance(2)
    second = answers.when(state.at(9), "second")
    third = answers.when(state.at(1), "third")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(3)
    assert isinstance(result_of(first), Failure) and not second.called
    assert len(clock.getDelayedCalls()) == 1
    state.revision = 1
    answers.release()
    assert result_of(third) == "third"
    clock.advance(1.9)
    assert not second.called
    clock.advance(0.1)
    assert result_of(second).check(Unavailable)
    assert not clock.getDelayedCalls()


def test_the_timer_goes_once_every_answer_fired():
    """Once release() (or fail()) leaves nothing waiting, the timer is
    cancelled, and a later answer sets a new one."""
    clock = Clock()
    state = State()
    answers = PendingAnswers(clock, 5.0)
    answers.when(state.at(1), "a")
    state.revision = 1
    answers.release()
    assert not clock.getDelayedCalls()
    answers.when(state.at(2), "b")
    answers.fail(Unavailable("gone"))
    assert not clock.getDelayedCalls()
    late = answers.when(state.at(3), "c")
    clock.advance(5)
    assert result_of(late).check(Unavailable)


def test_an_answer_made_while_answers_fire_is_kept():
    """An answer made by a callback of one that release() fires (as a
    write's acknowledgement sends the next write) waits as any other."""
    state, answers = State(), PendingAnswers()
    later = []
    first = answers.when(state.at(1), "first")
    first.addCallback(lambda _: later.append(answers.when(state.at(2), "second")))
    state.revision = 1
    answers.release()
    assert len(answers) == 1 and not later[0].called
    state.revision = 2
    answers.release()
    assert result_of(later[0]) == "second"
