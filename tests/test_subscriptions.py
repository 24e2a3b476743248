"""The subscription registry and the token bucket (kvconfig.subscriptions),
without a notifier or a socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kvconfig import errors
from kvconfig.limits import Limits
from kvconfig.subscriptions import NetworkRates, Subscriptions, TokenBucket


def registry(**limits) -> Subscriptions:
    return Subscriptions(Limits(**limits), Clock(), lambda: 42)


def test_token_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(10, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(20)) == 10
    assert not bucket.take(0.05)
    assert bucket.take(0.1)
    # Idle time refills up to the burst, never beyond.
    assert sum(bucket.take(100.0) for _ in range(20)) == 10


@given(st.lists(st.floats(0, 0.5), max_size=200), st.integers(1, 50))
def test_token_bucket_never_allows_more_than_rate_times_time_plus_burst(gaps, rate):
    bucket, now, allowed = TokenBucket(rate, 0.0), 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.take(now)
    assert allowed <= rate * now + rate


def test_subscribe_renew_unsubscribe_and_describe():
    subs = registry(lease_seconds=30)
    first = subs.subscribe(("192.0.2.1", 4000), "app/")
    assert subs.subscribe(("192.0.2.1", 4000), "app/") is first
    assert subs.counters == {"subscribes": 1, "renewals": 1, "unsubscribes": 0, "expired": 0}
    assert subs.description(first) == {"sub": first.id, "prefix": "app/", "seq": 0, "rev": 0,
                                       "head": 42, "lease": 30, "heartbeat": 2}
    assert list(subs.by_prefix) == ["app/"]
    ended = []
    subs.on_removed = ended.append
    assert subs.unsubscribe(("192.0.2.1", 4000), "app/") is first
    assert subs.unsubscribe(("192.0.2.1", 4000), "app/") is None
    assert ended == [first] and len(subs) == 0 and subs.by_prefix == {}


def test_leases_expire_unless_renewed():
    subs = registry(lease_seconds=10, heartbeat_seconds=2)
    kept = subs.subscribe(("192.0.2.1", 4000), "a/")
    subs.subscribe(("192.0.2.2", 4000), "a/")
    subs.clock.advance(6)
    subs.subscribe(("192.0.2.1", 4000), "a/")
    subs.clock.advance(5)
    subs.expire()
    assert list(subs) == [kept] and subs.counters["expired"] == 1


def test_one_send_rate_per_address_whatever_its_prefixes():
    subs = registry()
    a = subs.subscribe(("192.0.2.1", 4000), "a/")
    b = subs.subscribe(("192.0.2.1", 4000), "b/")
    other = subs.subscribe(("192.0.2.1", 4001), "a/")
    assert a.bucket is b.bucket and other.bucket is not a.bucket
    subs.unsubscribe(("192.0.2.1", 4000), "a/")
    assert subs.subscribe(("192.0.2.1", 4000), "a/").bucket is b.bucket


def test_limits_in_total_and_per_prefix():
    subs = registry(max_subscriptions=3, max_subscriptions_per_prefix=2)
    subs.subscribe(("192.0.2.1", 1), "a/")
    subs.subscribe(("192.0.2.1", 2), "a/")
    with pytest.raises(errors.LimitExceeded):
        subs.subscribe(("192.0.2.1", 3), "a/")
    subs.subscribe(("192.0.2.1", 3), "b/")
    with pytest.raises(errors.LimitExceeded):
        subs.subscribe(("192.0.2.1", 4), "c/")
    assert set(subs.by_prefix) == {"a/", "b/"}  # refusals leave nothing behind


@pytest.mark.parametrize("bound, host", [("0.0.0.0", "::1"), ("::", "10.0.0.1"),
                                         ("127.0.0.1", "10.0.0.1"), ("::1", "fe80::1")])
def test_addresses_the_udp_port_cannot_reach_are_refused(bound, host):
    subs = registry()
    subs.bound_host = bound
    with pytest.raises(errors.InvalidArgument):
        subs.subscribe((host, 4000), "")


@pytest.mark.parametrize("port", [0, 65536, "4000", None, 1.5])
def test_bad_ports_are_refused(port):
    with pytest.raises(errors.InvalidArgument):
        registry().subscribe(("192.0.2.1", port), "")


def test_tcp_subscriptions_to_well_known_ports_are_refused():
    subs = registry()
    with pytest.raises(errors.InvalidArgument, match="below 1024"):
        subs.subscribe_peer(("192.0.2.1", 53), "", "tcp")
    assert subs.subscribe(("192.0.2.1", 53), "").address == ("192.0.2.1", 53)  # over UDP


def test_each_host_holds_at_most_its_quota():
    """One host gets at most max_subscriptions_per_host (one TCP connection
    took 9,998 of 10,000 slots); other hosts still get theirs; an ended one
    frees its host's place."""
    subs = registry(max_subscriptions_per_host=3)
    for port in (1001, 1002, 1003):
        subs.subscribe(("192.0.2.1", port), "a/")
    with pytest.raises(errors.LimitExceeded, match="192.0.2.1 holds 3"):
        subs.subscribe(("192.0.2.1", 1004), "a/")
    assert subs.subscribe(("192.0.2.2", 1001), "a/")
    subs.unsubscribe(("192.0.2.1", 1001), "a/")
    assert subs.subscribe(("192.0.2.1", 1004), "a/")


