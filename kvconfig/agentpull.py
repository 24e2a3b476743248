"""
Where the kvconfig agent pulls from: the server's XML-RPC ``changes`` and
``list`` calls, answered as the agent's Changes and tagged JSON values.
"""

from __future__ import annotations

from typing import Any
from xmlrpc.client import Binary, Fault

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from kvconfig import errors, values
from kvconfig.agentstate import Change


class XMLRPCSource:
    """Pulls over XML-RPC with twisted.web's non-blocking Proxy."""

    def __init__(self, url: str, clock: IReactorTime, timeout: float = 30) -> None:
        from twisted.web.xmlrpc import Proxy

        self.proxy = Proxy(url.encode(), allowNone=True, useDateTime=True,
                           connectTimeout=timeout, reactor=clock)
        self.clock, self.timeout = clock, timeout

    def _call(self, method: str, *args: Any) -> Deferred:
        return self.proxy.callRemote(method, *args).addTimeout(self.timeout, self.clock)

    def changes(self, prefix: str, since: int) -> Deferred:
        def parse(result: dict) -> tuple[int, list[Change]]:
            return result["revision"], [
                Change(event["type"], event["key"], event["revision"],
                       _tagged(event.get("value")))
                for event in result["events"]]
        return self._call("changes", prefix, since).addCallbacks(parse, _compacted)

    def snapshot(self, prefix: str) -> Deferred:
        def parse(result: dict) -> tuple[int, dict[str, Any]]:
            return result["revision"], {item["key"]: _tagged(item["value"])
                                        for item in result["items"]}
        return self._call("list", prefix).addCallback(parse)


def _compacted(failure: Failure) -> Failure:
    if failure.check(Fault) and failure.value.faultCode == errors.Compacted.code:
        raise errors.Compacted(0, 0)
    return failure


def _tagged(value: Any) -> Any:
    """An XML-RPC value as the tagged JSON the datagrams carry."""
    return values.to_tagged(_builtin(value), max_depth=1 << 16)


def _builtin(value: Any) -> Any:
    if isinstance(value, Binary):
        return value.data
    if type(value) is list:
        return [_builtin(item) for item in value]
    if type(value) is dict:
        return {name: _builtin(item) for name, item in value.items()}
    return value

