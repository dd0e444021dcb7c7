"""Cutting an argument into the windows tier 1 analyses, and choosing where to start running.

An over-long line (a 4 KB SLMail ``PASS``) cannot be emulated from every offset within the
time budget, and does not need to be: its bulk is filler.  Runs of one repeated byte are
collapsed to a short run (a sled stays a sled, filler stays filler), and what is still too
long is analysed as a head and a tail window, where exploits put their code, plus a window
around the first binary bytes of an otherwise printable argument.

Offsets are kept as a map back into the argument so that reasons name real positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: arguments up to this length (after collapsing filler) are analysed as one window
WHOLE = 2048
#: head and tail window sizes for longer arguments; the tail is larger because a stack
#: overflow's payload follows the filler and the return address
HEAD = 768
TAIL = 1280
#: a run of one byte longer than this is filler (or a sled) and is collapsed to this length
RUN_KEEP = 64
#: most bytes of a huge argument looked at before collapsing (the protocol layer bounds lines)
SCAN_LIMIT = 16384
#: at most this many preferred entry points per window
MAX_ENTRIES = 48

_RUN = re.compile(rb"(.)\1{%d,}" % RUN_KEEP, re.DOTALL)
#: a 4-byte value repeated: sprayed return addresses, or an egg hunter's tag (``w00tw00t``)
_REPEATED4 = re.compile(rb"(.{4})\1+", re.DOTALL)
_STRETCH = re.compile(rb"[\x20-\x7e]{16,}|[^\x20-\x7e]{16,}")


@dataclass(frozen=True)
class Window:
    """Bytes to emulate, where each came from in the argument, and preferred entry points."""

    data: bytes
    origin: tuple[int, ...]
    entries: tuple[int, ...]

    def position(self, offset: int) -> int:
        """The argument offset of window offset ``offset``."""
        return self.origin[offset] if offset < len(self.origin) else self.origin[-1] + 1


def plan(argument: bytes) -> list[Window]:
    """The windows to analyse for ``argument``, most promising first."""
    data, origin = _bounded(argument)
    data, origin = _collapse(data, origin)
    if len(data) <= WHOLE:
        return [_window(data, origin)]
    spans = [(len(data) - TAIL, len(data)), (0, HEAD)]
    binary = re.search(rb"[^\x20-\x7e]", data[HEAD:len(data) - TAIL])
    if binary and not re.search(rb"[^\x20-\x7e]", data[:HEAD]):
        middle = HEAD + binary.start()
        spans.append((max(HEAD, middle - 64), min(len(data) - TAIL, middle + HEAD - 64)))
    return [_window(data[a:b], origin[a:b]) for a, b in spans if b > a]


def _bounded(argument: bytes) -> tuple[bytes, list[int]]:
    """Head and tail of a huge argument, so that collapsing stays cheap."""
    if len(argument) <= SCAN_LIMIT:
        return argument, list(range(len(argument)))
    half = SCAN_LIMIT // 2
    tail_start = len(argument) - half
    return argument[:half] + argument[tail_start:], list(range(half)) + list(range(tail_start, len(argument)))


def _collapse(data: bytes, origin: list[int]) -> tuple[bytes, list[int]]:
    """Shorten runs of one repeated byte to :data:`RUN_KEEP` bytes, keeping the offset map."""
    if not _RUN.search(data):
        return data, origin
    parts: list[bytes] = []
    kept: list[int] = []
    at = 0
    for match in _RUN.finditer(data):
        parts.append(data[at:match.start() + RUN_KEEP])
        kept.extend(origin[at:match.start() + RUN_KEEP])
        at = match.end()
    parts.append(data[at:])
    kept.extend(origin[at:])
    return b"".join(parts), kept


def _window(data: bytes, origin: list[int]) -> Window:
    return Window(data, tuple(origin), tuple(entry_points(data)))


def entry_points(data: bytes) -> list[int]:
    """Offsets where an exploit's code plausibly starts, beyond offset 0.

    The end of filler or a sled, the end of a repeated 4-byte value (sprayed return addresses,
    an egg hunter's tag), and the boundaries of
    printable and binary stretches: that is where a return address or a register points.
    Each of them is emulated with its own register seeds even if an earlier run went past it.
    """
    entries = [0]
    for match in _RUN_SHORT.finditer(data):
        entries.append(match.end())
        entries.append(match.end() + 4)  # past a return address following filler
    for match in _REPEATED4.finditer(data):
        entries.append(match.end())
    for match in _STRETCH.finditer(data):
        entries.extend((match.start(), match.end()))
    unique = sorted({e for e in entries if 0 <= e < len(data)})
    return unique[:MAX_ENTRIES]


_RUN_SHORT = re.compile(rb"(.)\1{7,}", re.DOTALL)
