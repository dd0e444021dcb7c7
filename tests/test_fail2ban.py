"""fail2ban: the filter in etc/fail2ban matches, with ``fail2ban-regex``, every ``prevent`` event and
every connection with a failed login in an event file and a server log written by a real
pop3shield, with the client's address, and nothing from honest sessions of real clients."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import require_binary
from tests.support.clients import fetch_with_curl, fetch_with_poplib
from tests.support.messages import write_maildir
from tests.support.pop3shield_server import REPO_ROOT, Pop3ShieldServer
from tests.support.raw import PASSWORD, Client, b64

FILTER = REPO_ROOT / "etc" / "fail2ban" / "filter.d" / "pop3shield.conf"
JAIL = REPO_ROOT / "etc" / "fail2ban" / "jail.d" / "pop3shield.conf"
SERVER = "auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0"

#: sessions refused by a protection in prevent mode, one connection each
ATTACKS = [b"USER " + b"a" * 300 + b"\r\n", b"US3R alice\r\n", b"GET / HTTP/1.1\r\n", b"USER al\x00ice\r\n",
           b"QUIT now\r\n", b"USER\r\n"]
#: failed logins: USER/PASS twice in one connection, AUTH PLAIN once in another, a name nobody has
FAILED_LOGIN_SESSIONS = [
    [b"USER alice\r\n", b"PASS wrong-one\r\n", b"USER alice\r\n", b"PASS wrong-two\r\n"],
    [b"AUTH PLAIN " + b64(b"\0alice\0not-it") + b"\r\n"],
    [b"USER mallory\r\n", b"PASS guess\r\n"],
]


def _run(tmp: Path, work: str) -> Pop3ShieldServer:
    root = tmp / work / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER)
    server.start(tmp / work / "run", {"alice": PASSWORD}, root)
    return server


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3ShieldServer]:
    server = _run(tmp_path_factory.mktemp("f2b"), "attacked")
    try:
        for data in ATTACKS:
            client = Client(server)
            client.send(data)
            assert client.line().startswith(b"-ERR")
            client.close()
        for session in FAILED_LOGIN_SESSIONS:
            client = Client(server)
            for line in session:
                client.send(line)
                reply = client.line()
            assert reply.startswith(b"-ERR [AUTH]")
            client.send(b"QUIT\r\n")
            assert client.line().startswith(b"+OK")
            client.close()
        client = Client(server)  # an honest session in between: not matched
        client.login()
        client.send(b"QUIT\r\n")
        client.line()
        client.close()
    finally:
        server.stop()
    yield server


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3ShieldServer]:
    tmp = tmp_path_factory.mktemp("f2b-honest")
    server = _run(tmp, "honest")
    try:
        assert len(fetch_with_poplib(server.host, server.port, "alice", PASSWORD)) == 9
        assert len(fetch_with_curl(server.host, server.port, "alice", PASSWORD, home=tmp / "home")) == 9
        client = Client(server)
        client.login()
        for command in (b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n", b"NOOP\r\n", b"RSET\r\n", b"QUIT\r\n"):
            client.send(command)
            assert client.line().startswith(b"+OK")
        client.close()
    finally:
        server.stop()
    yield server


def fail2ban_regex(log: Path) -> tuple[list[str], str]:
    """The addresses fail2ban takes from ``log`` with our filter (one per matched line)."""
    tool = require_binary("fail2ban-regex")
    ips = subprocess.run([tool, "--out", "ip", str(log), str(FILTER)], capture_output=True, text=True,
                         timeout=120)
    assert ips.returncode == 0, ips.stdout + ips.stderr
    report = subprocess.run([tool, str(log), str(FILTER)], capture_output=True, text=True, timeout=120)
    return ips.stdout.split(), report.stdout


def _lines_matched(report: str) -> int:
    line = next(line for line in report.splitlines() if line.startswith("Lines:"))
    return int(line.split(",")[2].split()[0])


def test_every_prevent_event_matches(attacked: Pop3ShieldServer) -> None:
    events = attacked.events()
    prevent = [e for e in events if e["type"] == "security" and e["action"] == "prevent"]
    assert len(prevent) >= len(ATTACKS)  # every attack, and the failed-login sessions' own events
    ips, report = fail2ban_regex(attacked.events_path)
    assert ips == [e["client"]["address"] for e in prevent] == ["127.0.0.1"] * len(prevent), report
    assert _lines_matched(report) == len(prevent)


def test_every_connection_with_a_failed_login_matches_once(attacked: Pop3ShieldServer) -> None:
    log = attacked.log_path.read_text()
    closed = [line for line in log.splitlines() if " closed (" in line]
    # and the start-up probe's connection (tests/support waits for a greeting)
    assert len(closed) == len(ATTACKS) + len(FAILED_LOGIN_SESSIONS) + 1 + 1, log
    ips, report = fail2ban_regex(attacked.log_path)
    assert ips == ["127.0.0.1"] * len(FAILED_LOGIN_SESSIONS), report
    assert "logins_failed=2" in log  # the two USER/PASS failures in one connection: one line


def test_nothing_from_honest_sessions(honest: Pop3ShieldServer) -> None:
    log = honest.log_path.read_text()
    assert log.count(" closed (") >= 3  # poplib, curl (one per message and the LIST) and raw sessions
    for path in (honest.log_path, honest.events_path):
        path.touch()
        ips, report = fail2ban_regex(path)
        assert ips == [], report


def test_detect_records_and_forged_fields_do_not_match(attacked: Pop3ShieldServer, tmp_path: Path) -> None:
    """A detect record, and a user name or command that spells the matched fields, are not bans."""
    record = next(e for e in attacked.events() if e["type"] == "security" and e["action"] == "prevent")
    forged = '","client":{"address":"192.0.2.66","port":1},"action":"prevent","'
    lines = [dict(record, action="detect"),
             dict(record, action="detect", user=forged, command=f"USER {forged}"),
             dict(record, user=forged)]  # still a prevent record, of the real client
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=True, separators=(",", ":")) + "\n" for r in lines))
    ips, report = fail2ban_regex(path)
    assert ips == [record["client"]["address"]], report
    log = tmp_path / "server.log"
    real = next(line for line in attacked.log_path.read_text().splitlines() if "logins_failed=1 " in line)
    log.write_text(real.replace("logins_failed=1", "logins_failed=0").replace(
        "user=", "user=x client=192.0.2.66:1 logins_failed=3 deleted=- ") + "\n")
    ips, report = fail2ban_regex(log)
    assert "192.0.2.66" not in ips, report


def test_the_jail_uses_the_filter_and_both_files() -> None:
    text = JAIL.read_text()
    assert "filter   = pop3shield\n" in text
    assert "/var/log/pop3shield/events.jsonl" in text and "/var/log/pop3shield/pop3shield.log" in text


def test_a_json_server_log_matches_the_failed_logins_only(tmp_path: Path) -> None:
    """logging.format = "json": the same closing lines, as JSON records."""
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER, extra_toml='format = "json"')  # lands in [logging]
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        for session in FAILED_LOGIN_SESSIONS:
            client = Client(server)
            for line in session:
                client.send(line)
                client.line()
            client.send(b"QUIT\r\n")
            client.line()
            client.close()
        client = Client(server)
        client.send(b"US3R alice\r\n")  # refused: an event, but no failed login
        client.line()
        client.close()
        assert len(fetch_with_poplib(server.host, server.port, "alice", PASSWORD)) == 9
    finally:
        server.stop()
    log = server.log_path.read_text()
    closed = [json.loads(line) for line in log.splitlines() if '"message":"session ' in line and " closed (" in line]
    assert len(closed) == len(FAILED_LOGIN_SESSIONS) + 3  # the refused one, poplib, the start-up probe
    ips, report = fail2ban_regex(server.log_path)
    assert ips == ["127.0.0.1"] * len(FAILED_LOGIN_SESSIONS), report
