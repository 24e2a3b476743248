"""
Telnet's commands, taken out of what a person's telnet client sends to the
line port, and answered so that the client goes on showing our output.

A telnet client (netkit's, on Debian) turns Ctrl-C into ``IAC IP`` then
``IAC DO TIMING-MARK``, and then discards everything it receives until the
server answers the timing mark (RFC 860).  It does the same for a typed byte
0x83 or 0xff (``☃`` is ``e2 98 83``).  A server that ignores the sequence
leaves the session silent while its commands still run.  So, on the line
port (RFC 854):

- ``IAC DO TIMING-MARK`` is answered ``IAC WILL TIMING-MARK``; any other
  option the client asks for is refused (``DO x`` gets ``WONT x``, ``WILL x``
  gets ``DONT x``), so no option is ever on and no negotiation loops;
- ``IAC IP`` (interrupt) and ``IAC EL`` (erase line) discard the line typed
  so far; ``IAC EC`` erases its last byte;
- ``IAC IAC`` is a data byte 0xff; every other command, and subnegotiations
  (``IAC SB ... IAC SE``), are dropped;
- a line feed always ends a line: one that comes where a command, an option
  or a subnegotiation's bytes would be ends that sequence and is data (no
  option was agreed that could carry one, and a stray 0xff must not swallow
  the commands after it).

Byte 0xff never occurs in UTF-8, which is all the line protocol carries,
so a script's input is never mistaken for a telnet command.
"""

from __future__ import annotations

IAC, DONT, DO, WONT, WILL, SB = 255, 254, 253, 252, 251, 250
EL, EC, IP, SE = 248, 247, 244, 240
LF = 10
TIMING_MARK = 6

#: What feed() hands back besides data: discard the line so far, or its last byte.
ERASE_LINE, ERASE_CHAR = "erase line", "erase char"

_DATA, _COMMAND, _OPTION, _SUBNEGOTIATION, _SUBNEGOTIATION_IAC = range(5)
_REFUSAL = {DO: WONT, WILL: DONT}


class TelnetFilter:
    """The telnet state of one connection's input, across reads."""

    def __init__(self) -> None:
        self._state = _DATA
        self._verb = 0

    @property
    def plain(self) -> bool:
        """True when no command is half-read: data without 0xff is all data."""
        return self._state == _DATA

    def feed(self, data: bytes) -> tuple[list[bytes | str], bytes]:
        """(what *data* holds for the line protocol, in order: runs of data
        bytes and ERASE_LINE / ERASE_CHAR; the bytes to answer the client)."""
        parts: list[bytes | str] = []
        answer = bytearray()
        start = 0
        state = self._state
        for index, byte in enumerate(data):
            if byte == LF and state != _DATA:
                state, start = _DATA, index
            if state == _DATA:
                if byte == IAC:
                    if index > start:
                        parts.append(data[start:index])
                    state = _COMMAND
            elif state == _COMMAND:
                state = _DATA
                if byte == IAC:
                    parts.append(b"\xff")
                elif byte in (DO, DONT, WILL, WONT):
                    self._verb, state = byte, _OPTION
                elif byte == SB:
                    state = _SUBNEGOTIATION
                elif byte in (IP, EL):
                    parts.append(ERASE_LINE)
                elif byte == EC:
                    parts.append(ERASE_CHAR)
                start = index + 1
            elif state == _OPTION:
                state, start = _DATA, index + 1
                if self._verb == DO and byte == TIMING_MARK:
                    answer += bytes((IAC, WILL, TIMING_MARK))
                elif self._verb in _REFUSAL:
                    answer += bytes((IAC, _REFUSAL[self._verb], byte))
            elif state == _SUBNEGOTIATION:
                if byte == IAC:
                    state = _SUBNEGOTIATION_IAC
            else:  # _SUBNEGOTIATION_IAC
                state = _DATA if byte == SE else _SUBNEGOTIATION
                start = index + 1
        if state == _DATA and start < len(data):
            parts.append(data[start:])
        self._state = state
        return parts, bytes(answer)
