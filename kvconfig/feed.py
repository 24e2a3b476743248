"""
The change feed: the one revision-ordered stream of events every downstream
consumer (UDP notifier, line-protocol WATCH, metrics) subscribes to.

A backend publishes each event once, after it is durable, in revision order.
Consumers are plain callables; one that raises is logged and dropped, so a
bug in one consumer never stops the feed or the writer that published.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from kvconfig.model import Event

Consumer = Callable[[Event], None]


class ChangeFeed:
    """Fan-out of events to consumers, each optionally limited to a key prefix."""

    log = Logger()

    def __init__(self) -> None:
        self._consumers: dict[Consumer, str] = {}
        self.revision = 0
        self.published = 0

    def subscribe(self, consumer: Consumer, prefix: str = "") -> Callable[[], None]:
        """Call *consumer* with every later event whose key starts with *prefix*.

        Returns a function that unsubscribes.
        """
        self._consumers[consumer] = prefix
        return lambda: self._consumers.pop(consumer, None)

    @property
    def consumers(self) -> int:
        return len(self._consumers)

    def publish(self, event: Event) -> None:
        if event.revision < self.revision:
            # Out of order would break every consumer's gap detection; equal
            # revisions are allowed for several keys changed by one transaction.
            raise AssertionError(
                f"event revision {event.revision} before {self.revision}"
            )
        self.revision = event.revision
        self.published += 1
        for consumer, prefix in list(self._consumers.items()):
            if event.key.startswith(prefix):
                try:
                    consumer(event)
                except Exception:
                    self.log.failure("change feed consumer {consumer!r} failed; dropped",
                                     consumer=consumer)
                    self._consumers.pop(consumer, None)
