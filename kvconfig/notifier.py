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
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvconfig import errors, values
from kvconfig.limits import Limits
from kvconfig.model import Event
from kvconfig.store import Store
from kvconfig.udpwire import (
    MAX_REQUEST_BYTES,
    BadDatagram,
    Sealer,
    event_head,
    event_room,
    event_tails,
    heartbeat,
    signed_event_head,
)

#: Seconds in one cookie period; a cookie is good for this one and the next.
COOKIE_PERIOD = 60

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(eq=False)
class SendBucket:
    """A token bucket for one address: the send rate is per address, so
    subscribing one port to many prefixes does not multiply it."""

    tokens: float
    refilled_at: float
    subscriptions: int = 0


@dataclass(eq=False)
class Subscription:
    """A lease on a key prefix held by one UDP address."""

    id: str
    address: tuple[str, int]
    prefix: str
    expires_at: float
    #: The send-rate bucket, shared by every subscription of this address.
    bucket: SendBucket
    #: The last sequence number used, and the revision of the last event.
    seq: int = 0
    rev: int = 0
    #: A catch-up heartbeat is due (events were skipped).
    behind: Any = field(default=None, repr=False)
    #: An unsigned event datagram up to its seq number, made once.
    event_head: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.event_head = event_head(self.id)

    def description(self, head: int, limits: Limits) -> dict[str, Any]:
        return {"sub": self.id, "prefix": self.prefix, "seq": self.seq, "rev": self.rev,
                "head": head, "lease": limits.lease_seconds,
                "heartbeat": limits.heartbeat_seconds}


