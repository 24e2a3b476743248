"""
``twistd kvconfig``: options and wiring, nothing else.

Every part is built here from the options and handed its dependencies (the
reactor, the store, the limits), so that each can be tested alone.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from kvconfig import __version__
from kvconfig.backends import backend_from_string, check_etcd_prefix, parse_store
from kvconfig.errors import KVConfigError
from kvconfig.limits import Limits, limit_options
from kvconfig.line import LineFactory
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
    """Opens the store before the interfaces serve, closes it after they stop."""

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
        self.store.start().addCallback(_freeze_what_was_loaded)
        super().startService()

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

    def startService(self) -> None:
        super().startService()
        self.notifier.start()

    def stopService(self) -> None:
        super().stopService()
        self.notifier.stop()


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

    top = ServerService()
    store_service = StoreService(store, options["store"])
    store_service.setName("store")
    store_service.setServiceParent(top)

    subscriptions = Subscriptions(limits, reactor, lambda: store.revision)
    notifier = Notifier(store, subscriptions, limits, reactor, options["secret"])
    notifier_service = NotifierService(notifier)
    notifier_service.setName("notifier")
    notifier_service.setServiceParent(top)
    # Bound in privilegedStartService, so a port in use stops twistd.
    udp = UDPServer(options["udp_port"], NotifierProtocol(notifier),
                    interface=options["udp_interface"], reactor=reactor)
    udp.setName("udp")
    udp.setServiceParent(top)

    interfaces = [
        ("xmlrpc", make_factory(store, limits, reactor, subscriptions)),
        ("line", LineFactory(store, limits, reactor, subscriptions)),
    ]
    for name, factory in interfaces:
        endpoint = serverFromString(reactor, with_backlog(options[name], limits.listen_backlog))
        listener = StreamServerEndpointService(endpoint, factory)
        # A port already in use should stop twistd, not be logged and ignored.
        listener._raiseSynchronously = True
        listener.setName(name)
        listener.setServiceParent(top)
    return top
