"""
Answers that wait until the keyspace agrees with them.

A backend gives some answers before its keyspace shows what they rest on:
a failed compare-and-set or the delete of an absent key resting on a change
not yet durable (the local backends), a write etcd has applied but this
node's watch has not yet brought (the etcd backend).  Such an answer must
not reach the client before a read on this node would show the same, so it
waits here with the condition on the keyspace that must hold first.  The
backend calls ``release()`` each time its keyspace changes, and ``fail()``
when what the answers rest on is lost.

With a timeout (on the clock given) an answer whose condition has not held
for that long fails instead; one timer serves every waiting answer, since
they share one timeout and so expire in the order they came.  No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from kvconfig.errors import Unavailable


@dataclass(slots=True)
class _Waiting:
    """An answer waiting for *condition*."""

    condition: Callable[[], bool]
    d: Deferred
    outcome: object
    too_late: Callable[[], Exception] | None
    deadline: float


class PendingAnswers:
    """Deferreds that fire with their outcome once a condition holds."""

    def __init__(self, clock: IReactorTime | None = None, timeout: float | None = None,
                 expired: Callable[[int], None] | None = None) -> None:
        """*timeout*: seconds an answer may wait before it fails; *expired*
        is then told how many answers have just failed so."""
        if timeout is not None and clock is None:
            raise ValueError("a timeout needs a clock")
        self.clock = clock
        self.timeout = timeout
        self._expired = expired
        self._waiting: list[_Waiting] = []
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def when(self, condition: Callable[[], bool], outcome: object,
             too_late: Callable[[], Exception] | None = None) -> Deferred:
        """A Deferred that fires with *outcome* once *condition* holds: it
        fails with *outcome* if that is an exception, and fires with what
        *outcome* returns if it is a function (called only then).  If the
        condition does not hold within the timeout, it fails with what
        *too_late* returns (or Unavailable)."""
        d: Deferred = Deferred()
        if condition():
            _settle(d, outcome)
            return d
        deadline = 0.0
        if self.timeout is not None:
            deadline = self.clock.seconds() + self.timeout
            if self._timer is None:
                self._timer = self.clock.callLater(self.timeout, self._expire)
        self._waiting.append(_Waiting(condition, d, outcome, too_late, deadline))
        return d

    def release(self) -> None:
        """Fire the answers whose condition holds now, oldest first."""
        if not self._waiting:
            return
        ready: list[_Waiting] = []
        waiting: list[_Waiting] = []
        for answer in self._waiting:
            (ready if answer.condition() else waiting).append(answer)
        if not ready:
            return
        self._waiting = waiting
        if not waiting:
            self._cancel_timer()
        for answer in ready:
            _settle(answer.d, answer.outcome)

    def fail(self, error: Exception) -> None:
        """Fail every answer still waiting with *error*."""
        waiting, self._waiting = self._waiting, []
        self._cancel_timer()
        for answer in waiting:
            answer.d.errback(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """Fail the answers whose time is up; the timer goes on for the next."""
        self._timer = None
        now = self.clock.seconds()
        expired = [answer for answer in self._waiting if answer.deadline <= now]
        self._waiting = [answer for answer in self._waiting if answer.deadline > now]
        if self._waiting:
            self._timer = self.clock.callLater(max(0.0, self._waiting[0].deadline - now),
                                               self._expire)
        for answer in expired:
            answer.d.errback(answer.too_late() if answer.too_late is not None else Unavailable(
                f"the state this answer rests on did not come within {self.timeout:g} s"))
        if expired and self._expired is not None:
            self._expired(len(expired))


def _settle(d: Deferred, outcome: object) -> None:
    """Fire *d* with *outcome*: failed if an exception, called if a function."""
    if isinstance(outcome, Exception):
        d.errback(outcome)
    elif callable(outcome):
        d.callback(outcome())
    else:
        d.callback(outcome)
