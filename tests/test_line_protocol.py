"""The line protocol, driven in memory through StringTransport and a Clock."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from kvconfig import __version__, errors
from kvconfig.line import LineFactory

from stores import clocked_store

STATUS_WORDS = {"OK", "ERR", "VALUE", "NIL", "TTL", "KEY", "CHANGE", "STAT", "HELP", "PONG", "END",
                "HELLO", "EVENT"}
ERR = re.compile(r"ERR (\S+) (-?\d+) \S")
#: The XML-RPC Fault code of each error name.
FAULT_CODES = {error.name: error.code for error in errors.ALL_ERRORS}


class Line:
    """A line-protocol connection on a StringTransport, over a memory (or
    sqlite, committing on ``clock.advance(0)``) store."""

    def __init__(self, backend: str = "memory", tmp_path=None, **limits) -> None:
        self.store = clocked_store(backend, tmp_path, **limits)
        self.clock, self.limits = self.store.backend.clock, self.store.limits
        self.failures: list = []
        self.factory = LineFactory(self.store, self.limits, self.clock)
        self.transport, self.protocol = self.connect()
        self.greeting = self.take()

    def connect(self):
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return transport, protocol

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        chunk = chunk or len(data) or 1
        for i in range(0, len(data), chunk):
            self.protocol.dataReceived(data[i:i + chunk])

    def take(self) -> list[str]:
        """The lines written since the last take, each checked to end in CRLF."""
        out = self.transport.value()
        self.transport.clear()
        if not out:
            return []
        assert out.endswith(b"\r\n"), out
        return out[:-2].decode("utf-8").split("\r\n")

    def send(self, line: str | bytes) -> list[str]:
        """Send one line (CRLF, as telnet does) and return every line written."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.feed(line + b"\r\n")
        return self.take()

    def put(self, key: str, value) -> None:
        """A write through the store, as another interface would make it."""
        self.store.put(key, value).addErrback(self.failures.append)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def error(line: str) -> tuple[str, int]:
    """(name, code) of an ERR line, which must also carry a message; the
    code is the XML-RPC Fault code of that name."""
    match = ERR.match(line)
    assert match, line
    name, code = match.group(1), int(match.group(2))
    assert FAULT_CODES.get(name) == code, line
    return name, code


def stats(lines: list[str]) -> dict:
    assert lines[-1] == "END"
    found = {}
    for line in lines[:-1]:
        word, name, value = line.split(" ", 2)
        assert word == "STAT"
        found[name] = json.loads(value)
    return found


def event_revisions(lines: list[str], watch_id: int = 1) -> list[int]:
    """Revisions of the EVENT lines of one watch (put or delete)."""
    revisions = []
    for line in lines:
        if line.startswith("EVENT "):
            _, wid, kind, _key, revision, *_ = line.split(" ")
            assert int(wid) == watch_id and kind in ("put", "delete")
            revisions.append(int(revision))
    return revisions


def test_greeting_names_server_version_revision_and_help():
    """On connecting, one HELLO line names kvconfig, its version and the
    store's revision, and says to type HELP."""
    conn = Line()
    assert conn.greeting == [f"HELLO kvconfig {__version__} revision 0 - type HELP for commands"]
    conn.put("g/a", 1)
    conn.put("g/b", 2)
    _, protocol = conn.connect()
    assert protocol.transport.value() == (
        b"HELLO kvconfig %s revision 2 - type HELP for commands\r\n" % __version__.encode())


# One pipelined script: LF and CRLF, any case, blank lines, every command.
SCRIPT = (
    b"PING\r\n"
    b"set app/name Guido\n"
    b"\n"
    b"SET app/ports [4050, 5100, 5200]\r\n"
    b"  \t \r\n"
    b"Get app/name\n"
    b"GET app/ports\r\n"
    b"get app/missing\n"
    b'SET\tapp/tmp {"a": [1.5, null, true], "b": "x y"} ex 30\n'
    b"GET app/tmp\n"
    b"\r\n"
    b"keys app/\r\n"
    b"LIST app/ 1\n"
    b"watch app/\r\n"
    b"SET app/name Barry\n"
    b"DEL app/tmp\r\n"
    b"del app/tmp\n"
    b"SET other/x 1\n"
    b"UnWatch 1\n"
    b"SET app/name Tim\n"
    b"CHANGES 3 app/\r\n"
    b"help ping\n"
    b"STATS\r\n"
    b"PING all done\n"
)
SCRIPT_REPLIES = [
    "PONG",
    "OK 1 1",
    "OK 2 1",
    'VALUE app/name 1 1 1 - "Guido"',
    "VALUE app/ports 2 1 2 - [4050,5100,5200]",
    "NIL app/missing",
    "OK 3 1",
    'VALUE app/tmp 3 1 3 30.0 {"a":[1.5,null,true],"b":"x y"}',
    "KEY app/name", "KEY app/ports", "KEY app/tmp", "END 3 3",
    'VALUE app/name 1 1 1 - "Guido"', "END 3 1 more",  # LIST app/ 1: a second key follows
    "OK watching 1 app/ 3",
    "OK 4 2",
    "OK 5 deleted",
    "OK 5 absent",
    "OK 6 1",
    "OK 1",
    "OK 7 3",
    'CHANGE put app/name 4 2 1 - "Barry"',
    "CHANGE delete app/tmp 5 deleted",
    'CHANGE put app/name 7 3 1 - "Tim"',
    "END 7 3",
    "HELP PING [text]", "HELP   Answers PONG [text].", "END",
    # STAT lines are checked apart
    "END",
    "PONG all done",
]
SCRIPT_EVENTS = [
    'EVENT 1 put app/name 4 2 1 - "Barry"',
    "EVENT 1 delete app/tmp 5 deleted",
]


