"""
The server's UDP notifier: the UDP port's handshake, and the fan-out of
every change to the subscriptions whose prefix it falls under.

The fan-out never holds up a write's acknowledgement: a change is queued
when it is published and sent in slices of FAN_OUT_SLICE datagrams, one per
reactor turn, so that the acknowledgements (and every other client) are
served between them; changes go out in revision order, and each
subscription's sequence numbers count what was actually processed.
Heartbeats are spread over the interval the same way once there are many
subscriptions.

The wire format (datagram shapes, sealing, the cookie handshake) is
documented and implemented in kvconfig.udpwire, which the agent shares.
Subscriptions can also be made over TCP, for the caller's own peer address:
XML-RPC ``subscribe(prefix, udp_port)`` / ``unsubscribe(prefix, udp_port)``
and the line protocol's ``SUBSCRIBE``/``UNSUBSCRIBE``; the TCP handshake is
the proof of address there.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvconfig import errors
from kvconfig.limits import Limits
from kvconfig.model import Event
from kvconfig.store import Store
from kvconfig.subscriptions import NetworkRates, Subscription, Subscriptions
from kvconfig.udpwire import (
    MAX_REQUEST_BYTES,
    BadDatagram,
    Sealer,
    event_room,
    event_tails,
    heartbeat,
    signed_event_head,
)

#: Seconds in one cookie period; a cookie is good for this one and the next.
COOKIE_PERIOD = 60
#: Datagrams (events or heartbeats) sent in one turn of the reactor.
FAN_OUT_SLICE = 100
#: Changes waiting to be sent past which the oldest is skipped for every
#: subscription (each sees the gap and pulls) rather than held for ever.
MAX_OUTBOX = 10_000
#: Slices, at most, a round of heartbeats is spread over.
HEARTBEAT_SLICES = 20

_SURROGATE = re.compile("[\ud800-\udfff]")


class Notifier:
    """Sends each subscription its events and heartbeats, and answers the
    UDP port's requests.

    It consumes the store's change feed.  The subscriptions themselves are
    kept by the registry (kvconfig.subscriptions), through which the TCP
    interfaces subscribe too.  Datagrams go out through ``transport`` (a UDP
    port, set by NotifierProtocol), and are never queued: one that cannot
    be sent now is skipped and shows as a gap.
    """

    log = Logger()

    def __init__(self, store: Store, subscriptions: Subscriptions, limits: Limits,
                 clock: IReactorTime, secret: bytes | None = None) -> None:
        self.store = store
        self.subscriptions = subscriptions
        subscriptions.on_removed = self._forget
        self.limits = limits
        self.clock = clock
        self.sealer = Sealer(secret, clock, limits.max_clock_skew)
        self.transport = None
        self._cookie_key = os.urandom(32)
        self._cookie_rates = NetworkRates(limits.max_cookie_rate, clock.seconds())
        self._unsubscribe_feed: Callable[[], None] | None = None
        self._heartbeat = LoopingCall(self.tick)
        self._heartbeat.clock = clock
        self._heartbeat_call: Any = None
        # Changes queued for the fan-out, and the group being sent: (its
        # revision, the datagram tail, the subscriptions, how many are done, when it
        # started, for metrics).
        self._outbox: deque[Event] = deque()
        self._groups: deque[list] = deque()
        self._slice_call: Any = None
        self.counters = dict.fromkeys(
            ("datagrams_sent", "events_skipped", "send_errors", "heartbeats_sent",
             "heartbeats_skipped",
             "cookies_sent", "cookies_withheld", "refused"), 0)
        store.add_stats("udp", self.stats)
        #: Called with the seconds each change's fan-out took, from its first
        #: datagram's slice to its last (metrics).
        self.fan_out_observer: Callable[[float], None] | None = None

    # Life

    def start(self) -> None:
        self._unsubscribe_feed = self.store.feed.subscribe(self.notify)
        self._heartbeat.start(self.limits.heartbeat_seconds, now=False)

    def stop(self) -> None:
        if self._unsubscribe_feed is not None:
            self._unsubscribe_feed()
            self._unsubscribe_feed = None
        if self._heartbeat.running:
            self._heartbeat.stop()
        for call in (self._slice_call, self._heartbeat_call):
            if call is not None and call.active():
                call.cancel()
        self._slice_call = self._heartbeat_call = None
        self._outbox.clear()
        self._groups.clear()
        for subscription in self.subscriptions:
            self._forget(subscription)

    def stats(self) -> dict[str, int]:
        stats = {"subscriptions": len(self.subscriptions), **self.counters,
                 **self.subscriptions.counters}
        stats.update({f"dropped_{reason}": count
                      for reason, count in self.sealer.dropped.items()})
        return stats

    def _forget(self, subscription: Subscription) -> None:
        """A subscription ended: no catch-up heartbeat for it."""
        if subscription.behind is not None and subscription.behind.active():
            subscription.behind.cancel()

    # Requests on the UDP port

    def received(self, datagram: bytes, address: tuple[str, int]) -> None:
        """Handle one datagram from *address*; bad ones are counted and dropped."""
        if len(datagram) > MAX_REQUEST_BYTES:
            self.sealer.dropped["malformed"] += 1
            return
        try:
            message = self.sealer.open(datagram)
        except BadDatagram:
            return
        kind = message["t"]
        if kind not in ("subscribe", "unsubscribe"):
            self.sealer.dropped["malformed"] += 1
            return
        if not self._cookie_is_good(message.get("cookie"), address):
            self._send_cookie(len(datagram), address)
            return
        prefix = message.get("prefix")
        subscriptions = self.subscriptions
        try:
            if kind == "subscribe":
                answer = {"t": "subscribed", **subscriptions.description(
                    subscriptions.subscribe(address, prefix, applied=message.get("applied")))}
            else:
                subscription = subscriptions.unsubscribe(address, prefix)
                answer = {"t": "unsubscribed", "prefix": prefix,
                          "sub": None if subscription is None else subscription.id}
        except errors.KVConfigError as e:
            self.counters["refused"] += 1
            # JSON's "\ud800" decodes to a lone surrogate, which UTF-8
            # cannot carry back: such a prefix is not echoed.
            echo = prefix if type(prefix) is str and _SURROGATE.search(prefix) is None else None
            answer = {"t": "error", "prefix": echo,
                      "code": e.code, "error": e.name, "message": e.message}
        self._send(self.sealer.seal(answer), address)

    def cookie_for(self, address: tuple[str, int], period: int | None = None) -> str:
        if period is None:
            period = int(self.clock.seconds() // COOKIE_PERIOD)
        text = f"{address[0]}|{address[1]}|{period}".encode()
        return hmac.new(self._cookie_key, text, hashlib.sha256).hexdigest()[:32]

    def _cookie_is_good(self, cookie: Any, address: tuple[str, int]) -> bool:
        # compare_digest raises TypeError on non-ASCII text; no cookie is.
        if type(cookie) is not str or not cookie.isascii():
            return False
        period = int(self.clock.seconds() // COOKIE_PERIOD)
        return any(hmac.compare_digest(cookie, self.cookie_for(address, p))
                   for p in (period, period - 1))

    def _send_cookie(self, request_size: int, address: tuple[str, int]) -> None:
        answer = self.sealer.seal({"t": "cookie", "cookie": self.cookie_for(address)})
        # Never more bytes to an unproven address than it sent, and never
        # more than its network's cookie rate: no amplification, and a flood
        # from one network (spoofed or not) spends only that network's rate.
        if (len(answer) > request_size
                or not self._cookie_rates.take(address[0], self.clock.seconds())):
            self.counters["cookies_withheld"] += 1
            return
        if self._send(answer, address):
            self.counters["cookies_sent"] += 1

    # Sending

    def notify(self, event: Event) -> None:
        """The change feed's consumer: queue the change, to be sent (one
        datagram per subscription whose prefix the key is under) once the
        writes of this turn are acknowledged."""
        outbox = self._outbox
        outbox.append(event)
        if len(outbox) > MAX_OUTBOX:
            self._skip(outbox.popleft())
        if self._slice_call is None:
            self._slice_call = self.clock.callLater(0, self._fan_out_slice)

    def _fan_out_slice(self) -> None:
        """Send up to FAN_OUT_SLICE datagrams of the queued changes, in
        order; the rest in the next turn."""
        self._slice_call = None
        left = FAN_OUT_SLICE
        groups = self._groups
        try:
            while left > 0:
                if not groups:
                    if not self._outbox:
                        return
                    self._group(self._outbox.popleft())
                    continue
                group = groups[0]
                left -= self._fan_out(group, left)
                if group[3] == len(group[2]):
                    groups.popleft()
                    if self.fan_out_observer is not None:
                        self.fan_out_observer(perf_counter() - group[4])
        except Exception:
            # One bad change must not end every notification: subscribers
            # see the gap and pull.
            self.log.failure("the fan-out failed; its change is skipped")
            groups.clear()
        finally:
            if (groups or self._outbox) and self._slice_call is None:
                self._slice_call = self.clock.callLater(0, self._fan_out_slice)

    def _group(self, event: Event) -> None:
        """Queue the groups of *event*: the subscriptions under each prefix
        it falls under, taken now (one that ends meanwhile gets one datagram
        more; one made meanwhile waits for the next change)."""
        key, tail = event.key, None
        for prefix, subscriptions in self.subscriptions.by_prefix.items():
            if key.startswith(prefix):
                if tail is None:
                    tail = self._tail(event)
                self._groups.append([event.revision, tail, list(subscriptions.values()), 0,
                                     perf_counter()])

    def _skip(self, event: Event) -> None:
        """A change the fan-out is too far behind to send: it takes a seq
        number from each subscription all the same, so that each sees the
        gap and pulls."""
        key = event.key
        for prefix, subscriptions in self.subscriptions.by_prefix.items():
            if key.startswith(prefix):
                for subscription in subscriptions.values():
                    subscription.seq += 1
                    subscription.rev = event.revision
                    self._catch_up_later(subscription)
                self.counters["events_skipped"] += len(subscriptions)

    def _tail(self, event: Event) -> bytes:
        """The part of an event datagram after ``seq`` (the same for every
        subscriber): the fullest form that fits."""
        room = event_room(self.limits.max_datagram_bytes, self.sealer)
        kv = event.kv
        forms = event_tails(event.revision, event.type, event.key,
                            None if kv is None else kv.raw, event.expired)
        return next(form for form in forms if len(form) <= room)

    def _fan_out(self, group: list, most: int) -> int:
        """Send *group*'s next datagrams, at most *most*; how many it did."""
        revision, tail, subscriptions, done, _ = group
        batch = subscriptions[done:done + most]
        group[3] = done + len(batch)
        # The hot loop: at 10,000 subscribers it runs 10,000 times per
        # change, so it does little besides formatting and sendto.
        sendto = self._sendto()
        if sendto is None:
            for subscription in batch:
                subscription.seq += 1
                subscription.rev = revision
            self.counters["send_errors"] += len(batch)
            return len(batch)
        sealer = self.sealer
        signing = bool(sealer.secret)
        now = self.clock.seconds()
        sent = 0
        for subscription in batch:
            if subscription.ended:
                continue
            seq = subscription.seq = subscription.seq + 1
            subscription.rev = revision
            if not subscription.bucket.take(now):
                self.counters["events_skipped"] += 1
                self._catch_up_later(subscription)
                continue
            if signing:
                datagram = sealer.sign(b"%s%d%s" % (
                    signed_event_head(sealer, subscription.id), seq, tail))
            else:
                datagram = b"%s%d%s" % (subscription.event_head, seq, tail)
            try:
                sendto(datagram, subscription.address)
            except OSError as e:
                self._send_failed(subscription.address, e)
                self._catch_up_later(subscription)
            else:
                sent += 1
        self.counters["datagrams_sent"] += sent
        return len(batch)

    def _catch_up_later(self, subscription: Subscription) -> None:
        if subscription.behind is None or not subscription.behind.active():
            subscription.behind = self.clock.callLater(
                1 / self.limits.max_send_rate, self._heartbeat_to, subscription)

    def _heartbeat_to(self, subscription: Subscription) -> None:
        # Heartbeats count against the address's send rate as events do; one
        # skipped is sent again at the next tick (or catch-up).
        if not subscription.bucket.take(self.clock.seconds()):
            self.counters["heartbeats_skipped"] += 1
            return
        message = heartbeat(subscription.id, subscription.seq, subscription.rev,
                            self.store.revision)
        if self._send(self.sealer.seal(message), subscription.address):
            self.counters["heartbeats_sent"] += 1

    def tick(self) -> None:
        """Every heartbeat interval: expire leases, send heartbeats, spread
        over the interval in slices when there are many."""
        self.subscriptions.expire()
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()   # a round still under way: this one replaces it
        round_ = list(self.subscriptions)
        slices = max(1, min(HEARTBEAT_SLICES, -(-len(round_) // FAN_OUT_SLICE)))
        self._heartbeat_slice(round_, 0, -(-len(round_) // slices),
                              self.limits.heartbeat_seconds / slices)

    def _heartbeat_slice(self, round_: list[Subscription], start: int, size: int,
                         every: float) -> None:
        self._heartbeat_call = None
        for subscription in round_[start:start + size]:
            if not subscription.ended:
                self._heartbeat_to(subscription)
        if start + size < len(round_):
            self._heartbeat_call = self.clock.callLater(
                every, self._heartbeat_slice, round_, start + size, size, every)

    def _sendto(self) -> Callable[[bytes, tuple[str, int]], Any] | None:
        """The UDP socket's own sendto, or None before the port is bound.

        Every address was checked when it subscribed, so the checks of the
        port's write() (host syntax, address family), which cost as much as
        the system call, are skipped for events.
        """
        socket = getattr(self.transport, "socket", None)
        if socket is not None:
            return socket.sendto
        return None if self.transport is None else self.transport.write

    def _send(self, datagram: bytes, address: tuple[str, int]) -> bool:
        if self.transport is None:
            self.counters["send_errors"] += 1
            return False
        try:
            self.transport.write(datagram, address)
        except Exception as e:  # a full socket buffer, an unroutable address ...
            self._send_failed(address, e)
            return False
        return True

    def _send_failed(self, address: tuple[str, int], error: Exception) -> None:
        self.counters["send_errors"] += 1
        self.log.debug("cannot send to {address}: {error}", address=address, error=error)


class NotifierProtocol(DatagramProtocol):
    """The UDP port: hands datagrams to the notifier and lends it the port."""

    noisy = False  # no "Starting protocol" line: start-up logs the address

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def startProtocol(self) -> None:
        self.notifier.transport = self.transport
        self.notifier.subscriptions.bound_host = self.transport.getHost().host

    def stopProtocol(self) -> None:
        self.notifier.transport = None

    def datagramReceived(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.notifier.received(datagram, address)
