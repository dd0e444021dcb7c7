"""The summary and the followed records as terminal text: every value from the file escaped."""

from __future__ import annotations

import json
from typing import IO, Any

from pop3shield.eventview.aggregate import Aggregate
from pop3shield.events import rfc3339
from pop3shield.logsetup import escape

BAR = 40


def _s(value: Any) -> str:
    """Text from the file, safe for a terminal: no escape sequences, no line breaks."""
    return escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=True))


def _bar(n: int, most: int, width: int = BAR) -> str:
    return "#" * max(1, round(n * width / most)) if n and most else ""


def summary(agg: Aggregate, out: IO[str], top: int = 10) -> None:
    w = out.write
    span = (f"{rfc3339(agg.first)} .. {rfc3339(agg.last)}" if agg.first is not None and agg.last is not None
            else "no times")
    w(f"{agg.records} records ({agg.security} security events), {span}\n")
    if agg.malformed:
        w(f"{agg.malformed} malformed lines skipped\n")
    if agg.rate_limits_started or agg.suppressed:
        w(f"rate limit: {agg.rate_limits_started} times started, {agg.suppressed} events suppressed\n")
    rows = agg.by_protection_action.most_common()
    if rows:
        w("\nby protection and action:\n")
        width = max(len(_s(p)) for (p, _), _ in rows)
        for (protection, action), n in rows:
            w(f"  {_s(protection):<{width}}  {_s(action):<8} {n:>8}\n")
    actions = agg.by_action.most_common()
    if actions:
        w("\nby action:\n")
        for action, n in actions:
            w(f"  {_s(action):<8} {n:>8}\n")
    repeats = agg.repeats.most_common()
    if repeats:
        w("\nrepeats not written (detect mode, from closing records):\n")
        for protection, n in repeats:
            w(f"  {_s(protection)} {n}\n")
    for title, counter in (("top sources", agg.sources), ("top users", agg.users)):
        items = counter.most_common(top)
        if items:
            w(f"\n{title}{' (approximate)' if counter.approximate else ''}:\n")
            width = max(len(_s(k)) for k, _ in items)
            for key, n in items:
                w(f"  {_s(key):<{width}} {n:>8}\n")
    start, step, buckets = agg.histogram.rebin(24)
    if buckets:
        most = max(sum(c.values()) for _, c in buckets)
        w(f"\nsecurity events over time ({_duration(step)} a row):\n")
        for when, counts in buckets:
            n = sum(counts.values())
            w(f"  {rfc3339(when)[:19].replace('T', ' ')}  {n:>7} {_bar(n, most)}\n")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def record_line(data: dict[str, Any]) -> str:
    """One record as one terminal line (``--follow`` without ``--json``)."""
    kind = data.get("type")
    client = data.get("client") if isinstance(data.get("client"), dict) else {}
    address = client.get("address")
    where = f"{_s(address)}:{_s(client.get('port'))}" if client.get("port") is not None else _s(address)
    head = f"{_s(data.get('time'))} {_s(kind)}"
    if kind == "security":
        return (f"{head} {_s(data.get('action'))} {_s(data.get('protection'))} client={where} "
                f"user={_s(data.get('user'))} session={_s(data.get('session'))} "
                f"command={_s(data.get('command'))}: {_s(data.get('attack_info'))}")
    if kind == "summary":
        return f"{head} client={where} user={_s(data.get('user'))} repeats={_s(data.get('repeats'))}"
    if kind == "rate-limit":
        return (f"{head} {_s(data.get('scope'))} {_s(data.get('state'))} client={where} "
                f"limit={_s(data.get('limit_per_minute'))} suppressed={_s(data.get('suppressed'))}")
    return f"{head} {_s(data)}"
