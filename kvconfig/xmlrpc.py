"""
The XML-RPC interface: ``twisted.web.xmlrpc`` over the store.

Wire protocol
=============

HTTP POST of an XML-RPC ``methodCall`` to ``/RPC2`` (or ``/``), default
endpoint ``tcp:15000:interface=127.0.0.1``.  ``nil`` is allowed both ways
(the stdlib client needs ``allow_none=True`` to send or receive None).
Keep-alive connections are served until idle for ``--idle-timeout``.

The classic calls, exactly as the stdlib kvstore exercise's server::

    save(key, value)      -> nil       durable once it returns
    load(key)             -> value | nil
    delete(key)           -> nil       no error for a missing key

Richer calls (``options`` is an optional struct)::

    get(key)              -> {key, value, version, create_revision, mod_revision,
                              [expires_at]} | nil
    put(key, value, {prev_revision?, ttl?})
                          -> {key, version, create_revision, mod_revision,
                              [expires_at], revision}
    remove(key, {prev_revision?})
                          -> {deleted: bool, revision}
    keys(prefix, {limit?})   -> {revision, keys: [key, ...]}
    list(prefix, {limit?})   -> {revision, items: [get(key)-struct, ...]}
    changes(prefix, since)   -> {revision, events: [{type: "put"|"delete", key,
                                 revision, expired, [value, version,
                                 create_revision, mod_revision, expires_at]}]}
    stats()               -> struct of counters

    system.listMethods(), system.methodHelp(name), system.methodSignature(name),
    system.multicall([{methodName, params}, ...]) -> [[result] | {faultCode,
                                                       faultString}, ...]

``prev_revision`` makes a write a compare-and-set on the key's mod_revision
(0: only if the key is absent).  ``changes`` returns events with a revision
greater than ``since``; when those are older than the history window it
fails with ``compacted``, and the client takes ``list(prefix)`` and goes on
from its revision.

Every error is a Fault whose faultCode is the code of a kvconfig.errors type
and whose faultString starts with that type's name, as in
``Fault(6, "compare_failed: ...")``.  A request body larger than
``--max-body-bytes`` is discarded unread and answered with Fault 10.
"""

from __future__ import annotations

import inspect
from io import BytesIO
from typing import Any
from xml.parsers.expat import ExpatError
from xmlrpc.client import Fault, dumps, loads

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.xmlrpc import XMLRPC

from kvconfig import errors
from kvconfig.limits import Limits
from kvconfig.model import Event, KeyValue
from kvconfig.store import Store

RPC_PATHS = (b"/RPC2", b"/")


def kv_struct(kv: KeyValue) -> dict[str, Any]:
    struct = kv.metadata()
    struct["value"] = kv.value
    return struct


def event_struct(event: Event) -> dict[str, Any]:
    struct = {"type": event.type, "key": event.key, "revision": event.revision,
              "expired": event.expired}
    if event.kv is not None:
        struct.update(kv_struct(event.kv))
    return struct


def fault_for(error: errors.KVConfigError) -> Fault:
    return Fault(error.code, f"{error.name}: {error.message}")


