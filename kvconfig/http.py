"""
The HTTP interface: metrics, health checks, a JSON API and the web console.

A ``twisted.web`` Site on ``--http`` (default ``tcp:15003:interface=127.0.0.1``;
``none``: no HTTP port), on the server's one reactor.  Each connection has a
kvconfig.session.Session, through which every API request goes, so ordering,
bounds and (later) permissions are those of the other interfaces.

Paths
=====

::

    GET  /metrics          Prometheus text exposition (kvconfig.metrics)
    GET  /healthz          200 {"status": "serving", "version": V}: the process serves
    GET  /readyz           200 {"ready": true, ...} once the store is loaded and, in
                           cluster mode, in step with etcd; else 503 {"ready": false,
                           "reason": ...}
    GET  /ui/              the web console (static files shipped in the package)
    GET  /                 redirects to /ui/

The JSON API, under ``/v1/`` (curl-friendly, after Consul's ``/v1/kv``)::

    GET    /v1/kv/KEY                  200 {key, value, version, create_revision,
                                       mod_revision[, expires_at]}, 404 if absent
    GET    /v1/kv/PREFIX?recurse       200 {revision, items: [...], more}: one page of
                                       the keys under PREFIX (``/v1/kv/?recurse``: every
                                       key); ``&limit=N``, ``&after=KEY`` page as
                                       ``list`` does; ``&keys`` gives {revision, keys,
                                       more} instead
    PUT    /v1/kv/KEY                  body: the value as JSON (tagged JSON for bytes and
                                       datetimes); 200 {key, version, create_revision,
                                       mod_revision[, expires_at], revision}, once durable
           ?cas=REV                    only if the key's mod_revision is REV (0: absent)
           ?ttl=SECONDS                delete it after that long unless written again
    DELETE /v1/kv/KEY[?cas=REV]        200 {deleted: bool, revision}
    GET    /v1/status                  200 the server's stats(), as XML-RPC's stats()
    GET    /v1/subscriptions           200 {revision, subscriptions: [{sub, address, host,
                                       port, prefix, owner, seq, rev, applied, lag,
                                       last_heard, expires_in}]}
    GET    /v1/watch?prefix=P&from=REV server-sent events (text/event-stream)

Values are kvconfig's tagged JSON (kvconfig.values): plain JSON, with bytes
as ``{"$bytes": "<base64>"}`` and datetimes as ``{"$datetime":
"YYYYMMDDTHH:MM:SS"}``.  In cluster mode, while the node is out of touch with
etcd, read answers also hold ``"stale": true``.  Every response carries
``X-Kvconfig-Revision``, the store's revision.

Errors are the errors of kvconfig.errors, as a JSON body ``{"error": name,
"code": code, "message": text}`` with an HTTP status: 400 for bad input
(invalid_key, invalid_value, invalid_argument ...), 403 permission_denied,
404 for a missing key or path (``"error": "not_found"``, code 0), 405 for a
method a path does not take, 409 compare_failed, 410 compacted, 413
value_too_large and request_too_large (a body over ``--max-body-bytes``),
429 limit_exceeded and slow_consumer, 503 unavailable, 500 internal_error.

The watch stream: ``GET /v1/watch?prefix=app/&from=REV`` (both optional)
answers ``text/event-stream``.  Its first event is ``event: watching`` with
``data: {"watch": ID, "prefix": P, "revision": R}``; with ``from``, the
changes from revision REV on are replayed, then each change as it commits::

    id: 42
    event: put
    data: {"type": "put", "key": K, "revision": 42, "value": V, "version": N,
           "create_revision": C, "mod_revision": 42[, "expires_at": T]}

    id: 43
    event: delete
    data: {"type": "delete", "key": K, "revision": 43, "expired": false}

A comment line (``: keep-alive``) comes every 15 s.  A browser's EventSource
reconnecting sends ``Last-Event-ID``, and the stream resumes at that
revision (its events may come again).  A watcher that does not read is
bounded as a line-protocol watcher is (``--max-watch-backlog``,
``--max-watch-backlog-bytes``, ``--max-buffer-bytes``): past that it gets
``event: error`` (slow_consumer) and is disconnected.  ``from`` older than
the history is 410 compacted: list the prefix, then watch from its revision.

Bodies are at most ``--max-body-bytes``, kept in memory and counted against
``--max-buffer-bytes``; a request head must be complete within
``--request-timeout``; connections are limited as on every interface.  No
access log is written: each change is logged once (kvconfig.changelog).
There is no authentication yet: the defaults bind 127.0.0.1 only.
"""

