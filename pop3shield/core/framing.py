"""Line framing over a bounded buffer.

POP3 commands are lines. The framer splits incoming bytes into lines eagerly and keeps two
limits, both enforced before anything is appended:

* ``line_limit``: a line longer than this (CRLF included) is never buffered whole. The framer
  switches to discarding, keeps only a head and a tail window for analysis, and reports an
  :class:`Overlong` once the line ends (or once the discarded amount reaches ``hard_limit``, so a
  flood without any newline cannot keep the session waiting for ever).
* ``hard_limit``: the total of complete, not yet consumed lines. Pipelining past it is abuse and
  is reported as :class:`Overflow`; nothing more is read after that.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: how much of an over-long line is kept at each end for the malicious code analysis
WINDOW = 2048


@dataclass(frozen=True)
class Line:
    """One complete command line without its terminator."""

    content: bytes
    #: True when the line ended in a bare LF instead of CRLF
    bare_lf: bool

    @property
    def length(self) -> int:
        """Octets on the wire, terminator included."""
        return len(self.content) + (1 if self.bare_lf else 2)


@dataclass(frozen=True)
class Overlong:
    """A line that exceeded the line limit; only its ends were kept."""

    head: bytes
    tail: bytes
    #: octets seen (terminator included when ``terminated``)
    length: int
    #: False when the framer gave up waiting for the end of the line
    terminated: bool


@dataclass(frozen=True)
class Overflow:
    """More complete lines are pending than the hard limit allows."""

    pending: int


FrameEvent = Line | Overlong | Overflow


class LineFramer:
    """Splits a byte stream into :class:`Line` events within fixed memory bounds."""

    def __init__(self, line_limit: int, hard_limit: int) -> None:
        if line_limit < 3 or hard_limit < line_limit:
            raise ValueError("need 3 <= line_limit <= hard_limit")
        self.line_limit = line_limit
        self.hard_limit = hard_limit
        self._partial = bytearray()
        self._events: deque[FrameEvent] = deque()
        self._pending_bytes = 0
        self._discarding = False
        self._discard_head = b""
        self._discard_tail = bytearray()
        self._discarded = 0
        self._broken = False

    @property
    def buffered(self) -> int:
        """Octets held right now (complete lines, partial line and windows)."""
        return self._pending_bytes + len(self._partial) + len(self._discard_head) + len(self._discard_tail)

    @property
    def has_partial(self) -> bool:
        """True while an unterminated line is pending (used for the pre-greeting check)."""
        return bool(self._partial) or self._discarding

    def feed(self, data: bytes) -> None:
        """Take bytes from the network. Never holds more than the limits allow."""
        if self._broken:
            return
        start = 0
        size = len(data)
        while start < size and not self._broken:
            end = data.find(b"\n", start)
            if end < 0:
                self._add_partial(data, start, size)
                return
            self._add_partial(data, start, end)
            self._end_line()
            start = end + 1

    def next_event(self) -> FrameEvent | None:
        """The oldest pending event, or None when there is no complete line."""
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, Line):
            self._pending_bytes -= event.length
        return event

    def _add_partial(self, data: bytes, start: int, end: int) -> None:
        """Append data[start:end] to the unterminated line, switching to discard past the limit."""
        if start >= end:
            return
        if self._discarding:
            self._discard(data, start, end)
            return
        room = self.line_limit - 1 - len(self._partial)  # the LF is the last octet
        if end - start <= room:
            self._partial += data[start:end]
            return
        self._discarding = True
        self._discard_head = bytes(self._partial[:WINDOW])
        self._discarded = len(self._partial)
        if len(self._discard_head) < WINDOW:
            take = min(end - start, WINDOW - len(self._discard_head))
            self._discard_head += data[start:start + take]
        self._partial = bytearray()
        self._discard(data, start, end)

    def _discard(self, data: bytes, start: int, end: int) -> None:
        """Count discarded bytes and keep a rolling tail window."""
        self._discarded += end - start
        piece = data[max(start, end - WINDOW):end]
        self._discard_tail += piece
        if len(self._discard_tail) > WINDOW:
            del self._discard_tail[: len(self._discard_tail) - WINDOW]
        if self._discarded >= self.hard_limit:
            self._emit_overlong(terminated=False)
            self._broken = True

    def _end_line(self) -> None:
        """An LF arrived: finish the current line."""
        if self._discarding:
            self._discarded += 1
            self._emit_overlong(terminated=True)
            return
        bare_lf = not self._partial.endswith(b"\r")
        if not bare_lf:
            del self._partial[-1]
        line = Line(bytes(self._partial), bare_lf)
        self._partial = bytearray()
        if self._pending_bytes + line.length > self.hard_limit:
            self._events.append(Overflow(self._pending_bytes + line.length))
            self._broken = True
            return
        self._pending_bytes += line.length
        self._events.append(line)

    def _emit_overlong(self, terminated: bool) -> None:
        tail = bytes(self._discard_tail)
        if terminated and tail.endswith(b"\r"):
            tail = tail[:-1]
        self._events.append(Overlong(self._discard_head, tail, self._discarded, terminated))
        self._discarding = False
        self._discard_head = b""
        self._discard_tail = bytearray()
        self._discarded = 0
