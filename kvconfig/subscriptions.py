"""
UDP subscriptions: the registry every interface subscribes through, with no I/O.

A subscription is a lease on a key prefix held by one UDP address (host,
port).  It is made, renewed and cancelled here, whichever way it was asked
for: a UDP ``subscribe`` whose address the notifier has proven with a
cookie, or a TCP call (XML-RPC ``subscribe``, line ``SUBSCRIBE``) for the
caller's own host, through its Session.  The registry keeps the limits (in
total and per prefix), the address policy (what the UDP port can reach;
no well-known ports over TCP) and each address's send rate.  The notifier
(kvconfig.notifier) only sends: it fans each change out to the
subscriptions under its key and sends their heartbeats.

A subscription belongs to whoever made it: one made over UDP to its
address (which proves itself with its cookie), one made over TCP to that
caller (its host; with users, its user).  Only its owner renews or cancels
it, so another process on the host cannot end an agent's subscription.
Each host holds at most --max-subscriptions-per-host of them.

``TokenBucket`` is the one rate limit kvconfig uses wherever a rate is
limited; ``NetworkRates`` keeps one per source network (/24, /64).
"""

from __future__ import annotations

import ipaddress
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from kvconfig import errors, values
from kvconfig.limits import Limits
from kvconfig.udpwire import event_head

Address = tuple[str, int]
Index = tuple[str, int, str]


class TokenBucket:
    """*rate* a second, with a burst of *burst* (default: one second's worth):
    ``take`` says whether one more is allowed now, and counts it if so."""

    __slots__ = ("rate", "burst", "tokens", "refilled_at")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.tokens = float(self.burst)
        self.refilled_at = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.refilled_at) * self.rate
        self.refilled_at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        burst = self.burst
        self.tokens = (burst if tokens > burst else tokens) - 1
        return True


def network_of(host: str) -> str:
    """The /24 of an IPv4 host, the /64 of an IPv6 one: what one site (or
    one spoofer) is likely to send from."""
    if ":" not in host:
        return host.rpartition(".")[0]
    try:
        return ipaddress.IPv6Address(host).exploded[:19]
    except ValueError:
        return host


class NetworkRates:
    """A TokenBucket per source network, for the most recent *networks* of
    them: a flood from one network (spoofed or not) spends its own rate,
    not everyone's.  Past *networks*, a network idle long enough for its
    bucket to be full again makes room; if none is, new networks share one
    overflow bucket, so that the table stays bounded and no stream of new
    networks earns fresh tokens."""

    def __init__(self, rate: float, now: float, networks: int = 4096) -> None:
        self.rate = rate
        self.networks = networks
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._overflow = TokenBucket(rate, now)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, host: str, now: float) -> bool:
        network = network_of(host)
        buckets = self._buckets
        bucket = buckets.get(network)
        if bucket is not None:
            buckets.move_to_end(network)
            return bucket.take(now)
        if len(buckets) >= self.networks:
            oldest = next(iter(buckets.values()))
            if now - oldest.refilled_at < oldest.burst / oldest.rate:
                return self._overflow.take(now)
            buckets.popitem(last=False)
        bucket = buckets[network] = TokenBucket(self.rate, now)
        return bucket.take(now)


#: Who made a subscription over UDP: its address itself.
BY_ADDRESS = "udp"


@dataclass(eq=False)
class Subscription:
    """A lease on a key prefix held by one UDP address."""

    id: str
    address: Address
    prefix: str
    expires_at: float
    #: The send rate, shared by every subscription of this address: the
    #: rate is per address, so subscribing one port to many prefixes does
    #: not multiply it.
    bucket: TokenBucket
    #: The last sequence number used, and the revision of the last event.
    seq: int = 0
    rev: int = 0
    #: Who made it, and so may renew or cancel it: BY_ADDRESS, or the TCP
    #: caller's identity.
    owner: str = BY_ADDRESS
    #: The revision the subscriber last reported it has applied (None: it
    #: does not report), and when it was last heard from (made or renewed).
    applied: int | None = None
    last_heard: float = 0.0
    #: The notifier's catch-up heartbeat timer, while one is due.
    behind: Any = field(default=None, repr=False)
    #: Set when it ends: a fan-out or heartbeat round under way skips it.
    ended: bool = False
    #: An unsigned event datagram up to its seq number, made once.
    event_head: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.event_head = event_head(self.id)


