"""The UDP notifier (kvconfig.notifier), driven in memory: a Clock, a memory
store, and a fake datagram transport that records every ``(datagram, address)``."""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import json
import math
import re
from datetime import datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from kvconfig import errors, values
from kvconfig.notifier import COOKIE_PERIOD, FAN_OUT_SLICE, Notifier, NotifierProtocol
from kvconfig.subscriptions import Subscriptions
from kvconfig.udpwire import DROP_REASONS, MAX_REQUEST_BYTES, BadDatagram, Sealer

from faults import INVALID_KEY, KEY_TOO_LARGE
from stores import clocked_store
from test_values import xmlrpc_values

LIMIT_EXCEEDED = (9, "limit_exceeded")
ADDRESS = ("192.0.2.1", 40000)
OTHER = ("192.0.2.2", 40001)
SECRET = b"a shared secret of 32 bytes, ok!"
HEX16 = re.compile(r"[0-9a-f]{16}")
SURROGATE = re.compile("[\ud800-\udfff]")
SIGNED = re.compile(rb"(\{[^\n]*\})\n([0-9a-f]{64})")


class RecordingTransport:
    """A datagram transport that records every ``(datagram, address)`` written."""

    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, addr: tuple[str, int] | None = None) -> None:
        assert type(datagram) is bytes
        self.written.append((datagram, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "0.0.0.0", 15002)


class RaisingTransport:
    """A datagram transport whose every write fails, as a full socket buffer does."""

    def __init__(self) -> None:
        self.attempts = 0

    def write(self, datagram: bytes, addr: tuple[str, int] | None = None) -> None:
        self.attempts += 1
        raise OSError(errno.ENOBUFS, "No buffer space available")


class UDP:
    """A started Notifier on a memory store and a Clock, behind a
    NotifierProtocol on a RecordingTransport, and a subscriber's Sealer."""

    def __init__(self, secret: bytes | None = None, **limits) -> None:
        self.secret = secret
        self.store = clocked_store(**limits)
        self.clock: Clock = self.store.backend.clock
        self.limits = self.store.limits
        self.subscriptions = Subscriptions(self.limits, self.clock, lambda: self.store.revision)
        self.notifier = Notifier(self.store, self.subscriptions, self.limits, self.clock, secret)
        self.transport = RecordingTransport()
        self.protocol = NotifierProtocol(self.notifier)
        self.protocol.makeConnection(self.transport)
        self.notifier.start()
        # The subscriber's end, with the same secret and clock.
        self.peer = Sealer(secret, self.clock, self.limits.max_clock_skew)

    # What the notifier sent

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        written, self.transport.written = self.transport.written, []
        return written

    def open(self, datagram: bytes) -> dict:
        """The message in a datagram the notifier sent, checked as the wire
        format says, without ``ts`` and ``nonce``."""
        if self.secret:
            match = SIGNED.fullmatch(datagram)
            assert match, datagram
            body, mac = match.groups()
            assert mac == hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode()
        else:
            body = datagram
            assert b"\n" not in datagram
        message = json.loads(body.decode("utf-8"))
        assert self.peer.open(datagram) == message
        assert list(message)[0] == "v" and message.pop("v") == 1
        if self.secret:
            assert type(message.pop("ts")) in (int, float)
            assert HEX16.fullmatch(message.pop("nonce"))
        else:
            assert "ts" not in message and "nonce" not in message
        return message

    def messages(self, address: tuple[str, int] = ADDRESS) -> list[dict]:
        """Every message sent since the last take; all must be to *address*."""
        out = []
        for datagram, to in self.take():
            assert to == address
            out.append(self.open(datagram))
        return out

    # What a subscriber sends

    def request(self, kind: str, prefix, cookie=None, address=ADDRESS,
                pad: int = 256) -> list[dict]:
        """Send one request from *address*; the messages it was answered with."""
        message = {"t": kind, "prefix": prefix}
        if cookie is not None:
            message["cookie"] = cookie
        if pad:
            message["pad"] = "x" * pad
        self.protocol.datagramReceived(self.peer.seal(message), address)
        return self.messages(address)

    def cookie(self, address=ADDRESS) -> str:
        (answer,) = self.request("subscribe", "", address=address)
        assert answer == {"t": "cookie", "cookie": self.notifier.cookie_for(address)}
        return answer["cookie"]

    def subscribe(self, prefix: str, address=ADDRESS) -> dict:
        """The cookie round trip and the subscribe: the ``subscribed`` answer."""
        (answer,) = self.request("subscribe", prefix, self.cookie(address), address)
        assert answer["t"] == "subscribed", answer
        return answer

    # The store

    def put(self, key: str, value, **options) -> None:
        results = []
        self.store.put(key, value, **options).addBoth(results.append)
        self.clock.advance(0)
        assert len(results) == 1 and results[0].key == key, results

    def delete(self, key: str) -> None:
        results = []
        self.store.delete(key).addBoth(results.append)
        self.clock.advance(0)
        assert len(results) == 1 and type(results[0]) is int, results

    def wait(self, seconds: int) -> None:
        """Let *seconds* pass in steps of the heartbeat interval (a Clock
        advanced by more at once runs a LoopingCall only once)."""
        step = self.limits.heartbeat_seconds
        for _ in range(seconds // step):
            self.clock.advance(step)

    def by_sub(self) -> dict[str, tuple[tuple[str, int], dict]]:
        """sub -> (address, message) of what was sent since the last take,
        one message per subscription."""
        sent = [(to, self.open(datagram)) for datagram, to in self.take()]
        by_sub = {message["sub"]: (to, message) for to, message in sent}
        assert len(by_sub) == len(sent)
        return by_sub

    def stats(self) -> dict:
        return self.notifier.stats()


def subscribed(sub: str, prefix: str, seq: int = 0, rev: int = 0, head: int = 0,
               lease: int = 30, heartbeat: int = 2) -> dict:
    return {"t": "subscribed", "sub": sub, "prefix": prefix, "seq": seq, "rev": rev,
            "head": head, "lease": lease, "heartbeat": heartbeat}


def event(sub: str, seq: int, rev: int, **fields) -> dict:
    return {"t": "event", "sub": sub, "seq": seq, "rev": rev, **fields}


def heartbeat(sub: str, seq: int, rev: int, head: int) -> dict:
    return {"t": "heartbeat", "sub": sub, "seq": seq, "rev": rev, "head": head}


def error(prefix, code_name: tuple[int, str], message: str) -> dict:
    code, name = code_name
    return {"t": "error", "prefix": prefix, "code": code, "error": name, "message": message}


plain_and_signed = pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "signed"])


# The cookie round trip, and no amplification or reflection


@plain_and_signed
def test_subscribe_is_a_cookie_round_trip(secret):
    """A subscribe without a cookie is answered with the address's cookie
    only; the same subscribe with it creates the subscription, answered in full."""
    udp = UDP(secret)
    udp.put("other", 1)
    cookie = udp.cookie()
    assert re.fullmatch("[0-9a-f]{32}", cookie)
    assert udp.stats()["subscriptions"] == 0
    (answer,) = udp.request("subscribe", "app/", cookie)
    assert HEX16.fullmatch(answer["sub"])
    assert answer == subscribed(answer["sub"], "app/", head=1)
    stats = udp.stats()
    assert (stats["subscriptions"], stats["subscribes"], stats["cookies_sent"]) == (1, 1, 1)


