"""
The change log: one line per change, at info level, saying who made it.

Each interface's Session logs a change once it is acknowledged (durable):
its revision, key and operation, who made it, from which peer and through
which interface.  "Who" is the client's interface and peer for now (a user
once there are users).  Keys expired by their TTL are logged from the
change feed, as made by the server.  The log namespace is
``kvconfig.changes``, so a log observer can keep or drop these lines alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from kvconfig.model import Event

if TYPE_CHECKING:
    from kvconfig.session import Client

log = Logger(namespace="kvconfig.changes")


def peer_of(client: Client) -> str:
    """The client's peer as text: ``host:port`` (``[host]:port`` for IPv6),
    or ``-`` for a peer without an address."""
    if client.host is None:
        return "-"
    host = f"[{client.host}]" if ":" in client.host else client.host
    return host if client.port is None else f"{host}:{client.port}"


def log_change(client: Client, op: str, key: str, revision: int) -> None:
    """Log one acknowledged change made by *client*."""
    peer = peer_of(client)
    interface = client.interface
    who = f"{interface}:{peer}"
    # Formatted here, once, as a format with no fields (braces doubled): the
    # log system's formatting of fields costs several times as much, on
    # every write.  The fields go along for observers that want them.
    line = f"revision {revision} {op} {key} by {who} from {peer} via {interface}"
    if "{" in line or "}" in line:
        line = line.replace("{", "{{").replace("}", "}}")
    log.info(line, revision=revision, op=op, key=key, who=who, peer=peer,
             interface=interface)


def log_expired(event: Event) -> None:
    """A change feed consumer: log the deletes a key's TTL made."""
    if event.expired:
        log.info("revision {revision} delete {key} by ttl (expired)",
                 revision=event.revision, key=event.key)
