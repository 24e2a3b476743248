"""
system.* over XML-RPC: introspection and multicall, against a real server.

``system.listMethods``, ``system.methodHelp`` and ``system.methodSignature``
describe every method; ``system.multicall`` has the stdlib's semantics
(``[result]`` or ``{faultCode, faultString}`` per call, in order, one
failure not stopping the others), a cap on batch size and no nesting.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from xmlrpc.client import Fault, MultiCall

import pytest

from faults import (
    BATCH_TOO_LARGE,
    COMPARE_FAILED,
    INVALID_KEY,
    INVALID_REQUEST,
    NO_SUCH_METHOD,
    WRONG_ARGUMENTS,
    check_fault,
    expect_fault,
    unchanged,
)
from serverprocess import KVConfigProcess

MAX_MULTICALL = 4

# Every method, and the argument counts its signatures must describe.
ARITIES = {
    "save": {2},
    "load": {1},
    "delete": {1},
    "get": {1},
    "put": {2, 3},
    "remove": {1, 2},
    "keys": {1, 2},
    "list": {1, 2},
    "changes": {2},
    "stats": {0},
    "system.listMethods": {0},
    "system.methodHelp": {1},
    "system.methodSignature": {1},
    "system.multicall": {1},
}


def check_fault_entry(entry, error: tuple[int, str]) -> None:
    """A multicall fault entry: a struct of exactly faultCode and faultString."""
    assert type(entry) is dict and set(entry) == {"faultCode", "faultString"}, entry
    check_fault(Fault(entry["faultCode"], entry["faultString"]), error)


def entry(method: str, *params) -> dict:
    return {"methodName": method, "params": list(params)}


@pytest.fixture
def proxy(server):
    with server.proxy() as proxy:
        yield proxy


@pytest.fixture
def key(request) -> str:
    """A key (and prefix) of the test's own on the shared server."""
    return "system." + re.sub(r"[^\w.\-\[\]]", "_", request.node.name, flags=re.ASCII)


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A server taking at most MAX_MULTICALL calls per multicall."""
    process = KVConfigProcess(tmp_path_factory.mktemp("capped"), None,
                              f"--max-multicall={MAX_MULTICALL}")
    process.start()
    yield process
    process.stop()


# Introspection


def test_list_methods_lists_every_method(proxy):
    """system.listMethods lists the classic calls, the richer calls and the
    system.* calls, each once, and nothing the server cannot call."""
    names = proxy.system.listMethods()
    assert all(type(name) is str for name in names)
    assert len(names) == len(set(names))
    assert set(ARITIES) <= set(names), set(ARITIES) - set(names)
    for name in names:  # every name listed can be called (no no_such_method)
        assert proxy.system.methodHelp(name)


def test_method_help_returns_each_methods_docstring(proxy):
    """system.methodHelp returns, for every listed method, a non-empty
    documentation string of its own that names the method."""
    names = proxy.system.listMethods()
    helps = {name: proxy.system.methodHelp(name) for name in names}
    for name, text in helps.items():
        assert type(text) is str and text.strip(), name
        assert name.rsplit(".", 1)[-1] in text, (name, text)
    assert len(set(helps.values())) == len(helps), "methods share a help text"
    assert "prev_revision" in helps["put"] and "ttl" in helps["put"]
    assert "compacted" in helps["changes"]


#: Methods whose types the spec's type names cannot state (a value of any
#: type, or nil): their signature is the introspection convention's "undef".
UNTYPED = {"save", "load", "delete", "get", "put"}
SPEC_TYPES = {"int", "i4", "boolean", "string", "double", "dateTime.iso8601", "base64",
              "struct", "array"}


def test_method_signature_uses_only_the_specs_type_names(proxy):
    """system.methodSignature returns, for every listed method, a list of
    [return type, argument types...] lists of the XML-RPC spec's type names
    (never nil or any), whose argument counts are the ones the method takes;
    or, for a method those names cannot describe, the string "undef"."""
    for name in proxy.system.listMethods():
        signatures = proxy.system.methodSignature(name)
        if name in UNTYPED:
            assert signatures == "undef", name
            continue
        assert type(signatures) is list and signatures, name
        for signature in signatures:
            assert type(signature) is list and signature, (name, signature)
            assert set(signature) <= SPEC_TYPES, (name, signature)
        if name in ARITIES:
            assert {len(s) - 1 for s in signatures} == ARITIES[name], (name, signatures)
    assert proxy.system.methodSignature("keys")[0][1] == "string"
    assert proxy.system.methodSignature("stats") == [["struct"]]


@pytest.fixture
def xmlrpc_c_tool():
    """The path of a tool of Debian's xmlrpc-api-utils (xmlrpc-c), which
    .ci/run installs; skipped without it unless KVCONFIG_REQUIRE_TOOLS is set."""
    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            if os.environ.get("KVCONFIG_REQUIRE_TOOLS"):
                pytest.fail(f"{name} is not installed (Debian package xmlrpc-api-utils)")
            pytest.skip(f"{name} is not installed (Debian package xmlrpc-api-utils)")
        return path
    return find


def test_xmlrpc_c_generates_a_cpp_proxy_for_every_typed_method(server, xmlrpc_c_tool,
                                                               tmp_path):
    """xmlrpc-c's xml-rpc-api2cpp reads every signature without failing (it
    refused 'nil'), declares a C++ method for each typed one, and skips the
    untyped ones as having no signature."""
    result = subprocess.run([xmlrpc_c_tool("xml-rpc-api2cpp"), server.url, "", "KV"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Unknown XML-RPC type name" not in result.stdout + result.stderr
    for name in ("keys", "list", "changes", "remove", "stats"):
        assert re.search(rf"\b{name} \(", result.stdout), name
    for name in UNTYPED:
        assert f"Skipping method {name} " in result.stdout + result.stderr, name


def test_xmlrpc_c_describes_the_api(server, xmlrpc_c_tool):
    """xml-rpc-api2txt lists the typed methods with their types, the others
    as unknown, each with its help."""
    result = subprocess.run([xmlrpc_c_tool("xml-rpc-api2txt"), server.url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "struct keys (string)" in result.stdout
    assert "struct changes (string, int)" in result.stdout
    assert "unknown load (...)" in result.stdout
    assert not re.search(r"^(nil|any) ", result.stdout, re.M)


@pytest.mark.parametrize("name", ["nope", "system.nope", "system", "", "Save", 5])
def test_introspecting_unknown_method_is_no_such_method(proxy, name):
    """system.methodHelp and system.methodSignature of a method the server
    does not have are Fault -32601 no_such_method."""
    expect_fault(NO_SUCH_METHOD, proxy.system.methodHelp, name)
    expect_fault(NO_SUCH_METHOD, proxy.system.methodSignature, name)
    assert proxy.system.methodHelp("load")


# Multicall


def test_multicall_returns_each_result_wrapped_in_order(proxy, key):
    """system.multicall returns one entry per call, in order: [result] for
    each that succeeded; writes are visible to later calls in the batch."""
    results = proxy.system.multicall([
        entry("save", key, 1),
        entry("load", key),
        entry("put", key, {"n": 2}),
        entry("get", key),
        entry("keys", key),
        entry("delete", key),
        entry("load", key),
    ])
    assert len(results) == 7
    assert all(type(result) is list and len(result) == 1 for result in results), results
    (saved,), (loaded,), (put,), (got,), (keys,), (deleted,), (gone,) = results
    assert saved is None and loaded == 1
    assert put["version"] == 2 and put["key"] == key
    assert got["value"] == {"n": 2} and got["mod_revision"] == put["revision"]
    assert keys["keys"] == [key]
    assert deleted is None and gone is None
    assert proxy.load(key) is None


def test_multicall_failing_call_does_not_stop_the_others(proxy, key):
    """A call that fails gives a {faultCode, faultString} entry with its
    documented code, and the calls after it still run."""
    other = key + ".other"
    results = proxy.system.multicall([
        entry("save", key, "a"),
        entry("save", "", "x"),
        entry("load", key),
        entry("nope"),
        entry("put", other, "b"),
        entry("put", key, "c", {"prev_revision": 0}),
        entry("load", key, "extra"),
        entry("load", other),
    ])
    assert results[0] == [None]
    check_fault_entry(results[1], INVALID_KEY)
    assert results[2] == ["a"]
    check_fault_entry(results[3], NO_SUCH_METHOD)
    assert results[4][0]["key"] == other
    check_fault_entry(results[5], COMPARE_FAILED)
    check_fault_entry(results[6], WRONG_ARGUMENTS)
    assert results[7] == ["b"]
    assert proxy.load(key) == "a"


def test_multicall_compare_and_set_sees_earlier_writes_in_the_batch(proxy, key):
    """Writes in a batch are decided in order: a create-only put after a
    put of the same key fails, and after a remove succeeds."""
    results = proxy.system.multicall([
        entry("put", key, "v1", {"prev_revision": 0}),
        entry("put", key, "v2", {"prev_revision": 0}),
        entry("remove", key),
        entry("load", key),
        entry("put", key, "v3", {"prev_revision": 0}),
        entry("get", key),
    ])
    assert results[0][0]["version"] == 1
    check_fault_entry(results[1], COMPARE_FAILED)
    assert results[2][0]["deleted"] is True
    assert results[3] == [None]
    assert results[4][0]["version"] == 1
    assert results[5][0]["value"] == "v3"
    assert results[5][0]["create_revision"] == results[4][0]["revision"]


def test_multicall_works_with_the_stdlib_multicall_helper(server, key):
    """The stdlib's xmlrpc.client.MultiCall reads the results: values for the
    calls that succeeded, a raised Fault for one that failed."""
    with server.proxy() as proxy:
        batch = MultiCall(proxy)
        batch.save(key, [1, "two"])
        batch.load(key)
        batch.load("")
        batch.system.listMethods()
        results = batch()
        assert results[0] is None
        assert results[1] == [1, "two"]
        with pytest.raises(Fault) as info:
            results[2]
        check_fault(info.value, INVALID_KEY)
        assert "load" in results[3]


def test_multicall_empty_batch_returns_empty_list(proxy):
    """A multicall of no calls returns an empty list."""
    assert proxy.system.multicall([]) == []


def test_nested_multicall_is_a_fault_entry(proxy, key):
    """A multicall entry calling system.multicall gives a fault entry
    (-32600 invalid_request) and its calls are not made; the others are."""
    with unchanged(proxy, key):
        results = proxy.system.multicall([
            entry("load", key),
            entry("system.multicall", [entry("save", key, "nested")]),
            entry("load", key),
        ])
    assert results[0] == results[2] == [None]
    check_fault_entry(results[1], INVALID_REQUEST)


NOT_CALLS = {
    "string": "save",
    "array": ["save", ["k", 1]],
    "int": 5,
    "nil": None,
    "no_method_name": {"params": ["k"]},
    "empty_struct": {},
}


@pytest.mark.parametrize("call", NOT_CALLS.values(), ids=NOT_CALLS)
def test_multicall_entry_not_a_call_struct_is_a_fault_entry(proxy, key, call):
    """A multicall entry that is not a struct, or lacks methodName, gives a
    fault entry (-32600 invalid_request); the other entries are made."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        results = proxy.system.multicall([entry("load", key), call, entry("load", key)])
    assert results[0] == results[2] == ["before"]
    check_fault_entry(results[1], INVALID_REQUEST)


