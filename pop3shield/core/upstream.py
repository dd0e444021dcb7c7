"""A sans-I/O reader of an upstream POP3 server's responses, for the relay.

Pure Python, no I/O: the shell feeds whatever bytes the upstream sent and says, in order, which
responses it is waiting for (:meth:`UpstreamReader.expect`, one call per command sent, pipelining
included). :meth:`UpstreamReader.feed` returns what those bytes completed:

* :class:`Status`: a status line (``+OK`` / ``-ERR``, its RFC 2449/3206 response code, its text);
* :class:`Continuation`: an RFC 5034 ``+ data`` line during an AUTH exchange;
* :class:`Body`: for a multi-line ``+OK``, a piece of the body *as the upstream sent it* (still
  dot-stuffed, CRLF lines) to pass on unchanged; never the terminating ``.`` line;
* :class:`End`: the body's ``.`` line arrived, with the octets (after un-stuffing) and lines seen;
* :class:`Refused`: the upstream broke the protocol or a bound; the reader is dead after it
  (every later :meth:`~UpstreamReader.feed` returns nothing) and the shell must close both sides.

Bounded memory: a body is never collected. Each :class:`Body` is a slice of the bytes fed in (at
most two bytes are held back across calls: a ``.`` or ``.\\r`` that may start the terminator, or
a CR whose LF has not arrived), and a line of any length costs a counter, not a buffer. Only a
status or continuation line is buffered, up to its bound (512 octets for a status line).

What is refused (the :class:`Problem` values): a status line over 512 octets or not starting with
``+OK``/``-ERR``; a NUL, a bare CR or a bare LF anywhere; a body line over ``max_line`` octets; a
body line that starts with ``.`` and is not stuffed (``.x``: a server that stuffs never sends
it); bytes when no response is due; a body past its bound (``max_octets`` after un-stuffing,
``max_lines``) and, for ``exact_octets`` (RETR), one that ends at another size than listed.

The output does not depend on how the input is split: feeding bytes one at a time gives the same
events, with the body pieces concatenating to the same bytes. The one exception is a refusal in a
body: how much of it went out before the bound was hit depends on the pieces (never past it: a
piece that would cross a bound is refused whole).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "Body",
    "Continuation",
    "End",
    "Expect",
    "Kind",
    "MAX_STATUS",
    "Problem",
    "Refused",
    "Status",
    "UpstreamReader",
    "parse_capabilities",
]

#: RFC 2449: the first line of a response is at most 512 octets, CRLF included
MAX_STATUS = 512
#: a SASL challenge line (RFC 5034 puts no number on it; XOAUTH2 error challenges are ~200)
MAX_CONTINUATION = 4096
#: default bound of one body line, CRLF excluded (RFC 5322 says 998; real mail goes over)
DEFAULT_MAX_LINE = 65536
#: the most messages a STAT may announce for ``Expect.per_message`` (the listing is held in memory)
MAX_COUNT = 1_000_000

_CODE = re.compile(rb"\[([A-Za-z0-9-]+(?:/[A-Za-z0-9-]+)*)\]")


class Kind(enum.Enum):
    """What kind of response a command gets."""

    #: ``+OK`` / ``-ERR`` on one line (USER, PASS, STAT, DELE, QUIT, the greeting, ...)
    SINGLE = "single"
    #: ``+OK`` followed by a dot-terminated body, or ``-ERR`` alone (CAPA, LIST, UIDL, RETR, TOP)
    MULTI = "multi"
    #: like SINGLE, but ``+ data`` challenges may come first (AUTH); the response stays due
    SASL = "sasl"


class Problem(enum.Enum):
    """Why the reader refused the upstream's bytes."""

    STATUS_TOO_LONG = "status line over 512 octets"
    MALFORMED_STATUS = "status line is not +OK or -ERR"
    NUL = "NUL octet"
    BARE_CR = "CR not followed by LF"
    BARE_LF = "LF not preceded by CR"
    LINE_TOO_LONG = "body line over its bound"
    UNSTUFFED_DOT = "body line starts with an unstuffed '.'"
    UNSOLICITED = "bytes when no response is due"
    TOO_LONG = "multi-line response past its bound"
    SIZE_MISMATCH = "message body of another size than listed"


