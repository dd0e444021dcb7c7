"""Log and event writes go through a bounded queue to a writer thread: a slow disk never blocks."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from pop3shield.core.protections import SecurityEvent
from pop3shield.core.settings import Action
from pop3shield.events import EventLog, SessionContext
from pop3shield.logsetup import LineObserver, QueuedWriter, format_text


class GatedStream:
    """A file whose write blocks until the test opens the gate (a disk that stalls)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.closed = False

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _notice(state: str, count: int) -> str:
    return f"<{state} {count}>\n"


def _stalled(limit: int) -> tuple[GatedStream, QueuedWriter, list[tuple[str, int]]]:
    """A writer whose thread is stuck in the write of line 0."""
    stream = GatedStream()
    notices: list[tuple[str, int]] = []
    writer = QueuedWriter(stream, limit=limit, notice_line=_notice,
                          on_notice=lambda state, count: notices.append((state, count)))
    writer.write("line 0\n")
    assert stream.entered.wait(5)
    return stream, writer, notices


def test_a_stalled_disk_does_not_block_the_caller() -> None:
    stream, writer, _ = _stalled(limit=100)
    started = time.monotonic()
    for i in range(1, 1001):
        writer.write(f"line {i}\n")
    assert time.monotonic() - started < 1.0
    assert stream.lines == []  # nothing got through the stalled write
    stream.gate.set()
    assert writer.close(5)


def test_the_bound_holds_and_the_drop_counter_counts_exactly() -> None:
    stream, writer, notices = _stalled(limit=5)
    for i in range(1, 13):  # 5 fit in the queue, 7 are dropped
        writer.write(f"line {i}\n")
    assert writer.queued == 5
    assert writer.dropped == 7
    assert notices == [("started", 0)]  # said once, at the first drop
    stream.gate.set()
    assert writer.flush(5)
    writer.write("after\n")  # the first line admitted ends the run
    assert notices == [("started", 0), ("ended", 7)]
    assert writer.close(5)
    assert "".join(stream.lines) == "".join(["line 0\n", "line 1\n", "line 2\n", "line 3\n", "line 4\n",
                                             "line 5\n", "<started 0>\n", "<ended 7>\n", "after\n"])
    assert writer.dropped == 7


def test_order_is_kept() -> None:
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    writer = QueuedWriter(Sink(), limit=100000)  # type: ignore[arg-type]
    sent = [f"{i}\n" for i in range(20000)]
    for line in sent:
        writer.write(line)
    assert writer.close(10)
    assert "".join(lines) == "".join(sent)  # in order, in batches of what was queued
    assert writer.dropped == 0


def test_close_writes_what_is_queued() -> None:
    stream, writer, _ = _stalled(limit=50)
    for i in range(1, 31):
        writer.write(f"line {i}\n")
    threading.Timer(0.3, stream.gate.set).start()
    assert writer.close(10) is True
    assert "".join(stream.lines) == "".join(f"line {i}\n" for i in range(31))
    assert len(stream.lines) == 2  # line 0, then the 30 queued behind it in one write
    writer.write("late\n")  # after close: straight to the stream
    assert stream.lines[-1] == "late\n"


def test_close_waits_a_bounded_time_for_a_disk_that_never_comes_back() -> None:
    stream, writer, _ = _stalled(limit=50)
    writer.write("line 1\n")
    started = time.monotonic()
    assert writer.close(0.3) is False
    assert time.monotonic() - started < 2.0
    stream.gate.set()


def _fifo(tmp_path: Path) -> tuple[Path, int]:
    """A FIFO nobody reads yet: a reader end is open (so opening for writing does not block)."""
    path = tmp_path / "stalled.fifo"
    os.mkfifo(path, 0o600)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return path, reader


def _drain(reader: int, until: float) -> bytes:
    os.set_blocking(reader, False)
    data = b""
    while time.monotonic() < until:
        try:
            chunk = os.read(reader, 65536)
        except BlockingIOError:
            chunk = None
        if chunk:
            data += chunk
        else:
            time.sleep(0.02)
    return data