def test_only_its_maker_renews_or_cancels_a_subscription():
    """A subscription made over UDP (its address proved by a cookie) cannot
    be renewed or cancelled over TCP: another process on the host could
    otherwise end an agent's; one made over TCP by one caller not by
    another; the address itself may always do both."""
    subs = registry()
    agent = subs.subscribe(("192.0.2.1", 4000), "app/")
    with pytest.raises(errors.PermissionDenied, match="made over UDP"):
        subs.unsubscribe(("192.0.2.1", 4000), "app/", "tcp")
    with pytest.raises(errors.PermissionDenied):
        subs.subscribe_peer(("192.0.2.1", 4000), "app/", "tcp")
    assert list(subs) == [agent]
    mine = subs.subscribe_peer(("192.0.2.1", 5000), "app/", "tcp:alice")
    with pytest.raises(errors.PermissionDenied, match="another client"):
        subs.unsubscribe(("192.0.2.1", 5000), "app/", "tcp:mallory")
    assert subs.subscribe_peer(("192.0.2.1", 5000), "app/", "tcp:alice") is mine
    assert subs.subscribe(("192.0.2.1", 5000), "app/") is mine  # the address itself
    assert subs.unsubscribe(("192.0.2.1", 5000), "app/", "tcp:alice") is mine
    assert subs.unsubscribe(("192.0.2.1", 4000), "app/") is agent


def test_cookie_rates_are_per_source_network():
    """A flood from one /24 spends that network's rate only: another
    network still gets its answers; IPv6 hosts of one /64 share one."""
    rates = NetworkRates(10, now=0.0)
    flood = sum(rates.take(f"127.0.0.{i % 254 + 1}", 0.0) for i in range(1000))
    assert flood == 10
    assert rates.take("127.0.1.1", 0.0) and rates.take("10.0.0.1", 0.0)
    assert sum(rates.take(f"2001:db8::{i:x}", 0.0) for i in range(50)) == 10
    assert rates.take("2001:db8:0:1::1", 0.0)


def test_the_network_table_is_bounded_and_new_networks_earn_no_fresh_tokens():
    """Past its size, new networks share one overflow bucket unless an old
    one has been idle long enough to be full again."""
    rates = NetworkRates(5, now=0.0, networks=3)
    for net in range(3):
        assert rates.take(f"10.0.{net}.1", 0.0)
    spoofed = sum(rates.take(f"10.1.{net}.1", 0.0) for net in range(100))
    assert spoofed == 5  # the overflow bucket's burst, not 5 per network
    assert len(rates) == 3
    assert rates.take("10.9.9.9", 10.0)  # an idle old network made room
