"""
A fake etcd gateway client for the etcd backend's decisions, on a Clock.

FakeClient has the interface of kvconfig.backends.etcd.client.EtcdClient
(``call``, ``status``, ``watch``, ``endpoint``, ``endpoints``, ``move_on``,
``close``) and answers nothing by itself: each call and each watch is kept,
and the test answers it, fails it, or leaves it unanswered.  Watches are the
client's real WatchStream, fed the gateway's newline-separated JSON, so the
backend sees what it sees from etcd.

Helpers build the gateway's JSON (base64 keys and values, int64 as strings)
and a backend started and in step on a Clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvconfig import values
from kvconfig.backends.etcd import EtcdBackend
from kvconfig.backends.etcd.client import WatchStream, b64, unb64
from kvconfig.limits import Limits

ENDPOINTS = ["http://etcd-a:2379", "http://etcd-b:2379", "http://etcd-c:2379"]
PREFIX = "kv/"
TIMEOUT = 5.0


def raw(value: Any) -> bytes:
    """*value* as kvconfig writes it (tagged JSON)."""
    return values.encode(value, 1 << 20, 64)


def etcd_kv(key: str, value: Any = None, mod_revision: int = 1, version: int = 1,
            create_revision: int | None = None, raw_value: bytes | None = None,
            prefix: str = PREFIX) -> dict:
    """A key-value as the gateway sends it, under *prefix*."""
    data = raw_value if raw_value is not None else raw(value)
    return {"key": b64((prefix + key).encode()), "value": b64(data),
            "mod_revision": str(mod_revision), "version": str(version),
            "create_revision": str(create_revision if create_revision is not None
                                   else mod_revision)}


def put_event(key: str, value: Any = None, mod_revision: int = 1, **kw: Any) -> dict:
    return {"kv": etcd_kv(key, value, mod_revision, **kw)}  # a PUT has no "type"


def delete_event(key: str, mod_revision: int, prefix: str = PREFIX) -> dict:
    return {"type": "DELETE", "kv": {"key": b64((prefix + key).encode()),
                                     "mod_revision": str(mod_revision)}}


def header(revision: int) -> dict:
    return {"revision": str(revision)}


@dataclass
class Call:
    """One unary call the backend made, waiting for the test to answer it."""

    path: str
    body: dict
    endpoint: str
    d: Deferred = field(default_factory=Deferred)

    def answer(self, answer: dict) -> None:
        self.d.callback(answer)

    def fail(self, error: Exception) -> None:
        self.d.errback(error)

    @property
    def operations(self) -> list[dict]:
        """A txn's success operations."""
        return self.body["success"]

    def keys(self) -> list[str]:
        """The kvconfig keys a batch txn writes, in order (prefix removed)."""
        keys = []
        for operation in self.operations:
            request = operation.get("request_put") or operation["request_delete_range"]
            keys.append(unb64(request["key"]).decode()[len(PREFIX):])
        return keys

    def answer_batch(self, revision: int, deleted: dict[str, int] | None = None) -> None:
        """Answer a batch txn at *revision* (a delete deleted one key unless
        *deleted* says otherwise)."""
        deleted = deleted or {}
        responses = []
        for key, operation in zip(self.keys(), self.operations, strict=True):
            if "request_put" in operation:
                responses.append({"response_put": {"header": header(revision)}})
            else:
                responses.append({"response_delete_range": {
                    "header": header(revision), "deleted": str(deleted.get(key, 1))}})
        self.answer({"header": header(revision), "responses": responses})


