"""Streaming RFC 1939 multi-line encoder ("dot-stuffing") for RETR and TOP.

Pure Python, no Twisted: the transport layer feeds file chunks in and writes
whatever comes out, so this module owns every byte-level rule of the
multi-line response body.

Line model (shared by the encoder, :func:`unstuff` and :func:`wire_size`):

* A line ends at LF. A bare LF is sent as CRLF; an existing CRLF stays CRLF
  (the CR is never doubled).
* A CR that is not followed by LF is ordinary data and is passed through
  unchanged. We never invent a line break for it: turning it into CRLF would
  change the message and the octet count LIST reports.
* A line that starts with '.' gets one extra '.' in front (RFC 1939 s3),
  including the very first line and lines that start in a later chunk.
* The response ends with exactly one CRLF "." CRLF. If the message does not
  end with LF, a CRLF is added first; an empty message yields only ".\\r\\n".

CR at the very end of a chunk: it is emitted immediately, not held back.
Whether it was a lone CR or the first half of a CRLF only matters for the
*next* byte, so the encoder just remembers the last bytes it emitted. If the
next chunk starts with LF, that LF is sent without a CR of its own (the CR
already went out), and a '.' right after it is stuffed. Emitting eagerly means
nothing is ever pending, so :meth:`DotStuffer.finish` never has held data to
flush and no chunk has to be copied just to glue one byte in front of it.

Performance: all work per chunk is done in C loops; Python code runs a
constant number of times per chunk, plus, once per TOP, a loop over the lines
of the chunk where the cut happens. Two scans per chunk are all a CRLF message
costs: one to learn that it holds no bare LF (then it is already normalised,
and is not copied), one to find the lines that start with '.':

* Bare LFs: an :class:`io.IncrementalNewlineDecoder` (in-memory, no I/O; its
  C scan skips every byte above CR in a tight loop) is fed the chunk as
  Latin-1 text (one code point per byte) and records which line ends it has
  seen, keeping a CR at the end of a chunk for the next one, as the encoder's
  line model does. While it has seen no bare LF, a chunk needs no
  normalisation; once it has, every later chunk goes through
  :func:`_normalise` (counts and replaces), which handles any mix.
* Dot lines: a compiled ``\r\n.`` pattern's ``sub`` (``_sre`` searches a
  literal prefix faster than ``bytes.replace``, which scans twice).

Memory: the encoder keeps at most 3 bytes of state besides the chunk in hand
(and, for the bare-LF scan, one pending CR).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

__all__ = ["DotStuffer", "stuff", "unstuff", "wire_size", "wire_size_chunks"]

_CRLF = b"\r\n"
_TERMINATOR = b".\r\n"
_BLANK_LINE = b"\r\n\r\n"
# State kept about the emitted (normalised, unstuffed) stream: its last bytes.
# It starts as a virtual CRLF so the message start is a line start and a
# message that begins with an empty line has an empty header block.
_INITIAL_TAIL = b"\r\n"
_TAIL_LEN = len(_BLANK_LINE) - 1
# A line that starts with '.' after a CRLF (the chunk's first line is the caller's):
# the occurrences cannot overlap, so this sub is exactly bytes.replace(b"\r\n.", b"\r\n..").
_DOT_LINE = re.compile(rb"\r\n\.")
# IncrementalNewlineDecoder.newlines values that include no bare LF ("\n" alone)
_NO_BARE_LF = (None, "\r", "\r\n", ("\r", "\r\n"))


def _normalise(chunk: bytes) -> bytes:
    """Turn every LF not preceded by CR (inside this chunk) into CRLF.

    The chunk-boundary case (CR at the end of the previous chunk) is fixed up
    by the caller. Already-CRLF data is returned as is without copying.
    """
    if b"\r" not in chunk:
        # LF line ends only, as most Maildir files store them: one pass (a single-byte search
        # first, since counting two-byte patterns costs several times as much)
        return chunk.replace(b"\n", _CRLF)
    lf = chunk.count(b"\n")
    if lf == 0 or lf == chunk.count(_CRLF):
        return chunk
    # Stripping then re-adding the CR of every CRLF keeps lone CRs intact and
    # never doubles a CR: "\r\r\n" -> "\r\n" -> "\r\r\n".
    return chunk.replace(_CRLF, b"\n").replace(b"\n", _CRLF)


class DotStuffer:
    """Encodes a message body for RETR/TOP as it streams, keeping state across chunks.

    ``body_lines=None`` encodes the whole message (RETR). ``body_lines=n``
    gives TOP semantics: all header lines, the blank line that ends them, then
    at most ``n`` body lines. A message without a blank line is all headers.

    Typical use::

        enc = DotStuffer(body_lines)
        while not enc.done and (chunk := f.read(65536)):
            send(enc.feed(chunk))
        send(enc.finish())
    """

    __slots__ = ("_remaining", "_in_headers", "_tail", "_done", "_finished", "octets", "_line_ends")

    def __init__(self, body_lines: int | None = None) -> None:
        if body_lines is not None and body_lines < 0:
            raise ValueError("body_lines must be >= 0 or None")
        self._remaining = body_lines  # body lines TOP may still send; None = all
        self._in_headers = body_lines is not None  # only TOP cares about headers
        self._tail = _INITIAL_TAIL
        self._done = False
        self._finished = False
        #: octets of the message emitted so far, normalised and before stuffing (for RETR, after
        #: finish() plus the CRLF it added, this is :func:`wire_size` of the message)
        self.octets = 0
        #: the bare-LF scan while no bare LF has been seen (chunks need no normalising); None after
        self._line_ends: io.IncrementalNewlineDecoder | None = io.IncrementalNewlineDecoder(None, False)

    @property
    def whole(self) -> bool:
        """True for RETR (the whole message): then :attr:`octets` counts every octet fed so far."""
        return self._remaining is None

    @property
    def final_octets(self) -> int:
        """:attr:`octets` as it will be after :meth:`finish` (which adds a CRLF if the data does not
        end with LF): for RETR, :func:`wire_size` of everything fed so far."""
        return self.octets if self._tail.endswith(b"\n") else self.octets + len(_CRLF)

    @property
    def done(self) -> bool:
        """True once TOP has emitted all it needs (or after :meth:`finish`).

        For RETR this only becomes True after finish(): the caller must read
        the whole file.
        """
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """Encode the next chunk of the raw message; returns bytes to send (may be b"").

        Feeding after TOP is done is allowed and returns b"" (the rest of the
        message is not wanted). Feeding after finish() is a caller bug.
        """
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._done or not chunk:
            return b""
        chunk = bytes(chunk)
        line_ends = self._line_ends
        if line_ends is not None:
            line_ends.decode(chunk.decode("latin-1"))
            if line_ends.newlines in _NO_BARE_LF:
                # every LF follows a CR (a chunk-leading LF, the CR that ended the last chunk):
                # the chunk is its own normalised form
                data = chunk
            else:
                self._line_ends = None  # a bare LF: this chunk and every later one is normalised
                data = self._normalised(chunk)
        else:
            data = self._normalised(chunk)
        if self._remaining is not None:
            data = data[: self._top_cut(data)]
        out = self._stuff(data)
        self._remember(data)
        self.octets += len(data)
        return out

    def finish(self) -> bytes:
        """Return the end of the response: a CRLF if the data sent so far did
        not end with one, then the ".\\r\\n" terminator. Nothing is ever held
        back (see the module docstring), so there are no pending bytes."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._done = True
        if self._tail.endswith(b"\n"):
            return _TERMINATOR
        self.octets += len(_CRLF)
        return _CRLF + _TERMINATOR

    def _normalised(self, chunk: bytes) -> bytes:
        data = _normalise(chunk)
        if self._tail.endswith(b"\r") and chunk.startswith(b"\n"):
            # The CR of this CRLF already went out with the previous chunk.
            data = data[1:]
        return data

    def _stuff(self, data: bytes) -> bytes:
        """Dot-stuff normalised data, using the emitted tail for the chunk boundary."""
        out = _DOT_LINE.sub(b"\r\n..", data)
        if self._tail.endswith(b"\n"):
            if out.startswith(b"."):
                out = b"." + out
        elif self._tail.endswith(b"\r") and out.startswith(b"\n."):
            # CR | LF "." split across chunks: the replace above could not see it.
            out = b"\n." + out[1:]
        return out

    def _remember(self, data: bytes) -> None:
        """Keep the last few normalised bytes emitted; that is all the state needed."""
        if len(data) >= _TAIL_LEN:
            self._tail = data[-_TAIL_LEN:]
        elif data:
            self._tail = (self._tail + data)[-_TAIL_LEN:]

    def _top_cut(self, data: bytes) -> int:
        """Return how many bytes of normalised ``data`` TOP still sends; sets done."""
        start = 0
        if self._in_headers:
            end = self._header_end(data)
            if end < 0:
                return len(data)
            self._in_headers = False
            start = end
        return self._body_cut(data, start)

    def _header_end(self, data: bytes) -> int:
        """Index just after the blank line ending the headers, or -1 if not in ``data``."""
        window = self._tail + data[:_TAIL_LEN]
        hit = window.find(_BLANK_LINE)
        if hit >= 0:
            return hit + len(_BLANK_LINE) - len(self._tail)
        hit = data.find(_BLANK_LINE)
        return hit + len(_BLANK_LINE) if hit >= 0 else -1

    def _body_cut(self, data: bytes, start: int) -> int:
        """Index after the last body line TOP may send, counting lines from ``start``."""
        assert self._remaining is not None
        if self._remaining == 0:
            self._done = True
            return start
        lines = data.count(b"\n", start)
        if lines < self._remaining:
            self._remaining -= lines
            return len(data)
        pos = start
        for _ in range(self._remaining):  # per line, once per TOP, not per byte
            pos = data.index(b"\n", pos) + 1
        self._remaining = 0
        self._done = True
        return pos


