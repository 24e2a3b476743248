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
    keys(prefix, {limit?, after?})
                          -> {revision, keys: [key, ...], more}
    list(prefix, {limit?, after?})
                          -> {revision, items: [get(key)-struct, ...], more}
    changes(prefix, since)   -> {revision, events: [{type: "put"|"delete", key,
                                 revision, expired, [value, version,
                                 create_revision, mod_revision, expires_at]}]}
    subscribe(prefix, udp_port, {applied?})
                          -> {sub, prefix, seq, rev, head, lease, heartbeat}
    unsubscribe(prefix, udp_port)
                          -> {unsubscribed: bool}
    stats()               -> struct of counters

    system.listMethods(), system.methodHelp(name), system.methodSignature(name),
    system.multicall([{methodName, params}, ...]) -> [[result] | {faultCode,
                                                       faultString}, ...]

In cluster mode (an etcd store), while the node is out of touch with etcd
the structs of ``get``, ``keys``, ``list`` and ``changes`` also hold
``stale: true``: they come from the node's copy, which may lag; ``stats()``
always says ``stale``.

A listing is paged: at most ``limit`` keys (default and most:
``--max-list-items``) and, past the first, ``--max-reply-bytes`` of keys and
values.  ``more`` is true when keys follow; the next page is asked for with
``after`` set to the last key of this one.  Each page is a snapshot at its
own revision: to follow a prefix, take ``changes(prefix, since)`` from the
first page's revision after the last page.

``prev_revision`` makes a write a compare-and-set on the key's mod_revision
(0: only if the key is absent).  ``changes`` returns events with a revision
greater than ``since``; when those are older than the history window it
fails with ``compacted``, and the client takes ``list(prefix)`` and goes on
from its revision.