def without_events(out: bytes) -> bytes:
    return b"".join(line for line in out.splitlines(keepends=True)
                    if not line.startswith(b"EVENT "))


def run_script(chunk: int | None) -> tuple[bytes, Line]:
    conn = Line()
    conn.feed(SCRIPT, chunk)
    return conn.transport.value(), conn


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 8, 9, None])
def test_pipelined_script_at_every_chunk_size(chunk):
    """A pipelined script of every command (LF and CRLF, mixed case, blank
    lines), fed 1..9 bytes at a time or whole, gets the same replies back: each
    reply correct and in request order, watch events only while watching.
    Where an event falls between replies depends on how the writes shared
    their commits (writes read together are made as one run), so the bytes
    are compared with the EVENT lines taken out, and those apart."""
    out, conn = run_script(chunk)
    assert without_events(out) == without_events(run_script(None)[0])
    lines = conn.take()
    events = [line for line in lines if line.startswith("EVENT ")]
    replies = [line for line in lines if not line.startswith(("EVENT ", "STAT "))]
    assert replies == SCRIPT_REPLIES
    assert events == SCRIPT_EVENTS
    assert all(line.split(" ", 1)[0] in STATUS_WORDS for line in lines)
    start = lines.index("HELP PING [text]") + 3
    counters = stats(lines[start:lines.index("PONG all done")])
    assert counters["keys"] == 3 and counters["revision"] == 7
    assert counters["line_connections"] == 1 and counters["line_errors"] == 0
    assert not conn.closed


def test_pipelined_replies_wait_for_earlier_writes(tmp_path):
    """With sqlite, a write is answered only once committed; reads pipelined
    behind it are answered after it, in request order, not before."""
    conn = Line("sqlite", tmp_path)
    conn.feed(b"SET p/a 1\nGET p/a\r\nSET p/b [true]\nKEYS p/\nDEL p/a\nGET p/a\nPING\n")
    assert conn.take() == []
    conn.clock.advance(0)
    assert conn.take() == [
        "OK 1 1", "VALUE p/a 1 1 1 - 1", "OK 2 1", "KEY p/a", "KEY p/b", "END 2 2",
        "OK 3 deleted", "NIL p/a", "PONG",
    ]


def test_a_run_of_writes_answers_each_in_its_place(tmp_path):
    """Writes read together are made as one run, one commit: each is answered
    in its place (a bad one with its error, the others made, compare-and-set
    seeing the writes before it), and nothing is answered before the commit."""
    conn = Line("sqlite", tmp_path)
    commits = conn.store.backend.commits
    conn.feed(b"SET r/a 1\r\nSET r/b\r\nSET r/c [1,\r\nSET r/a 2 IF 9\r\nSET r/a 3 IF 1\r\n"
              b"DEL r/a IF 1\r\nDEL r/a\r\nDEL r/a\r\nSET bad\x01key 1\r\nSET r/d x EX 10\r\n"
              b"DEL\r\nDEL r/d IF x\r\nGET r/d\r\n")
    assert conn.take() == []
    conn.clock.advance(0)
    lines = conn.take()
    assert [error(line)[0] if line.startswith("ERR") else line for line in lines] == [
        "OK 1 1", "wrong_arguments", "invalid_value", "compare_failed", "OK 2 2",
        "compare_failed", "OK 3 deleted", "OK 3 absent", "invalid_key", "OK 4 1",
        "wrong_arguments", "invalid_argument",
        f"VALUE r/d 4 1 4 {conn.clock.seconds() + 10!r} \"x\""]
    assert conn.store.backend.commits == commits + 1


def test_help_lists_every_command_and_explains_one():
    """HELP lists the usage of every command; HELP SET explains SET; both
    are HELP lines ended by END."""
    conn = Line()
    lines = conn.send("HELP")
    assert lines[0].startswith("HELP ") and lines[-1] == "END"
    assert all(line.startswith("HELP ") for line in lines[:-1])
    for name in ("GET", "SET", "DEL", "KEYS", "LIST", "CHANGES", "WATCH", "UNWATCH",
                 "STATS", "PING", "HELP", "QUIT"):
        assert any(line.startswith(f"HELP   {name}") for line in lines), name
    lines = conn.send("help set")
    assert lines[0] == "HELP SET key value [EX seconds] [IF mod_revision]"
    assert len(lines) > 2 and lines[-1] == "END"
    assert all(line.startswith("HELP   ") for line in lines[1:-1])


def test_bare_words_and_json_values():
    """A bare word is a string; JSON values keep their type; bytes and
    datetimes are written and shown in tagged JSON."""
    conn = Line()
    cases = [
        ("Guido", "Guido", '"Guido"'),
        ("8.8.8.8", "8.8.8.8", '"8.8.8.8"'),
        ("12abc", "12abc", '"12abc"'),
        ('"two words"', "two words", '"two words"'),
        ("42", 42, "42"),
        ("1.0", 1.0, "1.0"),
        ("true", True, "true"),
        ("null", None, "null"),
        ('{"$bytes": "AAE="}', b"\x00\x01", '{"$bytes":"AAE="}'),
        ('{"$datetime": "20261122T10:00:00"}', datetime(2026, 11, 22, 10, 0, 0),
         '{"$datetime":"20261122T10:00:00"}'),
        ('{"$dict": {"$bytes": 1}}', {"$bytes": 1}, '{"$dict":{"$bytes":1}}'),
    ]
    for i, (text, value, shown) in enumerate(cases):
        key = f"bare/{i}"
        assert conn.send(f"SET {key} {text}")[0].startswith("OK ")
        assert conn.store.load(key) == value and type(conn.store.load(key)) is type(value)
        assert conn.send(f"GET {key}")[0].endswith(" - " + shown)