from __future__ import annotations

import json
from collections import deque
from importlib import resources
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from kvconfig import __version__, errors, values
from kvconfig.limits import Limits
from kvconfig.metrics import CONTENT_TYPE, Metrics
from kvconfig.model import Event, KeyValue
from kvconfig.session import Deadline, Session, Sessions, budget_full, is_deferred
from kvconfig.store import Store
from kvconfig.subscriptions import Subscriptions

#: Seconds between the keep-alive comments of a watch stream.
KEEP_ALIVE = 15.0
#: The web console's files, in the package.
UI_FILES = {"index.html": b"text/html; charset=utf-8",
            "console.css": b"text/css; charset=utf-8",
            "console.js": b"text/javascript; charset=utf-8"}

#: The HTTP status of each error.
STATUS = {
    errors.InvalidKey: 400, errors.KeyTooLarge: 400, errors.InvalidValue: 400,
    errors.ValueTooLarge: 413, errors.InvalidArgument: 400, errors.CompareFailed: 409,
    errors.Compacted: 410, errors.Unavailable: 503, errors.LimitExceeded: 429,
    errors.RequestTooLarge: 413, errors.BatchTooLarge: 413, errors.SlowConsumer: 429,
    errors.PermissionDenied: 403, errors.MalformedRequest: 400, errors.BadEncoding: 400,
    errors.InvalidRequest: 400, errors.NoSuchMethod: 404, errors.WrongArguments: 400,
    errors.InternalError: 500,
}

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constants)


class NotFound(Exception):
    """No such key or path: 404, ``"error": "not_found"``."""


def status_of(error: errors.KVConfigError) -> int:
    return STATUS.get(type(error), 500)


def error_body(error: errors.KVConfigError | NotFound) -> dict[str, Any]:
    if isinstance(error, NotFound):
        return {"error": "not_found", "code": 0, "message": str(error)}
    return {"error": error.name, "code": error.code, "message": error.message}


def kv_json(kv: KeyValue) -> dict[str, Any]:
    """A key as the API shows it: its metadata and its value as tagged JSON."""
    struct = kv.metadata()
    struct["value"] = json.loads(kv.raw)
    return struct


def event_json(event: Event) -> dict[str, Any]:
    struct: dict[str, Any] = {"type": event.type, "key": event.key,
                              "revision": event.revision}
    if event.kv is None:
        struct["expired"] = event.expired
    else:
        struct.update(kv_json(event.kv))
    return struct


def parse_value(body: bytes) -> Any:
    """A request body: one JSON value in kvconfig's tagged JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadEncoding("the body is not valid UTF-8") from None
    try:
        return values.from_tagged(_decoder.decode(text))
    except ValueError:
        raise errors.InvalidValue(
            f"the body must be one JSON value (a string is quoted: '\"text\"'), not "
            f"{errors.brief(text)}") from None
    except RecursionError:
        raise errors.InvalidValue("the value is nested too deeply") from None


def _query(request: server.Request) -> dict[str, list[str]]:
    """The query's parameters, bare words (``?recurse``) included, which
    twisted.web's own ``args`` leaves out."""
    query = getattr(request, "_kvconfig_query", None)
    if query is None:
        _, _, text = request.uri.partition(b"?")
        try:
            query = parse_qs(text.decode("utf-8"), keep_blank_values=True,
                             errors="strict")
        except UnicodeDecodeError:
            raise errors.BadEncoding("the query is not valid UTF-8") from None
        request._kvconfig_query = query
    return query


def _arg(request: server.Request, name: str) -> str | None:
    given = _query(request).get(name)
    return given[-1] if given else None