@dataclass(frozen=True)
class Expect:
    """One response that is due, in the order the commands went out.

    ``max_octets``/``max_lines`` bound a multi-line body (octets after un-stuffing, CRLF
    included; complete lines); ``exact_octets`` (RETR: the listed size) must be met exactly.
    ``discard_after`` drops whatever follows this response in the same bytes (STLS: plaintext
    buffered after ``+OK`` must not be read as if it came over TLS). ``final_crlf`` also accepts
    ``exact_octets + 2``: a server that must end a message lacking a final line end with CRLF
    before the ``.`` line sends two octets more than its LIST counted (Dovecot does).
    """

    kind: Kind = Kind.SINGLE
    max_octets: int | None = None
    max_lines: int | None = None
    exact_octets: int | None = None
    discard_after: bool = False
    final_crlf: bool = False
    #: this is STAT: its ``+OK n`` sets the message count later responses may be bound by
    counts: bool = False
    #: bound this body by the count of the last STAT: at most one line each, this many octets
    #: per line (LIST and UIDL pipelined right behind STAT; no STAT answer: no line allowed)
    per_message: int | None = None


@dataclass(frozen=True)
class Status:
    """A status line: ``ok``, the response code (``"IN-USE"``, ``"SYS/TEMP"``, ...) and text."""

    ok: bool
    code: str | None
    text: bytes
    #: the line as received, CRLF included (at most 512 octets)
    line: bytes = field(repr=False)


@dataclass(frozen=True)
class Continuation:
    """An RFC 5034 challenge: what follows ``+ `` (base64, possibly empty)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Body:
    """A piece of a multi-line body, dot-stuffed as received: pass it on as it is."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class End:
    """The body's terminating ``.`` line arrived."""

    octets: int
    lines: int


@dataclass(frozen=True)
class Refused:
    """The upstream broke the protocol or a bound; ``detail`` is for the operator's log."""

    problem: Problem
    detail: str = ""


@dataclass(frozen=True)
class Discarded:
    """Octets that followed a response with ``discard_after`` and were dropped unread."""

    octets: int


Event = Status | Continuation | Body | End | Refused | Discarded

_LONG_LINE_CACHE: dict[int, re.Pattern[bytes]] = {}


def _long_line(bound: int) -> re.Pattern[bytes]:
    pattern = _LONG_LINE_CACHE.get(bound)
    if pattern is None:
        pattern = _LONG_LINE_CACHE[bound] = re.compile(rb"[^\n]{%d}" % (bound + 1))
    return pattern


