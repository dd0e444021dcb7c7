"""The operational log of sessions: one info line per session, rate-limited per source and overall.

The real protocol on a StringTransport with a task.Clock (fake time), the real Maildir, realm and
event log; every info record of pop3shield.server is collected and compared as formatted text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pop3shield.backends.maildir import MaildirBackend
from pop3shield.core.settings import SessionSettings
from pop3shield.events import EventLog
from pop3shield.maildir import Maildir
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm


class Clean:
    malicious = False
    reasons = ()


class NoAnalysis:
    def analyze(self, arguments, source=None):
        return defer.succeed([Clean() for _ in arguments])


def inline_offload(function, *args):
    """The thread pool's work, run at once so the test controls every step."""
    return defer.maybeDeferred(function, *args)


class InlineFactory(POP3ServerFactory):
    """The server factory with a Maildir backend whose blocking calls run inline."""

    def __init__(self, settings, portal, events, **kw):
        super().__init__(settings, MaildirBackend(portal, inline_offload), events, **kw)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[tuple[InlineFactory, Clock]]:
    store = Maildir(tmp_path / "mail" / "alice" / "Maildir", create=True)
    store.deliver(b"Subject: one\n\nfirst\n")
    clock = Clock()
    clock.advance(1_800_000_000)
    portal = Portal(MaildirRealm(str(tmp_path / "mail" / "{user}" / "Maildir")),
                    [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret-pw")])
    events = EventLog(None, clock=clock.seconds)
    f = InlineFactory(SessionSettings(hostname="test.invalid"), portal, events, reactor=clock,
                      analyzer=NoAnalysis(), quick_check=lambda arg, field: Clean(), auth_failure_delay=0.0,
                      auth_failure_delay_max=0.0, log_rate_limit=2, log_global_rate_limit=3)
    yield f, clock
    events.close()


@pytest.fixture
def records() -> Iterator[list[dict]]:
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def info_lines(records: list[dict]) -> list[str]:
    return [formatEvent(e) for e in records
            if e.get("log_namespace") == "pop3shield.server" and e["log_level"] >= LogLevel.info]


def session(f: InlineFactory, clock: Clock, lines: bytes, *, host: str = "192.0.2.7", port: int = 40000,
            seconds: float = 0.0, reason: Failure | None = None) -> str:
    proto = f.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    clock.advance(seconds)
    if lines:
        proto.dataReceived(lines)
    proto.connectionLost(reason or Failure(ConnectionDone()))
    return proto.session_id


def test_one_info_line_per_session_with_how_it_ended(factory, records) -> None:
    f, clock = factory
    sent = b"USER alice\r\nPASS secret-pw\r\nSTAT\r\nDELE 1\r\nQUIT\r\n"
    first = session(f, clock, sent, seconds=1.25)
    second = session(f, clock, b"USER alice\r\nPASS wrong\r\n", port=40001, reason=Failure(ConnectionLost()))
    assert info_lines(records) == [
        f"session {first} closed (quit) client=192.0.2.7:40000 user=alice duration=1.250s commands=5 "
        f"octets_in={len(sent)} logins_failed=0 deleted=1",
        f"session {second} closed (connection lost) client=192.0.2.7:40001 user=- duration=0.000s commands=2 "
        f"octets_in=24 logins_failed=1 deleted=-",
    ]
    # connect, closing, login and update lines still exist, at debug level
    debug = [formatEvent(e) for e in records if e["log_level"] is LogLevel.debug]
    assert f"session {first} connect from 192.0.2.7:40000" in debug
    assert f"session {first} closing: quit" in debug
    assert f"session {first} login user=alice mechanism=USER messages=1 octets=23" in debug


def test_session_lines_are_rate_limited_per_source_with_summaries(factory, records) -> None:
    f, clock = factory
    ids = [session(f, clock, b"QUIT\r\n", port=41000 + n) for n in range(5)]
    clock.advance(61)
    last = session(f, clock, b"QUIT\r\n", port=41005)
    line = "session {} closed (quit) client=192.0.2.7:{} user=- duration=0.000s commands=1 octets_in=6 " \
           "logins_failed=0 deleted=-"
    assert info_lines(records) == [
        line.format(ids[0], 41000),
        line.format(ids[1], 41001),
        "session lines of 192.0.2.7 rate-limited at 2 a minute",
        "session lines of 192.0.2.7 rate limit ended: 3 suppressed",
        line.format(last, 41005),
    ]
    # the suppressed lines are still there for a debug log
    debug = [formatEvent(e) for e in records if e["log_level"] is LogLevel.debug]
    assert [line.format(ids[n], 41000 + n) for n in (2, 3, 4)] == [d for d in debug if " closed (" in d]


def test_session_lines_have_a_global_cap_over_many_sources(factory, records) -> None:
    f, clock = factory
    ids = [session(f, clock, b"QUIT\r\n", host=f"198.51.100.{n}") for n in range(6)]
    clock.advance(61)
    session(f, clock, b"QUIT\r\n", host="203.0.113.1")
    lines = info_lines(records)
    assert [line.split(" closed")[0] for line in lines[:3]] == [f"session {i}" for i in ids[:3]]
    assert lines[3:5] == ["session lines overall rate-limited at 3 a minute",
                          "session lines overall rate limit ended: 3 suppressed"]
    assert lines[5].endswith("client=203.0.113.1:40000 user=- duration=0.000s commands=1 octets_in=6 "
                             "logins_failed=0 deleted=-")
    assert len(lines) == 6


def test_a_timeout_is_how_the_session_ended(factory, records) -> None:
    f, clock = factory
    proto = f.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    clock.advance(f.login_timeout + 1)
    proto.connectionLost(Failure(ConnectionDone()))
    [line] = info_lines(records)
    assert f"session {proto.session_id} closed (timeout in authorization) client=192.0.2.7:40000 user=- " \
           f"duration=61.000s commands=0 octets_in=0 logins_failed=0 deleted=-" == line
