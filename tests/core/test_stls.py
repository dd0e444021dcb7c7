"""STLS (RFC 2595 section 4) and Dovecot's disable_plaintext_auth, in the sans-I/O core.

The core emits :class:`~pop3shield.core.actions.StartTLS` and knows a TLS flag; the shell does
the handshake (tests/test_stls_e2e.py drives it over real TLS).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pop3shield.core import actions as A
from pop3shield.core.session import Session, State
from pop3shield.core.settings import Action, ProtectionsConfig, ProtectionSettings, SessionSettings

CAPA_HEAD = b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
CAPA_STLS = CAPA_HEAD + b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_TLS = CAPA_HEAD + b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"
CAPA_NO_LOGIN_STLS = CAPA_HEAD + b"STLS\r\n.\r\n"
BEGIN = b"+OK Begin TLS negotiation now.\r\n"
REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


def settings(stls: Action = Action.INACTIVE, *, available: bool = True, non_compliant: Action = Action.PREVENT,
             **extra: Any) -> SessionSettings:
    return SessionSettings(stls_available=available, protections=ProtectionsConfig(
        stls=ProtectionSettings(stls), non_compliant=ProtectionSettings(non_compliant)), **extra)


def driver(make_driver: Any, config: SessionSettings, *, address: str | None = "192.0.2.10", tls: bool = False,
           can_starttls: bool = True) -> Any:
    d = make_driver(config, address=address, start=False)
    d.session = Session(config, address, quick_check=d.quick_check, tls=tls, can_starttls=can_starttls)
    d.start()
    return d


@pytest.mark.parametrize("action", [Action.DETECT, Action.INACTIVE])
def test_stls_is_offered_before_tls_and_not_after(make_driver: Any, action: Action) -> None:
    d = driver(make_driver, settings(action))
    assert d.send(b"CAPA\r\n") == CAPA_STLS
    assert d.send(b"STLS\r\n") == BEGIN
    assert d.kinds()[-1] == "StartTLS" and d.session.busy and not d.session.tls
    assert d.call("tls_started") == b""
    assert d.session.tls and not d.session.busy
    assert d.send(b"CAPA\r\n") == CAPA_TLS
    assert d.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"
    events = [e.protection for e in d.reports]
    assert events == (["stls"] if action is Action.DETECT else [])  # detect: one event, repeats counted
    if action is Action.DETECT:
        assert d.session.engine.repeats["stls"] == 1
    assert d.session.state is State.AUTHORIZATION


def test_prevent_keeps_todays_refusal_and_capa(make_driver: Any) -> None:
    d = driver(make_driver, settings(Action.PREVENT))
    assert d.send(b"CAPA\r\n") == CAPA_TLS  # no STLS line
    assert d.send(b"STLS\r\nNOOP\r\n") == b"-ERR STLS is not available.\r\n-ERR Unknown command.\r\n"
    assert [e.protection for e in d.reports] == ["stls"]
    assert not any(isinstance(a, A.StartTLS) for a in d.actions)


@pytest.mark.parametrize("case", ["no certificate", "transport cannot", "implicit TLS"])
def test_stls_not_offered_without_the_means(make_driver: Any, case: str) -> None:
    config = settings(Action.INACTIVE, available=case != "no certificate")
    d = driver(make_driver, config, can_starttls=case != "transport cannot", tls=case == "implicit TLS")
    assert d.send(b"CAPA\r\n") == CAPA_TLS
    expected = b"-ERR TLS is already active.\r\n" if case == "implicit TLS" else b"-ERR STLS is not available.\r\n"
    assert d.send(b"STLS\r\n") == expected
    assert not any(isinstance(a, A.StartTLS) for a in d.actions)


def test_stls_after_login_and_with_an_argument(make_driver: Any) -> None:
    d = driver(make_driver, settings(Action.INACTIVE))
    assert d.login().endswith(b"+OK Logged in, 2 messages (30 octets).\r\n")
    assert b"STLS" not in d.send(b"CAPA\r\n")
    assert d.send(b"STLS\r\n") == b"-ERR STLS is only valid before login.\r\n"
    other = driver(make_driver, settings(Action.INACTIVE))
    assert other.send(b"STLS now\r\n") == b"-ERR Protocol violation.\r\n"  # wrong argument count
    assert other.closed and not any(isinstance(a, A.StartTLS) for a in other.actions)


def test_pipelined_input_after_stls_is_refused_when_non_compliant_prevents(make_driver: Any) -> None:
    """CVE-2011-0411: ``STLS\\r\\nCAPA\\r\\n`` in one read; the CAPA never runs, TLS never starts."""
    d = driver(make_driver, settings(Action.INACTIVE))
    assert d.send(b"STLS\r\nCAPA\r\n") == b"-ERR Protocol violation.\r\n"
    assert d.closed and not any(isinstance(a, A.StartTLS) for a in d.actions)
    (event,) = d.reports
    assert event.protection == "non_compliant" and event.detail["reason"] == "input pipelined after STLS"
    assert event.command == "STLS"


@pytest.mark.parametrize("tail", [b"CAPA\r\n", b"USER bob\r\nPASS x\r\n", b"CAP", b"X" * 300 + b"\r\n"])
def test_pipelined_input_after_stls_is_discarded_otherwise(make_driver: Any, tail: bytes) -> None:
    d = driver(make_driver, settings(Action.INACTIVE, non_compliant=Action.DETECT))
    assert d.send(b"STLS\r\n" + tail) == BEGIN
    assert d.session.buffered == 0 and d.kinds()[-1] == "StartTLS"
    assert d.call("tls_started") == b""  # nothing of the plaintext runs inside TLS either
    assert d.session.user is None
    assert d.send(b"NOOP\r\n") == b"-ERR Unknown command.\r\n"  # the first line that came through TLS
    assert [e.detail.get("reason") for e in d.reports if e.protection == "non_compliant"] == [
        "input pipelined after STLS"]


def test_user_given_before_tls_is_forgotten(make_driver: Any) -> None:
    d = driver(make_driver, settings(Action.INACTIVE))
    assert d.send(b"USER bob\r\n") == b"+OK\r\n"
    d.send(b"STLS\r\n")
    d.call("tls_started")
    assert d.send(b"PASS " + d.users["bob"] + b"\r\n") == b"-ERR No username given.\r\n"


def test_protections_still_apply_inside_tls(make_driver: Any) -> None:
    d = driver(make_driver, settings(Action.INACTIVE))
    d.send(b"STLS\r\n")
    d.call("tls_started")
    assert d.send(b"USER \r\n") == b"-ERR [AUTH] No username given.\r\n"
    assert d.closed and [e.protection for e in d.reports] == ["empty_username"]


@pytest.mark.parametrize("line", [b"USER bob", b"PASS secret", b"AUTH PLAIN", b"AUTH", b"APOP bob " + b"0" * 32])
def test_disable_plaintext_auth_refuses_logins_before_tls(make_driver: Any, line: bytes) -> None:
    config = settings(Action.INACTIVE, disable_plaintext_auth=True, apop=True)
    d = make_driver(config, address="192.0.2.10", start=False)
    d.session = Session(config, "192.0.2.10", quick_check=d.quick_check, challenge=b"<1.2@test>")
    d.start()
    assert d.send(b"CAPA\r\n") == CAPA_NO_LOGIN_STLS
    assert d.send(line + b"\r\n") == REFUSED
    assert not d.logins and not d.closed
    d.send(b"STLS\r\n")
    d.call("tls_started")
    assert d.send(b"CAPA\r\n") == CAPA_TLS
    assert d.login().endswith(b"+OK Logged in, 2 messages (30 octets).\r\n")


@pytest.mark.parametrize("address,loopback,refused", [
    ("127.0.0.1", True, False), ("::1", True, False), ("::ffff:127.0.0.2", True, False), (None, True, False),
    ("127.0.0.1", False, True), (None, False, True), ("192.0.2.10", True, True)])
def test_loopback_is_exempt_unless_configured_otherwise(make_driver: Any, address: str | None, loopback: bool,
                                                        refused: bool) -> None:
    config = settings(Action.INACTIVE, disable_plaintext_auth=True, plaintext_auth_loopback=loopback)
    d = driver(make_driver, config, address=address)
    assert d.send(b"USER bob\r\n") == (REFUSED if refused else b"+OK\r\n")
    assert (b"USER\r\n" in d.send(b"CAPA\r\n")) is not refused


def test_implicit_tls_counts_as_tls(make_driver: Any) -> None:
    config = settings(Action.INACTIVE, disable_plaintext_auth=True)
    d = driver(make_driver, config, tls=True)
    assert d.send(b"CAPA\r\n") == CAPA_TLS
    assert d.login().endswith(b"+OK Logged in, 2 messages (30 octets).\r\n")


def test_shutting_down_closes_without_update(make_driver: Any) -> None:
    d = driver(make_driver, settings())
    d.login()
    d.send(b"DELE 1\r\n")
    assert d.call("shutting_down") == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    assert d.closed and not d.commits and d.closes[-1].reason == "shutdown"
    assert d.call("shutting_down") == b""


def test_tls_started_without_stls_is_misuse(make_driver: Any) -> None:
    from pop3shield.core.errors import SessionMisuse

    d = driver(make_driver, settings())
    with pytest.raises(SessionMisuse):
        d.session.tls_started()



@hsettings(max_examples=300, deadline=None)
@given(tail=st.binary(min_size=1, max_size=600), non_compliant=st.sampled_from([Action.PREVENT, Action.DETECT]))
def test_nothing_pipelined_after_stls_ever_runs(kit: Any, tail: bytes, non_compliant: Action) -> None:
    """Any bytes after the STLS line, in the same read: one answer (+OK or the refusal), no other."""
    config = settings(Action.INACTIVE, non_compliant=non_compliant)
    d = kit.Driver(settings=config)
    d.session = Session(config, "192.0.2.10", quick_check=d.quick_check)
    d.start()
    out = d.send(b"STLS\r\n" + tail)
    if non_compliant is Action.PREVENT:
        assert out == b"-ERR Protocol violation.\r\n" and d.closed
        assert not any(isinstance(a, (A.StartTLS, A.Authenticate)) for a in d.actions)
    else:
        assert out == BEGIN and d.session.buffered == 0
        assert d.call("tls_started") == b""
        assert not d.logins
