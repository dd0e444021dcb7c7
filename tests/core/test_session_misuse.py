"""A result method called out of turn is a bug of the I/O layer: the core says so at once.

After the connection is lost, late results are normal (a login that was under way, a message
being streamed) and are ignored.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass

import pytest

from pop3shield.core import COMMANDS, Session, SessionMisuse, State, actions as A
from pop3shield.core._screening import Finding, Screened
from pop3shield.core.settings import SessionSettings


@dataclass(frozen=True)
class Entry:
    key: str
    uid: str
    size: int


@dataclass(frozen=True)
class Verdict:
    malicious: bool
    reasons: tuple[str, ...] = ()


def slow_check(arg: bytes, field: str):
    return None if b"SLOW" in arg else Verdict(False)


RESULTS = {
    "login_succeeded": lambda s: s.login_succeeded([]),
    "login_failed": lambda s: s.login_failed(),
    "analysis_finished": lambda s: s.analysis_finished([Verdict(False)]),
    "stream_finished": lambda s: s.stream_finished(),
    "stream_failed": lambda s: s.stream_failed(),
    "commit_finished": lambda s: s.commit_finished(),
    "listing_sent": lambda s: s.listing_sent(),
}
EXPECTED = {"login_succeeded": "Authenticate", "login_failed": "Authenticate", "analysis_finished": "Analyze",
            "stream_finished": "StreamMessage", "stream_failed": "StreamMessage", "commit_finished": "Commit",
            "listing_sent": "SendListing"}


def started() -> Session:
    session = Session(SessionSettings(hostname="t.invalid"), "192.0.2.1", quick_check=slow_check)
    assert session.start() == [A.Send(b"+OK t.invalid POP3 ready.\r\n")]
    return session


def logged_in() -> Session:
    session = started()
    actions = session.receive_data(b"USER bob\r\nPASS pw\r\n")
    assert any(isinstance(a, A.Authenticate) for a in actions)
    session.login_succeeded([Entry("k1", "u1", 10)])
    return session


@pytest.mark.parametrize("method", sorted(RESULTS))
def test_nothing_outstanding(method: str) -> None:
    session = logged_in() if method != "login_succeeded" else started()
    with pytest.raises(SessionMisuse) as caught:
        RESULTS[method](session)
    assert caught.value.method == method and caught.value.expected is None
    assert str(caught.value) == f"{method}() called out of turn: nothing is outstanding"


@pytest.mark.parametrize("method", sorted(RESULTS))
def test_the_wrong_result_for_what_is_outstanding(method: str) -> None:
    session = logged_in()
    outstanding = "Analyze" if EXPECTED[method] != "Analyze" else "StreamMessage"
    line = b"LIST SLOW\r\n" if outstanding == "Analyze" else b"RETR 1\r\n"
    session.receive_data(line)
    assert session.busy
    with pytest.raises(SessionMisuse) as caught:
        RESULTS[method](session)
    assert caught.value.expected == outstanding
    assert session.busy  # the outstanding action still waits for its own result


def test_each_result_is_accepted_once() -> None:
    session = logged_in()
    session.receive_data(b"RETR 1\r\n")
    assert session.stream_finished() == []
    with pytest.raises(SessionMisuse):
        session.stream_finished()
    session.receive_data(b"QUIT\r\n")
    assert session.state is State.UPDATE
    assert session.commit_finished() == [A.Send(b"+OK Logging out.\r\n"), A.Close("quit")]
    assert session.commit_finished() == []  # closed now: a late result is ignored


@pytest.mark.parametrize("method", sorted(RESULTS))
def test_late_results_after_the_connection_is_lost_are_ignored(method: str) -> None:
    session = started()
    session.receive_data(b"USER bob\r\nPASS pw\r\n")
    session.connection_lost()
    assert RESULTS[method](session) == []


def test_the_analysis_step_is_carried_in_one_frozen_record() -> None:
    session = logged_in()
    assert session.receive_data(b"LIST SLOW\r\n") == [A.Analyze((b"SLOW",))]
    pending = session._pending
    assert isinstance(pending, Screened) and pending.line.content == b"LIST SLOW" and pending.findings == ()
    with pytest.raises(FrozenInstanceError):
        pending.lead = 3  # type: ignore[misc]
    out = session.analysis_finished([Verdict(False)])
    # the command ran with the sample the record carried: its event names the line
    assert [type(a) for a in out] == [A.Report, A.Send, A.Close]
    assert out[0].event.command == "LIST SLOW" and out[0].event.detail == {"reason": "malformed message number"}
    assert session._pending is None
    assert Finding.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_the_command_table_is_data() -> None:
    assert {k for (state, k) in COMMANDS if state is State.AUTHORIZATION} == {
        "CAPA", "QUIT", "STLS", "USER", "PASS", "APOP", "AUTH"}
    assert {k for (state, k) in COMMANDS if state is State.TRANSACTION} == {
        "CAPA", "QUIT", "STLS", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP", "RSET"}
    assert not any(state in (State.SASL, State.UPDATE, State.CLOSED) for state, _ in COMMANDS)


def test_login_mechanism_is_not_the_sasl_exchange() -> None:
    session = Session(SessionSettings(hostname="t.invalid", sasl_mechanisms=("PLAIN", "LOGIN")), "192.0.2.1",
                      quick_check=slow_check)
    session.start()
    session.receive_data(b"AUTH LOGIN\r\n")
    assert session._sasl_exchange == "LOGIN" and session._login_mechanism is None
    session.receive_data(b"Ym9i\r\n")  # bob
    actions = session.receive_data(b"cHc=\r\n")  # pw
    assert [a.mechanism for a in actions if isinstance(a, A.Authenticate)] == ["LOGIN"]
    assert session._sasl_exchange is None and session._login_mechanism == "LOGIN"
    out = session.login_succeeded([])
    assert A.LoggedIn("bob", "LOGIN", 0, 0) in out
