"""A lossy UDP relay between a kvconfig agent and the server, for end-to-end tests.

Run as a script::

    python tests/lossyudp.py --server-port P [--seed N] [--drop 0.2]
        [--duplicate 0.1] [--reorder 0.2] [--max-delay 0.03]
        [--drop-first TYPE=N ...]

It binds 127.0.0.1:0, prints ``listening PORT`` on standard output, and
relays datagrams both ways: from each client to the server through a socket
of that client's own, and the server's answers back to the client from the
port the client sent to (the agent only accepts datagrams from the address it
sends to).  In each direction every datagram is dropped with probability
``--drop``; one that survives is sent a second time with probability
``--duplicate``, and held back for a random time up to ``--max-delay`` with
probability ``--reorder``, so that later ones overtake it.  ``--drop-first
subscribed=3`` also drops the first three datagrams of that type (``"t"``).

Each datagram other than an event that it sends on is reported on standard
output as ``sent DIRECTION TYPE``, so a test can see what the other end
received.  On SIGTERM it prints ``counters`` and its counters as JSON, and
exits.  One thread, one ``selectors`` loop, a heap of datagrams due later.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import selectors
import signal
import socket
import sys
import time

DIRECTIONS = ("to_server", "to_client")


def kind_of(datagram: bytes) -> str:
    """The datagram's type, signed or not; "?" if it is not a kvconfig datagram."""
    try:
        kind = json.loads(datagram.split(b"\n", 1)[0]).get("t")
    except (ValueError, AttributeError):
        return "?"
    return kind if isinstance(kind, str) else "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-port", type=int, required=True)
    parser.add_argument("--server-host", default="127.0.0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop", type=float, default=0.2)
    parser.add_argument("--duplicate", type=float, default=0.1)
    parser.add_argument("--reorder", type=float, default=0.2)
    parser.add_argument("--max-delay", type=float, default=0.03)
    parser.add_argument("--drop-first", action="append", default=[], metavar="TYPE=N")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    server = (args.server_host, args.server_port)
    drop_first = {kind: int(n) for kind, _, n in
                  (item.partition("=") for item in args.drop_first)}
    counters = {direction: dict.fromkeys(
        ("received", "sent", "dropped", "duplicated", "reordered"), 0)
        for direction in DIRECTIONS}

    selector = selectors.DefaultSelector()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", 0))
    front.setblocking(False)
    selector.register(front, selectors.EVENT_READ, None)
    backs: dict[tuple[str, int], socket.socket] = {}     # client -> its socket to the server
    due: list = []      # (when, order, socket, datagram, destination, direction, kind)
    order = 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def relay(sock: socket.socket, datagram: bytes, destination, direction: str) -> None:
        nonlocal order
        count = counters[direction]
        count["received"] += 1
        kind = kind_of(datagram)
        if drop_first.get(kind, 0) > 0:
            drop_first[kind] -= 1
            count["dropped"] += 1
            return
        if rng.random() < args.drop:
            count["dropped"] += 1
            return
        copies = 1
        if rng.random() < args.duplicate:
            count["duplicated"] += 1
            copies = 2
        now = time.monotonic()
        for _ in range(copies):
            delay = 0.0
            if rng.random() < args.reorder:
                count["reordered"] += 1
                delay = rng.uniform(0.001, args.max_delay)
            order += 1
            heapq.heappush(due, (now + delay, order, sock, datagram, destination, direction,
                                 kind))

    def send_due() -> None:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, sock, datagram, destination, direction, kind = heapq.heappop(due)
            try:
                sock.sendto(datagram, destination)
            except OSError:
                counters[direction]["dropped"] += 1
                continue
            counters[direction]["sent"] += 1
            if kind != "event":
                print(f"sent {direction} {kind}", flush=True)

    print(f"listening {front.getsockname()[1]}", flush=True)
    while not stopping:
        timeout = 0.1 if not due else max(0.0, min(0.1, due[0][0] - time.monotonic()))
        for key, _ in selector.select(timeout):
            sock = key.fileobj
            while True:
                try:
                    datagram, source = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break   # an ICMP error from an earlier send
                if key.data is None:            # from a client
                    back = backs.get(source)
                    if back is None:
                        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        back.bind(("127.0.0.1", 0))
                        back.setblocking(False)
                        backs[source] = back
                        selector.register(back, selectors.EVENT_READ, source)
                    relay(back, datagram, server, "to_server")
                elif source == server:          # the server's answer to client key.data
                    relay(front, datagram, key.data, "to_client")
        send_due()
    print("counters " + json.dumps(counters), flush=True)


if __name__ == "__main__":
    sys.exit(main())
