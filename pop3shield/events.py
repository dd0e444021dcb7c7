"""Security events: one JSON object per line in the event file, and the same through twisted.logger.

An attacker must not be able to flood the log: the session already reports each protection once
per connection in ``detect`` mode, and this module adds a per-source rate limit with a summary
line when it kicks in. Counters per protection and action are kept for the metrics endpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import Logger

from pop3shield.core.protections import SecurityEvent

security_log = Logger(namespace="pop3shield.security")


@dataclass(frozen=True)
class SessionContext:
    """Who an event is about; filled in by the protocol."""

    session: str
    client_address: str | None
    client_port: int | None
    server_address: str | None
    server_port: int | None
    user: str | None = None


def rfc3339(when: float) -> str:
    """UTC with milliseconds, the way SIEMs parse it."""
    stamp = datetime.fromtimestamp(when, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


class _Window:
    """Events of one source in the current minute."""

    __slots__ = ("start", "count", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


class EventLog:
    """Writes security events; keeps counters; rate-limits per client address."""

    def __init__(self, path: str | None, rate_limit: int = 60, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.rate_limit = rate_limit
        self.clock = clock
        self.counters: Counter[tuple[str, str]] = Counter()
        self._windows: dict[str, _Window] = {}
        self._file: IO[str] | None = None
        if path:
            self._file = self._open(path)

    @staticmethod
    def _open(path: str) -> IO[str]:
        """Append-only, private, line-buffered: an event is on disk once its line is written."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def emit(self, event: SecurityEvent, ctx: SessionContext) -> None:
        """Count the event; write it unless its source is over the rate limit."""
        self.counters[(event.protection, event.action.value)] += 1
        now = self.clock()
        if not self._admit(ctx.client_address or "-", now, ctx):
            return
        record = {
            "time": rfc3339(now),
            "type": "security",
            "session": ctx.session,
            "client": {"address": ctx.client_address, "port": ctx.client_port},
            "server": {"address": ctx.server_address, "port": ctx.server_port},
            "user": ctx.user,
            "protection": event.protection,
            "attack_name": event.attack_name,
            "attack_info": event.attack_info,
            "action": event.action.value,
            "command": event.command,
            "detail": event.detail,
        }
        self._write(record)
        security_log.warn(
            "{attack_name}: {attack_info} ({action}) session={session} client={client} command={command!r}",
            attack_name=event.attack_name,
            attack_info=event.attack_info,
            action=event.action.value,
            session=ctx.session,
            client=f"{ctx.client_address}:{ctx.client_port}",
            command=event.command,
            event_record=record,
        )

    def session_summary(self, ctx: SessionContext, repeats: dict[str, int]) -> None:
        """The closing record of a connection whose detect-mode events repeated."""
        if not repeats:
            return
        self._write({
            "time": rfc3339(self.clock()),
            "type": "summary",
            "session": ctx.session,
            "client": {"address": ctx.client_address, "port": ctx.client_port},
            "user": ctx.user,
            "repeats": dict(sorted(repeats.items())),
        })

    def _admit(self, source: str, now: float, ctx: SessionContext) -> bool:
        window = self._windows.get(source)
        if window is None or now - window.start >= 60.0:
            if window is not None and window.suppressed:
                self._rate_summary(source, window, ctx, ended=True)
            window = self._windows[source] = _Window(now)
            self._prune(now)
        window.count += 1
        if window.count <= self.rate_limit:
            return True
        window.suppressed += 1
        if window.suppressed == 1:
            self._rate_summary(source, window, ctx, ended=False)
        return False

    def _rate_summary(self, source: str, window: _Window, ctx: SessionContext, *, ended: bool) -> None:
        """Say once that events of a source are being dropped, and later how many were."""
        record: dict[str, Any] = {
            "time": rfc3339(self.clock()),
            "type": "rate-limit",
            "client": {"address": source},
            "limit_per_minute": self.rate_limit,
            "state": "ended" if ended else "started",
        }
        if ended:
            record["suppressed"] = window.suppressed
        self._write(record)
        security_log.warn("security events of {source} rate-limited ({state})", source=source, state=record["state"])

    def _prune(self, now: float) -> None:
        """Forget quiet sources so the table cannot grow without bound."""
        if len(self._windows) < 10000:
            return
        for source in [s for s, w in self._windows.items() if now - w.start >= 60.0]:
            del self._windows[source]

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n")
