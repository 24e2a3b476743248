"""Run the installed ``twistd kvconfig`` as a subprocess on free loopback ports.

The twistd is the one installed beside the running Python (the test venv's),
or the one the environment variable ``KVCONFIG_TWISTD`` names: set it to
another install's twistd to run the end-to-end tests against that code, to
see that a test fails without the change it covers.  That install must take
the options KVConfigProcess gives (--http among them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from xmlrpc.client import ServerProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd_path() -> str:
    """$KVCONFIG_TWISTD if set, else the twistd installed beside the running
    Python (the test venv's)."""
    chosen = os.environ.get("KVCONFIG_TWISTD")
    if chosen:
        return chosen
    candidate = Path(sys.executable).with_name("twistd")
    return str(candidate) if candidate.exists() else shutil.which("twistd")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            children.append(int(entry))
    return children


def is_running(pid: int) -> bool:
    """True if *pid* is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] != "Z"


class KVConfigProcess:
    """One ``twistd -n kvconfig`` process; restartable on the same store."""

    def __init__(self, directory: Path, store: str | None = None, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.directory = directory
        #: Set in the server's environment, beside the test's own.
        self.env = env or {}
        self.store = store or f"sqlite:{directory / 'kvconfig.db'}"
        self.extra = list(extra)
        self.port = free_port()
        self.line_port = free_port()
        # Every server a UDP port of its own: the default (15002) would
        # collide between servers, and with one already running.
        self.udp_port = free_udp_port()
        self.http_port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = directory / "twistd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/RPC2"

    @property
    def http_url(self) -> str:
        """The --http port's root (the JSON API, /metrics, the console)."""
        return f"http://127.0.0.1:{self.http_port}"

    def proxy(self) -> ServerProxy:
        return ServerProxy(self.url, allow_none=True)

    def start(self, timeout: float = 20.0) -> None:
        args = [
            twistd_path(), "-n", "--pidfile=", f"--logfile={self.log_path}",
            "kvconfig", f"--store={self.store}",
            f"--xmlrpc=tcp:{self.port}:interface=127.0.0.1",
            f"--line=tcp:{self.line_port}:interface=127.0.0.1",
            f"--udp=udp:{self.udp_port}:interface=127.0.0.1",
            f"--http=tcp:{self.http_port}:interface=127.0.0.1", *self.extra,
        ]
        self.process = subprocess.Popen(args, cwd=self.directory,
                                        env=dict(os.environ, **self.env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n"
                                   + self.log())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("twistd kvconfig did not start listening:\n" + self.log())

    def writer_pid(self, timeout: float = 20.0) -> int:
        """The pid of the server's sqlite writer process (waiting for one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in child_pids(self.process.pid):
                try:
                    if b"sqlitewriter" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
                except OSError:
                    continue
            time.sleep(0.02)
        raise AssertionError("the server has no sqlite writer process")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
