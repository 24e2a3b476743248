"""The configurable limits every interface enforces, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Limits on what clients may send and on what the server keeps.

    Every one is a ``twistd kvconfig`` option; the defaults are those in the
    README.
    """

    #: Longest key, in bytes of its UTF-8 encoding.
    max_key_bytes: int = 1024
    #: Longest value, in bytes of its stored (tagged JSON) encoding.
    max_value_bytes: int = 1 << 20
    #: Deepest nesting of lists and dicts inside a value.
    max_value_depth: int = 64
    #: Largest XML-RPC request body; a larger one is discarded unread.
    max_body_bytes: int = 8 << 20
    #: Most simultaneous connections to one interface.
    max_connections: int = 1000
    #: Seconds an idle connection is kept open.
    idle_timeout: int = 300
    #: Most calls in one ``system.multicall``.
    max_multicall: int = 1000
    #: Longest line-protocol line (without its LF); must hold the largest value.
    max_line_bytes: int = (1 << 20) + 4096
    #: Most WATCHes on one line-protocol connection.
    max_watches: int = 100
    #: Most events held for a watcher that is not reading, before its
    #: watches are ended (slow_consumer).
    max_watch_backlog: int = 10_000
    #: Most bytes of such events held.
    max_watch_backlog_bytes: int = 16 << 20
    #: Most change events kept as history for ``changes(prefix, since)``.
    history_events: int = 10_000
    #: Most bytes of values kept in that history.
    history_bytes: int = 64 << 20
    #: Most UDP subscriptions held at once, and most on any one prefix.
    max_subscriptions: int = 10_000
    max_subscriptions_per_prefix: int = 5_000
    #: Largest notification datagram, signature included; a value that does
    #: not fit is announced without it, to be pulled.
    max_datagram_bytes: int = 1200
    #: Most datagrams a second to one subscriber (also its burst); past that
    #: events are skipped, which the subscriber sees as a gap and pulls.
    max_send_rate: int = 1000
    #: Most cookie answers a second to unproven addresses, in total.
    max_cookie_rate: int = 1000
    #: Seconds a subscription lives unless renewed.
    lease_seconds: int = 30
    #: Seconds between heartbeats to each subscriber.
    heartbeat_seconds: int = 2
    #: Seconds a signed datagram's timestamp may be off (replay window).
    max_clock_skew: int = 30

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not 512 <= self.max_datagram_bytes <= 65507:
            # 65507: the most one UDP datagram over IPv4 can carry.
            raise ValueError("max_datagram_bytes must be 512..65507")
        if self.heartbeat_seconds >= self.lease_seconds:
            # Leases are expired at heartbeat ticks, and a subscriber renews
            # several times a lease.
            raise ValueError("heartbeat_seconds must be less than lease_seconds")
        # SET key <value> [EX n] [IF n] must fit on one line.
        needed = self.max_value_bytes + self.max_key_bytes + 64
        if self.max_line_bytes < needed:
            raise ValueError(f"max_line_bytes must be at least {needed} "
                             "(max_value_bytes + max_key_bytes + 64)")