def test_compare_and_set_with_if():
    """SET/DEL ... IF rev write only when the key's mod_revision is rev (0:
    absent); otherwise ERR compare_failed 6 and nothing changes."""
    conn = Line()
    assert conn.send("SET cas/k 1 IF 0") == ["OK 1 1"]
    assert error(conn.send("SET cas/k 2 IF 0")[0]) == ("compare_failed", 6)
    assert conn.send("SET cas/k 3 IF 1") == ["OK 2 2"]
    assert error(conn.send("DEL cas/k IF 1")[0]) == ("compare_failed", 6)
    assert conn.store.load("cas/k") == 3
    assert conn.send("DEL cas/k if 2") == ["OK 3 deleted"]


BAD_INPUT = [
    (b"FROB x", "no_such_method", -32601),
    (b"HELP FROB", "no_such_method", -32601),
    (b"GET", "wrong_arguments", -32602),
    (b"GET a b", "wrong_arguments", -32602),
    (b"SET bad/k", "wrong_arguments", -32602),
    (b"SET", "wrong_arguments", -32602),
    (b"SET bad/k 1 EX", "wrong_arguments", -32602),
    (b"DEL", "wrong_arguments", -32602),
    (b"DEL bad/k IF", "wrong_arguments", -32602),
    (b"STATS now", "wrong_arguments", -32602),
    (b"QUIT now", "wrong_arguments", -32602),
    (b"SET bad/k {not json", "invalid_value", 3),
    (b"SET bad/k [1, 2", "invalid_value", 3),
    (b'SET bad/k "unterminated', "invalid_value", 3),
    (b"SET bad/k [1,2]x", "invalid_value", 3),
    (b'SET bad/k {"$nope": 1}', "invalid_value", 3),
    (b'SET bad/k {"$bytes": "!!"}', "invalid_value", 3),
    (b"SET bad/k 4294967296", "invalid_value", 3),
    (b"GET a\x01b", "invalid_key", 1),
    (b"SET bad\x7fk 1", "invalid_key", 1),
    (b"GET " + b"k" * 300, "key_too_large", 2),
    (b'SET bad/k "' + b"x" * 300 + b'"', "value_too_large", 4),
    (b"SET bad/k 1 EX -1", "invalid_argument", 5),
    (b"SET bad/k 1 EX soon", "invalid_argument", 5),
    (b"SET bad/k 1 IF x", "invalid_argument", 5),
    (b"SET bad/k 1 XX 1", "invalid_argument", 5),
    (b"KEYS bad/ 0", "invalid_argument", 5),
    (b"CHANGES soon", "invalid_argument", 5),
    (b"CHANGES -1", "invalid_argument", 5),
    (b"WATCH bad/ 0", "invalid_argument", 5),
    (b"UNWATCH 7", "invalid_argument", 5),
    (b"SET exists/k 2 IF 99", "compare_failed", 6),
    (b"GET \xfe\xc0", "bad_encoding", -32702),  # (0xff starts a telnet command)
    (b"\xc3\x28", "bad_encoding", -32702),
    (b"SET bad/k caf\xe9", "bad_encoding", -32702),
]


@pytest.mark.parametrize(("line", "name", "code"), BAD_INPUT,
                         ids=[repr(line[:24]) for line, _, _ in BAD_INPUT])
def test_bad_input_gets_one_err_line_and_changes_nothing(line, name, code):
    """Each bad request gets exactly one ERR line with the kvconfig.errors
    name and code, changes nothing in the store, and the next command on the
    connection is answered."""
    conn = Line(max_key_bytes=200, max_value_bytes=200)
    conn.put("exists/k", 1)
    revision, keys = conn.store.revision, conn.store.range("")[1]
    conn.feed(line + b"\r\nPING next\n")
    lines = conn.take()
    assert len(lines) == 2, lines
    assert error(lines[0]) == (name, code)
    assert lines[1] == "PONG next"
    assert conn.store.revision == revision and conn.store.range("")[1] == keys
    assert not conn.closed
    assert stats(conn.send("STATS"))["line_errors"] == 1


def test_non_ascii_base64_in_tagged_bytes_is_invalid_value():
    """SET with {"$bytes": "<non-ASCII>"} is a bad value (ERR invalid_value 3),
    like any other malformed tag, not an internal error."""
    conn = Line()
    lines = conn.send('SET tag/k {"$bytes": "\u00e9"}')
    assert len(lines) == 1 and error(lines[0]) == ("invalid_value", 3), lines
    assert conn.store.load("tag/k") is None
    assert conn.send("PING") == ["PONG"]


@pytest.mark.parametrize("value", ["[" * 5000, "[" * 900 + "]" * 900],
                         ids=["unterminated", "balanced"])
