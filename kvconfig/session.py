"""
A client's session with the store: who the client is, and the order its
requests take.

Every TCP interface opens one Session per connection (``Sessions.open``,
which also keeps the interface's connection limit) and hands it each
request as an *operation*: a function that does the request's work through
the session and returns its result, or a Deferred of it.  The session
decides when each operation runs and hands back its *outcome* (the result,
or the KVConfigError it raised or failed with) in request order.  The rule,
which every interface shares and none encodes itself:

- a read shows durable state only, so it runs once every request before it
  on this session is answered; a write after a waiting read waits for it;
- a run of consecutive writes starts at once: each is decided seeing the
  ones before it, and they share one group commit;
- answers come back in request order, whatever finishes first.

The session also says who the client is (interface, peer address; a user
later), holds its watches and makes its UDP subscriptions, so that a rule
about clients (bounds, permissions, audit) has one place to live.  It does
no I/O: the protocols read and write their wire, the store decides.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvconfig import errors, values
from kvconfig.changelog import log_change
from kvconfig.limits import Limits
from kvconfig.model import Event, KeyValue
from kvconfig.store import Budget, Store, outcome_of

if TYPE_CHECKING:
    from kvconfig.subscriptions import Subscriptions

log = Logger()

#: Requests held behind a pending write before the client should stop being
#: read (flow control, not an error: reading resumes as they are answered).
MAX_QUEUED_REQUESTS = 1024

_QUEUED, _RUNNING, _DONE = range(3)


@dataclass(frozen=True, slots=True)
class Client:
    """Who a session serves: the interface it came through and its peer."""

    interface: str
    #: The peer's IP address, or None for a peer without one (a UNIX socket).
    host: str | None = None
    port: int | None = None


#: Results that are never a Deferred: checked by type first, since
#: isinstance(x, Deferred) goes through an ABC's check (Deferred is Awaitable),
#: which costs as much as a short command.
_READY = frozenset({bytes, list, dict, str, int, float, bool, type(None), tuple})


def is_deferred(result: Any) -> bool:
    return type(result) not in _READY and isinstance(result, Deferred)


def settled(result: Any) -> Any:
    """The result of a Deferred that has already fired, else *result* itself."""
    # A called Deferred that is paused (waiting on one it chained to) has no
    # result yet.
    if is_deferred(result) and result.called and not result.paused:
        box: list = []
        result.addBoth(box.append)
        return box[0]
    return result


def _call(operation: Callable[[], Any]) -> Any:
    """Run *operation*: its outcome if it is ready, else its Deferred (which
    may fail: the caller makes the outcome of its result)."""
    try:
        result = operation()
    except errors.KVConfigError as e:
        return e
    except Exception:
        return outcome_of(Failure())
    if type(result) in _READY:
        return result
    result = settled(result)
    if isinstance(result, Deferred):
        return result
    return outcome_of(result)


def run(operation: Callable[[], Any]) -> Any:
    """Run *operation*: its outcome, or a Deferred that fires with it."""
    result = _call(operation)
    if is_deferred(result):
        return result.addBoth(outcome_of)
    return result


#: What submit() returns when the outcome comes later, to its *deliver*.
LATER = object()


class _Request:
    __slots__ = ("operation", "writes", "size", "state", "outcome", "deliver")

    def __init__(self, operation: Callable[[], Any], writes: int, size: int,
                 deliver: Callable[[Any], None]) -> None:
        self.operation = operation
        #: How many writes it makes (0: a read).
        self.writes = writes
        self.size = size
        self.state = _QUEUED
        self.outcome: Any = None
        self.deliver = deliver


class Session:
    """One client's requests, in the order the module docstring gives."""

    def __init__(self, store: Store, client: Client, limits: Limits | None = None,
                 subscriptions: Subscriptions | None = None,
                 on_close: Callable[[Session], None] | None = None,
                 budget: Budget | None = None) -> None:
        self.store = store
        self.client = client
        self.limits = limits or store.limits
        self.subscriptions = subscriptions
        self.budget = budget or store.budget
        self._on_close = on_close
        #: Bytes this client holds of the budget, by what holds them.
        self._held: dict[str, int] = {}
        #: True when so much waits that the client should not be read
        #: further (kept by _hold_waiting).
        self.backlogged = False
        #: Requests not yet answered, oldest first, and those of them not yet
        #: started (waiting for the answers before them, or for room).
        self._requests: deque[_Request] = deque()
        self._waiting: deque[_Request] = deque()
        self._waiting_bytes = 0
        self._reads_running = 0
        self._writes_running = 0
        self._write_bytes_running = 0
        self._advancing = False
        self._closed = False
        self._watches: dict[int, Callable[[], None]] = {}
        self._next_watch = 1

    def connected_from(self, address: Any) -> None:
        """The connection is made: its peer is the client's address (a UNIX
        socket's peer has no host)."""
        self.client = Client(self.client.interface, getattr(address, "host", None),
                             getattr(address, "port", None))

    # Ordering

    @property
    def busy(self) -> bool:
        """True while some request is not yet answered."""
        return bool(self._requests)

    @property
    def queued(self) -> int:
        """Requests waiting to start (for the answers before them, or for room)."""
        return len(self._waiting)

    def hold(self, what: str, size: int) -> bool:
        """Hold *size* bytes of client data of the kind *what* (a body being
        read, a partial line, a watch backlog), instead of what was held of
        it before.  False, the previous amount still held, when the budget
        cannot take the increase."""
        held = self._held.get(what, 0)
        if size > held and not self.budget.take(size - held, self.client.host):
            return False
        if size < held:
            self.budget.give(held - size, self.client.host)
        self._held[what] = size
        return True

    def submit(self, operation: Callable[[], Any], writes: int = 0, size: int = 0,
               deliver: Callable[[Any], None] | None = None) -> Any:
        """Run *operation* in this client's order.

        Returns its outcome at once when it is ready and nothing before it
        is unanswered.  Else the outcome comes later, after the answers of
        every earlier request: to *deliver* if given (submit returns LATER),
        else through the Deferred returned (which never fails).  *writes*
        is how many writes it makes (a run of them counts each; 0 or False:
        it is a read) and *size* its size in bytes, for the session's
        bounds.
        """
        requests = self._requests
        if not requests and (not writes or self._write_room(size, writes)):
            result = _call(operation)
            if not is_deferred(result):
                return result
            request, answer = self._request(operation, writes, size, deliver)
            self._started(request, result)
            requests.append(request)
            return answer
        request, answer = self._request(operation, writes, size, deliver)
        requests.append(request)
        if (writes and not self._waiting and not self._reads_running
                and self._write_room(size, writes)):
            # Only writes before it, each already decided: it is decided now,
            # seeing them, and joins their commit.
            self._start(request)
        else:
            self._waiting.append(request)
            self._waiting_bytes += size
            self._hold_waiting()
        return answer

    @staticmethod
    def _request(operation: Callable[[], Any], writes: int, size: int,
                 deliver: Callable[[Any], None] | None) -> tuple[_Request, Any]:
        if deliver is not None:
            return _Request(operation, writes, size, deliver), LATER
        answer: Deferred = Deferred()
        return _Request(operation, writes, size, answer.callback), answer

    def _hold_waiting(self) -> None:
        """What waits changed: hold its bytes of the budget, and say whether
        so much waits that the client should not be read further.  (Requests
        already read wait either way; a refusal of the budget only stops the
        client being read until they start.)"""
        held = self.hold("waiting", self._waiting_bytes)
        waiting = self._waiting
        self.backlogged = bool(waiting) and (
            len(waiting) >= MAX_QUEUED_REQUESTS
            or self._waiting_bytes > self.limits.max_line_bytes or not held)

    def _write_room(self, size: int, count: int = 1) -> bool:
        """Whether *count* writes of *size* bytes in all may start now: this
        client's writes in flight, and everyone's, stay within their bounds
        (a request always may when none is in flight)."""
        limits = self.limits
        if self._writes_running and (
                self._writes_running + count > limits.max_client_writes
                or self._write_bytes_running + size > limits.max_client_write_bytes):
            return False  # _finished makes room
        if not self.store.has_write_room(size):
            self.store.when_write_room(self._advance)
            return False
        return True

    def _start(self, request: _Request) -> None:
        result = _call(request.operation)
        request.operation = None
        if is_deferred(result):
            self._started(request, result)
        else:
            request.state, request.outcome = _DONE, result

    def _started(self, request: _Request, outcome: Deferred) -> None:
        request.state = _RUNNING
        if request.writes:
            self._writes_running += request.writes
            self._write_bytes_running += request.size
        else:
            self._reads_running += 1
        outcome.addBoth(self._finished, request)

    def _finished(self, result: Any, request: _Request) -> None:
        if request.writes:
            self._writes_running -= request.writes
            self._write_bytes_running -= request.size
        else:
            self._reads_running -= 1
        request.state = _DONE
        request.outcome = outcome_of(result) if isinstance(result, Failure) else result
        self._advance()

    def _advance(self) -> None:
        """Answer the requests at the head that are done, and start the
        waiting requests that may start, until one has to wait."""
        if self._advancing:
            return  # the loop below, further up the stack, goes on
        self._advancing = True
        try:
            requests, waiting = self._requests, self._waiting
            while requests and not self._closed:
                head = requests[0]
                if head.state == _QUEUED:
                    if head.writes and not self._write_room(head.size, head.writes):
                        break
                    self._start(waiting.popleft())
                    self._waiting_bytes -= head.size
                    self._hold_waiting()
                if head.state == _DONE:
                    requests.popleft()
                    head.deliver(head.outcome)
                    continue
                break
            # A run of waiting writes with only writes before it starts
            # together (it shares a commit), up to the next read.
            while (waiting and waiting[0].writes and not self._reads_running
                   and not self._closed
                   and self._write_room(waiting[0].size, waiting[0].writes)):
                request = waiting.popleft()
                self._waiting_bytes -= request.size
                self._hold_waiting()
                self._start(request)
        finally:
            self._advancing = False

    def close(self) -> None:
        """The client is gone: drop what waits, end its watches."""
        if self._closed:
            return
        self._closed = True
        self._requests.clear()
        self._waiting.clear()
        self._waiting_bytes = 0
        self.backlogged = False
        self.budget.give(sum(self._held.values()), self.client.host)
        self._held.clear()
        self.unwatch()
        if self._on_close is not None:
            self._on_close(self)

    # The store, as this client

    def get(self, key: str) -> KeyValue | None:
        return self.store.get(key)

    def load(self, key: str) -> Any:
        return self.store.load(key)

    def ttl(self, key: str) -> float | None:
        return self.store.ttl(key)

    def range(self, prefix: str, limit: int | None = None,
              after: str | None = None) -> tuple[int, list[KeyValue], bool]:
        return self.store.range(prefix, limit, after)

    def changes(self, prefix: str, since: int) -> tuple[int, list[Event]]:
        return self.store.changes(prefix, since)

    def put(self, key: str, value: Any, prev_revision: int | None = None,
            ttl: float | None = None) -> Deferred:
        store = self.store
        written = store.put(key, value, prev_revision, ttl)
        return written.addCallback(self._put_logged) if store.log_changes else written

    def save(self, key: str, value: Any) -> Deferred:
        return self.put(key, value).addCallback(_nothing)

    def delete(self, key: str, prev_revision: int | None = None) -> Deferred:
        store = self.store
        deleted = store.delete(key, prev_revision)
        return deleted.addCallback(self._delete_logged, key) if store.log_changes else deleted

    def write_many(self, writes: list[tuple[str, str, Any, int | None, float | None]]) -> Deferred:
        """A run of writes sharing one commit (Store.write_many): fires with
        each one's outcome in order, never failing."""
        store = self.store
        made = store.write_many(writes)
        if not store.log_changes:
            return made
        # Only the keys are kept for the log: the values may be large.
        return made.addCallback(self._many_logged, [write[1] for write in writes])

    # Each change is logged once acknowledged, with who made it: the store
    # and its backends do not know the client.

    def _put_logged(self, kv: KeyValue) -> KeyValue:
        log_change(self.client, "put", kv.key, kv.mod_revision)
        return kv

    def _delete_logged(self, revision: int | None, key: str) -> int | None:
        if revision is not None:
            log_change(self.client, "delete", key, revision)
        return revision

    def _many_logged(self, outcomes: list[Any], keys: list[str]) -> list[Any]:
        for outcome, key in zip(outcomes, keys, strict=True):
            if type(outcome) is KeyValue:
                log_change(self.client, "put", key, outcome.mod_revision)
            elif type(outcome) is int:
                log_change(self.client, "delete", key, outcome)
        return outcomes

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    @property
    def stale(self) -> bool:
        return self.store.stale

    # Watches

    def watch(self, prefix: str, start: int | None,
              consumer: Callable[[int, Event], None]) -> tuple[int, int, list[Event]]:
        """Follow changes under *prefix*: (watch id, the feed's revision, the
        events replayed from revision *start* on, if given).  Every later
        change goes to *consumer* with the watch id, with no gap and no
        duplicate after the replay."""
        values.check_prefix(prefix, self.limits.max_key_bytes)
        if len(self._watches) >= self.limits.max_watches:
            raise errors.LimitExceeded(
                f"at most {self.limits.max_watches} watches per connection")
        feed = self.store.feed
        # Replay only what the feed has published (committed); everything
        # after that arrives live from the feed.
        replay: list[Event] = []
        if start is not None:
            if start < 1:
                raise errors.InvalidArgument("from must be a revision >= 1")
            _, events = self.store.changes(prefix, start - 1)
            replay = [event for event in events if event.revision <= feed.revision]
        watch_id = self._next_watch
        self._next_watch += 1
        self._watches[watch_id] = feed.subscribe(
            lambda event: consumer(watch_id, event), prefix)
        return watch_id, feed.revision, replay

    @property
    def watching(self) -> bool:
        return bool(self._watches)

    def unwatch(self, watch_id: int | None = None) -> int:
        """End one watch (InvalidArgument if there is none of that id), or
        all of them; returns how many ended."""
        if watch_id is None:
            ended = len(self._watches)
            for unsubscribe in self._watches.values():
                unsubscribe()
            self._watches.clear()
            return ended
        unsubscribe = self._watches.pop(watch_id, None)
        if unsubscribe is None:
            raise errors.InvalidArgument(f"no watch {watch_id} here")
        unsubscribe()
        return 1

    # UDP subscriptions, for this client's own host

    def subscribe(self, port: Any, prefix: Any, applied: Any = None) -> dict[str, Any]:
        """Make (or renew) a UDP subscription to *prefix* for this client's
        host at *port*; returns what a subscriber is told of it.  *applied*:
        the revision the subscriber reports it has applied, if it does."""
        subscriptions, address = self._udp_address(port)
        return subscriptions.description(
            subscriptions.subscribe_peer(address, prefix, self.identity, applied))

    def unsubscribe(self, port: Any, prefix: Any) -> bool:
        """End this client's subscription at *port* of its host; False if
        none.  (PermissionDenied for one another client made.)"""
        subscriptions, address = self._udp_address(port)
        return subscriptions.unsubscribe(address, prefix, self.identity) is not None

    @property
    def identity(self) -> str:
        """Who this client is, to own what it makes (its subscriptions)."""
        return "tcp"

    def _udp_address(self, port: Any) -> tuple[Subscriptions, tuple[str, Any]]:
        if self.subscriptions is None:
            raise errors.Unavailable("this server sends no UDP notifications")
        if self.client.host is None:
            raise errors.Unavailable("UDP subscriptions need a client with an IP address")
        return self.subscriptions, (self.client.host, port)


