"""The --http port end to end: the installed ``twistd kvconfig`` on free
loopback ports, read with real HTTP clients (the stdlib's http.client and
a raw socket for the event stream): the JSON API and every status it
answers, the server-sent events of /v1/watch, /healthz and /readyz, and
/metrics parsed by prometheus_client's own parser.  /readyz through an
etcd outage is in test_http_cluster.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from xmlrpc.client import Fault, ServerProxy

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_agent_e2e import wait_for

from serverprocess import KVConfigProcess


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(server: KVConfigProcess, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> Answer:
    """One request on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=20)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        return Answer(connection.getresponse())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = KVConfigProcess(tmp_path_factory.mktemp("http"), None,
                              "--max-value-bytes=4096", "--max-line-bytes=8192",
                              "--max-body-bytes=65536", "--history-events=50")
    process.start()
    yield process
    process.stop()


def test_a_key_put_over_http_reads_back_over_xmlrpc_and_http(server):
    """PUT takes a JSON body (tagged JSON for bytes); GET and XML-RPC read
    back the same value and metadata."""
    answer = call(server, "PUT", "/v1/kv/api/db", json.dumps(
        {"host": "10.0.0.5", "ports": [1, 2], "key": {"$bytes": "aGk="}}))
    assert answer.status == 200, answer.body
    put = answer.json
    assert put["key"] == "api/db" and put["version"] == 1 and put["revision"] == \
        put["mod_revision"]
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    assert int(answer.headers["X-Kvconfig-Revision"]) == put["revision"]
    value = ServerProxy(server.url, allow_none=True, use_builtin_types=True).load("api/db")
    assert value == {"host": "10.0.0.5", "ports": [1, 2], "key": b"hi"}
    got = call(server, "GET", "/v1/kv/api/db")
    assert got.status == 200
    assert got.json == {"key": "api/db", "version": 1, "create_revision": put["revision"],
                        "mod_revision": put["revision"],
                        "value": {"host": "10.0.0.5", "ports": [1, 2],
                                  "key": {"$bytes": "aGk="}}}


def test_a_key_saved_over_xmlrpc_reads_over_http(server):
    proxy = server.proxy()
    proxy.save("api/text", "héllo wörld")
    assert call(server, "GET", "/v1/kv/api/text").json["value"] == "héllo wörld"


def test_recurse_lists_a_prefix_in_pages(server):
    proxy = server.proxy()
    for n in range(5):
        proxy.save(f"page/k{n}", n)
    first = call(server, "GET", "/v1/kv/page/?recurse&limit=2").json
    assert [item["key"] for item in first["items"]] == ["page/k0", "page/k1"]
    assert first["more"] is True and first["items"][1]["value"] == 1
    rest = call(server, "GET", "/v1/kv/page/?recurse&limit=10&after=page/k1").json
    assert [item["key"] for item in rest["items"]] == ["page/k2", "page/k3", "page/k4"]
    assert rest["more"] is False
    keys = call(server, "GET", "/v1/kv/page/k?recurse&keys").json
    assert keys["keys"] == [f"page/k{n}" for n in range(5)] and "items" not in keys
    everything = call(server, "GET", "/v1/kv/?recurse").json
    assert {"page/k0", "page/k4"} <= {item["key"] for item in everything["items"]}


def test_cas_and_ttl(server):
    """?cas=0 creates only; ?cas=REV writes only over that mod_revision (409
    otherwise, the value kept); ?ttl= gives an expires_at."""
    created = call(server, "PUT", "/v1/kv/cas/key?cas=0", '"one"')
    assert created.status == 200
    again = call(server, "PUT", "/v1/kv/cas/key?cas=0", '"two"')
    assert again.status == 409
    assert again.json["error"] == "compare_failed" and again.json["code"] == 6
    assert "expected mod_revision 0" in again.json["message"]
    revision = created.json["mod_revision"]
    assert call(server, "PUT", f"/v1/kv/cas/key?cas={revision}", '"three"').status == 200
    stale = call(server, "DELETE", f"/v1/kv/cas/key?cas={revision}")
    assert stale.status == 409
    assert server.proxy().load("cas/key") == "three"
    with_ttl = call(server, "PUT", "/v1/kv/cas/ttl?ttl=60", "1")
    assert with_ttl.status == 200 and with_ttl.json["expires_at"] > time.time()


def test_delete(server):
    server.proxy().save("del/key", 1)
    deleted = call(server, "DELETE", "/v1/kv/del/key")
    assert deleted.status == 200 and deleted.json["deleted"] is True
    assert server.proxy().load("del/key") is None
    again = call(server, "DELETE", "/v1/kv/del/key")
    assert again.status == 200 and again.json["deleted"] is False