def test_deeply_nested_json_is_invalid_value(value):
    """A value nested deeper than max_value_depth, even deep enough to
    exhaust Python's recursion limit, is ERR invalid_value 3, not an
    internal error."""
    conn = Line()
    lines = conn.send("SET deep/k " + value)
    assert len(lines) == 1 and error(lines[0]) == ("invalid_value", 3), lines[0][:80]
    assert conn.store.load("deep/k") is None
    assert conn.send("PING") == ["PONG"]


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_words_that_are_not_json_are_bare_strings(word):
    """NaN and Infinity are not JSON (RFC 8259), so like any other bare
    word they are stored as strings."""
    conn = Line()
    assert conn.send(f"SET nonjson/k {word}") == ["OK 1 1"]
    assert conn.store.load("nonjson/k") == word


@pytest.mark.parametrize("space", ["\x85", "\u00a0", "\u2028", "\u3000"])
def test_only_spaces_and_tabs_separate_words(space):
    """Words are separated by spaces and tabs only: a bare word holding
    another Unicode space character is one word, stored whole."""
    conn = Line()
    assert conn.send(f"SET sep/k a{space}b") == ["OK 1 1"]
    assert conn.store.load("sep/k") == f"a{space}b"


LIMITS_SMALL_LINES = {"max_key_bytes": 64, "max_value_bytes": 100, "max_line_bytes": 228}


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_over_long_line_is_skipped_without_being_kept(chunk):
    """A line over max_line_bytes, fed in chunks, gets exactly one ERR
    request_too_large 10; the buffer never holds more than a line's worth
    of it, and the next line is answered."""
    conn = Line(**LIMITS_SMALL_LINES)
    limit = conn.limits.max_line_bytes
    data = b"SET big/k " + b"x" * 20_000 + b"\r\nPING after\r\n"
    most = 0
    for i in range(0, len(data), chunk):
        conn.protocol.dataReceived(data[i:i + chunk])
        most = max(most, len(conn.protocol._buffer))
    assert most <= limit + 1 + chunk
    lines = conn.take()
    assert len(lines) == 2, lines
    assert error(lines[0]) == ("request_too_large", 10)
    assert lines[1] == "PONG after"
    assert conn.store.load("big/k") is None and not conn.closed
    assert stats(conn.send("STATS"))["line_lines_too_long"] == 1


def test_line_length_limit_boundary():
    """A line of exactly max_line_bytes (before its CRLF) is served; one
    byte more is ERR request_too_large, and the stream goes on."""
    conn = Line(**LIMITS_SMALL_LINES)
    limit = conn.limits.max_line_bytes
    at_limit = b"PING " + b"a" * (limit - 5)
    assert conn.send(at_limit) == [at_limit.decode().replace("PING", "PONG", 1)]
    conn.feed(at_limit + b"\n")
    assert conn.take() == [at_limit.decode().replace("PING", "PONG", 1)]
    lines = conn.send(at_limit + b"b")
    assert len(lines) == 1 and error(lines[0]) == ("request_too_large", 10)
    conn.feed(b"x" * (3 * limit) + b"\nPING 1\n" + b"y" * (limit + 1) + b"\nPING 2\n")
    lines = conn.take()
    assert [error(line) for line in lines[0::2]] == [("request_too_large", 10)] * 2
    assert lines[1::2] == ["PONG 1", "PONG 2"]


GARBAGE_TOKENS = [b"GET", b"SET", b"WATCH", b"UNWATCH", b"DEL", b"KEYS", b"LIST", b"CHANGES",
                  b"HELP", b"STATS", b"PING", b" ", b"\t", b"\n", b"\r", b"\r\n", b"x/", b"1",
                  b"[", b"]", b"{", b"}", b'"', b"$bytes", b":", b"\xff", b"\xc3", b"\xa9",
                  b"\x00", b"\x80", b"EX", b"IF", b"-"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400)
       | st.lists(st.sampled_from(GARBAGE_TOKENS), max_size=80).map(b"".join))
def test_garbage_never_raises_and_the_connection_still_answers(garbage):
    """Any bytes at all (invalid UTF-8, binary, half commands) never raise;
    every line written starts with a status word, and after a newline the
    connection still answers PING."""
    if b"QUIT" in garbage.upper():
        return
    conn = Line()
    conn.feed(garbage, 3)
    conn.feed(b"\nPING alive\r\n")
    # Telnet's option refusals (kvconfig.telnet) are not lines.
    out = conn.transport.value()
    conn.transport.clear()
    conn.transport.write(re.sub(rb"\xff[\xfb-\xfe][^\n]", b"", out))
    lines = conn.take()
    assert lines[-1] == "PONG alive"
    assert all(line.split(" ", 1)[0] in STATUS_WORDS for line in lines)
    assert not conn.closed


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_watch_burst_arrives_complete_and_in_order(backend, tmp_path):
    """A burst of 500 writes under the watched prefix arrives as 500 EVENT
    lines, in revision order, none missing; writes elsewhere are not sent."""
    conn = Line(backend, tmp_path)
    assert conn.send("WATCH burst/") == ["OK watching 1 burst/ 0"]
    for i in range(500):
        conn.put(f"burst/{i % 7}", i)
        if i % 50 == 0:
            conn.put("elsewhere/k", i)
        if i % 100 == 99:
            conn.clock.advance(0)
    conn.clock.advance(0)
    assert conn.failures == []
    lines = conn.take()
    assert len(lines) == 500 and all(line.startswith("EVENT 1 put burst/") for line in lines)
    expected, revision = [], 0
    for i in range(500):
        revision += 1
        expected.append(revision)
        revision += i % 50 == 0  # the write elsewhere
    assert event_revisions(lines) == expected
    assert [json.loads(line.rsplit(" ", 1)[1]) for line in lines] == list(range(500))