def _nothing(_: Any) -> None:
    return None


def budget_full(what: str, budget: Budget) -> errors.LimitExceeded:
    """The error for the budget's last refusal."""
    return errors.LimitExceeded(
        f"{what}: the server holds as much client data as it may ({budget.refusal}); "
        "try again shortly")


class Deadline:
    """A time limit on one unit of a client's input (a request head, a
    line): started when its first byte comes, stopped once it is complete,
    and *expired* is called if it is not complete in time."""

    def __init__(self, clock: IReactorTime, seconds: float,
                 expired: Callable[[], None]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.expired = expired
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """Start counting, unless already counting."""
        if self._call is None:
            self._call = self.clock.callLater(self.seconds, self._expire)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _expire(self) -> None:
        self._call = None
        self.expired()


class Sessions:
    """The sessions of one interface: one per connection, within the
    interface's connection limits (in total, and per IP address), and the
    interface's counters."""

    def __init__(self, store: Store, interface: str, limits: Limits | None = None,
                 subscriptions: Subscriptions | None = None,
                 counters: tuple[str, ...] = ()) -> None:
        self.store = store
        self.interface = interface
        self.limits = limits or store.limits
        self.subscriptions = subscriptions
        self.connections = 0
        self._per_host: dict[str, int] = {}
        #: Every open session, and its host (None: a peer without one).
        self._hosts: dict[Session, str | None] = {}
        #: The interface's own counters (the protocol counts in them), and
        #: the connections refused past the limits.
        self.counters = dict.fromkeys((*counters, "refused"), 0)
        #: Requests by operation, and errors answered by name (the protocol
        #: counts them; kvconfig.metrics reads them).
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        store.add_stats(interface, self.stats)

    def open(self, host: str | None = None) -> Session:
        """A session for a new connection from *host* (None: a peer without
        an IP address); its protocol tells it the peer once connected.

        Raises LimitExceeded (counted), saying which limit, when the
        interface or *host* has as many connections as it may.
        """
        limits = self.limits
        if self.connections >= limits.max_connections:
            self.counters["refused"] += 1
            raise errors.LimitExceeded(
                f"this interface has its {limits.max_connections} connections; try later")
        if host is not None and self._per_host.get(host, 0) >= limits.max_connections_per_address:
            self.counters["refused"] += 1
            raise errors.LimitExceeded(
                f"{host} has {limits.max_connections_per_address} connections to this "
                "interface, the most one address may have")
        self.connections += 1
        session = Session(self.store, Client(self.interface, host), limits,
                          self.subscriptions, self._closed)
        if host is not None:
            self._per_host[host] = self._per_host.get(host, 0) + 1
        self._hosts[session] = host
        return session

    def _closed(self, session: Session) -> None:
        self.connections -= 1
        host = self._hosts.pop(session, None)
        if host is not None:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def stats(self) -> dict[str, int]:
        return dict(self.counters, connections=self.connections)

    def watchers(self) -> int:
        """Open sessions with a watch."""
        return sum(1 for session in self._hosts if session.watching)