def test_event_file_on_a_fifo_nobody_reads(tmp_path: Path) -> None:
    """A real blocking file: the pipe fills, the caller goes on, the drops are counted and said."""
    path, reader = _fifo(tmp_path)
    assert stat.S_ISFIFO(path.stat().st_mode)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        log = EventLog(str(path), rate_limit=100000, global_rate_limit=100000, queue_limit=20)
        ctx = SessionContext("0123456789ab", "198.51.100.7", 50000, "192.0.2.1", 110)
        started = time.monotonic()
        for i in range(600):  # ~600 bytes each: far more than a pipe holds
            log.emit(SecurityEvent("max_line_length", Action.PREVENT, f"USER {'x' * 300}",
                                   {"length": i, "limit": 255}), ctx)
        assert time.monotonic() - started < 2.0
        assert log.writer is not None
        dropped = log.writer.dropped
        assert dropped > 0
        assert log.counters[("max_line_length", "prevent")] == 600  # counted even when not written
        data = _drain(reader, time.monotonic() + 1.5)
        log.close(5)
        data += _drain(reader, time.monotonic() + 0.3)
    finally:
        globalLogPublisher.removeObserver(seen.append)
        os.close(reader)
    records = [json.loads(line) for line in data.decode().splitlines()]
    lengths = [r["detail"]["length"] for r in records]
    assert len(lengths) == 600 - dropped  # everything not dropped arrives, exactly once
    assert lengths == sorted(lengths)  # in order
    notices = [e for e in seen if e.get("log_namespace") == "pop3shield.security" and "state" in e
               and "dropped" in e]
    # while the pipe still took lines the queue filled and drained in turns: each run of drops
    # is said when it starts and when it ends, with its count
    states = [n["state"] for n in notices]
    assert states == ["started", "ended"] * (len(states) // 2) and states
    assert sum(n["dropped"] for n in notices if n["state"] == "ended") == dropped
    assert all(n["log_level"] is LogLevel.warn for n in notices)


def test_server_log_says_where_lines_were_dropped() -> None:
    stream = GatedStream()
    observer = LineObserver(stream, format_text, queue_limit=2)  # type: ignore[arg-type]

    def event(text: str) -> dict:
        return {"log_namespace": "t", "log_level": LogLevel.info, "log_format": text, "log_time": 0.0}

    observer(event("first"))
    assert stream.entered.wait(5)
    for text in ("a", "b", "c", "d", "e"):
        observer(event(text))
    assert observer.writer is not None and observer.writer.dropped == 3
    stream.gate.set()
    assert observer.writer.flush(5)
    observer(event("later"))
    assert observer.close(5)
    written = "".join(stream.lines).splitlines(keepends=True)  # lines queued together are written together
    messages = [line.split("] ", 1)[1] for line in written]
    assert messages == ["first\n", "a\n", "b\n", "log writer queue full: dropping lines\n",
                        "log writer queue: 3 lines dropped\n", "later\n"]
    assert "[pop3shield.logwriter#warn]" in written[3]


def test_reopen_goes_through_the_same_thread(tmp_path: Path) -> None:
    """logrotate: every line before SIGHUP is in the old file, every line after it in the new one."""
    path = tmp_path / "server.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    observer = LineObserver(os.fdopen(fd, "a", buffering=1), format_text, path=str(path), queue_limit=100000)

    def event(i: int) -> dict:
        return {"log_namespace": "t", "log_level": LogLevel.info, "log_format": f"n={i}", "log_time": 0.0}

    for i in range(3000):
        observer(event(i))
    os.rename(path, tmp_path / "server.log.1")
    observer.reopen()
    for i in range(3000, 6000):
        observer(event(i))
    assert observer.close(10)

    def numbers(p: Path) -> list[int]:
        return [int(line.rsplit("n=", 1)[1]) for line in p.read_text().splitlines()]

    assert numbers(tmp_path / "server.log.1") == list(range(3000))
    assert numbers(path) == list(range(3000, 6000))


def test_event_file_reopen_and_close_keep_every_record(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), rate_limit=100000, global_rate_limit=100000, queue_limit=100000)
    ctx = SessionContext("0123456789ab", "198.51.100.7", 50000, "192.0.2.1", 110)
    for i in range(500):
        log.emit(SecurityEvent("max_commands", Action.DETECT, "NOOP", {"count": i}), ctx)
    os.rename(path, tmp_path / "events.jsonl.1")
    log.reopen()
    for i in range(500, 1000):
        log.emit(SecurityEvent("max_commands", Action.DETECT, "NOOP", {"count": i}), ctx)
    log.close()

    def counts(p: Path) -> list[int]:
        return [json.loads(line)["detail"]["count"] for line in p.read_text().splitlines()]

    assert counts(tmp_path / "events.jsonl.1") == list(range(500))
    assert counts(path) == list(range(500, 1000))
    assert log.writer is not None and log.writer.dropped == 0


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        QueuedWriter(GatedStream(), limit=0)  # type: ignore[arg-type]
