"""
``twistd kvconfig``: options and wiring, nothing else.

Every part is built here from the options and handed its dependencies (the
reactor, the store, the limits), so that each can be tested alone.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from kvconfig import __version__
from kvconfig.backends import backend_from_string, check_etcd_prefix, parse_store
from kvconfig.changelog import log_expired
from kvconfig.errors import KVConfigError
from kvconfig.http import make_site
from kvconfig.limits import Limits, limit_options
from kvconfig.line import LineFactory
from kvconfig.metrics import Metrics
from kvconfig.notifier import Notifier, NotifierProtocol
from kvconfig.store import Store
from kvconfig.subscriptions import Subscriptions
from kvconfig.udpwire import read_secret
from kvconfig.xmlrpc import make_factory

_LIMIT_OPTIONS = limit_options()


def number(flag: str, kind: type) -> Callable[[str], Any]:
    """The coerce function of the option --*flag*: its value as *kind*, or a
    ValueError that names the option (twistd prints it)."""
    def coerce(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{flag} must be {what}, not {text!r}") from None

    coerce.coerceDoc = ""  # usage.Options appends it to the option's help
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "kvconfig: a durable, revisioned configuration server. Endpoints use "
        "Twisted's endpoint syntax (tcp:PORT:interface=ADDR, ssl:..., unix:...); "
        "the defaults listen on 127.0.0.1 only."
    )
    optParameters = [
        ["xmlrpc", None, "tcp:15000:interface=127.0.0.1", "XML-RPC endpoint."],
        ["line", None, "tcp:15001:interface=127.0.0.1", "Line protocol (telnet) endpoint."],
        ["udp", None, "udp:15002:interface=127.0.0.1",
         "UDP notification port: udp:PORT[:interface=ADDR]."],
        ["http", None, "tcp:15003:interface=127.0.0.1",
         "HTTP endpoint: /metrics, /healthz, /readyz, the JSON API (/v1/) and the web "
         "console (/ui/); none: no HTTP port."],
        ["store", None, "sqlite:kvconfig.db",
         "Store: sqlite:PATH, memory:, or etcd:URL[,URL...] (cluster mode)."],
        ["etcd-prefix", None, "kvconfig/",
         "With an etcd store: the prefix of kvconfig's keys in etcd."],
        ["etcd-timeout", None, 5.0,
         "With an etcd store: seconds to wait for an answer from etcd.",
         number("etcd-timeout", float)],
        ["secret-file", None, None,
         "File holding the shared secret that signs UDP datagrams (not world-readable)."],
    ] + [
        [flag, None, default, help_, number(flag, int)]
        for flag, _, default, help_ in _LIMIT_OPTIONS
    ]
    optFlags = [
        ["no-change-log", None,
         "Log no line per change (for bulk loads: a log line costs about as much "
         "as the write itself)."],
    ]

    def opt_version(self) -> None:
        """Print the kvconfig version and exit."""
        print(f"kvconfig {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            parse_store(self["store"])
            check_etcd_prefix(self["etcd-prefix"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if not 0 < self["etcd-timeout"] <= 3600:
            raise usage.UsageError("--etcd-timeout must be 0..3600 seconds")
        try:
            self["limits"] = Limits(
                **{field: self[flag] for flag, field, _, _ in _LIMIT_OPTIONS}
            )
        except ValueError as e:
            raise usage.UsageError(str(e).replace("_", "-")) from None
        _check_endpoint(self["xmlrpc"], "--xmlrpc")
        _check_endpoint(self["line"], "--line")
        if self["http"] != "none":
            _check_endpoint(self["http"], "--http")
        self["udp_port"], self["udp_interface"] = parse_udp(self["udp"])
        self["secret"] = None
        if self["secret-file"] is not None:
            try:
                self["secret"] = read_secret(self["secret-file"])
            except ValueError as e:
                raise usage.UsageError(f"--secret-file: {e}") from None


def _check_endpoint(description: str, option: str) -> None:
    # Parsing builds the endpoint without listening (and loads TLS files),
    # so a typo is a usage error rather than a traceback at start-up.
    try:
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise usage.UsageError(f"{option}: bad endpoint {description!r}: {e}") from None


def with_backlog(description: str, backlog: int) -> str:
    """*description* with ``backlog=`` (Twisted's default is 50, so 64
    clients connecting at once see SYN retries of a second) unless it says."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "ssl", "unix") and not re.search(r"(^|:)backlog=", description):
        return f"{description}:backlog={backlog}"
    return description


