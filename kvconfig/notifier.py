"""
The server's UDP notifier: the UDP port's handshake, and the fan-out of
every change to the subscriptions whose prefix it falls under.

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
        self.counters = dict.fromkeys(
            ("datagrams_sent", "events_skipped", "send_errors", "heartbeats_sent",
             "heartbeats_skipped",
             "cookies_sent", "cookies_withheld", "refused"), 0)
        store.add_stats("udp", self.stats)
        #: Called with the seconds each change's fan-out took (metrics).
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
        """The change feed's consumer: one datagram per subscription whose
        prefix the key is under."""
        started = perf_counter()
        try:
            self._fan_out_event(event)
            if self.fan_out_observer is not None:
                self.fan_out_observer(perf_counter() - started)
        except Exception:
            # The feed drops a consumer that raises; one bad event must not
            # end every notification.  Subscribers see the gap and pull.
            self.log.failure("cannot notify revision {revision}", revision=event.revision)

    def _fan_out_event(self, event: Event) -> None:
        key = event.key
        tail = None
        for prefix, subscriptions in self.subscriptions.by_prefix.items():
            if not key.startswith(prefix):
                continue
            if tail is None:
                tail = self._tail(event)
            self._fan_out(event.revision, tail, subscriptions)

    def _tail(self, event: Event) -> bytes:
        """The part of an event datagram after ``seq`` (the same for every
        subscriber): the fullest form that fits."""
        room = event_room(self.limits.max_datagram_bytes, self.sealer)
        kv = event.kv
        forms = event_tails(event.revision, event.type, event.key,
                            None if kv is None else kv.raw, event.expired)
        return next(form for form in forms if len(form) <= room)

    def _fan_out(self, revision: int, tail: bytes,
                 subscriptions: dict[Any, Subscription]) -> None:
        # The hot loop: at 1,000 subscribers it runs 1,000 times per change,
        # so it does little besides formatting and sendto.
        sendto = self._sendto()
        if sendto is None:
            for subscription in subscriptions.values():
                subscription.seq += 1
                subscription.rev = revision
            self.counters["send_errors"] += len(subscriptions)
            return
        sealer = self.sealer
        signing = bool(sealer.secret)
        now = self.clock.seconds()
        sent = 0
        for subscription in subscriptions.values():
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
        """Every heartbeat interval: expire leases, send heartbeats."""
        self.subscriptions.expire()
        for subscription in self.subscriptions:
            self._heartbeat_to(subscription)

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