def stuff(data: bytes, body_lines: int | None = None) -> bytes:
    """One-shot encoding of a whole message (with the terminator)."""
    enc = DotStuffer(body_lines)
    return enc.feed(data) + enc.finish()


def unstuff(data: bytes) -> bytes:
    """Decode a complete multi-line response body (including the final ".\\r\\n").

    Returns the original message with CRLF line endings. Strict: anything the
    encoder could not have produced raises ValueError, so tests catch encoder
    bugs and a relay rejects a broken upstream instead of passing it on.
    """
    data = bytes(data)
    if data == _TERMINATOR:
        return b""
    if not data.endswith(_CRLF + _TERMINATOR):
        raise ValueError("missing CRLF.CRLF terminator")
    body = data[: -len(_TERMINATOR)]
    if body.count(b"\n") != body.count(_CRLF):
        raise ValueError("bare LF in multi-line response")
    if body.startswith(b".") and not body.startswith(b".."):
        raise ValueError("unstuffed '.' at the start of a line")
    # Every "\r\n." must be the start of "\r\n.."; neither pattern can overlap
    # itself, so equal counts mean no line starts with a single '.'.
    if body.count(b"\r\n.") != body.count(b"\r\n.."):
        raise ValueError("unstuffed '.' at the start of a line")
    out = body.replace(b"\r\n..", b"\r\n.")
    return out[1:] if out.startswith(b"..") else out


def wire_size_chunks(chunks: Iterable[bytes]) -> int:
    """:func:`wire_size` of the concatenation of ``chunks``, without joining them.

    Lets the Maildir store size a 200 MB file in 64 KiB reads.
    """
    total = 0
    bare_lf = 0
    prev_cr = False
    last = b""
    for chunk in chunks:
        if not chunk:
            continue
        total += len(chunk)
        if b"\r" in chunk:
            bare_lf += chunk.count(b"\n") - chunk.count(_CRLF)
        else:
            bare_lf += chunk.count(b"\n")
        if prev_cr and chunk[:1] == b"\n":
            bare_lf -= 1  # CR | LF split across chunks: that LF was not bare
        last = chunk[-1:]
        prev_cr = last == b"\r"
    if total and last != b"\n":
        total += len(_CRLF)  # the CRLF the encoder adds before the terminator
    return total + bare_lf


def wire_size(data: bytes) -> int:
    """Octets the client receives after unstuffing: what LIST/STAT report.

    LF->CRLF normalised length, plus 2 if non-empty and not ending in LF.
    """
    return wire_size_chunks((data,))
