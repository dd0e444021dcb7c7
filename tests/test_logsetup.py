"""The operational log: one path (twisted.logger, stdlib logging bridged in), safe one-line records,
JSON Lines that json and jq read, and bounded volume under a connection flood.

The unit tests format real twisted.logger events; the end-to-end tests run the real server
(subprocess, loopback) over a real Maildir and read its log file byte for byte.
"""

from __future__ import annotations

import io
import json
import logging
import os
import poplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
from twisted.logger import LogLevel, Logger, formatTime, globalLogPublisher
from twisted.python.failure import Failure

from pop3shield.logsetup import (
    TwistedLoggerHandler,
    escape,
    format_json,
    format_text,
    install_stdlib_bridge,
    make_observer,
)
from tests.support import require_binary
from tests.support.pop3shield_server import Pop3ShieldServer

HOSTILE = "evil\x1b[31mred\nFORGED [pop3shield.server#critical] owned\r\x85\u2028\x7f\x00"
HOSTILE_ESCAPED = r"evil\x1b[31mred\nFORGED [pop3shield.server#critical] owned\r\x85\u2028\x7f\x00"


def events_of(call) -> list[dict]:
    seen: list[dict] = []
    call(Logger(namespace="pop3shield.test", observer=seen.append))
    return seen


# --------------------------------------------------------------------------- escaping


def test_escape_covers_controls_del_c1_separators_bidi_and_surrogates() -> None:
    assert escape(HOSTILE) == HOSTILE_ESCAPED
    assert escape("a\tb\x9bc\u2029d\u202ee\u2066f\udcffg") == r"a\tb\x9bc\u2029d\u202ee\u2066f\udcffg"
    assert escape("plain ascii, ümlaut, 日本, back\\slash {braces}") == "plain ascii, ümlaut, 日本, back\\slash {braces}"


def test_text_line_is_escaped_whatever_the_field() -> None:
    [event] = events_of(lambda log: log.warn("user {user!s} sent {what}", user=HOSTILE, what="x\ny"))
    event["log_time"] = 1_800_000_000.0
    line = format_text(event)
    assert line == (f"{formatTime(1_800_000_000.0)} [pop3shield.test#warn] user {HOSTILE_ESCAPED} sent x\\ny\n")
    assert line.count("\n") == 1


def test_a_traceback_stays_on_the_line_in_text_and_json() -> None:
    try:
        raise ValueError("bad\nname\x1b")
    except ValueError:
        failure = Failure()
    [event] = events_of(lambda log: log.failure("commit of {session} failed", failure, session="abc123"))
    event["log_time"] = 1_800_000_000.5
    text = format_text(event)
    assert text.count("\n") == 1 and "\x1b" not in text
    assert "commit of abc123 failed | Traceback (most recent call last):\\n" in text
    assert "ValueError: bad\\nname\\x1b" in text
    record = json.loads(format_json(event))
    assert record["failure"].startswith("Traceback (most recent call last):\\n")
    assert "ValueError: bad\\nname\\x1b" in record["failure"]
    assert (record["level"], record["session"], record["message"]) == ("critical", "abc123", "commit of abc123 failed")


# --------------------------------------------------------------------------- JSON lines


def test_json_record_has_time_level_namespace_session_message_and_the_fields() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque\x1b"

    [event] = events_of(lambda log: log.info(
        "session {session} login user={user}", session="c6b9547f599e", user="al\nice", count=3,
        ratio=float("nan"), nested={"k": ["v\x1b", 1, None]}, thing=Opaque(), message="collides",
        event_record={"dup": True}))
    event["log_time"] = 1_800_000_000.1234
    line = format_json(event)
    assert line.endswith("\n") and line.count("\n") == 1 and "\x1e" not in line
    assert json.loads(line) == {
        "time": "2027-01-15T08:00:00.123Z", "level": "info", "namespace": "pop3shield.test",
        "session": "c6b9547f599e", "message": "session c6b9547f599e login user=al\\nice",
        "user": "al\\nice", "count": 3, "ratio": "nan", "nested": {"k": ["v\\x1b", 1, None]},
        "thing": "opaque\\x1b", "field_message": "collides",
    }


def test_json_observer_writes_json_lines_not_json_text_sequences() -> None:
    stream = io.StringIO()
    log = Logger(namespace="pop3shield.test", observer=make_observer("-", "json", "info", stream=stream))
    log.info("one {n}", n=1)
    log.warn("two")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["one 1", "two"]
    assert not stream.getvalue().startswith("\x1e")