@pytest.mark.parametrize("method, path, body, status, error", [
    ("GET", "/v1/kv/no/such/key", None, 404, "not_found"),
    ("GET", "/v1/nothing-here", None, 404, "not_found"),
    ("GET", "/elsewhere", None, 404, "not_found"),
    ("POST", "/v1/kv/some/key", "1", 405, "method_not_allowed"),
    ("PUT", "/v1/kv/a%20b", "1", 400, "invalid_key"),
    ("PUT", "/v1/kv/bad/json", "{not json", 400, "invalid_value"),
    ("PUT", "/v1/kv/bad/json", "NaN", 400, "invalid_value"),
    ("PUT", "/v1/kv/bad/json", "", 400, "invalid_value"),
    ("PUT", "/v1/kv/bad/utf8", b"\"\xff\"", 400, "bad_encoding"),
    ("PUT", "/v1/kv/bad/tag", '{"$what": 1}', 400, "invalid_value"),
    ("PUT", "/v1/kv/bad/cas?cas=soon", "1", 400, "invalid_argument"),
    ("PUT", "/v1/kv/bad/ttl?ttl=-1", "1", 400, "invalid_argument"),
    ("GET", "/v1/kv/x?recurse&limit=0", None, 400, "invalid_argument"),
    ("PUT", "/v1/kv/big/value", json.dumps("x" * 5000), 413, "value_too_large"),
    ("PUT", "/v1/kv/big/body", json.dumps("x" * 70000), 413, "request_too_large"),
    ("GET", "/v1/watch?from=1", None, 410, "compacted"),
])
def test_errors_have_their_status_and_a_json_body(server, method, path, body, status, error):
    """Each error is its HTTP status with {"error", "code", "message"}."""
    if error == "compacted":
        proxy = server.proxy()
        for n in range(60):   # past --history-events=50
            proxy.save("compact/k", n)
    answer = call(server, method, path, body)
    assert answer.status == status, answer.body
    assert set(answer.json) == {"error", "code", "message"}
    assert answer.json["error"] == error and answer.json["message"]
    if status == 405:
        assert answer.headers["Allow"] == "GET, PUT, DELETE"


def test_a_body_past_the_buffer_budget_is_429(tmp_path):
    """A body the server-wide buffer budget cannot hold is limit_exceeded."""
    process = KVConfigProcess(tmp_path, "memory:", "--max-buffer-bytes=4096")
    process.start()
    try:
        answer = call(process, "PUT", "/v1/kv/k", json.dumps("x" * 20000))
        assert answer.status == 429, answer.body
        assert answer.json["error"] == "limit_exceeded"
        assert "--max-buffer-bytes" in answer.json["message"]
        assert call(process, "PUT", "/v1/kv/k", '"small"').status == 200
    finally:
        process.stop()


def test_status_and_subscriptions(server):
    status = call(server, "GET", "/v1/status")
    assert status.status == 200
    assert status.json["backend"] == "sqlite" and "subscriptions_max_lag" in status.json
    subscriptions = call(server, "GET", "/v1/subscriptions").json
    assert subscriptions["revision"] == status.json["revision"]
    assert isinstance(subscriptions["subscriptions"], list)


def test_health_and_readiness(server):
    health = call(server, "GET", "/healthz")
    assert health.status == 200 and health.json["status"] == "serving"
    ready = call(server, "GET", "/readyz")
    assert ready.status == 200
    assert ready.json["ready"] is True and ready.json["backend"] == "sqlite"
    assert ready.json["revision"] == server.proxy().stats()["revision"]


def test_the_console_is_served(server):
    root = call(server, "GET", "/")
    assert root.status in (301, 302) and root.headers["Location"].endswith("/ui/")
    page = call(server, "GET", "/ui/")
    assert page.status == 200 and b"console.js" in page.body
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert call(server, "GET", "/ui/console.js").headers["Content-Type"].startswith(
        "text/javascript")
    assert call(server, "GET", "/ui/nope.js").status == 404


# The event stream


