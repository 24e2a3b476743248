"""
``twistd kvconfig-agent`` and the ``kvconfig-agent`` command: options and
wiring, nothing else (the agent itself is kvconfig.agent and its modules).

``twistd -n kvconfig-agent --server HOST --prefix app/ --output
/etc/app/config.json --exec "systemctl reload app"`` keeps the file in step
with the server's ``app/`` keys.  ``kvconfig-agent --server HOST --prefix
app/`` prints every change as a JSON line instead, for debugging.
"""

from __future__ import annotations

import socket
import sys

from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from kvconfig import __version__, values
from kvconfig.agent import Agent, AgentProtocol, Listener
from kvconfig.agentoutput import (
    ChangeLogger,
    EventPrinter,
    FileOutput,
    output_problem,
    run_command,
)
from kvconfig.agentpull import XMLRPCSource
from kvconfig.errors import KVConfigError
from kvconfig.udpwire import Sealer, read_secret


class Options(usage.Options):
    synopsis = "--server HOST --prefix PREFIX [--output FILE [--exec COMMAND]] [options]"
    longdesc = (
        "kvconfig-agent: keeps a local copy of the keys under a prefix in step with a "
        "kvconfig server, from its UDP notifications, and runs a command when the copy "
        "changes."
    )
    optParameters = [
        ["server", None, "127.0.0.1",
         "The kvconfig server's host name or address; for a cluster, several nodes "
         "as HOST[:UDPPORT],HOST[:UDPPORT]... (followed in turn when one stops answering)."],
        ["udp-port", None, 15002, "The server's UDP notification port.", int],
        ["xmlrpc", None, None,
         "The server's XML-RPC URL, to pull from (default http://SERVER:15000/RPC2); "
         "with several nodes, one URL per node, comma-separated."],
        ["prefix", None, "", "The key prefix to keep (default: every key)."],
        ["output", None, None, "The file to keep the keys in, as one JSON object."],
        ["exec", None, None, "A command (run with /bin/sh) to reload the application "
                             "after the file changed."],
        ["exec-timeout", None, 30.0, "Seconds before the command is killed.", float],
        ["debounce", None, 0.2,
         "Seconds without changes before the file is written.", float],
        ["max-delay", None, 2.0,
         "Most seconds between a change and the file's write, in a long burst.", float],
        ["listen", None, None, "Local address to receive notifications on (default: "
                               "the one that routes to the server)."],
        ["secret-file", None, None, "The file holding the secret shared with the server."],
    ]

    def opt_version(self) -> None:
        """Print the kvconfig version and exit."""
        print(f"kvconfig-agent {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            values.check_prefix(self["prefix"], 1 << 16)
        except KVConfigError as e:
            raise usage.UsageError(f"--prefix: {e}") from None
        for name in ("exec-timeout", "debounce", "max-delay"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be > 0")
        if not 0 < self["udp-port"] < 65536:
            raise usage.UsageError("--udp-port must be 1..65535")
        if self["exec"] and not self["output"]:
            raise usage.UsageError("--exec needs --output")
        if self["output"] and (problem := output_problem(self["output"])):
            # Not a usage error: the options are right, the machine is not
            # ready for them.  One line, and twistd exits 1 before starting.
            raise SystemExit(f"kvconfig-agent: --output {self['output']}: {problem}")
        self["nodes"] = parse_nodes(self["server"], self["udp-port"], self["xmlrpc"])
        self["secret"] = None
        if self["secret-file"]:
            try:
                self["secret"] = read_secret(self["secret-file"])
            except ValueError as e:
                raise usage.UsageError(f"--secret-file: {e}") from None


def parse_nodes(servers: str, udp_port: int,
                xmlrpc: str | None) -> list[tuple[str, int, str]]:
    """(host, UDP port, XML-RPC URL) of each node of ``--server`` and ``--xmlrpc``."""
    nodes = []
    for part in servers.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or ":" in host or not port.isdigit():
            host, port = part.strip(), str(udp_port)  # no port given (or a bare IPv6)
        if not host or not 0 < int(port) < 65536:
            raise usage.UsageError(f"--server: bad node {part!r}; use HOST[:UDPPORT]")
        nodes.append((host, int(port)))
    if xmlrpc is None:
        urls = [f"http://{f'[{host}]' if ':' in host else host}:15000/RPC2"
                for host, _ in nodes]
    else:
        urls = [url.strip() for url in xmlrpc.split(",")]
        if len(urls) != len(nodes):
            raise usage.UsageError(f"--xmlrpc: {len(urls)} URLs for {len(nodes)} nodes")
    return [(host, port, url) for (host, port), url in zip(nodes, urls, strict=True)]


class AgentService(service.Service):
    """Resolves the server, opens the UDP socket, runs the agent."""

    log = Logger()

    def __init__(self, options: Options, listener: Listener, reactor,
                 on_failure=None) -> None:
        self.options, self.listener, self.reactor = options, listener, reactor
        self.on_failure = on_failure
        self.agent: Agent | None = None
        self.port = None
        self.sources: list[XMLRPCSource] = []

    def startService(self) -> None:
        super().startService()
        self._started = self._start()
        self._started.addErrback(self._cannot_start)

    @inlineCallbacks
    def _start(self):
        options, reactor = self.options, self.reactor
        nodes = []
        for host, port, url in options["nodes"]:
            address = yield reactor.resolve(host)
            self.sources.append(XMLRPCSource(url, reactor))
            nodes.append(((address, port), self.sources[-1]))
        (server, source), *alternates = nodes
        self.agent = Agent(options["prefix"], server, source, self.listener,
                           reactor, Sealer(options["secret"], reactor), alternates=alternates)
        interface = options["listen"] or _route_to(server)
        # Datagrams up to the largest --max-datagram-bytes a server allows.
        self.port = reactor.listenUDP(0, AgentProtocol(self.agent), interface=interface,
                                      maxPacketSize=65535)
        self.agent.start()

    def _cannot_start(self, failure) -> None:
        self.log.failure("kvconfig-agent cannot start", failure)
        if self.on_failure is not None:
            self.on_failure(failure)
        else:
            # startService may run before the reactor does.
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred:
        super().stopService()
        if self.agent is not None:
            self.agent.stop()
        stopped = [source.close() for source in self.sources]
        if self.port is not None:
            stopped.append(maybeDeferred(self.port.stopListening))
        return gatherResults(stopped)


def _route_to(server: tuple[str, int]) -> str:
    """The local address the system would send to *server* from.  Connecting
    a UDP socket sends nothing; it only picks the route."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(server)
        return probe.getsockname()[0]
    finally:
        probe.close()


def makeService(options: Options, reactor=None) -> service.Service:
    if reactor is None:
        from twisted.internet import reactor
    if options["output"]:
        listener = FileOutput(
            options["output"], reactor, options["exec"], options["debounce"],
            options["max-delay"],
            run=lambda command: run_command(reactor, command, options["exec-timeout"]))
    else:
        listener = ChangeLogger()
    top = service.MultiService()
    agent_service = AgentService(options, listener, reactor)
    agent_service.setName("agent")
    agent_service.setServiceParent(top)
    return top


class CommandOptions(Options):
    synopsis = "--server HOST --prefix PREFIX [--count N] [options]"
    optParameters = [
        ["count", None, None, "Exit after printing this many changes.", int],
    ]


def main(argv: list[str] | None = None) -> None:
    """``kvconfig-agent``: print changes under a prefix as JSON lines, the
    current keys first; logs go to standard error."""
    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.exit(f"{sys.argv[0]}: {e}\n{options}")
    # Standard output is for the changes: do not turn print() into log events.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)

    def run(reactor) -> Deferred:
        finished: Deferred = Deferred()
        printer = EventPrinter(sys.stdout, options["count"],
                               lambda: finished.called or finished.callback(None))
        agent_service = AgentService(
            options, printer, reactor,
            on_failure=lambda failure: finished.called or finished.errback(failure))
        agent_service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", agent_service.stopService)
        return finished

    task.react(run)
