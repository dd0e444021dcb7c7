"""SIGHUP (``systemctl reload``, logrotate's postrotate) reopens the server log and the event file:
after a rename, new lines land in new files, and nothing more in the renamed ones."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

from pop3shield.events import EventLog
from pop3shield.logsetup import LineObserver, format_text
from tests.support.messages import write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD, Client


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _attack(server: Pop3ShieldServer, data: bytes) -> None:
    client = Client(server)
    client.send(data)
    assert client.line().startswith(b"-ERR")
    assert client.closed()
    client.close()


def test_sighup_reopens_the_log_and_the_event_file(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer()
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        _attack(server, b"USER <before-rotation>\r\n")
        assert _wait_for(lambda: "before-rotation" in server.events_path.read_text())
        assert _wait_for(lambda: " closed (" in server.log_path.read_text())
        old_log, old_events = server.log_path.with_suffix(".log.1"), server.events_path.with_suffix(".jsonl.1")
        os.rename(server.log_path, old_log)  # what logrotate does (without copytruncate)
        os.rename(server.events_path, old_events)
        os.kill(server.proc.pid, signal.SIGHUP)
        assert _wait_for(lambda: server.log_path.exists() and server.events_path.exists()), server.diagnostics()
        assert _wait_for(lambda: "SIGHUP: log and event files reopened" in server.log_path.read_text())
        _attack(server, b"USER <after-rotation>\r\n")
        assert _wait_for(lambda: "after-rotation" in server.events_path.read_text())
        assert _wait_for(lambda: server.log_path.read_text().count(" closed (") >= 1)
        assert server.proc.poll() is None  # SIGHUP did not stop it
    finally:
        server.stop()
    assert "before-rotation" in old_events.read_text() and "after-rotation" not in old_events.read_text()
    assert "before-rotation" not in server.events_path.read_text()
    old, new = old_log.read_text(), server.log_path.read_text()
    assert "SIGHUP" not in old and "Main loop terminated" in new
    assert "after-rotation" not in old


def test_event_log_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = EventLog(str(path))
    events._write({"n": 1})
    os.rename(path, tmp_path / "events.jsonl.1")
    events.reopen()
    events._write({"n": 2})
    events.close()
    assert (tmp_path / "events.jsonl.1").read_text() == '{"n":1}\n'
    assert path.read_text() == '{"n":2}\n'
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    EventLog(None).reopen()  # no file: nothing to do


def test_line_observer_reopen_keeps_the_old_file_when_the_new_cannot_be_opened(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "server.log"
    from pop3shield.logsetup import open_log

    observer = LineObserver(open_log(str(path)), format_text, path=str(path))
    event = {"log_format": "one", "log_namespace": "t", "log_time": 0.0, "log_level": None}
    observer(event)
    os.rename(path, tmp_path / "server.log.1")
    directory.chmod(0o500)
    try:
        if os.access(directory, os.W_OK):  # root ignores the mode: take the directory away instead
            directory.chmod(0o700)
            os.rmdir(directory)
        try:
            observer.reopen()
        except OSError:
            pass
        else:
            raise AssertionError("reopen into a missing or read-only directory did not fail")
        observer(dict(event, log_format="two"))
    finally:
        if directory.exists():
            directory.chmod(0o700)
    assert (tmp_path / "server.log.1").read_text().count("] one") == 1
    assert "] two" in (tmp_path / "server.log.1").read_text()
    LineObserver(io.StringIO(), format_text).reopen()  # a stream without a path: nothing to do


def test_logrotate_with_the_example_file(tmp_path: Path) -> None:
    """The example logrotate file, run for real (twice, forced) against a running server: the
    renamed files stop growing, new lines go to new files, and ``pop3shield events`` reads the
    whole set, the compressed rotation included."""
    import json
    import subprocess
    import sys

    from tests.support import require_binary
    from tests.support.pop3shield_server import REPO_ROOT

    logrotate = require_binary("logrotate")
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer()
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    run = tmp_path / "run"
    text = (REPO_ROOT / "etc" / "logrotate.d" / "pop3shield").read_text()
    text = text.replace("/var/log/pop3shield/pop3shield.log", str(server.log_path))
    text = text.replace("/var/log/pop3shield/events.jsonl", str(server.events_path))
    text = text.replace("create 0640 vmail vmail", "create 0640")  # no vmail account here
    start = text.index("        systemctl kill")
    text = text[:start] + f"        kill -HUP {server.proc.pid}\n" + text[text.index("    endscript"):]
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)

    def rotate() -> None:
        done = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        for round_ in range(3):
            _attack(server, f"USER <round-{round_}>\r\n".encode())
            assert _wait_for(lambda: f"round-{round_}" in server.events_path.read_text())
            if round_ < 2:
                rotate()
                assert _wait_for(lambda: "SIGHUP: log and event files reopened" in server.log_path.read_text())
    finally:
        server.stop()
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("events.jsonl"))
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2.gz"]
    assert "round-2" in server.events_path.read_text() and "round-1" in (run / "events.jsonl.1").read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    files = [str(run / "events.jsonl.2.gz"), str(run / "events.jsonl.1"), str(server.events_path)]
    done = subprocess.run([sys.executable, "-m", "pop3shield", "events", "--json", *files],
                          capture_output=True, text=True, timeout=60, env=env)
    summary = json.loads(done.stdout)
    assert summary["security_events"] == 3 and summary["malformed"] == 0
    assert [e["command"] for e in summary["latest"]] == [f"USER <round-{n}>" for n in range(3)]
