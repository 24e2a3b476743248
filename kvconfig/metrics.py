"""
The server's Prometheus metrics, for ``GET /metrics`` on the ``--http`` port.

Made with prometheus_client, in a registry of the server's own (never the
global one, so two servers in one process do not mix).  What the server
already counts (kvconfig's stats, the interfaces' Sessions, the notifier,
the subscription registry, the budget) is read at scrape time by a custom
collector, so nothing is counted twice; what only metrics need (commit and
fan-out times, batch sizes, the etcd watch lag) are histograms the backends
and the notifier feed through their observer hooks.

Families (all prefixed ``kvconfig_``)::

    info{version,backend}                  1
    keys, revision, history_events         gauges
    ready, stale                           1 or 0
    requests_total{interface,operation}    requests by interface and operation
    errors_total{interface,error}          errors answered, by name
    connections{interface}                 open connections
    connections_refused_total{interface}   past --max-connections(-per-address)
    watchers{interface}                    connections with a watch
    watchers_dropped_total{interface}      slow watchers whose watches ended
    store_operations_total{operation}      reads, puts, deletes
    store_rejected_total{reason}           compare_failed, invalid (refused writes)
    expired_keys_total                     keys deleted by their TTL
    commits_total, commit_failures_total   batches committed, commits failed
    commit_seconds                         histogram: a batch's flush to its commit
    commit_batch_size                      histogram: writes per committed batch
    fanout_seconds                         histogram: one change's UDP fan-out
    subscriptions                          UDP subscriptions held
    subscription_changes_total{change}     subscribed, renewed, unsubscribed, expired
    subscriptions_max_lag_revisions        the most revisions any subscriber is behind
    subscription_lag_revisions{address,prefix}  each reporting subscriber's lag
    subscription_applied_revision{address,prefix}  the revision it applied
    datagrams_sent_total{kind}             event, heartbeat, cookie, answer
    datagrams_dropped_total{direction,reason}  in: malformed, unsigned, bad_signature,
                                           stale, replayed; out: rate_limited,
                                           send_error, cookie_withheld
    udp_requests_refused_total             UDP requests answered with an error
    buffer_bytes, buffer_limit_bytes       the client data held (--max-buffer-bytes)
    buffer_refusals_total                  refusals of that budget
    writes_in_flight, write_bytes_in_flight
    etcd_state{state}                      cluster mode: 1 for the node's state
    etcd_watch_lag_seconds                 histogram: etcd's answer to a write until
                                           the node's watch brought it
    etcd_watch_restarts_total, etcd_resyncs_total, etcd_outcome_unknown_total,
    etcd_unavailable_rejections_total, etcd_batches_total

plus prometheus_client's ``process_*`` families for the server process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvconfig import __version__
from kvconfig.session import Sessions
from kvconfig.store import Store
from kvconfig.subscriptions import Subscriptions

#: The text exposition format's content type.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Bucket bounds, in seconds: a durable commit takes about a millisecond,
#: a fan-out a few microseconds a subscriber.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)
FANOUT_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                  0.05, 0.1, 0.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

#: The etcd health states (kvconfig.backends.etcd.health), without importing it.
ETCD_STATES = ("loading", "catching_up", "in_step", "unavailable")
#: Interface counters that are drops of slow watchers.
_DROPPED = "watchers_dropped"


class Metrics:
    """The registry of one server, its histograms and the collector that
    reads its counters at scrape time."""

    def __init__(self, store: Store, subscriptions: Subscriptions | None = None,
                 notifier: Any = None, process: bool = True) -> None:
        self.store = store
        self.subscriptions = subscriptions
        self.notifier = notifier
        #: Every interface's Sessions, by interface name.
        self.interfaces: dict[str, Sessions] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.commit_seconds = Histogram(
            "kvconfig_commit_seconds", "Seconds from a batch of writes being sent to its "
            "commit (sqlite: flush to fsync; etcd: txn to answer).",
            buckets=COMMIT_BUCKETS, registry=self.registry)
        self.commit_batch_size = Histogram(
            "kvconfig_commit_batch_size", "Writes in each committed batch.",
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.fanout_seconds = Histogram(
            "kvconfig_fanout_seconds", "Seconds the UDP fan-out of one change took.",
            buckets=FANOUT_BUCKETS, registry=self.registry)
        self.etcd_watch_lag_seconds: Histogram | None = None
        self.registry.register(_ServerCollector(self))
        if process:
            ProcessCollector(registry=self.registry)
        self._observe_backend(store.backend)
        if notifier is not None:
            notifier.fan_out_observer = self.fanout_seconds.observe

    def _observe_backend(self, backend: Any) -> None:
        # The etcd backend's observers are on its write pipeline.
        target = getattr(backend, "writes", backend)
        if hasattr(target, "commit_observer"):
            target.commit_observer = self._committed
        if hasattr(target, "watch_lag_observer"):
            self.etcd_watch_lag_seconds = Histogram(
                "kvconfig_etcd_watch_lag_seconds", "Seconds from etcd's answer to one of "
                "this node's writes until the node's watch brought it.",
                buckets=COMMIT_BUCKETS, registry=self.registry)
            target.watch_lag_observer = self.etcd_watch_lag_seconds.observe

    def _committed(self, seconds: float, writes: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_batch_size.observe(writes)

    def add_interface(self, sessions: Sessions) -> None:
        self.interfaces[sessions.interface] = sessions

    def exposition(self) -> bytes:
        """The text exposition of every family, as Prometheus scrapes it."""
        return generate_latest(self.registry)


def _gauge(name: str, documentation: str, value: float,
           labels: Iterable[str] = (), samples: Iterable[tuple[list[str], float]] = ()
           ) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels) or None)
    if labels:
        for label_values, sample in samples:
            family.add_metric(label_values, sample)
    else:
        family.add_metric([], value)
    return family


def _counter(name: str, documentation: str, samples: Iterable[tuple[list[str], float]],
             labels: Iterable[str] = ()) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for label_values, sample in samples:
        family.add_metric(label_values, sample)
    return family


class _ServerCollector(Collector):
    """Reads the server's own counters at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []   # families vary (cluster mode, interfaces): collected each time

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        store = metrics.store
        backend = store.backend
        stats = store.stats()
        yield _gauge("kvconfig_info", "kvconfig's version and backend.", 1,
                     ("version", "backend"), [([__version__, backend.name], 1)])
        yield _gauge("kvconfig_keys", "Keys in the store.", stats["keys"])
        yield _gauge("kvconfig_revision", "The store's revision.", stats["revision"])
        yield _gauge("kvconfig_history_events", "Change events kept for changes().",
                     stats["history_events"])
        yield _gauge("kvconfig_ready", "1 once the store is loaded and, in cluster mode, "
                     "in step with etcd.", int(backend.ready and not store.stale))
        yield _gauge("kvconfig_stale", "1 while reads may lag etcd (cluster mode).",
                     int(store.stale))
        yield from self._interfaces(metrics.interfaces)
        counters = store.counters
        yield _counter("kvconfig_store_operations_total", "Reads and writes the store took.",
                       [([name], counters[plural]) for name, plural in
                        (("read", "reads"), ("put", "puts"), ("delete", "deletes"))],
                       ("operation",))
        yield _counter("kvconfig_store_rejected_total", "Writes the store refused.",
                       [(["compare_failed"], counters["compare_failures"]),
                        (["invalid"], counters["rejected"])], ("reason",))
        yield _counter("kvconfig_expired_keys_total", "Keys deleted by their TTL.",
                       [([], stats.get("expired", 0))])
        if "commits" in stats:
            yield _counter("kvconfig_commits_total", "Batches of writes committed.",
                           [([], stats["commits"])])
            yield _counter("kvconfig_commit_failures_total", "Commits that failed.",
                           [([], stats["commit_failures"])])
        budget = store.budget
        yield _gauge("kvconfig_buffer_bytes", "Bytes of client data held, all connections "
                     "together (request bodies, partial lines, requests waiting, watch "
                     "backlogs).", budget.held)
        yield _gauge("kvconfig_buffer_limit_bytes", "The most that may be held "
                     "(--max-buffer-bytes).", budget.limit)
        yield _counter("kvconfig_buffer_refusals_total", "Times that budget said no.",
                       [([], budget.refused)])
        yield _gauge("kvconfig_writes_in_flight", "Writes made and not yet answered.",
                     store.writes_in_flight)
        yield _gauge("kvconfig_write_bytes_in_flight", "Bytes of those writes.",
                     store.write_bytes_in_flight)
        if metrics.subscriptions is not None:
            yield from self._subscriptions(metrics.subscriptions)
        if metrics.notifier is not None:
            yield from self._notifier(metrics.notifier)
        if "etcd_state" in stats:
            yield from self._etcd(stats)

    @staticmethod
    def _interfaces(interfaces: dict[str, Sessions]) -> Iterator[Metric]:
        items = sorted(interfaces.items())
        yield _counter("kvconfig_requests_total", "Requests, by interface and operation.",
                       [([name, operation], count) for name, sessions in items
                        for operation, count in sorted(sessions.requests.items())],
                       ("interface", "operation"))
        yield _counter("kvconfig_errors_total", "Errors answered, by interface and name.",
                       [([name, error], count) for name, sessions in items
                        for error, count in sorted(sessions.errors.items())],
                       ("interface", "error"))
        yield _gauge("kvconfig_connections", "Open connections.", 0, ("interface",),
                     [([name], sessions.connections) for name, sessions in items])
        yield _counter("kvconfig_connections_refused_total",
                       "Connections refused past a connection limit.",
                       [([name], sessions.counters["refused"]) for name, sessions in items],
                       ("interface",))
        yield _gauge("kvconfig_watchers", "Connections with a watch.", 0, ("interface",),
                     [([name], sessions.watchers()) for name, sessions in items])
        yield _counter("kvconfig_watchers_dropped_total",
                       "Watchers that did not read, whose watches were ended.",
                       [([name], sessions.counters.get(_DROPPED, 0)) for name, sessions in items],
                       ("interface",))

    @staticmethod
    def _subscriptions(subscriptions: Subscriptions) -> Iterator[Metric]:
        yield _gauge("kvconfig_subscriptions", "UDP subscriptions held.", len(subscriptions))
        counters = subscriptions.counters
        yield _counter("kvconfig_subscription_changes_total",
                       "Subscriptions made, renewed, cancelled and expired.",
                       [([change], counters[name]) for change, name in
                        (("subscribed", "subscribes"), ("renewed", "renewals"),
                         ("unsubscribed", "unsubscribes"), ("expired", "expired"))],
                       ("change",))
        yield _gauge("kvconfig_subscriptions_max_lag_revisions",
                     "The most revisions any subscriber that reports what it applied is "
                     "behind the store.", subscriptions.stats()["max_lag"])
        reporting = [(subscription, subscriptions.lag(subscription))
                     for subscription in subscriptions]
        reporting = [(s, lag) for s, lag in reporting if lag is not None]
        labels = ("address", "prefix")

        def where(subscription: Any) -> list[str]:
            host, port = subscription.address
            return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                    subscription.prefix]

        yield _gauge("kvconfig_subscription_lag_revisions",
                     "Revisions each reporting subscriber is behind the store.", 0, labels,
                     [(where(s), lag) for s, lag in reporting])
        yield _gauge("kvconfig_subscription_applied_revision",
                     "The revision each reporting subscriber has applied.", 0, labels,
                     [(where(s), s.applied) for s, _ in reporting])

    @staticmethod
    def _notifier(notifier: Any) -> Iterator[Metric]:
        counters, dropped = notifier.counters, notifier.sealer.dropped
        yield _counter("kvconfig_datagrams_sent_total", "UDP datagrams sent, by kind.",
                       [(["event"], counters["datagrams_sent"]),
                        (["heartbeat"], counters["heartbeats_sent"]),
                        (["cookie"], counters["cookies_sent"])], ("kind",))
        out = [(["out", "rate_limited"], counters["events_skipped"]
                + counters["heartbeats_skipped"]),
               (["out", "send_error"], counters["send_errors"]),
               (["out", "cookie_withheld"], counters["cookies_withheld"])]
        yield _counter("kvconfig_datagrams_dropped_total",
                       "UDP datagrams dropped: received and refused unread (in), or not "
                       "sent (out), by reason.",
                       [(["in", reason], count) for reason, count in dropped.items()] + out,
                       ("direction", "reason"))
        yield _counter("kvconfig_udp_requests_refused_total",
                       "UDP requests answered with an error.", [([], counters["refused"])])

    @staticmethod
    def _etcd(stats: dict[str, Any]) -> Iterator[Metric]:
        yield _gauge("kvconfig_etcd_state", "1 for the node's state towards etcd.", 0,
                     ("state",), [([state], int(stats["etcd_state"] == state))
                                  for state in ETCD_STATES])
        for name, documentation in (
                ("watch_restarts", "Times the etcd watch was reopened."),
                ("resyncs", "Times the prefix was re-read after compaction."),
                ("outcome_unknown", "Writes sent to etcd whose outcome is unknown."),
                ("unavailable_rejections", "Writes refused while etcd was unavailable."),
                ("batches", "Batches of writes sent to etcd.")):
            yield _counter(f"kvconfig_etcd_{name}_total", documentation,
                           [([], stats[f"etcd_{name}"])])