class Subscriptions:
    """Every subscription, by address and prefix, and by prefix for the fan-out."""

    def __init__(self, limits: Limits, clock: IReactorTime,
                 revision: Callable[[], int]) -> None:
        """*revision* gives the store's revision, which subscribers are told."""
        self.limits = limits
        self.clock = clock
        self._revision = revision
        #: The address the UDP port is bound to ("" while unknown).
        self.bound_host = ""
        #: Called with each subscription as it ends (cancelled or expired).
        self.on_removed: Callable[[Subscription], None] | None = None
        self._subscriptions: dict[Index, Subscription] = {}
        #: prefix -> its subscriptions: one encoding per prefix and event.
        self.by_prefix: dict[str, dict[Index, Subscription]] = {}
        # address -> its send rate, and how many subscriptions share it
        self._buckets: dict[Address, TokenBucket] = {}
        self._bucket_users: dict[Address, int] = {}
        self._per_host: dict[str, int] = {}
        self.counters = dict.fromkeys(("subscribes", "renewals", "unsubscribes", "expired"), 0)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subscriptions.values()))

    def subscribe(self, address: Address, prefix: Any,
                  owner: str = BY_ADDRESS, applied: Any = None) -> Subscription:
        """Create *address*'s subscription to *prefix*, or renew its lease.

        *owner* is who asks: BY_ADDRESS when the address itself proved it
        receives (a UDP cookie round trip), which may renew any of its
        subscriptions; a TCP caller's identity, which may renew only what it
        made (PermissionDenied otherwise).  *applied*: the revision the
        subscriber reports it has applied (kept, to show its lag), if given.
        """
        values.check_prefix(prefix, self.limits.max_key_bytes)
        host, port = self._check_address(address)
        if applied is not None and (type(applied) is not int or applied < 0):
            raise errors.InvalidArgument(
                f"applied must be a revision (an integer >= 0), not {errors.brief(applied)}")
        now = self.clock.seconds()
        index = (host, port, prefix)
        subscription = self._subscriptions.get(index)
        if subscription is not None:
            self._check_owner(subscription, owner, "renew")
            subscription.expires_at = now + self.limits.lease_seconds
            subscription.last_heard = now
            if applied is not None:
                subscription.applied = applied
            self.counters["renewals"] += 1
            return subscription
        limits = self.limits
        if len(self._subscriptions) >= limits.max_subscriptions:
            raise errors.LimitExceeded(
                f"{limits.max_subscriptions} subscriptions is the limit")
        if self._per_host.get(host, 0) >= limits.max_subscriptions_per_host:
            raise errors.LimitExceeded(
                f"{host} holds {limits.max_subscriptions_per_host} subscriptions, the most "
                "one host may")
        same_prefix = self.by_prefix.get(prefix, {})
        if len(same_prefix) >= self.limits.max_subscriptions_per_prefix:
            raise errors.LimitExceeded(
                f"{self.limits.max_subscriptions_per_prefix} subscriptions to one "
                "prefix is the limit")
        bucket = self._buckets.get((host, port))
        if bucket is None:
            bucket = self._buckets[(host, port)] = TokenBucket(self.limits.max_send_rate, now)
        self._bucket_users[(host, port)] = self._bucket_users.get((host, port), 0) + 1
        subscription = Subscription(
            id=os.urandom(8).hex(), address=(host, port), prefix=prefix,
            expires_at=now + self.limits.lease_seconds, bucket=bucket, owner=owner,
            applied=applied, last_heard=now)
        self._per_host[host] = self._per_host.get(host, 0) + 1
        self._subscriptions[index] = subscription
        self.by_prefix.setdefault(prefix, {})[index] = subscription
        self.counters["subscribes"] += 1
        return subscription

    def subscribe_peer(self, address: Address, prefix: Any, caller: str,
                       applied: Any = None) -> Subscription:
        """subscribe() for the TCP caller *caller* (an identity, "tcp" or
        "tcp:<user>"): its host is proven by the TCP handshake, but its port
        is not, so the well-known ports (DNS, NTP, syslog ...) that a caller
        could aim datagrams at are refused."""
        if type(address[1]) is int and address[1] < 1024:
            raise errors.InvalidArgument(
                f"port {address[1]} is below 1024; subscribe over UDP to use it")
        return self.subscribe(address, prefix, caller, applied)

    def unsubscribe(self, address: Address, prefix: Any,
                    owner: str = BY_ADDRESS) -> Subscription | None:
        """End *address*'s subscription to *prefix*, for *owner* (as in
        subscribe: the address itself may end any of its own, a TCP caller
        only what it made); returns it, or None if there was none."""
        values.check_prefix(prefix, self.limits.max_key_bytes)
        host, port = self._check_address(address)
        index = (host, port, prefix)
        subscription = self._subscriptions.get(index)
        if subscription is None:
            return None
        self._check_owner(subscription, owner, "cancel")
        self._remove(index)
        self.counters["unsubscribes"] += 1
        return subscription

    @staticmethod
    def _check_owner(subscription: Subscription, asker: str, doing: str) -> None:
        if asker != BY_ADDRESS and asker != subscription.owner:
            made = ("over UDP by its address" if subscription.owner == BY_ADDRESS
                    else "by another client")
            raise errors.PermissionDenied(
                f"the subscription of {subscription.address[0]}:{subscription.address[1]} "
                f"to {subscription.prefix!r} was made {made}; only its maker may {doing} it")

    def expire(self) -> None:
        """End every subscription whose lease has run out."""
        now = self.clock.seconds()
        for index, subscription in list(self._subscriptions.items()):
            if subscription.expires_at <= now:
                self._remove(index)
                self.counters["expired"] += 1

    def description(self, subscription: Subscription) -> dict[str, Any]:
        """What a subscriber is told about its subscription."""
        return {"sub": subscription.id, "prefix": subscription.prefix,
                "seq": subscription.seq, "rev": subscription.rev,
                "head": self._revision(), "lease": self.limits.lease_seconds,
                "heartbeat": self.limits.heartbeat_seconds}

    def lag(self, subscription: Subscription) -> int | None:
        """How many revisions the subscriber is behind the store (the
        store's revision minus the one it applied), or None if it does not
        say what it applied."""
        if subscription.applied is None:
            return None
        return max(0, self._revision() - subscription.applied)

    def stats(self) -> dict[str, int]:
        """How far behind the subscribers that report are: the most
        revisions any is behind, and how many report."""
        lags = [lag for lag in map(self.lag, self._subscriptions.values()) if lag is not None]
        return {"reporting": len(lags), "max_lag": max(lags, default=0)}

    def _check_address(self, address: Address) -> Address:
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

    def _remove(self, index: Index) -> Subscription | None:
        subscription = self._subscriptions.pop(index, None)
        if subscription is None:
            return None
        same_prefix = self.by_prefix[subscription.prefix]
        del same_prefix[index]
        if not same_prefix:
            del self.by_prefix[subscription.prefix]
        address = subscription.address
        left = self._per_host[address[0]] - 1
        if left:
            self._per_host[address[0]] = left
        else:
            del self._per_host[address[0]]
        self._bucket_users[address] -= 1
        if not self._bucket_users[address]:
            del self._buckets[address], self._bucket_users[address]
        subscription.ended = True
        if self.on_removed is not None:
            self.on_removed(subscription)
        return subscription


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"
