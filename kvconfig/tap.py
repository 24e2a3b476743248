"""
``twistd kvconfig``: options and wiring, nothing else.

Every part is built here from the options and handed its dependencies (the
reactor, the store, the limits), so that each can be tested alone.
"""

from __future__ import annotations

import re

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from kvconfig import __version__
from kvconfig.backends import backend_from_string, parse_store
from kvconfig.backends.etcd import check_prefix as check_etcd_prefix
from kvconfig.limits import Limits
from kvconfig.line import LineFactory
from kvconfig.notifier import Notifier, NotifierProtocol
from kvconfig.store import Store
from kvconfig.udpwire import read_secret
from kvconfig.xmlrpc import make_factory

_LIMIT_OPTIONS = [
    ("max-key-bytes", "max_key_bytes", "Longest key, in UTF-8 bytes."),
    ("max-value-bytes", "max_value_bytes", "Longest encoded value, in bytes."),
    ("max-value-depth", "max_value_depth", "Deepest nesting of lists and dicts in a value."),
    ("max-body-bytes", "max_body_bytes", "Largest XML-RPC request body, in bytes."),
    ("max-multicall", "max_multicall", "Most calls in one system.multicall."),
    ("max-connections", "max_connections", "Most simultaneous connections per interface."),
    ("idle-timeout", "idle_timeout", "Seconds before an idle connection is closed."),
    ("max-line-bytes", "max_line_bytes", "Longest line-protocol line, in bytes."),
    ("max-watches", "max_watches", "Most WATCHes per line-protocol connection."),
    ("max-watch-backlog", "max_watch_backlog",
     "Events held for a watcher that is not reading before its watches end."),
    ("max-watch-backlog-bytes", "max_watch_backlog_bytes",
     "Bytes of events held for a watcher that is not reading."),
    ("history-events", "history_events", "Most change events kept for changes()."),
    ("history-bytes", "history_bytes", "Most bytes of values kept in that history."),
    ("max-subscriptions", "max_subscriptions", "Most UDP subscriptions held at once."),
    ("max-subscriptions-per-prefix", "max_subscriptions_per_prefix",
     "Most UDP subscriptions to any one prefix."),
    ("max-datagram-bytes", "max_datagram_bytes",
     "Largest notification datagram; a value that does not fit is pulled."),
    ("max-send-rate", "max_send_rate",
     "Most datagrams a second to one subscriber; past that events are skipped."),
    ("max-cookie-rate", "max_cookie_rate",
     "Most cookie answers a second to unproven UDP addresses, in total."),
    ("lease-seconds", "lease_seconds", "Seconds a UDP subscription lives unless renewed."),
    ("heartbeat-seconds", "heartbeat_seconds", "Seconds between heartbeats to a subscriber."),
    ("max-clock-skew", "max_clock_skew",
     "Seconds a signed datagram's timestamp may be off (the replay window)."),
]
_DEFAULT_LIMITS = Limits()


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
         "With an etcd store: seconds to wait for an answer from etcd.", float],
        ["secret-file", None, None,
         "File holding the shared secret that signs UDP datagrams (not world-readable)."],
    ] + [
        [flag, None, getattr(_DEFAULT_LIMITS, field), help_, int]
        for flag, field, help_ in _LIMIT_OPTIONS
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
                **{field: self[flag] for flag, field, _ in _LIMIT_OPTIONS}
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


class StoreService(service.Service):
    """Opens the store before the interfaces serve, closes it after they stop."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def startService(self) -> None:
        # Not privilegedStartService: under --uid/--gid the store file and
        # its writer process belong to the unprivileged user.  Ports are
        # bound earlier, but nothing is served before the reactor runs, by
        # which time the store is open; one that cannot be opened stops
        # twistd with the error.
        self.store.start()
        super().startService()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.store.stop()


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
    limits: Limits = options["limits"]
    backend = backend_from_string(options["store"], reactor, limits,
                                  etcd_prefix=options["etcd-prefix"],
                                  etcd_timeout=options["etcd-timeout"])
    store = Store(backend, limits)

    top = service.MultiService()
    store_service = StoreService(store)
    store_service.setName("store")
    store_service.setServiceParent(top)

    notifier = Notifier(store, limits, reactor, options["secret"])
    store.add_stats("udp", notifier.stats)
    notifier_service = NotifierService(notifier)
    notifier_service.setName("notifier")
    notifier_service.setServiceParent(top)
    # Bound in privilegedStartService, so a port in use stops twistd.
    udp = UDPServer(options["udp_port"], NotifierProtocol(notifier),
                    interface=options["udp_interface"], reactor=reactor)
    udp.setName("udp")
    udp.setServiceParent(top)

    interfaces = [
        ("xmlrpc", make_factory(store, limits, reactor, notifier)),
        ("line", LineFactory(store, limits, reactor, notifier)),
    ]
    for name, factory in interfaces:
        listener = StreamServerEndpointService(serverFromString(reactor, options[name]),
                                               factory)
        # A port already in use should stop twistd, not be logged and ignored.
        listener._raiseSynchronously = True
        listener.setName(name)
        listener.setServiceParent(top)
    return top