def _int_arg(request: server.Request, name: str) -> int | None:
    text = _arg(request, name)
    if text is None:
        return None
    try:
        return int(text, 10)
    except ValueError:
        raise errors.InvalidArgument(
            f"?{name}= must be an integer, not {errors.brief(text)}") from None


def _number_arg(request: server.Request, name: str) -> float | None:
    text = _arg(request, name)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise errors.InvalidArgument(
            f"?{name}= must be a number, not {errors.brief(text)}") from None
    return int(number) if number.is_integer() else number


def _has(request: server.Request, name: str) -> bool:
    return name in _query(request)


def _path(request: server.Request) -> str:
    """The path after the resource's own segment, decoded."""
    try:
        return "/".join(segment.decode("utf-8") for segment in request.postpath)
    except UnicodeDecodeError:
        raise errors.BadEncoding("the path is not valid UTF-8") from None


# Answering


def _headers(request: server.Request, store: Store, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-kvconfig-revision", b"%d" % store.revision)


def _finish_json(request: server.Request, store: Store, sessions: Sessions,
                 outcome: Any) -> bytes:
    """The body for an outcome (a (status, dict) pair, or an error), with
    the status and headers set."""
    if isinstance(outcome, (errors.KVConfigError, NotFound)):
        status = 404 if isinstance(outcome, NotFound) else status_of(outcome)
        sessions.errors["not_found" if isinstance(outcome, NotFound) else outcome.name] += 1
        body = error_body(outcome)
    else:
        status, body = outcome
    request.setResponseCode(status)
    _headers(request, store, b"application/json; charset=utf-8")
    return _encode(body).encode("utf-8") + b"\n"


def _answer(request: server.Request, store: Store, sessions: Sessions, outcome: Any):
    """Write an outcome, or a Deferred of one, as the response."""
    if not is_deferred(outcome):
        return _finish_json(request, store, sessions, outcome)
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def write(outcome: Any) -> None:
        if not gone:
            request.write(_finish_json(request, store, sessions, outcome))
            request.finish()

    outcome.addCallback(write)
    return server.NOT_DONE_YET


class _API(Resource):
    """``/v1/``: the JSON API, through the connection's Session."""

    isLeaf = True
    log = Logger()

    def __init__(self, store: Store, sessions: Sessions, limits: Limits,
                 subscriptions: Subscriptions | None, clock: IReactorTime) -> None:
        super().__init__()
        self.store, self.sessions, self.limits = store, sessions, limits
        self.subscriptions, self.clock = subscriptions, clock

    def render(self, request: server.Request):
        session: Session = request.channel.session
        body = request.content.read()
        session.hold("body", 0)
        method = request.method.decode("ascii", "replace")
        try:
            refusal = getattr(request, "refusal", None)
            if refusal is not None:
                raise refusal
            path = _path(request)
            route, _, rest = path.partition("/")
            if route == "kv" and (rest or _has(request, "recurse")):
                return self._kv(request, session, method, rest, body)
            if route == "watch" and not rest:
                self._only(request, method, "GET")
                self.sessions.requests["watch"] += 1
                return self._watch(request, session)
            handler = {"status": self._status, "subscriptions": self._subscriptions
                       }.get(route) if not rest else None
            if handler is None:
                raise NotFound(f"no such path /v1/{path}; see the API at /ui/ or the README")
            self._only(request, method, "GET")
            self.sessions.requests[route] += 1
            outcome = session.submit(lambda: (200, handler(session)))
        except (errors.KVConfigError, NotFound) as e:
            outcome = e
        except _MethodNotAllowed as e:
            return self._not_allowed(request, e.allowed)
        return _answer(request, self.store, self.sessions, outcome)

    render_GET = render_PUT = render_DELETE = render_HEAD = render_POST = render

    @staticmethod
    def _only(request: server.Request, method: str, *allowed: str) -> None:
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            raise _MethodNotAllowed(allowed)

    def _not_allowed(self, request: server.Request, allowed: tuple[str, ...]) -> bytes:
        self.sessions.errors["method_not_allowed"] += 1
        request.setResponseCode(405)
        request.setHeader(b"allow", ", ".join(allowed).encode())
        _headers(request, self.store, b"application/json; charset=utf-8")
        message = f"{request.method.decode('ascii', 'replace')} is not allowed here; " \
                  f"use {' or '.join(allowed)}"
        return _encode({"error": "method_not_allowed", "code": 0,
                        "message": message}).encode() + b"\n"

    # /v1/kv

    def _kv(self, request: server.Request, session: Session, method: str, key: str,
            body: bytes) -> Any:
        if _has(request, "recurse"):
            self._only(request, method, "GET")
            operation = "keys" if _has(request, "keys") else "list"
            self.sessions.requests[operation] += 1
            limit, after = _int_arg(request, "limit"), _arg(request, "after")
            return _answer(request, self.store, self.sessions, session.submit(
                lambda: (200, self._listing(session, key, limit, after, operation))))
        self._only(request, method, "GET", "PUT", "DELETE")
        if method in ("GET", "HEAD"):
            self.sessions.requests["get"] += 1
            return _answer(request, self.store, self.sessions,
                           session.submit(lambda: self._get(session, key)))
        cas = _int_arg(request, "cas")
        if method == "PUT":
            self.sessions.requests["put"] += 1
            ttl = _number_arg(request, "ttl")
            value = parse_value(body)
            return _answer(request, self.store, self.sessions, session.submit(
                lambda: session.put(key, value, cas, ttl).addCallback(_put_answer),
                writes=True, size=len(body) + len(key)))
        self.sessions.requests["delete"] += 1
        if _has(request, "ttl"):
            raise errors.InvalidArgument("?ttl= is for PUT")
        store = self.store
        return _answer(request, self.store, self.sessions, session.submit(
            lambda: session.delete(key, cas).addCallback(
                lambda revision: (200, {"deleted": revision is not None,
                                        "revision": store.revision if revision is None
                                        else revision})),
            writes=True, size=len(key)))

    @staticmethod
    def _get(session: Session, key: str) -> tuple[int, dict[str, Any]] | NotFound:
        kv = session.get(key)
        if kv is None:
            return NotFound(f"no key {key!r}")
        return 200, _say_stale(session, kv_json(kv))

    @staticmethod
    def _listing(session: Session, prefix: str, limit: int | None, after: str | None,
                 operation: str) -> dict[str, Any]:
        revision, kvs, more = session.range(prefix, limit, after)
        if operation == "keys":
            answer = {"revision": revision, "keys": [kv.key for kv in kvs], "more": more}
        else:
            answer = {"revision": revision, "items": [kv_json(kv) for kv in kvs],
                      "more": more}
        return _say_stale(session, answer)

    # /v1/status, /v1/subscriptions

    @staticmethod
    def _status(session: Session) -> dict[str, Any]:
        return session.stats()

    def _subscriptions(self, session: Session) -> dict[str, Any]:
        subscriptions = self.subscriptions
        listed = []
        if subscriptions is not None:
            now = self.clock.seconds()
            for s in sorted(subscriptions, key=lambda s: (s.prefix, s.address)):
                host, port = s.address
                listed.append({
                    "sub": s.id, "address": f"[{host}]:{port}" if ":" in host
                    else f"{host}:{port}", "host": host, "port": port, "prefix": s.prefix,
                    "owner": s.owner, "seq": s.seq, "rev": s.rev, "applied": s.applied,
                    "lag": subscriptions.lag(s), "last_heard": s.last_heard,
                    "expires_in": max(0.0, s.expires_at - now)})
        return {"revision": self.store.revision, "subscriptions": listed}

    # /v1/watch

    def _watch(self, request: server.Request, session: Session):
        prefix = _arg(request, "prefix") or ""
        start = _int_arg(request, "from")
        if start is None:
            last = request.getHeader(b"last-event-id")
            if last:
                try:
                    start = int(last)
                except ValueError:
                    raise errors.InvalidArgument(
                        f"Last-Event-ID must be a revision, not {errors.brief(last)}") from None
        stream = _WatchStream(request, session, self.store, self.sessions, self.limits,
                              self.clock)
        outcome = session.submit(lambda: session.watch(prefix, start, stream.event))
        if is_deferred(outcome):   # waits for this connection's earlier requests
            outcome.addCallback(stream.started, prefix, later=True)
            return server.NOT_DONE_YET
        return stream.started(outcome, prefix)


class _MethodNotAllowed(Exception):
    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


def _put_answer(kv: KeyValue) -> tuple[int, dict[str, Any]]:
    struct = kv.metadata()
    struct["revision"] = kv.mod_revision
    return 200, struct


def _say_stale(session: Session, struct: dict[str, Any]) -> dict[str, Any]:
    if session.stale:
        struct["stale"] = True
    return struct


class _WatchStream:
    """One ``/v1/watch`` response: server-sent events of a Session's watch,
    bounded like a line-protocol watcher.  It is the request's producer, so
    it knows when the client stops reading."""

    def __init__(self, request: server.Request, session: Session, store: Store,
                 sessions: Sessions, limits: Limits, clock: IReactorTime) -> None:
        self.request, self.session, self.store = request, session, store
        self.sessions, self.limits, self.clock = sessions, limits, clock
        self.watch_id: int | None = None
        self._paused = False
        self._ended = False
        self._backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self._early: list[Event] = []    # events before the stream started
        self._keep_alive: IDelayedCall | None = None

    def started(self, outcome: Any, prefix: str, later: bool = False):
        """The watch's outcome: start streaming, or answer its error
        (returned as render's body, or written *later*)."""
        request = self.request
        if isinstance(outcome, errors.KVConfigError):
            body = _finish_json(request, self.store, self.sessions, outcome)
            if not later:
                return body
            if not request.finished and request.channel is not None:
                request.write(body)
                request.finish()
            return None
        self.watch_id, revision, replay = outcome
        request.notifyFinish().addBoth(self._finished)
        request.setResponseCode(200)
        _headers(request, self.store, b"text/event-stream; charset=utf-8")
        request.setHeader(b"x-accel-buffering", b"no")
        # Watches are expected to be quiet: no idle timeout (as the line
        # protocol's); the keep-alive comments find a client that is gone.
        request.channel.setTimeout(None)
        request.registerProducer(self, True)
        lines = [_sse("watching", {"watch": self.watch_id, "prefix": prefix,
                                   "revision": revision})]
        lines.extend(_sse(event.type, event_json(event), event.revision) for event in replay)
        request.write(b"".join(lines))
        early, self._early = self._early, []
        for event in early:
            self.event(self.watch_id, event)
        self._keep_alive = self.clock.callLater(KEEP_ALIVE, self._ping)
        return server.NOT_DONE_YET

    def event(self, watch_id: int, event: Event) -> None:
        if self._ended:
            return
        if self.watch_id is None:
            self._early.append(event)
            return
        data = _sse(event.type, event_json(event), event.revision)
        if not self._paused and not self._backlog:
            self.request.write(data)
            return
        limits = self.limits
        held = self._backlog_bytes + len(data)
        why = None
        if len(self._backlog) >= limits.max_watch_backlog or held > limits.max_watch_backlog_bytes:
            why = (f"more than {limits.max_watch_backlog} events or "
                   f"{limits.max_watch_backlog_bytes} bytes waiting to be read")
        elif not self.session.hold("backlog", held):
            why = budget_full("watch backlog", self.session.budget).message
        if why is not None:
            self._drop(why)
            return
        self._backlog.append(data)
        self._backlog_bytes = held

    def _drop(self, why: str) -> None:
        """The client does not read: end its watch, and the connection (what
        it has not read is not kept for it)."""
        self.sessions.counters["watchers_dropped"] += 1
        error = errors.SlowConsumer(f"watch ended: {why}; watch again from the last "
                                    "revision seen")
        self.sessions.errors[error.name] += 1
        self._end()
        self.request.write(_sse("error", error_body(error)))
        transport = self.request.channel.transport
        if transport is not None:
            transport.abortConnection()

    def _ping(self) -> None:
        self._keep_alive = None
        if self._ended:
            return
        if not self._paused:
            self.request.write(b": keep-alive\n\n")
        self._keep_alive = self.clock.callLater(KEEP_ALIVE, self._ping)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.watch_id is not None:
            try:
                self.session.unwatch(self.watch_id)
            except errors.InvalidArgument:
                pass    # the session already closed
        if self._keep_alive is not None and self._keep_alive.active():
            self._keep_alive.cancel()
        self._backlog.clear()
        self._backlog_bytes = 0
        self.session.hold("backlog", 0)

    def _finished(self, _: Any) -> None:
        self._end()

    # IPushProducer: the channel pauses us when the client stops reading.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._backlog and not self._paused and not self._ended:
            data = self._backlog.popleft()
            self._backlog_bytes -= len(data)
            self.request.write(data)
        if not self._ended:
            self.session.hold("backlog", self._backlog_bytes)

    def stopProducing(self) -> None:
        self._end()


def _sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return b"%sevent: %s\ndata: %s\n\n" % (head, kind.encode(), _encode(data).encode("utf-8"))


class _Health(Resource):
    """``/healthz`` (the process serves) or ``/readyz`` (it can be read)."""

    isLeaf = True

    def __init__(self, store: Store, sessions: Sessions, ready: bool) -> None:
        super().__init__()
        self.store, self.sessions, self.ready = store, sessions, ready

    def render_GET(self, request: server.Request) -> bytes:
        store = self.store
        if not self.ready:
            self.sessions.requests["healthz"] += 1
            status, body = 200, {"status": "serving", "version": __version__}
        else:
            self.sessions.requests["readyz"] += 1
            backend = store.backend
            ready = bool(backend.ready and not store.stale)
            body = {"ready": ready, "backend": backend.name, "revision": store.revision,
                    "keys": len(backend.keyspace), "stale": store.stale}
            state = backend.stats().get("etcd_state")
            if state is not None:
                body["etcd_state"] = state
            reason = getattr(backend, "reason", "")
            if not ready:
                body["reason"] = reason or ("loading" if not backend.ready else "stale")
            status = 200 if ready else 503
        request.setResponseCode(status)
        _headers(request, store, b"application/json; charset=utf-8")
        return _encode(body).encode() + b"\n"

    render_HEAD = render_GET


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, sessions: Sessions) -> None:
        super().__init__()
        self.metrics, self.sessions = metrics, sessions

    def render_GET(self, request: server.Request) -> bytes:
        self.sessions.requests["metrics"] += 1
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self.metrics.exposition()


