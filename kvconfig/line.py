"""
The line protocol: kvconfig for people at a telnet prompt and for scripts.

Wire protocol
=============

TCP, default endpoint ``tcp:15001:interface=127.0.0.1``.  On connecting the
server greets::

    HELLO kvconfig <version> revision <revision> - type HELP for commands

Requests are one command per line, ended by LF or CRLF; words are separated
by spaces and tabs, command names are case-insensitive, blank lines are
ignored, and commands may be pipelined: replies come back in request order.

Values are JSON.  A value that is not JSON and does not start with ``{``,
``[`` or ``"`` is a bare word, read as a string (``SET name Guido``).  Bytes
and datetimes use kvconfig's tagged JSON (``{"$bytes": "<base64>"}``,
``{"$datetime": "YYYYMMDDTHH:MM:SS"}``; a one-key dict whose key starts with
``$`` is written ``{"$dict": {...}}``), which is also how they are shown.

Commands::

    GET key                           VALUE <key> <mod_revision> <version>
                                            <create_revision> <expires_at|-> <json>
                                      or NIL <key>
    SET key value [EX sec] [IF rev]   OK <revision> <version>
    TTL key                           TTL <key> <seconds left, rounded up | -1>
                                      or NIL <key>
    DEL key [IF rev]                  OK <revision> deleted | OK <revision> absent
    KEYS [prefix [limit [after]]]     KEY <key> ... END <revision> <count> [more]
    LIST [prefix [limit [after]]]     VALUE ... END <revision> <count> [more]
    CHANGES since [prefix]            CHANGE ... END <revision> <count>
    WATCH [prefix [from]]             OK watching <id> <prefix|*> <revision>,
                                      then EVENT <id> ... lines as changes happen
    UNWATCH [id]                      OK <number of watches ended>
    SUBSCRIBE port [prefix]           OK subscribed <sub> <seq> <rev> <head> <lease>
                                            <heartbeat>
    UNSUBSCRIBE port [prefix]         OK 1 | OK 0
    STATS                             STAT <name> <json> ... END
    PING [text]                       PONG [text]
    HELP [command]                    HELP <text> ... END
    QUIT                              OK bye, then the server closes

``EX`` gives the key a time to live in seconds; ``IF`` makes the write a
compare-and-set on the key's mod_revision (``IF 0``: only if absent).  A
value holding spaces is quoted as a JSON string (``SET greeting "hello
world"``).  ``TTL`` answers ``-1`` for a key without a time to live (in
cluster mode, also for one whose lease only etcd knows).  A prefix of ``*``
or ``""`` means every key, so ``KEYS * 10`` lists the first ten keys.

``KEYS`` and ``LIST`` answer one page: at most ``limit`` keys (default and
most: ``--max-list-items``) and, past the first, ``--max-reply-bytes`` of
keys and values.  ``END ... more`` says keys follow: the next page starts
after the last key shown (``KEYS app/ 100 app/k099``).  Each page is a
snapshot at its own revision; follow with ``CHANGES`` from the first page's.
Listings are written as the client reads them, never held whole.
``CHANGES`` lists changes after revision ``since``; ``WATCH ... from`` first
replays the changes from revision ``from`` on (etcd's start revision), then
streams live ones.  ``expires_at`` is a Unix time.

``SUBSCRIBE`` makes (or renews the lease of) a UDP subscription to
``prefix`` (default: every key) for this connection's peer host at UDP
``port``: notifications then arrive as datagrams (kvconfig.udpwire's wire
format), not on this connection, and outlive it until the lease runs out.
The reply gives the subscription's name, its last sequence number and event
revision, the store's revision, the lease and the heartbeat interval in
seconds; renew by subscribing again well within the lease.  ``UNSUBSCRIBE``
answers ``OK 1``, or ``OK 0`` if there was no such subscription.  A server
without a notifier answers both with ``ERR unavailable``.

In cluster mode (an etcd store), while the node is out of touch with etcd
its listings come from its own copy, which may lag: their END line then
reads ``END <revision> <count> [more] stale``, and ``STATS`` says ``stale
true``.
(A GET reply has no room for the word; ask STATS.)

Every reply line starts with a status word: ``OK``, ``ERR``, ``VALUE``,
``NIL``, ``TTL``, ``KEY``, ``CHANGE``, ``STAT``, ``HELP``, ``PONG``, ``END``,
``HELLO`` - or ``EVENT`` for a watch notification, which may come between
two replies but never inside a multi-line one.  Change lines read::

    CHANGE put <key> <revision> <version> <create_revision> <expires_at|-> <json>
    CHANGE delete <key> <revision> <deleted|expired>
    EVENT <id> put ...   / EVENT <id> delete ...      (the same fields)

Errors are one line, ``ERR <name> <code> <message>``, with the names and
codes of kvconfig.errors (the XML-RPC Fault codes); the connection stays
usable.  A line longer than ``--max-line-bytes`` gets ``ERR
request_too_large`` and is skipped up to its newline without being kept.

Telnet's commands (bytes from 0xff on, which UTF-8 never holds) are taken
out of the input and answered as kvconfig.telnet says: a telnet client's
Ctrl-C discards the line typed so far and its timing mark is answered, so
the session goes on.

A watcher that does not read fast enough is not buffered for without bound:
while its connection's send buffer is full, events wait in a queue of at
most ``--max-watch-backlog`` events and ``--max-watch-backlog-bytes``; past
that its watches end with ``ERR slow_consumer`` (counted in STATS) and it
can WATCH again from the revision it last saw.  A client that pipelines
faster than its writes commit is not read further until its queued commands
are answered.  Connections with a watch are exempt from the idle timeout.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from kvconfig import __version__, errors, values
from kvconfig.limits import Limits
from kvconfig.model import DELETE, PUT, Absent, Event, KeyValue
from kvconfig.session import LATER, Deadline, Session, Sessions, budget_full, is_deferred
from kvconfig.store import Store, outcome_of
from kvconfig.subscriptions import Subscriptions
from kvconfig.telnet import ERASE_CHAR, ERASE_LINE, TelnetFilter


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: NaN and Infinity are bare words, not numbers.
_decoder = json.JSONDecoder(parse_constant=_no_constants)
_WORD_SEPARATORS = re.compile(r"[ \t]+")
_SEPARATOR = re.compile(r"[ \t]")
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# Formatting


def value_line(kv: KeyValue) -> bytes:
    expires = "-" if kv.expires_at is None else repr(kv.expires_at)
    return b"VALUE %s %d %d %d %s %s" % (
        kv.key.encode(), kv.mod_revision, kv.version, kv.create_revision,
        expires.encode(), kv.raw,
    )


def change_fields(event: Event) -> bytes:
    if event.kv is None:
        return b"delete %s %d %s" % (event.key.encode(), event.revision,
                                     b"expired" if event.expired else b"deleted")
    return b"put " + value_line(event.kv)[6:]


def error_line(error: errors.KVConfigError) -> bytes:
    message = " ".join(error.message.split())  # one line, whatever it quotes
    return b"ERR %s %d %s" % (error.name.encode(), error.code, message.encode())


# Parsing


def split_words(text: str, most: int = 0) -> list[str]:
    """*text* split at runs of spaces and tabs (the grammar's only separators)."""
    text = text.strip(" \t")
    return _WORD_SEPARATORS.split(text, most) if text else []


#: What a JSON value starts with; any other first character is a bare word,
#: taken without asking the JSON decoder (whose error costs more than the
#: rest of the command).
_JSON_START = frozenset('{["-0123456789tfn')


def parse_value(text: str) -> tuple[Any, str]:
    """(value, rest of the line) from the start of *text*."""
    if text[:1] not in _JSON_START:
        end = _SEPARATOR.search(text)
        if end is None:
            return text, ""
        return text[:end.start()], text[end.start():]
    try:
        data, end = _decoder.raw_decode(text)
    except ValueError:
        data, end = None, -1
    except RecursionError:
        raise errors.InvalidValue("value is nested too deeply") from None
    if end >= 0 and (end == len(text) or text[end] in " \t"):
        try:
            return values.from_tagged(data), text[end:]
        except RecursionError:
            raise errors.InvalidValue("value is nested too deeply") from None
    if text[:1] in ('{', '[', '"'):
        raise errors.InvalidValue(f"value is not valid JSON: {errors.brief(text)}")
    word, *rest = split_words(text, 1)
    return word, rest[0] if rest else ""


def parse_prefix(word: str) -> str:
    """A prefix word: ``*`` and ``""`` (the empty JSON string) mean every key;
    any other word is the prefix itself."""
    return "" if word in ("*", '""') else word


def parse_int(text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise errors.InvalidArgument(f"{what} must be an integer, not {errors.brief(text)}") \
            from None


def parse_number(text: str, what: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise errors.InvalidArgument(f"{what} must be a number, not {errors.brief(text)}") \
            from None
    return int(number) if number.is_integer() else number


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    least: int
    most: int
    raw_rest: bool = False  # SET: the value is parsed from the raw text
    writes: bool = False    # changes the store
    #: LineProtocol's do_<name>, which runs it.
    run: Callable[..., Any] | None = None
    #: A read of one key, answered at once from memory (GET, TTL).
    quick: bool = False


#: An empty input buffer larger than this is replaced, so that memory taken
#: by one long line returns.
_KEPT_BUFFER_BYTES = 1 << 16
#: Lines of a streamed reply formatted at a time.
_STREAM_SLICE = 256


#: Consecutive writes made as one run at most: a run's answer waits for its
#: last write, and holds that many replies.
_MAX_RUN = 256

#: A write as the session takes it: (PUT or DELETE, key, value, prev, ttl).
Write = tuple[str, str, Any, "int | None", "float | None"]


#: The place of a write's reply among a run's, until its outcome comes.
_PLACE = object()


class Replies(list):
    """The replies of a run of commands, in order: a line each, or the
    KVConfigError it failed with."""

    __slots__ = ()


class Streamed:
    """A reply (a listing) written as the client reads it, line by line."""

    __slots__ = ("lines",)

    def __init__(self, lines: Iterable[bytes]) -> None:
        self.lines = lines


def _raiser(error: errors.KVConfigError) -> Callable[[], Any]:
    """An operation that fails with *error*: an error answered in its turn."""
    def operation() -> Any:
        raise error
    return operation


class LineProtocol(Protocol, TimeoutMixin):
    """One connection: parse lines, hand each command to the client's
    session, write the answers as they come (in request order), stream
    watch events between them."""

    log = Logger()

    def __init__(self, factory: LineFactory, session: Session) -> None:
        self.factory = factory
        self.session = session
        #: Writes read and not yet handed to the session, and their bytes.
        self._run: list[tuple[Command, str]] = []
        self._run_bytes = 0
        self.limits = factory.limits
        self.callLater = factory.clock.callLater
        self._buffer = bytearray()
        self._line_deadline = Deadline(factory.clock, factory.limits.request_timeout,
                                       self._line_too_slow)
        self._telnet = TelnetFilter()
        self._discarding = False
        self._held = False                     # reading stopped: session backlogged
        self._line_held = 0                    # budget bytes held for a partial line
        self._out: list[bytes] | None = None   # replies of the lines being read
        self._out_bytes = 0
        self._backlog: deque[bytes] = deque()  # watch events not yet written
        self._backlog_bytes = 0
        self._paused = False
        self._closing = False
        self._stream: Iterator[bytes] | None = None  # the reply being streamed

    # Connection life

    def connectionMade(self) -> None:
        self.session.connected_from(self.transport.getPeer())
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.setTimeout(self.limits.idle_timeout)
        self._write_lines([b"HELLO kvconfig %s revision %d - type HELP for commands"
                           % (__version__.encode(), self.factory.store.revision)])

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        self._line_deadline.stop()
        self.session.close()
        # This protocol and its transport refer to each other, so they are
        # freed only by a collection of cycles, which a quiet server may not
        # run for a long while: what they hold goes now, as the budget given
        # back (session.close) says it has.
        self._backlog.clear()
        self._buffer = bytearray()
        self._stream = None

    def timeoutConnection(self) -> None:
        if self.session.watching:
            # Watching connections are expected to be quiet.  (The timer has
            # fired, so it is set anew rather than reset.)
            self.setTimeout(self.limits.idle_timeout)
            return
        self._write_lines([error_line(errors.LimitExceeded(
            f"idle for {self.limits.idle_timeout} s; closing"))])
        self.transport.loseConnection()

    # IPushProducer for our own transport: paused when the client stops
    # reading.  Then we stop reading its commands and hold its events.

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()
        if self._stream is not None:
            return  # paused again within the streamed reply
        self._flush_backlog()
        if not self._paused and not self._held:
            self.transport.resumeProducing()
            self._process()

    def stopProducing(self) -> None:
        self.session.unwatch()

    # Reading

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        telnet = self._telnet
        if telnet.plain and b"\xff" not in data:
            self._buffer += data
        else:
            self._telnet_input(*telnet.feed(data))
        self._process()

    def _telnet_input(self, parts: list[bytes | str], answer: bytes) -> None:
        """Data with telnet's commands taken out (kvconfig.telnet), and its
        answers to them, which go out at once: a client waiting for its
        timing mark shows nothing until it comes."""
        if answer:
            self.transport.write(answer)
        buffer = self._buffer
        for part in parts:
            if part is ERASE_LINE:
                del buffer[buffer.rfind(b"\n") + 1:]
            elif part is ERASE_CHAR:
                if buffer and buffer[-1:] != b"\n":
                    del buffer[-1:]
            else:
                buffer += part

    def _process(self) -> None:
        # Replies to what is read now leave together, a write per 64 KiB, so
        # that the transport can still pause us (a client not reading).
        self._out = []
        try:
            self._read_lines()
        finally:
            self._flush_out()
            self._out = None
        buffer = self._buffer
        if buffer:
            if self.session.backlogged and not self._held:
                # Too many commands wait behind a pending write: stop reading
                # until they are answered (_answered resumes).
                self._held = True
                self.transport.pauseProducing()
            # A line trickling in a byte at a time (slowloris) has
            # --request-timeout to be complete; the idle timer restarts
            # with every byte.
            if b"\n" not in buffer:
                self._line_deadline.start()
        else:
            if self._line_held:
                self.session.hold("line", 0)
                self._line_held = 0
            if buffer.__sizeof__() > _KEPT_BUFFER_BYTES:
                # A bytearray keeps its largest size: let a spike's go.
                self._buffer = bytearray()
            if self._discarding:  # an over-long line still coming
                self._line_deadline.start()
            else:
                self._line_deadline.stop()
        if self._closing:
            self._close_if_done()

    def _line_too_slow(self) -> None:
        self._write_lines([error_line(errors.LimitExceeded(
            f"no complete line within {self.limits.request_timeout} s; closing"))])
        self.transport.loseConnection()

    def _flush_out(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        if out and self.connected:
            self.transport.write(b"".join(out))

    def _read_lines(self) -> None:
        try:
            self._read_lines_into_runs()
        finally:
            self._submit_run()

    def _read_lines_into_runs(self) -> None:
        buffer, limit = self._buffer, self.factory.max_line_bytes
        session = self.session
        while (not self._paused and not self._closing and not session.backlogged
               and self._stream is None):
            end = buffer.find(b"\n")
            if end < 0:
                if self._discarding:
                    buffer.clear()
                elif len(buffer) > limit + 1:  # + 1: room for a CR
                    self._too_long()
                    buffer.clear()
                elif session.hold("line", len(buffer)):
                    self._line_held = len(buffer)
                else:
                    # The partial line cannot be kept: skipped, as one too long.
                    self._refuse(budget_full("line skipped", session.budget))
                    self._discarding = True
                    buffer.clear()
                return
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self._too_long(discarding=False)
                continue
            self._line(line)

    def _too_long(self, discarding: bool = True) -> None:
        if not self._discarding:
            self.factory.counters["lines_too_long"] += 1
            self._refuse(errors.RequestTooLarge(
                f"line is longer than {self.factory.max_line_bytes} bytes; skipped"))
        self._discarding = discarding

    def _line(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(errors.BadEncoding("line is not valid UTF-8"))
            return
        text = text.strip(" \t")
        if not text:
            return
        name, _, rest = text.partition(" ")
        if "\t" in name:  # the rarer separator: the full rule
            name, rest = (_WORD_SEPARATORS.split(text, 1) + [""])[:2]
        command = COMMANDS.get(name.upper())
        if command is None:
            self._refuse(errors.NoSuchMethod(
                f"unknown command {errors.brief(name)}; type HELP"))
            return
        factory = self.factory
        factory.counters["commands"] += 1
        factory.sessions.requests[command.name] += 1
        if command.writes:
            # Consecutive writes go to the session as one run (one request,
            # one commit, one answer), up to the next other command.
            run = self._run
            run.append((command, rest))
            self._run_bytes += len(rest)
            if len(run) >= _MAX_RUN or self._run_bytes >= self.limits.max_client_write_bytes:
                self._submit_run()
            return
        if self._run:
            self._submit_run()
        if (command.quick and not self.session.busy and rest
                and " " not in rest and "\t" not in rest):
            # A read of one key with nothing before it unanswered runs at
            # once (the session's rule), without the general path's layers:
            # GET is most of what a pipelining reader sends.
            try:
                reply = command.run(self, rest)
            except errors.KVConfigError as e:
                reply = e
            except Exception:
                reply = outcome_of(Failure())
            self._reply(reply)
            return
        if command.name == "quit" and not split_words(rest):
            self._closing = True  # read nothing after it
        self._reply(self.session.submit(lambda: self._execute(command, rest),
                                        False, len(rest), self._answered))

    def _refuse(self, error: errors.KVConfigError) -> None:
        """Answer *error* in its turn."""
        self._submit_run()
        self._reply(self.session.submit(_raiser(error)))

    def _submit_run(self) -> None:
        run = self._run
        if not run:
            return
        self._run, size, self._run_bytes = [], self._run_bytes, 0
        self._reply(self.session.submit(lambda: self._write_run(run), len(run), size,
                                        self._answered))

    def _write_run(self, run: list[tuple[Command, str]]) -> Deferred:
        """Make a run of SET and DEL commands: a Deferred of their replies."""
        writes, parsed = [], []
        for command, rest in run:
            try:
                write = command.run(self, rest)
            except errors.KVConfigError as e:
                parsed.append(e)
                continue
            writes.append(write)
            parsed.append(_PLACE)  # for the write's outcome
        run.clear()  # its text is not kept while the writes wait for their commit
        if not writes:
            return succeed(Replies(parsed))
        return self.session.write_many(writes).addCallback(self._write_replies, parsed)

    def _write_replies(self, outcomes: list[Any], parsed: list[Any]) -> Replies:
        """The reply of each command of a run: *parsed*'s errors, and the
        outcomes of the writes in their places."""
        made = iter(outcomes)
        replies = Replies()
        for place in parsed:
            if place is _PLACE:  # a write: its outcome
                outcome = next(made)
                if type(outcome) is KeyValue:
                    place = b"OK %d %d" % (outcome.mod_revision, outcome.version)
                elif type(outcome) is int:
                    place = b"OK %d deleted" % outcome
                elif type(outcome) is Absent:
                    place = b"OK %d absent" % outcome.revision
                else:
                    place = outcome
            replies.append(place)
        return replies

    def _execute(self, command: Command, rest: str) -> Any:
        """Run a command: its reply lines, or a Deferred of them."""
        if command.raw_rest:
            return command.run(self, rest.strip(" \t"))
        if " " in rest or "\t" in rest or not rest:
            args = split_words(rest)
        else:
            args = [rest]  # one word: the common case, without the regex
        if not command.least <= len(args) <= command.most:
            raise errors.WrongArguments(f"usage: {command.usage}")
        return command.run(self, *args)

    # Replying, in request order: the session hands each outcome back in
    # that order, at once or through a Deferred.

    def _reply(self, outcome: Any) -> None:
        if type(outcome) is bytes:  # one line, ready: the common case
            self._send(outcome + b"\r\n")
        elif outcome is LATER:
            return  # the session calls _answered with it, in its turn
        elif is_deferred(outcome):
            outcome.addCallback(self._answered)
        else:
            self._emit(outcome)

    def _answered(self, outcome: Any) -> None:
        if not self.connected:
            return
        self._emit(outcome)
        if self.session.busy or self._stream is not None:
            return
        self._flush_backlog()
        if self._held and not self.session.backlogged:
            self._held = False
            if not self._paused:
                self.transport.resumeProducing()
            self._process()
        self._close_if_done()

    def _emit(self, outcome: Any) -> None:
        """Write an outcome: a streamed reply as the client reads it, the
        others at once."""
        if isinstance(outcome, Streamed):
            self._stream = iter(outcome.lines)
            self._pump()
        else:
            self._write_lines(self._lines(outcome))

    def _pump(self) -> None:
        """Write the streamed reply while the client reads: a slice at a
        time, until the transport pauses us (resumeProducing goes on), so
        that a long listing neither sits whole in memory nor holds the
        reactor.  Nothing else is written or read meanwhile."""
        stream = self._stream
        while stream is not None and not self._paused:
            lines = list(islice(stream, _STREAM_SLICE))
            if not lines:
                self._stream = stream = None
                break
            self._send(b"\r\n".join(lines) + b"\r\n")

    def _flush_backlog(self) -> None:
        if not self._backlog:
            return
        while (self._backlog and not self._paused and not self.session.busy
               and self._stream is None):
            data = self._backlog.popleft()
            self._backlog_bytes -= len(data)
            self._send(data)
        self.session.hold("backlog", self._backlog_bytes)

    def _lines(self, outcome: Any) -> list[bytes]:
        if isinstance(outcome, errors.KVConfigError):
            self.factory.counters["errors"] += 1
            self.factory.sessions.errors[outcome.name] += 1
            return [error_line(outcome)]
        if type(outcome) is Replies:  # a run's: one line each, errors among them
            return [reply if type(reply) is bytes else self._lines(reply)[0]
                    for reply in outcome]
        return [outcome] if isinstance(outcome, bytes) else outcome

    def _write_lines(self, lines: list[bytes]) -> None:
        self._send(b"\r\n".join(lines) + b"\r\n")

    def _send(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
            self._out_bytes += len(data)
            if self._out_bytes >= 65536:
                self._flush_out()
        elif self.transport is not None and self.connected:
            self.transport.write(data)

    # Commands

    def do_get(self, key: str) -> bytes:
        kv = self.session.get(key)
        return b"NIL " + key.encode() if kv is None else value_line(kv)

    # SET and DEL are parsed into writes (the session makes a run of them
    # at once: _write_run), not run alone.

    def do_set(self, rest: str) -> Write:
        words = split_words(rest, 1)
        if len(words) != 2:
            raise errors.WrongArguments(f"usage: {COMMANDS['SET'].usage}")
        key, rest = words
        value, rest = parse_value(rest)
        options = split_words(rest)
        # What follows the value is options; if not, the value was most
        # likely text with spaces, which JSON quotes.
        quote = (f'; a value with spaces is quoted, as in SET {key} "hello world"'
                 if options and options[0].upper() not in ("EX", "IF") else "")
        if len(options) % 2:
            raise errors.WrongArguments(f"usage: {COMMANDS['SET'].usage}{quote}")
        ttl = prev = None
        for option, argument in zip(options[::2], options[1::2], strict=True):
            option = option.upper()
            if option == "EX":
                ttl = parse_number(argument, "EX")
            elif option == "IF":
                prev = parse_int(argument, "IF")
            else:
                raise errors.InvalidArgument(f"unknown option {errors.brief(option)}; "
                                             f"use EX seconds or IF revision{quote}")
        return PUT, key, value, prev, ttl

    def do_ttl(self, key: str) -> bytes:
        left = self.session.ttl(key)
        if left is None:
            return b"NIL " + key.encode()
        return b"TTL %s %d" % (key.encode(), -1 if left < 0 else math.ceil(left))

    def do_del(self, rest: str) -> Write:
        key, *options = split_words(rest) or [""]
        if not key or options and (len(options) != 2 or options[0].upper() != "IF"):
            raise errors.WrongArguments(f"usage: {COMMANDS['DEL'].usage}")
        return DELETE, key, None, parse_int(options[1], "IF") if options else None, None

    def _range(self, prefix: str, limit: str | None,
               after: str | None) -> tuple[int, list[KeyValue], bool]:
        return self.session.range(parse_prefix(prefix),
                                  None if limit is None else parse_int(limit, "limit"), after)

    def do_keys(self, prefix: str = "", limit: str | None = None,
                after: str | None = None) -> Streamed:
        revision, kvs, more = self._range(prefix, limit, after)
        return Streamed(chain((b"KEY " + kv.key.encode() for kv in kvs),
                              [self._end(revision, len(kvs), more)]))

    def do_list(self, prefix: str = "", limit: str | None = None,
                after: str | None = None) -> Streamed:
        revision, kvs, more = self._range(prefix, limit, after)
        return Streamed(chain(map(value_line, kvs), [self._end(revision, len(kvs), more)]))

    def do_changes(self, since: str, prefix: str = "") -> Streamed:
        revision, events = self.session.changes(parse_prefix(prefix), parse_int(since, "since"))
        return Streamed(chain((b"CHANGE " + change_fields(event) for event in events),
                              [self._end(revision, len(events))]))

    def _end(self, revision: int, count: int, more: bool = False) -> bytes:
        """The END line of a listing: ``more`` when a next page follows,
        ``stale`` while it may lag etcd."""
        return b"END %d %d%s%s" % (revision, count, b" more" if more else b"",
                                   b" stale" if self.session.stale else b"")

    def do_watch(self, prefix: str = "", start: str | None = None) -> list[bytes]:
        since = None if start is None else parse_int(start, "from")
        prefix = parse_prefix(prefix)
        watch_id, revision, replay = self.session.watch(prefix, since, self._watch_event)
        self.factory.counters["watches"] += 1
        header = b"EVENT %d " % watch_id
        lines = [b"OK watching %d %s %d" % (watch_id, (prefix or "*").encode(), revision)]
        lines.extend(header + change_fields(event) for event in replay)
        return lines

    def do_unwatch(self, watch_id: str | None = None) -> bytes:
        return b"OK %d" % self.session.unwatch(
            None if watch_id is None else parse_int(watch_id, "id"))

    def do_subscribe(self, port: str, prefix: str = "") -> bytes:
        description = self.session.subscribe(parse_int(port, "port"), parse_prefix(prefix))
        return b"OK subscribed %s %d %d %d %d %d" % (
            description["sub"].encode(), description["seq"], description["rev"],
            description["head"], description["lease"], description["heartbeat"])

    def do_unsubscribe(self, port: str, prefix: str = "") -> bytes:
        ended = self.session.unsubscribe(parse_int(port, "port"), parse_prefix(prefix))
        return b"OK 1" if ended else b"OK 0"

    def do_stats(self) -> list[bytes]:
        lines = [b"STAT %s %s" % (name.encode(), _encode(value).encode())
                 for name, value in self.session.stats().items()]
        lines.append(b"END")
        return lines

    def do_ping(self, rest: str) -> bytes:
        return b"PONG " + rest.encode() if rest else b"PONG"

    def do_help(self, name: str | None = None) -> list[bytes]:
        if name is None:
            lines = [b"HELP kvconfig line protocol; commands (HELP <command> for more):"]
            lines += [b"HELP   " + c.usage.encode() for c in COMMANDS.values()]
        else:
            command = COMMANDS.get(name.upper())
            if command is None:
                raise errors.NoSuchMethod(f"unknown command {errors.brief(name)}")
            lines = [b"HELP " + command.usage.encode()]
            lines += [b"HELP   " + text.encode() for text in command.help.split("\n")]
        lines.append(b"END")
        return lines

    def do_quit(self) -> bytes:
        # _line stopped reading at QUIT; close once every reply is out.
        return b"OK bye"

    def _close_if_done(self) -> None:
        if self._closing and not self.session.busy and self._stream is None and self.connected:
            self.transport.loseConnection()

    # Watches

    def _watch_event(self, watch_id: int, event: Event) -> None:
        line = b"EVENT %d %s" % (watch_id, change_fields(event))
        if (not self._paused and not self._backlog and not self.session.busy
                and self._stream is None):
            self._write_lines([line])
            return
        # Held while the client is not reading, or behind replies still being
        # computed (a WATCH's own replay among them, so that nothing of a
        # watch overtakes its start); bounded either way.
        limits = self.limits
        held = self._backlog_bytes + len(line) + 2
        why = None
        if len(self._backlog) >= limits.max_watch_backlog or held > limits.max_watch_backlog_bytes:
            why = (f"more than {limits.max_watch_backlog} events or "
                   f"{limits.max_watch_backlog_bytes} bytes waiting to be read")
        elif not self.session.hold("backlog", held):
            why = budget_full("watch backlog", self.session.budget).message
        if why is not None:
            self.factory.counters["watchers_dropped"] += 1
            ended = self.session.unwatch()
            self._backlog.clear()
            notice = error_line(errors.SlowConsumer(
                f"{ended} watch(es) ended: {why}; WATCH again from the last revision "
                "seen")) + b"\r\n"
            self._backlog.append(notice)
            self._backlog_bytes = len(notice)
            self.session.hold("backlog", self._backlog_bytes)
            return
        self._backlog.append(line + b"\r\n")
        self._backlog_bytes = held


_HELP = {
    "GET": ("GET key", "The key's value and metadata: VALUE key mod_revision version\n"
            "create_revision expires_at|- json, or NIL key."),
    "SET": ("SET key value [EX seconds] [IF mod_revision]",
            "Store a value (JSON; a bare word is a string). EX: delete after that\n"
            "many seconds. IF: only if the key's mod_revision is that (0: absent).\n"
            "Answers OK revision version once the write is durable."),
    "TTL": ("TTL key", "Seconds the key has left before it expires (rounded up): TTL key\n"
            "seconds; TTL key -1 if it has no time to live; NIL key if absent."),
    "DEL": ("DEL key [IF mod_revision]", "Delete a key: OK revision deleted, or OK revision\n"
            "absent if there was none."),
    "KEYS": ("KEYS [prefix [limit [after]]]",
             "The keys starting with prefix, in order: KEY lines, then END revision\n"
             "count [more]. * or \"\" is every key: KEYS * 10. One page: with more,\n"
             "the next starts after the last key: KEYS * 10 lastkey."),
    "LIST": ("LIST [prefix [limit [after]]]",
             "A snapshot of the keys starting with prefix: VALUE lines, then END\n"
             "revision count [more]; pages as KEYS. Continue with CHANGES or WATCH."),
    "CHANGES": ("CHANGES since [prefix]", "Changes after revision since: CHANGE lines, then\n"
                "END revision count; ERR compacted if that history is gone."),
    "WATCH": ("WATCH [prefix [from]]", "Stream changes to keys starting with prefix as\n"
              "EVENT id lines; from a past revision, replay history first."),
    "UNWATCH": ("UNWATCH [id]", "End one watch, or all of this connection's."),
    "SUBSCRIBE": ("SUBSCRIBE port [prefix]",
                  "Send UDP notifications of changes under prefix to this host's port,\n"
                  "or renew that lease: OK subscribed sub seq rev head lease heartbeat."),
    "UNSUBSCRIBE": ("UNSUBSCRIBE port [prefix]",
                    "End this host's UDP subscription: OK 1, or OK 0 if there was none."),
    "STATS": ("STATS", "Server counters: STAT name json lines, then END."),
    "PING": ("PING [text]", "Answers PONG [text]."),
    "HELP": ("HELP [command]", "This help."),
    "QUIT": ("QUIT", "Close the connection."),
}
# Word counts; SET, DEL and PING parse the raw rest of the line themselves.
_ARITY = {"GET": (1, 1), "SET": None, "TTL": (1, 1), "DEL": None, "KEYS": (0, 3), "LIST": (0, 3),
          "CHANGES": (1, 2), "WATCH": (0, 2), "UNWATCH": (0, 1), "SUBSCRIBE": (1, 2),
          "UNSUBSCRIBE": (1, 2), "STATS": (0, 0),
          "PING": None, "HELP": (0, 1), "QUIT": (0, 0)}
COMMANDS = {
    name: Command(name.lower(), usage, text, *(_ARITY[name] or (0, 0)),
                  raw_rest=_ARITY[name] is None, writes=name in ("SET", "DEL"),
                  run=getattr(LineProtocol, "do_" + name.lower()),
                  quick=name in ("GET", "TTL"))
    for name, (usage, text) in _HELP.items()
}


class LineFactory(Factory):
    """Builds line-protocol connections, each with a session of its own,
    over one store (and the subscription registry SUBSCRIBE uses, if any)."""

    noisy = False  # no "Starting factory" line: start-up logs the address

    def __init__(self, store: Store, limits: Limits, clock: IReactorTime,
                 subscriptions: Subscriptions | None = None) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self.max_line_bytes = limits.max_line_bytes
        self.sessions = Sessions(store, "line", limits, subscriptions, counters=(
            "commands", "errors", "watches", "watchers_dropped", "lines_too_long"))
        self.counters = self.sessions.counters

    def buildProtocol(self, addr) -> Protocol:
        try:
            session = self.sessions.open(getattr(addr, "host", None))
        except errors.LimitExceeded as e:
            return _Refusal(error_line(e))
        return LineProtocol(self, session)


class _Refusal(Protocol):
    """A connection past a connection limit: told why, then closed."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line + b"\r\n")
        self.transport.loseConnection()