class Notifier:
    """Holds the subscriptions and sends each of them its events.

    It consumes the store's change feed; ``received`` handles requests that
    arrive on the UDP port, and ``subscribe``/``unsubscribe`` serve the TCP
    interfaces.  Datagrams go out through ``transport`` (a UDP port, set by
    NotifierProtocol), and are never queued: one that cannot be sent now is
    skipped and shows as a gap.
    """

    log = Logger()

    def __init__(self, store: Store, limits: Limits, clock: IReactorTime,
                 secret: bytes | None = None) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self.sealer = Sealer(secret, clock, limits.max_clock_skew)
        self.transport = None
        #: The address the UDP port is bound to ("" while unknown).
        self.bound_host = ""
        self._cookie_key = os.urandom(32)
        self._subscriptions: dict[tuple[str, int, str], Subscription] = {}
        # prefix -> subscriptions to it: one encoding per prefix and event.
        self._by_prefix: dict[str, dict[tuple[str, int, str], Subscription]] = {}
        self._buckets: dict[tuple[str, int], SendBucket] = {}
        self._cookie_tokens = float(limits.max_cookie_rate)
        self._cookie_refilled_at = clock.seconds()
        self._unsubscribe_feed: Callable[[], None] | None = None
        self._heartbeat = LoopingCall(self.tick)
        self._heartbeat.clock = clock
        self.counters = dict.fromkeys(
            ("datagrams_sent", "events_skipped", "send_errors", "heartbeats_sent",
             "cookies_sent", "cookies_withheld", "subscribes", "renewals",
             "unsubscribes", "expired", "refused"), 0)

    # Life

    def start(self) -> None:
        self._unsubscribe_feed = self.store.feed.subscribe(self.publish)
        self._heartbeat.start(self.limits.heartbeat_seconds, now=False)

    def stop(self) -> None:
        if self._unsubscribe_feed is not None:
            self._unsubscribe_feed()
            self._unsubscribe_feed = None
        if self._heartbeat.running:
            self._heartbeat.stop()
        for subscription in self._subscriptions.values():
            if subscription.behind is not None and subscription.behind.active():
                subscription.behind.cancel()

    def stats(self) -> dict[str, int]:
        stats = {"subscriptions": len(self._subscriptions), **self.counters}
        stats.update({f"dropped_{reason}": count
                      for reason, count in self.sealer.dropped.items()})
        return stats

    # Subscriptions

    def subscribe(self, address: tuple[str, int], prefix: Any) -> Subscription:
        """Create *address*'s subscription to *prefix*, or renew its lease."""
        values.check_prefix(prefix, self.limits.max_key_bytes)
        host, port = self._check_address(address)
        now = self.clock.seconds()
        index = (host, port, prefix)
        subscription = self._subscriptions.get(index)
        if subscription is not None:
            subscription.expires_at = now + self.limits.lease_seconds
            self.counters["renewals"] += 1
            return subscription
        if len(self._subscriptions) >= self.limits.max_subscriptions:
            raise errors.LimitExceeded(
                f"{self.limits.max_subscriptions} subscriptions is the limit")
        same_prefix = self._by_prefix.setdefault(prefix, {})
        if len(same_prefix) >= self.limits.max_subscriptions_per_prefix:
            raise errors.LimitExceeded(
                f"{self.limits.max_subscriptions_per_prefix} subscriptions to one "
                "prefix is the limit")
        bucket = self._buckets.get((host, port))
        if bucket is None:
            bucket = self._buckets[(host, port)] = SendBucket(
                float(self.limits.max_send_rate), now)
        bucket.subscriptions += 1
        subscription = Subscription(
            id=os.urandom(8).hex(), address=(host, port), prefix=prefix,
            expires_at=now + self.limits.lease_seconds, bucket=bucket)
        self._subscriptions[index] = same_prefix[index] = subscription
        self.counters["subscribes"] += 1
        return subscription

    def subscribe_peer(self, address: tuple[str, int], prefix: Any) -> Subscription:
        """subscribe() for a TCP caller: its host is proven by the TCP
        handshake, but its port is not, so the well-known ports (DNS, NTP,
        syslog ...) that a caller could aim datagrams at are refused."""
        if type(address[1]) is int and address[1] < 1024:
            raise errors.InvalidArgument(
                f"port {address[1]} is below 1024; subscribe over UDP to use it")
        return self.subscribe(address, prefix)

    def unsubscribe(self, address: tuple[str, int], prefix: Any) -> Subscription | None:
        """End *address*'s subscription to *prefix*; returns it, or None."""
        values.check_prefix(prefix, self.limits.max_key_bytes)
        host, port = self._check_address(address)
        subscription = self._remove((host, port, prefix))
        if subscription is not None:
            self.counters["unsubscribes"] += 1
        return subscription

    def _check_address(self, address: tuple[str, int]) -> tuple[str, int]:
        """*address*, if datagrams can be sent to it from the UDP port."""
        host, port = address
        if type(port) is not int or not 0 < port < 65536:
            raise errors.InvalidArgument(f"port must be 1..65535, not {errors.brief(port)}")
        bound = self.bound_host
        if bound and (":" in bound) != (":" in host):
            raise errors.InvalidArgument(
                f"the UDP port is bound to {bound}, which cannot send to {host}")
        if _is_loopback(bound) and not _is_loopback(host):
            raise errors.InvalidArgument(
                f"the UDP port is bound to {bound}, which cannot send to {host}; "
                "see --udp")
        return host, port

    def _remove(self, index: tuple[str, int, str]) -> Subscription | None:
        subscription = self._subscriptions.pop(index, None)
        if subscription is None:
            return None
        same_prefix = self._by_prefix[subscription.prefix]
        del same_prefix[index]
        if not same_prefix:
            del self._by_prefix[subscription.prefix]
        if subscription.behind is not None and subscription.behind.active():
            subscription.behind.cancel()
        subscription.bucket.subscriptions -= 1
        if not subscription.bucket.subscriptions:
            del self._buckets[subscription.address]
        return subscription

    def description(self, subscription: Subscription) -> dict[str, Any]:
        """What a subscriber is told about its subscription."""
        return subscription.description(self.store.revision, self.limits)

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
        try:
            if kind == "subscribe":
                answer = {"t": "subscribed", **self.description(self.subscribe(address, prefix))}
            else:
                subscription = self.unsubscribe(address, prefix)
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
        # more than the cookie rate in all: no reflection, no amplification.
        if len(answer) > request_size or not self._take_cookie_token():
            self.counters["cookies_withheld"] += 1
            return
        if self._send(answer, address):
            self.counters["cookies_sent"] += 1

    def _take_cookie_token(self) -> bool:
        now = self.clock.seconds()
        rate = self.limits.max_cookie_rate
        self._cookie_tokens = min(rate, self._cookie_tokens + (now - self._cookie_refilled_at)
                                  * rate)
        self._cookie_refilled_at = now
        if self._cookie_tokens < 1:
            return False
        self._cookie_tokens -= 1
        return True

    # Sending

    def publish(self, event: Event) -> None:
        """The change feed's consumer: one datagram per subscription whose
        prefix the key is under."""
        try:
            self._publish(event)
        except Exception:
            # The feed drops a consumer that raises; one bad event must not
            # end every notification.  Subscribers see the gap and pull.
            self.log.failure("cannot notify revision {revision}", revision=event.revision)

    def _publish(self, event: Event) -> None:
        key = event.key
        tail = None
        for prefix, subscriptions in self._by_prefix.items():
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
        rate = self.limits.max_send_rate
        sent = 0
        for subscription in subscriptions.values():
            seq = subscription.seq = subscription.seq + 1
            subscription.rev = revision
            # Token bucket: refilled by elapsed time, capped at one second's worth.
            bucket = subscription.bucket
            tokens = bucket.tokens + (now - bucket.refilled_at) * rate
            bucket.refilled_at = now
            if tokens < 1:
                bucket.tokens = tokens
                self.counters["events_skipped"] += 1
                self._catch_up_later(subscription)
                continue
            bucket.tokens = (rate if tokens > rate else tokens) - 1
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
        message = heartbeat(subscription.id, subscription.seq, subscription.rev,
                            self.store.revision)
        if self._send(self.sealer.seal(message), subscription.address):
            self.counters["heartbeats_sent"] += 1

    def tick(self) -> None:
        """Every heartbeat interval: expire leases, send heartbeats."""
        now = self.clock.seconds()
        for index, subscription in list(self._subscriptions.items()):
            if subscription.expires_at <= now:
                self._remove(index)
                self.counters["expired"] += 1
            else:
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


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


class NotifierProtocol(DatagramProtocol):
    """The UDP port: hands datagrams to the notifier and lends it the port."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def startProtocol(self) -> None:
        self.notifier.transport = self.transport
        self.notifier.bound_host = self.transport.getHost().host

    def stopProtocol(self) -> None:
        self.notifier.transport = None

    def datagramReceived(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.notifier.received(datagram, address)
