"""An etcd backend whose watched member hangs with its connection open
(SIGSTOP: a frozen VM, or a crashed host whose connection sends no RST),
while no write is waiting to notice: the node asks that member for its
status, gets no answer, and moves its watch to another member, so changes
made through the others keep reaching it.  Against a real 3-member etcd."""

from __future__ import annotations

import os
import signal

import pytest_twisted
from test_etcd_backend import eventually, new_prefix, record, within
from twisted.internet import reactor

from kvconfig.backends import backend_from_string
from kvconfig.limits import Limits
from kvconfig.store import Store

pytest_plugins = ["etcdcluster"]


@pytest_twisted.ensureDeferred
async def test_a_silent_watch_on_a_hung_member_moves_to_another(etcd_cluster3):
    """The store watches a follower (its first URL); that member is stopped
    (SIGSTOP) while the other two keep quorum, and nothing is written
    through the store.  A change made through another member still reaches
    the store's copy and feed, on a watch now on another member."""
    cluster = etcd_cluster3
    prefix = new_prefix("liveness")
    leader = cluster.wait_for_leader()
    # A follower hangs (a hung leader would stall the cluster's writes for
    # an election): it is the store's first member, and the others follow.
    hung_index = (leader + 1) % 3
    writer_index = (leader + 2) % 3
    urls = [cluster.client_urls[i] for i in (hung_index, writer_index, leader)]
    limits = Limits()
    store = Store(backend_from_string("etcd:" + ",".join(urls), reactor,
                                      limits, etcd_prefix=prefix, etcd_timeout=1.0), limits)
    await within(store.start(), "the store loading its replica")
    await eventually(lambda: not store.stale, "the store in step")
    seen = record(store)
    assert store.backend.replica.watch.endpoint == urls[0]
    hung = cluster.members[hung_index].process
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        cluster.put(prefix + "from-elsewhere", b'"hello"', index=writer_index)
        await eventually(lambda: store.load("from-elsewhere") == "hello",
                         "a change through member 1 to reach the store")
        assert [event.key for event in seen] == ["from-elsewhere"]
        assert store.backend.replica.watch.endpoint != urls[0]
        assert store.backend.counters["etcd_watch_restarts"] >= 1
        await eventually(lambda: not store.stale, "the store in step again")
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        await store.stop()