def test_watch_from_past_revision_replays_then_streams_without_gap_or_duplicate(tmp_path):
    """WATCH prefix from replays history from that revision, then streams
    live changes: every revision from `from` on exactly once, in order, even
    with writes decided but not yet committed when the WATCH arrives."""
    conn = Line("sqlite", tmp_path)
    for i in range(20):
        conn.put(f"hist/{i}", i)
    conn.clock.advance(0)
    for i in range(20, 25):  # decided, not yet committed
        conn.put(f"hist/{i}", i)
    lines = conn.send("WATCH hist/ 5")
    assert lines[0] == "OK watching 1 hist/ 20"
    assert event_revisions(lines[1:]) == list(range(5, 21))
    conn.clock.advance(0)
    conn.put("hist/0", "again")
    conn.put("other/0", "not watched")
    conn.store.delete("hist/1")
    conn.clock.advance(0)
    live = conn.take()
    assert event_revisions(live) == [21, 22, 23, 24, 25, 26, 28]
    assert live[-1] == "EVENT 1 delete hist/1 28 deleted"


def test_watch_from_compacted_revision_is_err_compacted():
    """WATCH from a revision older than the history window gets ERR compacted
    7 and starts no watch; from the oldest kept revision it replays."""
    conn = Line(history_events=5)
    for i in range(20):
        conn.put(f"comp/{i}", i)
    assert error(conn.send("WATCH comp/ 15")[0]) == ("compacted", 7)
    assert error(conn.send("CHANGES 14 comp/")[0]) == ("compacted", 7)
    assert conn.store.feed.consumers == 0
    assert conn.send("PING") == ["PONG"]
    lines = conn.send("WATCH comp/ 16")
    assert lines[0] == "OK watching 1 comp/ 20" and event_revisions(lines[1:]) == [16, 17, 18,
                                                                               19, 20]


def test_events_never_appear_inside_a_multi_line_reply(tmp_path):
    """Watch events committed while multi-line replies (LIST, KEYS, CHANGES,
    STATS, HELP) and a write of the watcher's own are in flight come only
    between replies, never inside one."""
    conn = Line("sqlite", tmp_path)
    conn.send("WATCH multi/")
    requests = [b"LIST multi/\r\n", b"KEYS multi/\n", b"CHANGES 0 multi/\n", b"STATS\n",
                b"HELP\n", b"SET multi/own 1\n"]
    for i in range(60):
        conn.put(f"multi/{i}", i)
        conn.feed(requests[i % len(requests)], chunk=1 + i % 5)
        if i % 3:
            conn.clock.advance(0)
    conn.clock.advance(0)
    lines = conn.take()
    in_reply = False
    for line in lines:
        word = line.split(" ", 1)[0]
        if word == "EVENT":
            assert not in_reply, line
        elif word == "END":
            in_reply = False
        elif word in ("VALUE", "KEY", "CHANGE", "STAT", "HELP"):
            in_reply = True
    assert not in_reply
    revisions = event_revisions(lines)
    assert revisions == sorted(set(revisions)) and len(revisions) == 60 + 10


def test_slow_consumer_is_dropped_with_a_reason_and_counted():
    """While the transport is paused, a watcher's events queue up to
    max_watch_backlog; one more ends its watches with one ERR slow_consumer
    line (after resumeProducing), counted in STATS; it can WATCH again."""
    conn = Line(max_watch_backlog=10)
    conn.send("WATCH slow/")
    conn.protocol.pauseProducing()
    assert conn.transport.producerState == "paused"
    most = 0
    for i in range(25):
        conn.put(f"slow/{i}", i)
        most = max(most, len(conn.protocol._backlog))
    assert most <= 10
    assert conn.take() == []
    conn.protocol.resumeProducing()
    lines = conn.take()
    assert len(lines) == 1 and error(lines[0]) == ("slow_consumer", errors.SlowConsumer.code)
    assert conn.store.feed.consumers == 0
    assert conn.send("UNWATCH") == ["OK 0"]
    assert stats(conn.send("STATS"))["line_watchers_dropped"] == 1
    lines = conn.send("WATCH slow/ 24")
    assert lines[0] == "OK watching 2 slow/ 25" and event_revisions(lines[1:], 2) == [24, 25]


def test_slow_consumer_backlog_is_bounded_with_a_reply_pending(tmp_path):
    """Events committed while one of the watcher's own writes is pending and
    its transport is paused are held to max_watch_backlog too: past it the
    watcher gets ERR slow_consumer instead of every event being written."""
    conn = Line("sqlite", tmp_path, max_watch_backlog=10)
    conn.send("WATCH pend/")
    conn.feed(b"SET own/k 1\n")
    conn.protocol.pauseProducing()
    for i in range(50):
        conn.put(f"pend/{i}", i)
    conn.clock.advance(0)
    conn.protocol.resumeProducing()
    lines = conn.take()
    assert len([line for line in lines if line.startswith("EVENT ")]) <= 10, len(lines)
    assert any(line.startswith("ERR slow_consumer ") for line in lines)