class _Static(Resource):
    """The console's files, read once at start (nothing is read from disk
    while serving)."""

    isLeaf = True

    def __init__(self, sessions: Sessions) -> None:
        super().__init__()
        self.sessions = sessions
        folder = resources.files("kvconfig") / "ui"
        self.files = {name: (folder.joinpath(name).read_bytes(), kind)
                      for name, kind in UI_FILES.items()}

    def render_GET(self, request: server.Request) -> bytes:
        name = "/".join(segment.decode("utf-8", "replace") for segment in request.postpath)
        if not request.path.endswith(b"/") and not request.postpath:
            request.redirect(b"/ui/")
            return b""
        content = self.files.get(name or "index.html")
        self.sessions.requests["ui"] += 1
        if content is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"no such file\n"
        body, kind = content
        request.setHeader(b"content-type", kind)
        request.setHeader(b"cache-control", b"no-cache")
        # The console loads nothing from elsewhere, and may not.
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body

    render_HEAD = render_GET


class _Root(Resource):
    """``/``: redirects to the console; unknown paths are 404 in JSON."""

    def __init__(self, store: Store, sessions: Sessions) -> None:
        super().__init__()
        self.store, self.sessions = store, sessions

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return self

    def render(self, request: server.Request) -> bytes:
        if request.path == b"/":
            request.redirect(b"/ui/")
            return b""
        return _finish_json(request, self.store, self.sessions,
                            NotFound(f"no such path {request.path.decode('utf-8', 'replace')}"))


