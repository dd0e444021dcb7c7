"""``--follow``: new lines of a growing file, across rotation the way logrotate does it.

Polling, like ``tail -F``: every ``interval`` the file is read to its end, and its name is
stat'ed. A different inode under the name means the file was renamed and a new one created:
the rest of the old file is read, then the new one from its start. A file shorter than what
was read was truncated (``copytruncate``): reading starts again at its beginning. A name that
is missing for a while (between the rename and the create) is waited for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

from pop3shield.eventview.reader import GZIP_MAGIC, MAX_LINE

CHUNK = 1 << 16


class Follower:
    def __init__(self, path: str, on_malformed: Callable[[], None]) -> None:
        self.path = path
        self.on_malformed = on_malformed
        self._file: IO[bytes] | None = None
        self._ino: tuple[int, int] | None = None
        self._buffer = b""
        self._skipping = False  # inside an over-long line: drop up to its end
        self._open()
        if self._file is not None:
            head = self._file.read(2)
            self._file.seek(0)
            if head == GZIP_MAGIC:
                raise ValueError(f"{path}: cannot follow a compressed file")

    def _open(self) -> bool:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return False
        st = os.fstat(handle.fileno())
        self._file, self._ino = handle, (st.st_dev, st.st_ino)
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def poll(self) -> list[bytes]:
        """Every complete line added since the last call (rotation and truncation handled)."""
        lines: list[bytes] = []
        if self._file is None:
            if not self._open():
                return lines
        assert self._file is not None
        self._drain(lines)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines  # renamed, the new one not created yet: keep the old one open
        if (st.st_dev, st.st_ino) != self._ino:
            self._drain(lines)
            self._finish(lines)
            self.close()
            if self._open():
                self._drain(lines)
        elif st.st_size < self._file.tell():
            self._file.seek(0)
            self._buffer, self._skipping = b"", False
            self._drain(lines)
        return lines

    def _finish(self, lines: list[bytes]) -> None:
        """The old file's last line, even without its newline."""
        if self._buffer and not self._skipping:
            lines.append(self._buffer)
        self._buffer, self._skipping = b"", False

    def _drain(self, lines: list[bytes]) -> None:
        assert self._file is not None
        while True:
            chunk = self._file.read(CHUNK)
            if not chunk:
                return
            data = self._buffer + chunk
            parts = data.split(b"\n")
            self._buffer = parts.pop()
            for part in parts:
                if self._skipping:
                    self._skipping = False
                    continue
                lines.append(part.rstrip(b"\r"))
            if len(self._buffer) > MAX_LINE:
                if not self._skipping:
                    self.on_malformed()
                self._skipping = True
                self._buffer = b""