``subscribe`` makes (or renews the lease of) a UDP subscription to
``prefix`` for the caller's own address: the host is always the TCP peer of
the call, the UDP port is the caller's choice.  The notifications and the
struct's fields are those of the UDP wire format (kvconfig.notifier): the
subscription's name, its last sequence number and event revision, the
store's revision, the lease and the heartbeat interval in seconds.  Renew
well within the lease.  ``applied`` reports the revision the subscriber has
applied (the agent's file holds), which the server shows with its lag.  A
server built without a notifier answers both calls with ``unavailable``.

Every error is a Fault whose faultCode is the code of a kvconfig.errors type
and whose faultString starts with that type's name, as in
``Fault(6, "compare_failed: ...")``.  A request body larger than
``--max-body-bytes`` is discarded unread and answered with Fault 10.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from itertools import islice
from typing import Any
from xml.parsers import expat
from xml.parsers.expat import ExpatError
from xmlrpc.client import Fault, Marshaller, Unmarshaller

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from kvconfig import errors
from kvconfig.httpchannel import XMLRPCChannelFactory
from kvconfig.limits import Limits
from kvconfig.model import Event, KeyValue
from kvconfig.session import Client, Session, Sessions, run
from kvconfig.store import Store
from kvconfig.subscriptions import Subscriptions
from kvconfig.values import NOT_XML

with warnings.catch_warnings():
    # Importing twisted.web.xmlrpc defines its HTTP/1.0 client, Proxy, on
    # twisted.web.http's deprecated HTTPClient.  kvconfig uses only the
    # server side, the XMLRPC resource (the agent pulls with treq).
    warnings.filterwarnings("ignore", "twisted.web.http.HTTPClient was deprecated",
                            DeprecationWarning)
    from twisted.web.xmlrpc import XMLRPC

RPC_PATHS = (b"/RPC2", b"/")
#: Methods that change the store; everything else only reads.
WRITE_METHODS = frozenset({"save", "delete", "put", "remove"})

# The common call, as the stdlib client (and most others) writes it: string,
# int and nil params only, no entities, no carriage returns.  Such a body is
# read with two regular expressions; anything else goes to the full parser,
# which also produces every error.
# XML's whitespace is these four only (\s would take \f and \v too, which
# the full parser refuses).
_SIMPLE_CALL = re.compile(
    rb"(?:<\?xml version=['\"]1\.0['\"]\?>)?[ \t\r\n]*<methodCall>[ \t\r\n]*"
    rb"<methodName>([A-Za-z0-9_.]{1,100})</methodName>[ \t\r\n]*<params>[ \t\r\n]*"
    rb"((?:<param>[ \t\r\n]*<value>(?:<string>[^<&\r]*</string>"
    rb"|<(?:int|i4)>-?[0-9]{1,10}</(?:int|i4)>|<nil/>)</value>[ \t\r\n]*</param>[ \t\r\n]*)*)"
    rb"</params>[ \t\r\n]*</methodCall>[ \t\r\n]*\Z"
)
_SIMPLE_PARAM = re.compile(
    rb"<value>(?:<string>([^<&\r]*)</string>|<(?:int|i4)>(-?[0-9]+)</(?:int|i4)>|(<nil/>))"
)
_DECLARED_ENCODING = re.compile(rb"""^<\?xml[^>]*encoding=["']([A-Za-z0-9._-]+)["']""")


def _escape(text: str) -> str:
    # The stdlib leaves "\r" bare, and every XML parser reads a bare "\r" as
    # "\n": a value holding one would not read back equal.
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


class _Marshaller(Marshaller):
    """The stdlib Marshaller, escaping carriage returns in strings and names."""

    dispatch = dict(Marshaller.dispatch)

    def dump_unicode(self, value, write, escape=_escape):
        Marshaller.dump_unicode(self, value, write, escape)

    def dump_struct(self, value, write, escape=_escape):
        Marshaller.dump_struct(self, value, write, escape)

    def dump_long(self, value, write):
        # Values are 32-bit, but revisions and counters outgrow <int>; the
        # common <i8> extension carries them (the stdlib client reads it).
        if -(2**31) <= value < 2**31:
            write(f"<value><int>{value}</int></value>\n")
        else:
            write(f"<value><i8>{value}</i8></value>\n")

    def dump_sliced(self, value, write):
        # Marked, to be marshalled a slice at a time (marshal_in_slices).
        self.sliced.append(value)
        write(_SLICE_MARK)

    dispatch[str] = dump_unicode
    dispatch[dict] = dump_struct
    dispatch[int] = dump_long


class Sliced:
    """An array in a result, made and marshalled SLICE_ITEMS items at a time,
    a reactor turn each: a page of a listing is thousands of structs, and
    formatting it in one piece would hold every other client for tens of
    milliseconds."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = iter(items)


_Marshaller.dispatch[Sliced] = _Marshaller.dump_sliced
#: Where a Sliced array goes in the marshalled text: no value can hold it
#: (a NUL is not XML).
_SLICE_MARK = "\x00"
SLICE_ITEMS = 500
_ARRAY_OPEN, _ARRAY_CLOSE = "<value><array><data>\n", "</data></array></value>\n"


def _response(data: str) -> bytes:
    return f"<?xml version='1.0'?>\n<methodResponse>\n{data}</methodResponse>\n".encode()


def dumps_response(result: tuple | Fault) -> bytes:
    """A methodResponse body, as xmlrpc.client.dumps(methodresponse=True) makes
    (its Sliced arrays marshalled at once)."""
    marshaller = _Marshaller("utf-8", allow_none=True)
    marshaller.sliced = []
    data = marshaller.dumps(result)
    if marshaller.sliced:
        parts = data.split(_SLICE_MARK)
        data = parts[0] + "".join(
            _ARRAY_OPEN + _array(marshaller, sliced.items) + _ARRAY_CLOSE + part
            for sliced, part in zip(marshaller.sliced, parts[1:], strict=True))
    return _response(data)


def _array(marshaller: _Marshaller, items: Iterable[Any]) -> str:
    """The elements of an array, marshalled, without the array's own tags."""
    out: list[str] = []
    marshaller.dump_array(list(items), out.append)
    return "".join(out)[len(_ARRAY_OPEN):-len(_ARRAY_CLOSE)]


def marshal_in_slices(result: tuple, clock: IReactorTime) -> Deferred | bytes:
    """The methodResponse body for *result*, its Sliced arrays made and
    marshalled SLICE_ITEMS items a turn; at once (bytes) if it has none."""
    marshaller = _Marshaller("utf-8", allow_none=True)
    marshaller.sliced = []
    data = marshaller.dumps(result)
    if not marshaller.sliced:
        return _response(data)
    parts = data.split(_SLICE_MARK)
    out = [parts[0], _ARRAY_OPEN]
    pending = list(zip(marshaller.sliced, parts[1:], strict=True))
    done: Deferred = Deferred()

    def step() -> None:
        try:
            sliced, after = pending[0]
            chunk = list(islice(sliced.items, SLICE_ITEMS))
            if chunk:
                out.append(_array(marshaller, chunk))
            if len(chunk) < SLICE_ITEMS:  # this array is done
                out.append(_ARRAY_CLOSE)
                out.append(after)
                pending.pop(0)
                if not pending:
                    done.callback(_response("".join(out)))
                    return
                out.append(_ARRAY_OPEN)
        except Exception:
            done.errback()
            return
        clock.callLater(0, step)

    step()
    return done


def _parse_simple_call(body: bytes) -> tuple[str, tuple] | None:
    """(method, params) of a call in the common simple form, or None when
    the full parser must decide (it gives the same result, or the error)."""
    call = _SIMPLE_CALL.match(body)
    if call is None or b"]]>" in call.group(2):  # "]]>" is not allowed in text
        return None
    params = []
    for text, number, nil in _SIMPLE_PARAM.findall(call.group(2)):
        if nil:
            params.append(None)
        elif number:
            params.append(int(number))
        else:
            try:
                string = text.decode("utf-8")
            except UnicodeDecodeError:
                return None
            if NOT_XML.search(string):
                return None
            params.append(string)
    return call.group(1).decode("ascii"), tuple(params)


class _Unmarshaller(Unmarshaller):
    """The stdlib's unmarshaller, strict where it is lenient: base64 must be
    base64, and a dateTime must be in XML-RPC's format, with errors that say so."""

    dispatch = dict(Unmarshaller.dispatch)

    def end_base64(self, data: str) -> None:
        try:
            value = base64.b64decode(_XML_SPACE.sub("", data), validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII text
            raise errors.InvalidRequest(f"<base64> holds something that is not base64: "
                                        f"{errors.brief(data)}") from None
        self.append(value)
        self._value = 0

    def end_dateTime(self, data: str) -> None:
        try:
            value = datetime.strptime(data, "%Y%m%dT%H:%M:%S")
        except ValueError:
            raise errors.InvalidRequest(
                f"<dateTime.iso8601> {errors.brief(data)} is not in XML-RPC's format "
                "YYYYMMDDTHH:MM:SS, as in 20240102T03:04:05 (no dashes, no time zone, "
                "no fraction of a second)") from None
        self.append(value)

    dispatch["base64"] = end_base64
    dispatch["dateTime.iso8601"] = end_dateTime


_XML_SPACE = re.compile("[ \t\r\n]+")


def _no_dtd(*_: Any) -> None:
    # XML-RPC has no use for a DTD; refusing it at once refuses entity
    # expansion (a few KB that expand to gigabytes) and external entities.
    raise errors.MalformedRequest("a DOCTYPE or entity declaration is not allowed in XML-RPC")


def parse_call(body: bytes) -> tuple[str, tuple]:
    """(method name, params) of an XML-RPC methodCall body, by the full
    parser (expat and the stdlib's unmarshaller, made strict)."""
    unmarshaller = _Unmarshaller(use_builtin_types=True)
    parser = expat.ParserCreate(None, None)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _no_dtd
    parser.EntityDeclHandler = _no_dtd
    parser.StartElementHandler = unmarshaller.start
    parser.EndElementHandler = unmarshaller.end
    parser.CharacterDataHandler = unmarshaller.data
    unmarshaller.xml(None, None)
    try:
        parser.Parse(body, True)
        params = unmarshaller.close()
    except ExpatError as e:
        raise _not_xml(body, e) from None
    except errors.KVConfigError:
        raise
    except Exception as e:  # the unmarshaller's ValueError, TypeError, ResponseError ...
        raise errors.InvalidRequest(f"request is not a valid XML-RPC call: {e}") from None
    method = unmarshaller.getmethodname()
    if method is None:
        raise errors.InvalidRequest("request is not an XML-RPC methodCall")
    return method, params


def _not_xml(body: bytes, error: ExpatError) -> errors.KVConfigError:
    """The error for a body expat refused: bad_encoding when its bytes are
    not in the encoding it declares (UTF-8 if none), else malformed_request."""
    declared = _DECLARED_ENCODING.search(body[:200])
    encoding = declared.group(1).decode("ascii") if declared else "utf-8"
    try:
        body.decode(encoding)
    except LookupError:
        return errors.BadEncoding(f"the request declares encoding {encoding!r}, "
                                  "which kvconfig does not know; send UTF-8")
    except UnicodeDecodeError as e:
        return errors.BadEncoding(f"the request is not valid {encoding} (byte "
                                  f"{e.object[e.start]:#04x} at {e.start}); send UTF-8")
    return errors.MalformedRequest(f"request is not well-formed XML: {error}")


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


def batch(method):
    """Mark a method that orders the calls it holds itself, through the
    session (system.multicall), rather than being one request in it."""
    method.batch = True
    return method


#: The type names of the XML-RPC specification, the only ones a signature
#: may hold (xmlrpc-c's xml-rpc-api2cpp refuses any other).
SPEC_TYPES = frozenset({"int", "i4", "boolean", "string", "double", "dateTime.iso8601",
                        "base64", "struct", "array"})
#: What system.methodSignature answers for a method whose types the spec's
#: names cannot state (any value, or nil): the introspection convention's
#: non-array answer, as xmlrpc-c's servers give it (its tools expect this
#: word; the stdlib server says "signatures not supported").
NO_SIGNATURE = "undef"


def signature(*signatures: list[str]):
    """Attach XML-RPC type signatures for system.methodSignature; with none,
    the method's types cannot be said in the spec's names."""
    for types in signatures:
        unknown = set(types) - SPEC_TYPES
        if unknown:
            raise ValueError(f"not XML-RPC type names: {sorted(unknown)}")

    def attach(method):
        method.signature = [list(s) for s in signatures] or NO_SIGNATURE
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
            raise errors.NoSuchMethod(f"no method {errors.brief(procedurePath)}") from None

    def listProcedures(self) -> list[str]:
        return sorted(super().listProcedures())


class KVConfigXMLRPC(_Dispatcher):
    """The XML-RPC resource: translates calls to the client's Session,
    errors to Faults."""

    log = Logger()

    def __init__(self, store: Store, limits: Limits | None = None,
                 subscriptions: Subscriptions | None = None,
                 sessions: Sessions | None = None, clock: IReactorTime | None = None) -> None:
        super().__init__(allowNone=True, useDateTime=True)
        self.store = store
        #: With a clock, long arrays in results are marshalled a slice a
        #: turn (Sliced); without one (a test), at once.
        self.clock = clock
        self.limits = limits or store.limits
        self.subscriptions = subscriptions
        #: Calls by method and errors by name, counted in the interface's
        #: Sessions when there is one (kvconfig.metrics reads them).
        self.requests: Counter[str] = Counter() if sessions is None else sessions.requests
        self.errors: Counter[str] = Counter() if sessions is None else sessions.errors
        self.putSubHandler("system", SystemHandler(self))
        self._arity: dict[Any, tuple[int, int]] = {}

    # Request handling

    paths = RPC_PATHS

    def respond(self, body: bytes | errors.KVConfigError,
                session: Session) -> bytes | Deferred:
        """The XML response to an XML-RPC request body (or to the error that
        refused it unread: too large, no room) from the client of *session*.
        Reads answer at once; writes with a Deferred that fires once they
        are durable."""
        if isinstance(body, errors.KVConfigError):
            return self.marshal(body)
        try:
            method, args = self.parse(body)
            procedure = self.procedure(method, args)
        except errors.KVConfigError as e:
            return self.marshal(e)
        self.requests[method] += 1
        if getattr(procedure, "batch", False):
            outcome = run(lambda: procedure(session, *args))
        else:
            outcome = session.submit(lambda: procedure(session, *args), _is_write(method),
                                     len(body))
        if isinstance(outcome, Deferred):
            return outcome.addCallback(self.marshal)
        return self.marshal(outcome)

    def render_POST(self, request: server.Request):
        """Serve the same calls when mounted in a twisted.web Site (whose own
        limits then apply to the body as it arrives): a session per request."""
        body = request.content.read()
        address = request.getClientAddress()
        session = Session(self.store, Client("xmlrpc", getattr(address, "host", None),
                                             getattr(address, "port", None)),
                          self.limits, self.subscriptions)
        if len(body) > self.limits.max_body_bytes:
            body = errors.RequestTooLarge(
                f"request body is larger than {self.limits.max_body_bytes} bytes")
        response = self.respond(body, session)
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        if not isinstance(response, Deferred):
            return response
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def write(response: bytes) -> None:
            if not gone:
                request.write(response)
                request.finish()

        response.addCallback(write)
        return server.NOT_DONE_YET

    @staticmethod
    def parse(body: bytes) -> tuple[str, tuple]:
        """Return (method name, params) of an XML-RPC methodCall body."""
        return _parse_simple_call(body) or parse_call(body)

    def procedure(self, method_name: Any, args: tuple):
        """The method *method_name*, checked to take *args*; raises a
        KVConfigError for anything the client did wrong.  Every method takes
        the client's Session before its XML-RPC params."""
        function = self.lookupProcedure(method_name)
        arity = self._arity.get(function)
        if arity is None:
            parameters = list(inspect.signature(function).parameters.values())[1:]
            arity = self._arity[function] = (
                sum(p.default is inspect.Parameter.empty for p in parameters),
                len(parameters),
            )
        least, most = arity
        if not least <= len(args) <= most:
            expected = str(least) if least == most else f"{least} to {most}"
            noun = "argument" if expected == "1" else "arguments"
            raise errors.WrongArguments(
                f"{function.__name__[7:]} takes {expected} {noun}, not {len(args)}"
            )
        return function

    def marshal(self, outcome: Any) -> bytes | Deferred:
        """The methodResponse body for an outcome (a result, or an error), or
        a Deferred of it while a long listing is marshalled in slices."""
        if isinstance(outcome, errors.KVConfigError):
            self.errors[outcome.name] += 1
            result = fault_for(outcome)
        else:
            result = (outcome,)
        try:
            if self.clock is None:
                return dumps_response(result)
            body = marshal_in_slices(result, self.clock)
        except Exception:
            return self._unmarshallable(Failure())
        if isinstance(body, Deferred):
            return body.addErrback(self._unmarshallable)
        return body

    def _unmarshallable(self, failure: Failure) -> bytes:
        self.log.failure("cannot marshal a response", failure)
        return dumps_response(fault_for(errors.InternalError("cannot marshal the response")))

    # The classic calls

    @signature()  # nil, any
    def xmlrpc_save(self, session, key, value):
        """save(key, value): store value under key; returns nil once it is durable."""
        return session.save(key, value)

    @signature()  # any or nil
    def xmlrpc_load(self, session, key):
        """load(key): the value stored under key, or nil if there is none."""
        return session.load(key)

    @signature()  # nil
    def xmlrpc_delete(self, session, key):
        """delete(key): remove key; no error if it does not exist. Returns nil
        once the delete is durable."""
        return session.delete(key).addCallback(lambda _: None)

    # Richer calls

    @signature()  # a struct, or nil
    def xmlrpc_get(self, session, key):
        """get(key): {key, value, version, create_revision, mod_revision,
        [expires_at]} for key, or nil if there is none."""
        kv = session.get(key)
        return None if kv is None else _say_stale(session, kv_struct(kv))

    @signature()  # any value
    def xmlrpc_put(self, session, key, value, options=None):
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

        return session.put(key, value, opts.get("prev_revision"), opts.get("ttl")) \
            .addCallback(done)

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_remove(self, session, key, options=None):
        """remove(key[, {prev_revision}]): delete key; returns {deleted, revision}.

        deleted is false if the key did not exist; revision is that of the
        delete, or the current revision if nothing was deleted.
        prev_revision: delete only if the key's mod_revision equals it."""
        opts = _options(options, ("prev_revision",)) if options is not None else {}
        store = self.store
        return session.delete(key, opts.get("prev_revision")).addCallback(
            lambda revision: {"deleted": revision is not None,
                              "revision": store.revision if revision is None else revision}
        )

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_keys(self, session, prefix, options=None):
        """keys(prefix[, {limit, after}]): {revision, keys, more} with the keys
        starting with prefix ("" for all), in order: one page, of at most
        limit keys (and --max-list-items).  more: true if keys follow; ask
        for them with after set to the last key of this page."""
        opts = _options(options, ("limit", "after")) if options is not None else {}
        revision, kvs, more = session.range(prefix, opts.get("limit"), opts.get("after"))
        return _say_stale(session, {"revision": revision,
                                    "keys": Sliced(kv.key for kv in kvs), "more": more})

    @signature(["struct", "string"], ["struct", "string", "struct"])
    def xmlrpc_list(self, session, prefix, options=None):
        """list(prefix[, {limit, after}]): {revision, items, more}, a snapshot
        of the keys starting with prefix, each as get() returns it: one page
        (at most limit keys, --max-list-items, and --max-reply-bytes of
        values).  more: true if keys follow; ask for them with after set to
        the last key of this page.  Continue from the first page's revision
        with changes()."""
        opts = _options(options, ("limit", "after")) if options is not None else {}
        revision, kvs, more = session.range(prefix, opts.get("limit"), opts.get("after"))
        return _say_stale(session, {"revision": revision,
                                    "items": Sliced(map(kv_struct, kvs)), "more": more})

    @signature(["struct", "string", "int"])
    def xmlrpc_changes(self, session, prefix, since):
        """changes(prefix, since): {revision, events} with every change after
        revision since to keys starting with prefix, oldest first.  Fault 7
        compacted if those are no longer in history: take list(prefix) then."""
        revision, events = session.changes(prefix, since)
        return _say_stale(session, {"revision": revision,
                                    "events": Sliced(map(event_struct, events))})

    @signature(["struct", "string", "int"], ["struct", "string", "int", "struct"])
    def xmlrpc_subscribe(self, session, prefix, udp_port, options=None):
        """subscribe(prefix, udp_port): notify the caller's host at udp_port, by
        UDP datagrams, of every change to keys starting with prefix ("" for
        all); calling again renews the lease.  Returns {sub, prefix, seq, rev,
        head, lease, heartbeat}: the subscription's name (a new one means
        sequence numbers start again), the last sequence number sent and the
        revision of the last event, the store's revision, the lease and the
        heartbeat interval in seconds.  Renew within the lease (every lease/3,
        say).  The host is always the address this call came from.
        options: {applied}, the revision the subscriber has applied (its
        lag is shown in stats and /metrics)."""
        opts = _options(options, ("applied",)) if options is not None else {}
        return session.subscribe(udp_port, prefix, opts.get("applied"))

    @signature(["struct", "string", "int"])
    def xmlrpc_unsubscribe(self, session, prefix, udp_port):
        """unsubscribe(prefix, udp_port): end the caller's subscription to
        prefix at udp_port.  Returns {unsubscribed}: false if there was none."""
        return {"unsubscribed": session.unsubscribe(udp_port, prefix)}

    @signature(["struct"])
    def xmlrpc_stats(self, session):
        """stats(): the server's counters (keys, revision, reads, puts, ...)."""
        return session.stats()


def _say_stale(session: Session, struct: dict) -> dict:
    """Mark a read answered while the store may lag etcd (cluster mode)."""
    if session.stale:
        struct["stale"] = True
    return struct


class SystemHandler(_Dispatcher):
    """system.*: introspection as the stdlib server has it, and multicall."""

    def __init__(self, parent: KVConfigXMLRPC) -> None:
        super().__init__()
        self.parent = parent

    @signature(["array"])
    def xmlrpc_listMethods(self, session):
        """system.listMethods(): the names of every method this server has."""
        names = self.parent.listProcedures()
        names += [f"system.{name}" for name in self.listProcedures()]
        return sorted(names)

    @signature(["string", "string"])
    def xmlrpc_methodHelp(self, session, method_name):
        """system.methodHelp(name): the documentation of a method."""
        return inspect.getdoc(self.parent.lookupProcedure(method_name)) or ""

    @signature(["array", "string"])
    def xmlrpc_methodSignature(self, session, method_name):
        """system.methodSignature(name): the method's signatures, each a list
        [return type, argument types...] of XML-RPC type names; the string
        "undef" for a method whose types those names cannot state (a value
        of any type, or nil)."""
        return self.parent.lookupProcedure(method_name).signature

    @signature(["array", "array"])
    @batch
    def xmlrpc_multicall(self, session, calls):
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
        # Each call sees the calls before it, as if run one by one: the
        # session orders them (kvconfig.session).
        outcomes = [
            session.submit(lambda call=call: self._one(session, call),
                           type(call) is dict and _is_write(call.get("methodName")))
            for call in calls
        ]
        if not any(isinstance(outcome, Deferred) for outcome in outcomes):
            return [self._entry(outcome) for outcome in outcomes]
        return gatherResults([outcome if isinstance(outcome, Deferred) else succeed(outcome)
                              for outcome in outcomes]).addCallback(
            lambda outcomes: [self._entry(outcome) for outcome in outcomes])

    def _one(self, session: Session, call: Any) -> Any:
        if type(call) is not dict or "methodName" not in call:
            raise errors.InvalidRequest("each call must be a struct with methodName")
        name, params = call["methodName"], call.get("params", [])
        if name == "system.multicall":
            raise errors.InvalidRequest("system.multicall cannot be nested")
        if type(params) is not list:
            raise errors.WrongArguments("params must be an array")
        procedure = self.parent.procedure(name, tuple(params))
        self.parent.requests[name] += 1
        return procedure(session, *params)

    def _entry(self, outcome: Any) -> Any:
        """A multicall result: [result], or the fault as a struct."""
        if isinstance(outcome, errors.KVConfigError):
            self.parent.errors[outcome.name] += 1
            fault = fault_for(outcome)
            return {"faultCode": fault.faultCode, "faultString": fault.faultString}
        return [outcome]


def _is_write(method_name: Any) -> bool:
    return type(method_name) is str and method_name in WRITE_METHODS


def make_factory(store: Store, limits: Limits, clock,
                 subscriptions: Subscriptions | None = None) -> XMLRPCChannelFactory:
    """The protocol factory the XML-RPC endpoint listens with."""
    sessions = Sessions(store, "xmlrpc", limits, subscriptions)
    return XMLRPCChannelFactory(KVConfigXMLRPC(store, limits, subscriptions, sessions, clock),
                                limits,
                                clock, sessions)