@dataclass
class Watch:
    """One watch the backend opened, which the test opens, refuses or feeds."""

    endpoint: str
    request: dict
    on_message: Any
    max_message_bytes: int
    d: Deferred = field(default_factory=Deferred)
    stream: WatchStream | None = None

    @property
    def start_revision(self) -> int:
        return int(self.request["start_revision"])

    def open(self) -> WatchStream:
        """The gateway answered: the stream is open (not yet created)."""
        self.stream = WatchStream(self.on_message, self.max_message_bytes, self.endpoint)
        self.d.callback(self.stream)
        return self.stream

    def refuse(self, error: Exception) -> None:
        self.d.errback(error)

    def send(self, message: dict) -> None:
        """One message of the watch's answer, as the gateway frames it."""
        self.stream.dataReceived(json.dumps(message).encode() + b"\n")

    def created(self, revision: int = 1) -> None:
        self.send({"result": {"header": header(revision), "created": True}})

    def events(self, revision: int, *events: dict) -> None:
        self.send({"result": {"header": header(revision), "events": list(events)}})

    def end(self, reason: Exception) -> None:
        """The connection carrying the watch was lost."""
        self.stream._finish(reason)

    @property
    def closed(self) -> bool:
        return self.stream is not None and self.stream.done.called


class FakeClient:
    """An etcd gateway client whose every answer the test gives."""

    def __init__(self, endpoints: list[str] | None = None) -> None:
        self.endpoints = list(endpoints or ENDPOINTS)
        self.current = 0
        self.calls: list[Call] = []
        self.statuses: list[Call] = []
        self.watches: list[Watch] = []
        self.closed = False

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    def move_on(self) -> None:
        self.current = (self.current + 1) % len(self.endpoints)

    def call(self, path: str, body: dict) -> Deferred:
        call = Call(path, body, self.endpoint)
        self.calls.append(call)
        return call.d

    def status(self, endpoint: str) -> Deferred:
        call = Call("/v3/maintenance/status", {}, endpoint)
        self.statuses.append(call)
        return call.d

    def watch(self, endpoint: str, create_request: dict, on_message, max_message_bytes: int
              ) -> Deferred:
        watch = Watch(endpoint, create_request, on_message, max_message_bytes)
        self.watches.append(watch)
        return watch.d

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)

    # For the test

    def unanswered(self, path: str | None = None) -> list[Call]:
        return [call for call in self.calls
                if not call.d.called and (path is None or call.path == path)]

    def take(self, path: str) -> Call:
        """The one unanswered call to *path*."""
        calls = self.unanswered(path)
        assert len(calls) == 1, [(call.path, call.body) for call in self.unanswered()]
        return calls[0]

    def txns(self) -> list[Call]:
        return self.unanswered("/v3/kv/txn")

    @property
    def watch_(self) -> Watch:
        """The latest watch opened."""
        return self.watches[-1]


def answer_load(client: FakeClient, revision: int, kvs: list[dict] | None = None) -> Call:
    """Answer the (one-page) read of the prefix at *revision*."""
    call = client.take("/v3/kv/range")
    call.answer({"header": header(revision), "kvs": kvs or []})
    return call


def started(clock: Clock | None = None, client: FakeClient | None = None, revision: int = 10,
            kvs: list[dict] | None = None, timeout: float = TIMEOUT,
            limits: Limits | None = None) -> tuple[EtcdBackend, FakeClient, Clock]:
    """A backend on a Clock and a FakeClient, loaded at *revision* and in
    step (its watch created)."""
    clock = clock or Clock()
    client = client or FakeClient()
    backend = EtcdBackend(client.endpoints, PREFIX, clock, limits or Limits(), timeout,
                          client=client)
    d = backend.start()
    answer_load(client, revision, kvs)
    assert d.called
    client.watch_.open()
    client.watch_.created(revision)
    assert backend.health.state == "in_step"
    return backend, client, clock


def put(backend: EtcdBackend, key: str, value: Any, prev_revision: int | None = None,
        ttl: float | None = None) -> Deferred:
    """backend.put as the store calls it (the value encoded)."""
    return backend.put(key, raw(value), prev_revision, ttl)


def fired(d: Deferred) -> bool:
    """True once *d* has its result (not merely called and waiting on
    another Deferred); the result goes on down its chain untouched."""
    seen: list[bool] = []

    def look(result: Any) -> Any:
        seen.append(True)
        return result

    d.addBoth(look)
    return bool(seen)


def result_of(d: Deferred) -> Any:
    """What *d* fired with (a Failure if it failed, which is then handled);
    AssertionError if it has not fired."""
    results: list[Any] = []

    def look(result: Any) -> Any:
        results.append(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(look)
    assert results, "the Deferred has not fired"
    return results[0]