class UpstreamReader:
    """Reads one upstream connection's responses; see the module docstring."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._due: deque[Expect] = deque()
        self._line = b""  # a status/continuation line being collected
        self._in_body = False
        self._held = b""  # at most 2 bytes of body held back (".", ".\r", "\r")
        self._line_len = 0  # octets of the current body line already passed (0: at a line start)
        self._octets = 0
        self._lines = 0
        #: the message count of the last successful STAT (for ``Expect.per_message``)
        self.count: int | None = None
        self.failed: Refused | None = None

    # -- the shell's side -----------------------------------------------------------------

    def expect(self, expectation: Expect | Kind = Kind.SINGLE) -> None:
        """One more response is due (call it when the command is sent)."""
        if isinstance(expectation, Kind):
            expectation = Expect(expectation)
        self._due.append(expectation)

    @property
    def due(self) -> int:
        """How many responses are due, the one being read included."""
        return len(self._due)

    @property
    def buffered(self) -> int:
        """Octets held across :meth:`feed` calls (bounded: at most 512 or the SASL bound)."""
        return len(self._line) + len(self._held)

    def feed(self, data: bytes) -> list[Event]:
        """Read what the upstream sent; the events it completed, in order."""
        if self.failed is not None:
            return []
        events: list[Event] = []
        view = data
        while view:
            if not self._due:
                events.append(self._fail(Problem.UNSOLICITED, repr(bytes(view[:16]))))
                break
            if self._in_body:
                view = self._body(view, events)
            else:
                view = self._status(view, events)
            if self.failed is not None or view is None:  # refused, or the rest was discarded
                break
        return events

    # -- status lines ----------------------------------------------------------------------

    def _status(self, data: bytes, events: list[Event]) -> bytes | None:
        expectation = self._due[0]
        limit = MAX_CONTINUATION if expectation.kind is Kind.SASL else MAX_STATUS
        end = data.find(b"\n")
        if end < 0:
            if len(self._line) + len(data) >= limit:
                events.append(self._fail(Problem.STATUS_TOO_LONG, f"over {limit} octets without CRLF"))
                return b""
            self._line += data
            return b""
        line, rest = self._line + data[: end + 1], data[end + 1:]
        self._line = b""
        continuation = expectation.kind is Kind.SASL and (line.startswith(b"+ ") or line == b"+\r\n")
        if len(line) > (MAX_CONTINUATION if continuation else MAX_STATUS):
            events.append(self._fail(Problem.STATUS_TOO_LONG, f"{len(line)} octets"))
            return b""
        problem = _line_problem(line)
        if problem is not None:
            events.append(self._fail(problem, "in a status line"))
            return b""
        if continuation:
            events.append(Continuation(line[2:-2]))
            return rest
        status = _parse_status(line)
        if status is None:
            events.append(self._fail(Problem.MALFORMED_STATUS, repr(line[:16])))
            return b""
        events.append(status)
        if expectation.counts:
            words = status.text.split(b" ", 1)
            count = int(words[0]) if status.ok and words[0].isdigit() and len(words[0]) <= 9 else None
            self.count = count if count is not None and count <= MAX_COUNT else None
        if expectation.kind is Kind.MULTI and status.ok:
            self._in_body = True
            self._held = b""
            self._line_len = self._octets = self._lines = 0
            return rest
        self._due.popleft()
        return self._after(expectation, rest, events)

    def _after(self, expectation: Expect, rest: bytes, events: list[Event]) -> bytes | None:
        if expectation.discard_after:
            if rest:
                events.append(Discarded(len(rest)))
            return None
        return rest

    # -- bodies ----------------------------------------------------------------------------

    def _body(self, chunk: bytes, events: list[Event]) -> bytes | None:
        expectation = self._due[0]
        data = self._held + chunk if self._held else chunk
        self._held = b""
        at_start = self._line_len == 0
        # the terminator: ".\r\n" at a line start
        if at_start and data.startswith(b".\r\n"):
            term = 0
        else:
            found = data.find(b"\r\n.\r\n")
            term = -1 if found < 0 else found + 2
        if term >= 0:
            body, rest = data[:term], data[term + 3:]
        else:
            body, rest = data, b""
            # hold back what may still become a terminator or a CRLF
            if body.endswith(b"\r"):
                self._held = b"\r"
                body = body[:-1]
            if body.endswith(b"\n.") or (body == b"." and at_start):
                self._held = b"." + self._held
                body = body[:-1]
        if body:
            if b"\0" in body:
                events.append(self._fail(Problem.NUL, "in a body"))
                return b""
            problem = self._check(body, at_start, expectation)
            if problem is not None:
                events.append(problem)
                return b""
            events.append(Body(body))
        if term < 0:
            return b""
        self._in_body = False
        self._due.popleft()
        exact = expectation.exact_octets
        if exact is not None and self._octets != exact and not (
                expectation.final_crlf and self._octets == exact + 2):
            events.append(self._fail(
                Problem.SIZE_MISMATCH, f"{self._octets} octets, listed {expectation.exact_octets}"))
            return b""
        events.append(End(self._octets, self._lines))
        return self._after(expectation, rest, events)

    def _check(self, body: bytes, at_start: bool, expectation: Expect) -> Refused | None:
        """Check a piece of body that ends at a line end or mid-line (never in a CRLF)."""
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf:
            return self._fail(Problem.BARE_CR, "in a body")
        if body.count(b"\n") != crlf:
            return self._fail(Problem.BARE_LF, "in a body")
        first = body.find(b"\n")
        first_len = (len(body) if first < 0 else first) + self._line_len
        if first >= 0:
            first_len -= 1  # the CR before the LF
        if first_len > self.max_line or (
                len(body) > self.max_line and _long_line(self.max_line + 1).search(body)):
            return self._fail(Problem.LINE_TOO_LONG, f"bound {self.max_line}")
        dots = body.count(b"\n.")
        stuffed = body.count(b"\n..") if dots else 0  # most mail has no line starting with a dot
        if at_start and body.startswith(b"."):
            dots += 1
            stuffed += body.startswith(b"..")
        if dots != stuffed:
            return self._fail(Problem.UNSTUFFED_DOT, "in a body")
        octets = self._octets + len(body) - dots
        lines = self._lines + crlf
        bound = expectation.max_octets
        max_lines = expectation.max_lines
        if expectation.per_message is not None:
            count = self.count or 0
            max_lines = count if max_lines is None else min(max_lines, count)
            per = count * expectation.per_message
            bound = per if bound is None else min(bound, per)
        exact = expectation.exact_octets
        if exact is not None:
            exact += 2 if expectation.final_crlf else 0
            bound = exact if bound is None else min(bound, exact)
        if bound is not None and octets > bound:
            problem = Problem.SIZE_MISMATCH if bound == exact else Problem.TOO_LONG
            return self._fail(problem, f"over {bound} octets")
        if max_lines is not None and lines > max_lines:
            return self._fail(Problem.TOO_LONG, f"over {max_lines} lines")
        self._octets, self._lines = octets, lines
        last = body.rfind(b"\n")
        self._line_len = self._line_len + len(body) if last < 0 else len(body) - last - 1
        return None

    def _fail(self, problem: Problem, detail: str) -> Refused:
        self.failed = Refused(problem, detail)
        self._due.clear()
        self._line = self._held = b""
        return self.failed


def _line_problem(line: bytes) -> Problem | None:
    """A status or continuation line (CRLF-terminated by construction of the caller)."""
    if b"\0" in line:
        return Problem.NUL
    if not line.endswith(b"\r\n"):
        return Problem.BARE_LF
    if line.count(b"\r") != 1:
        return Problem.BARE_CR
    return None


def _parse_status(line: bytes) -> Status | None:
    text = line[:-2]
    if text == b"+OK" or text.startswith(b"+OK "):
        ok, rest = True, text[4:]
    elif text == b"-ERR" or text.startswith(b"-ERR "):
        ok, rest = False, text[5:]
    else:
        return None
    code = None
    match = _CODE.match(rest)
    if match:
        code = match.group(1).decode("ascii").upper()
        rest = rest[match.end():].lstrip(b" ")
    return Status(ok, code, rest, line)


def parse_capabilities(body: bytes) -> dict[str, tuple[str, ...]]:
    """A CAPA body (as :class:`Body` pieces joined) as ``{"SASL": ("PLAIN", "LOGIN"), ...}``.

    Keywords are upper-cased; arguments are kept as sent (ASCII, anything else replaced).
    """
    result: dict[str, tuple[str, ...]] = {}
    for raw in body.split(b"\r\n"):
        if raw.startswith(b".."):
            raw = raw[1:]
        words = raw.decode("ascii", "replace").split()
        if words:
            result[words[0].upper()] = tuple(words[1:])
    return result
