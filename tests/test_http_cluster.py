"""The --http port of a cluster node, and what a subscriber applied, end to
end: real etcd (tests/etcdcluster.py), the installed ``twistd kvconfig`` on
it, the installed ``twistd kvconfig-agent``, read with http.client.

- /readyz through an etcd outage: 200 while the node is in step, 503 (and
  /metrics' etcd state, and the JSON API's 503 for a write) while etcd is
  down, 200 again once it is back; /healthz stays 200 throughout.
- The applied-revision lag with a real agent: 0 once it has written its
  file, the revision it holds when its reload fails, and again 0 when a
  reload succeeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from test_agent_e2e import AgentProcess, read_json, wait_for
from test_cluster_e2e import Cluster, cluster  # noqa: F401 (a fixture)
from test_http import call

from serverprocess import KVConfigProcess

pytest_plugins = ["etcdcluster"]


def etcd_state(node: KVConfigProcess) -> dict[str, float]:
    text = call(node, "GET", "/metrics").body.decode()
    return {sample.labels["state"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "kvconfig_etcd_state" for sample in family.samples}


def test_readyz_follows_an_etcd_outage(etcd_single, cluster: Cluster):  # noqa: F811
    node = cluster.node("a", etcd_single.client_urls)
    ready = call(node, "GET", "/readyz")
    assert ready.status == 200, ready.body
    assert ready.json["ready"] is True and ready.json["etcd_state"] == "in_step"
    assert etcd_state(node)["in_step"] == 1
    assert "kvconfig_etcd_watch_lag_seconds" in call(node, "GET", "/metrics").body.decode()
    etcd_single.stop_member(0)
    try:
        answer = cluster.wait(lambda: (a := call(node, "GET", "/readyz")).status == 503 and a,
                              "/readyz to say 503")
        assert answer.json["ready"] is False and answer.json["stale"] is True
        assert answer.json["reason"]
        assert call(node, "GET", "/healthz").status == 200
        assert etcd_state(node)["in_step"] == 0
        write = call(node, "PUT", "/v1/kv/outage/k", "1")
        assert write.status == 503 and write.json["error"] == "unavailable"
        read = call(node, "GET", "/v1/kv/?recurse")
        assert read.status == 200 and read.json["stale"] is True
    finally:
        etcd_single.restart_member(0)
    cluster.wait(lambda: call(node, "GET", "/readyz").status == 200, "/readyz 200 again")
    assert call(node, "PUT", "/v1/kv/outage/k", "1").status == 200


def subscription(node: KVConfigProcess, prefix: str) -> dict | None:
    listed = call(node, "GET", "/v1/subscriptions").json["subscriptions"]
    return next((s for s in listed if s["prefix"] == prefix), None)


def test_applied_revision_and_lag_with_a_real_agent(tmp_path: Path):
    """The agent reports the revision its file holds: lag 0 once it wrote
    it (also after changes outside its prefix, which its heartbeats bring
    in); a failed reload restores the last good file, and the lag shows
    it; the next good reload brings it back to 0.  stats(), /metrics and
    /v1/subscriptions agree."""
    server = KVConfigProcess(tmp_path, None, "--heartbeat-seconds=1", "--lease-seconds=3")
    server.start()
    config = tmp_path / "app.json"
    # The reload fails while the file holds "bad": true.
    command = f"! grep -q '\"lag/bad\": true' {config}"
    agent = AgentProcess(tmp_path, "agent", server, "lag/", f"--output={config}",
                         f"--exec={command}", "--debounce=0.05")
    agent.start()
    logs = lambda: server.log() + agent.log()  # noqa: E731
    try:
        proxy = server.proxy()
        proxy.save("lag/a", 1)
        wait_for(lambda: (read_json(config) or {}).get("lag/a") == 1, "the file", logs=logs)
        proxy.save("outside/x", 1)      # the store moves on, nothing for the agent
        revision = proxy.stats()["revision"]
        wait_for(lambda: (s := subscription(server, "lag/")) and s["applied"] == revision
                 and s["lag"] == 0, f"applied {revision}, lag 0", logs=logs)
        good = revision
        proxy.save("lag/bad", True)     # its reload fails: the good file is put back
        proxy.save("outside/y", 2)
        revision = proxy.stats()["revision"]
        wait_for(lambda: "failed" in agent.log() and "restored" in agent.log(),
                 "the failed reload", logs=logs)
        wait_for(lambda: (s := subscription(server, "lag/")) and s["applied"] == good
                 and s["lag"] == revision - good, f"applied {good}", logs=logs)
        stats = proxy.stats()
        assert stats["subscriptions_max_lag"] == revision - good
        assert stats["subscriptions_reporting"] == 1
        metrics = {(sample.name, sample.labels.get("prefix")): sample.value
                   for family in text_string_to_metric_families(
                       call(server, "GET", "/metrics").body.decode())
                   for sample in family.samples}
        assert metrics[("kvconfig_subscription_lag_revisions", "lag/")] == revision - good
        assert metrics[("kvconfig_subscription_applied_revision", "lag/")] == good
        assert metrics[("kvconfig_subscriptions_max_lag_revisions", None)] == revision - good
        proxy.save("lag/bad", False)    # a good reload
        revision = proxy.stats()["revision"]
        wait_for(lambda: (s := subscription(server, "lag/")) and s["lag"] == 0
                 and s["applied"] == revision, "lag 0 again", logs=logs)
        assert json.loads(config.read_text())["lag/bad"] is False
    finally:
        agent.stop()
        server.stop()