def test_max_watches_per_connection():
    """A WATCH past max_watches gets ERR limit_exceeded 9; after an UNWATCH
    a new one is accepted."""
    conn = Line(max_watches=2)
    assert conn.send("WATCH a/") == ["OK watching 1 a/ 0"]
    assert conn.send("WATCH") == ["OK watching 2 * 0"]
    assert error(conn.send("WATCH c/")[0]) == ("limit_exceeded", 9)
    assert conn.store.feed.consumers == 2
    assert conn.send("UNWATCH 1") == ["OK 1"]
    assert conn.send("WATCH c/") == ["OK watching 3 c/ 0"]


def test_max_connections_refuses_past_the_limit():
    """Once max_connections are connected, a new connection is told why (one
    ERR limit_exceeded line) and closed, and counted; a closed connection
    frees its place."""
    conn = Line(max_connections=3)
    others = [conn.connect() for _ in range(2)]
    transport, _ = conn.connect()
    assert error(transport.value().decode().rstrip()) == ("limit_exceeded", 9)
    assert b"3 connections" in transport.value() and transport.disconnecting
    assert conn.factory.counters["refused"] == 1
    others[0][1].connectionLost(None)
    transport, _ = conn.connect()
    assert transport.value().startswith(b"HELLO ")


def test_connections_per_address_are_capped():
    conn = Line(max_connections_per_address=1)
    first = conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    first.makeConnection(StringTransport())
    refusal = conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 2))
    transport = StringTransport()
    refusal.makeConnection(transport)
    assert transport.value().startswith(b"ERR limit_exceeded 9 10.0.0.1 has 1 connections")
    assert transport.disconnecting
    other = conn.factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 1))
    assert type(other) is type(first)


@pytest.mark.parametrize("discarding", [False, True])
def test_a_line_trickled_in_has_request_timeout(discarding):
    """A line not complete within request_timeout gets ERR limit_exceeded and
    the connection closes, though each byte restarts the idle timer; an
    over-long line being skipped counts too."""
    conn = Line(request_timeout=10, max_key_bytes=8, max_value_bytes=8, max_line_bytes=100)
    if discarding:
        conn.feed(b"x" * 200)
        conn.take()
    for _ in range(9):
        conn.feed(b"P")
        conn.clock.advance(1)
    assert not conn.closed
    conn.clock.advance(1.5)
    assert error(conn.take()[-1]) == ("limit_exceeded", 9) and conn.closed


def test_a_quiet_connection_between_lines_is_not_cut_by_the_line_deadline():
    conn = Line(request_timeout=10)
    assert conn.send("PING") == ["PONG"]
    conn.clock.advance(60)
    assert conn.send("PING again") == ["PONG again"]


def test_idle_connection_is_closed_after_idle_timeout():
    """A connection that sends nothing for idle_timeout seconds gets ERR
    limit_exceeded 9 and is closed; any input restarts the count."""
    conn = Line(idle_timeout=10)
    conn.clock.advance(9)
    assert conn.send("PING") == ["PONG"]
    conn.clock.advance(9)
    assert not conn.closed
    conn.clock.advance(1.5)
    assert conn.closed
    assert error(conn.take()[0]) == ("limit_exceeded", 9)


def test_watching_connection_is_exempt_from_idle_timeout():
    """A connection with a WATCH stays open however long it is quiet."""
    conn = Line(idle_timeout=10)
    conn.send("WATCH idle/")
    for _ in range(10):
        conn.clock.advance(10)
    assert not conn.closed
    conn.put("idle/k", 1)
    assert conn.take() == ["EVENT 1 put idle/k 1 1 1 - 1"]


def test_idle_timeout_applies_again_after_unwatch():
    """Once a watching connection that sat quiet past idle_timeout ends its
    watches, it is again closed after idle_timeout without input."""
    conn = Line(idle_timeout=10)
    conn.send("WATCH idle/")
    conn.clock.advance(15)
    assert not conn.closed
    assert conn.send("UNWATCH") == ["OK 1"]
    conn.clock.advance(11)
    assert conn.closed


def test_quit_answers_after_pending_replies_then_closes(tmp_path):
    """QUIT answers OK bye after every earlier reply (a SET waiting for its
    commit included), then closes; nothing pipelined after QUIT is run."""
    conn = Line("sqlite", tmp_path)
    conn.feed(b"SET q/a 1\r\nQUIT\r\nSET q/b 2\r\nPING\r\n")
    assert conn.take() == [] and not conn.closed
    conn.clock.advance(0)
    conn.clock.advance(0)
    assert conn.take() == ["OK 1 1", "OK bye"]
    assert conn.closed
    assert conn.store.load("q/a") == 1 and conn.store.load("q/b") is None
    memory = Line()
    assert memory.send("quit") == ["OK bye"] and memory.closed


