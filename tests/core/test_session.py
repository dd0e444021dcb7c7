"""The session state machine, byte-exact: every command in every state, authentication, the
UPDATE rules, pipelining, and the eight protections in prevent, detect and inactive mode.

The response texts asserted here are the spec (they are the ones session.py sends today).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from pop3shield.core import actions as A
from pop3shield.core.dotstuff import stuff
from pop3shield.core.protections import ATTACKS, NAMES
from pop3shield.core.session import HARD_LINE_LIMIT, State
from pop3shield.core.settings import (
    PROTECTION_KEYS,
    Action,
    Override,
    ProtectionsConfig,
    ProtectionSettings,
    SessionSettings,
)
from tests.core.conftest import clean_check
from tests.support.spec import ATTACKS as SPEC_ATTACKS

USER = "bob"
PASSWORD = b"s3cret-Pa55word"
DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"
CHALLENGE = b"<1896.697170952@dbc.mtview.ca.us>"

GREETING = b"+OK localhost POP3 ready.\r\n"
CAPA_AUTH = (b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
             b"AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
CAPA_TRANS = (b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
              b"AUTH-RESP-CODE\r\n.\r\n")
MECHANISMS = b"+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"
LOGGED_IN = b"+OK Logged in, 2 messages (30 octets).\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
UNKNOWN = b"-ERR Unknown command.\r\n"
BYE = b"+OK Logging out.\r\n"
LOGIN_USER_PROMPT = b"+ VXNlcm5hbWU6\r\n"
LOGIN_PASS_PROMPT = b"+ UGFzc3dvcmQ6\r\n"
PROTOCOL_VIOLATION = b"-ERR Protocol violation.\r\n"
TOO_LONG = b"-ERR Command line too long.\r\n"

ALL_ACTIONS = [Action.PREVENT, Action.DETECT, Action.INACTIVE]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: bytes = USER.encode(), password: bytes = PASSWORD, authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\x00" + user + b"\x00" + password)


def settings_with(*, session: dict[str, Any] | None = None, default: Action | None = None,
                  **kwargs: Any) -> SessionSettings:
    prot: dict[str, Any] = {}
    if default is not None:
        prot.update({key: ProtectionSettings(default) for key in PROTECTION_KEYS})
    for key, value in kwargs.items():
        prot[key] = ProtectionSettings(value) if isinstance(value, Action) else value
    return SessionSettings(protections=ProtectionsConfig(**prot), **(session or {}))


def logged_in(make_driver: Any, settings: SessionSettings | None = None, **kwargs: Any) -> Any:
    d = make_driver(settings, **kwargs)
    assert d.login() == b"+OK\r\n" + LOGGED_IN
    return d


def assert_event(event: Any, key: str, action: Action) -> None:
    assert event.protection == key
    assert event.action is action
    assert (event.attack_name, event.attack_info) == ATTACKS[key]


# ================================================================== the attack table


def test_attack_table_matches_the_readme() -> None:
    """Byte-exact strings operators grep and SIEM rules match (docs: ../shared/README.md)."""
    assert ATTACKS == SPEC_ATTACKS
    assert NAMES == {
        "empty_username": "Empty POP3 Username",
        "empty_password": "Empty POP3 Password",
        "non_compliant": "Non Compliant POP3",
        "stls": "POP3 STARTTLS Command",
        "malicious_code": "Malicious Code Protector for POP3",
        "max_bad_commands": "Maximum Bad POP3 Commands",
        "max_line_length": "Maximum POP3 Command Line Length",
        "max_commands": "Maximum POP3 Commands Per Connection",
    }
    assert PROTECTION_KEYS == ("empty_username", "empty_password", "non_compliant", "stls", "malicious_code",
                               "max_bad_commands", "max_line_length", "max_commands")


def test_attack_table_matches_the_shared_readme_file() -> None:
    import re

    from tests.support import shared_dir

    rows = {}
    for line in open(shared_dir("README.md"), encoding="utf-8"):
        m = re.match(r"\| `(\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", line.strip())
        if m:
            rows[m.group(1)] = (m.group(3).strip(), m.group(4).strip(), m.group(2).strip())
    assert rows == {key: (*ATTACKS[key], NAMES[key]) for key in PROTECTION_KEYS}


def test_defaults() -> None:
    p = ProtectionsConfig()
    assert all(p.get(key).action is Action.PREVENT for key in PROTECTION_KEYS)
    assert (p.bad_commands_limit, p.line_length_limit, p.sasl_line_limit, p.commands_limit) == (10, 255, 2048, 50)
    assert (p.commands_after_login, p.commands_per_message) == (1000, 5)
    assert p.strict_crlf is False and p.unknown_commands == "bad_command"
    s = SessionSettings()
    assert s.apop is False and s.implementation is None and s.sasl_mechanisms == ("PLAIN", "LOGIN")


# ================================================================== greeting


def test_greeting(make_driver: Any) -> None:
    d = make_driver(start=False)
    assert d.start() == GREETING
    assert d.kinds() == ["Send"]
    assert d.session.state is State.AUTHORIZATION


def test_greeting_hostname(make_driver: Any) -> None:
    d = make_driver(SessionSettings(hostname="mail.example.org"), start=False)
    assert d.start() == b"+OK mail.example.org POP3 ready.\r\n"


def test_greeting_hostname_cannot_inject(make_driver: Any) -> None:
    d = make_driver(SessionSettings(hostname="evil\r\n+OK x"), start=False)
    assert d.start() == b"+OK evil??+OK x POP3 ready.\r\n"


def test_no_challenge_in_greeting_when_apop_is_off(make_driver: Any) -> None:
    d = make_driver(challenge=CHALLENGE, start=False)
    out = d.start()
    assert out == GREETING
    assert b"<" not in out


def test_challenge_in_greeting_when_apop_is_on(make_driver: Any) -> None:
    d = make_driver(SessionSettings(apop=True), challenge=CHALLENGE, start=False)
    assert d.start() == b"+OK localhost POP3 ready. " + CHALLENGE + b"\r\n"


def test_apop_on_without_challenge_has_no_timestamp(make_driver: Any) -> None:
    d = make_driver(SessionSettings(apop=True), start=False)
    assert d.start() == GREETING
    assert d.send(b"APOP bob " + DIGEST + b"\r\n") == b"-ERR APOP is not enabled.\r\n"


def test_greeting_with_challenge_is_at_most_512_octets(make_driver: Any) -> None:
    """RFC 2449: the greeting is a first response line too. A 253-character host name in the
    greeting and in the usual <pid.clock@hostname> timestamp must not push it past 512 octets."""
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 49])  # 241 characters, labels of at most 63
    challenge = b"<0123456789abcdef.1764198000@" + host.encode() + b">"  # what protocol.py builds
    d = make_driver(SessionSettings(hostname=host, apop=True), challenge=challenge, start=False)
    out = d.start()
    assert out.endswith(b"\r\n") and out.count(b"\r\n") == 1
    assert len(out) <= 512, len(out)


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_data_before_the_greeting(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(non_compliant=action), start=False)
    assert d.send(b"CAPA\r\n") == b""
    assert d.new_actions == []
    out = d.start()
    if action is Action.PREVENT:
        assert out == PROTOCOL_VIOLATION
        assert d.kinds() == ["Report", "Send", "Close"]
        assert d.new_closes == [A.Close("prevented:non_compliant")]
    else:
        assert out == GREETING + CAPA_AUTH
        assert not d.closed
    if action is Action.INACTIVE:
        assert d.reports == []
    else:
        [event] = d.reports
        assert_event(event, "non_compliant", action)
        assert event.command == "<before greeting>"
        assert event.detail == {"reason": "data sent before the greeting"}


# ================================================================== AUTHORIZATION state

AUTHORIZATION_TABLE = [
    (b"CAPA", CAPA_AUTH),
    (b"capa", CAPA_AUTH),
    (b"USER bob", b"+OK\r\n"),
    (b"PASS secret", b"-ERR No username given.\r\n"),
    (b"APOP bob " + DIGEST, b"-ERR APOP is not enabled.\r\n"),
    (b"AUTH", MECHANISMS),
    (b"AUTH PLAIN", b"+ \r\n"),
    (b"AUTH LOGIN", LOGIN_USER_PROMPT),
    (b"auth login", LOGIN_USER_PROMPT),
    (b"AUTH CRAM-MD5", b"-ERR Unsupported authentication mechanism.\r\n"),
    (b"AUTH XOAUTH2 dG9rZW4=", b"-ERR Unsupported authentication mechanism.\r\n"),
    (b"STLS", b"-ERR STLS is not available.\r\n"),
    (b"STAT", UNKNOWN),
    (b"LIST", UNKNOWN),
    (b"LIST 1", UNKNOWN),
    (b"UIDL", UNKNOWN),
    (b"UIDL 1", UNKNOWN),
    (b"RETR 1", UNKNOWN),
    (b"TOP 1 1", UNKNOWN),
    (b"DELE 1", UNKNOWN),
    (b"NOOP", UNKNOWN),
    (b"RSET", UNKNOWN),
    (b"XYZZ", UNKNOWN),
    (b"LAST", UNKNOWN),
    (b"QUIT", BYE),
]


@pytest.mark.parametrize("line, expected", AUTHORIZATION_TABLE, ids=[c[0].decode() for c in AUTHORIZATION_TABLE])
def test_authorization_state(make_driver: Any, line: bytes, expected: bytes) -> None:
    d = make_driver()
    assert d.send(line + b"\r\n") == expected
    if line == b"QUIT":
        assert d.new_actions[-1] == A.Close("quit")
        assert d.commits == []
    else:
        assert not d.closed
    reports = d.new_reports
    if line == b"STLS":
        assert [e.protection for e in reports] == ["stls"]
    else:
        assert reports == []


def test_authorization_commands_never_authenticate(make_driver: Any) -> None:
    d = make_driver(settings_with(bad_commands_limit=1000))
    for line, _ in AUTHORIZATION_TABLE[:-1]:
        if line != b"USER bob":
            d.send(line + b"\r\n")
        if d.session.state is State.SASL:
            d.send(b"*\r\n")
    assert d.logins == []
    assert d.session.state is State.AUTHORIZATION


# ================================================================== TRANSACTION state

TRANSACTION_TABLE = [
    (b"CAPA", CAPA_TRANS),
    (b"STAT", b"+OK 2 30\r\n"),
    (b"LIST", b"+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n"),
    (b"list", b"+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n"),
    (b"LIST 1", b"+OK 1 10\r\n"),
    (b"LIST 2", b"+OK 2 20\r\n"),
    (b"LIST 002", b"+OK 2 20\r\n"),
    (b"LIST 3", b"-ERR There is no such message.\r\n"),
    (b"LIST 99", b"-ERR There is no such message.\r\n"),
    (b"LIST 4294967295", b"-ERR There is no such message.\r\n"),
    (b"UIDL", b"+OK 2 messages\r\n1 uid-1\r\n2 uid-2\r\n.\r\n"),
    (b"UIDL 1", b"+OK 1 uid-1\r\n"),
    (b"UIDL 2", b"+OK 2 uid-2\r\n"),
    (b"UIDL 99", b"-ERR There is no such message.\r\n"),
    (b"RETR 99", b"-ERR There is no such message.\r\n"),
    (b"TOP 99 1", b"-ERR There is no such message.\r\n"),
    (b"DELE 99", b"-ERR There is no such message.\r\n"),
    (b"DELE 1", b"+OK Marked to be deleted.\r\n"),
    (b"NOOP", b"+OK\r\n"),
    (b"RSET", b"+OK 2 messages (30 octets).\r\n"),
    (b"STLS", b"-ERR STLS is not available.\r\n"),
    (b"USER bob", UNKNOWN),
    (b"PASS secret", UNKNOWN),
    (b"APOP bob " + DIGEST, UNKNOWN),
    (b"AUTH", UNKNOWN),
    (b"AUTH PLAIN", UNKNOWN),
    (b"AUTH PLAIN " + plain(), UNKNOWN),
    (b"XYZZ", UNKNOWN),
]


@pytest.mark.parametrize("line, expected", TRANSACTION_TABLE, ids=[c[0].decode()[:20] for c in TRANSACTION_TABLE])
def test_transaction_state(make_driver: Any, line: bytes, expected: bytes) -> None:
    d = logged_in(make_driver)
    assert d.send(line + b"\r\n") == expected
    assert not d.closed
    assert d.session.state is State.TRANSACTION
    assert d.logins[1:] == []
    assert [e.protection for e in d.new_reports] == (["stls"] if line == b"STLS" else [])


def test_retr(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    assert d.send(b"RETR 1\r\n") == b""
    assert d.new_actions == [A.StreamMessage("k1", b"+OK 10 octets\r\n", None, prefetch="k2")]
    assert d.session.busy
    assert d.call("stream_finished") == b""
    assert d.new_actions == []
    assert not d.session.busy


def test_retr_transcript(make_driver: Any, kit: Any) -> None:
    d = logged_in(make_driver)
    out = d.send(b"RETR 2\r\n")
    assert out == b"+OK 20 octets\r\n" + stuff(kit.fake_body("k2"))
    assert out.endswith(b"\r\n..dotted line\r\nline three\r\n.\r\n")


@pytest.mark.parametrize("line, key, count", [(b"TOP 1 0", "k1", 0), (b"TOP 2 5", "k2", 5), (b"top 1 007", "k1", 7),
                                              (b"TOP 1 4294967295", "k1", 4294967295)])
def test_top(make_driver: Any, line: bytes, key: str, count: int) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    assert d.send(line + b"\r\n") == b""
    assert d.new_actions == [A.StreamMessage(key, b"+OK\r\n", count, prefetch="k2" if key == "k1" else None)]


def test_prefetch_names_the_next_live_message(make_driver: Any) -> None:
    """The I/O layer may open the next message ahead; a deleted one is skipped."""
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(b"DELE 2\r\n")
    d.new_actions
    d.send(b"RETR 1\r\n")
    assert d.new_actions == [A.StreamMessage("k1", b"+OK 10 octets\r\n", None, prefetch=None)]


def test_stream_failed(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(b"RETR 1\r\nSTAT\r\n")
    assert d.call("stream_failed") == b"-ERR [SYS/TEMP] Message is no longer available.\r\n+OK 2 30\r\n"
    assert not d.closed


@pytest.mark.parametrize("command", [b"CAPA", b"AUTH", b"LIST", b"UIDL", b"TOP 1 0", b"RETR 1", b"TOP 2 5"])
def test_no_multiline_status_line_carries_a_period(make_driver: Any, command: bytes) -> None:
    """nmap's POP3 library reads a CAPA answer up to the first ``.``: a period in the status
    line hid the whole list. No multi-line response's status line has one."""
    d = make_driver(SessionSettings(hostname="mail.example.org"))
    if command not in (b"CAPA", b"AUTH"):
        d.login()
    status = d.send(command + b"\r\n").split(b"\r\n", 1)[0]
    assert status.startswith(b"+OK") and b"." not in status, status


