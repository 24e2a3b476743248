"""
The UDP notification wire format, shared by the server's notifier and the agent.

This module holds everything both ends must agree on: the version, the
message shapes (with the hand-built templates the server's hot loop uses,
kept here beside the version so the two cannot drift), and sealing.  It
imports nothing of the server, so the agent can use it alone.

Wire format, version 1
======================

Notify-then-pull, like DNS NOTIFY: the server pushes small datagrams to
subscribed addresses; a subscriber that sees a gap pulls what it missed over
TCP with ``changes(prefix, since)`` (or ``list(prefix)`` after ``compacted``).
Default port 15002 on 127.0.0.1 (``--udp udp:15002:interface=127.0.0.1``).

Every datagram is one UTF-8 JSON object with ``"v": 1`` and a type ``"t"``.
With a shared secret (``--secret-file``) the object also carries ``"ts"``
(the sender's Unix time) and ``"nonce"`` (16 random hex digits), and is
followed by a newline and the lowercase hex HMAC-SHA256 of the JSON bytes
under the secret.  A receiver drops, and counts, a datagram that is not
signed, whose signature is wrong, whose ``ts`` is more than
``--max-clock-skew`` seconds from its own clock, or whose nonce it has seen.
Without a secret, datagrams carry no ``ts``, ``nonce`` or signature.

Subscriber to server::

    {"v":1,"t":"subscribe","prefix":P,"cookie":C[,"applied":A],"pad":"..."}
    {"v":1,"t":"unsubscribe","prefix":P,"cookie":C,"pad":"..."}

``applied`` (optional) is the revision the subscriber has applied (the
agent: the revision its file holds); the server keeps it with the
subscription and shows the subscriber's lag, the store's revision minus
``A``.  Without a valid ``cookie`` the server only answers ``{"v":1,"t":"cookie",
"cookie":C}``, and only if that answer is no larger than the request (so a
subscriber pads its request with ``pad``; 256 bytes is plenty), at most
``--max-cookie-rate`` such answers a second.  The cookie proves the sender
receives at its address; nothing else is ever sent to an address before it
returns one.  Cookies last at least a minute; an expired one is answered with
a fresh one.  With a valid cookie, ``subscribe`` creates the subscription of
that address to prefix ``P``, or renews its lease, and is answered::

    {"v":1,"t":"subscribed","sub":S,"prefix":P,"seq":N,"rev":R,"head":H,
     "lease":L,"heartbeat":B}

``S`` names this subscription (16 hex digits): a new ``S`` means a new
subscription whose sequence starts again at 0 (the server restarted, or the
lease ran out).  ``N`` is the last sequence number sent on it, ``R`` the
revision of its last event (0: none yet), ``H`` the store's revision, ``L``
the lease in seconds (renew well before, say every L/3) and ``B`` the
heartbeat interval.  ``unsubscribe`` is answered ``{"v":1,"t":"unsubscribed",
"prefix":P,"sub":S|null}``.  A refused subscribe (a bad prefix, a limit) is
answered ``{"v":1,"t":"error","prefix":P,"code":C,"error":NAME,
"message":TEXT}`` with the codes of kvconfig.errors.

Server to subscriber, once subscribed, one event per datagram::

    {"v":1,"t":"event","sub":S,"seq":N,"rev":R,"op":"put","key":K,"value":V}
    {"v":1,"t":"event","sub":S,"seq":N,"rev":R,"op":"put","key":K,"pull":true}
    {"v":1,"t":"event","sub":S,"seq":N,"rev":R,"op":"delete","key":K[,"expired":true]}
    {"v":1,"t":"event","sub":S,"seq":N,"rev":R,"pull":true}
    {"v":1,"t":"heartbeat","sub":S,"seq":N,"rev":R,"head":H}

``seq`` goes up by exactly one per event, starting at 1, including events
the server skipped (past ``--max-send-rate``) or could not send, so every
loss shows as a gap.  Events of one revision carry the same ``rev``.  ``V``
is the value in kvconfig's tagged JSON (see kvconfig.values).  A value that
would make the datagram larger than ``--max-datagram-bytes`` is left out
(``"pull":true``: read the key); if even the key does not fit, so is the key
(pull ``changes`` from the previous revision).  A heartbeat every
``--heartbeat-seconds`` carries the subscription's last ``seq`` and event
``rev``, and ``H``, the store's revision: a subscriber whose last seq is
lower lost the tail and pulls; one that hears nothing for a few heartbeats
subscribes again.  After skipping events for the rate limit the server sends
a heartbeat as soon as the rate allows, so the gap is seen at once.

Subscriptions can also be made over TCP, for the caller's own peer address:
XML-RPC ``subscribe(prefix, udp_port)`` / ``unsubscribe(prefix, udp_port)``
and the line protocol's ``SUBSCRIBE``/``UNSUBSCRIBE``; the TCP handshake is
the proof of address there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

WIRE_VERSION = 1
#: Datagrams larger than this are not read at all by the server.
MAX_REQUEST_BYTES = 4096
#: Bytes of a signature: a newline and 64 hex digits.
SIGNATURE_BYTES = 65
#: Room kept in every event datagram for its head (type, sub, seq, ts, nonce).
HEAD_ROOM = 128
#: A subscriber pads its requests to this size: the server answers an
#: unproven address with no more bytes than it was sent.
SUBSCRIBE_PAD_TO = 320

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: NaN and Infinity would poison timestamps, leases and seqs.
loads = json.JSONDecoder(parse_constant=_no_constants).decode


class BadDatagram(Exception):
    """A datagram was dropped; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Why datagrams are dropped: the counters both ends keep.
