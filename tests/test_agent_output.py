"""The agent's file output on a Clock: debounce, atomic writes, reloads and
the last known-good file."""

from __future__ import annotations

import json
import os
import stat

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent

from kvconfig.agentoutput import EventPrinter, FileOutput, render
from kvconfig.agentstate import Change, LocalCopy


class Reloads:
    """A reload command that answers when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.contents: list[bytes] = []
        self.path = None

    def __call__(self, command: str) -> Deferred:
        with open(self.path, "rb") as f:
            self.contents.append(f.read())
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def finish(self, failure: str | None = None) -> None:
        self.pending.pop(0).callback(failure)


def output(tmp_path, command="reload", **options):
    clock = Clock()
    reloads = Reloads()
    path = str(tmp_path / "config.json")
    reloads.path = path
    out = FileOutput(path, clock, command, run=reloads, **options)
    return clock, out, reloads, path


def change(local_copy: LocalCopy, out: FileOutput, key: str, value) -> None:
    local_copy.revision += 1
    out.copy_changed(local_copy, [local_copy.put(key, value, local_copy.revision)])


def good_then_bad(clock: Clock, out: FileOutput, reloads: Reloads) -> LocalCopy:
    """A change whose reload succeeds, then one whose reload is running."""
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", "good")
    clock.advance(1)
    reloads.finish()
    change(local_copy, out, "app/a", "bad")
    clock.advance(1)
    return local_copy


def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_a_burst_is_one_write_and_one_reload(tmp_path):
    clock, out, reloads, path = output(tmp_path, debounce=0.2, max_delay=2.0)
    local_copy = LocalCopy()
    for n in range(10):
        change(local_copy, out, "app/n", n)
        clock.advance(0.05)
    assert not os.path.exists(path)
    clock.advance(0.2)
    assert read(path) == {"app/n": 9}
    assert out.counters["writes"] == 1
    assert len(reloads.pending) == 1
    assert reloads.contents == [render({"app/n": 9})]


def test_a_long_burst_is_written_after_max_delay(tmp_path):
    clock, out, reloads, path = output(tmp_path, debounce=0.2, max_delay=1.0)
    local_copy = LocalCopy()
    for n in range(20):
        change(local_copy, out, "app/n", n)
        clock.advance(0.1)
    # Changes never stopped for 0.2 s, yet the file was written within 1 s.
    assert out.counters["writes"] >= 1
    assert out.counters["writes"] <= 3


def test_unchanged_content_is_not_written(tmp_path):
    clock, out, reloads, path = output(tmp_path)
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", 1)
    clock.advance(1)
    reloads.finish()
    mtime = os.stat(path).st_mtime_ns
    change(local_copy, out, "app/a", 2)
    change(local_copy, out, "app/a", 1)     # back to what is on disk
    clock.advance(1)
    assert out.counters["writes"] == 1
    assert os.stat(path).st_mtime_ns == mtime
    assert not reloads.pending


def test_failed_reload_restores_the_last_known_good_file(tmp_path):
    clock, out, reloads, path = output(tmp_path)
    local_copy = good_then_bad(clock, out, reloads)
    assert read(path) == {"app/a": "bad"}      # the command reads the new file
    reloads.finish("exit status 1")
    assert read(path) == {"app/a": "good"}
    assert out.counters["restores"] == 1
    # The failed content is not retried by itself ...
    clock.advance(10)
    assert not reloads.pending
    # ... but the next change is written and reloaded.
    change(local_copy, out, "app/a", "fixed")
    clock.advance(1)
    assert read(path) == {"app/a": "fixed"}
    reloads.finish()
    assert out.known_good == render({"app/a": "fixed"})


def test_the_file_found_at_start_is_known_good(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"app/a": "old"}\n')
    clock, out, reloads, _ = output(tmp_path)
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", "new")
    clock.advance(1)
    reloads.finish("killed by signal 9")
    assert path.read_bytes() == b'{"app/a": "old"}\n'


def test_changes_during_a_reload_wait_for_it(tmp_path):
    clock, out, reloads, path = output(tmp_path)
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", 1)
    clock.advance(1)
    change(local_copy, out, "app/a", 2)
    clock.advance(1)
    # One reload at a time: the second write waits for the first reload.
    assert len(reloads.pending) == 1 and read(path) == {"app/a": 1}
    reloads.finish()
    assert read(path) == {"app/a": 2}
    assert len(reloads.pending) == 1


def test_writes_are_atomic_and_keep_the_file_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"{}\n")
    os.chmod(path, 0o640)
    clock, out, reloads, _ = output(tmp_path, command=None)
    inode = os.stat(path).st_ino
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", {"$bytes": "AA=="})
    clock.advance(1)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.stat(path).st_ino != inode            # renamed over, not rewritten
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left
    assert read(path) == {"app/a": {"$bytes": "AA=="}}


def test_the_first_snapshot_is_written_even_when_empty(tmp_path):
    clock, out, reloads, path = output(tmp_path, command=None)
    out.copy_changed(LocalCopy({}, 7), [])
    clock.advance(1)
    assert read(path) == {}


def test_event_printer_prints_json_lines_and_stops_after_count(tmp_path):
    import io

    lines = io.StringIO()
    done = []
    printer = EventPrinter(lines, count=2, done=lambda: done.append(True))
    printer.copy_changed(LocalCopy(), [Change("put", "app/a", 3, {"x": 1}),
                                      Change("delete", "app/b", 4)])
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == [
        {"op": "put", "key": "app/a", "revision": 3, "value": {"x": 1}},
        {"op": "delete", "key": "app/b", "revision": 4}]
    assert done == [True]


def errors(events: list[dict]) -> list[dict]:
    return [event for event in events if event["log_level"] == LogLevel.error]


def test_a_write_that_fails_is_one_error_per_attempt_retried_with_backoff(tmp_path):
    """The directory goes away: each attempt is one error event (not a
    failure with a traceback), attempts back off 1, 2, 4 ... seconds, changes
    in between do not add attempts, and the latest content is written once
    the directory is back."""
    directory = tmp_path / "out"
    directory.mkdir()
    clock = Clock()
    out = FileOutput(str(directory / "config.json"), clock, None, debounce=0.1)
    events: list[dict] = []
    out.log = Logger(observer=events.append)
    directory.rmdir()
    local_copy = LocalCopy()
    change(local_copy, out, "app/a", 1)
    attempts = []
    while clock.seconds() < 8:
        clock.advance(min(call.getTime() for call in clock.getDelayedCalls())
                      - clock.seconds())
        if len(errors(events)) > len(attempts):
            attempts.append(round(clock.seconds(), 2))
            change(local_copy, out, "app/a", len(attempts) + 1)    # no extra attempt
    assert attempts == [0.1, 1.1, 3.1, 7.1, 15.1]
    assert errors(events) == events and not [e for e in events if "log_failure" in e]
    assert "No such file or directory" in formatEvent(events[0])
    directory.mkdir()
    clock.advance(15.9)
    assert not os.path.exists(directory / "config.json")    # the backoff holds
    clock.advance(0.1)
    assert read(directory / "config.json") == {"app/a": 6}
    assert out.counters["writes"] == 1 and len(errors(events)) == 5
    # Written: the next failure starts from the first delay again.
    change(local_copy, out, "app/a", 7)
    (directory / "config.json").unlink()
    directory.rmdir()
    clock.advance(0.1)
    clock.advance(1)
    assert len(errors(events)) == 7


def test_a_restore_that_fails_is_one_error_line(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    clock, out, reloads, path = output(directory)
    events: list[dict] = []
    out.log = Logger(observer=events.append)
    good_then_bad(clock, out, reloads)
    os.unlink(path)
    directory.rmdir()
    reloads.finish("exit status 1")
    failed = [formatEvent(e) for e in errors(events)]
    assert len(failed) == 1 and "cannot restore the last known-good" in failed[0]
    assert out.counters["restores"] == 0


def test_event_printer_stops_at_count_across_batches():
    """Events of one revision come in several batches (one per datagram):
    with count=1 the first is printed and nothing after it."""
    import io

    lines = io.StringIO()
    done = []
    printer = EventPrinter(lines, count=1, done=lambda: done.append(True))
    for key in ("app/a", "app/b", "app/c"):
        printer.copy_changed(LocalCopy(), [Change("put", key, 5, 1)])
    assert [json.loads(line)["key"] for line in lines.getvalue().splitlines()] == ["app/a"]
    assert done == [True]
