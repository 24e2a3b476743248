"""The configurable limits every interface enforces, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def limit(default: int, help_: str) -> Any:
    """A limit's default, and the help text of its ``twistd kvconfig`` option."""
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class Limits:
    """Limits on what clients may send and on what the server keeps.

    Every one is a ``twistd kvconfig`` option named after the field
    (``max_key_bytes`` is ``--max-key-bytes``), with the help text given
    here; tap.py makes the options from this table, and a test holds the
    README's option table to it.
    """

    max_key_bytes: int = limit(1024, "Longest key, in UTF-8 bytes.")
    max_value_bytes: int = limit(1 << 20, "Longest encoded value, in bytes.")
    max_value_depth: int = limit(64, "Deepest nesting of lists and dicts in a value.")
    max_body_bytes: int = limit(8 << 20, "Largest XML-RPC request body, in bytes.")
    max_connections: int = limit(1000, "Most simultaneous connections per interface.")
    idle_timeout: int = limit(300, "Seconds before an idle connection is closed.")
    # Slowloris: a client that trickles a byte at a time keeps its slot no
    # longer than this.  (Line-mode telnet sends whole lines.)
    request_timeout: int = limit(
        10, "Seconds a client has to send a complete request head or line-protocol line.")
    max_connections_per_address: int = limit(
        128, "Most simultaneous connections per interface from one IP address.")
    listen_backlog: int = limit(
        1024, "Connections the kernel queues for each TCP port before they are accepted.")
    # Past these a client's requests wait (it is not read further) until its
    # writes are answered: backpressure, not an error.
    max_client_writes: int = limit(
        1024, "Most writes one client may have waiting for their commit.")
    max_client_write_bytes: int = limit(
        8 << 20, "Most bytes of writes one client may have waiting for their commit.")
    max_write_bytes: int = limit(
        64 << 20, "Most bytes of writes waiting for their commit, for all clients together.")
    max_buffer_bytes: int = limit(
        64 << 20, "Most bytes of client input (request bodies, partial lines, requests "
        "waiting) and watch backlogs held for all connections together.")
    # So that a few addresses cannot take what every other client needs.
    max_buffer_bytes_per_address: int = limit(
        16 << 20, "Most bytes of that held for the connections of one IP address.")
    max_multicall: int = limit(1000, "Most calls in one system.multicall.")
    # Without its LF; it must hold the largest value (see __post_init__).
    max_line_bytes: int = limit((1 << 20) + 4096, "Longest line-protocol line, in bytes.")
    max_watches: int = limit(100, "Most WATCHes per line-protocol connection.")
    max_watch_backlog: int = limit(
        10_000, "Events held for a watcher that is not reading before its watches end.")
    max_watch_backlog_bytes: int = limit(
        16 << 20, "Bytes of events held for a watcher that is not reading.")
    # A listing bigger than these is paged: the next page starts after the
    # last key of this one.
    max_list_items: int = limit(
        10_000, "Most keys in one page of a listing (keys, list, KEYS, LIST).")
    max_reply_bytes: int = limit(
        4 << 20, "Most bytes of keys and values in one page of a listing (past its first key).")
    history_events: int = limit(10_000, "Most change events kept for changes().")
    history_bytes: int = limit(64 << 20, "Most bytes of values kept in that history.")
    max_subscriptions: int = limit(10_000, "Most UDP subscriptions held at once.")
    max_subscriptions_per_prefix: int = limit(
        5_000, "Most UDP subscriptions to any one prefix.")
    max_subscriptions_per_host: int = limit(
        100, "Most UDP subscriptions one host may hold.")
    # The signature included.
    max_datagram_bytes: int = limit(
        1200, "Largest notification datagram; a value that does not fit is pulled.")
    # Also the burst; a skipped event is a gap, which the subscriber pulls.
    max_send_rate: int = limit(
        1000, "Most datagrams a second to one subscriber; past that events are skipped.")
    max_cookie_rate: int = limit(
        1000, "Most cookie answers a second to unproven UDP addresses of one network "
        "(/24, /64).")
    lease_seconds: int = limit(30, "Seconds a UDP subscription lives unless renewed.")
    heartbeat_seconds: int = limit(2, "Seconds between heartbeats to a subscriber.")
    max_clock_skew: int = limit(
        30, "Seconds a signed datagram's timestamp may be off (the replay window).")
    # Past it, the writer (sqlite) is deemed stalled, and replaced.
    commit_timeout: int = limit(
        10, "Seconds a write waits for its commit before it fails unavailable "
            "(it may or may not have been applied).")

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
        largest = max(self.max_body_bytes, self.max_line_bytes + 1)
        if self.max_buffer_bytes_per_address < largest:
            raise ValueError(f"max_buffer_bytes_per_address must be at least {largest} "
                             "(the largest request body or line)")
        # SET key <value> [EX n] [IF n] must fit on one line.
        needed = self.max_value_bytes + self.max_key_bytes + 64
        if self.max_line_bytes < needed:
            raise ValueError(f"max_line_bytes must be at least {needed} "
                             "(max_value_bytes + max_key_bytes + 64)")


def limit_options() -> list[tuple[str, str, int, str]]:
    """(option flag, field name, default, help) of every limit, in order."""
    return [(f.name.replace("_", "-"), f.name, f.default, f.metadata["help"])
            for f in fields(Limits)]