def test_level_filter_runs_before_any_formatting() -> None:
    class Counting:
        calls = 0

        def __format__(self, spec: str) -> str:
            Counting.calls += 1
            return "formatted"

        __str__ = __repr__ = lambda self: self.__format__("")  # noqa: E731

    for fmt in ("text", "json"):
        Counting.calls = 0
        stream = io.StringIO()
        log = Logger(namespace="pop3shield.test", observer=make_observer("-", fmt, "info", stream=stream))
        log.debug("value {v}", v=Counting())
        assert (Counting.calls, stream.getvalue()) == (0, "")
        log.info("value {v}", v=Counting())
        assert Counting.calls >= 1 and "formatted" in stream.getvalue()


# --------------------------------------------------------------------------- stdlib bridge


def test_stdlib_records_reach_twisted_logger_with_level_namespace_args_and_failure() -> None:
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    logger = logging.getLogger("pop3shield.bridgetest")
    handler = TwistedLoggerHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("cannot delete %s in %s: {not a field}", "new/x\x1b", "/m")
        try:
            raise OSError("disk")
        except OSError:
            logger.exception("failed %d", 7)
    finally:
        logger.removeHandler(handler)
        globalLogPublisher.removeObserver(seen.append)
    warn, error = [e for e in seen if e.get("log_namespace") == "pop3shield.bridgetest"]
    assert warn["log_level"] is LogLevel.warn and warn["args"] == ("new/x\x1b", "/m")
    assert format_text(warn).endswith(r"[pop3shield.bridgetest#warn] cannot delete new/x\x1b in /m: {not a field}" + "\n")
    assert error["log_level"] is LogLevel.error
    assert error["log_failure"].check(OSError)
    assert json.loads(format_json(error))["failure"].endswith("OSError: disk\\n")


def test_install_stdlib_bridge_once_on_the_root_logger() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        first = install_stdlib_bridge("warn")
        second = install_stdlib_bridge("debug")
        ours = [h for h in root.handlers if isinstance(h, TwistedLoggerHandler)]
        assert ours == [second] and first not in root.handlers
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:] = before
        root.setLevel(level)


# --------------------------------------------------------------------------- the real server

NAME = os.fsencode("1700000001.M2P2.") + HOSTILE.replace("\x00", "").encode("utf-8") + b"\xff"
NAME_ESCAPED = "1700000001.M2P2." + HOSTILE_ESCAPED.replace(r"\x00", "") + r"\udcff"


def _hostile_maildir_delete(tmp_path: Path, fmt: str) -> Pop3ShieldServer:
    """A message whose name carries ESC, CR/LF, NEL, U+2028, DEL and a non-UTF-8 byte becomes a
    directory between DELE and QUIT: maildir.py's "cannot delete" warning names it."""
    # the template's last table is [logging]: this line lands in it
    server = Pop3ShieldServer(extra_toml=f'format = "{fmt}"')
    root = tmp_path / "mail"
    new = root / "alice" / "Maildir" / "new"
    new.mkdir(parents=True)
    message = os.path.join(os.fsencode(new), NAME)
    with open(message, "wb") as handle:
        handle.write(b"Subject: x\r\n\r\nbody\r\n")
    server.start(tmp_path / "run", {"alice": "alice-pw"}, root)
    try:
        client = poplib.POP3(server.host, server.port, timeout=10)
        client.user("alice")
        client.pass_("alice-pw")
        assert client.stat()[0] == 1
        client.dele(1)
        os.unlink(message)
        os.mkdir(message)
        with pytest.raises(poplib.error_proto):
            client.quit()
        client.close()
        deadline = time.monotonic() + 10
        while b"cannot delete" not in server.log_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    return server


def test_text_log_has_one_escaped_line_for_a_hostile_message_name(tmp_path: Path) -> None:
    server = _hostile_maildir_delete(tmp_path, "text")
    raw = server.log_path.read_bytes()
    assert b"\x1b" not in raw and b"\x85" not in raw and b"\xe2\x80\xa8" not in raw and b"\r" not in raw
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == ""
    assert not any(line.startswith("FORGED") for line in lines)
    [line] = [line for line in lines if "cannot delete" in line]
    assert f"[pop3shield.maildir#warn] cannot delete new/{NAME_ESCAPED} in {server.maildir_root}/alice/Maildir: " \
           f"[Errno 21] Is a directory: " in line, line