@pytest.mark.parametrize("params", ["k", {"key": "k"}, 5, None], ids=["string", "struct",
                                                                      "int", "nil"])
def test_multicall_params_not_an_array_is_a_fault_entry(proxy, key, params):
    """A multicall entry whose params are not an array gives a fault entry
    (-32602 wrong_arguments) and is not made."""
    proxy.put(key, "before")
    with unchanged(proxy, key):
        results = proxy.system.multicall([
            {"methodName": "save", "params": params},
            {"methodName": "delete", "params": params},
            entry("load", key),
        ])
    check_fault_entry(results[0], WRONG_ARGUMENTS)
    check_fault_entry(results[1], WRONG_ARGUMENTS)
    assert results[2] == ["before"]


def test_multicall_method_name_not_a_string_is_a_fault_entry(proxy):
    """A multicall entry whose methodName is not a string gives a fault
    entry (-32601 no_such_method)."""
    results = proxy.system.multicall([{"methodName": 5, "params": []},
                                      {"methodName": ["load"], "params": ["k"]},
                                      entry("stats")])
    check_fault_entry(results[0], NO_SUCH_METHOD)
    check_fault_entry(results[1], NO_SUCH_METHOD)
    assert "revision" in results[2][0]


@pytest.mark.parametrize("calls", ["calls", {"methodName": "stats"}, 5],
                         ids=["string", "struct", "int"])
def test_multicall_of_non_array_is_wrong_arguments(proxy, calls):
    """system.multicall given something other than an array of calls is
    Fault -32602 wrong_arguments."""
    with unchanged(proxy):
        expect_fault(WRONG_ARGUMENTS, proxy.system.multicall, calls)


def test_multicall_over_max_multicall_is_batch_too_large(capped):
    """A multicall of more than --max-multicall calls is Fault 11
    batch_too_large as a whole and none of its calls is made; one of
    exactly --max-multicall calls is made."""
    key = "batch"
    with capped.proxy() as proxy:
        proxy.put(key, "before")
        with unchanged(proxy, key):
            batch = [entry("save", key, i) for i in range(MAX_MULTICALL + 1)]
            expect_fault(BATCH_TOO_LARGE, proxy.system.multicall, batch)
            expect_fault(BATCH_TOO_LARGE, proxy.system.multicall, batch * 10)
        results = proxy.system.multicall(batch[:MAX_MULTICALL])
        assert results == [[None]] * MAX_MULTICALL
        assert proxy.load(key) == MAX_MULTICALL - 1
