"""The security event log: record shape, counters, per-source rate limit with summaries."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.logger import LogLevel, globalLogPublisher

from pop3shield.core.protections import SecurityEvent
from pop3shield.core.settings import Action
from pop3shield.events import EventLog, RateLimiter, RateNotice, SessionContext, rfc3339


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ctx(address: str = "198.51.100.7", user: str | None = None) -> SessionContext:
    return SessionContext("a1b2c3d4e5f6", address, 50000, "192.0.2.1", 110, user)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_has_every_field_byte_exact(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), clock=Clock())
    log.emit(SecurityEvent("max_line_length", Action.PREVENT, "PASS <hidden, 4096 octets>",
                           {"length": 4103, "limit": 255}), ctx(user="alice"))
    log.close()
    assert path.read_text() == (
        '{"time":"2027-01-15T08:00:00.000Z","type":"security","session":"a1b2c3d4e5f6",'
        '"client":{"address":"198.51.100.7","port":50000},"server":{"address":"192.0.2.1","port":110},'
        '"user":"alice","protection":"max_line_length","attack_name":"POP3 Format Violation",'
        '"attack_info":"Command line is too long","action":"prevent","command":"PASS <hidden, 4096 octets>",'
        '"detail":{"length":4103,"limit":255}}\n')
    assert oct(path.stat().st_mode & 0o777) == "0o640"


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0.1234) == "1970-01-01T00:00:00.123Z"


def test_events_also_go_through_twisted_logger(tmp_path: Path) -> None:
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        EventLog(None).emit(SecurityEvent("stls", Action.DETECT, "STLS"), ctx())
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("log_namespace") == "pop3shield.security"]
    assert event["log_level"] is LogLevel.warn
    assert event["event_record"]["attack_info"] == "Illegal POP3 TLS session"


def test_counters_per_protection_and_action(tmp_path: Path) -> None:
    log = EventLog(None, clock=Clock())
    for _ in range(3):
        log.emit(SecurityEvent("stls", Action.DETECT, "STLS"), ctx())
    log.emit(SecurityEvent("stls", Action.PREVENT, "STLS"), ctx())
    assert log.counters == {("stls", "detect"): 3, ("stls", "prevent"): 1}


def test_rate_limit_per_source_with_start_and_end_summaries(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    clock = Clock()
    log = EventLog(str(path), rate_limit=5, clock=clock)
    for _ in range(12):
        log.emit(SecurityEvent("non_compliant", Action.PREVENT, "X"), ctx())
    log.emit(SecurityEvent("non_compliant", Action.PREVENT, "X"), ctx("203.0.113.5"))
    clock.now += 61
    log.emit(SecurityEvent("non_compliant", Action.PREVENT, "X"), ctx())
    log.close()
    kinds = [(r["type"], r["client"]["address"]) for r in records(path)]
    flood, other = "198.51.100.7", "203.0.113.5"
    assert kinds == [("security", flood)] * 5 + [("rate-limit", flood), ("security", other),
                                                  ("rate-limit", flood), ("security", flood)]
    started, ended = [r for r in records(path) if r["type"] == "rate-limit"]
    assert started == {"time": "2027-01-15T08:00:00.000Z", "type": "rate-limit", "scope": "source",
                       "client": {"address": flood}, "limit_per_minute": 5, "state": "started"}
    assert ended == {"time": "2027-01-15T08:01:01.000Z", "type": "rate-limit", "scope": "source",
                     "client": {"address": flood}, "limit_per_minute": 5, "state": "ended", "suppressed": 7}
    assert log.counters[("non_compliant", "prevent")] == 14


def test_global_cap_per_minute_over_many_sources_with_summaries(tmp_path: Path) -> None:
    """150 addresses each under their own limit: the global cap still bounds the file."""
    path = tmp_path / "events.jsonl"
    clock = Clock()
    log = EventLog(str(path), rate_limit=5, global_rate_limit=20, clock=clock)
    for round_ in range(3):
        for n in range(150):
            log.emit(SecurityEvent("non_compliant", Action.PREVENT, "X"), ctx(f"10.0.{n // 256}.{n % 256}"))
        clock.now += 1
    clock.now += 60
    log.emit(SecurityEvent("stls", Action.PREVENT, "STLS"), ctx("192.0.2.99"))
    log.close()
    lines = records(path)
    security = [r for r in lines if r["type"] == "security"]
    limits = [r for r in lines if r["type"] == "rate-limit"]
    assert len(security) == 21
    assert [r["client"]["address"] for r in security[:20]] == [f"10.0.0.{n}" for n in range(20)]
    assert security[20]["client"]["address"] == "192.0.2.99"
    assert limits == [
        {"time": "2027-01-15T08:00:00.000Z", "type": "rate-limit", "scope": "global",
         "limit_per_minute": 20, "state": "started"},
        {"time": "2027-01-15T08:01:03.000Z", "type": "rate-limit", "scope": "global",
         "limit_per_minute": 20, "state": "ended", "suppressed": 450 - 20},
    ]
    assert lines[-1]["type"] == "security"  # the summary comes before the first admitted event
    assert log.counters[("non_compliant", "prevent")] == 450


def test_summaries_of_a_quiet_source_are_written_at_close(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    clock = Clock()
    log = EventLog(str(path), rate_limit=2, clock=clock)
    for _ in range(5):
        log.emit(SecurityEvent("stls", Action.PREVENT, "STLS"), ctx())
    clock.now += 5
    log.close()
    assert [(r["type"], r.get("state"), r.get("suppressed")) for r in records(path)] == [
        ("security", None, None), ("security", None, None), ("rate-limit", "started", None),
        ("rate-limit", "ended", 3)]


def test_per_source_windows_are_evicted_in_bounded_steps() -> None:
    """Expired windows leave from the front, a few per call; a full table drops its oldest."""
    limiter = RateLimiter(1, None, max_sources=100)
    for n in range(100):
        assert limiter.check(f"192.0.2.{n}", n / 10) == (True, [])
    assert len(limiter) == 100
    # one more source while none has expired: the oldest window makes room
    assert limiter.check("198.51.100.1", 10.0) == (True, [])
    assert len(limiter) == 100
    # at t=200 all are expired: each call evicts at most EVICT_PER_CALL, adds one
    limiter.check("198.51.100.2", 200.0)
    assert len(limiter) == 100 - RateLimiter.EVICT_PER_CALL + 1
    for n in range(20):
        limiter.check("198.51.100.2", 200.0)
    assert len(limiter) == 1


def test_an_evicted_window_reports_what_it_suppressed() -> None:
    limiter = RateLimiter(1, None)
    assert limiter.check("a", 0.0) == (True, [])
    assert limiter.check("a", 1.0) == (False, [RateNotice("a", "started", 1)])
    assert limiter.check("a", 2.0) == (False, [])
    assert limiter.check("b", 61.0) == (True, [RateNotice("a", "ended", 1, 2)])


def test_session_summary_only_when_something_repeated(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), clock=Clock())
    log.session_summary(ctx(), {})
    log.session_summary(ctx(user="bob"), {"stls": 2, "empty_password": 1})
    log.close()
    [summary] = records(path)
    assert summary["type"] == "summary" and summary["user"] == "bob"
    assert summary["repeats"] == {"empty_password": 1, "stls": 2}
