from __future__ import annotations

import pytest

from serverprocess import KVConfigProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One installed ``twistd kvconfig`` (sqlite store) shared by a session's
    tests; each test uses keys of its own."""
    process = KVConfigProcess(tmp_path_factory.mktemp("server"))
    process.start()
    yield process
    process.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A ``twistd kvconfig`` of the test's own, for tests that restart or kill it."""
    process = KVConfigProcess(tmp_path)
    yield process
    process.stop()
