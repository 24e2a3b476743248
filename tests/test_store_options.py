"""``--store`` and ``--etcd-prefix``: checked by kvconfig.backends without
importing any backend, so that ``kvconfig.tap`` imports none (nor treq)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from twisted.python import usage

from kvconfig.backends import check_etcd_prefix, parse_endpoints, parse_store
from kvconfig.tap import Options


def test_importing_tap_imports_no_backend_and_no_treq():
    """A fresh interpreter that imports kvconfig.tap has imported neither
    the etcd package, nor the sqlite backend, nor treq: backends are
    imported by backend_from_string only, for the store chosen."""
    code = ("import json, sys, kvconfig.tap; "
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith(('kvconfig.backends.', 'treq')))))")
    output = subprocess.run([sys.executable, "-c", code], check=True,
                            capture_output=True, text=True).stdout
    imported = json.loads(output)
    assert "kvconfig.backends.base" in imported  # the check itself looks at the right names
    for module in ("kvconfig.backends.etcd", "kvconfig.backends.sqlite", "treq"):
        assert module not in imported, imported


def test_etcd_endpoints_are_member_urls():
    assert parse_endpoints("http://10.0.0.1:2379, https://h:2379/") == [
        "http://10.0.0.1:2379", "https://h:2379/"]
    assert parse_store("etcd:http://127.0.0.1:2379") == ("etcd", "http://127.0.0.1:2379")


@pytest.mark.parametrize("store, message", [
    ("etcd:", "needs member URLs"),
    ("etcd:http://a:1,", "needs member URLs"),
    ("etcd:ftp://a:1", "is not an http://HOST:PORT URL"),
    ("etcd:http://a:1/v3", "is not an http://HOST:PORT URL"),
    ("etcd:127.0.0.1:2379", "is not an http://HOST:PORT URL"),
    ("sqlite:", "needs a file path"),
    ("memory:x", "takes no argument"),
    ("redis:x", "must be one of"),
])
def test_a_bad_store_is_a_usage_error(store, message):
    with pytest.raises(usage.UsageError, match=message):
        Options().parseOptions(["--store", store])


@pytest.mark.parametrize("prefix", ["", "kvconfig/", "team-a/kv/"])
def test_an_etcd_prefix_may_be_empty_or_printable(prefix):
    assert check_etcd_prefix(prefix) == prefix
    options = Options()
    options.parseOptions(["--store", "memory:", "--etcd-prefix", prefix])
    assert options["etcd-prefix"] == prefix


@pytest.mark.parametrize("prefix", ["has space/", "tab\there/", "nl\n"])
def test_an_etcd_prefix_with_whitespace_is_a_usage_error(prefix):
    with pytest.raises(usage.UsageError, match="--etcd-prefix must not hold whitespace"):
        Options().parseOptions(["--store", "memory:", "--etcd-prefix", prefix])
