"""Line framing over a bounded buffer.

POP3 commands are lines. The framer splits incoming bytes into lines as they arrive and keeps
three limits, all enforced before anything is appended:

* ``partial_cap``: an unterminated line longer than this is never buffered whole. The framer
  switches to discarding, keeps only a head and a tail window for analysis, and reports an
  :class:`Overlong` once the line ends (or once the discarded amount reaches ``hard_limit``, so a
  flood without any newline cannot keep the session waiting for ever).
* ``line_limit``: checked when a complete line is *taken*, not when it arrives, so that the limit
  of the state the session is in by then applies (an AUTH continuation pipelined right behind
  ``AUTH PLAIN`` is judged by the SASL limit, however TCP split the bytes).
* ``hard_limit``: everything held (complete lines and the partial line). Pipelining past it is
  abuse and is reported as :class:`Overflow`; nothing more is read after that.
"""

from __future__ import annotations

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
    """More input is pending than the hard limit allows."""

    pending: int


FrameEvent = Line | Overlong | Overflow


class LineFramer:
    """Splits a byte stream into :class:`Line` events within fixed memory bounds."""

    def __init__(self, line_limit: int, hard_limit: int, partial_cap: int | None = None) -> None:
        if line_limit < 3 or hard_limit < line_limit:
            raise ValueError("need 3 <= line_limit <= hard_limit")
        self.line_limit = line_limit
        self.partial_cap = partial_cap if partial_cap is not None else line_limit
        self.hard_limit = hard_limit
        self._partial = bytearray()
        #: pending events from ``_next`` on: a list (56 bytes) rather than a deque (a 64-slot block,
        #: about 620 bytes), since every idle connection has one
        self._events: list[FrameEvent] = []
        self._next = 0
        self._pending_bytes = 0
        self._discarding = False
        self._head = bytearray()
        self._tail = bytearray()
        self._discarded = 0
        self._broken = False

    @property
    def buffered(self) -> int:
        """Octets held right now (complete lines, partial line and windows)."""
        return self._pending_bytes + len(self._partial) + len(self._head) + len(self._tail)

    @property
    def has_partial(self) -> bool:
        """True while an unterminated line is pending."""
        return bool(self._partial) or self._discarding

    def feed(self, data: bytes) -> None:
        """Take bytes from the network. Never holds more than the limits allow."""
        start = 0
        size = len(data)
        if not self._partial and not self._discarding and not self._broken:
            start = self._whole_lines(data)
        while start < size and not self._broken:
            end = data.find(b"\n", start)
            if end < 0:
                self._add_partial(data, start, size)
                return
            if (not self._partial and not self._discarding and end - start <= self.partial_cap - 1
                    and self._pending_bytes + end - start <= self.hard_limit):
                self._whole_line(bytes(data[start:end]))  # the usual case: a line in one chunk, one copy
            else:
                self._add_partial(data, start, end)
                if not self._broken:
                    self._end_line()
            start = end + 1

    def _whole_lines(self, data: bytes) -> int:
        """The usual case of a read, in one go: lines that each fit, all within the hard limit.

        What the loop of :meth:`feed` does for them line by line, :meth:`_whole_line` each;
        returns where the rest (the start of a line, or anything less usual) begins.
        """
        last = data.rfind(b"\n")
        if last < 0 or self._pending_bytes + last + 1 > self.hard_limit:
            return 0
        whole = bytes(data[:last + 1])  # bytes: a line is a dict key later on
        if whole.count(b"\n") == whole.count(b"\r\n"):  # every line ends in CRLF, as clients send
            lines = whole[:-2].split(b"\r\n")
            if max(map(len, lines)) > self.partial_cap - 2:  # the CR is part of the line here
                return 0
            self._events.extend([Line(line, False) for line in lines])
        else:
            lines = whole[:-1].split(b"\n")
            if max(map(len, lines)) > self.partial_cap - 1:
                return 0
            self._events.extend([Line(line[:-1], False) if line.endswith(b"\r") else Line(line, True)
                                 for line in lines])
        self._pending_bytes += last + 1
        return last + 1

    def next_event(self) -> FrameEvent | None:
        """The oldest pending event, or None when there is no complete line."""
        events = self._events
        if self._next >= len(events):
            return None
        event = events[self._next]
        self._next += 1
        if self._next == len(events):
            events.clear()
            self._next = 0
        elif self._next >= 64 and self._next * 2 >= len(events):
            del events[:self._next]  # taken ones go in batches: linear in the lines, never quadratic
            self._next = 0
        if type(event) is not Line:
            return event
        length = len(event.content) + (1 if event.bare_lf else 2)
        self._pending_bytes -= length
        if length <= self.line_limit:
            return event
        content = event.content
        return Overlong(content[:WINDOW], content[-WINDOW:], length, terminated=True)

    def discard_all(self) -> int:
        """Drop everything held (complete lines, the partial line); returns how many octets (at least).

        After STLS nothing sent in plaintext may be read as a command (CVE-2011-0411).
        """
        dropped = self.buffered + self._discarded + (1 if self._broken else 0)  # an overflow held more
        self._broken = False
        self._events.clear()
        self._next = 0  # the list is read from an index: it starts afresh with the list
        self._partial = bytearray()
        self._pending_bytes = 0
        self._discarding = False
        self._head = bytearray()
        self._tail = bytearray()
        self._discarded = 0
        return dropped

    def _add_partial(self, data: bytes, start: int, end: int) -> None:
        """Append data[start:end] to the unterminated line, switching to discard past the cap."""
        if start >= end:
            return
        if self._discarding:
            self._discard(data, start, end)
            return
        if len(self._partial) + (end - start) > self.partial_cap - 1:  # the LF is the last octet
            self._discarding = True
            self._head = self._partial[:WINDOW]
            self._tail = self._partial[-WINDOW:]
            self._discarded = len(self._partial)
            self._partial = bytearray()
            self._discard(data, start, end)
            return
        if self._pending_bytes + len(self._partial) + (end - start) > self.hard_limit:
            self._overflow(self._pending_bytes + len(self._partial) + end - start)
            return
        self._partial += data[start:end]

    def _discard(self, data: bytes, start: int, end: int) -> None:
        """Count discarded bytes, filling the head window and keeping a rolling tail window."""
        if len(self._head) < WINDOW:
            self._head += data[start:min(end, start + WINDOW - len(self._head))]
        self._discarded += end - start
        self._tail += data[max(start, end - WINDOW):end]
        if len(self._tail) > WINDOW:
            del self._tail[: len(self._tail) - WINDOW]
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
        self._pending_bytes += line.length
        self._events.append(line)

    def _whole_line(self, content: bytes) -> None:
        """What :meth:`_add_partial` and :meth:`_end_line` do for a line that arrived whole."""
        bare_lf = not content.endswith(b"\r")
        line = Line(content if bare_lf else content[:-1], bare_lf)
        self._pending_bytes += line.length
        self._events.append(line)

    def _overflow(self, pending: int) -> None:
        self._events.append(Overflow(pending))
        self._partial = bytearray()
        self._broken = True

    def _emit_overlong(self, terminated: bool) -> None:
        head, tail = bytes(self._head), bytes(self._tail)
        if terminated:
            whole = self._discarded - 1 <= len(head)
            if whole and head.endswith(b"\r"):
                head = head[:-1]
            if tail.endswith(b"\r"):
                tail = tail[:-1]
        self._events.append(Overlong(head, tail, self._discarded, terminated))
        self._discarding = False
        self._head = bytearray()
        self._tail = bytearray()
        self._discarded = 0
