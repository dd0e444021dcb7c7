"""pop3shield events: reading (gzip, malformed lines, over-long lines), filters, aggregation,
terminal and JSON output, the HTML report's escaping, and --follow across rotation (a real
subprocess)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pop3shield.cli import build_parser, main
from pop3shield.eventview import reader as reader_mod
from pop3shield.eventview.aggregate import Aggregate, BoundedCounter, Histogram
from pop3shield.eventview.filters import Filter, parse_source, parse_when
from pop3shield.eventview.follow import Follower
from pop3shield.eventview.reader import Progress, Reader, parse_time
from pop3shield.eventview.report import render
from tests.support.pop3shield_server import REPO_ROOT


def security(when: str, protection: str = "non_compliant", action: str = "prevent",
             address: str = "203.0.113.9", user: str | None = None, command: str = "US3R alice") -> dict:
    return {"time": when, "type": "security", "session": "c6b9547f599e",
            "client": {"address": address, "port": 40112}, "server": {"address": "192.0.2.1", "port": 110},
            "user": user, "protection": protection, "attack_name": "POP3 Format Violation",
            "attack_info": "Unknown command", "action": action, "command": command, "detail": {}}


def write(path: Path, records: list, extra: bytes = b"") -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" if not isinstance(r, bytes) else r for r in records) + extra
    path.write_bytes(data)
    return path


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    args = build_parser().parse_args(["events", *argv])
    code = args.func(args, out)
    return code, out.getvalue()


SAMPLE = [
    security("2026-12-04T10:00:00.000Z", "non_compliant", "prevent", "203.0.113.9"),
    security("2026-12-04T10:00:30.000Z", "non_compliant", "detect", "203.0.113.10", user="alice"),
    security("2026-12-04T10:05:00.000Z", "max_line_length", "prevent", "198.51.100.1", user="bob"),
    security("2026-12-04T11:00:00.000Z", "malicious_code", "prevent", "2001:db8::5", user="alice"),
    {"time": "2026-12-04T11:00:01.000Z", "type": "summary", "session": "s1",
     "client": {"address": "203.0.113.10", "port": 1}, "user": "alice", "repeats": {"non_compliant": 7}},
    {"time": "2026-12-04T11:01:00.000Z", "type": "rate-limit", "scope": "source",
     "client": {"address": "203.0.113.9"}, "limit_per_minute": 60, "state": "started"},
    {"time": "2026-12-04T11:02:00.000Z", "type": "rate-limit", "scope": "source",
     "client": {"address": "203.0.113.9"}, "limit_per_minute": 60, "state": "ended", "suppressed": 42},
]


# ----------------------------------------------------------------------------- reading


def test_malformed_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", [SAMPLE[0], b"not json\n", b"[1,2]\n", b'{"no":"type"}\n',
                                        b"\xff\xfe{\n", b"\n", b'{"type":"security","time":"yesterday"}\n',
                                        b"9" * 5000 + b"\n", b'{"a":' * 100000 + b"\n", SAMPLE[1]],
                 extra=b'{"type":"secu')  # a torn last line
    reader = Reader()
    records = list(reader.records([str(path)]))
    assert [r.data.get("time") for r in records] == ["2026-12-04T10:00:00.000Z", "yesterday",
                                                     "2026-12-04T10:00:30.000Z"]
    assert records[1].when is None
    assert reader.malformed == 7


def test_an_over_long_line_is_skipped_in_bounded_reads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reader_mod, "MAX_LINE", 400)  # a record is about 300
    path = write(tmp_path / "e.jsonl", [SAMPLE[0], b'{"type":"x","pad":"' + b"a" * 5000 + b'"}\n', SAMPLE[1]])
    reader = Reader()
    assert len(list(reader.records([str(path)]))) == 2
    assert reader.malformed == 1


def test_gzip_files_are_read_transparently_and_a_truncated_one_counts_once(tmp_path: Path) -> None:
    plain = write(tmp_path / "events.jsonl", SAMPLE[2:4])
    data = b"".join(json.dumps(r).encode() + b"\n" for r in SAMPLE[:2])
    (tmp_path / "events.jsonl.1.gz").write_bytes(gzip.compress(data))
    (tmp_path / "events.jsonl.2").write_bytes(gzip.compress(data))  # compressed, whatever the name
    (tmp_path / "torn.gz").write_bytes(gzip.compress(data * 50)[:-30])
    reader = Reader()
    names = [str(tmp_path / "events.jsonl.1.gz"), str(tmp_path / "events.jsonl.2"), str(plain)]
    assert len(list(reader.records(names))) == 6
    assert reader.malformed == 0
    torn = list(reader.records([str(tmp_path / "torn.gz")]))
    assert 0 < len(torn) < 100 and reader.malformed == 1


def test_parse_time() -> None:
    assert parse_time("2026-12-04T10:00:00.000Z") == 1796378400.0
    assert parse_time("2026-12-04T11:00:00+01:00") == 1796378400.0
    assert parse_time("2026-12-04T10:00:00") == 1796378400.0  # naive: UTC
    for bad in ("", "now", None, 17, "2026-13-01T00:00:00Z", "9" * 100):
        assert parse_time(bad) is None


def test_progress_only_on_a_terminal_and_only_after_a_moment() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    tty = Tty()
    progress = Progress(tty, clock=lambda: now[0])
    progress.update("events.jsonl", 10, 100)
    assert tty.getvalue() == ""  # not yet a moment
    now[0] = 1.5
    progress.update("ev\x1b[2Jx", 42, 100)
    assert tty.getvalue() == "\rreading ev\\x1b[2Jx: 42%\x1b[K"
    progress.done()
    assert tty.getvalue().endswith("\r\x1b[K")
    pipe = io.StringIO()
    quiet = Progress(pipe, clock=lambda: now[0])
    now[0] = 10.0
    quiet.update("events.jsonl", 50, 100)
    assert pipe.getvalue() == "" and not quiet.enabled


def test_the_reader_reports_progress_through_the_file(tmp_path: Path) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    ticks = iter(range(10_000))
    tty = Tty()
    path = write(tmp_path / "e.jsonl", SAMPLE[:1] * 5000)
    gz = tmp_path / "e.jsonl.1.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    reader = Reader(Progress(tty, clock=lambda: float(next(ticks))))
    assert sum(1 for _ in reader.records([str(gz), str(path)])) == 10000
    shown = tty.getvalue()
    assert f"\rreading {gz}: " in shown and f"\rreading {path}: " in shown
    assert shown.endswith("\r\x1b[K")  # the line is cleared at the end
    percentages = [int(part.split("%")[0]) for part in shown.split(f"reading {path}: ")[1:]]
    assert percentages == sorted(percentages) and 0 < percentages[-1] <= 100


# ----------------------------------------------------------------------------- filters


def test_relative_and_absolute_times() -> None:
    assert parse_when("30m", now=lambda: 10000.0) == 10000.0 - 1800
    assert parse_when("1h", now=lambda: 10000.0) == 10000.0 - 3600
    assert parse_when("2d", now=lambda: 1e6) == 1e6 - 2 * 86400
    assert parse_when("90s", now=lambda: 100.0) == 10.0
    assert parse_when("2026-12-04T10:00:00Z") == 1796378400.0
    assert parse_when("2026-12-04") == 1796342400.0
    with pytest.raises(ValueError):
        parse_when("last tuesday")


def _records(tmp_path: Path, records: list = SAMPLE) -> list:
    return list(Reader().records([str(write(tmp_path / "e.jsonl", records))]))


def test_filters(tmp_path: Path) -> None:
    records = _records(tmp_path)

    def times(selection: Filter) -> list[str]:
        return [r.data["time"][11:19] for r in records if selection.matches(r)]

    assert times(Filter(since=parse_when("2026-12-04T10:01:00Z"), until=parse_when("2026-12-04T11:00:30Z"))) == [
        "10:05:00", "11:00:00", "11:00:01"]
    assert times(Filter(protections=["non_compliant"])) == ["10:00:00", "10:00:30", "11:00:01"]  # the summary too
    assert times(Filter(protections=["malicious_code", "max_line_length"])) == ["10:05:00", "11:00:00"]
    assert times(Filter(sources=[parse_source("203.0.113.0/28")])) == [
        "10:00:00", "10:00:30", "11:00:01", "11:01:00", "11:02:00"]
    assert times(Filter(sources=[parse_source("203.0.113.9")])) == ["10:00:00", "11:01:00", "11:02:00"]
    assert times(Filter(sources=[parse_source("2001:db8::/32")])) == ["11:00:00"]
    assert times(Filter(users=["alice"])) == ["10:00:30", "11:00:00", "11:00:01"]
    assert times(Filter(users=["alice"], protections=["malicious_code"])) == ["11:00:00"]


def test_source_filter_sees_ipv4_mapped_addresses(tmp_path: Path) -> None:
    records = _records(tmp_path, [security("2026-12-04T10:00:00Z", address="::ffff:203.0.113.9")])
    assert Filter(sources=[parse_source("203.0.113.0/24")]).matches(records[0])
    assert not Filter(sources=[parse_source("198.51.100.0/24")]).matches(records[0])


def test_bad_filter_arguments_stop_with_a_usage_error(capsys) -> None:
    for argv in (["--since", "soon", "f"], ["--source", "example.org", "f"], ["--top", "0", "f"]):
        with pytest.raises(SystemExit) as exc:
            main(["events", *argv])
        assert exc.value.code == 2
    assert "is neither an ISO 8601 time" in capsys.readouterr().err


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_totals(tmp_path: Path) -> None:
    agg = Aggregate()
    agg.extend(_records(tmp_path))
    data = agg.as_json()
    assert data["records"] == 7 and data["security_events"] == 4
    assert data["by_protection"] == {"non_compliant": 2, "max_line_length": 1, "malicious_code": 1}
    assert data["by_action"] == {"prevent": 3, "detect": 1}
    assert {(r["protection"], r["action"]): r["count"] for r in data["by_protection_action"]} == {
        ("non_compliant", "prevent"): 1, ("non_compliant", "detect"): 1,
        ("max_line_length", "prevent"): 1, ("malicious_code", "prevent"): 1}
    assert data["top_users"] == [{"user": "alice", "count": 2}, {"user": "bob", "count": 1}]
    assert data["top_sources"][0]["count"] == 1 and len(data["top_sources"]) == 4
    assert data["detect_repeats"] == {"non_compliant": 7}
    assert data["rate_limits_started"] == 1 and data["suppressed"] == 42
    assert data["first"] == "2026-12-04T10:00:00.000Z" and data["last"] == "2026-12-04T11:02:00.000Z"
    assert sum(b["count"] for b in data["histogram"]["buckets"]) == 4
    assert [r["time"] for r in data["latest"]] == [r["time"] for r in SAMPLE[:4]]


def test_bounded_counter_keeps_the_frequent_keys() -> None:
    counter = BoundedCounter(limit=100)
    for _ in range(50):
        counter.add("attacker")
    for index in range(10000):
        counter.add(f"10.0.{index // 256}.{index % 256}")
    assert len(counter) <= 100
    assert counter.most_common(1) == [("attacker", 50)]
    assert counter.approximate


def test_histogram_coarsens_instead_of_growing() -> None:
    histogram = Histogram(width=60, max_buckets=16)  # minutes
    for minute in range(1000):
        histogram.add(minute * 60.0, "non_compliant")
    histogram.add(-1e12, "x")  # a forged time far away
    assert len(histogram.buckets) <= 16
    assert sum(sum(c.values()) for c in histogram.buckets.values()) == 1001
    _, _, rows = histogram.rebin(5)
    assert len(rows) <= 5 and sum(sum(c.values()) for _, c in rows) == 1001


def test_latest_and_memory_stay_bounded() -> None:
    from pop3shield.eventview.reader import Record

    agg = Aggregate(latest=5)
    for index in range(20000):
        agg.add(Record(security(f"2026-12-04T10:00:00Z", protection=f"p{index % 100}", address=f"10.{index}",
                                user=f"u{index}"), 1796378400.0 + index))
    assert len(agg.latest) == 5 and len(agg.users) <= 10000 and len(agg.histogram.series) == 33  # 32 and (other)
    assert agg.security == 20000


# ----------------------------------------------------------------------------- output


def test_terminal_summary_escapes_what_the_file_says(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", [*SAMPLE, security("2026-12-04T10:00:00Z", user="ev\x1b[2Jil\nx")])
    code, text = run_cli([str(path)])
    assert code == 0
    assert text.startswith("8 records (5 security events), 2026-12-04T10:00:00.000Z .. 2026-12-04T11:02:00.000Z\n")
    assert "  non_compliant    prevent         2\n" in text
    assert "rate limit: 1 times started, 42 events suppressed\n" in text
    assert "ev\\x1b[2Jil\\nx" in text and "\x1b" not in text
    assert "security events over time" in text


def test_json_output_with_filters(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", SAMPLE)
    code, text = run_cli([str(path), "--json", "--protection", "non_compliant,malicious_code",
                          "--source", "203.0.113.0/24", "--source", "2001:db8::/32"])
    data = json.loads(text)
    assert code == 0 and data["security_events"] == 3
    assert data["by_protection"] == {"non_compliant": 2, "malicious_code": 1}
    assert data["rate_limits_started"] == 0  # rate-limit records have no protection


def test_html_report_escapes_everything_and_loads_nothing(tmp_path: Path) -> None:
    nasty = '<script>alert(1)</script>"\'&'
    records = [security("2026-12-04T10:00:00Z", user=nasty, command=f"USER {nasty}", address="203.0.113.9"),
               security("2026-12-04T10:00:00Z", protection=f"<b>{nasty}", action="<i>")]
    path = write(tmp_path / "e.jsonl", records)
    report = tmp_path / "r.html"
    code, _ = run_cli([str(path), "--html", str(report)])
    page = report.read_text(encoding="utf-8")
    assert code == 0
    assert "<script" not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in page
    assert "default-src 'none'" in page
    for external in ("http://", "https://", "src=", "@import", "url("):
        assert external not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert '<b id="total-security">2</b>' in page


def test_report_of_no_events(tmp_path: Path) -> None:
    page = render(Aggregate(), ["empty.jsonl"])
    assert "no security events" in page and '<b id="total-security">0</b>' in page


def test_a_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["events", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err == f"pop3shield: {tmp_path / 'nope.jsonl'}: not a readable file\n"


# ----------------------------------------------------------------------------- follow


def test_follower_handles_rename_and_create_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"one\ntw")
    bad = []
    follower = Follower(str(path), lambda: bad.append(1))
    assert follower.poll() == [b"one"]
    with open(path, "ab") as handle:
        handle.write(b"o\n")
    assert follower.poll() == [b"two"]
    with open(path, "ab") as handle:
        handle.write(b"three\nfour")  # then rotated, the last line without its newline
    os.rename(path, tmp_path / "events.jsonl.1")
    assert follower.poll() == [b"three"]  # no new file yet: still reading the old one
    path.write_bytes(b"five\n")
    assert follower.poll() == [b"four", b"five"]
    path.write_bytes(b"six\n")  # truncated in place (copytruncate), then written
    assert follower.poll() == [b"six"]
    follower.close()
    assert bad == []


def test_follow_across_rotation_in_a_real_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write(path, [SAMPLE[0], SAMPLE[2]])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pop3shield", "events", "--follow", "--json", "--interval", "0.1",
                             "--protection", "non_compliant", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path))
    try:
        def next_record() -> dict:
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            return json.loads(line)

        assert next_record()["time"] == SAMPLE[0]["time"]  # the latest matching one, first
        with open(path, "a") as handle:
            handle.write(json.dumps(security("2026-12-04T12:00:00.000Z")) + "\n")
            handle.write(json.dumps(security("2026-12-04T12:00:01.000Z", protection="max_line_length")) + "\n")
        assert next_record()["time"] == "2026-12-04T12:00:00.000Z"
        # logrotate: rename, a last line into the old file (the server has not reopened yet), create
        os.rename(path, tmp_path / "events.jsonl.1")
        with open(tmp_path / "events.jsonl.1", "a") as handle:
            handle.write(json.dumps(security("2026-12-04T12:00:02.000Z")) + "\n")
        time.sleep(0.3)
        write(path, [security("2026-12-04T12:00:03.000Z"), b"garbage\n", security("2026-12-04T12:00:04.000Z")])
        assert next_record()["time"] == "2026-12-04T12:00:02.000Z"
        assert next_record()["time"] == "2026-12-04T12:00:03.000Z"
        assert next_record()["time"] == "2026-12-04T12:00:04.000Z"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_following_a_compressed_file_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "e.gz").write_bytes(gzip.compress(b"{}\n"))
    assert main(["events", "--follow", str(tmp_path / "e.gz")]) == 2
    assert "cannot follow a compressed file" in capsys.readouterr().err


def test_latest_keeps_a_bounded_copy_of_each_record(tmp_path: Path) -> None:
    huge = security("2026-12-04T10:00:00Z", command="USER " + "x" * 500_000, user="u" * 300_000)
    huge["detail"] = {"blob": "y" * 100_000}
    huge["client"]["extra"] = "z" * 100_000
    agg = Aggregate()
    agg.extend(_records(tmp_path, [huge]))
    kept = agg.latest[0]
    assert len(json.dumps(kept)) < 3000
    assert kept["client"] == {"address": "203.0.113.9", "port": 40112} and "detail" not in kept
    assert kept["command"].startswith("USER xxx") and kept["command"].endswith("...")


def test_a_closed_pipe_is_not_a_traceback(tmp_path: Path) -> None:
    """``--follow | head -1``: the second write fails, the command ends quietly, exit status 0."""
    path = write(tmp_path / "e.jsonl", SAMPLE * 2000)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(f"'{sys.executable}' -m pop3shield events --follow --json --latest 10000 '{path}' | head -1;"
                          " echo \"status=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env=env, timeout=60)
    first, status = done.stdout.splitlines()
    assert json.loads(first)["type"] == "security"
    assert status == "status=0" and done.stderr == ""