def _options(options: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if type(options) is not dict:
        raise errors.WrongArguments(f"options must be a struct, not {type(options).__name__}")
    unknown = set(options) - set(allowed)
    if unknown:
        raise errors.InvalidArgument(
            f"unknown option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(allowed)}"
        )
    return options


def signature(*signatures: list[str]):
    """Attach XML-RPC type signatures for system.methodSignature."""

    def attach(method):
        method.signature = [list(s) for s in signatures]
        return method

    return attach


class _Dispatcher(XMLRPC):
    """Method lookup and argument checking shared by the root and system handlers."""

    def lookupProcedure(self, procedurePath: str):
        if type(procedurePath) is not str:
            raise errors.NoSuchMethod("method name must be a string")
        try:
            return super().lookupProcedure(procedurePath)
        except Fault:
            raise errors.NoSuchMethod(f"no method {procedurePath!r}") from None

    def listProcedures(self) -> list[str]:
        return sorted(super().listProcedures())


class KVConfigXMLRPC(_Dispatcher):
    """The XML-RPC resource: translates calls to the Store, errors to Faults."""

    log = Logger()

    def __init__(self, store: Store, limits: Limits | None = None) -> None:
        super().__init__(allowNone=True, useDateTime=True)
        self.store = store
        self.limits = limits or store.limits
        self.putSubHandler("system", SystemHandler(self))
        self._signatures: dict[Any, inspect.Signature] = {}

    # Request handling

    def render_POST(self, request: server.Request) -> bytes | int:
        if request.path not in RPC_PATHS:
            request.setResponseCode(http.NOT_FOUND)
            return b"No such XML-RPC path; use /RPC2\n"
        if getattr(request, "body_too_large", False):
            error = errors.RequestTooLarge(
                f"request body is larger than {self.limits.max_body_bytes} bytes"
            )
            return self._respond(Failure(error), request, None)
        try:
            method, args = self.parse(request.content.getvalue())
        except errors.KVConfigError as e:
            return self._respond(Failure(e), request, None)
        d = self.call(method, args)
        if d.called:
            # Reads answer at once: no Deferred plumbing, no notifyFinish.
            result = []
            d.addBoth(result.append)
            return self._respond(result[0], request, None)
        finished = []
        request.notifyFinish().addErrback(finished.append)
        d.addBoth(self._respond, request, finished)
        return server.NOT_DONE_YET

    @staticmethod
    def parse(body: bytes) -> tuple[str, tuple]:
        """Return (method name, params) of an XML-RPC methodCall body."""
        try:
            params, method = loads(body, use_builtin_types=True)
        except ExpatError as e:
            if b"encoding=" not in body[:100]:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError:
                    raise errors.BadEncoding(f"request is not valid UTF-8: {e}") from None
            raise errors.MalformedRequest(f"request is not well-formed XML: {e}") from None
        except Exception as e:  # the unmarshaller's ValueError, TypeError, ResponseError ...
            raise errors.InvalidRequest(f"request is not a valid XML-RPC call: {e}") from None
        if method is None:
            raise errors.InvalidRequest("request is not an XML-RPC methodCall")
        return method, params

    def call(self, method_name: str, args: tuple) -> Deferred:
        """Call an XML-RPC method; the Deferred fails with a KVConfigError
        for anything the client did wrong."""
        try:
            function = self.lookupProcedure(method_name)
            self._check_arguments(function, args)
        except errors.KVConfigError as e:
            return _failed(e)
        return maybeDeferred(function, *args)

    def _check_arguments(self, function, args: tuple) -> None:
        sig = self._signatures.get(function)
        if sig is None:
            sig = self._signatures[function] = inspect.signature(function)
        try:
            sig.bind(*args)
        except TypeError as e:
            raise errors.WrongArguments(f"{function.__name__[7:]}: {e}") from None

    def _respond(self, result: Any, request: server.Request, finished: list | None):
        if finished:
            return None  # the client went away
        if isinstance(result, Failure):
            result = self.fault(result)
        if not isinstance(result, Fault):
            result = (result,)
        try:
            body = dumps(result, methodresponse=True, allow_none=True).encode("utf-8")
        except Exception as e:
            self.log.failure("cannot marshal a response", Failure(e))
            body = dumps(fault_for(errors.InternalError("cannot marshal the response")),
                         methodresponse=True).encode("utf-8")
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        if finished is None:
            return body
        request.write(body)
        request.finish()
        return None

    def fault(self, failure: Failure) -> Fault:
        error = failure.value
        if isinstance(error, errors.KVConfigError):
            return fault_for(error)
        if isinstance(error, Fault):
            return error
        self.log.failure("XML-RPC method failed", failure)
        return fault_for(errors.InternalError(f"internal error: {type(error).__name__}"))

    # The classic calls

    @signature(["nil", "string", "any"])
    def xmlrpc_save(self, key, value):
        """save(key, value): store value under key; returns nil once it is durable."""
        return self.store.save(key, value)

    @signature(["any", "string"])
    def xmlrpc_load(self, key):
        """load(key): the value stored under key, or nil if there is none."""
        return self.store.load(key)

    @signature(["nil", "string"])
    def xmlrpc_delete(self, key):
        """delete(key): remove key; no error if it does not exist. Returns nil
        once the delete is durable."""
        return self.store.delete(key).addCallback(lambda _: None)

    # Richer calls

    @signature(["struct", "string"])
    def xmlrpc_get(self, key):
        """get(key): {key, value, version, create_revision, mod_revision,
        [expires_at]} for key, or nil if there is none."""
        kv = self.store.get(key)
        return None if kv is None else kv_struct(kv)

    @signature(["struct", "string", "any"], ["struct", "string", "any", "struct"])
    def xmlrpc_put(self, key, value, options=None):
        """put(key, value[, {prev_revision, ttl}]): store value under key and
        return its new metadata and the revision of the write.

        prev_revision: write only if the key's mod_revision equals it (0: only
        if the key does not exist), else Fault 6 compare_failed.
        ttl: seconds after which the key is deleted unless written again."""
        opts = _options(options, ("prev_revision", "ttl")) if options is not None else {}

        def done(kv: KeyValue) -> dict:
            struct = kv.metadata()
            struct["revision"] = kv.mod_revision
            return struct

        return self.store.put(key, value, opts.get("prev_revision"), opts.get("ttl")) \
            .addCallback(done)

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_remove(self, key, options=None):
        """remove(key[, {prev_revision}]): delete key; returns {deleted, revision}.

        deleted is false if the key did not exist; revision is that of the
        delete, or the current revision if nothing was deleted.
        prev_revision: delete only if the key's mod_revision equals it."""
        opts = _options(options, ("prev_revision",)) if options is not None else {}
        store = self.store
        return store.delete(key, opts.get("prev_revision")).addCallback(
            lambda revision: {"deleted": revision is not None,
                              "revision": store.revision if revision is None else revision}
        )

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_keys(self, prefix, options=None):
        """keys(prefix[, {limit}]): {revision, keys} with the keys starting with
        prefix, in order ("" for all)."""
        opts = _options(options, ("limit",)) if options is not None else {}
        revision, kvs = self.store.range(prefix, opts.get("limit"))
        return {"revision": revision, "keys": [kv.key for kv in kvs]}

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_list(self, prefix, options=None):
        """list(prefix[, {limit}]): {revision, items}, a snapshot of the keys
        starting with prefix, each as get() returns it.  Continue from its
        revision with changes()."""
        opts = _options(options, ("limit",)) if options is not None else {}
        revision, kvs = self.store.range(prefix, opts.get("limit"))
        return {"revision": revision, "items": [kv_struct(kv) for kv in kvs]}

    @signature(["struct", "string", "int"])
    def xmlrpc_changes(self, prefix, since):
        """changes(prefix, since): {revision, events} with every change after
        revision since to keys starting with prefix, oldest first.  Fault 7
        compacted if those are no longer in history: take list(prefix) then."""
        revision, events = self.store.changes(prefix, since)
        return {"revision": revision, "events": [event_struct(e) for e in events]}

    @signature(["struct"])
    def xmlrpc_stats(self):
        """stats(): the server's counters (keys, revision, reads, puts, ...)."""
        return self.store.stats()


class SystemHandler(_Dispatcher):
    """system.*: introspection as the stdlib server has it, and multicall."""

    def __init__(self, parent: KVConfigXMLRPC) -> None:
        super().__init__()
        self.parent = parent

    @signature(["array"])
    def xmlrpc_listMethods(self):
        """system.listMethods(): the names of every method this server has."""
        names = self.parent.listProcedures()
        names += [f"system.{name}" for name in self.listProcedures()]
        return sorted(names)

    @signature(["string", "string"])
    def xmlrpc_methodHelp(self, method_name):
        """system.methodHelp(name): the documentation of a method."""
        return inspect.getdoc(self.parent.lookupProcedure(method_name)) or ""

    @signature(["array", "string"])
    def xmlrpc_methodSignature(self, method_name):
        """system.methodSignature(name): the method's signatures, each a list
        [return type, argument types...]."""
        return self.parent.lookupProcedure(method_name).signature

    @signature(["array", "array"])
    def xmlrpc_multicall(self, calls):
        """system.multicall([{methodName, params}, ...]): make several calls in
        one request, in order.  Returns a list with [result] for each call
        that succeeded and {faultCode, faultString} for each that failed;
        one failing call does not stop the others.  Nesting is not allowed,
        and a batch holds at most --max-multicall calls."""
        if type(calls) is not list:
            raise errors.WrongArguments("system.multicall takes an array of calls")
        limit = self.parent.limits.max_multicall
        if len(calls) > limit:
            raise errors.BatchTooLarge(f"{len(calls)} calls in one multicall; the limit is {limit}")
        # Start every call before waiting on any: writes are decided in order
        # (so later calls see earlier ones) and share one group commit.
        return gatherResults([self._one(call) for call in calls])

    def _one(self, call: Any) -> Deferred:
        parent = self.parent
        if type(call) is not dict or "methodName" not in call:
            d = _failed(errors.InvalidRequest("each call must be a struct with methodName"))
        elif call["methodName"] == "system.multicall":
            d = _failed(errors.InvalidRequest("system.multicall cannot be nested"))
        else:
            params = call.get("params", [])
            if type(params) is not list:
                d = _failed(errors.WrongArguments("params must be an array"))
            else:
                d = parent.call(call["methodName"], tuple(params))
        return d.addCallbacks(lambda result: [result], self._fault_struct)

    def _fault_struct(self, failure: Failure) -> dict:
        fault = self.parent.fault(failure)
        return {"faultCode": fault.faultCode, "faultString": fault.faultString}


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(error))
    return d


