"""SIGTERM's drain step by step, with a Clock and StringTransport (the real server is in
tests/test_lifecycle.py): who gets told, who is aborted, when the shutdown may go on."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pop3shield.lifecycle import FLUSH_GRACE
from pop3shield.maildir import Maildir
from tests.test_protocol import connect, login, make_factory, mailroot, take  # noqa: F401  (mailroot: fixture)

SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down.\r\n"


def _lost(proto) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


def test_drain_waits_then_tells_and_closes_without_update(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    idle, idle_t = connect(factory)
    busy, busy_t = connect(factory, port=40001)
    login(busy, busy_t)
    busy.dataReceived(b"DELE 1\r\n")
    assert take(busy_t) == b"+OK Marked to be deleted.\r\n"
    take(idle_t)
    fired = []
    d = factory.connections.drain(10.0)
    d.addCallback(fired.append)
    clock.advance(9.9)
    assert not fired and take(idle_t) == b"" and take(busy_t) == b""  # the grace is not over
    clock.advance(0.2)
    assert take(idle_t) == SHUTTING_DOWN and take(busy_t) == SHUTTING_DOWN
    assert idle_t.disconnecting and busy_t.disconnecting and not busy_t.disconnected  # flushed first
    _lost(idle)
    assert not fired
    clock.advance(FLUSH_GRACE)  # busy's client does not read: aborted
    assert busy_t.disconnected
    _lost(busy)
    assert fired == [None]
    assert len(Maildir(mailroot / "mail" / "alice" / "Maildir").scan()) == 2  # nothing deleted


def test_drain_ends_as_soon_as_the_last_session_does(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    proto, transport = connect(factory)
    fired = []
    factory.connections.drain(10.0).addCallback(fired.append)
    proto.dataReceived(b"QUIT\r\n")
    assert take(transport).endswith(b"+OK Logging out.\r\n")
    _lost(proto)
    assert fired == [None] and not clock.getDelayedCalls()  # the grace timer is cancelled
    assert len(factory.connections) == 0


def test_drain_without_connections_and_expire_twice(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    fired = []
    factory.connections.drain(10.0).addCallback(fired.append)
    assert fired == [None]
    factory.connections.expire()  # a second SIGTERM after the end: nothing to do
    assert not clock.getDelayedCalls()


def test_a_second_sigterm_ends_the_grace_at_once(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    proto, transport = connect(factory)
    take(transport)
    factory.connections.drain(600.0)
    factory.connections.expire()
    assert take(transport) == SHUTTING_DOWN
    factory.connections.expire()
    assert take(transport) == b""  # told once