# The site


class _Request(server.Request):
    """A request whose body is bounded by --max-body-bytes and held against
    the buffer budget; one past either is read, discarded, and answered
    with the error (``refusal``)."""

    refusal: errors.KVConfigError | None = None
    _body_bytes = 0
    _parsePOSTFormSubmission = False   # a body is a value, never form fields

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        limits = self.channel.site.limits
        if length is not None and length > limits.max_body_bytes:
            self._refuse(errors.RequestTooLarge(
                f"request body is larger than {limits.max_body_bytes} bytes"))

    def handleContentChunk(self, data: bytes) -> None:
        if self.refusal is not None:
            return
        limits = self.channel.site.limits
        self._body_bytes += len(data)
        if self._body_bytes > limits.max_body_bytes:
            self._refuse(errors.RequestTooLarge(
                f"request body is larger than {limits.max_body_bytes} bytes"))
        elif not self.channel.session.hold("body", self._body_bytes):
            self._refuse(budget_full("request body not read", self.channel.session.budget))
        else:
            super().handleContentChunk(data)

    def _refuse(self, error: errors.KVConfigError) -> None:
        self.refusal = error
        self.content = BytesIO()
        self.channel.session.hold("body", 0)


class _Channel(http.HTTPChannel):
    """A connection, with its Session; a request head must be complete
    within --request-timeout (slowloris)."""

    session: Session

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        self.session.connected_from(self.transport.getPeer())
        self._head_deadline = Deadline(site.reactor, site.limits.request_timeout,
                                       self._head_too_slow)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # A head under way: a partial line, or a request not yet complete.
        if self.line_mode and (self._buffer or (self.requests and not self._handlingRequest)):
            self._head_deadline.start()
        else:
            self._head_deadline.stop()

    def allHeadersReceived(self) -> None:
        self._head_deadline.stop()
        super().allHeadersReceived()

    def _head_too_slow(self) -> None:
        body = (f"no complete request head within {self.site.limits.request_timeout} s; "
                "closing\n").encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._head_deadline.stop()
        # A body being read is freed now, not when the collector finds the
        # request's cycle: the budget it was held under is given back now.
        for request in self.requests:
            request.content = BytesIO()
        super().connectionLost(reason)
        self.session.close()