class KVConfigRequest(server.Request):
    """A request whose body is kept in memory only up to the limit.

    Twisted's Request spools bodies over 100 kB to a temporary file (disk
    I/O on the reactor); this one keeps at most ``max_body_bytes`` and
    discards the rest unread, marking ``body_too_large``.
    """

    body_too_large = False

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self._room = self.channel.site.limits.max_body_bytes
        if length is not None and length > self._room:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._room -= len(data)
        if self._room < 0:
            self.body_too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)


class KVConfigSite(server.Site):
    """The HTTP site serving the XML-RPC resource, with a connection limit."""

    requestFactory = KVConfigRequest

    def __init__(self, resource: KVConfigXMLRPC, limits: Limits, reactor=None) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, reactor=reactor)
        self.limits = limits
        self.connections = 0
        self.refused = 0

    def log(self, request) -> None:
        # An access-log line per call would cost more than the call itself
        # and flood the log of a busy fleet; failures are logged as they happen.
        pass

    def buildProtocol(self, addr):
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            return None
        channel = super().buildProtocol(addr)
        self.connections += 1
        lost = channel.connectionLost

        def connectionLost(reason, lost=lost):
            self.connections -= 1
            lost(reason)

        channel.connectionLost = connectionLost
        return channel


def make_site(store: Store, limits: Limits, reactor=None) -> KVConfigSite:
    return KVConfigSite(KVConfigXMLRPC(store, limits), limits, reactor=reactor)