def test_json_log_is_json_lines_that_jq_reads_with_the_name_escaped(tmp_path: Path) -> None:
    jq = require_binary("jq")
    server = _hostile_maildir_delete(tmp_path, "json")
    raw = server.log_path.read_bytes()
    assert b"\x1e" not in raw and b"\x1b" not in raw
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    assert all(set(r) >= {"time", "level", "namespace", "message"} for r in records)
    [warning] = [r for r in records if r["namespace"] == "pop3shield.maildir"]
    assert warning["level"] == "warn"
    assert warning["message"].startswith(f"cannot delete new/{NAME_ESCAPED} in ")
    assert warning["args"][0] == f"new/{NAME_ESCAPED}"
    # the start-up probe's session and alice's
    probe, closed = [r for r in records if " closed (" in r["message"]]
    assert (probe["user"], probe["deleted"]) == ("-", "-")
    assert closed["session"] and closed["user"] == "alice" and closed["deleted"] == 0
    checked = subprocess.run([jq, "-c", ".", str(server.log_path)], capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert len(checked.stdout.splitlines()) == len(records)


def test_a_connection_flood_writes_a_bounded_log(tmp_path: Path) -> None:
    """300 connections from 127.0.0.1: the per-source limit (60 a minute) caps the session lines."""
    server = Pop3ShieldServer()
    root = tmp_path / "mail"
    server.start(tmp_path / "run", {"alice": "alice-pw"}, root)
    try:
        for _ in range(300):
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                assert sock.recv(512).startswith(b"+OK")
                sock.sendall(b"QUIT\r\n")
                assert sock.recv(512).startswith(b"+OK")
        deadline = time.monotonic() + 10
        while b"rate-limited at 60 a minute" not in server.log_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        server.stop()
    lines = server.log_path.read_text(encoding="utf-8").splitlines()
    closed = [line for line in lines if " closed (quit) client=127.0.0.1:" in line]
    assert len(closed) == 60, server.diagnostics()
    assert sum("session lines of 127.0.0.1 rate-limited at 60 a minute" in line for line in lines) == 1
    assert not any(" connect from " in line or " closing: " in line for line in lines)
    assert len(lines) <= 70, "\n".join(lines[:80])


def test_a_failed_emulation_is_logged_without_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """deep.py's warning reaches twisted.logger through the bridge, naming the error, not its text."""
    from pop3shield.mcp import deep, emulate

    secret = b"correct horse battery staple 2026 and more"

    def broken(windows, budget, pair=None):
        raise ValueError(f"hook choked on {secret!r}")

    monkeypatch.setattr(emulate, "AVAILABLE", True)
    monkeypatch.setattr(deep, "_static", lambda window: [])
    monkeypatch.setattr(deep, "_screen", lambda window: window)  # as if text could be a decoder
    monkeypatch.setattr(deep, "_emulate", broken)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    logger = logging.getLogger("pop3shield.mcp.deep")
    handler = TwistedLoggerHandler()
    logger.addHandler(handler)
    try:
        verdict = deep.deep_check(secret)
    finally:
        logger.removeHandler(handler)
        globalLogPublisher.removeObserver(seen.append)
    assert verdict.reasons == ("no-static-finding", "analysis-error")
    [event] = [e for e in seen if e.get("log_namespace") == "pop3shield.mcp.deep"]
    assert event["log_level"] is LogLevel.error and "log_failure" not in event
    text = format_text(event)
    assert text.endswith(f"[pop3shield.mcp.deep#error] emulation of a {len(secret)}-byte argument failed: "
                         f"ValueError at test_logsetup.py:{broken.__code__.co_firstlineno + 1} in broken\n")
    assert "horse" not in text and "horse" not in format_json(event)


def test_debug_lines_cost_nothing_once_the_server_logs_above_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's logger drops debug() before building the event when no observer takes it
    (begin_logging below debug), and emits it as twisted.logger does otherwise."""
    from pop3shield import logsetup

    seen: list[dict] = []
    log = logsetup.QuietDebugLogger(namespace="pop3shield.test", observer=seen.append)
    monkeypatch.setattr(logsetup, "_debug_wanted", False)
    log.debug("dropped {n}", n=1)
    log.info("kept {n}", n=2)
    assert [(e["log_level"], e["n"]) for e in seen] == [(LogLevel.info, 2)]
    monkeypatch.setattr(logsetup, "_debug_wanted", True)
    log.debug("kept {n}", n=3)
    assert [(e["log_level"], e["n"]) for e in seen[1:]] == [(LogLevel.debug, 3)]


@pytest.mark.parametrize("level, wanted", [("debug", True), ("info", False), ("warn", False)])
def test_begin_logging_says_whether_debug_lines_are_wanted(monkeypatch: pytest.MonkeyPatch, level: str,
                                                           wanted: bool) -> None:
    from pop3shield import logsetup

    monkeypatch.setattr(logsetup, "_debug_wanted", None)
    monkeypatch.setattr(logsetup, "install_stdlib_bridge", lambda level: None)
    monkeypatch.setattr(logsetup.globalLogBeginner, "beginLoggingTo", lambda *a, **k: None)
    monkeypatch.setattr(logsetup, "make_observer", lambda *a, **k: None)
    monkeypatch.setattr(logsetup, "_queued_observer", None)
    logsetup.begin_logging("-", "text", level)
    assert logsetup._debug_wanted is wanted