@pytest.mark.parametrize("logged", [False, True])
def test_capa_read_the_way_nmap_reads_it(make_driver: Any, logged: bool) -> None:
    """nselib/pop3.lua capabilities(): everything up to the first ``.``, split on CRLF."""
    d = make_driver(SessionSettings(hostname="mail.example.org"))
    if logged:
        d.login()
    seen = d.send(b"CAPA\r\n").split(b".", 1)[0].split(b"\r\n")
    assert seen[0].startswith(b"+OK")
    names = {line.split(b" ")[0] for line in seen[1:] if line}
    assert {b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING"} <= names
    assert ({b"USER", b"SASL"} <= names) is not logged


def test_capa_with_implementation_and_no_sasl(make_driver: Any) -> None:
    d = make_driver(SessionSettings(implementation="pop3shield", sasl_mechanisms=()))
    assert d.send(b"CAPA\r\n") == (b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
                                   b"PIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nIMPLEMENTATION pop3shield\r\n.\r\n")
    assert d.send(b"AUTH\r\n") == b"+OK Supported mechanisms follow\r\n.\r\n"
    assert d.send(b"AUTH PLAIN\r\n") == b"-ERR Unsupported authentication mechanism.\r\n"


@pytest.mark.parametrize("settings", [SessionSettings(), SessionSettings(implementation="x"),
                                      SessionSettings(sasl_mechanisms=("PLAIN",))])
def test_stls_never_in_capa(make_driver: Any, settings: SessionSettings) -> None:
    d = make_driver(settings)
    before = d.send(b"CAPA\r\n")
    d.login()
    after = d.send(b"CAPA\r\n")
    assert b"STLS" not in before and b"STLS" not in after
    assert b"\r\nUSER\r\n" in before and b"USER" not in after and b"SASL" not in after


# ================================================================== SASL state: every line is a response

SASL_TABLE = [line for line, _ in AUTHORIZATION_TABLE]


@pytest.mark.parametrize("line", SASL_TABLE, ids=[c.decode() for c in SASL_TABLE])
def test_sasl_state_takes_every_line_as_a_response(make_driver: Any, line: bytes) -> None:
    d = make_driver(settings_with(non_compliant=Action.DETECT))
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    out = d.send(line + b"\r\n")
    if b" " in line:
        assert out == b"-ERR Invalid base64 data.\r\n"
    else:  # four letters are valid base64 of three octets without the two NULs of PLAIN
        assert out == b"-ERR [AUTH] Invalid PLAIN data.\r\n"
    assert d.session.state is State.AUTHORIZATION
    assert d.logins == [] and d.commits == [] and not d.closed
    assert d.send(b"CAPA\r\n") == CAPA_AUTH


def test_sasl_state_commands_in_login_become_the_user_name(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH LOGIN\r\nQUIT\r\n") == LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT
    assert not d.closed and d.session.state is State.SASL


# ================================================================== deleted messages, RSET, QUIT/UPDATE


def test_deleted_messages_are_excluded(make_driver: Any) -> None:
    d = logged_in(make_driver)
    assert d.send(b"DELE 1\r\n") == b"+OK Marked to be deleted.\r\n"
    assert d.send(b"STAT\r\n") == b"+OK 1 20\r\n"
    assert d.send(b"LIST\r\n") == b"+OK 1 messages\r\n2 20\r\n.\r\n"
    assert d.send(b"UIDL\r\n") == b"+OK 1 messages\r\n2 uid-2\r\n.\r\n"
    assert d.send(b"LIST 2\r\n") == b"+OK 2 20\r\n"
    for line in (b"LIST 1", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1"):
        assert d.send(line + b"\r\n") == b"-ERR Message is deleted.\r\n", line
    assert d.streams == []
    assert d.send(b"DELE 2\r\n") == b"+OK Marked to be deleted.\r\n"
    assert d.send(b"STAT\r\n") == b"+OK 0 0\r\n"
    assert d.send(b"LIST\r\n") == b"+OK 0 messages\r\n.\r\n"
    assert d.send(b"UIDL\r\n") == b"+OK 0 messages\r\n.\r\n"


def test_rset_restores(make_driver: Any) -> None:
    d = logged_in(make_driver)
    d.send(b"DELE 1\r\nDELE 2\r\n")
    assert d.send(b"RSET\r\n") == b"+OK 2 messages (30 octets).\r\n"
    assert d.send(b"STAT\r\nLIST 1\r\n") == b"+OK 2 30\r\n+OK 1 10\r\n"
    assert d.send(b"QUIT\r\n") == BYE
    assert d.commits == [A.Commit(())]


@pytest.mark.parametrize("lines, keys", [
    (b"", ()),
    (b"DELE 1\r\n", ("k1",)),
    (b"DELE 2\r\nDELE 1\r\n", ("k1", "k2")),
    (b"DELE 2\r\nRSET\r\nDELE 1\r\n", ("k1",)),
    (b"DELE 2\r\nDELE 2\r\n", ("k2",)),
])
def test_quit_commits_exactly_the_deleted_keys(make_driver: Any, lines: bytes, keys: tuple) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(lines)
    assert d.commits == []
    assert d.send(b"QUIT\r\n") == b""
    assert d.new_actions == [A.Commit(keys)]
    assert d.session.state is State.UPDATE and d.session.busy
    assert d.call("commit_finished") == BYE
    assert d.new_actions[-1] == A.Close("quit")
    assert d.session.closed


def test_commit_failure(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(b"DELE 1\r\nQUIT\r\n")
    assert d.call("commit_finished", ["k1"]) == b"-ERR [SYS/TEMP] 1 messages could not be deleted.\r\n"
    assert d.new_actions[-1] == A.Close("quit")


def test_nothing_runs_after_quit(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    assert d.send(b"QUIT\r\nDELE 1\r\nNOOP\r\n") == b""
    assert d.new_actions == [A.Commit(())]
    assert d.send(b"DELE 2\r\n") == b""
    assert d.call("commit_finished") == BYE
    assert d.commits == [A.Commit(())]
    assert d.send(b"NOOP\r\n") == b""
    assert d.new_actions == []


def test_quit_in_authorization_commits_nothing(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"USER bob\r\nQUIT\r\n") == b"+OK\r\n" + BYE
    assert d.commits == []
    assert d.closes == [A.Close("quit")]


@pytest.mark.parametrize("state", ["authorization", "sasl", "transaction", "transaction-deleted"])
def test_timeout(make_driver: Any, state: str) -> None:
    d = make_driver()
    if state == "sasl":
        d.send(b"AUTH PLAIN\r\n")
    elif state.startswith("transaction"):
        d.login()
        if state == "transaction-deleted":
            d.send(b"DELE 1\r\nDELE 2\r\n")
    assert d.call("timed_out") == b"-ERR Disconnected for inactivity.\r\n"
    assert d.new_actions[-1] == A.Close("timeout")
    assert d.session.closed
    assert d.call("timed_out") == b"" and d.new_actions == []
    assert d.send(b"QUIT\r\n") == b"" and d.new_actions == []
    assert d.commits == []


def test_timeout_during_retr_commits_nothing(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(b"DELE 2\r\nRETR 1\r\nQUIT\r\n")
    d.call("timed_out")
    assert d.call("stream_finished") == b""
    assert d.new_actions == []
    assert d.commits == []


def test_connection_lost_commits_nothing(make_driver: Any) -> None:
    d = logged_in(make_driver)
    d.send(b"DELE 1\r\n")
    d.session.connection_lost()
    assert d.session.closed
    assert d.send(b"QUIT\r\n") == b"" and d.new_actions == []
    assert d.call("timed_out") == b"" and d.new_actions == []
    assert d.commits == []


def test_login_result_after_timeout_is_ignored(make_driver: Any) -> None:
    """The inactivity timer fires while the credentials are being checked: the late result must
    not reopen the closed session (no LoggedIn, no +OK after the Close, still closed)."""
    d = make_driver(auto=(), strict=False)
    d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n")
    assert isinstance(d.pending, A.Authenticate)
    d.call("timed_out")
    assert d.session.closed
    d.call("login_succeeded", d.entries)
    assert d.new_actions == []
    assert d.session.closed
    assert d.session.receive_data(b"DELE 1\r\nQUIT\r\n") == []


def test_analysis_result_after_timeout_is_ignored(make_driver: Any, kit: Any) -> None:
    d = make_driver(quick_check=kit.marker_check, auto=(), strict=False)
    d.send(b"USER bob\r\nPASS SLOWPATH\r\n")
    assert isinstance(d.pending, A.Analyze)
    d.call("timed_out")
    d.call("analysis_finished", [kit.CLEAN])
    assert d.new_actions == []
    assert d.logins == []


def test_commit_result_after_timeout_sends_nothing(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,), strict=False)
    d.send(b"QUIT\r\n")
    d.call("timed_out")
    d.call("commit_finished")
    assert d.new_actions == []


def test_results_after_connection_lost_are_ignored(make_driver: Any) -> None:
    d = make_driver(auto=(), strict=False)
    d.send(b"USER bob\r\nPASS nope\r\n")
    d.session.connection_lost()
    d.call("login_failed")
    assert d.new_actions == []
    assert d.session.closed


# ================================================================== message numbers


@pytest.mark.parametrize("line", [b"LIST 0", b"LIST -1", b"UIDL -1", b"DELE -1", b"DELE 0", b"RETR 0", b"RETR +1",
                                  b"TOP 0 1", b"TOP -1 1", b"LIST 1e3", b"LIST 0x10", b"LIST 12345678901",
                                  "LIST \u0661".encode(), b"RETR abc", b"UIDL 1.0"])
@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_malformed_message_numbers(make_driver: Any, line: bytes, action: Action) -> None:
    d = logged_in(make_driver, settings_with(non_compliant=action))
    out = d.send(line + b"\r\n")
    assert out == b"-ERR Invalid message number.\r\n"
    assert d.streams == [] and d.session._deleted == set()
    if action is Action.PREVENT:
        assert d.new_closes == [A.Close("prevented:non_compliant")]
    else:
        assert not d.closed
        assert d.send(b"STAT\r\n") == b"+OK 2 30\r\n"
    if action is Action.INACTIVE:
        assert d.reports == []
    else:
        [event] = d.reports
        assert_event(event, "non_compliant", action)
        assert event.detail == {"reason": "malformed message number"}
        assert event.command == line.decode("utf-8").replace("\u0661", "\\xd9\\xa1")


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_malformed_top_count(make_driver: Any, action: Action) -> None:
    d = logged_in(make_driver, settings_with(non_compliant=action))
    assert d.send(b"TOP 1 -1\r\n") == b"-ERR Invalid line count.\r\n"
    assert d.streams == []
    assert bool(d.closes) is (action is Action.PREVENT)
    assert len(d.reports) == (0 if action is Action.INACTIVE else 1)


def test_message_number_checked_before_line_count(make_driver: Any) -> None:
    d = logged_in(make_driver)
    assert d.send(b"TOP 99 x\r\n") == b"-ERR There is no such message.\r\n"
    assert not d.closed


# ================================================================== USER / PASS


def test_user_pass_login(make_driver: Any) -> None:
    d = make_driver(auto=())
    assert d.send(b"USER bob\r\n") == b"+OK\r\n"
    assert d.session.user == "bob"
    assert d.send(b"PASS " + PASSWORD + b"\r\n") == b""
    assert d.new_actions == [A.Authenticate("bob", PASSWORD, "USER", None)]
    assert d.session.busy
    assert d.call("login_succeeded", d.entries) == LOGGED_IN
    assert d.new_actions[0] == A.LoggedIn("bob", "USER", 2, 30)
    assert d.session.state is State.TRANSACTION and not d.session.busy


def test_pass_with_spaces(make_driver: Any) -> None:
    d = make_driver(users={"bob": b"correct horse  battery "})
    assert d.send(b"USER bob\r\nPASS correct horse  battery \r\n") == b"+OK\r\n" + LOGGED_IN
    assert d.logins[0].secret == b"correct horse  battery "


def test_pass_without_user(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"PASS " + PASSWORD + b"\r\n") == b"-ERR No username given.\r\n"
    assert d.logins == [] and d.reports == [] and not d.closed


def test_wrong_password_then_pass_again(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"USER bob\r\nPASS wrong\r\n") == b"+OK\r\n" + AUTH_FAILED
    assert d.session.state is State.AUTHORIZATION and d.session.user is None
    assert d.send(b"PASS " + PASSWORD + b"\r\n") == b"-ERR No username given.\r\n"
    assert d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n") == b"+OK\r\n" + LOGGED_IN
    assert d.actions[-2] == A.LoggedIn("bob", "USER", 2, 30)


def test_second_user_replaces_the_first(make_driver: Any) -> None:
    d = make_driver()
    d.send(b"USER alice\r\nUSER bob\r\nPASS " + PASSWORD + b"\r\n")
    assert d.logins[0].username == "bob"
    assert d.session.state is State.TRANSACTION


def test_unicode_user(make_driver: Any) -> None:
    d = make_driver(users={"j\u00f6rg": b"pw"})
    assert d.send("USER j\u00f6rg\r\nPASS pw\r\n".encode()) == b"+OK\r\n" + LOGGED_IN
    assert d.logins[0].username == "j\u00f6rg"


@pytest.mark.parametrize("code, text, expected", [
    ("AUTH", "Authentication failed.", AUTH_FAILED),
    ("IN-USE", "Mailbox is locked by another session.", b"-ERR [IN-USE] Mailbox is locked by another session.\r\n"),
    ("SYS/TEMP", "Temporary server problem, try again later.",
     b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"),
    ("SYS/PERM", "Maildrop is broken.", b"-ERR [SYS/PERM] Maildrop is broken.\r\n"),
    (None, "No.", b"-ERR No.\r\n"),
])
def test_login_failures(make_driver: Any, code: str | None, text: str, expected: bytes) -> None:
    d = make_driver(auto=())
    d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\nCAPA\r\n")
    assert d.call("login_failed", code, text) == expected + CAPA_AUTH
    assert d.session.state is State.AUTHORIZATION and not d.session.busy and not d.closed
    assert d.session.user is None


def test_login_failed_defaults(make_driver: Any) -> None:
    d = make_driver(auto=())
    d.send(b"USER bob\r\nPASS x\r\n")
    assert d.call("login_failed") == AUTH_FAILED


def test_login_succeeded_with_an_empty_maildrop(make_driver: Any) -> None:
    d = make_driver(entries=[])
    assert d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n") == b"+OK\r\n+OK Logged in, 0 messages (0 octets).\r\n"
    assert d.send(b"STAT\r\nLIST\r\nLIST 1\r\n") == (b"+OK 0 0\r\n+OK 0 messages\r\n.\r\n"
                                                     b"-ERR There is no such message.\r\n")


# ================================================================== AUTH (RFC 5034)


def test_auth_plain_initial_response(make_driver: Any) -> None:
    d = make_driver(auto=())
    assert d.send(b"AUTH PLAIN " + plain() + b"\r\n") == b""
    assert d.new_actions == [A.Authenticate("bob", PASSWORD, "PLAIN", None)]
    assert d.call("login_succeeded", d.entries) == LOGGED_IN
    assert d.new_actions[0] == A.LoggedIn("bob", "PLAIN", 2, 30)


def test_auth_plain_lower_case_and_authzid(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"auth plain " + plain(authzid=b"bob") + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("bob", PASSWORD, "PLAIN", None)]


def test_auth_plain_continuation(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.session.state is State.SASL
    assert d.send(plain() + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("bob", PASSWORD, "PLAIN", None)]
    assert d.actions[-2] == A.LoggedIn("bob", "PLAIN", 2, 30)


def test_auth_plain_wrong_password(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH PLAIN " + plain(password=b"nope") + b"\r\n") == AUTH_FAILED
    assert d.session.state is State.AUTHORIZATION
    assert d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n") == b"+OK\r\n" + LOGGED_IN
    assert d.actions[-2] == A.LoggedIn("bob", "USER", 2, 30)


@pytest.mark.parametrize("prefix", [b"AUTH PLAIN *\r\n", b"AUTH PLAIN\r\n*\r\n", b"AUTH LOGIN\r\n*\r\n",
                                    b"AUTH LOGIN Ym9i\r\n*\r\n"])
def test_auth_cancel(make_driver: Any, prefix: bytes) -> None:
    d = make_driver()
    out = d.send(prefix)
    assert out.endswith(b"-ERR Authentication cancelled.\r\n")
    assert d.session.state is State.AUTHORIZATION
    assert d.reports == [] and not d.closed and d.logins == []
    assert d.send(b"CAPA\r\n") == CAPA_AUTH


@pytest.mark.parametrize("action", ALL_ACTIONS)
@pytest.mark.parametrize("sequence, prefix", [
    (b"AUTH PLAIN =\r\n", b""),
    (b"AUTH PLAIN\r\n=\r\n", b"+ \r\n"),
    (b"AUTH PLAIN " + b64(b"bob\x00secret") + b"\r\n", b""),
    (b"AUTH PLAIN " + b64(b"\x00bob\x00secret\x00x") + b"\r\n", b""),
    (b"AUTH PLAIN " + plain(authzid=b"admin") + b"\r\n", b""),
])
def test_auth_plain_malformed(make_driver: Any, action: Action, sequence: bytes, prefix: bytes) -> None:
    d = make_driver(settings_with(non_compliant=action))
    out = d.send(sequence)
    if action is Action.PREVENT:
        assert out == prefix + b"-ERR Invalid PLAIN data.\r\n"
        assert d.new_closes == [A.Close("prevented:non_compliant")]
    else:
        assert out == prefix + b"-ERR [AUTH] Invalid PLAIN data.\r\n"
        assert d.session.state is State.AUTHORIZATION and not d.closed
    assert d.logins == []
    assert len(d.reports) == (0 if action is Action.INACTIVE else 1)


@pytest.mark.parametrize("action", ALL_ACTIONS)
@pytest.mark.parametrize("sequence, prefix", [
    (b"AUTH PLAIN AGJvYgBzZWNyZXQ\r\n", b""),  # missing padding
    (b"AUTH PLAIN AGJvYgBzZWNyZXR=\r\n", b""),  # non-canonical
    (b"AUTH PLAIN\r\nAGJv YgBz\r\n", b"+ \r\n"),
    (b"AUTH PLAIN\r\n!!!!\r\n", b"+ \r\n"),
    (b"AUTH LOGIN\r\nYm9i\r\nc2VjcmV0=\r\n", LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT),
])
def test_auth_bad_base64(make_driver: Any, action: Action, sequence: bytes, prefix: bytes) -> None:
    d = make_driver(settings_with(non_compliant=action))
    out = d.send(sequence)
    assert out == prefix + b"-ERR Invalid base64 data.\r\n"
    assert d.logins == []
    if action is Action.PREVENT:
        assert d.new_closes == [A.Close("prevented:non_compliant")]
    else:
        assert not d.closed and d.session.state is State.AUTHORIZATION
    if action is not Action.INACTIVE:
        [event] = d.reports
        assert_event(event, "non_compliant", action)
        assert event.detail["reason"] in ("invalid base64", "non-canonical base64")


def test_auth_login_two_steps(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH LOGIN\r\n") == LOGIN_USER_PROMPT
    assert d.send(b64(b"bob") + b"\r\n") == LOGIN_PASS_PROMPT
    assert d.send(b64(PASSWORD) + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("bob", PASSWORD, "LOGIN", None)]
    assert d.actions[-2] == A.LoggedIn("bob", "LOGIN", 2, 30)


def test_auth_login_initial_response(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH LOGIN " + b64(b"bob") + b"\r\n") == LOGIN_PASS_PROMPT
    assert d.send(b64(PASSWORD) + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("bob", PASSWORD, "LOGIN", None)]


def test_auth_login_wrong_password(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"nope") + b"\r\n") == (
        LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT + AUTH_FAILED)
    assert d.session.state is State.AUTHORIZATION


@pytest.mark.parametrize("action", [Action.DETECT, Action.INACTIVE])
def test_sasl_exchange_ends_after_an_overlong_response(make_driver: Any, action: Action) -> None:
    """-ERR ends an AUTH exchange (RFC 5034): after 'Command line too long.' the next line is a
    command again, not another SASL response."""
    d = make_driver(settings_with(max_line_length=action))
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.send(b"A" * 9000 + b"\r\n") == TOO_LONG
    assert d.session.state is State.AUTHORIZATION
    assert d.send(b"CAPA\r\n") == CAPA_AUTH


def test_sasl_exchange_ends_when_the_analysis_is_refused(make_driver: Any, kit: Any) -> None:
    d = make_driver(settings_with(malicious_code=Action.DETECT), quick_check=kit.marker_check, auto=())
    d.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"SLOWPATH") + b"\r\n")
    assert isinstance(d.pending, A.Analyze)
    assert d.call("analysis_finished", [None]) == b"-ERR [SYS/TEMP] Server busy, try again later.\r\n"
    assert d.session.state is State.AUTHORIZATION
    assert d.send(b"CAPA\r\n") == CAPA_AUTH


def test_sasl_exchange_ends_after_an_http_line(make_driver: Any) -> None:
    d = make_driver(settings_with(non_compliant=Action.DETECT))
    d.send(b"AUTH PLAIN\r\n")
    assert d.send(b"GET / HTTP/1.1\r\n") == UNKNOWN
    assert d.session.state is State.AUTHORIZATION


def test_auth_mechanism_not_offered(make_driver: Any) -> None:
    d = make_driver(SessionSettings(sasl_mechanisms=("PLAIN",)))
    assert d.send(b"AUTH\r\n") == b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert d.send(b"AUTH LOGIN\r\n") == b"-ERR Unsupported authentication mechanism.\r\n"
    assert d.session.state is State.AUTHORIZATION


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_auth_invalid_user_name(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(non_compliant=action))
    out = d.send(b"AUTH PLAIN " + plain(user=b"bob/../x") + b"\r\n")
    assert out == b"-ERR [AUTH] Invalid user name.\r\n"
    assert d.logins == []
    assert bool(d.closes) is (action is Action.PREVENT)


def test_sasl_continuation_pipelined_with_auth(make_driver: Any) -> None:
    """TCP chunking must not change the outcome: a PLAIN response of 300-2048 octets is accepted
    as a continuation line (sasl_line_limit) whether or not it arrives in the AUTH line's segment."""
    blob = plain(password=b"p" * 300)
    assert 255 < len(blob) + 2 <= 2048
    two = make_driver(users={"bob": b"p" * 300})
    assert two.send(b"AUTH PLAIN\r\n") + two.send(blob + b"\r\n") == b"+ \r\n" + LOGGED_IN
    one = make_driver(users={"bob": b"p" * 300})
    assert one.send(b"AUTH PLAIN\r\n" + blob + b"\r\n") == b"+ \r\n" + LOGGED_IN
    assert not one.closed


# ================================================================== APOP


@pytest.mark.parametrize("typed", ["mu\u0308ller", "m\u00fcller"])
def test_user_name_is_passed_on_in_nfc(make_driver: Any, typed: str) -> None:
    """A decomposed name (macOS) logs in as the composed one: one user, one maildrop, one log name."""
    d = make_driver(users={"m\u00fcller": PASSWORD})
    assert d.send(b"USER " + typed.encode() + b"\r\nPASS " + PASSWORD + b"\r\n") == b"+OK\r\n" + LOGGED_IN
    assert d.logins == [A.Authenticate("m\u00fcller", PASSWORD, "USER", None)]
    assert d.session.user == "m\u00fcller"
    d = make_driver(users={"m\u00fcller": PASSWORD})
    assert d.send(b"AUTH PLAIN " + plain(typed.encode()) + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("m\u00fcller", PASSWORD, "PLAIN", None)]
    d = make_driver(users={"m\u00fcller": PASSWORD})
    assert d.send(b"AUTH LOGIN\r\n" + b64(typed.encode()) + b"\r\n" + b64(PASSWORD) + b"\r\n") == (
        LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT + LOGGED_IN)
    assert d.logins == [A.Authenticate("m\u00fcller", PASSWORD, "LOGIN", None)]
    d = make_driver(SessionSettings(apop=True), challenge=CHALLENGE, users={"m\u00fcller": DIGEST})
    assert d.send(b"APOP " + typed.encode() + b" " + DIGEST + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("m\u00fcller", DIGEST, "APOP", CHALLENGE)]


@pytest.mark.parametrize("name", ["\u0926\u0947\u0935\u0928\u093e\u0917\u0930\u0940", "\u0e27\u0e34\u0e0a\u0e31\u0e22",
                                  "\u5c71\u7530", "\u0414\u043c\u0438\u0442\u0440\u0438\u0439", "Jos\u00e9"])
def test_user_names_of_other_scripts_log_in(make_driver: Any, name: str) -> None:
    d = make_driver(users={name: PASSWORD})
    assert d.send(b"USER " + name.encode() + b"\r\nPASS " + PASSWORD + b"\r\n") == b"+OK\r\n" + LOGGED_IN
    assert d.reports == []


def test_apop_disabled_by_default(make_driver: Any) -> None:
    d = make_driver(challenge=CHALLENGE)
    assert d.send(b"APOP bob " + DIGEST + b"\r\n") == b"-ERR APOP is not enabled.\r\n"
    assert d.logins == [] and not d.closed


def test_apop_enabled(make_driver: Any) -> None:
    d = make_driver(SessionSettings(apop=True), challenge=CHALLENGE, users={"bob": DIGEST})
    assert d.send(b"APOP bob " + DIGEST.upper() + b"\r\n") == LOGGED_IN
    assert d.logins == [A.Authenticate("bob", DIGEST, "APOP", CHALLENGE)]
    assert d.actions[-2] == A.LoggedIn("bob", "APOP", 2, 30)


def test_apop_wrong_digest(make_driver: Any) -> None:
    d = make_driver(SessionSettings(apop=True), challenge=CHALLENGE)
    assert d.send(b"APOP bob " + DIGEST + b"\r\n") == AUTH_FAILED
    assert d.session.user is None and d.session.state is State.AUTHORIZATION


@pytest.mark.parametrize("digest", [DIGEST[:-1], DIGEST + b"0", DIGEST[:-1] + b"g", b"x"])
@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_apop_malformed_digest(make_driver: Any, digest: bytes, action: Action) -> None:
    d = make_driver(settings_with(session={"apop": True}, non_compliant=action), challenge=CHALLENGE)
    out = d.send(b"APOP bob " + digest + b"\r\n")
    if action is Action.PREVENT:
        assert out == b"-ERR Invalid APOP digest.\r\n"
        assert d.new_closes == [A.Close("prevented:non_compliant")]
    else:
        assert out == b"-ERR [AUTH] Invalid APOP digest.\r\n"
        assert not d.closed
    assert d.logins == []


# ================================================================== pipelining


def test_pipelining_stops_at_authenticate(make_driver: Any) -> None:
    d = make_driver(auto=())
    out = d.send(b"CAPA\r\nUSER bob\r\nPASS " + PASSWORD + b"\r\nSTAT\r\nLIST\r\nDELE 1\r\nQUIT\r\n")
    assert out == CAPA_AUTH + b"+OK\r\n"
    assert d.kinds() == ["Send", "Send", "Authenticate"]
    assert d.call("login_succeeded", d.entries) == (LOGGED_IN + b"+OK 2 30\r\n"
                                                    b"+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n"
                                                    b"+OK Marked to be deleted.\r\n")
    assert d.kinds() == ["LoggedIn", "Send", "Send", "Send", "Send", "Commit"]
    assert d.new_actions[-1] == A.Commit(("k1",))
    assert d.call("commit_finished") == BYE


def test_pipelining_after_a_failed_login(make_driver: Any) -> None:
    d = make_driver(auto=())
    d.send(b"USER bob\r\nPASS x\r\nUSER bob\r\nPASS " + PASSWORD + b"\r\nSTAT\r\n")
    assert d.call("login_failed") == AUTH_FAILED + b"+OK\r\n"
    assert d.kinds()[-1] == "Authenticate"
    assert d.call("login_succeeded", d.entries) == LOGGED_IN + b"+OK 2 30\r\n"


def test_pipelining_stops_at_each_stream(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    assert d.send(b"RETR 1\r\nTOP 2 1\r\nSTAT\r\nNOOP\r\n") == b""
    assert d.new_actions == [A.StreamMessage("k1", b"+OK 10 octets\r\n", None, prefetch="k2")]
    assert d.call("stream_finished") == b""
    assert d.new_actions == [A.StreamMessage("k2", b"+OK\r\n", 1, prefetch=None)]
    assert d.call("stream_finished") == b"+OK 2 30\r\n+OK\r\n"


def test_pipelining_full_transcript(make_driver: Any) -> None:
    d = make_driver()
    out = d.send(b"CAPA\r\nUSER bob\r\nPASS " + PASSWORD + b"\r\nUIDL\r\nLIST\r\nRETR 1\r\nDELE 1\r\n"
                 b"TOP 2 0\r\nQUIT\r\n")
    body1 = stuff(b"Subject: message k1\r\n\r\nline one of k1\r\n.dotted line\r\nline three\r\n")
    body2 = stuff(b"Subject: message k2\r\n\r\nline one of k2\r\n.dotted line\r\nline three\r\n", 0)
    assert out == (CAPA_AUTH + b"+OK\r\n" + LOGGED_IN + b"+OK 2 messages\r\n1 uid-1\r\n2 uid-2\r\n.\r\n"
                   b"+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n" + b"+OK 10 octets\r\n" + body1 +
                   b"+OK Marked to be deleted.\r\n" + b"+OK\r\n" + body2 + BYE)
    assert d.commits == [A.Commit(("k1",))]
    assert d.closes == [A.Close("quit")]


def test_pipelining_byte_by_byte_equals_one_chunk(make_driver: Any) -> None:
    data = (b"CAPA\r\nUSER bob\r\nPASS " + PASSWORD + b"\r\nSTAT\r\nLIST 1\r\nRETR 2\r\nDELE 2\r\n"
            b"UIDL\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    whole = make_driver()
    expected = whole.send(data)
    split = make_driver()
    assert split.send_chunks(data[i:i + 1] for i in range(len(data))) == expected
    assert split.commits == whole.commits == [A.Commit(())]


def test_pipelining_resumes_after_analysis(make_driver: Any, kit: Any) -> None:
    """Analyze is a busy point like Authenticate: once analysis_finished answers, the commands
    pipelined behind the analysed one must run without waiting for more input."""
    d = make_driver(quick_check=kit.marker_check, auto=())
    assert d.send(b"USER SLOWPATHbob\r\nCAPA\r\n") == b""
    assert isinstance(d.pending, A.Analyze)
    assert d.pending.arguments == (b"SLOWPATHbob",)
    out = d.call("analysis_finished", [kit.CLEAN])
    assert out == b"+OK\r\n" + CAPA_AUTH


def test_busy_session_holds_input(make_driver: Any) -> None:
    d = logged_in(make_driver, auto=(A.Authenticate,))
    d.send(b"RETR 1\r\n")
    assert d.send(b"STAT\r\n") == b"" and d.new_actions == []
    assert d.session.buffered == 6
    assert d.call("stream_finished") == b"+OK 2 30\r\n"
    assert d.session.buffered == 0


def test_overflow_while_busy(make_driver: Any) -> None:
    d = logged_in(make_driver, settings_with(commands_after_login=100000), auto=(A.Authenticate,))
    d.send(b"RETR 1\r\n")
    d.send(b"NOOP\r\n" * 11000)  # 66000 octets of pipelined input
    assert d.new_actions == []
    assert d.session.buffered <= 65536
    out = d.call("stream_finished")
    assert out.endswith(b"-ERR [SYS/TEMP] Too much pipelined input.\r\n")
    assert out.count(b"+OK\r\n") == 65536 // 6
    assert d.closes == [A.Close("input buffer full")]


def test_buffered_stays_within_the_hard_cap(make_driver: Any) -> None:
    """session.buffered <= max(input_buffer_limit, 8192) + 2 * 2048, even while busy and with
    line_length in detect mode (the framer then accepts lines of up to 8192 octets)."""
    d = logged_in(make_driver, settings_with(max_line_length=Action.DETECT), auto=(A.Authenticate,))
    d.send(b"RETR 1\r\n")
    d.send(b"NOOP\r\n" * 10900)
    d.send(b"X" * 8000)
    assert d.session.buffered <= max(d.settings.input_buffer_limit, HARD_LINE_LIMIT) + 2 * 2048


# ================================================================== STLS


@pytest.mark.parametrize("state", ["authorization", "transaction"])
@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_stls(make_driver: Any, action: Action, state: str) -> None:
    d = make_driver(settings_with(stls=action))
    if state == "transaction":
        d.login()
    out = d.send(b"STLS\r\nNOOP\r\n")
    noop = b"+OK\r\n" if state == "transaction" else UNKNOWN
    assert out == b"-ERR STLS is not available.\r\n" + noop
    assert not d.closed
    if action is Action.INACTIVE:
        assert d.reports == []
    else:
        [event] = d.reports
        assert_event(event, "stls", action)
        assert event.command == "STLS"
        d.send(b"STLS\r\n")
        assert len(d.reports) == (1 if action is Action.DETECT else 2)
        if action is Action.DETECT:
            assert d.session.engine.repeats["stls"] == 1
    assert not d.closed


def test_stls_discards_nothing_and_runs_nothing(make_driver: Any) -> None:
    """STLS is refused, so the lines after it are ordinary commands (no TLS, nothing to discard)."""
    d = make_driver()
    assert d.send(b"STLS\r\nCAPA\r\n") == b"-ERR STLS is not available.\r\n" + CAPA_AUTH


# ================================================================== the protection table

CLIENT_HELLO_WITH_LF = (b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(11, 43)) + b"\x00\x00\x02\x13\x01"
                        + b"\x01\x00\x00\x99" + b"\x00" * 30 + b"\n" + b"\x01" * 100)


def _client_hello_without_lf() -> bytes:
    body = bytearray(b"\x01\x00\x01\xfc\x03\x03")
    body += bytes((i * 37 + 11) % 256 for i in range(32))  # random
    body += b"\x20" + bytes((i * 53 + 7) % 256 for i in range(32))  # session id
    body += b"\x00\x20" + bytes.fromhex("130113021303c02bc02fc02cc030cca9cca8c013c014009c009d002f0035")
    body += b"\x01\x00"
    ext = bytes((i * 29 + 3) % 256 for i in range(512 - len(body) - 2))
    body += len(ext).to_bytes(2, "big") + ext
    data = bytes(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body).replace(b"\n", b"\x0b")
    assert len(data) == 517 and b"\n" not in data
    return data


CLIENT_HELLO = _client_hello_without_lf()


@dataclass
class Case:
    id: str
    key: str
    line: bytes
    prevent: bytes
    detect: bytes
    state: str = "authorization"  # or "user" (after USER bob), "transaction"
    setup: bytes = b""
    settings: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    detail: dict[str, Any] | None = None
    others: Action | None = None  # the action of every other protection (default prevent)


LONG_USER = b"USER " + b"a" * 249  # 254 + CRLF = 256 octets
CASES = [
    # empty_username
    Case("user-none", "empty_username", b"USER\r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR No username given.\r\n", command="USER", detail={}),
    Case("user-blank", "empty_username", b"USER \r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR No username given.\r\n", command="USER "),
    Case("user-blanks", "empty_username", b"USER    \r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR No username given.\r\n"),
    Case("apop-none", "empty_username", b"APOP\r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR No username given.\r\n", command="APOP"),
    Case("apop-blank-name", "empty_username", b"APOP  " + DIGEST + b"\r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR No username given.\r\n", session={"apop": True}),
    Case("plain-empty-authcid", "empty_username", b"AUTH PLAIN " + b64(b"\x00\x00" + PASSWORD) + b"\r\n",
         b"-ERR [AUTH] No username given.\r\n", b"-ERR [AUTH] No username given.\r\n",
         command="AUTH PLAIN <hidden>"),
    Case("plain-authzid-empty-authcid", "empty_username", b"AUTH PLAIN " + b64(b"admin\x00\x00" + PASSWORD) + b"\r\n",
         b"-ERR [AUTH] No username given.\r\n", b"-ERR [AUTH] No username given.\r\n",
         command="AUTH PLAIN <hidden>", detail={}),
    Case("plain-authzid-empty-authcid-continuation", "empty_username",
         b"AUTH PLAIN\r\n" + b64(b"admin\x00\x00" + PASSWORD) + b"\r\n",
         b"+ \r\n-ERR [AUTH] No username given.\r\n", b"+ \r\n-ERR [AUTH] No username given.\r\n",
         command="<SASL response, 32 octets>", detail={}),
    Case("plain-authzid-blank-authcid", "empty_username", b"AUTH PLAIN " + b64(b"bob\x00  \x00" + PASSWORD) + b"\r\n",
         b"-ERR [AUTH] No username given.\r\n", b"-ERR [AUTH] No username given.\r\n"),
    Case("plain-blank-authcid-continuation", "empty_username",
         b"AUTH PLAIN\r\n" + b64(b"\x00  \x00" + PASSWORD) + b"\r\n",
         b"+ \r\n-ERR [AUTH] No username given.\r\n", b"+ \r\n-ERR [AUTH] No username given.\r\n"),
    Case("login-empty-user", "empty_username", b"AUTH LOGIN =\r\n", b"-ERR [AUTH] No username given.\r\n",
         b"-ERR [AUTH] No username given.\r\n"),
    Case("login-empty-user-continuation", "empty_username", b"AUTH LOGIN\r\n=\r\n",
         LOGIN_USER_PROMPT + b"-ERR [AUTH] No username given.\r\n",
         LOGIN_USER_PROMPT + b"-ERR [AUTH] No username given.\r\n"),
    # empty_password
    Case("pass-none", "empty_password", b"PASS\r\n", b"-ERR [AUTH] No password given.\r\n",
         b"-ERR No password given.\r\n", state="user", command="PASS", detail={}),
    Case("pass-blank", "empty_password", b"PASS \r\n", b"-ERR [AUTH] No password given.\r\n",
         b"-ERR No password given.\r\n", state="user"),
    Case("pass-blanks-no-user", "empty_password", b"PASS   \r\n", b"-ERR [AUTH] No password given.\r\n",
         b"-ERR No password given.\r\n"),
    Case("plain-empty-password", "empty_password", b"AUTH PLAIN " + b64(b"\x00bob\x00") + b"\r\n",
         b"-ERR [AUTH] No password given.\r\n", b"-ERR [AUTH] No password given.\r\n"),
    Case("plain-blank-password", "empty_password", b"AUTH PLAIN\r\n" + b64(b"bob\x00bob\x00   ") + b"\r\n",
         b"+ \r\n-ERR [AUTH] No password given.\r\n", b"+ \r\n-ERR [AUTH] No password given.\r\n",
         command="<SASL response, 16 octets>"),
    Case("login-empty-password", "empty_password", b"AUTH LOGIN " + b64(b"bob") + b"\r\n=\r\n",
         LOGIN_PASS_PROMPT + b"-ERR [AUTH] No password given.\r\n",
         LOGIN_PASS_PROMPT + b"-ERR [AUTH] No password given.\r\n"),
    # non_compliant
    Case("nul", "non_compliant", b"USER bob\x00\r\n", PROTOCOL_VIOLATION,
         b"-ERR Invalid characters in command.\r\n", command="USER bob\\x00", detail={"reason": "NUL byte"}),
    Case("invalid-utf8", "non_compliant", b"USER b\xffb\r\n", PROTOCOL_VIOLATION,
         b"-ERR Invalid characters in command.\r\n", detail={"reason": "invalid UTF-8"}),
    Case("lone-cr", "non_compliant", b"USER b\rob\r\n", PROTOCOL_VIOLATION,
         b"-ERR Invalid characters in command.\r\n", detail={"reason": "lone CR inside a line"}),
    Case("tab", "non_compliant", b"LIST\t1\r\n", PROTOCOL_VIOLATION, UNKNOWN, state="transaction"),
    Case("bad-keyword", "non_compliant", b"US3R bob\r\n", PROTOCOL_VIOLATION, UNKNOWN,
         command="<not a command, 8 octets>", detail={"reason": "keyword is not 3-4 ASCII letters"}),
    Case("long-keyword", "non_compliant", b"USERNAME bob\r\n", PROTOCOL_VIOLATION, UNKNOWN),
    Case("empty-line", "non_compliant", b"\r\n", PROTOCOL_VIOLATION, UNKNOWN, command="<not a command, 0 octets>"),
    Case("wrong-arg-count", "non_compliant", b"STAT 1\r\n", PROTOCOL_VIOLATION, b"-ERR Invalid arguments.\r\n",
         state="transaction", detail={"reason": "wrong number of arguments"}),
    Case("top-one-arg", "non_compliant", b"TOP 1\r\n", PROTOCOL_VIOLATION, b"-ERR Invalid arguments.\r\n",
         state="transaction"),
    Case("double-space", "non_compliant", b"LIST  1\r\n", PROTOCOL_VIOLATION, b"-ERR Invalid arguments.\r\n",
         state="transaction", detail={"reason": "arguments must be separated by a single space"}),
    Case("capa-arg", "non_compliant", b"CAPA x\r\n", PROTOCOL_VIOLATION, b"-ERR Invalid arguments.\r\n"),
    Case("username-slash", "non_compliant", b"USER ../etc/passwd\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n",
         detail={"reason": "user name has characters outside username_chars"}),
    Case("username-format", "non_compliant", b"USER %s%s%n\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n"),
    Case("username-space", "non_compliant", b"USER bob smith\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n"),
    Case("username-leading-dot", "non_compliant", b"USER .bob\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n"),
    Case("username-hangul-filler", "non_compliant", "USER bob\u3164\r\n".encode(), b"-ERR [AUTH] Invalid user name.\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n", command="USER bob\\xe3\\x85\\xa4",
         detail={"reason": "user name has an invisible character"}),
    Case("username-variation-selector", "non_compliant", "USER bob\ufe0f\r\n".encode(),
         b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         detail={"reason": "user name has an invisible character"}),
    Case("username-mark-after-digit", "non_compliant", "USER bob1\u0301\r\n".encode(),
         b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         detail={"reason": "user name has a combining mark that follows no letter"}),
    Case("username-plain-invisible", "non_compliant", b"AUTH PLAIN " + plain("bob\u3164".encode()) + b"\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         command="AUTH PLAIN <hidden>", detail={"reason": "user name has an invisible character"}),
    Case("username-apop-invisible", "non_compliant", "APOP bob\u115f ".encode() + DIGEST + b"\r\n",
         b"-ERR [AUTH] Invalid user name.\r\n", b"-ERR [AUTH] Invalid user name.\r\n",
         session={"apop": True}, detail={"reason": "user name has an invisible character"}),
    Case("message-number", "non_compliant", b"DELE -1\r\n", b"-ERR Invalid message number.\r\n",
         b"-ERR Invalid message number.\r\n", state="transaction", command="DELE -1",
         detail={"reason": "malformed message number"}),
    Case("line-count", "non_compliant", b"TOP 1 -1\r\n", b"-ERR Invalid line count.\r\n",
         b"-ERR Invalid line count.\r\n", state="transaction", detail={"reason": "malformed line count"}),
    Case("tls", "non_compliant", CLIENT_HELLO_WITH_LF, PROTOCOL_VIOLATION, UNKNOWN,
         detail={"reason": "TLS handshake on a POP3 port"}),
    Case("http", "non_compliant", b"GET / HTTP/1.1\r\n", PROTOCOL_VIOLATION, UNKNOWN,
         command="GET / HTTP/1.1", detail={"reason": "HTTP request on a POP3 port"}),
    Case("http-connect", "non_compliant", b"CONNECT mail.example.org:995 HTTP/1.1\r\n", PROTOCOL_VIOLATION,
         UNKNOWN),
    Case("strict-crlf", "non_compliant", b"CAPA\n", b"-ERR Lines must end with CRLF.\r\n", CAPA_AUTH,
         settings={"strict_crlf": True}, detail={"reason": "bare LF line ending"}),
    Case("unknown-as-violation", "non_compliant", b"XYZZ\r\n", PROTOCOL_VIOLATION, UNKNOWN,
         settings={"unknown_commands": "violation"}, detail={"reason": "unknown command"}),
    Case("apop-digest", "non_compliant", b"APOP bob xyz\r\n", b"-ERR Invalid APOP digest.\r\n",
         b"-ERR [AUTH] Invalid APOP digest.\r\n", session={"apop": True},
         detail={"reason": "malformed digest"}, command="APOP bob <hidden>"),
    Case("apop-one-arg", "non_compliant", b"APOP bob\r\n", PROTOCOL_VIOLATION, b"-ERR Invalid arguments.\r\n",
         session={"apop": True}),
    Case("base64", "non_compliant", b"AUTH PLAIN AGJvYg=\r\n", b"-ERR Invalid base64 data.\r\n",
         b"-ERR Invalid base64 data.\r\n", detail={"reason": "invalid base64"}),
    Case("plain-parts", "non_compliant", b"AUTH PLAIN " + b64(b"bob") + b"\r\n", b"-ERR Invalid PLAIN data.\r\n",
         b"-ERR [AUTH] Invalid PLAIN data.\r\n", detail={"reason": "PLAIN needs exactly two NUL separators"}),
    # max_line_length
    Case("line-256", "max_line_length", LONG_USER + b"\r\n", TOO_LONG, b"+OK\r\n",
         detail={"length": 256, "limit": 255}, command="USER " + "a" * 64 + "..."),
    Case("line-256-bare-lf", "max_line_length", LONG_USER + b"a\n", TOO_LONG, b"+OK\r\n"),
    Case("line-9000", "max_line_length", b"USER " + b"a" * 9000 + b"\r\n", TOO_LONG, TOO_LONG,
         detail={"length": 9007, "limit": 255, "complete": True}),
    Case("sasl-2049", "max_line_length", b"A" * 2047 + b"\r\n", TOO_LONG, b"-ERR Invalid base64 data.\r\n",
         setup=b"AUTH PLAIN\r\n", others=Action.DETECT),
    # max_commands
    Case("commands", "max_commands", b"CAPA\r\n", b"-ERR Too many commands.\r\n", CAPA_AUTH,
         setup=b"CAPA\r\n" * 3, settings={"commands_limit": 3}, command="CAPA", detail={"count": 4, "limit": 3}),
    Case("commands-login", "max_commands", b"STAT\r\n", b"-ERR Too many commands.\r\n", b"+OK 2 30\r\n",
         state="transaction", setup=b"NOOP\r\n" * 4,
         settings={"commands_limit": 2, "commands_after_login": 2, "commands_per_message": 1},
         command="STAT", detail={"count": 5, "limit": 4}),
    # max_bad_commands
    Case("bad-commands", "max_bad_commands", b"XYZZ\r\n", b"-ERR Too many bad commands.\r\n", UNKNOWN,
         setup=b"XYZZ\r\n" * 10, command="<error reply>", detail={"count": 11, "limit": 10}),
    Case("bad-commands-limit-2", "max_bad_commands", b"STAT\r\n", b"-ERR Too many bad commands.\r\n", UNKNOWN,
         setup=b"NOOP\r\nRSET\r\n", settings={"bad_commands_limit": 2}),
    Case("bad-commands-login", "max_bad_commands", b"USER bob\r\nPASS x\r\n",
         b"+OK\r\n-ERR Too many bad commands.\r\n", b"+OK\r\n" + AUTH_FAILED,
         setup=b"USER bob\r\nPASS x\r\n" * 10),
    # malicious_code (marker_check flags %n%n%n%n and NOP sleds)
    Case("mcp-pass", "malicious_code", b"PASS %n%n%n%n\r\n", b"-ERR Command refused.\r\n", AUTH_FAILED,
         state="user", command="PASS <hidden, 8 octets>", detail={"reasons": ["format string"]}),
    Case("mcp-plain", "malicious_code", b"AUTH PLAIN " + plain(password=b"%n%n%n%n") + b"\r\n",
         b"-ERR Command refused.\r\n", AUTH_FAILED, command="AUTH PLAIN <hidden>"),
    Case("mcp-sasl", "malicious_code", b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(b"x%n%n%n%n") + b"\r\n",
         LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT + b"-ERR Command refused.\r\n",
         LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT + AUTH_FAILED),
    Case("mcp-list", "malicious_code", b"LIST %n%n%n%n\r\n", b"-ERR Command refused.\r\n",
         b"-ERR Invalid message number.\r\n", state="transaction", others=Action.DETECT),
]


def _prepare(make_driver: Any, kit: Any, case: Case, action: Action) -> Any:
    prot = dict(case.settings)
    settings = settings_with(session=case.session, default=case.others, **{case.key: action}, **prot)
    d = make_driver(settings, quick_check=kit.marker_check, challenge=CHALLENGE)
    if case.state == "user":
        assert d.send(b"USER bob\r\n") == b"+OK\r\n"
    elif case.state == "transaction":
        d.login()
    if case.setup:
        d.send(case.setup)
    assert not d.closed
    d.actions.clear()
    return d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("action", ALL_ACTIONS, ids=[a.value for a in ALL_ACTIONS])
def test_protection(make_driver: Any, kit: Any, case: Case, action: Action) -> None:
    d = _prepare(make_driver, kit, case, action)
    out = d.send(case.line)
    reports = [e for e in d.reports if e.protection == case.key]
    if action is Action.PREVENT:
        assert out == case.prevent
        assert d.new_actions[-1] == A.Close(f"prevented:{case.key}")
        assert len(d.closes) == 1
    else:
        assert out == case.detect
        assert not d.closed
    if action is Action.INACTIVE:
        assert reports == []
        return
    assert len(reports) == 1, d.reports
    event = reports[0]
    assert_event(event, case.key, action)
    if case.command is not None:
        assert event.command == case.command
    if case.detail is not None:
        assert {k: event.detail.get(k) for k in case.detail} == case.detail
    if action is Action.DETECT:
        # detect reports once per connection and counts the repeats
        repeats = d.session.engine.repeats[case.key]
        d.send(case.setup + case.line)
        assert [e for e in d.reports if e.protection == case.key] == [event]
        assert d.session.engine.repeats[case.key] > repeats


def test_every_protection_has_cases() -> None:
    assert {c.key for c in CASES} | {"stls"} == set(PROTECTION_KEYS)


# ================================================================== protection details


@pytest.mark.parametrize("limit", [10, 3])
def test_max_bad_commands_is_the_reply_after_the_limit(make_driver: Any, limit: int) -> None:
    d = make_driver(settings_with(bad_commands_limit=limit))
    for _ in range(limit):
        assert d.send(b"NOOP\r\n") == UNKNOWN
    assert not d.closed and d.reports == []
    assert d.send(b"NOOP\r\n") == b"-ERR Too many bad commands.\r\n"
    assert d.closes == [A.Close("prevented:max_bad_commands")]


def test_max_bad_commands_detect_counts_repeats(make_driver: Any) -> None:
    d = make_driver(settings_with(max_bad_commands=Action.DETECT))
    d.send(b"NOOP\r\n" * 15)
    assert len(d.reports) == 1
    assert d.session.engine.repeats["max_bad_commands"] == 4
    assert not d.closed


def test_successful_commands_do_not_count_as_bad(make_driver: Any) -> None:
    d = logged_in(make_driver)
    d.send(b"NOOP\r\n" * 50 + b"LIST 99\r\n" * 10)
    assert not d.closed
    assert d.send(b"LIST 99\r\n") == b"-ERR Too many bad commands.\r\n"


def test_max_commands_before_login_default(make_driver: Any) -> None:
    """50 commands before login: CAPA, USER, PASS and retries fit many times over."""
    d = make_driver()
    d.send(b"CAPA\r\n" * 48 + b"USER bob\r\n")
    assert not d.closed
    assert d.send(b"USER bob\r\n") == b"+OK\r\n"  # the 50th
    assert d.send(b"PASS " + PASSWORD + b"\r\n") == b"-ERR Too many commands.\r\n"
    assert d.closes == [A.Close("prevented:max_commands")]
    [event] = d.reports
    assert event.command == "PASS <hidden, 15 octets>"
    assert event.detail == {"count": 51, "limit": 50}
    assert d.logins == []


def test_max_commands_after_login_default(make_driver: Any) -> None:
    """After login 1000 + 5 per message, counted from the login on."""
    d = make_driver()
    d.send(b"CAPA\r\n" * 48)
    assert d.login() == b"+OK\r\n" + LOGGED_IN  # commands 49 and 50 of the login phase
    d.send(b"NOOP\r\n" * 1009)
    assert not d.closed
    assert d.send(b"NOOP\r\n") == b"+OK\r\n"  # 1000 + 5 * 2 messages
    assert d.send(b"NOOP\r\n") == b"-ERR Too many commands.\r\n"
    assert d.closes == [A.Close("prevented:max_commands")]
    [event] = d.reports
    assert event.detail == {"count": 1011, "limit": 1010}


def test_commands_counts_the_whole_connection_across_login(make_driver: Any) -> None:
    """``max_commands`` restarts at login; the count the server log reports does not."""
    d = make_driver()
    d.send(b"CAPA\r\n" * 3)
    d.login()  # USER, PASS
    d.send(b"NOOP\r\nSTAT\r\n")
    assert d.session.commands == 7


@pytest.mark.parametrize("messages, limit", [(0, 7), (1, 10), (4, 19)])
def test_max_commands_after_login_grows_with_the_maildrop(make_driver: Any, kit: Any, messages: int,
                                                          limit: int) -> None:
    entries = [kit.Entry(f"k{i}", f"uid-{i}", 10) for i in range(messages)]
    settings = settings_with(commands_after_login=7, commands_per_message=3)
    d = make_driver(settings, entries=entries)
    d.login()
    d.send(b"NOOP\r\n" * limit)
    assert not d.closed and d.reports == []
    assert d.send(b"STAT\r\n") == b"-ERR Too many commands.\r\n"
    [event] = d.reports
    assert event.detail == {"count": limit + 1, "limit": limit}


@pytest.mark.parametrize("action", [Action.DETECT, Action.INACTIVE])
def test_max_commands_after_login_detect_goes_on(make_driver: Any, action: Action) -> None:
    d = logged_in(make_driver, settings_with(max_commands=action, commands_after_login=3, commands_per_message=0))
    assert d.send(b"NOOP\r\n" * 5 + b"STAT\r\n") == b"+OK\r\n" * 5 + b"+OK 2 30\r\n"
    assert not d.closed
    assert [e.detail for e in d.reports] == ([{"count": 4, "limit": 3}] if action is Action.DETECT else [])


def test_a_big_mailbox_is_emptied_in_one_session(make_driver: Any, kit: Any) -> None:
    """12,000 messages, each with LIST n, UIDL n, TOP n 0, RETR n and DELE n, as fetchmail and
    getmail do (60,000 commands and more): no protection fires and QUIT commits every DELE."""
    count = 12000
    entries = [kit.Entry(f"k{i}", f"uid-{i}", 10) for i in range(1, count + 1)]
    d = make_driver(entries=entries)
    d.send(b"CAPA\r\n")
    d.login()
    d.send(b"STAT\r\nUIDL\r\nLIST\r\n")
    for n in range(1, count + 1):
        number = str(n).encode()
        d.send(b"LIST " + number + b"\r\nUIDL " + number + b"\r\nTOP " + number + b" 0\r\nRETR "
               + number + b"\r\nDELE " + number + b"\r\n")
    d.send(b"STAT\r\nNOOP\r\n" * 400)
    assert d.reports == [] and not d.closed
    assert d.send(b"QUIT\r\n") == BYE
    assert d.commits == [A.Commit(tuple(e.key for e in entries))]
    assert d.reports == []


def test_requests_for_deleted_messages_are_not_bad_commands(make_driver: Any) -> None:
    """A client that asks again for what it deleted gets -ERR, but it is not attacking."""
    d = logged_in(make_driver)
    d.send(b"DELE 1\r\n")
    for _ in range(5):
        for line in (b"LIST 1", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1"):
            assert d.send(line + b"\r\n") == b"-ERR Message is deleted.\r\n", line
    assert not d.closed and d.reports == []
    # the bad-command count is untouched: ten real errors are still allowed, the eleventh is not
    assert d.send(b"LIST 99\r\n" * 10) == b"-ERR There is no such message.\r\n" * 10
    assert d.send(b"LIST 99\r\n") == b"-ERR Too many bad commands.\r\n"
    assert d.closes == [A.Close("prevented:max_bad_commands")]
    assert d.reports[0].detail == {"count": 11, "limit": 10}


def test_a_vanished_message_is_not_a_bad_command(make_driver: Any) -> None:
    """RETR of a file another program removed: -ERR [SYS/TEMP], and the client did nothing wrong."""
    d = logged_in(make_driver, auto=(A.Authenticate,))
    for _ in range(12):
        d.send(b"RETR 1\r\n")
        assert d.call("stream_failed") == b"-ERR [SYS/TEMP] Message is no longer available.\r\n"
    assert not d.closed and d.reports == []


def test_sasl_lines_are_not_commands(make_driver: Any) -> None:
    d = make_driver(settings_with(commands_limit=1))
    assert d.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(PASSWORD) + b"\r\n") == (
        LOGIN_USER_PROMPT + LOGIN_PASS_PROMPT + LOGGED_IN)
    assert d.reports == []
    d = make_driver(settings_with(commands_limit=1))
    assert d.send(b"AUTH PLAIN\r\n" + plain() + b"\r\n") == b"+ \r\n" + LOGGED_IN
    d = make_driver(settings_with(commands_limit=1))
    assert d.send(b"CAPA\r\nAUTH PLAIN\r\n") == CAPA_AUTH + b"-ERR Too many commands.\r\n"


@pytest.mark.parametrize("terminator", [b"\r\n", b"\n"])
def test_line_length_boundary(make_driver: Any, terminator: bytes) -> None:
    ok_line = b"USER " + b"b" * (255 - 5 - len(terminator)) + terminator
    assert len(ok_line) == 255
    d = make_driver()
    assert d.send(ok_line) == b"+OK\r\n"
    assert d.reports == []
    bad_line = b"USER " + b"b" * (256 - 5 - len(terminator)) + terminator
    assert len(bad_line) == 256
    assert d.send(bad_line) == TOO_LONG
    [event] = d.reports
    assert event.protection == "max_line_length" and event.detail["length"] == 256


def test_line_length_custom_limit(make_driver: Any) -> None:
    d = make_driver(settings_with(line_length_limit=512))
    assert d.send(b"USER " + b"b" * 505 + b"\r\n") == b"+OK\r\n"
    assert d.send(b"USER " + b"b" * 506 + b"\r\n") == TOO_LONG


def test_sasl_line_limit_boundary(make_driver: Any) -> None:
    password = b"p" * (1536 - 5)
    blob = plain(password=password)
    assert len(blob) == 2048
    d = make_driver(settings_with(sasl_line_limit=2050), users={"bob": password})
    assert d.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert d.send(blob + b"\r\n") == LOGGED_IN
    d = make_driver(settings_with(sasl_line_limit=2049))
    d.send(b"AUTH PLAIN\r\n")
    assert d.send(blob + b"\r\n") == TOO_LONG
    assert d.closes == [A.Close("prevented:max_line_length")]
    assert d.reports[0].command == "<SASL response, 2048 octets>"


def test_command_line_limit_applies_to_auth_initial_response(make_driver: Any) -> None:
    d = make_driver()
    assert d.send(b"AUTH PLAIN " + plain(password=b"p" * 300) + b"\r\n") == TOO_LONG
    assert d.reports[0].command == "AUTH PLAIN <hidden>"


@pytest.mark.parametrize("action", [Action.DETECT, Action.INACTIVE])
def test_overlong_in_detect_mode_goes_on(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(max_line_length=action))
    assert d.send(b"USER " + b"a" * 8000 + b"\r\nCAPA\r\n") == b"+OK\r\n" + CAPA_AUTH
    assert d.send(b"USER " + b"a" * 9000 + b"\r\nCAPA\r\n") == TOO_LONG + CAPA_AUTH
    assert not d.closed
    assert len(d.reports) == (1 if action is Action.DETECT else 0)


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_unterminated_flood(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(max_line_length=action))
    out = b""
    for _ in range(20):
        out += d.send(b"A" * 4096)
    assert out == TOO_LONG
    if action is Action.PREVENT:
        assert d.closes == [A.Close("prevented:max_line_length")]
    else:
        assert d.closes == [A.Close("line without end")]
    if action is not Action.INACTIVE:
        [event] = d.reports
        assert event.detail["complete"] is False and event.detail["length"] >= 65536
    assert d.session.buffered <= 65536 + 2 * 2048


def test_unterminated_flood_after_ten_errors_closes_once(make_driver: Any) -> None:
    d = make_driver(settings_with(max_line_length=Action.DETECT), strict=False)
    d.send(b"XYZZ\r\n" * 10)
    d.send(b"A" * 70000)
    assert d.transcript.endswith(b"-ERR Too many bad commands.\r\n")
    assert len(d.closes) == 1, d.closes


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_tls_client_hello_before_the_greeting(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(non_compliant=action), start=False)
    d.send(CLIENT_HELLO)
    if action is Action.PREVENT:
        assert d.transcript == PROTOCOL_VIOLATION
        assert d.closes == [A.Close("prevented:non_compliant")]
        assert d.session.closed
    else:
        d.start()
        assert d.transcript == GREETING
        assert not d.closed
    assert len(d.reports) == (0 if action is Action.INACTIVE else 1)


def test_start_after_close_does_nothing(make_driver: Any) -> None:
    """The session closed itself before the greeting (a ClientHello from an early talker): a
    start() that follows must not send a second refusal and a second Close."""
    d = make_driver(start=False, strict=False)
    d.send(CLIENT_HELLO)
    assert d.session.closed
    assert d.call("start") == b""
    assert d.new_actions == []


@pytest.mark.parametrize("action", [Action.DETECT, Action.INACTIVE])
def test_tls_client_hello_detect_goes_on(make_driver: Any, action: Action) -> None:
    d = make_driver(settings_with(non_compliant=action))
    assert d.send(CLIENT_HELLO) == b""
    assert not d.closed
    assert len(d.reports) == (1 if action is Action.DETECT else 0)
    if action is Action.DETECT:
        assert d.reports[0].detail == {"reason": "TLS handshake on a POP3 port"}


def test_tls_client_hello_without_lf_is_detected(make_driver: Any) -> None:
    """A TLS client on the plaintext port sends one ClientHello (~517 octets, often without any
    0x0a byte) and then waits: the violation must be found without waiting for an LF."""
    d = make_driver()
    d.send(CLIENT_HELLO)
    assert [e.protection for e in d.reports] == ["non_compliant"]
    assert d.closes == [A.Close("prevented:non_compliant")]


# ================================================================== malicious code


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_mcp_fast_tier_nop_sled(make_driver: Any, kit: Any, action: Action) -> None:
    """Binary in USER is first of all not POP3 (non_compliant answers); the detector's event follows."""
    d = make_driver(settings_with(malicious_code=action), quick_check=kit.marker_check)
    line = b"USER " + b"\x90" * 16 + b"\r\n"
    out = d.send(line)
    assert out == PROTOCOL_VIOLATION
    assert d.closes == [A.Close("prevented:non_compliant")]
    if action is Action.INACTIVE:
        assert [e.protection for e in d.reports] == ["non_compliant"]
        return
    assert [e.protection for e in d.reports] == ["non_compliant", "malicious_code"]
    event = d.reports[1]
    assert_event(event, "malicious_code", action)
    assert event.detail == {"reasons": ["nop sled"]}
    assert event.command == "USER " + "\\x90" * 16


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_mcp_fast_tier_printable_argument(make_driver: Any, kit: Any, action: Action) -> None:
    """A printable argument the detector flags: malicious_code alone decides."""
    d = make_driver(settings_with(malicious_code=action), quick_check=kit.marker_check)
    out = d.send(b"USER ab%n%n%n%ncd\r\n")
    if action is Action.PREVENT:
        assert out == b"-ERR Command refused.\r\n"
        assert d.closes == [A.Close("prevented:malicious_code")]
    first = "non_compliant" if action is Action.INACTIVE else "malicious_code"  # % is outside username_chars
    assert [e.protection for e in d.reports][:1] == [first]


def test_mcp_reasons_are_sorted_and_unique(make_driver: Any, kit: Any) -> None:
    d = make_driver(quick_check=kit.marker_check)
    d.send(b"APOP " + b"%n%n%n%n\x90\x90\x90\x90 " + b"\x90\x90\x90\x90" + b"\r\n")
    [_, event] = d.reports
    assert event.protection == "malicious_code"
    assert event.detail == {"reasons": ["nop sled"]}


def test_mcp_checks_the_windows_of_overlong_lines(make_driver: Any, kit: Any) -> None:
    d = make_driver(quick_check=kit.marker_check)
    assert d.send(b"PASS " + b"A" * 5000 + b"\x90" * 64 + b"\r\n") == b"-ERR Command refused.\r\n"
    assert [e.protection for e in d.reports] == ["malicious_code", "max_line_length"]
    assert d.closes == [A.Close("prevented:malicious_code")]


def _recording_check(seen: list[tuple[bytes, str]], kit: Any) -> Any:
    def check(arg: bytes, field_: str) -> Any:
        seen.append((arg, field_))
        return kit.CLEAN

    return check


def test_mcp_sees_each_argument_with_its_field(make_driver: Any, kit: Any) -> None:
    seen: list[tuple[bytes, str]] = []
    d = make_driver(quick_check=_recording_check(seen, kit))
    d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n")
    d.send(b"LIST 1\r\nTOP 1 2\r\nSTAT\r\n")
    assert seen == [(b"bob", "username"), (PASSWORD, "password"), (b"1", "number"), (b"1", "number"),
                    (b"2", "number")]
    seen.clear()
    d = make_driver(quick_check=_recording_check(seen, kit))
    d.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert seen == [(b"PLAIN", "mechanism"), (b"bob", "sasl"), (PASSWORD, "sasl")]
    seen.clear()
    d = make_driver(quick_check=_recording_check(seen, kit))
    d.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(PASSWORD) + b"\r\n")
    assert seen == [(b"LOGIN", "mechanism"), (b"bob", "sasl"), (PASSWORD, "sasl")]


@pytest.mark.parametrize("line, expected", [
    (b"PASS correct horse battery", [(b"correct horse battery", "password")]),
    (b"USER bob smith", [(b"bob smith", "username")]),
])
def test_mcp_sees_the_rest_of_the_line_as_one_argument(make_driver: Any, kit: Any, line: bytes,
                                                       expected: list) -> None:
    """USER and PASS take the rest of the line (grammar.REST_OF_LINE): the detector must judge a
    password with spaces, or a payload with 0x20 bytes in it, as one password field, not as
    a password and some 'text' pieces."""
    seen: list[tuple[bytes, str]] = []
    d = make_driver(quick_check=_recording_check(seen, kit), settings=settings_with(non_compliant=Action.DETECT))
    d.send(line + b"\r\n")
    assert seen == expected


@pytest.mark.parametrize("action", [Action.PREVENT, Action.DETECT])
def test_mcp_slow_tier_malicious(make_driver: Any, kit: Any, action: Action) -> None:
    d = make_driver(settings_with(malicious_code=action), quick_check=kit.marker_check, auto=(A.Authenticate,))
    assert d.send(b"USER SLOWPATHEVIL\r\nCAPA\r\n") == b""
    assert d.new_actions == [A.Analyze((b"SLOWPATHEVIL",))]
    assert d.session.busy
    out = d.call("analysis_finished", [kit.Verdict(True, ("shellcode", "egg hunter", "shellcode"))])
    [event] = d.reports
    assert_event(event, "malicious_code", action)
    assert event.detail == {"reasons": ["egg hunter", "shellcode"]}
    if action is Action.PREVENT:
        assert out == b"-ERR Command refused.\r\n"
        assert d.closes == [A.Close("prevented:malicious_code")]
    else:
        assert out.startswith(b"+OK\r\n")
        assert not d.closed


def test_mcp_slow_tier_clean(make_driver: Any, kit: Any) -> None:
    d = make_driver(quick_check=kit.marker_check)
    assert d.send(b"USER SLOWPATH\r\n") == b"+OK\r\n"
    assert d.analyses == [A.Analyze((b"SLOWPATH",))]
    assert d.reports == []


@pytest.mark.parametrize("action", ALL_ACTIONS)
def test_mcp_fails_closed_without_capacity(make_driver: Any, kit: Any, action: Action) -> None:
    """No capacity for the slow tier: the command does not run and gets [SYS/TEMP], but that is no
    security event in the name of the user who arrived during a flood (issue 10), whatever the action."""
    d = make_driver(settings_with(malicious_code=action), quick_check=kit.marker_check,
                    auto=(A.Authenticate,))
    d.send(b"USER bob\r\nPASS SLOWPATH" + PASSWORD + b"\r\n")
    if action is Action.INACTIVE:
        assert d.analyses == [] and d.logins and d.reports == []
        return
    assert isinstance(d.pending, A.Analyze)
    out = d.call("analysis_finished", [None])
    assert out == b"-ERR [SYS/TEMP] Server busy, try again later.\r\n"
    assert d.logins == []
    assert d.reports == []
    assert not d.closed
    assert d.send(b"CAPA\r\n").startswith(b"+OK")


def test_mcp_inactive_never_asks(make_driver: Any) -> None:
    calls = []
    d = make_driver(settings_with(malicious_code=Action.INACTIVE), quick_check=lambda a, f: calls.append(a))
    d.send(b"USER bob\r\nPASS " + PASSWORD + b"\r\n")
    assert calls == [] and d.analyses == []


# ================================================================== per-source overrides


@pytest.mark.parametrize("address, action", [
    ("10.1.2.3", Action.INACTIVE),
    ("10.255.255.255", Action.INACTIVE),
    ("::ffff:10.1.2.3", Action.INACTIVE),
    ("::ffff:a01:203", Action.INACTIVE),
    ("::FFFF:10.0.0.1", Action.INACTIVE),
    ("11.0.0.1", Action.PREVENT),
    ("192.0.2.1", Action.PREVENT),
    ("::ffff:192.0.2.1", Action.PREVENT),
    ("2001:db8::10:1:2:3", Action.PREVENT),
    ("::a01:203", Action.PREVENT),  # IPv4-compatible, not IPv4-mapped
    ("fe80::1%eth0", Action.PREVENT),
    (None, Action.PREVENT),
    ("not an address", Action.PREVENT),
])
def test_override_by_client_address(make_driver: Any, address: str | None, action: Action) -> None:
    override = Override(networks=(ipaddress.ip_network("10.0.0.0/8"),), action=Action.INACTIVE)
    settings = SessionSettings(protections=ProtectionsConfig(
        non_compliant=ProtectionSettings(Action.PREVENT, overrides=(override,))))
    d = make_driver(settings, address=address)
    assert d.session.engine.action("non_compliant") is action
    assert d.session.engine.action("stls") is Action.PREVENT
    out = d.send(b"US3R bob\r\n")
    if action is Action.INACTIVE:
        assert out == UNKNOWN and d.reports == [] and not d.closed
    else:
        assert out == PROTOCOL_VIOLATION and len(d.reports) == 1 and d.closed


def test_first_matching_override_wins(make_driver: Any) -> None:
    overrides = (
        Override(networks=(ipaddress.ip_network("10.0.0.5/32"),), action=Action.DETECT),
        Override(networks=(ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("10.0.0.0/8")),
                 action=Action.INACTIVE),
    )
    settings = SessionSettings(protections=ProtectionsConfig(max_line_length=ProtectionSettings(
        Action.PREVENT, overrides=overrides)))
    for address, action in [("10.0.0.5", Action.DETECT), ("::ffff:10.0.0.5", Action.DETECT),
                            ("10.0.0.6", Action.INACTIVE), ("2001:db8::1", Action.INACTIVE),
                            ("192.0.2.1", Action.PREVENT)]:
        d = make_driver(settings, address=address)
        assert d.session.engine.action("max_line_length") is action, address
        out = d.send(LONG_USER + b"\r\n")
        assert out == (TOO_LONG if action is Action.PREVENT else b"+OK\r\n"), address
        assert len(d.reports) == (0 if action is Action.INACTIVE else 1), address


def test_override_can_tighten(make_driver: Any) -> None:
    settings = SessionSettings(protections=ProtectionsConfig(stls=ProtectionSettings(
        Action.INACTIVE, overrides=(Override((ipaddress.ip_network("192.0.2.0/24"),), Action.DETECT),))))
    assert make_driver(settings, address="198.51.100.1").send(b"STLS\r\n") == b"-ERR STLS is not available.\r\n"
    d = make_driver(settings, address="192.0.2.77")
    d.send(b"STLS\r\n")
    assert [(e.protection, e.action) for e in d.reports] == [("stls", Action.DETECT)]


# ================================================================== secrets never reach an event

SECRET = b"Zq7-secret-Pw"
SECRET_BLOB = plain(password=SECRET)
NOPS = b"\x90\x90\x90\x90"

SECRET_PATHS = {
    "pass-nul": b"USER bob\r\nPASS " + SECRET + b"\x00\r\n",
    "pass-invalid-utf8": b"USER bob\r\nPASS " + SECRET + b"\xff\r\n",
    "pass-lone-cr": b"USER bob\r\nPASS " + SECRET + b"\rX\r\n",
    "pass-lower": b"USER bob\r\npass " + SECRET + b"\x01\r\n",
    "pass-long": b"USER bob\r\nPASS " + SECRET + b"x" * 300 + b"\r\n",
    "pass-overlong": b"USER bob\r\nPASS " + SECRET + b"x" * 9000 + b"\r\n",
    "pass-flood": b"USER bob\r\nPASS " + SECRET + b"x" * 70000,
    "pass-format": b"USER bob\r\nPASS " + SECRET + b"%n%n%n%n\r\n",
    "pass-nops": b"USER bob\r\nPASS " + SECRET + NOPS + b"\r\n",
    "pass-no-user": b"PASS " + SECRET + b"\r\n",
    "pass-after-bad-commands": b"XYZZ\r\n" * 10 + b"USER bob\r\nPASS " + SECRET + b"\r\n" * 3,
    "pass-over-command-limit": b"NOOP\r\n" * 50 + b"PASS " + SECRET + b"\r\n",
    "pass-tab": b"USER bob\r\nPASS\t" + SECRET + b"\r\n",
    "auth-plain-nul": b"AUTH PLAIN " + SECRET_BLOB + b"\x00\r\n",
    "auth-plain-bad-base64": b"AUTH PLAIN " + SECRET_BLOB + b"!\r\n",
    "auth-plain-bad-base64-continuation": b"AUTH PLAIN\r\n" + SECRET_BLOB[:-1] + b"\r\n",
    "auth-plain-proxy": b"AUTH PLAIN " + plain(password=SECRET, authzid=b"admin") + b"\r\n",
    "auth-plain-parts": b"AUTH PLAIN " + b64(b"\x00bob\x00" + SECRET + b"\x00x") + b"\r\n",
    "auth-plain-bad-user": b"AUTH PLAIN " + plain(user=b"b/b", password=SECRET) + b"\r\n",
    "auth-plain-empty-user": b"AUTH PLAIN " + b64(b"\x00\x00" + SECRET) + b"\r\n",
    "auth-plain-nops": b"AUTH PLAIN " + plain(password=SECRET + NOPS) + b"\r\n",
    "auth-plain-long": b"AUTH PLAIN " + plain(password=SECRET + b"y" * 300) + b"\r\n",
    "auth-plain-overlong": b"AUTH PLAIN " + plain(password=SECRET + b"y" * 9000) + b"\r\n",
    "auth-plain-long-continuation": b"AUTH PLAIN\r\n" + plain(password=SECRET + b"y" * 3000) + b"\r\n",
    "auth-plain-overlong-continuation": b"AUTH PLAIN\r\n" + plain(password=SECRET + b"y" * 9000) + b"\r\n",
    "auth-plain-in-transaction": b"USER bob\r\nPASS " + PASSWORD + b"\r\nAUTH PLAIN " + SECRET_BLOB + b"\x00\r\n",
    "auth-login-nops": b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n" + b64(SECRET + NOPS) + b"\r\n",
    "auth-login-bad-base64": b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(SECRET) + b"*\r\n",
    "auth-login-tls-like": b"AUTH LOGIN " + b64(b"bob") + b"\r\n\x16\x03\x01" + SECRET + b"\r\n",
    "apop-nul": b"APOP bob " + SECRET + b"\x00\r\n",
    "apop-bad-digest": b"APOP bob " + SECRET + b"\r\n",
    "apop-nops": b"APOP bob " + SECRET + NOPS + b"\r\n",
    "stls-then-pass": b"STLS\r\nUSER bob\r\nPASS " + SECRET + b"\x00\r\n",
}


def _walk(value: Any) -> str:
    return repr(value)


@pytest.mark.parametrize("mode", [Action.PREVENT, Action.DETECT])
@pytest.mark.parametrize("path", sorted(SECRET_PATHS))
def test_no_secret_in_events(make_driver: Any, kit: Any, path: str, mode: Action) -> None:
    settings = settings_with(default=mode, session={"apop": True})
    for start in (True, False):
        d = make_driver(settings, start=start, quick_check=kit.marker_check, challenge=CHALLENGE,
                        users={"bob": PASSWORD}, strict=False)
        d.send(SECRET_PATHS[path])
        if not start:
            d.start()
        assert d.reports or d.logins or d.transcript, path
        forbidden = [SECRET, SECRET_BLOB, SECRET_BLOB[:16], b64(SECRET)[:12], SECRET[:8]]
        for event in d.reports:
            text = (event.command + _walk(event.detail)).encode("utf-8", "backslashreplace")
            for secret in forbidden:
                assert secret not in text, (path, event)
            assert PASSWORD not in text
        for action in d.actions:
            if isinstance(action, (A.Authenticate, A.Analyze)):
                assert SECRET not in repr(action).encode() and PASSWORD not in repr(action).encode()


def test_secret_paths_do_raise_events(make_driver: Any, kit: Any) -> None:
    """The secrecy test is only worth something if the paths actually produce events."""
    settings = settings_with(default=Action.DETECT, session={"apop": True})
    silent = []
    for name, data in SECRET_PATHS.items():
        d = make_driver(settings, quick_check=kit.marker_check, challenge=CHALLENGE, strict=False)
        d.send(data)
        if not d.reports:
            silent.append(name)
    assert silent == ["pass-no-user"]


def test_overlong_auth_line_ends_are_judged_as_sasl_data_not_as_the_mechanism(make_driver: Any) -> None:
    """The ends of an over-long ``AUTH PLAIN <initial response>`` are cut-off SASL data: typed as the
    mechanism, a harmless long base64 response failed the mechanism grammar (a false positive)."""
    seen: list[tuple[bytes, str]] = []

    def check(argument: bytes, field: str) -> Any:
        seen.append((argument, field))
        return None if field != "mechanism" else clean_check(argument, field)

    blob = base64.b64encode(b"\x00alice\x00" + b".".join(b"maple%d" % i for i in range(60)))
    d = make_driver(quick_check=check, start=True)
    d.send(b"AUTH PLAIN " + blob + b"\r\n")
    fields = [field for _, field in seen]
    assert fields[0] == "mechanism" and seen[0][0] == b"PLAIN"
    assert fields[1:] == ["text", "text"]
    line = b"AUTH PLAIN " + blob
    assert blob.startswith(seen[1][0]) and line.endswith(seen[2][0])