DROP_REASONS = ("malformed", "unsigned", "bad_signature", "stale", "replayed")


# Event datagrams, built by hand: the server formats one per subscriber and
# change, so each is a head (per subscription) + seq + a tail (per change).
# tests/test_udpwire.py checks that they equal what Sealer.seal makes.


def event_head(sub: str) -> bytes:
    """An unsigned event datagram up to its ``seq`` number."""
    return b'{"v":1,"t":"event","sub":"%s","seq":' % sub.encode()


def signed_event_head(sealer: Sealer, sub: str) -> bytes:
    """A signed event datagram up to its ``seq`` number: a fresh ``ts`` and
    ``nonce`` each time."""
    return b'%s,"t":"event","sub":"%s","seq":' % (sealer.head(), sub.encode())


def event_tails(revision: int, op: str, key: str, raw: bytes | None,
                expired: bool = False) -> list[bytes]:
    """The forms of an event datagram after ``seq``, fullest first: with the
    value (a put), without it (``"pull":true``), without the key either."""
    head = b',"rev":%d' % revision
    key_json = dumps(key).encode()
    if op == "delete":
        forms = [head + b',"op":"delete","key":' + key_json
                 + (b',"expired":true}' if expired else b"}")]
    else:
        forms = [head + b',"op":"put","key":' + key_json + b',"value":' + raw + b"}",
                 head + b',"op":"put","key":' + key_json + b',"pull":true}']
    forms.append(head + b',"pull":true}')
    return forms


def event_room(max_datagram_bytes: int, sealer: Sealer) -> int:
    """Bytes left for an event's tail in a datagram of at most
    *max_datagram_bytes*."""
    return max_datagram_bytes - HEAD_ROOM - sealer.overhead


def heartbeat(sub: str, seq: int, rev: int, head: int) -> dict[str, Any]:
    return {"t": "heartbeat", "sub": sub, "seq": seq, "rev": rev, "head": head}


def pad(message: dict[str, Any], sealer: Sealer, size: int = SUBSCRIBE_PAD_TO) -> bytes:
    """*message* sealed, padded with ``pad`` to about *size* bytes."""
    datagram = sealer.seal(message)
    if len(datagram) < size:
        # 9: the bytes of ``,"pad":""``.
        datagram = sealer.seal({**message, "pad": "-" * (size - len(datagram) - 9)})
    return datagram


