"""Counters over a stream of records: bounded memory whatever the file holds.

Only counters are kept, never the records, except the latest ``latest`` security events. The
keys an attacker chooses (source addresses, user names, protections of a forged file) go into
:class:`BoundedCounter`s, and the time histogram coarsens its buckets instead of growing.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Hashable, Iterable
from typing import Any

from pop3shield.eventview.reader import Record

OTHER = "(other)"


class BoundedCounter:
    """A Counter with at most ``limit`` keys: past it, the smaller half is folded into ``dropped``.

    With fewer distinct keys than ``limit`` (every real case) the counts are exact; otherwise
    the top of the list is still right for keys that are frequent, and :attr:`approximate` says so.
    """

    def __init__(self, limit: int = 10000) -> None:
        self.limit = limit
        self.counts: Counter[Hashable] = Counter()
        self.dropped = 0

    def add(self, key: Hashable, n: int = 1) -> None:
        self.counts[key] += n
        if len(self.counts) > self.limit:
            keep = self.counts.most_common(self.limit // 2)
            self.dropped += sum(self.counts.values()) - sum(n for _, n in keep)
            self.counts = Counter(dict(keep))

    @property
    def approximate(self) -> bool:
        return self.dropped > 0

    def most_common(self, n: int | None = None) -> list[tuple[Any, int]]:
        return sorted(self.counts.items(), key=lambda item: (-item[1], str(item[0])))[:n]

    def __len__(self) -> int:
        return len(self.counts)


class Histogram:
    """Events per time bucket and protection; buckets double in width past ``max_buckets``."""

    def __init__(self, width: float = 1.0, max_buckets: int = 2048, max_series: int = 32) -> None:
        self.width = width
        self.max_buckets = max_buckets
        self.max_series = max_series
        self.buckets: dict[int, Counter[str]] = {}
        self.series: Counter[str] = Counter()
        self._lo: int | None = None  # the first and last bucket keys, kept as they change
        self._hi: int | None = None

    def add(self, when: float, series: str) -> None:
        if not math.isfinite(when):
            return
        if series not in self.series and len(self.series) >= self.max_series:
            series = OTHER
        self.series[series] += 1
        key = int(when // self.width)
        self.buckets.setdefault(key, Counter())[series] += 1
        self._lo = key if self._lo is None else min(self._lo, key)
        self._hi = key if self._hi is None else max(self._hi, key)
        while len(self.buckets) > self.max_buckets or self._span() > 64 * self.max_buckets:
            self._coarsen()

    def _span(self) -> int:
        return self._hi - self._lo + 1 if self._lo is not None and self._hi is not None else 0

    def _coarsen(self) -> None:
        merged: dict[int, Counter[str]] = {}
        for key, counts in self.buckets.items():
            merged.setdefault(key // 2, Counter()).update(counts)
        self.buckets = merged
        self.width *= 2
        self._lo, self._hi = min(merged), max(merged)

    def rebin(self, rows: int) -> tuple[float, float, list[tuple[float, Counter[str]]]]:
        """At most ``rows`` equal buckets from the first to the last event: (start, width, rows)."""
        if not self.buckets:
            return 0.0, self.width, []
        first, last = min(self.buckets), max(self.buckets)
        per_row = max(1, math.ceil((last - first + 1) / rows))
        out: list[tuple[float, Counter[str]]] = []
        count = math.ceil((last - first + 1) / per_row)
        for index in range(count):
            out.append(((first + index * per_row) * self.width, Counter()))
        for key, counts in self.buckets.items():
            out[(key - first) // per_row][1].update(counts)
        return first * self.width, per_row * self.width, out


class Aggregate:
    """Everything the terminal summary, ``--json`` and ``--html`` show."""

    def __init__(self, latest: int = 50, top: int = 10) -> None:
        self.top = top
        self.records = 0
        self.types: Counter[str] = Counter()
        self.security = 0
        self.by_protection_action = BoundedCounter(1024)
        self.by_action = BoundedCounter(64)
        self.sources = BoundedCounter()
        self.users = BoundedCounter()
        self.repeats = BoundedCounter(1024)
        self.rate_limits_started = 0
        self.suppressed = 0
        self.first: float | None = None
        self.last: float | None = None
        self.histogram = Histogram()
        self.latest: deque[dict[str, Any]] = deque(maxlen=latest)
        self.malformed = 0

    def add(self, record: Record) -> None:
        data = record.data
        kind = record.type if len(record.type) <= 32 else OTHER
        self.records += 1
        if kind in self.types or len(self.types) < 16:
            self.types[kind] += 1
        else:
            self.types[OTHER] += 1
        if record.when is not None:
            self.first = record.when if self.first is None else min(self.first, record.when)
            self.last = record.when if self.last is None else max(self.last, record.when)
        if kind == "security":
            self.security += 1
            protection = _text(data.get("protection"))
            action = _text(data.get("action"))
            self.by_protection_action.add((protection, action))
            self.by_action.add(action)
            client = data.get("client")
            self.sources.add(_text(client.get("address") if isinstance(client, dict) else None))
            user = data.get("user")
            if isinstance(user, str):
                self.users.add(_text(user))
            if record.when is not None:
                self.histogram.add(record.when, protection)
            self.latest.append(data if record.size <= SMALL_RECORD else _trimmed(data))
        elif kind == "summary":
            repeats = data.get("repeats")
            if isinstance(repeats, dict):
                for protection, n in list(repeats.items())[:64]:
                    if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 53:
                        self.repeats.add(_text(protection), n)
        elif kind == "rate-limit":
            if data.get("state") == "started":
                self.rate_limits_started += 1
            n = data.get("suppressed")
            if data.get("state") == "ended" and isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 53:
                self.suppressed += n

    def extend(self, records: Iterable[Record]) -> None:
        for record in records:
            self.add(record)

    def by_protection(self) -> list[tuple[str, int]]:
        totals: Counter[str] = Counter()
        for (protection, _), n in self.by_protection_action.counts.items():
            totals[protection] += n
        return sorted(totals.items(), key=lambda item: (-item[1], item[0]))

    def as_json(self) -> dict[str, Any]:
        """The summary as plain JSON values (``--json``)."""
        from pop3shield.events import rfc3339

        start, width, rows = self.histogram.rebin(60)
        return {
            "records": self.records,
            "malformed": self.malformed,
            "types": dict(sorted(self.types.items())),
            "security_events": self.security,
            "first": rfc3339(self.first) if self.first is not None else None,
            "last": rfc3339(self.last) if self.last is not None else None,
            "by_protection": dict(self.by_protection()),
            "by_action": dict(self.by_action.most_common()),
            "by_protection_action": [{"protection": p, "action": a, "count": n}
                                     for (p, a), n in self.by_protection_action.most_common()],
            "top_sources": [{"address": k, "count": n} for k, n in self.sources.most_common(self.top)],
            "top_users": [{"user": k, "count": n} for k, n in self.users.most_common(self.top)],
            "approximate": self.sources.approximate or self.users.approximate,
            "detect_repeats": dict(self.repeats.most_common()),
            "rate_limits_started": self.rate_limits_started,
            "suppressed": self.suppressed,
            "histogram": {"bucket_seconds": width,
                          "buckets": [{"start": rfc3339(t), "count": sum(c.values()),
                                       "by_protection": dict(sorted(c.items()))} for t, c in rows]},
            "latest": list(self.latest),
        }


def _text(value: Any, limit: int = 200) -> str:
    """A key from the file as bounded text (``-`` for a missing one)."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


#: a record of the server's own is well under this: kept as it is in the latest N
SMALL_RECORD = 4096
#: what the latest-events table and --json keep of a record, each string cut to LATEST_TEXT
LATEST_FIELDS = ("time", "type", "session", "client", "user", "protection", "attack_name", "attack_info",
                 "action", "command")
LATEST_TEXT = 1000


def _trimmed(data: dict[str, Any]) -> dict[str, Any]:
    """A bounded copy of a record for the latest N (a forged line may be a megabyte)."""
    out: dict[str, Any] = {}
    for key in LATEST_FIELDS:
        value = data.get(key)
        if isinstance(value, str):
            value = _text(value, LATEST_TEXT)
        elif isinstance(value, dict):
            value = {k: (_text(v, 100) if isinstance(v, str) else v if isinstance(v, (int, float)) else None)
                     for k, v in list(value.items())[:4] if isinstance(k, str) and k in ("address", "port")}
        elif not (value is None or isinstance(value, (int, float, bool))):
            value = _text(str(value), LATEST_TEXT)
        if key in data:
            out[key] = value
    return out