class _Refusal(Protocol):
    """A connection past a connection limit: told why (503), then closed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def connectionMade(self) -> None:
        body = self.reason.encode("utf-8") + b"\n"
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body))
        self.transport.loseConnection()


class HTTPSite(server.Site):
    """The ``--http`` port's Site: a Session per connection (none past the
    connection limits), no access log."""

    noisy = False
    protocol = _Channel

    def __init__(self, root: Resource, sessions: Sessions, limits: Limits,
                 reactor: Any) -> None:
        super().__init__(root, requestFactory=_Request, timeout=limits.idle_timeout,
                         reactor=reactor)
        self.sessions, self.limits = sessions, limits

    def buildProtocol(self, addr: Any) -> Protocol:
        try:
            session = self.sessions.open(getattr(addr, "host", None))
        except errors.LimitExceeded as e:
            return _Refusal(str(e))
        channel = super().buildProtocol(addr)
        channel.session = session
        return channel

    def getContentFile(self, length: int | None) -> BytesIO:
        # Bodies are bounded (_Request), so kept in memory: never a
        # temporary file, which would be blocking I/O on the reactor.
        return BytesIO()

    def log(self, request: server.Request) -> None:
        pass    # no access log: each change is logged once, by kvconfig.changelog


def make_site(store: Store, limits: Limits, reactor: Any, metrics: Metrics,
              subscriptions: Subscriptions | None = None) -> HTTPSite:
    """The Site the ``--http`` endpoint listens with."""
    sessions = Sessions(store, "http", limits, subscriptions,
                        counters=("watchers_dropped",))
    metrics.add_interface(sessions)
    root = _Root(store, sessions)
    root.putChild(b"metrics", _Metrics(metrics, sessions))
    root.putChild(b"healthz", _Health(store, sessions, ready=False))
    root.putChild(b"readyz", _Health(store, sessions, ready=True))
    root.putChild(b"v1", _API(store, sessions, limits, subscriptions, reactor))
    root.putChild(b"ui", _Static(sessions))
    return HTTPSite(root, sessions, limits, reactor)
