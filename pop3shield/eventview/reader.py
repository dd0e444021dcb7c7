"""Reading event files: plain or gzip (by its magic bytes), line by line, bounded per line.

The event file is JSON Lines (``pop3shield/events.py``). Anything else in it (a torn last line, a
line of another program, an over-long line, bytes that are not UTF-8, JSON that is not an object
with a ``type``) is counted in :attr:`Reader.malformed` and skipped: the operator's tool must not
trip over the file an attacker partly wrote (user names and commands are in it).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

#: a longer line is not a record of ours (the server's records are a few KB at most)
MAX_LINE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Record:
    """One parsed line: the JSON object and its time as seconds since the epoch (None if absent)."""

    data: dict[str, Any]
    when: float | None
    size: int = 0  # the line's length in bytes

    @property
    def type(self) -> str:
        return str(self.data.get("type"))


def parse_time(text: Any) -> float | None:
    """An RFC 3339 / ISO 8601 time as the event file writes it (``...Z``); naive means UTC."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        stamp = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    try:
        return stamp.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def parse_line(line: bytes) -> Record | None:
    """A record, or None for a line that is not one of ours."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    return Record(data, parse_time(data.get("time")), len(line))


def open_events(path: str) -> IO[bytes]:
    """The file's bytes, decompressed if it starts with the gzip magic (whatever its name)."""
    raw = open(path, "rb")
    try:
        magic = raw.read(2)
        raw.seek(0)
    except OSError:
        raw.close()
        raise
    if magic == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def read_lines(stream: IO[bytes], on_malformed: Callable[[], None]) -> Iterator[bytes]:
    """Complete lines (without the end), at most :data:`MAX_LINE` each; longer ones are skipped.

    The last line without a newline is returned too (a file that is not being written); a
    truncated gzip member ends the file and counts once as malformed.
    """
    try:
        while True:
            line = stream.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                on_malformed()
                while True:  # skip the rest of the over-long line, bounded reads
                    rest = stream.readline(MAX_LINE)
                    if not rest or rest.endswith(b"\n"):
                        break
                continue
            yield line.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error):
        on_malformed()


class Progress:
    """``reading FILE: 42%`` on stderr, only on a terminal and only after the first second."""

    DELAY = 1.0
    EVERY = 0.2

    def __init__(self, stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic,
                 enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._start = clock()
        self._last = 0.0
        self._shown = False

    def update(self, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self._start < self.DELAY or now - self._last < self.EVERY:
            return
        self._last = now
        share = f"{min(100, done * 100 // total)}%" if total else f"{done} bytes"
        from pop3shield.logsetup import escape

        self.stream.write(f"\rreading {escape(name)}: {share}\x1b[K")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class Reader:
    """Reads files in order and yields their records; counts what it skipped."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.malformed = 0
        self.lines = 0
        self.progress = progress

    def _bad(self) -> None:
        self.malformed += 1

    def records(self, paths: list[str]) -> Iterator[Record]:
        for path in paths:
            yield from self.file(path)
        if self.progress is not None:
            self.progress.done()

    def file(self, path: str) -> Iterator[Record]:
        with open_events(path) as stream:
            raw = getattr(stream, "fileobj", None) or stream  # the compressed position, for progress
            try:
                total = os.fstat(raw.fileno()).st_size
            except (OSError, AttributeError, io.UnsupportedOperation):
                total = 0
            for line in read_lines(stream, self._bad):
                self.lines += 1
                if self.progress is not None and self.lines % 1024 == 0:
                    self.progress.update(path, raw.tell(), total)
                if not line.strip():
                    continue
                record = parse_line(line)
                if record is None:
                    self.malformed += 1
                    continue
                yield record
