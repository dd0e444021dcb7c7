"""Cutting an argument into the windows tier 1 analyses, and choosing where to start running.

An over-long line (a 4 KB SLMail ``PASS``) cannot be emulated from every offset within the
time budget, and does not need to be: its bulk is filler.  Runs of one repeated byte are
collapsed to a short run (a sled stays a sled, filler stays filler), and what is still too
long is analysed as a head and a tail window, where exploits put their code, plus a window
around the first binary bytes of an otherwise printable argument.

Offsets are kept as a map back into the argument (a few segments, not a table per byte, so
that a 200 KB argument costs no more to plan than a short one) so that reasons name real
positions.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .static import DECODER_PATH_MIN, ONE_BYTE

#: arguments up to this length (after collapsing filler) are analysed as one window
WHOLE = 2048
#: head and tail window sizes for longer arguments; the tail is larger because a stack
#: overflow's payload follows the filler and the return address
HEAD = 768
TAIL = 1280
#: a run of one byte longer than this is filler (or a sled) and is collapsed to this length
RUN_KEEP = 64
#: most bytes of a huge argument looked at (head and tail halves); POP3 lines are far shorter
#: and the protocol layer hands over the head and tail of over-long ones separately, so this
#: only bounds the planning time (a few ms for the regex passes)
SCAN_LIMIT = 1 << 16
#: at most this many preferred entry points per window
MAX_ENTRIES = 48
#: one-byte harmless instructions in a row (inc/dec, BCD adjustments, flag operations: what a
#: landing pad is made of) after which the code is an entry point; at the start of a window
#: (where the exploit's jump lands) a single one counts
LANDING_PAD = 4
#: printable bytes looked at in the UTF-16 view
UTF16_SOURCE = 1024

_RUN = re.compile(rb"(.)\1{%d,}" % RUN_KEEP, re.DOTALL)
_RUN_SHORT = re.compile(rb"(.)\1{7,}", re.DOTALL)
#: a 4-byte value repeated: sprayed return addresses, or an egg hunter's tag (``w00tw00t``)
_REPEATED4 = re.compile(rb"(.{4})\1+", re.DOTALL)
_STRETCH = re.compile(rb"[\x20-\x7e]{16,}|[^\x20-\x7e]{16,}")
_BINARY = re.compile(rb"[^\x20-\x7e]")
_PAD_CLASS = b"[" + b"".join(b"\\x%02x" % b for b in sorted(ONE_BYTE)) + b"]"
_PAD = re.compile(_PAD_CLASS + b"{%d,}" % LANDING_PAD)
_PAD_LEAD = re.compile(_PAD_CLASS + b"+")

#: (offset in the window, offset in the argument) where a contiguous piece starts
Segments = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Window:
    """Bytes to emulate, where they came from in the argument, and preferred entry points.

    ``sweep`` says whether every offset is tried after the entry points; ``label`` marks a
    derived view in reasons (``/utf16``) whose bytes stand for ``stride`` window bytes each.
    """

    data: bytes
    segments: Segments
    entries: tuple[int, ...]
    sweep: bool = True
    label: str = ""
    stride: int = 1
    #: ends of landing pads (:func:`landing_points`), tried after the entry points
    landings: tuple[int, ...] = ()
    #: per offset of a printable-only window, the most set-up instructions a run from there
    #: can execute before it runs a byte it changed (:func:`static.decoder_paths`)
    paths: tuple[int, ...] | None = None

    def may_decode(self, offset: int) -> bool:
        """Whether a run from ``offset`` can be a printable decoder (always, for windows with
        other bytes)."""
        return self.paths is None or self.paths[offset] >= DECODER_PATH_MIN

    def position(self, offset: int) -> int:
        """The argument offset of window offset ``offset``."""
        starts = [start for start, _ in self.segments]
        index = max(0, bisect.bisect_right(starts, offset) - 1)
        start, origin = self.segments[index]
        return origin + (offset - start) // self.stride


def plan(argument: bytes) -> list[Window]:
    """The windows to analyse for ``argument``, most promising first."""
    windows = _plain(argument)
    wide = _utf16_view(argument)
    return windows + [wide] if wide else windows


def _plain(argument: bytes) -> list[Window]:
    data, segments = _collapse(argument)
    if len(data) <= WHOLE:
        return [_window(data, segments)]
    spans = [(len(data) - TAIL, len(data)), (0, HEAD)]
    binary = _BINARY.search(data, HEAD, len(data) - TAIL)
    if binary and not _BINARY.search(data, 0, HEAD):
        middle = binary.start()
        spans.append((max(HEAD, middle - 64), min(len(data) - TAIL, middle + HEAD - 64)))
    return [_window(data[a:b], _slice(segments, a, b)) for a, b in spans if b > a]


def _utf16_view(argument: bytes) -> Window | None:
    """The argument as a server that widens it to UTF-16 would hold it in memory.

    Printable exploits against such servers are written for that view ("venetian" decoders:
    every other byte of the code is the zero the conversion inserts).  Only the entry points
    of this view are run: it costs twice the bytes and is a rarer case.
    """
    head = argument[:UTF16_SOURCE]
    if len(head) < 40 or len(_BINARY.findall(head)) > 0.1 * len(head):
        return None
    wide = bytearray(2 * len(head))
    wide[0::2] = head
    entries = sorted({0} | {2 * e for e in entry_points(head)})[:MAX_ENTRIES]
    return Window(bytes(wide), ((0, 0),), tuple(entries), sweep=False, label="/utf16", stride=2)


def _pieces(argument: bytes) -> list[tuple[bytes, int]]:
    """The argument, or the head and tail halves of a huge one, with their argument offsets."""
    if len(argument) <= SCAN_LIMIT:
        return [(argument, 0)]
    half = SCAN_LIMIT // 2
    return [(argument[:half], 0), (argument[-half:], len(argument) - half)]


def _collapse(argument: bytes) -> tuple[bytes, Segments]:
    """Shorten runs of one repeated byte to :data:`RUN_KEEP` bytes, keeping the offset map."""
    parts: list[bytes] = []
    segments: list[tuple[int, int]] = []
    size = 0
    for chunk, base in _pieces(argument):
        at = 0
        for match in _RUN.finditer(chunk):
            keep_end = match.start() + RUN_KEEP
            segments.append((size, base + at))
            parts.append(chunk[at:keep_end])
            size += keep_end - at
            at = match.end()
        segments.append((size, base + at))
        parts.append(chunk[at:])
        size += len(chunk) - at
    return b"".join(parts), tuple(segments)


def _slice(segments: Segments, begin: int, end: int) -> Segments:
    """The offset map of ``data[begin:end]``."""
    starts = [start for start, _ in segments]
    first = max(0, bisect.bisect_right(starts, begin) - 1)
    sliced = []
    for start, origin in segments[first:]:
        if start >= end:
            break
        shift = max(begin - start, 0)
        sliced.append((max(start - begin, 0), origin + shift))
    return tuple(sliced)


def _window(data: bytes, segments: Segments) -> Window:
    entries = tuple(entry_points(data))
    return Window(data, segments, entries, landings=landing_points(data, entries))


def entry_points(data: bytes) -> list[int]:
    """Offsets where an exploit's code plausibly starts, beyond offset 0.

    The start and end of filler or a sled, the end of a repeated 4-byte value (sprayed return addresses,
    an egg hunter's tag), and the boundaries of printable and binary stretches: that is where
    a return address or a register points.  Each of them is emulated with all register
    seedings even if an earlier run went past it.
    """
    entries = [0]
    for match in _RUN_SHORT.finditer(data):
        entries.append(match.start())  # padding right after the code set up a register
        entries.append(match.end())
        entries.append(match.end() + 4)  # past a return address following filler
    for match in _REPEATED4.finditer(data):
        entries.append(match.end())
    for match in _STRETCH.finditer(data):
        entries.extend((match.start(), match.end()))
    unique = sorted({e for e in entries if 0 <= e < len(data)})
    return unique[:MAX_ENTRIES]


#: at most this many such entry points per window, the first ones (further on, in an
#: alphanumeric payload, upper-case pairs make such runs all the time)
MAX_LANDINGS = 3


def landing_points(data: bytes, entries: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Where a pad of harmless instructions ends: the exploit may jump into the pad with its
    register pointing at the code after it (printable decoders address their patches through
    that register, so only a run started there, with the register pointing there, decodes).

    A pad at the start of the window of any length, and further pads of :data:`LANDING_PAD`
    bytes or more count, the first :data:`MAX_LANDINGS` of them; in lower-case text they are
    rare (letters decode as jumps, ``popa``, ``bound``, ``arpl``)."""
    lead = _PAD_LEAD.match(data)
    points = [lead.end()] if lead and lead.end() < len(data) and lead.end() not in entries else []
    points += [match.end() for match in _PAD.finditer(data)
               if match.end() < len(data) and match.end() not in entries and match.end() not in points]
    points = points[:MAX_LANDINGS]
    # the start of a run of register shuffles (push, pop, inc, dec): where a printable decoder
    # sets up its base register (``TYIIIIIIIIIIQZ``) after text it was appended to
    points += [match.start() for match in _SHUFFLES.finditer(data)
               if match.start() not in entries and match.start() not in points][:MAX_SHUFFLES]
    return tuple(points)


#: push, pop, inc, dec, pusha, popa in a row, and how many such runs count per window
SHUFFLES = 8
MAX_SHUFFLES = 2
_SHUFFLES = re.compile(rb"[\x40-\x61]{%d,}" % SHUFFLES)