def test_cookies_are_per_address():
    """One address's cookie is not good for another, which is sent its own."""
    udp = UDP()
    cookie = udp.cookie(ADDRESS)
    (answer,) = udp.request("subscribe", "app/", cookie, address=OTHER)
    assert answer == {"t": "cookie", "cookie": udp.notifier.cookie_for(OTHER)}
    assert answer["cookie"] != cookie
    other_port = (ADDRESS[0], ADDRESS[1] + 1)
    (answer,) = udp.request("subscribe", "app/", cookie, address=other_port)
    assert answer["t"] == "cookie"
    assert udp.stats()["subscriptions"] == 0


def test_cookie_answer_is_never_larger_than_the_request():
    """An unpadded request smaller than the cookie answer gets no answer at
    all, and is counted as withheld; the same request padded is answered."""
    udp = UDP()
    request = json.dumps({"v": 1, "t": "subscribe", "prefix": "a"}).encode()
    answer_size = len(b'{"v":1,"t":"cookie","cookie":""}') + 32
    assert len(request) < answer_size
    udp.protocol.datagramReceived(request, ADDRESS)
    assert udp.take() == []
    assert udp.stats()["cookies_withheld"] == 1
    padded = request[:-1] + b',"pad":"' + b"x" * (answer_size - len(request) - 9) + b'"}'
    assert len(padded) == answer_size
    udp.protocol.datagramReceived(padded, ADDRESS)
    [(datagram, to)] = udp.take()
    assert to == ADDRESS and len(datagram) == answer_size
    assert (udp.stats()["cookies_sent"], udp.stats()["cookies_withheld"]) == (1, 1)


def test_cookie_rate_withholds_answers_past_the_rate():
    """At most max_cookie_rate cookie answers a second in all: past that
    they are withheld and counted, and the rate refills with time.  Withheld
    oversized answers do not use up the rate."""
    udp = UDP(max_cookie_rate=3)
    addresses = [(f"198.51.100.{i}", 5000 + i) for i in range(5)]
    udp.protocol.datagramReceived(b'{"v":1,"t":"subscribe"}', addresses[0])  # too small
    answered = []
    for address in addresses:
        udp.protocol.datagramReceived(udp.peer.seal({"t": "subscribe", "pad": "x" * 100}),
                                      address)
        answered += [to for _, to in udp.take()]
    assert answered == addresses[:3]
    assert (udp.stats()["cookies_sent"], udp.stats()["cookies_withheld"]) == (3, 3)
    udp.clock.advance(1 / 3 + 1e-9)
    for address in addresses[3:]:
        udp.protocol.datagramReceived(udp.peer.seal({"t": "subscribe", "pad": "x" * 100}),
                                      address)
    assert [to for _, to in udp.take()] == addresses[3:4]
    assert (udp.stats()["cookies_sent"], udp.stats()["cookies_withheld"]) == (4, 4)
    udp.clock.advance(10)
    for address in addresses:
        udp.protocol.datagramReceived(udp.peer.seal({"t": "subscribe", "pad": "x" * 100}),
                                      address)
    # The burst is the rate, not ten seconds' worth.
    assert [to for _, to in udp.take()] == addresses[:3]


def test_a_cookie_lasts_its_period_and_the_next():
    """A cookie from the previous period is accepted; one from two periods
    ago is refused and answered with a fresh cookie, which is accepted."""
    udp = UDP()
    old = udp.cookie(OTHER)
    udp.clock.advance(COOKIE_PERIOD - 0.5)
    late = udp.cookie(ADDRESS)  # issued at the very end of period 0
    udp.clock.advance(COOKIE_PERIOD)  # late in period 1
    (answer,) = udp.request("subscribe", "app/", late)
    assert answer["t"] == "subscribed"
    udp.clock.advance(0.5)  # period 2: two periods after the cookie's
    udp.take()  # ADDRESS's heartbeat
    (answer,) = udp.request("subscribe", "app/", old, address=OTHER)
    fresh = udp.notifier.cookie_for(OTHER)
    assert answer == {"t": "cookie", "cookie": fresh}
    assert fresh != old
    (answer,) = udp.request("subscribe", "app/", fresh, address=OTHER)
    assert answer["t"] == "subscribed"
    assert udp.stats()["subscriptions"] == 2


@pytest.mark.parametrize("cookie", [
    "é", "\ud800", "", "0" * 32, 5, 1.5, True, [], {}, "x" * 4000])
def test_a_wrong_cookie_of_any_type_is_answered_with_a_cookie(cookie):
    """A cookie that is not text, not ASCII, or just wrong is answered with
    the address's cookie, and never raises."""
    udp = UDP()
    body = json.dumps({"v": 1, "t": "subscribe", "prefix": "app/", "cookie": cookie,
                       "pad": "x" * 100}).encode()
    udp.protocol.datagramReceived(body[:MAX_REQUEST_BYTES], ADDRESS)
    expected = [] if len(body) > MAX_REQUEST_BYTES else [
        {"t": "cookie", "cookie": udp.notifier.cookie_for(ADDRESS)}]
    assert udp.messages() == expected
    assert udp.stats()["subscriptions"] == 0


def test_a_cookie_of_a_future_period_is_refused():
    """Only the current and the previous period's cookies are good."""
    udp = UDP()
    period = int(udp.clock.seconds() // COOKIE_PERIOD)
    future = udp.notifier.cookie_for(ADDRESS, period + 1)
    (answer,) = udp.request("subscribe", "app/", future)
    assert answer == {"t": "cookie", "cookie": udp.notifier.cookie_for(ADDRESS)}


# Datagrams an unproven address may send: anything at all.

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(st.characters(blacklist_categories=()), max_size=20)
                | st.sampled_from(["\ud800", "é", "\x00", "subscribe", "unsubscribe"]))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
#: Prefixes, valid or not (but JSON: NaN and Infinity make a datagram malformed).
prefixes = st.one_of(st.just(""), st.just("app/"), st.text(max_size=30),
                     json_scalars.filter(lambda v: v == v and v not in (math.inf, -math.inf)),
                     st.lists(st.text(max_size=3), max_size=2))


@st.composite
def wrong_cookies(draw):
    """A cookie that is not the address's current one: missing, not a
    string, any text, another address's, an expired one, a future one."""
    kind = draw(st.sampled_from(["missing", "value", "other", "expired", "future", "hex"]))
    if kind == "missing":
        return None
    if kind == "value":
        return ("value", draw(json_scalars | st.lists(st.text(max_size=3), max_size=2)))
    if kind == "hex":
        return ("value", draw(st.text("0123456789abcdef", min_size=32, max_size=32)))
    return (kind, None)


