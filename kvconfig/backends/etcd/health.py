"""
The etcd backend's health: how well this node's replica follows etcd.

A state machine without I/O, one line of its table per transition.  Its
state is the ``etcd_state`` stat:

- ``loading``: the prefix has not been read yet.  Reads and writes are
  refused (an empty answer would be a lie, not merely stale).
- ``catching_up``: the replica is loaded but no watch created with a leader
  follows etcd (yet, or any more).  Reads are answered and say they may be
  stale; writes are sent.
- ``in_step``: a watch created with a leader follows etcd.
- ``unavailable``: every member failed in a row, or a write found no member
  reachable or none with a leader.  Writes are refused at once, reads go on
  from the replica (stale), and the node keeps trying.

Inputs, from the replica and the write pipeline:

- ``loaded``: the prefix was read (the first time, or to resync).
- ``watch_created(endpoint)``: a watch was created, with a leader.
- ``watch_broke(reason)``: the replica stopped following etcd: its watch
  ended or could not start, its history was compacted, or a message was
  too large.
- ``member_failed(reason)``: a member could not be read or watched.  Each is
  counted; once every member has failed since the last watch was created,
  that is a failed round.
- ``round_failed(reason)``: every member failed in a row, or a write found
  none reachable or none with a leader.

Outputs: the reason kept for errors and logs, the count of failures (and
the delay before the next try, ``retry_delay``), log lines, and closing the
watch when the cluster is lost: only a watch created with a leader brings
the node back in step, so a watch that looks alive is checked by reopening
it.  Stopping is the backend's life, not the cluster's health: it is not an
input here.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

LOADING, CATCHING_UP, IN_STEP, UNAVAILABLE = "loading", "catching_up", "in_step", "unavailable"
STATES = (LOADING, CATCHING_UP, IN_STEP, UNAVAILABLE)

LOADED, WATCH_CREATED, WATCH_BROKE = "loaded", "watch_created", "watch_broke"
MEMBER_FAILED, ROUND_FAILED = "member_failed", "round_failed"
INPUTS = (LOADED, WATCH_CREATED, WATCH_BROKE, MEMBER_FAILED, ROUND_FAILED)

#: Seconds before retrying after every member failed; doubles up to MAX_RETRY.
FIRST_RETRY = 0.05
MAX_RETRY = 1.0


class NoTransition(Exception):
    """An input the table has no line for in the current state (a bug)."""

    def __init__(self, state: str, input_: str) -> None:
        super().__init__(f"no transition from {state} upon {input_}")
        self.state = state
        self.input = input_


class Health:
    """The health of one node's replica of its etcd prefix."""

    log = Logger()

    def __init__(self, members: int, close_watch: Callable[[str], None]) -> None:
        """*members*: how many etcd members the node may use; *close_watch*
        closes the replica's watch (if any) with a reason."""
        self.members = members
        self.state = LOADING
        #: Why the node is not in step, for errors and logs ("" when it is).
        self.reason = "not yet in step with etcd"
        #: Members failed in a row since a watch was last created.
        self.failures = 0
        self._close_watch = close_watch
        self._next_delay = FIRST_RETRY

    @property
    def ready(self) -> bool:
        """True once reads may be served."""
        return self.state != LOADING

    @property
    def stale(self) -> bool:
        """True while reads may lag etcd."""
        return self.state != IN_STEP

    @property
    def writable(self) -> bool:
        """True while writes are sent to etcd."""
        return self.state == IN_STEP or self.state == CATCHING_UP

    def retry_delay(self) -> float:
        """Seconds to wait before trying again after a failure: none while
        members remain to try this round, then a delay that doubles."""
        if self.failures < self.members:
            return 0.0
        delay = self._next_delay
        self._next_delay = min(delay * 2, MAX_RETRY)
        return delay

    # Inputs

    def loaded(self) -> None:
        self._input(LOADED, "")

    def watch_created(self, endpoint: str) -> None:
        self._input(WATCH_CREATED, endpoint)

    def watch_broke(self, reason: str) -> None:
        self._input(WATCH_BROKE, reason)

    def member_failed(self, reason: str) -> None:
        self._input(MEMBER_FAILED, reason)

    def round_failed(self, reason: str) -> None:
        self._input(ROUND_FAILED, reason)

    def _input(self, input_: str, detail: str) -> None:
        try:
            self.state, outputs = self.transitions[self.state, input_]
        except KeyError:
            raise NoTransition(self.state, input_) from None
        for output in outputs:
            output(self, detail)

    # Outputs: each gets the input's detail (a reason, or an endpoint).

    def _note_reason(self, reason: str) -> None:
        self.reason = reason

    def _count_failure(self, reason: str) -> None:
        self.failures += 1
        if self.failures >= self.members:
            self.round_failed(reason)

    def _forget_failures(self, _: str) -> None:
        self.reason = ""
        self.failures = 0
        self._next_delay = FIRST_RETRY

    def _log_unavailable(self, reason: str) -> None:
        self.log.warn("etcd unavailable: {reason}; writes are refused until it recovers",
                      reason=reason)

    def _log_available(self, endpoint: str) -> None:
        self.log.info("etcd available again through {endpoint}", endpoint=endpoint)

    def _close_the_watch(self, reason: str) -> None:
        self._close_watch(reason)

    transitions: dict[tuple[str, str], tuple[str, tuple[Callable[[Health, str], None], ...]]] = {
        # (state, input):               (next state, outputs)
        (LOADING, LOADED):              (CATCHING_UP, ()),
        (LOADING, MEMBER_FAILED):       (LOADING, (_count_failure,)),
        (LOADING, ROUND_FAILED):        (LOADING, (_note_reason,)),

        (CATCHING_UP, LOADED):          (CATCHING_UP, ()),
        (CATCHING_UP, WATCH_CREATED):   (IN_STEP, (_forget_failures,)),
        (CATCHING_UP, WATCH_BROKE):     (CATCHING_UP, ()),
        (CATCHING_UP, MEMBER_FAILED):   (CATCHING_UP, (_count_failure,)),
        (CATCHING_UP, ROUND_FAILED):    (UNAVAILABLE, (_note_reason, _log_unavailable,
                                                       _close_the_watch)),

        (IN_STEP, LOADED):              (IN_STEP, ()),
        (IN_STEP, WATCH_CREATED):       (IN_STEP, (_forget_failures,)),
        (IN_STEP, WATCH_BROKE):         (CATCHING_UP, (_note_reason,)),
        (IN_STEP, MEMBER_FAILED):       (IN_STEP, (_count_failure,)),
        (IN_STEP, ROUND_FAILED):        (UNAVAILABLE, (_note_reason, _log_unavailable,
                                                       _close_the_watch)),

        (UNAVAILABLE, LOADED):          (UNAVAILABLE, ()),
        (UNAVAILABLE, WATCH_CREATED):   (IN_STEP, (_forget_failures, _log_available)),
        (UNAVAILABLE, WATCH_BROKE):     (UNAVAILABLE, ()),
        (UNAVAILABLE, MEMBER_FAILED):   (UNAVAILABLE, (_count_failure,)),
        (UNAVAILABLE, ROUND_FAILED):    (UNAVAILABLE, (_note_reason, _close_the_watch)),
    }
