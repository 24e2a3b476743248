"""
What the kvconfig agent does with its copy: the listeners it hands each
batch of changes to.

FileOutput writes the prefix as one JSON file (atomically, debounced) and
runs a reload command, restoring the last known-good file when the command
fails; a write that fails is logged and retried, backing off.  ChangeLogger
logs each change; EventPrinter prints each as a JSON line, for the
``kvconfig-agent`` command.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvconfig.agentstate import Backoff, Change, LocalCopy


def render(items: dict[str, Any]) -> bytes:
    """The output file's content: the prefix as one JSON object, keys sorted."""
    return (json.dumps(items, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def output_problem(path: str) -> str | None:
    """Why the agent could not keep its file at *path*, or None: its
    directory is missing or not writable, or *path* is not a file it can
    read and replace."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        return f"the directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable"
    if os.path.isdir(path):
        return f"{path} is a directory"
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return f"{path} cannot be read"
    return None


def write_atomically(path: str, content: bytes) -> None:
    """Replace *path* with *content*: a temporary file in the same directory,
    fsync, rename, fsync of the directory.  Readers see the old file or the
    new one, never a mix; the file keeps its permissions (0644 if new)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".kvconfig-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


class _CommandProtocol(ProcessProtocol):
    log = Logger()

    def __init__(self, done: Deferred, command: str) -> None:
        self.done, self.command = done, command

    def outReceived(self, data: bytes) -> None:
        self.log.info("{command}: {output}", command=self.command,
                      output=data.decode("utf-8", "replace").rstrip())

    errReceived = outReceived

    def processExited(self, reason: Failure) -> None:
        # Exited, not ended: a daemon the command started may hold its
        # output pipes open long after.  A Failure handed to callback()
        # would go down the errback chain, hence the list.
        self.done.callback([reason])


def run_command(reactor: Any, command: str, timeout: float) -> Deferred:
    """Run *command* with /bin/sh; fires with None on success, or a text
    saying how it failed (exit status, signal, timeout)."""
    ended: Deferred = Deferred()
    process = reactor.spawnProcess(_CommandProtocol(ended, command), "/bin/sh",
                                   ["/bin/sh", "-c", command], env=dict(os.environ))
    timed_out = []

    def kill(sig: str) -> None:
        timed_out.append(True)
        try:
            process.signalProcess(sig)
        except Exception:
            pass

    term = reactor.callLater(timeout, kill, "TERM")
    hard = reactor.callLater(timeout + 5, kill, "KILL")

    def result(ended_with: list[Failure]) -> str | None:
        reason = ended_with[0]
        for call in (term, hard):
            if call.active():
                call.cancel()
        if timed_out:
            return f"timed out after {timeout} s"
        if reason.check(ProcessDone):
            return None
        return reason.getErrorMessage()

    return ended.addCallback(result)


class FileOutput:
    """Writes the local copy to a file, debounced, and runs a reload command.

    A burst of changes makes one write and one reload: the write waits until
    no change has come for *debounce* seconds, but never more than
    *max_delay* after the first.  Nothing is written when the content is
    unchanged.  If the reload command fails the last known-good file (the
    one the last successful reload read, or the file found at start) is put
    back and the failure logged.  A write that fails (the directory went
    away, the disk is full) is one error line, and is tried again after
    ``retry_first`` seconds, then twice as long each time up to
    ``retry_max``, with the latest content.
    """

    log = Logger()
    retry_first, retry_max = 1.0, 30.0

    def __init__(self, path: str, clock: IReactorTime, command: str | None = None,
                 debounce: float = 0.2, max_delay: float = 2.0,
                 run: Callable[[str], Deferred] | None = None) -> None:
        self.path, self.clock, self.command = path, clock, command
        self.debounce, self.max_delay = debounce, max_delay
        self.run = run
        self.counters = dict.fromkeys(("writes", "reloads", "reload_failures",
                                       "restores"), 0)
        try:
            with open(path, "rb") as f:
                self.known_good: bytes | None = f.read()
        except FileNotFoundError:
            self.known_good = None
        self.written = self.known_good
        self._items: dict[str, Any] | None = None
        self._first_change_at: float | None = None
        self._timer = None
        self._retry = None
        self._retry_delay = Backoff(self.retry_first, self.retry_max)
        self._reloading = False
        self._failed: bytes | None = None
        self.synced = False
        #: The copy's revision when it last changed, and the one the file
        #: last held after a good write (and reload).
        self._revision = 0
        self.applied_revision = 0

    def copy_changed(self, local_copy: LocalCopy, changes: list[Change]) -> None:
        if not changes and self.synced:
            return
        self.synced = True
        self._items = dict(local_copy.items)
        self._revision = local_copy.revision
        if self._retry is not None and self._retry.active():
            return      # the retry writes the latest items, when its backoff is over
        now = self.clock.seconds()
        if self._first_change_at is None:
            self._first_change_at = now
        delay = min(self.debounce, self._first_change_at + self.max_delay - now)
        if self._timer is not None and self._timer.active():
            self._timer.reset(max(delay, 0))
        else:
            self._timer = self.clock.callLater(max(delay, 0), self.flush)

    def flush(self) -> None:
        if self._reloading:
            return      # flushed again when the reload ends
        self._first_change_at = None
        if self._items is None:
            return
        content = render(self._items)
        revision = self._revision
        if content == self.written:
            self.applied_revision = revision
            return
        if content == self._failed:
            return
        try:
            write_atomically(self.path, content)
        except OSError as e:
            delay = self._retry_delay.next()
            self.log.error("cannot write {path}: {error}; trying again in {delay:.0f} s",
                           path=self.path, error=e.strerror or e, delay=delay)
            self._retry = self.clock.callLater(delay, self.flush)
            return
        self._retry_delay.reset()
        self.written = content
        self.counters["writes"] += 1
        self.log.info("wrote {path} ({size} bytes)", path=self.path, size=len(content))
        if not self.command or self.run is None:
            self.known_good = content
            self.applied_revision = revision
            return
        self._reloading = True
        self.counters["reloads"] += 1
        try:
            running = self.run(self.command)
        except Exception as e:      # fork failed: EAGAIN, ENOMEM ...
            self._reloaded(f"cannot run it: {e}", content, revision)
            return
        running.addErrback(lambda failure: failure.getErrorMessage())
        running.addCallback(self._reloaded, content, revision)

    def applied(self, local_copy: LocalCopy) -> int:
        """The revision the file holds: the copy's own while nothing waits to
        be written (and the last reload did not fail), else the copy's
        revision at the last good write."""
        waiting = any(call is not None and call.active() for call in (self._timer, self._retry))
        if self.synced and not waiting and not self._reloading and self._failed is None:
            return local_copy.revision
        return self.applied_revision

    def _reloaded(self, failure: str | None, content: bytes, revision: int) -> None:
        self._reloading = False
        if failure is None:
            self.known_good = content
            self.applied_revision = revision
            self._failed = None
        else:
            self._failed = content
            self.counters["reload_failures"] += 1
            if self.known_good is None:
                self.log.error("reload command {command!r} failed ({failure}); there is no "
                               "known-good {path} to restore, keeping the new one",
                               command=self.command, failure=failure, path=self.path)
            else:
                try:
                    write_atomically(self.path, self.known_good)
                except OSError as e:
                    self.log.error("reload command {command!r} failed ({failure}); cannot "
                                   "restore the last known-good {path}: {error}",
                                   command=self.command, failure=failure, path=self.path,
                                   error=e.strerror or e)
                else:
                    self.written = self.known_good
                    self.counters["restores"] += 1
                    self.log.error("reload command {command!r} failed ({failure}); restored "
                                   "the last known-good {path}", command=self.command,
                                   failure=failure, path=self.path)
        self.flush()    # changes that came during the reload


class ChangeLogger:
    """Logs each change: the agent's listener without --output."""

    log = Logger()

    def copy_changed(self, local_copy: LocalCopy, changes: list[Change]) -> None:
        for change in changes:
            self.log.info("{op} {key} at revision {revision}: {value!r}", op=change.op,
                          key=change.key, revision=change.revision, value=change.value)


class EventPrinter:
    """Prints each change as a JSON line, for watching from a terminal; with
    *count*, that many and no more, then calls *done*."""

    def __init__(self, out=None, count: int | None = None,
                 done: Callable[[], None] | None = None) -> None:
        self.out = out or sys.stdout
        self.remaining = count
        self.done = done

    def copy_changed(self, local_copy: LocalCopy, changes: list[Change]) -> None:
        for change in changes:
            if self.remaining == 0:
                return      # done; changes that come before the exit are not printed
            line = {"op": change.op, "key": change.key, "revision": change.revision}
            if change.op == "put":
                line["value"] = change.value
            self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.out.flush()
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining == 0 and self.done is not None:
                    self.done()