def parse_udp(description: str) -> tuple[int, str]:
    """(port, interface) of ``udp:PORT[:interface=ADDR]``; no interface
    means every interface, as with Twisted's ``tcp:`` endpoints."""
    kind, _, rest = description.partition(":")
    port_text, colon, parameter = rest.partition(":")
    problem = None
    if kind != "udp":
        problem = "it must start with udp:"
    elif not re.fullmatch("[0-9]{1,5}", port_text) or int(port_text) > 65535:
        problem = f"port must be 0..65535, not {port_text!r}"
    interface = ""
    if problem is None and colon:
        name, equals, interface = parameter.partition("=")
        # Colons in an IPv6 address may be escaped, as in endpoint strings.
        interface = interface.replace("\\:", ":")
        if name != "interface" or not equals:
            problem = f"unknown parameter {parameter!r}"
        elif not (isIPAddress(interface) or isIPv6Address(interface)):
            problem = f"interface must be an IP address, not {interface!r}"
    if problem is not None:
        raise usage.UsageError(
            f"--udp: bad endpoint {description!r}: {problem}; use udp:PORT[:interface=ADDR]")
    return int(port_text), interface


class ServerService(service.MultiService):
    """Every service of the server.  One that cannot start (a port in use, a
    store that cannot be opened) stops twistd with one log line saying which
    option and why, and exit status 1: not a traceback."""

    log = Logger()

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except CannotListenError as e:
                error = e.socketError
                why = getattr(error, "strerror", None) or error
                self._cannot_start(f"--{child.name}: cannot listen on "
                                   f"{e.interface or '*'}:{e.port}: {why}")

    def startService(self) -> None:
        try:
            super().startService()
        except KVConfigError as e:
            self._cannot_start(f"--store {self.getServiceNamed('store').spec}: {e}")

    def _cannot_start(self, why: str) -> None:
        self.log.critical("kvconfig cannot start: {why}", why=why)
        # SystemExit, not an exception twistd would print a traceback for.
        raise SystemExit(1)


class StoreService(service.Service):
    """Opens the store before the interfaces serve, closes it after they
    stop; logs the store, its keys and revision once it is loaded."""

    log = Logger()

    def __init__(self, store: Store, spec: str) -> None:
        self.store = store
        #: The --store string, for errors.
        self.spec = spec

    def startService(self) -> None:
        # Not privilegedStartService: under --uid/--gid the store file and
        # its writer process belong to the unprivileged user.  Ports are
        # bound earlier, but nothing is served before the reactor runs, by
        # which time the store is open; one that cannot be opened stops
        # twistd with the error.
        self.store.start().addCallback(self._loaded).addCallback(_freeze_what_was_loaded)
        super().startService()

    def _loaded(self, result: object) -> object:
        store = self.store
        path = getattr(store.backend, "path", None)
        where = f"sqlite {os.path.abspath(path)}" if path is not None else self.spec
        self.log.info("store {where}: {keys} keys at revision {revision}", where=where,
                      keys=len(store.backend.keyspace), revision=store.revision)
        return result

    def stopService(self) -> Deferred:
        super().stopService()
        return self.store.stop()


#: The collector's young-generation threshold (Python's default is 700).
#: Each request keeps a dozen objects alive until its commit; with the
#: default, many survive into the old generation and a full collection,
#: which stops the reactor for tens of milliseconds, comes every few
#: thousand writes (it was the 30 ms p99 of saves at 64 clients).
GC_YOUNG_THRESHOLD = 50_000


def collect_garbage_for_a_server() -> None:
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


