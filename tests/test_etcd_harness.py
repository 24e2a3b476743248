"""The etcd test harness itself: its clusters start, replicate, survive a
killed member and take it back; and a missing etcd skips, or fails in CI."""

from __future__ import annotations

import time

import pytest

import etcdcluster
from etcdcluster import EtcdCluster, b64, unb64

pytest_plugins = ["etcdcluster"]

CATCH_UP_TIMEOUT = 10.0


def wait_for_value(cluster: EtcdCluster, index: int, key: str) -> bytes | None:
    """Poll member ``index``'s own copy of ``key`` until it has one, or give up."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    while True:
        value = cluster.get(key, index, serializable=True)
        if value is not None or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_single_member_put_and_range_through_json_gateway(etcd_single):
    """A value put through /v3/kv/put reads back byte for byte through
    /v3/kv/range, with etcd's metadata as JSON strings, and an absent key
    yields no ``kvs`` at all."""
    key = "harness/single/caf\u00e9"
    value = b"\x00\xffbinary\n"
    put = etcd_single.call(0, "/v3/kv/put", {"key": b64(key), "value": b64(value)})
    revision = put["header"]["revision"]

    reply = etcd_single.call(0, "/v3/kv/range", {"key": b64(key)})
    [kv] = reply["kvs"]
    assert unb64(kv["key"]) == key.encode("utf-8")
    assert unb64(kv["value"]) == value
    assert kv["mod_revision"] == kv["create_revision"] == revision
    assert kv["version"] == "1"

    missing = etcd_single.call(0, "/v3/kv/range", {"key": b64("harness/single/absent")})
    assert "kvs" not in missing
    assert etcd_single.get("harness/single/absent") is None


def test_three_members_replicate(etcd_cluster3):
    """A put through member 1 is read through member 3, from its own copy."""
    etcd_cluster3.put("harness/replicated", "from m1", index=0)
    assert etcd_cluster3.get("harness/replicated", index=2) == b"from m1"
    assert wait_for_value(etcd_cluster3, 2, "harness/replicated") == b"from m1"


def test_killed_follower_catches_up_on_restart(etcd_cluster3):
    """With one follower killed, the other two still take writes; restarted
    on its data directory, the follower has what it had and what it missed."""
    etcd_cluster3.put("harness/before", "1")
    leader = etcd_cluster3.wait_for_leader()
    victim = (leader + 1) % 3
    survivor = (leader + 2) % 3

    etcd_cluster3.kill_member(victim)
    assert not etcd_cluster3.members[victim].running
    etcd_cluster3.put("harness/missed", "2", index=survivor)
    etcd_cluster3.put("harness/missed-too", "3", index=leader)
    assert etcd_cluster3.get("harness/missed", index=leader) == b"2"

    etcd_cluster3.restart_member(victim)
    assert wait_for_value(etcd_cluster3, victim, "harness/missed-too") == b"3"
    assert etcd_cluster3.get("harness/missed", victim, serializable=True) == b"2"
    assert etcd_cluster3.get("harness/before", victim, serializable=True) == b"1"


def test_killed_leader_is_replaced(etcd_cluster3):
    """Killing the leader elects another member, which then takes writes."""
    old_leader = etcd_cluster3.wait_for_leader()
    etcd_cluster3.kill_member(old_leader)
    new_leader = etcd_cluster3.wait_for_leader()
    assert new_leader != old_leader
    etcd_cluster3.put("harness/after-failover", "ok", index=new_leader)
    other = 3 - old_leader - new_leader
    assert etcd_cluster3.get("harness/after-failover", index=other) == b"ok"


def test_missing_etcd_skips_with_reason(monkeypatch):
    """Without an etcd binary the etcd fixtures skip, saying why."""
    monkeypatch.setattr(etcdcluster, "find_etcd", lambda: (None, "no etcd here"))
    monkeypatch.delenv(etcdcluster.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no etcd here"):
        etcdcluster.require_etcd()


def test_missing_etcd_fails_when_required(monkeypatch):
    """With $KVCONFIG_REQUIRE_ETCD set (as .ci/run does), a missing etcd is a
    failure, not a skip."""
    monkeypatch.setattr(etcdcluster, "find_etcd", lambda: (None, "no etcd here"))
    monkeypatch.setenv(etcdcluster.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no etcd here"):
        etcdcluster.require_etcd()


def test_explicit_etcd_path_must_be_executable(monkeypatch, tmp_path):
    """$KVCONFIG_ETCD naming something that cannot run is reported, not
    silently replaced by another etcd."""
    monkeypatch.setenv(etcdcluster.ETCD_ENV, str(tmp_path / "nowhere"))
    binary, why = etcdcluster.find_etcd()
    assert binary is None
    assert etcdcluster.ETCD_ENV in why
