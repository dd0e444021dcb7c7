"""Security events: one JSON object per line in the event file, and the same through twisted.logger.

An attacker must not be able to flood the log: the session already reports each protection once
per connection in ``detect`` mode, and this module adds a per-source and a global rate limit per
minute, with a summary record when one kicks in and when it ends. Counters per protection and
action are kept in memory (``EventLog.counters``). With ``queue_limit`` the file is written by a
thread of its own through a bounded queue (:class:`pop3shield.logsetup.QueuedWriter`), so a slow
disk never blocks the reactor; what a full queue drops is counted and said in the server log. :class:`RateLimiter` also limits the
per-session lines of the operational log (``pop3shield.protocol``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import Logger

from pop3shield.core.protections import SecurityEvent
from pop3shield.logsetup import DEFAULT_FLUSH_TIMEOUT, QueuedWriter

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
    """What one source (or everybody, for the global window) did in the current minute."""

    __slots__ = ("start", "count", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


@dataclass(frozen=True)
class RateNotice:
    """A limit started or stopped dropping records: ``source`` is None for the global limit."""

    source: str | None
    state: str  # "started" or "ended"
    limit: int
    suppressed: int = 0

    @property
    def scope(self) -> str:
        return "global" if self.source is None else "source"


class RateLimiter:
    """Fixed one-minute windows per source address and one for everybody.

    ``check`` says whether a record may be written and which summaries are due: a ``started``
    notice the first time a window drops a record, an ``ended`` one with the count once that
    window is over. Per-source windows live in an insertion-ordered dict: a renewed window is
    moved to the end, so the expired ones are always at the front and each call evicts at most
    ``EVICT_PER_CALL`` of them (bounded time); past ``max_sources`` the oldest window goes
    (the global window still bounds everything).
    """

    WINDOW = 60.0
    EVICT_PER_CALL = 8

    def __init__(self, per_source: int, global_limit: int | None, *, max_sources: int = 10000) -> None:
        self.per_source = per_source
        self.global_limit = global_limit
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Window] = OrderedDict()
        self._global: _Window | None = None

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, source: str, now: float) -> tuple[bool, list[RateNotice]]:
        notices: list[RateNotice] = []
        self._evict(now, notices)
        window = self._sources.get(source)
        if window is None or now - window.start >= self.WINDOW:
            if window is not None:
                self._ended(source, window, notices)
                del self._sources[source]
            while len(self._sources) >= self.max_sources:
                old_source, old = self._sources.popitem(last=False)
                self._ended(old_source, old, notices)
            window = self._sources[source] = _Window(now)
        overall = self._global
        if self.global_limit is not None and (overall is None or now - overall.start >= self.WINDOW):
            if overall is not None:
                self._ended(None, overall, notices)
            overall = self._global = _Window(now)
        if window.count >= self.per_source:
            window.suppressed += 1
            if window.suppressed == 1:
                notices.append(RateNotice(source, "started", self.per_source))
            return False, notices
        if overall is not None and self.global_limit is not None and overall.count >= self.global_limit:
            overall.suppressed += 1
            if overall.suppressed == 1:
                notices.append(RateNotice(None, "started", self.global_limit))
            return False, notices
        window.count += 1
        if overall is not None:
            overall.count += 1
        return True, notices

    def flush(self) -> list[RateNotice]:
        """The ``ended`` notices of every window still dropping records (at shutdown)."""
        notices: list[RateNotice] = []
        for source, window in self._sources.items():
            self._ended(source, window, notices)
        if self._global is not None:
            self._ended(None, self._global, notices)
        self._sources.clear()
        self._global = None
        return notices

    def _evict(self, now: float, notices: list[RateNotice]) -> None:
        for _ in range(self.EVICT_PER_CALL):
            if not self._sources:
                return
            source, window = next(iter(self._sources.items()))
            if now - window.start < self.WINDOW:
                return
            del self._sources[source]
            self._ended(source, window, notices)

    def _ended(self, source: str | None, window: _Window, notices: list[RateNotice]) -> None:
        if window.suppressed:
            limit = self.per_source if source is not None else (self.global_limit or 0)
            notices.append(RateNotice(source, "ended", limit, window.suppressed))
            window.suppressed = 0


class EventLog:
    """Writes security events; keeps counters; rate-limits per client address and overall."""

    def __init__(self, path: str | None, rate_limit: int = 60, clock: Callable[[], float] = time.time,
                 global_rate_limit: int | None = 600, queue_limit: int | None = None) -> None:
        self.path = path
        self.rate_limit = rate_limit
        self.global_rate_limit = global_rate_limit
        self.clock = clock
        self.counters: Counter[tuple[str, str]] = Counter()
        self.limiter = RateLimiter(rate_limit, global_rate_limit)
        self._file: IO[str] | None = None
        #: the writer thread of the event file (``queue_limit`` given), else None: direct writes
        self.writer: QueuedWriter | None = None
        if path:
            self._file = self._open(path)
            if queue_limit is not None:
                self.writer = QueuedWriter(self._file, limit=queue_limit, name="pop3shield-event-writer",
                                           on_notice=self._queue_notice)

    @staticmethod
    def _queue_notice(state: str, count: int) -> None:
        if state == "started":
            security_log.warn("event file writer queue full: dropping security event records",
                              state=state, dropped=count)
        else:
            security_log.warn("event file writer queue: {dropped} security event records dropped",
                              state=state, dropped=count)

    @staticmethod
    def _open(path: str) -> IO[str]:
        """Append-only, private, line-buffered: an event is on disk once its line is written."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def reopen(self) -> None:
        """Open ``path`` again (SIGHUP after logrotate renamed it): new records go to the new file.

        If it cannot be opened, the records keep going to the old file, and the error is raised.
        """
        if not self.path or self._file is None:
            return
        new = self._open(self.path)
        old, self._file = self._file, new
        if self.writer is not None:
            self.writer.swap(new)  # in order: what was queued goes to the old file, then it is closed
            return
        old.close()

    def close(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> None:
        """Write the summaries of limits still dropping records, then close the file.

        With a writer thread, what is queued is written first, waiting at most ``timeout``
        seconds; if the disk does not take it by then the file is left to the thread.
        """
        self._notify(self.limiter.flush())
        if self._file is not None:
            file, self._file = self._file, None
            if self.writer is not None:
                drained = self.writer.close(timeout)
                file = self.writer.stream
                if not drained:
                    return
            file.close()

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

    def backend_failure(self, ctx: SessionContext, reason: str) -> None:
        """A backend (a relay's upstream) broke the protocol or broke off: the session was ended.

        Rate-limited as one source of its own, ``backend``: a broken upstream hits every session.
        """
        self.counters[("backend", "closed")] += 1
        now = self.clock()
        if not self._admit("backend", now, ctx):
            return
        record = {
            "time": rfc3339(now),
            "type": "backend",
            "session": ctx.session,
            "client": {"address": ctx.client_address, "port": ctx.client_port},
            "user": ctx.user,
            "action": "closed",
            "reason": reason,
        }
        self._write(record)
        security_log.warn("backend failure, session {session} closed: {reason}", session=ctx.session,
                          reason=reason, event_record=record)

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
        admitted, notices = self.limiter.check(source, now)
        self._notify(notices)
        return admitted

    def _notify(self, notices: list[RateNotice]) -> None:
        """Say once that events are being dropped, and later how many were."""
        for notice in notices:
            record: dict[str, Any] = {"time": rfc3339(self.clock()), "type": "rate-limit", "scope": notice.scope}
            if notice.source is not None:
                record["client"] = {"address": notice.source}
            record["limit_per_minute"] = notice.limit
            record["state"] = notice.state
            if notice.state == "ended":
                record["suppressed"] = notice.suppressed
            self._write(record)
            who = "overall" if notice.source is None else "of {source}"
            what = ("rate-limited at {limit} a minute" if notice.state == "started"
                    else "rate limit ended: {suppressed} suppressed")
            security_log.warn(f"security events {who} {what}", source=notice.source,
                              state=notice.state, limit=notice.limit, suppressed=notice.suppressed)

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"
        if self.writer is not None:
            self.writer.write(line)
        else:
            self._file.write(line)