@st.composite
def requests(draw):
    """(kind, payload): raw bytes of any size, any JSON object, or a
    subscribe/unsubscribe with a wrong cookie; JSON may be signed well or badly."""
    kind = draw(st.sampled_from(["bytes", "sized", "object", "request"]))
    if kind == "bytes":
        return "raw", draw(st.binary(max_size=300))
    if kind == "sized":
        # Any size up to 70000: a drawn pattern repeated.
        size = draw(st.integers(0, 70000))
        pattern = draw(st.binary(min_size=1, max_size=64))
        return "raw", (pattern * (size // len(pattern) + 1))[:size]
    if kind == "object":
        message = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
        if draw(st.booleans()):
            message["v"] = draw(st.sampled_from([1, 1, 1, 2, "1", None]))
            message["t"] = draw(st.sampled_from(
                ["subscribe", "unsubscribe", "cookie", "event", "subscribed", 5]))
    else:
        message = {"v": 1, "t": draw(st.sampled_from(["subscribe", "unsubscribe"]))}
        if draw(st.booleans()):
            message["prefix"] = draw(prefixes)
        cookie = draw(wrong_cookies())
        if cookie is not None:
            message["cookie"] = cookie
        pad = draw(st.sampled_from([0, 1, 50, 150, 256, 4000, 5000]))
        if pad:
            message["pad"] = "x" * pad
    signing = draw(st.sampled_from(["good", "good", "unsigned", "wrong_secret", "stale"]))
    return signing, message


def _encode(signing: str, payload, udp: UDP, address, nonces) -> bytes:
    if signing == "raw":
        return payload
    message = dict(payload)
    cookie = message.get("cookie")
    if type(cookie) is tuple:
        kind, value = cookie
        period = int(udp.clock.seconds() // COOKIE_PERIOD)
        message["cookie"] = {"value": value,
                             "other": udp.notifier.cookie_for(OTHER),
                             "expired": udp.notifier.cookie_for(address, period - 2),
                             "future": udp.notifier.cookie_for(address, period + 1)}[kind]
    if udp.secret and signing != "unsigned":
        skew = udp.limits.max_clock_skew + 1 if signing == "stale" else 0
        message = {"ts": udp.clock.seconds() - skew, "nonce": f"{next(nonces):016x}", **message}
        secret = b"another secret" if signing == "wrong_secret" else udp.secret
        body = json.dumps(message).encode()
        return body + b"\n" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return json.dumps(message).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(requests=[("good", {"v": 1, "t": "subscribe", "cookie": ("value", "é"),
                             "pad": "x" * 256})], secret=None)
@example(requests=[("raw", b"x" * 70000), ("raw", b""), ("raw", b"{}" * 2048)], secret=SECRET)
@given(requests=st.lists(requests(), min_size=1, max_size=6), secret=st.sampled_from([None,
                                                                                     SECRET]))
def test_unproven_addresses_get_at_most_a_cookie_no_larger_than_their_request(requests, secret):
    """Whatever an address that has not returned a cookie sends (any bytes,
    any size, any JSON, subscribes with wrong cookies, signed or not), the
    notifier never raises, sends it at most one datagram per request, never
    larger than the request, only a cookie, sends nobody else anything, and
    subscribes nothing; every request is counted exactly once.  The address
    then returns its cookie and is subscribed."""
    udp = UDP(secret)
    nonces = itertools.count()
    for signing, payload in requests:
        datagram = _encode(signing, payload, udp, ADDRESS, nonces)
        before = udp.stats()
        udp.protocol.datagramReceived(datagram, ADDRESS)
        written = udp.take()
        after = udp.stats()
        assert len(written) <= 1
        for answer, to in written:
            assert to == ADDRESS
            assert len(answer) <= len(datagram)
            assert udp.open(answer) == {"t": "cookie",
                                        "cookie": udp.notifier.cookie_for(ADDRESS)}
        counted = {name: after[name] - before[name] for name in after
                   if after[name] != before[name]}
        assert counted in ({"cookies_sent": 1}, {"cookies_withheld": 1},
                           *({f"dropped_{reason}": 1} for reason in DROP_REASONS)), counted
        assert bool(written) == ("cookies_sent" in counted)
        if len(datagram) > MAX_REQUEST_BYTES:
            assert counted == {"dropped_malformed": 1}
        assert after["subscriptions"] == 0
    (answer,) = udp.request("subscribe", "app/", udp.notifier.cookie_for(ADDRESS), pad=0)
    assert answer == subscribed(answer["sub"], "app/")
    assert udp.stats()["subscriptions"] == 1


@settings(max_examples=200, deadline=None)
@example(prefix="\ud800", kind="subscribe", secret=None)
@example(prefix="a\udfffb", kind="unsubscribe", secret=SECRET)
@given(prefix=prefixes, kind=st.sampled_from(["subscribe", "unsubscribe"]),
       secret=st.sampled_from([None, SECRET]))
def test_a_proven_address_is_answered_whatever_prefix_it_sends(prefix, kind, secret):
    """With a good cookie any prefix gets exactly one answer: subscribed or
    unsubscribed for a valid prefix, else an error with the code of the
    prefix's fault, echoing the prefix when it is text; never an exception."""
    udp = UDP(secret)
    cookie = udp.notifier.cookie_for(ADDRESS)
    body = json.dumps({"v": 1, "t": kind, "prefix": prefix, "cookie": cookie,
                       **({"ts": 0, "nonce": "n"} if secret else {})}).encode()
    udp.protocol.datagramReceived(udp.peer.sign(body), ADDRESS)
    (answer,) = udp.messages()
    try:
        values.check_prefix(prefix, udp.limits.max_key_bytes)
    except errors.KVConfigError as e:
        # The prefix is echoed when it is text UTF-8 can carry (JSON's
        # "\ud800" decodes to a lone surrogate, which it cannot).
        echo = prefix if type(prefix) is str and not SURROGATE.search(prefix) else None
        assert answer == error(echo, (e.code, e.name), e.message)
        assert udp.stats()["subscriptions"] == 0
    else:
        assert answer["t"] == kind + "d"
        assert answer["prefix"] == prefix
        assert udp.stats()["subscriptions"] == (kind == "subscribe")


def test_other_message_types_are_dropped_unanswered():
    """Only subscribe and unsubscribe are requests: any other type, even
    with a good cookie, is counted malformed and not answered."""
    udp = UDP()
    cookie = udp.notifier.cookie_for(ADDRESS)
    for kind in ["cookie", "event", "heartbeat", "subscribed", "SUBSCRIBE", ""]:
        udp.request(kind, "app/", cookie)
    assert udp.take() == []
    assert udp.stats()["dropped_malformed"] == 6
    assert udp.stats()["subscriptions"] == 0


def test_requests_over_the_size_limit_are_not_read():
    """A datagram over MAX_REQUEST_BYTES is dropped unread, even a good subscribe."""
    udp = UDP()
    cookie = udp.notifier.cookie_for(ADDRESS)
    assert udp.request("subscribe", "app/", cookie, pad=MAX_REQUEST_BYTES) == []
    assert udp.stats()["dropped_malformed"] == 1
    assert udp.stats()["subscriptions"] == 0


# Leases


def test_a_lease_runs_out_without_renewal():
    """Unrenewed, a subscription is removed by the first heartbeat tick at
    or after lease_seconds, counted as expired; nothing is sent to it after."""
    udp = UDP(lease_seconds=10, heartbeat_seconds=2)
    sub = udp.subscribe("app/")["sub"]
    udp.wait(8)
    assert [m["t"] for m in udp.messages()] == ["heartbeat"] * 4
    assert udp.stats()["subscriptions"] == 1
    udp.wait(2)
    assert udp.messages() == []
    stats = udp.stats()
    assert (stats["subscriptions"], stats["expired"]) == (0, 1)
    udp.put("app/a", 1)
    udp.wait(10)
    assert udp.take() == []
    # Subscribing again makes a new subscription, with a new id.
    again = udp.subscribe("app/")
    assert again == subscribed(again["sub"], "app/", head=1, lease=10)
    assert again["sub"] != sub


def test_renewing_keeps_the_subscription():
    """A subscribe with a cookie before the lease runs out renews it: same
    sub, seq and rev, a new lease from now; counted as a renewal."""
    udp = UDP(lease_seconds=10, heartbeat_seconds=2)
    sub = udp.subscribe("app/")["sub"]
    udp.put("app/a", 1)
    udp.put("app/b", 2)
    udp.put("other", 3)
    udp.take()
    udp.wait(8)
    udp.take()
    (answer,) = udp.request("subscribe", "app/", udp.notifier.cookie_for(ADDRESS))
    assert answer == subscribed(sub, "app/", seq=2, rev=2, head=3, lease=10)
    udp.wait(8)  # t=16: past the first lease, within the renewed one
    assert udp.messages() == [heartbeat(sub, 2, 2, 3)] * 4
    udp.wait(2)  # t=18 = renewal + lease
    assert udp.messages() == []
    stats = udp.stats()
    assert (stats["subscribes"], stats["renewals"], stats["expired"]) == (1, 1, 1)


@plain_and_signed
def test_unsubscribe_over_udp(secret):
    """An unsubscribe with a cookie removes the subscription and is answered
    with its id; nothing more is sent to it; again, the answer's sub is null."""
    udp = UDP(secret)
    sub = udp.subscribe("app/")["sub"]
    other = udp.subscribe("app/", OTHER)["sub"]
    cookie = udp.notifier.cookie_for(ADDRESS)
    assert udp.request("unsubscribe", "app/", cookie) == [
        {"t": "unsubscribed", "prefix": "app/", "sub": sub}]
    assert udp.request("unsubscribe", "app/", cookie) == [
        {"t": "unsubscribed", "prefix": "app/", "sub": None}]
    udp.put("app/a", 1)
    udp.wait(2)
    assert udp.messages(OTHER) == [event(other, 1, 1, op="put", key="app/a", value=1),
                                   heartbeat(other, 1, 1, 1)]
    assert (udp.stats()["subscriptions"], udp.stats()["unsubscribes"]) == (1, 1)


def test_unsubscribe_without_a_cookie_gets_a_cookie_only():
    """An unsubscribe is proven like a subscribe: without a cookie nothing is removed."""
    udp = UDP()
    udp.subscribe("app/")
    assert udp.request("unsubscribe", "app/") == [
        {"t": "cookie", "cookie": udp.notifier.cookie_for(ADDRESS)}]
    assert udp.stats()["subscriptions"] == 1


def test_subscribe_and_unsubscribe_for_tcp_callers():
    """Notifier.subscribe/unsubscribe (for XML-RPC and the line protocol)
    need no cookie; unsubscribe returns the subscription, then None."""
    udp = UDP()
    subscription = udp.subscriptions.subscribe(ADDRESS, "app/")
    assert udp.take() == []
    assert udp.subscriptions.subscribe(ADDRESS, "app/") is subscription
    udp.put("app/a", "x")
    assert udp.messages() == [event(subscription.id, 1, 1, op="put", key="app/a", value="x")]
    assert udp.subscriptions.unsubscribe(ADDRESS, "app/") is subscription
    assert udp.subscriptions.unsubscribe(ADDRESS, "app/") is None
    udp.put("app/b", "y")
    udp.wait(4)
    assert udp.take() == []
    stats = udp.stats()
    assert (stats["subscribes"], stats["renewals"], stats["unsubscribes"]) == (1, 1, 1)


@pytest.mark.parametrize("port", [0, 65536, -1, "80", None])
def test_tcp_subscribe_checks_the_port(port):
    """A subscribe for a port outside 1..65535 is an invalid_argument."""
    udp = UDP()
    with pytest.raises(errors.InvalidArgument):
        udp.subscriptions.subscribe(("127.0.0.1", port), "app/")
    assert udp.stats()["subscriptions"] == 0


# Heartbeats


def test_heartbeats_every_interval_with_seq_rev_and_head():
    """Every heartbeat_seconds each subscription is sent its last seq, the
    revision of its last event and the store's revision."""
    udp = UDP(heartbeat_seconds=3, lease_seconds=100)
    udp.put("zero", 0)
    sub = udp.subscribe("app/")["sub"]
    other = udp.subscribe("", OTHER)["sub"]
    udp.clock.advance(2.5)
    assert udp.take() == []
    udp.clock.advance(0.5)  # t=3
    assert udp.by_sub() == {sub: (ADDRESS, heartbeat(sub, 0, 0, 1)),
                            other: (OTHER, heartbeat(other, 0, 0, 1))}
    udp.put("app/a", 1)
    udp.put("other", 2)
    udp.take()
    for _ in range(3):
        udp.clock.advance(2.5)
        assert udp.take() == []
        udp.clock.advance(0.5)  # t=6, 9, 12
        assert udp.by_sub() == {sub: (ADDRESS, heartbeat(sub, 1, 2, 3)),
                                other: (OTHER, heartbeat(other, 2, 3, 3))}
    assert udp.stats()["heartbeats_sent"] == 8


# Events


@plain_and_signed
def test_put_event_carries_the_value_in_tagged_json(secret):
    """A put is sent with its value in tagged JSON, which decodes to the
    value written: bytes, datetimes, dicts (also tag-like ones)."""
    udp = UDP(secret)
    sub = udp.subscribe("app/")["sub"]
    written = {"b": b"\x00\xffbytes", "when": datetime(2026, 1, 2, 3, 4, 5),
               "d": {"$bytes": "not a tag"}, "n": [1, 2.5, None, True, "é"]}
    udp.put("app/v", written)
    (message,) = udp.messages()
    assert message == event(sub, 1, 1, op="put", key="app/v",
                            value=json.loads(values.encode(written, 1 << 20, 64)))
    assert values.from_tagged(message["value"]) == written
    assert udp.stats()["datagrams_sent"] == 1


def test_event_datagram_bytes():
    """The exact bytes of an unsigned event datagram."""
    udp = UDP()
    sub = udp.subscribe("app/")["sub"].encode()
    udp.put("app/é", {"a": [1]})
    udp.delete("app/é")
    assert [d for d, _ in udp.take()] == [
        b'{"v":1,"t":"event","sub":"%s","seq":1,"rev":1,"op":"put","key":"app/\xc3\xa9",'
        b'"value":{"a":[1]}}' % sub,
        b'{"v":1,"t":"event","sub":"%s","seq":2,"rev":2,"op":"delete","key":"app/\xc3\xa9"}'
        % sub,
    ]


@plain_and_signed
def test_delete_and_expiry_events(secret):
    """A delete is sent without a value; a TTL running out is a delete
    marked expired; deleting an absent key sends nothing."""
    udp = UDP(secret)
    sub = udp.subscribe("app/")["sub"]
    udp.put("app/a", 1)
    udp.delete("app/a")
    udp.put("app/t", "temporary", ttl=5)
    assert udp.messages() == [
        event(sub, 1, 1, op="put", key="app/a", value=1),
        event(sub, 2, 2, op="delete", key="app/a"),
        event(sub, 3, 3, op="put", key="app/t", value="temporary"),
    ]
    results = []
    udp.store.delete("app/absent").addBoth(results.append)
    assert results == [None]
    udp.wait(4)
    assert [m["t"] for m in udp.messages()] == ["heartbeat", "heartbeat"]
    udp.clock.advance(0.5)
    assert udp.take() == []
    udp.clock.advance(0.5)
    assert udp.messages() == [event(sub, 4, 4, op="delete", key="app/t", expired=True)]


@plain_and_signed
def test_values_that_do_not_fit_are_left_to_pull(secret):
    """A value that would make the datagram larger than max_datagram_bytes
    is left out (pull); a key that does not fit either is left out too."""
    udp = UDP(secret, max_datagram_bytes=512)
    sub = udp.subscribe("app/")["sub"]
    udp.put("app/small", "x" * 100)
    udp.put("app/big", "x" * 400)
    long_key = "app/" + "k" * 400
    udp.put(long_key, 1)
    udp.delete(long_key)
    written = udp.take()
    assert all(len(d) <= 512 for d, _ in written)
    assert [udp.open(d) for d, _ in written] == [
        event(sub, 1, 1, op="put", key="app/small", value="x" * 100),
        event(sub, 2, 2, op="put", key="app/big", pull=True),
        event(sub, 3, 3, pull=True),
        event(sub, 4, 4, pull=True),
    ]


#: Valid keys, up to 1000 bytes.
keys = st.text(st.characters(blacklist_characters=" ").filter(str.isprintable),
               min_size=1, max_size=250)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=keys, value=xmlrpc_values | st.integers(0, 1500).map(lambda n: "é" * n),
       size=st.sampled_from([512, 600, 1200]), secret=st.sampled_from([None, SECRET]))
def test_every_event_datagram_fits_and_says_what_it_can(key, value, size, secret):
    """Whatever the key and value, each event datagram is at most
    max_datagram_bytes and carries the key and value exactly when present;
    they are left out only when the fuller form would come near the limit;
    the seq goes up by one per event."""
    udp = UDP(secret, max_datagram_bytes=size)
    udp.clock.advance(1.7e9)  # ten-digit timestamps in signed datagrams
    sub = udp.subscriptions.subscribe(ADDRESS, "").id
    udp.put(key, value)
    udp.delete(key)
    written = udp.take()
    assert len(written) == 2
    for seq, (datagram, to) in enumerate(written, 1):
        assert to == ADDRESS
        assert len(datagram) <= size
        message = udp.open(datagram)
        assert (message["t"], message["sub"], message["seq"], message["rev"]) == (
            "event", sub, seq, seq)
        assert message.get("key", key) == key
        if "value" in message:
            assert values.from_tagged(message["value"]) == value
        if seq == 2 and "key" in message:
            assert message == event(sub, 2, 2, op="delete", key=key)
        if "key" not in message:
            assert message == event(sub, seq, seq, pull=True)
        # What the fuller form would add; the head room (128 bytes) bounds the slack.
        key_bytes = len(json.dumps(key, ensure_ascii=False).encode())
        if "key" in message and message.get("pull"):
            more = len(b',"value":') + len(values.encode(value, 1 << 30, 64)) - len(b',"pull":true')
            assert len(datagram) + more > size - 100
        elif "key" not in message:
            op = b',"op":"put","key":' if seq == 1 else b',"op":"delete","key":'
            more = len(op) + key_bytes - (len(b',"pull":true') if seq == 2 else 0)
            assert len(datagram) + more > size - 100


def test_only_matching_prefixes_get_an_event():
    """An event goes to each subscription whose prefix the key starts with,
    one datagram each (one address with two matching prefixes gets two);
    each subscription's seq goes up by one per event it is sent."""
    udp = UDP()
    app = udp.subscribe("app/")["sub"]
    db = udp.subscribe("app/db/")["sub"]
    everything = udp.subscribe("", OTHER)["sub"]
    third = ("192.0.2.3", 9)
    elsewhere = udp.subscribe("other/", third)["sub"]
    udp.put("app/db/x", 1)
    udp.put("app/y", 2)
    udp.put("apps", 3)
    udp.put("app/db/x", 4)
    udp.put("zzz", 5)
    mine = udp.take()
    by_address: dict = {}
    for datagram, to in mine:
        by_address.setdefault(to, []).append(udp.open(datagram))
    assert sorted(by_address[ADDRESS], key=lambda m: (m["rev"], m["sub"] != app)) == [
        event(app, 1, 1, op="put", key="app/db/x", value=1),
        event(db, 1, 1, op="put", key="app/db/x", value=1),
        event(app, 2, 2, op="put", key="app/y", value=2),
        event(app, 3, 4, op="put", key="app/db/x", value=4),
        event(db, 2, 4, op="put", key="app/db/x", value=4),
    ]
    assert by_address[OTHER] == [
        event(everything, n, n, op="put", key=k, value=n)
        for n, k in enumerate(["app/db/x", "app/y", "apps", "app/db/x", "zzz"], 1)]
    assert third not in by_address
    udp.wait(2)
    heartbeats = {udp.open(d)["sub"]: udp.open(d) for d, _ in udp.take()}
    assert heartbeats == {app: heartbeat(app, 3, 4, 5), db: heartbeat(db, 2, 4, 5),
                          everything: heartbeat(everything, 5, 5, 5),
                          elsewhere: heartbeat(elsewhere, 0, 0, 5)}
    assert udp.stats()["datagrams_sent"] == 10


def test_no_subscriptions_no_datagrams():
    """Writes with nobody subscribed send nothing."""
    udp = UDP()
    udp.put("a", 1)
    udp.wait(4)
    assert udp.take() == []


# The per-subscriber rate


def test_events_past_the_send_rate_are_skipped_and_caught_up():
    """Past max_send_rate (also the burst) events are skipped but still
    take a seq; a heartbeat with the latest seq follows 1/rate seconds
    later (within the rate, like events), and sending resumes as the rate
    refills."""
    udp = UDP(max_send_rate=2, heartbeat_seconds=10, lease_seconds=100)
    sub = udp.subscribe("app/")["sub"]
    other = udp.subscribe("app/", OTHER)["sub"]
    for n in range(1, 6):
        udp.put("app/k", n)
    sent = udp.take()
    assert [(to, udp.open(d)) for d, to in sent] == [
        (address, event(s, n, n, op="put", key="app/k", value=n))
        for n in (1, 2) for address, s in ((ADDRESS, sub), (OTHER, other))]
    stats = udp.stats()
    assert (stats["datagrams_sent"], stats["events_skipped"]) == (4, 6)
    udp.clock.advance(0.49)
    assert udp.take() == []
    udp.clock.advance(0.01)
    caught_up = sorted((to, udp.open(d)) for d, to in udp.take())
    assert caught_up == sorted([(ADDRESS, heartbeat(sub, 5, 5, 5)),
                                (OTHER, heartbeat(other, 5, 5, 5))])
    assert udp.stats()["heartbeats_sent"] == 2
    # The catch-up heartbeats spent the token that had come back:
    # heartbeats count against the send rate as events do.
    udp.clock.advance(0.5)
    udp.put("app/k", 6)
    assert len(udp.take()) == 2
    udp.put("app/k", 7)
    assert udp.take() == []
    assert udp.stats()["events_skipped"] == 8
    udp.clock.advance(0.5)
    assert sorted(udp.open(d)["seq"] for d, _ in udp.take()) == [7, 7]


def test_the_rate_is_per_subscriber():
    """One subscriber past its rate does not hold back another."""
    udp = UDP(max_send_rate=2, heartbeat_seconds=10, lease_seconds=100)
    busy = udp.subscribe("busy/")["sub"]
    quiet = udp.subscribe("quiet/", OTHER)["sub"]
    for n in range(3):
        udp.put("busy/k", n)
    udp.put("quiet/k", 1)
    udp.put("quiet/k", 2)
    assert [udp.open(d)["sub"] for d, _ in udp.take()] == [busy, busy, quiet, quiet]


# Limits


def test_the_subscription_limit():
    """Past max_subscriptions a proven subscribe is answered limit_exceeded
    (code 9) and nothing is created; renewals still work."""
    udp = UDP(max_subscriptions=2)
    sub = udp.subscribe("a/")["sub"]
    udp.subscribe("b/")
    third = udp.cookie(OTHER)
    assert udp.request("subscribe", "a/", third, OTHER) == [
        error("a/", LIMIT_EXCEEDED, "2 subscriptions is the limit")]
    (renewed,) = udp.request("subscribe", "a/", udp.notifier.cookie_for(ADDRESS))
    assert renewed["sub"] == sub
    stats = udp.stats()
    assert (stats["subscriptions"], stats["refused"], stats["renewals"]) == (2, 1, 1)
    udp.subscriptions.unsubscribe(ADDRESS, "b/")
    assert udp.request("subscribe", "a/", third, OTHER)[0]["t"] == "subscribed"


def test_the_per_prefix_limit():
    """Past max_subscriptions_per_prefix a subscribe to that prefix is
    refused with code 9; other prefixes are not affected."""
    udp = UDP(max_subscriptions_per_prefix=1)
    udp.subscribe("app/")
    cookie = udp.cookie(OTHER)
    assert udp.request("subscribe", "app/", cookie, OTHER) == [
        error("app/", LIMIT_EXCEEDED, "1 subscriptions to one prefix is the limit")]
    assert udp.request("subscribe", "app/x", cookie, OTHER)[0]["t"] == "subscribed"
    assert udp.stats()["subscriptions"] == 2
    assert udp.stats()["refused"] == 1
    with pytest.raises(errors.LimitExceeded):
        udp.subscriptions.subscribe(("192.0.2.9", 1), "app/")
    udp.put("app/xk", 1)
    assert [to for _, to in udp.take()] == [ADDRESS, OTHER]


@pytest.mark.parametrize(("prefix", "answer"), [
    ("has space", error("has space", INVALID_KEY,
                        "a key must not hold whitespace or control characters: 'has space'")),
    ("tab\there", error("tab\there", INVALID_KEY,
                        "a key must not hold whitespace or control characters: 'tab\\there'")),
    (5, error(None, INVALID_KEY, "a key must be a string, not int")),
    (None, error(None, INVALID_KEY, "a key must be a string, not NoneType")),
    ("k" * 1025, error("k" * 1025, KEY_TOO_LARGE, "key is longer than 1024 bytes")),
])
def test_an_invalid_prefix_is_refused(prefix, answer):
    """A bad prefix is answered with an error datagram carrying the key
    error's code, and creates nothing."""
    udp = UDP()
    cookie = udp.cookie()
    assert udp.request("subscribe", prefix, cookie) == [answer]
    assert udp.request("unsubscribe", prefix, cookie) == [answer]
    assert (udp.stats()["subscriptions"], udp.stats()["refused"]) == (0, 2)


# Sealing


def test_signed_datagrams_are_json_newline_hmac():
    """With a secret every datagram sent is its JSON, a newline and the hex
    HMAC-SHA256 of the JSON, with ts (the clock) and a fresh 16-hex nonce;
    another Sealer with the secret opens them, one with another secret does not."""
    udp = UDP(SECRET)
    udp.clock.advance(1000.25)
    udp.subscribe("app/")
    udp.put("app/a", b"\x00")
    udp.wait(2)
    udp.notifier.received(udp.peer.seal({"t": "subscribe", "prefix": "app/",
                                         "cookie": udp.notifier.cookie_for(ADDRESS)}), ADDRESS)
    written = [d for d, _ in udp.take()]
    assert len(written) == 3
    nonces = set()
    for datagram in written:
        body, mac = SIGNED.fullmatch(datagram).groups()
        assert mac == hmac.new(SECRET, body, hashlib.sha256).hexdigest().encode()
        message = json.loads(body)
        assert message["ts"] in (1000.25, 1002.25)
        nonces.add(message["nonce"])
        assert HEX16.fullmatch(message["nonce"])
        assert Sealer(SECRET, udp.clock).open(datagram) == message
        stranger = Sealer(b"another secret", udp.clock)
        with pytest.raises(BadDatagram) as info:
            stranger.open(datagram)
        assert info.value.reason == "bad_signature"
        assert stranger.dropped["bad_signature"] == 1
    assert len(nonces) == 3


def _signed(body: dict, secret: bytes = SECRET) -> bytes:
    raw = json.dumps(body).encode()
    return raw + b"\n" + hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()


def test_the_notifier_drops_and_counts_what_does_not_open():
    """With a secret, unsigned, badly signed, stale, replayed and malformed
    requests are dropped unanswered, each counted by its reason; a good one
    is answered."""
    udp = UDP(SECRET)
    udp.clock.advance(500)
    cookie = udp.notifier.cookie_for(ADDRESS)
    good = {"v": 1, "t": "subscribe", "prefix": "app/", "cookie": cookie, "ts": 500}
    sent = {
        "unsigned": [json.dumps({**good, "nonce": "u1"}).encode(),
                     b"",
                     b"no newline at all"],
        "bad_signature": [_signed({**good, "nonce": "b1"}, b"wrong"),
                          _signed({**good, "nonce": "b2"})[:-64] + b"g" * 64,
                          _signed({**good, "nonce": "b4"}).upper(),
                          json.dumps({**good, "nonce": "b3"}).encode() + b"\n",
                          b"\n" + b"0" * 64],
        "stale": [_signed({**good, "nonce": "s1", "ts": 500 - 31}),
                  _signed({**good, "nonce": "s2", "ts": 500 + 31}),
                  _signed({**good, "nonce": "s3", "ts": 1e300})],
        "malformed": [_signed({**good, "nonce": "m1", "v": 2}),
                      _signed({"v": 1, "t": "subscribe", "nonce": "m2"}),  # no ts
                      _signed({**good, "nonce": 5}),
                      _signed({**good, "nonce": "n" * 65}),
                      _signed({**good, "nonce": "m3", "ts": "500"}),
                      _signed({**good, "nonce": "m4", "ts": True}),
                      _signed([1, 2]),
                      b"\xff\xfe\n" + hmac.new(SECRET, b"\xff\xfe", "sha256").hexdigest()
                      .encode(),
                      _signed({**good, "nonce": "m5", "t": "heartbeat"})],
    }
    for reason, datagrams in sent.items():
        for datagram in datagrams:
            udp.protocol.datagramReceived(datagram, ADDRESS)
        assert udp.take() == [], reason
        assert udp.stats()[f"dropped_{reason}"] == len(datagrams), reason
    first = _signed({**good, "nonce": "r1"})
    udp.protocol.datagramReceived(first, ADDRESS)
    (answer,) = udp.messages()
    assert answer["t"] == "subscribed"
    udp.protocol.datagramReceived(first, ADDRESS)
    assert udp.take() == []
    assert udp.stats()["dropped_replayed"] == 1
    assert udp.stats()["subscriptions"] == 1


def test_a_request_goes_stale_as_the_clock_moves():
    """A signed request sealed now is accepted within max_clock_skew and
    dropped as stale once the clock has moved past it."""
    udp = UDP(SECRET, max_clock_skew=30, lease_seconds=1000)
    cookie = udp.notifier.cookie_for(ADDRESS)
    early = udp.peer.seal({"t": "subscribe", "prefix": "app/", "cookie": cookie})
    late = udp.peer.seal({"t": "subscribe", "prefix": "app/", "cookie": cookie})
    udp.wait(30)
    udp.protocol.datagramReceived(early, ADDRESS)
    assert [m["t"] for m in udp.messages()] == ["subscribed"]
    udp.clock.advance(0.001)
    udp.protocol.datagramReceived(late, ADDRESS)
    assert udp.take() == []
    assert udp.stats()["dropped_stale"] == 1


def test_replays_are_caught_and_old_nonces_forgotten():
    """A nonce is remembered while its datagram could still be fresh; after
    the window it is forgotten, and a replay then is stale, not accepted."""
    clock = Clock()
    receiver = Sealer(SECRET, clock, max_skew=10)
    sender = Sealer(SECRET, clock, max_skew=10)
    datagram = sender.seal({"t": "x"})
    assert receiver.open(datagram)["t"] == "x"
    clock.advance(5)
    with pytest.raises(BadDatagram, match="replayed"):
        receiver.open(datagram)
    clock.advance(6)
    later = sender.seal({"t": "y"})
    assert receiver.open(later)["t"] == "y"
    assert list(receiver._nonces) == [json.loads(later.split(b"\n")[0])["nonce"]]
    with pytest.raises(BadDatagram, match="stale"):
        receiver.open(datagram)
    assert receiver.dropped == {"malformed": 0, "unsigned": 0, "bad_signature": 0,
                                "stale": 1, "replayed": 1}


@pytest.mark.parametrize("ts", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400,
                                "-1" + "0" * 400, "1e400"])
def test_a_signed_timestamp_that_is_no_time_is_refused(ts):
    """A signed ts of NaN, an infinity or a huge integer is refused: it is
    neither accepted (NaN would be fresh for ever) nor an exception.  NaN
    and the infinities are not JSON at all."""
    clock = Clock()
    body = b'{"v":1,"t":"x","ts":%s,"nonce":"n"}' % ts.encode()
    datagram = body + b"\n" + hmac.new(SECRET, body, hashlib.sha256).hexdigest().encode()
    sealer = Sealer(SECRET, clock)
    reason = "malformed" if ts.lstrip("-").isalpha() else "stale"
    with pytest.raises(BadDatagram, match=reason):
        sealer.open(datagram)
    assert sealer.dropped[reason] == 1


def test_without_a_secret_datagrams_are_plain_json():
    """Without a secret nothing is signed and no ts or nonce is sent, and a
    signed-looking request is malformed."""
    clock = Clock()
    sealer = Sealer(None, clock)
    assert sealer.seal({"t": "x", "a": "é"}) == '{"v":1,"t":"x","a":"é"}'.encode()
    assert sealer.overhead == 0
    assert sealer.open(b'{"v":1,"t":"x"}') == {"v": 1, "t": "x"}
    with pytest.raises(BadDatagram, match="malformed"):
        sealer.open(_signed({"v": 1, "t": "x", "ts": 0, "nonce": "n"}))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600) | st.builds(
    lambda size, pattern: (pattern * (size // len(pattern) + 1))[:size],
    st.integers(0, 70000), st.binary(min_size=1, max_size=70)),
    secret=st.sampled_from([None, SECRET]))
def test_sealer_open_rejects_garbage_with_bad_datagram_only(data, secret):
    """Sealer.open on any bytes of any size returns a message or raises
    BadDatagram, counted under exactly one reason; with a secret, garbage
    never opens."""
    sealer = Sealer(secret, Clock())
    try:
        message = sealer.open(data)
    except BadDatagram as e:
        assert e.reason in DROP_REASONS
        assert sealer.dropped == {r: int(r == e.reason) for r in DROP_REASONS}
    else:
        assert secret is None
        assert type(message) is dict and message["v"] == 1 and type(message["t"]) is str
    if len(data) > MAX_REQUEST_BYTES * 16:
        assert sealer.dropped["malformed"] == 1


# Send errors, and the protocol


def test_a_failed_send_is_counted_and_shows_as_a_gap():
    """A write that raises counts a send error; the seq still advances, so
    the next event shows the subscriber the gap, and a catch-up heartbeat
    is tried as soon as the rate allows."""
    udp = UDP(max_send_rate=10, heartbeat_seconds=10, lease_seconds=100)
    sub = udp.subscribe("app/")["sub"]
    failing = RaisingTransport()
    udp.notifier.transport = failing
    udp.put("app/a", 1)
    assert failing.attempts == 1
    assert udp.stats()["send_errors"] == 1
    udp.clock.advance(0.1)  # the catch-up heartbeat fails too
    assert (failing.attempts, udp.stats()["send_errors"]) == (2, 2)
    udp.notifier.transport = udp.transport
    udp.put("app/b", 2)
    assert udp.messages() == [event(sub, 2, 2, op="put", key="app/b", value=2)]
    stats = udp.stats()
    assert (stats["datagrams_sent"], stats["heartbeats_sent"]) == (1, 0)
    udp.put("app/c", 3)  # a failed send to one, then a heartbeat that gets through
    udp.notifier.transport = failing
    udp.put("app/d", 4)
    udp.notifier.transport = udp.transport
    udp.clock.advance(0.1)
    assert udp.messages() == [event(sub, 3, 3, op="put", key="app/c", value=3),
                              heartbeat(sub, 4, 4, 4)]


def test_answers_without_a_transport_are_send_errors():
    """Before the port is up (or after it is down) nothing is sent and each
    datagram that could not go is a send error."""
    udp = UDP()
    udp.subscribe("app/")
    udp.protocol.doStop()
    assert udp.notifier.transport is None
    udp.put("app/a", 1)
    udp.notifier.received(b'{"v":1,"t":"subscribe","pad":"%s"}' % (b"x" * 100), OTHER)
    assert udp.take() == []
    stats = udp.stats()
    # The one cookie sent is the subscribe's, before the port went down.
    assert (stats["send_errors"], stats["datagrams_sent"], stats["cookies_sent"]) == (2, 0, 1)


def test_the_protocol_lends_its_transport_and_forwards_datagrams():
    """NotifierProtocol sets the notifier's transport when it starts, clears
    it when it stops, and hands it every datagram with its address."""
    store = clocked_store()
    notifier = Notifier(store, Subscriptions(store.limits, store.backend.clock, lambda: 0),
                        store.limits, store.backend.clock)
    received = []
    notifier.received = lambda datagram, address: received.append((datagram, address))
    protocol = NotifierProtocol(notifier)
    assert notifier.transport is None
    transport = RecordingTransport()
    protocol.makeConnection(transport)
    assert notifier.transport is transport
    protocol.datagramReceived(b"hello", ADDRESS)
    assert received == [(b"hello", ADDRESS)]
    protocol.doStop()
    assert notifier.transport is None


def test_stop_ends_heartbeats_events_and_catch_ups():
    """After stop() no event, heartbeat or pending catch-up is sent."""
    udp = UDP(max_send_rate=1)
    udp.subscribe("app/")
    udp.put("app/a", 1)
    udp.put("app/a", 2)  # skipped: a catch-up is pending
    udp.take()
    udp.notifier.stop()
    udp.put("app/a", 3)
    udp.wait(10)
    assert udp.take() == []
    assert udp.store.feed.consumers == 0


def test_heartbeats_keep_within_the_addresss_send_rate():
    """Heartbeats to an address's many subscriptions count against its one
    send rate (one address got 2,500 a second); the ones over it wait for a
    later tick."""
    udp = UDP(max_send_rate=5, heartbeat_seconds=2, lease_seconds=100,
              max_subscriptions_per_host=50)
    for i in range(20):
        udp.subscriptions.subscribe(ADDRESS, f"p{i}/")
    udp.take()
    udp.clock.advance(2)
    assert len(udp.take()) == 5  # the burst: one second's worth
    assert udp.stats()["heartbeats_skipped"] == 15
    udp.clock.advance(2)
    assert len(udp.take()) == 5


# The fan-out after the acknowledgement, in slices


def many(udp: UDP, count: int, prefix: str = "app/") -> None:
    """*count* subscriptions (proven addresses: registered directly)."""
    for port in range(1, count + 1):
        udp.subscriptions.subscribe((f"192.0.{port // 250}.{port % 250 + 1}", 5000 + port),
                                    prefix)


def run_one_turn(clock: Clock) -> None:
    """Run the calls due now once, as one turn of a reactor does (a Clock's
    advance(0) would also run what they schedule for now)."""
    for call in [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]:
        if call.active():
            call.func(*call.args, **call.kw)
            call.cancelled = True  # ran: the Clock must not run it again


def test_a_write_is_acknowledged_before_its_fan_out():
    """The change's datagrams go out after the write's Deferred has fired:
    an acknowledgement never waits for the fan-out."""
    udp = UDP(max_subscriptions_per_host=10)
    udp.subscribe("app/")
    udp.take()
    acknowledged = []
    udp.store.put("app/k", 1).addCallback(acknowledged.append)
    assert acknowledged and udp.take() == []
    udp.clock.advance(0)
    assert [udp.open(d)["t"] for d, _ in udp.take()] == ["event"]


def test_the_fan_out_goes_in_slices_one_turn_each_and_in_order():
    """1,200 subscriptions and three changes: each turn sends at most
    FAN_OUT_SLICE datagrams; every subscription gets the three in order."""
    udp = UDP(max_subscriptions=5000, max_subscriptions_per_prefix=5000)
    many(udp, 1200)
    for n in range(3):
        udp.store.put("app/k", n)
    per_turn = []
    while udp.clock.getDelayedCalls() and len(per_turn) < 100:
        run_one_turn(udp.clock)
        per_turn.append(len(udp.take()))
        if not per_turn[-1]:
            break
    assert max(per_turn) <= FAN_OUT_SLICE and sum(per_turn) == 3600
    assert len([turn for turn in per_turn if turn]) == -(-3600 // FAN_OUT_SLICE)
    seqs = {s.id: s.seq for s in udp.subscriptions}
    assert set(seqs.values()) == {3}


def test_a_fan_out_far_behind_skips_the_oldest_change_as_a_gap(monkeypatch):
    """Past MAX_OUTBOX waiting changes, the oldest is not sent but still
    takes a seq from each subscription: a gap its subscriber pulls."""
    monkeypatch.setattr("kvconfig.notifier.MAX_OUTBOX", 2)
    udp = UDP()
    udp.subscribe("app/")
    udp.take()
    for n in range(4):
        udp.store.put("app/k", n)  # nothing sent between them
    udp.clock.advance(0)
    events = [udp.open(d) for d, _ in udp.take() if udp.open(d)["t"] == "event"]
    assert [e["seq"] for e in events] == [3, 4]       # 1 and 2 skipped: a gap
    assert udp.stats()["events_skipped"] == 2


def test_heartbeats_to_many_are_spread_over_the_interval():
    """With many subscriptions a round of heartbeats goes in slices spread
    over the interval, every subscription once a round."""
    count = 4 * FAN_OUT_SLICE
    udp = UDP(max_subscriptions=5000, max_subscriptions_per_prefix=5000, heartbeat_seconds=2,
              lease_seconds=100, max_subscriptions_per_host=5000)
    many(udp, count)
    udp.take()
    udp.clock.advance(2)
    assert len(udp.take()) == FAN_OUT_SLICE  # the first of four slices
    sent = []
    for _ in range(39):                      # the rest of the interval
        udp.clock.advance(0.05)
        sent.append(len(udp.take()))
    assert sum(sent) == count - FAN_OUT_SLICE and max(sent) == FAN_OUT_SLICE
    assert [n for n in sent if n] == [FAN_OUT_SLICE] * 3
    assert udp.stats()["heartbeats_sent"] == count
