"""``kvconfig-agent`` options: the nodes it follows."""

from __future__ import annotations

import pytest
from twisted.python import usage

from kvconfig.agenttap import Options


def nodes(*argv: str) -> list[tuple[str, int, str]]:
    options = Options()
    options.parseOptions(list(argv))
    return options["nodes"]


def test_one_server_with_the_default_ports():
    """--server HOST: UDP at --udp-port, XML-RPC at port 15000 of that host."""
    assert nodes("--server", "10.0.0.5") == [("10.0.0.5", 15002, "http://10.0.0.5:15000/RPC2")]
    assert nodes("--server", "h", "--udp-port", "16002", "--xmlrpc", "http://h:1/RPC2") == [
        ("h", 16002, "http://h:1/RPC2")]


def test_several_nodes_each_with_its_own_ports():
    """--server HOST[:UDPPORT],... and one --xmlrpc URL per node, in order."""
    assert nodes("--server", "a:17002,b", "--xmlrpc", "http://a:17000/RPC2,http://b:15000/RPC2") \
        == [("a", 17002, "http://a:17000/RPC2"), ("b", 15002, "http://b:15000/RPC2")]
    assert nodes("--server", "a,b") == [("a", 15002, "http://a:15000/RPC2"),
                                        ("b", 15002, "http://b:15000/RPC2")]


@pytest.mark.parametrize("argv", [
    ["--server", "a,b", "--xmlrpc", "http://a:15000/RPC2"],   # one URL for two nodes
    ["--server", "a:0"],
    ["--server", "a:70000"],
    ["--server", "a,,b"],
])
def test_bad_node_lists_are_usage_errors(argv):
    """A malformed node list is a usage error, not a traceback at start."""
    with pytest.raises(usage.UsageError):
        nodes(*argv)