class Sealer:
    """Seals outgoing datagrams and opens incoming ones, signed or not.

    Both the notifier and the agent use one; with a secret every datagram is
    signed and carries a timestamp and a nonce, and ``open`` rejects
    forgeries, stale datagrams and replays within the skew window.
    """

    def __init__(self, secret: bytes | None, clock: IReactorTime, max_skew: float = 30,
                 max_nonces: int = 200_000) -> None:
        self.secret = secret
        self.clock = clock
        self.max_skew = max_skew
        self.max_nonces = max_nonces
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    @property
    def overhead(self) -> int:
        """Bytes a seal adds to a message's JSON: the signature, and the
        ``"ts":1234567890.123,"nonce":"<16 hex>"`` fields (46 bytes) with
        room to spare."""
        return SIGNATURE_BYTES + 48 if self.secret else 0

    def seal(self, message: dict[str, Any]) -> bytes:
        message = {"v": WIRE_VERSION, **message}
        if self.secret:
            message["ts"] = round(self.clock.seconds(), 3)
            message["nonce"] = os.urandom(8).hex()
        return self.sign(dumps(message).encode())

    def head(self) -> bytes:
        """The start of a hand-built datagram: ``{"v":1`` and, when signing,
        a fresh ``ts`` and ``nonce``."""
        if self.secret:
            return b'{"v":1,"ts":%.3f,"nonce":"%s"' % (self.clock.seconds(),
                                                       os.urandom(8).hex().encode())
        return b'{"v":1'

    def sign(self, body: bytes) -> bytes:
        if not self.secret:
            return body
        mac = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return body + b"\n" + mac.encode()

    def open(self, datagram: bytes) -> dict[str, Any]:
        """The message in *datagram*, or BadDatagram (counted)."""
        try:
            return self._open(datagram)
        except BadDatagram as e:
            self.dropped[e.reason] += 1
            raise

    def _open(self, datagram: bytes) -> dict[str, Any]:
        if len(datagram) > MAX_REQUEST_BYTES * 16:
            raise BadDatagram("malformed")
        body = datagram
        if self.secret:
            body, newline, mac = datagram.rpartition(b"\n")
            if not newline:
                raise BadDatagram("unsigned")
            expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode()
            if not hmac.compare_digest(mac, expected):
                raise BadDatagram("bad_signature")
        try:
            message = loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadDatagram("malformed") from None
        if (type(message) is not dict or type(message.get("v")) is not int
                or message["v"] != WIRE_VERSION
                or type(message.get("t")) is not str):
            raise BadDatagram("malformed")
        if self.secret:
            self._check_fresh(message)
        return message

    def _check_fresh(self, message: dict[str, Any]) -> None:
        ts, nonce = message.get("ts"), message.get("nonce")
        if type(ts) not in (int, float) or type(nonce) is not str or len(nonce) > 64:
            raise BadDatagram("malformed")
        now = self.clock.seconds()
        # Compared, not subtracted: NaN is then never fresh, and a huge
        # integer cannot overflow a float.
        if not now - self.max_skew <= ts <= now + self.max_skew:
            raise BadDatagram("stale")
        nonces = self._nonces
        # A nonce older than the window cannot be replayed (it would be
        # stale), so it need not be remembered.
        while nonces and (next(iter(nonces.values())) < now - self.max_skew
                          or len(nonces) >= self.max_nonces):
            nonces.popitem(last=False)
        if nonce in nonces:
            raise BadDatagram("replayed")
        nonces[nonce] = ts


def read_secret(path: str) -> bytes:
    """The secret in the file at *path*: its bytes, without surrounding
    whitespace.

    Raises ValueError when it is not a regular file, cannot be read, is
    empty, or can be read by every user of the machine.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path!r} is not a regular file")
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from None
    if mode & stat.S_IROTH:
        raise ValueError(f"{path!r} is readable by everyone; chmod o-r it")
    if not secret:
        raise ValueError(f"{path!r} is empty")
    return secret