class PausingTransport(StringTransport):
    """A transport whose send buffer fills after *room* bytes: it pauses its
    producer, as a real one does when the client is not reading."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.room and self.producerState == "producing":
            self.producer.pauseProducing()


def test_many_queued_answers_that_are_ready_do_not_recurse(tmp_path):
    """A thousand pipelined commands queued behind a pending write, each
    answered at once when its turn comes, are all answered, in order."""
    conn = Line("sqlite", tmp_path)
    # The GET queues behind the SET, and every DEL after it queues too.
    conn.feed(b"SET q/k 1\r\nGET q/k\r\n" + b"DEL q/nosuch\r\n" * 1000 + b"PING\r\n")
    for _ in range(5):
        conn.clock.advance(0)
    replies = conn.take()
    assert replies[:2] == ["OK 1 1", "VALUE q/k 1 1 1 - 1"] and replies[-1] == "PONG"
    assert len(replies) == 1003 and set(replies[2:-1]) == {"OK 1 absent"}


def test_replies_to_one_read_still_stop_when_the_client_stops_reading():
    """Replies to a big pipelined read leave as they are made, so a full send
    buffer stops the commands still unread; they run after it drains."""
    conn = Line(max_value_bytes=2000, max_key_bytes=64, max_line_bytes=4000)
    for i in range(20):
        conn.store.put(f"big/{i}", "x" * 1000)
    transport = PausingTransport(room=100_000)
    protocol = conn.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"LIST big/\r\n" * 2000)
    assert transport.producerState == "paused"
    answered = transport.value().count(b"\r\nEND ")
    assert answered < 200
    transport.clear()
    protocol.resumeProducing()
    assert transport.value().count(b"\r\nEND ") > 0


def test_a_client_racing_ahead_of_its_writes_is_not_read_further(tmp_path):
    """Commands queued behind a pending write are bounded: reading pauses,
    and resumes (answering everything, in order) once the write commits."""
    conn = Line("sqlite", tmp_path)
    conn.feed(b"SET r/k 1\r\n" + b"GET r/k\r\n" * 3000)
    assert conn.protocol.session.queued <= 1024
    assert conn.transport.producerState == "paused"
    for _ in range(10):
        conn.clock.advance(0)
    replies = conn.take()
    assert replies[0] == "OK 1 1" and len(replies) == 3001
    assert set(replies[1:]) == {"VALUE r/k 1 1 1 - 1"}
    assert conn.transport.producerState == "producing"


def test_slow_consumer_backlog_is_bounded_in_bytes():
    """A paused watcher is dropped once its held events pass
    max_watch_backlog_bytes, however few they are."""
    conn = Line(max_watch_backlog_bytes=5000, max_value_bytes=2000, max_key_bytes=64,
                max_line_bytes=4000)
    assert conn.send("WATCH b/")[0].startswith("OK watching")
    conn.protocol.pauseProducing()
    for i in range(10):
        conn.store.put(f"b/{i}", "y" * 1500)
    assert conn.protocol._backlog_bytes <= 5000
    conn.protocol.resumeProducing()
    assert conn.take()[-1].startswith("ERR slow_consumer 12 ")


# For people at a telnet prompt


def test_set_of_unquoted_text_with_spaces_says_to_quote_it():
    """SET greeting hello world is refused (nothing stored) with the usage
    and how to quote a value that holds spaces; quoted, it is stored."""
    conn = Line()
    (line,) = conn.send("SET greeting hello world")
    assert error(line) == ("wrong_arguments", -32602)
    assert 'SET greeting "hello world"' in line and "quoted" in line
    (line,) = conn.send("SET greeting hello big world")
    assert error(line) == ("invalid_argument", 5) and "quoted" in line
    assert conn.store.get("greeting") is None
    assert conn.send('SET greeting "hello world"') == ["OK 1 1"]
    assert conn.store.load("greeting") == "hello world"


@pytest.mark.parametrize("every", ["*", '""'])
def test_star_and_empty_string_mean_every_key(every):
    """KEYS * 2 and KEYS "" 2 list every key up to the limit (the way to give
    a limit without a prefix); LIST, CHANGES and WATCH take them too."""
    conn = Line()
    for key in ("a/1", "b/2", "c/3"):
        conn.put(key, 1)
    assert conn.send(f"KEYS {every} 2") == ["KEY a/1", "KEY b/2", "END 3 2 more"]
    assert [line.split()[1] for line in conn.send(f"LIST {every}")[:-1]] == ["a/1", "b/2",
                                                                             "c/3"]
    assert conn.send(f"CHANGES 2 {every}")[-1] == "END 3 1"
    assert conn.send(f"WATCH {every}") == ["OK watching 1 * 3"]
    conn.put("z/9", 2)
    assert conn.take()[0].startswith("EVENT 1 put z/9 4 ")
    conn.send("UNWATCH")
    conn.put("*literal", 1)
    assert conn.send("KEYS *l") == ["KEY *literal", "END 5 1"]  # only a lone * is special


def test_ttl_says_the_seconds_a_key_has_left():
    """TTL key answers the seconds left, rounded up, as Redis's TTL does; -1
    for a key without a time to live; NIL for an absent key."""
    conn = Line()
    assert conn.send("SET t/k 1 EX 30") == ["OK 1 1"]
    assert conn.send("TTL t/k") == ["TTL t/k 30"]
    conn.clock.advance(10.5)
    assert conn.send("TTL t/k") == ["TTL t/k 20"]
    assert conn.send("SET t/forever 1") == ["OK 2 1"]
    assert conn.send("TTL t/forever") == ["TTL t/forever -1"]
    assert conn.send("TTL t/none") == ["NIL t/none"]
    conn.clock.advance(20)
    assert conn.send("TTL t/k") == ["NIL t/k"]
    assert error(conn.send("TTL")[0]) == ("wrong_arguments", -32602)


def test_partial_lines_of_all_connections_share_one_budget():
    """A partial line that does not fit in --max-buffer-bytes beside the
    others is skipped with ERR limit_exceeded; the connection goes on, and
    the budget is whole again once the lines are done."""
    conn = Line(max_buffer_bytes=1000)
    other_transport, other = conn.connect()
    other_transport.clear()
    conn.feed(b"SET a " + b"x" * 700)
    other.dataReceived(b"SET b " + b"y" * 500)
    (line,) = other_transport.value().decode().splitlines()
    assert error(line) == ("limit_exceeded", 9) and "--max-buffer-bytes" in line
    other.dataReceived(b"yyy\r\nPING still\r\n")
    assert other_transport.value().endswith(b"PONG still\r\n")
    conn.feed(b"\r\n")
    assert conn.take() == ["OK 1 1"]
    assert conn.store.budget.held == 0


def test_watch_backlogs_of_all_connections_share_one_budget():
    """Events held for watchers that do not read count against the budget
    for all connections: past it a watcher's watches end with
    slow_consumer naming --max-buffer-bytes."""
    conn = Line(max_buffer_bytes=2000)
    assert conn.send("WATCH b/")[0].startswith("OK watching")
    conn.protocol.pauseProducing()
    for i in range(30):
        conn.store.put(f"b/{i}", "v" * 50)
    conn.protocol.resumeProducing()
    lines = conn.take()
    assert lines[-1].startswith("ERR slow_consumer 12 ") and "--max-buffer-bytes" in lines[-1]
    assert conn.store.budget.held == 0


def test_requests_waiting_beyond_the_budget_stop_the_client_being_read(tmp_path):
    """Commands queued behind a pending write that the budget cannot hold
    leave the client unread (backpressure) until they are answered."""
    conn = Line("sqlite", tmp_path, max_buffer_bytes=600)
    conn.feed(b"SET r/k 1\r\n" + (b"PING " + b"x" * 100 + b"\r\n") * 40)
    assert conn.protocol.session.backlogged and conn.protocol.session.queued < 40
    assert conn.transport.producerState == "paused"
    for _ in range(10):
        conn.clock.advance(0)
    assert conn.transport.producerState == "producing"
    assert len(conn.take()) == 41
    assert conn.store.budget.held == 0


def test_a_long_lines_memory_is_let_go():
    """The input buffer a 500 KB line grew is replaced once the line is done."""
    conn = Line()
    conn.feed(b"PING " + b"x" * 500_000)
    assert conn.protocol._buffer.__sizeof__() > 500_000
    conn.feed(b"\r\n")
    assert conn.protocol._buffer.__sizeof__() < 65536


# Listings: pages, and replies written as the client reads them


def test_keys_and_list_are_paged_with_after():
    """KEYS/LIST give one page (limit, and at most max_list_items); END says
    more; the next page starts after the last key shown."""
    conn = Line(max_list_items=3)
    for i in range(5):
        conn.put(f"p/{i}", i)
    assert conn.send("KEYS p/") == ["KEY p/0", "KEY p/1", "KEY p/2", "END 5 3 more"]
    assert conn.send("KEYS p/ 100 p/2") == ["KEY p/3", "KEY p/4", "END 5 2"]
    assert conn.send("KEYS p/ 1 p/3") == ["KEY p/4", "END 5 1"]
    assert [line.split()[1] for line in conn.send("LIST * 2 p/0")[:-1]] == ["p/1", "p/2"]
    assert conn.send("LIST * 2 p/0")[-1] == "END 5 2 more"
    assert error(conn.send("KEYS p/ 2 bad\x7fkey")[0]) == ("invalid_key", 1)


def test_a_page_stops_at_max_reply_bytes_but_holds_one_key():
    conn = Line(max_reply_bytes=250, max_value_bytes=400, max_line_bytes=2000)
    for i in range(4):
        conn.put(f"b/{i}", "x" * 100)
    lines = conn.send("LIST b/")
    assert lines[-1] == "END 4 2 more" and len(lines) == 3
    conn.put("c/big", "y" * 300)
    assert conn.send("LIST c/")[-1] == "END 5 1"


def test_a_listing_is_written_as_the_client_reads_it():
    """A long LIST is not formatted whole: while the client does not read
    (the transport pauses the protocol) at most a slice more is written;
    reading resumes it; the next command's reply and any watch event come
    after its END, nothing lost."""
    conn = Line()
    for i in range(3000):
        conn.put(f"s/{i:05d}", "v" * 40)
    assert conn.send("WATCH w/")[0].startswith("OK watching")
    written = []

    class PausingTransport:
        """Pauses its producer after each write, as a full socket buffer does."""

        def __init__(self, real):
            self.real = real

        def write(self, data):
            written.append(len(data))
            self.real.write(data)
            conn.protocol.pauseProducing()

        def __getattr__(self, name):
            return getattr(self.real, name)

    conn.protocol.transport = PausingTransport(conn.transport)
    conn.feed(b"LIST s/\r\nPING after\r\n")
    assert len(written) == 1 and written[0] < 100_000
    conn.put("w/x", 1)  # an event while the listing is under way
    for _ in range(1000):
        if conn.protocol._stream is None:
            break
        conn.protocol.resumeProducing()
    conn.protocol.transport = conn.transport
    conn.protocol.resumeProducing()
    lines = conn.take()
    end = lines.index("END 3000 3000")
    assert [line.split()[1] for line in lines[:end]] == [f"s/{i:05d}" for i in range(3000)]
    # The event, held during the listing, goes out at its END; PING is read
    # only once the listing is out.
    assert lines[end + 1:] == ["EVENT 1 put w/x 3001 1 3001 - 1", "PONG after"]
    assert max(written) < 100_000 and len(written) > 5