class EventStream:
    """A raw socket reading /v1/watch's server-sent events."""

    def __init__(self, server: KVConfigProcess, query: str, headers: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=20)
        self.sock.sendall(f"GET /v1/watch?{query} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
                          .encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        self.status_line, *header_lines = head.decode().split("\r\n")
        self.headers = dict(line.split(": ", 1) for line in header_lines)
        self.chunked = self.headers.get("Transfer-Encoding") == "chunked"

    def _until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stream closed")
            self.buffer += data
        part, self.buffer = self.buffer.split(end, 1)
        return part

    def _text(self) -> str:
        if not self.chunked:
            return self._until(b"\n\n").decode()
        # Unchunk whatever has arrived into a text buffer of its own.
        while True:
            text = getattr(self, "text", b"")
            if b"\n\n" in text:
                event, self.text = text.split(b"\n\n", 1)
                return event.decode()
            size = int(self._until(b"\r\n"), 16)
            while len(self.buffer) < size + 2:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("the stream closed")
                self.buffer += data
            self.text = text + self.buffer[:size]
            self.buffer = self.buffer[size + 2:]

    def event(self) -> tuple[str, dict, str | None]:
        """The next event: (event type, data, id); comments are skipped."""
        while True:
            fields: dict[str, str] = {}
            for line in self._text().split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "event" in fields:
                return fields["event"], json.loads(fields["data"]), fields.get("id")

    def close(self) -> None:
        self.sock.close()


def test_watch_streams_changes_as_server_sent_events(server):
    """The stream says where it starts, then brings each change as it
    commits, made through any interface, with its revision as id."""
    stream = EventStream(server, "prefix=sse/")
    try:
        assert stream.status_line == "HTTP/1.1 200 OK"
        assert stream.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        kind, start, _ = stream.event()
        assert kind == "watching" and start["prefix"] == "sse/"
        proxy = server.proxy()
        proxy.save("elsewhere/x", 1)
        proxy.save("sse/a", {"b": [1]})
        call(server, "PUT", "/v1/kv/sse/c", '"via http"')
        proxy.delete("sse/a")
        events = [stream.event() for _ in range(3)]
        assert [(kind, data["key"]) for kind, data, _ in events] == \
            [("put", "sse/a"), ("put", "sse/c"), ("delete", "sse/a")]
        assert events[0][1]["value"] == {"b": [1]} and events[1][1]["value"] == "via http"
        assert [int(event_id) for _, _, event_id in events] == \
            [data["revision"] for _, data, _ in events]
        assert events[0][1]["revision"] > start["revision"]
        assert events[2][1]["expired"] is False
    finally:
        stream.close()


def test_watch_from_a_revision_replays_history_and_resumes_at_last_event_id(server):
    proxy = server.proxy()
    first = call(server, "PUT", "/v1/kv/replay/a", "1").json["revision"]
    proxy.save("replay/b", 2)
    stream = EventStream(server, f"prefix=replay/&from={first}")
    try:
        assert stream.event()[0] == "watching"
        assert [stream.event()[1]["key"] for _ in range(2)] == ["replay/a", "replay/b"]
    finally:
        stream.close()
    # A browser reconnecting says the last id it had: the stream resumes there.
    stream = EventStream(server, "prefix=replay/", f"Last-Event-ID: {first + 1}\r\n")
    try:
        assert stream.event()[0] == "watching"
        assert stream.event()[1]["key"] == "replay/b"
    finally:
        stream.close()


def test_a_watcher_that_does_not_read_is_dropped(tmp_path):
    """A client that stops reading its stream gets at most
    --max-watch-backlog events held for it, then is disconnected."""
    process = KVConfigProcess(tmp_path, "memory:", "--max-watch-backlog=20")
    process.start()
    stream = None
    try:
        stream = EventStream(process, "prefix=slow/")
        stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert stream.event()[0] == "watching"
        proxy = process.proxy()
        value = "x" * 3000
        written = 0

        def dropped() -> bool:
            nonlocal written
            for _ in range(20):
                proxy.save(f"slow/{written}", value)
                written += 1
            stats = proxy.stats()
            return stats["http_watchers_dropped"] == 1

        wait_for(dropped, "the slow watcher dropped", timeout=60, logs=process.log)
        metrics = {sample.name: sample.value for family in text_string_to_metric_families(
            call(process, "GET", "/metrics").body.decode()) for sample in family.samples
            if sample.labels.get("interface") == "http"}
        assert metrics["kvconfig_watchers_dropped_total"] == 1
        assert metrics["kvconfig_watchers"] == 0
    finally:
        if stream is not None:
            stream.close()
        process.stop()


# /metrics


def scrape(server: KVConfigProcess) -> dict[str, Any]:
    """The families of /metrics, by name, as prometheus_client parses them."""
    answer = call(server, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in
            text_string_to_metric_families(answer.body.decode())}


def family_of(name: str) -> str:
    """The family a sample belongs to: a counter's drops _total, a
    histogram's _count and _sum."""
    for suffix in ("_total", "_count", "_sum"):
        name = name.removesuffix(suffix)
    return name


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sample *name* with *labels*."""
    family = families[family_of(name)]
    matches = [sample.value for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, family.samples)
    return matches[0]


FAMILIES = {
    "kvconfig_info": "gauge", "kvconfig_keys": "gauge", "kvconfig_revision": "gauge",
    "kvconfig_ready": "gauge", "kvconfig_stale": "gauge",
    "kvconfig_requests": "counter", "kvconfig_errors": "counter",
    "kvconfig_connections": "gauge", "kvconfig_connections_refused": "counter",
    "kvconfig_watchers": "gauge", "kvconfig_watchers_dropped": "counter",
    "kvconfig_store_operations": "counter", "kvconfig_commits": "counter",
    "kvconfig_commit_seconds": "histogram", "kvconfig_commit_batch_size": "histogram",
    "kvconfig_fanout_seconds": "histogram", "kvconfig_subscriptions": "gauge",
    "kvconfig_subscription_changes": "counter",
    "kvconfig_subscriptions_max_lag_revisions": "gauge",
    "kvconfig_datagrams_sent": "counter", "kvconfig_datagrams_dropped": "counter",
    "kvconfig_buffer_bytes": "gauge", "kvconfig_writes_in_flight": "gauge",
    "kvconfig_expired_keys": "counter", "process_cpu_seconds": "counter",
}


def test_metrics_carry_every_family_and_move_with_writes(server):
    """/metrics, parsed by prometheus_client's own parser, holds the
    families kvconfig documents, and its values move when the test writes,
    reads, fails a call and subscribes."""
    before = scrape(server)
    for name, kind in FAMILIES.items():
        assert name in before, name
        assert before[name].type == kind, name
    proxy = server.proxy()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        proxy.subscribe("metrics/", udp.getsockname()[1])
        for n in range(3):
            proxy.save(f"metrics/k{n}", n)
        proxy.load("metrics/k0")
        with pytest.raises(Fault):
            proxy.put("metrics/k0", 1, {"prev_revision": 0})   # it exists
        call(server, "GET", "/v1/kv/metrics/none")
        after = scrape(server)
    finally:
        udp.close()
    moved = [
        ("kvconfig_revision", {}, 3), ("kvconfig_keys", {}, 3),
        ("kvconfig_requests_total", {"interface": "xmlrpc", "operation": "save"}, 3),
        ("kvconfig_requests_total", {"interface": "http", "operation": "get"}, 1),
        ("kvconfig_errors_total", {"interface": "xmlrpc", "error": "compare_failed"}, 1),
        ("kvconfig_errors_total", {"interface": "http", "error": "not_found"}, 1),
        ("kvconfig_store_operations_total", {"operation": "put"}, 3),
        ("kvconfig_commits_total", {}, 3),
        ("kvconfig_commit_seconds_count", {}, 3),
        ("kvconfig_commit_batch_size_sum", {}, 3),
        ("kvconfig_fanout_seconds_count", {}, 3),
        ("kvconfig_datagrams_sent_total", {"kind": "event"}, 3),
        ("kvconfig_subscription_changes_total", {"change": "subscribed"}, 1),
    ]
    for name, labels, least in moved:
        old = value(before, name, **labels) if _has_sample(before, name, labels) else 0
        assert value(after, name, **labels) - old >= least, (name, labels)
    assert value(after, "kvconfig_info", backend="sqlite") == 1
    assert value(after, "kvconfig_connections", interface="http") >= 1
    assert value(after, "kvconfig_revision") == proxy.stats()["revision"]


def _has_sample(families: dict[str, Any], name: str, labels: dict[str, str]) -> bool:
    family = families.get(family_of(name))
    return family is not None and any(
        sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        for sample in family.samples)


def test_http_none_serves_no_http_port(tmp_path):
    process = KVConfigProcess(tmp_path, "memory:", "--http=none")
    process.start()
    try:
        process.proxy().save("k", 1)
        with pytest.raises(ConnectionRefusedError):
            call(process, "GET", "/healthz")
    finally:
        process.stop()


def test_a_tcp_subscribe_reports_its_applied_revision(server):
    """XML-RPC subscribe(prefix, port, {applied}) (the agent's way when UDP
    goes unanswered) keeps the revision, shown in /v1/subscriptions."""
    proxy = server.proxy()
    proxy.save("tcpsub/a", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        proxy.subscribe("tcpsub/", port, {"applied": 1})
        [listed] = [s for s in call(server, "GET", "/v1/subscriptions").json["subscriptions"]
                    if s["prefix"] == "tcpsub/"]
        assert (listed["applied"], listed["owner"], listed["port"]) == (1, "tcp", port)
        assert listed["lag"] == proxy.stats()["revision"] - 1
        with pytest.raises(Fault, match="applied must be a revision"):
            proxy.subscribe("tcpsub/", port, {"applied": -1})
        with pytest.raises(Fault, match="unknown option"):
            proxy.subscribe("tcpsub/", port, {"applied_at": 1})