def _freeze_what_was_loaded(result: object) -> object:
    # What start-up made (the keyspace, modules) lives on; frozen, the full
    # collections do not go over it again each time.
    gc.freeze()
    return result


class NotifierService(service.Service):
    """Runs the notifier while the store is open: started after the store
    service, so stopped before it."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    log = Logger()

    def startService(self) -> None:
        super().startService()
        self.notifier.start()
        transport = self.notifier.transport
        if transport is not None:
            address = transport.getHost()
            self.log.info("UDP notifications at udp {address}",
                          address=_host_port(address.host, address.port))

    def stopService(self) -> None:
        super().stopService()
        self.notifier.stop()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: What each interface serves, and how to reach it (a URL where it has one).
_ANNOUNCE = {
    "xmlrpc": ("XML-RPC", "{scheme}://{address}/RPC2"),
    "line": ("line protocol", "telnet {host} {port}"),
    "http": ("HTTP (metrics, health, JSON API, console)", "{scheme}://{address}/ui/"),
}


@implementer(IStreamServerEndpoint)
class AnnouncedEndpoint:
    """An endpoint that logs, once listening, which interface it serves and
    its address: one line per interface at start."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, interface: str, secure: bool) -> None:
        self.endpoint, self.interface, self.secure = endpoint, interface, secure

    def listen(self, factory: Factory) -> Deferred:
        return self.endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        what, form = _ANNOUNCE[self.interface]
        address = port.getHost()
        host = getattr(address, "host", None)
        if host is None:    # a UNIX socket
            where = f"unix:{getattr(address, 'name', address)}"
        else:
            where = form.format(scheme="https" if self.secure else "http",
                                address=_host_port(host, address.port), host=host,
                                port=address.port)
        self.log.info("{what} at {where}", what=what, where=where)
        return port


def makeService(options: Options, reactor=None) -> service.MultiService:
    """The store service, the notifier and one listening service per interface."""
    if reactor is None:
        from twisted.internet import reactor
    collect_garbage_for_a_server()
    limits: Limits = options["limits"]
    backend = backend_from_string(options["store"], reactor, limits,
                                  etcd_prefix=options["etcd-prefix"],
                                  etcd_timeout=options["etcd-timeout"])
    store = Store(backend, limits)
    store.log_changes = not options["no-change-log"]
    if store.log_changes:
        store.feed.subscribe(log_expired)

    top = ServerService()
    store_service = StoreService(store, options["store"])
    store_service.setName("store")
    store_service.setServiceParent(top)

    subscriptions = Subscriptions(limits, reactor, lambda: store.revision)
    notifier = Notifier(store, subscriptions, limits, reactor, options["secret"])
    store.add_stats("subscriptions", subscriptions.stats)
    metrics = Metrics(store, subscriptions, notifier)
    notifier_service = NotifierService(notifier)
    notifier_service.setName("notifier")
    notifier_service.setServiceParent(top)
    # Bound in privilegedStartService, so a port in use stops twistd.
    udp = UDPServer(options["udp_port"], NotifierProtocol(notifier),
                    interface=options["udp_interface"], reactor=reactor)
    udp.setName("udp")
    udp.setServiceParent(top)

    xmlrpc = make_factory(store, limits, reactor, subscriptions)
    line = LineFactory(store, limits, reactor, subscriptions)
    metrics.add_interface(xmlrpc.sessions)
    metrics.add_interface(line.sessions)
    interfaces: list[tuple[str, Factory]] = [("xmlrpc", xmlrpc), ("line", line)]
    if options["http"] != "none":
        interfaces.append(("http", make_site(store, limits, reactor, metrics, subscriptions)))
    for name, factory in interfaces:
        description = options[name]
        endpoint = AnnouncedEndpoint(
            serverFromString(reactor, with_backlog(description, limits.listen_backlog)),
            name, description.startswith("ssl:"))
        listener = StreamServerEndpointService(endpoint, factory)
        # A port already in use should stop twistd, not be logged and ignored.
        listener._raiseSynchronously = True
        listener.setName(name)
        listener.setServiceParent(top)
    return top
