"""Every protection over a real socket, in prevent and in detect mode, with the exact bytes and events.

Two servers run for the whole module: one with the defaults (every protection ``prevent``) and one
with ``[protections] action = "detect"``. Both have ``max_commands`` after login lowered to
20 + 2 per message (38 for the 9 test messages) so the test does not need thousands of commands,
no brute-force delay (the test fails logins on purpose) and no event rate
limit (all clients come from 127.0.0.1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.messages import write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD, Client, b64, client_hello, new_events
from tests.support.spec import ATTACKS

COMMON_SERVER = "auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0\nmax_connections_per_ip = 200"
COMMON_EVENTS = "rate_limit = 100000"
MAX_COMMANDS = "[protections.max_commands]\nlimit = 50\nafter_login = 20\nper_message = 2\n"
AFTER_LOGIN_LIMIT = 20 + 2 * 9  # write_maildir's 9 messages


def _start(tmp: Path, extra: str) -> Pop3ShieldServer:
    server = Pop3ShieldServer(server_toml=COMMON_SERVER, events_toml=COMMON_EVENTS, extra_toml=extra)
    root = tmp / "mail"
    write_maildir(root / "alice" / "Maildir")
    server.start(tmp / "run", {"alice": PASSWORD}, root)
    return server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pop3ShieldServer]]:
    started: dict[str, Pop3ShieldServer] = {}
    try:
        started["prevent"] = _start(tmp_path_factory.mktemp("prevent"), MAX_COMMANDS)
        started["detect"] = _start(tmp_path_factory.mktemp("detect"), '[protections]\naction = "detect"\n' + MAX_COMMANDS)
        yield started
    finally:
        for server in started.values():
            server.stop()


# (name, protection, login first?, bytes sent, prevent reply, detect reply)
CASES = [
    ("user-without-name", "empty_username", False, b"USER\r\n",
     b"-ERR [AUTH] No username given.\r\n", b"-ERR No username given.\r\n"),
    ("user-blank-name", "empty_username", False, b"USER    \r\n",
     b"-ERR [AUTH] No username given.\r\n", b"-ERR No username given.\r\n"),
    ("apop-empty-name", "empty_username", False, b"APOP  0123456789abcdef0123456789abcdef\r\n",
     b"-ERR [AUTH] No username given.\r\n", b"-ERR No username given.\r\n"),
    ("plain-empty-authcid", "empty_username", False, b"AUTH PLAIN " + b64(b"\0\0" + PASSWORD.encode()) + b"\r\n",
     b"-ERR [AUTH] No username given.\r\n", b"-ERR [AUTH] No username given.\r\n"),
    ("plain-authzid-empty-authcid", "empty_username", False,
     b"AUTH PLAIN " + b64(b"admin\0\0" + PASSWORD.encode()) + b"\r\n",
     b"-ERR [AUTH] No username given.\r\n", b"-ERR [AUTH] No username given.\r\n"),
    ("pass-without-password", "empty_password", False, b"USER alice\r\nPASS\r\n",
     b"+OK\r\n-ERR [AUTH] No password given.\r\n", b"+OK\r\n-ERR No password given.\r\n"),
    ("plain-empty-password", "empty_password", False, b"AUTH PLAIN " + b64(b"\0alice\0") + b"\r\n",
     b"-ERR [AUTH] No password given.\r\n", b"-ERR [AUTH] No password given.\r\n"),
    ("nul-in-user", "non_compliant", False, b"USER al\x00ice\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Invalid characters in command.\r\n"),
    ("invalid-utf8", "non_compliant", False, b"USER \xff\xfe\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Invalid characters in command.\r\n"),
    ("format-string-user", "non_compliant", False, b"USER %s%s%s%n\r\n",
     b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n"),
    ("hangul-filler-in-user", "non_compliant", False, "USER alice\u3164\r\n".encode(),
     b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n"),
    ("bad-keyword", "non_compliant", False, b"US3R alice\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Unknown command.\r\n"),
    ("wrong-arg-count", "non_compliant", False, b"QUIT now\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Invalid arguments.\r\n"),
    ("lone-cr", "non_compliant", False, b"USER ali\rce\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Invalid characters in command.\r\n"),
    ("http-request", "non_compliant", False, b"GET / HTTP/1.1\r\n",
     b"-ERR Protocol violation.\r\n", b"-ERR Unknown command.\r\n"),
    ("uidl-minus-one", "non_compliant", True, b"UIDL -1\r\n",
     b"-ERR Invalid message number.\r\n", b"-ERR Invalid message number.\r\n"),
    ("dele-minus-one", "non_compliant", True, b"DELE -1\r\n",
     b"-ERR Invalid message number.\r\n", b"-ERR Invalid message number.\r\n"),
    ("retr-zero", "non_compliant", True, b"RETR 0\r\n",
     b"-ERR Invalid message number.\r\n", b"-ERR Invalid message number.\r\n"),
    ("list-eleven-digits", "non_compliant", True, b"LIST 12345678901\r\n",
     b"-ERR Invalid message number.\r\n", b"-ERR Invalid message number.\r\n"),
    ("line-256", "max_line_length", False, b"USER " + b"a" * 249 + b"\r\n",
     b"-ERR Command line too long.\r\n", b"+OK\r\n"),
]


@pytest.mark.parametrize("mode", ["prevent", "detect"])
@pytest.mark.parametrize("name,protection,logged_in,data,prevent_reply,detect_reply", CASES,
                         ids=[case[0] for case in CASES])
def test_protection(servers, mode, name, protection, logged_in, data, prevent_reply, detect_reply) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    try:
        if logged_in:
            client.login()
        client.send(data)
        expected = prevent_reply if mode == "prevent" else detect_reply
        assert client.read(len(expected)) == expected
        if mode == "prevent":
            assert client.closed(), "prevent must close the connection"
        else:
            assert client.still_open(), "detect must leave the session going"
    finally:
        client.close()
    events = new_events(server, before)
    kinds = [e["protection"] for e in events]
    # binary bytes are also an exploit sign to the detector: its event may follow, never lead
    assert kinds[:1] == [protection] and set(kinds[1:]) <= {"malicious_code"}, events
    event = events[0]
    assert (event["attack_name"], event["attack_info"]) == ATTACKS[protection]
    assert event["action"] == mode
    assert event["client"]["address"] == "127.0.0.1"
    assert event["server"]["port"] == server.port
    assert len(event["session"]) == 12


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_line_of_exactly_255_octets_is_accepted(servers, mode) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    line = b"USER " + b"a" * 248 + b"\r\n"
    assert len(line) == 255
    client.send(line)
    assert client.line() == b"+OK\r\n"
    client.close()
    assert new_events(server, before) == []


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_stls_is_refused_and_the_session_stays_open(servers, mode) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    client.send(b"CAPA\r\n")
    caps = b""
    while not caps.endswith(b"\r\n.\r\n"):
        caps += client.line()
    assert b"STLS" not in caps
    client.send(b"STLS\r\n")
    assert client.line() == b"-ERR STLS is not available.\r\n"
    client.login()
    client.close()
    events = new_events(server, before)
    assert [(e["protection"], e["action"]) for e in events] == [("stls", mode)]
    assert (events[0]["attack_name"], events[0]["attack_info"]) == ATTACKS["stls"]


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_too_many_bad_commands(servers, mode) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    client.send(b"LAST\r\n" * 11)
    replies = [client.line() for _ in range(11)]
    assert replies[:10] == [b"-ERR Unknown command.\r\n"] * 10
    if mode == "prevent":
        assert replies[10] == b"-ERR Too many bad commands.\r\n"
        assert client.closed()
    else:
        assert replies[10] == b"-ERR Unknown command.\r\n"
        client.send(b"LAST\r\n")
        assert client.line() == b"-ERR Unknown command.\r\n"
    client.close()
    events = new_events(server, before)
    assert [(e["protection"], e["action"]) for e in events] == [("max_bad_commands", mode)]
    assert events[0]["detail"] == {"count": 11, "limit": 10}


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_failed_logins_count_as_bad_commands(servers, mode) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    for _ in range(10):
        client.send(b"USER alice\r\nPASS wrong-password\r\n")
        assert client.line() == b"+OK\r\n"
        assert client.line() == b"-ERR [AUTH] Authentication failed.\r\n"
    client.send(b"USER alice\r\nPASS wrong-password\r\n")
    assert client.line() == b"+OK\r\n"
    eleventh = client.line()
    if mode == "prevent":
        assert eleventh == b"-ERR Too many bad commands.\r\n"
        assert client.closed()
    else:
        assert eleventh == b"-ERR [AUTH] Authentication failed.\r\n"
    client.close()
    assert [e["protection"] for e in new_events(server, before)] == ["max_bad_commands"]


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_too_many_commands_after_login(servers, mode) -> None:
    """after_login + per_message * messages, counted from the login on."""
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    client.login()
    client.send(b"STAT\r\n" * (AFTER_LOGIN_LIMIT + 1))
    replies = [client.line() for _ in range(AFTER_LOGIN_LIMIT + 1)]
    assert replies[:-1] == [replies[0]] * AFTER_LOGIN_LIMIT and replies[0].startswith(b"+OK 9 ")
    if mode == "prevent":
        assert replies[-1] == b"-ERR Too many commands.\r\n"
        assert client.closed()
    else:
        assert replies[-1] == replies[0]
        assert client.still_open()
    client.close()
    events = new_events(server, before)
    assert [(e["protection"], e["action"]) for e in events] == [("max_commands", mode)]
    assert events[0]["detail"] == {"count": AFTER_LOGIN_LIMIT + 1, "limit": AFTER_LOGIN_LIMIT}
    assert events[0]["user"] == "alice"


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_too_many_commands_before_login(servers, mode) -> None:
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    client.send(b"USER alice\r\n" * 51)
    replies = [client.line() for _ in range(51)]
    assert replies[:50] == [b"+OK\r\n"] * 50
    if mode == "prevent":
        assert replies[50] == b"-ERR Too many commands.\r\n"
        assert client.closed()
    else:
        assert replies[50] == b"+OK\r\n"
        assert client.still_open()
    client.close()
    events = new_events(server, before)
    assert [(e["protection"], e["action"]) for e in events] == [("max_commands", mode)]
    assert events[0]["detail"] == {"count": 51, "limit": 50}


@pytest.mark.parametrize("mode", ["prevent", "detect"])
def test_requests_for_deleted_messages_are_not_bad_commands(servers, mode) -> None:
    """A client asking again for what it deleted is answered -ERR and is not closed (it used to
    be after 11 of them); the deletion is undone by RSET, so the shared maildrop stays whole."""
    server = servers[mode]
    before = len(server.events())
    client = Client(server)
    client.login()
    client.send(b"DELE 1\r\n")
    assert client.line() == b"+OK Marked to be deleted.\r\n"
    client.send(b"LIST 1\r\nRETR 1\r\nDELE 1\r\nTOP 1 0\r\nUIDL 1\r\n" * 3)
    assert [client.line() for _ in range(15)] == [b"-ERR Message is deleted.\r\n"] * 15
    client.send(b"RSET\r\nQUIT\r\n")
    assert client.line().startswith(b"+OK 9 messages")
    assert client.line() == b"+OK Logging out.\r\n"
    assert client.closed()
    client.close()
    assert new_events(server, before) == []


def test_tls_client_hello_is_stopped_at_once(servers) -> None:
    server = servers["prevent"]
    before = len(server.events())
    client = Client(server)
    client.send(client_hello())
    assert client.line() == b"-ERR Protocol violation.\r\n"
    assert client.closed(wait=3)
    events = new_events(server, before)
    assert [(e["protection"], e["detail"]["reason"]) for e in events] == [
        ("non_compliant", "TLS handshake on a POP3 port")]


def test_detect_reports_once_and_counts_repeats_in_the_closing_record(servers) -> None:
    server = servers["detect"]
    before = len(server.events())
    client = Client(server)
    client.send(b"USER\r\nUSER\r\nUSER\r\nQUIT\r\n")
    for _ in range(3):
        assert client.line() == b"-ERR No username given.\r\n"
    assert client.line() == b"+OK Logging out.\r\n"
    assert client.closed()
    client.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.get("type") == "summary" for e in server.events()[before:]):
        time.sleep(0.05)
    records = server.events()[before:]
    assert [r["type"] for r in records] == ["security", "summary"]
    assert records[1]["repeats"] == {"empty_username": 2}
    assert records[1]["session"] == records[0]["session"]


def secret_attacks() -> list[bytes]:
    """Sessions that carry the real password into every kind of refused or odd input."""
    pw = PASSWORD.encode()
    plain = b64(b"\0alice\0" + pw)
    return [
        b"USER alice\r\nPASS " + pw + b"\x00\r\n",
        b"USER alice\r\nPASS " + pw + b"\xff\r\n",
        b"USER alice\r\nPASS " + pw + b"A" * 400 + b"\r\n",
        b"USER alice\r\nPASS " + pw + b"\r" + pw + b"\r\n",
        b"USER alice\r\n" + pw + b"\r\n",
        b"AUTH PLAIN " + plain + b"=\r\n",
        b"AUTH PLAIN\r\n" + plain + b" \r\n",
        b"AUTH PLAIN\r\n" + pw + b"\r\n",
        b"AUTH PLAIN\r\n" + plain + b"A" * 3000 + b"\r\n",
        b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(pw + b"\x00") + b"!\r\n",
        b"AUTH PLAIN " + b64(b"\0al/ice\0" + pw) + b"\r\n",
        b"APOP alice " + pw + b"\r\n",
        b"STLS\r\nUSER alice\r\nPASS " + pw + b"\r\nLIST -1\r\n",
        b"USER alice\r\nPASS " + pw + b"\r\n" + b"NOOP\r\n" * 60,
        b"USER alice\r\nPASS " + pw + b"\r\nDELE 0\r\nRETR 99999999999\r\n",
    ]


def test_no_password_or_auth_blob_reaches_any_log(servers) -> None:
    """Every attack with the real password: neither events, server log nor output may contain it."""
    pw = PASSWORD.encode()
    forbidden = [pw, b64(b"\0alice\0" + pw), b64(pw), b64(b"\0alice\0" + pw)[:24], pw[:12]]
    for mode in ("prevent", "detect"):
        server = servers[mode]
        for attack in secret_attacks():
            client = Client(server)
            client.send(attack + b"QUIT\r\n")
            client.closed()
            client.close()
        time.sleep(0.2)
        for path in (server.events_path, server.log_path, server.stdout_path, server.stderr_path):
            data = path.read_bytes()
            for secret in forbidden:
                assert secret not in data, f"{secret!r} leaked into {path.name}"
        assert len(server.events()) > 10
