"""The state shared across processes, in-process implementation, and how the protocol uses it.

Failures count per address, per user and per (address, user); a valid login forgives its own
pair only, so one valid account no longer resets the penalty for guessing others (issue 10,
measured: a 15 s penalty fell back to 2 s). Connections per address and per (user, address).
The Redis implementation runs the same checks against a real Redis in test_state_redis.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from pop3shield.config import ConfigError, parse_config
from pop3shield.limits import FailureDelays
from pop3shield.state import LocalState, LoginHistory
from tests.test_protocol import connect, mailroot, make_factory, take  # noqa: F401 (fixture)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "an in-process state answers at once"
    return out[0]


def test_levels_are_the_largest_of_address_user_and_pair() -> None:
    state = LocalState(Clock().seconds)
    assert [result(state.failed("192.0.2.1", "bob")) for _ in range(3)] == [1, 2, 3]
    assert result(state.failed("192.0.2.1", "carol")) == 4  # the address has 4 failures
    assert result(state.failed("198.51.100.1", "bob")) == 4  # the user name has 4 failures
    assert result(state.penalty("198.51.100.2", "dave")) == 0
    assert result(state.penalty("198.51.100.2", "bob")) == 4
    assert result(state.failed("198.51.100.3", None)) == 1  # no user name yet: the address only


def test_valid_login_forgives_its_own_pair_only() -> None:
    state = LocalState(Clock().seconds)
    for _ in range(3):
        state.failed("192.0.2.1", "bob")
    for _ in range(2):
        state.failed("192.0.2.1", "alice")
    result(state.succeeded("192.0.2.1", "alice"))
    # alice's two failures are gone from the address; bob's three remain
    assert result(state.penalty("192.0.2.1", "alice")) == 3
    assert result(state.penalty("192.0.2.1", "bob")) == 3
    assert result(state.failed("192.0.2.1", "bob")) == 4
    result(state.succeeded("192.0.2.1", "bob"))
    assert result(state.penalty("192.0.2.1", "bob")) == 0


def test_failures_are_forgotten_after_a_quiet_period_and_bounded() -> None:
    clock = Clock()
    state = LocalState(clock.seconds, failure_ttl=900, max_entries=30)
    state.failed("192.0.2.1", "bob")
    clock.advance(899)
    assert result(state.failed("192.0.2.1", "bob")) == 2
    clock.advance(901)
    assert result(state.failed("192.0.2.1", "bob")) == 1
    for n in range(100):
        state.failed(f"203.0.113.{n}", f"u{n}")
    assert len(state._failures) == 30  # the least recently touched went first
    assert result(state.penalty("203.0.113.99", "u99")) == 1 and result(state.penalty("192.0.2.1", "bob")) == 0


def test_a_valid_login_marks_its_pair_known_bounded_and_forgotten() -> None:
    clock = Clock()
    state = LocalState(clock.seconds, known_ttl=100, max_entries=3)
    state.failed("192.0.2.1", "bob")
    assert result(state.counts("192.0.2.1", "bob")) == LoginHistory(1, 1, 1, known=False)
    result(state.succeeded("192.0.2.1", "bob"))
    assert result(state.counts("192.0.2.1", "bob")) == LoginHistory(0, 0, 0, known=True)
    assert not result(state.counts("192.0.2.2", "bob")).known  # the pair, not the user
    assert not result(state.counts("192.0.2.1", None)).known
    clock.advance(50)
    result(state.succeeded("192.0.2.2", "ann"))
    result(state.succeeded("192.0.2.3", "cy"))
    result(state.succeeded("192.0.2.4", "dan"))  # the least recently logged in pair goes
    assert not result(state.counts("192.0.2.1", "bob")).known
    assert result(state.counts("192.0.2.2", "ann")).known
    clock.advance(101)
    assert not result(state.counts("192.0.2.3", "cy")).known and len(state._known) == 2


def test_connection_sets_have_a_limit_and_release() -> None:
    state = LocalState(Clock().seconds)
    assert [result(state.acquire("addr:x", m, 2)) for m in ("a", "b", "c")] == [True, True, False]
    assert result(state.acquire("addr:x", "a", 2)) is True  # already a member
    result(state.release("addr:x", "a"))
    assert result(state.acquire("addr:x", "c", 2)) is True and state.count("addr:x") == 2
    result(state.release("addr:x", "b"))
    result(state.release("addr:x", "c"))
    result(state.release("addr:x", "nobody"))
    assert state.count("addr:x") == 0 and state._sets == {}


def test_failure_delay_doubles_to_the_cap() -> None:
    delays = FailureDelays(2.0, 15.0)
    assert [delays.delay(n) for n in range(0, 6)] == [0.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert delays.delay(10_000) == 15.0
    assert FailureDelays(0.0, 0.0).delay(5) == 0.0


# --------------------------------------------------------------------------- through the protocol


def answer_after(proto, transport, clock: Clock, lines: bytes) -> float:
    """Seconds of clock time until the -ERR for a failed PASS (steps of 0.5 s)."""
    proto.dataReceived(lines)
    waited = 0.0
    while b"-ERR" not in transport.value():
        clock.advance(0.5)
        waited += 0.5
        assert waited < 60
    take(transport)
    return waited


def test_one_valid_account_does_not_reset_the_penalty(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, auth_failure_delay=2.0, auth_failure_delay_max=15.0)
    proto, transport = connect(factory)
    take(transport)
    waits = [answer_after(proto, transport, clock, b"USER bob\r\nPASS guess\r\n") for _ in range(3)]
    assert waits == [2.0, 4.0, 8.0]
    # the attacker logs in with its own valid account from the same address ...
    other, transport2 = connect(factory, port=40001)
    take(transport2)
    other.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport2).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")
    # ... and its next guess at bob still meets the full penalty (it used to fall back to 2 s)
    assert answer_after(proto, transport, clock, b"USER bob\r\nPASS guess\r\n") == 15.0


def test_honest_user_who_mistyped_is_forgiven_by_logging_in(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, auth_failure_delay=2.0, auth_failure_delay_max=15.0)
    proto, transport = connect(factory)
    take(transport)
    assert answer_after(proto, transport, clock, b"USER alice\r\nPASS typo\r\n") == 2.0
    assert answer_after(proto, transport, clock, b"USER alice\r\nPASS typo\r\n") == 4.0
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")
    assert result(factory.state.penalty("192.0.2.7", "alice")) == 0


def test_sessions_per_user_and_address_are_limited(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, max_connections_per_user_ip=1)
    # another process holds alice's one session from this address
    assert result(factory.state.acquire("user:alice\x00192.0.2.7", "elsewhere", 1))
    proto, transport = connect(factory)
    take(transport)
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport) == b"+OK\r\n-ERR [IN-USE] Too many sessions for this user from your address.\r\n"
    assert proto.mailbox is None
    # from another address alice gets in, and the slot goes when the session ends
    proto2, transport2 = connect(factory, host="192.0.2.8")
    take(transport2)
    proto2.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport2).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")
    assert factory.state.count("user:alice\x00192.0.2.8") == 1
    proto2.connectionLost(None)
    assert factory.state.count("user:alice\x00192.0.2.8") == 0


def test_connections_per_address_are_released_when_they_end(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, max_connections_per_ip=2)
    first, t1 = connect(factory)
    second, t2 = connect(factory, port=40001)
    third, t3 = connect(factory, port=40002)
    assert take(t3) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
    third.connectionLost(None)
    assert factory.state.count("addr:192.0.2.7") == 2 and factory.limits.connections == 2
    first.connectionLost(None)
    fourth, t4 = connect(factory, port=40003)
    assert take(t4).startswith(b"+OK ")
    assert factory.limits.connections == 2


# --------------------------------------------------------------------------- configuration

AUTH = {"auth": {"realm": "pop3shield.realm:MaildirRealm"}}


def test_state_section_defaults_and_values() -> None:
    default = parse_config(AUTH, "p.toml", ".")
    assert default.state.redis is None and default.state.on_error == "fail-closed"
    assert default.server.max_connections_per_user_ip == 10
    config = parse_config({"state": {"redis": "redis://:pw@10.0.0.20:6379/0", "on_error": "fail-open",
                                     "timeout": 0.2, "max_queue": 10, "prefix": "site-a:", "connection_ttl": 30},
                           **AUTH}, "p.toml", ".")
    assert (config.state.on_error, config.state.timeout, config.state.max_queue, config.state.prefix,
            config.state.connection_ttl) == ("fail-open", 0.2, 10, "site-a:", 30.0)
    assert "pw@" not in repr(config)  # the URL may hold Redis' password


@pytest.mark.parametrize("state, message", [
    ({"redis": "http://x"}, "p.toml: state.redis: expected a redis://, rediss:// or unix:// URL"),
    ({"on_error": "ignore"}, "p.toml: state.on_error: must be one of 'fail-closed', 'fail-open', got 'ignore'"),
    ({"timeout": 0}, "p.toml: state.timeout: must be greater than 0, got 0"),
    ({"timeout": 11}, "p.toml: state.timeout: must be at most 10 seconds (it bounds a login), got 11"),
    ({"connection_ttl": 1}, "p.toml: state.connection_ttl: must be at least 3 seconds, got 1"),
    ({"max_queue": 0}, "p.toml: state.max_queue: "),
    ({"redis_url": "redis://x"}, "p.toml: state.redis_url: unknown key"),
])
def test_state_section_errors(state: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"state": state, **AUTH}, "p.toml", ".")
    assert str(info.value).startswith(message)


class SlowState(LocalState):
    """The in-process state answering later (as Redis does), at the test's command."""

    def __init__(self, clock):
        super().__init__(clock.seconds)
        self.held: list = []
        self.slow = False

    def _later(self, d):
        if not self.slow:
            return d
        from twisted.internet import defer

        later = defer.Deferred()
        d.addCallback(lambda value: self.held.append((later, value)))
        return later

    def acquire(self, key, member, limit):
        return self._later(super().acquire(key, member, limit))

    def penalty(self, address, user):
        return self._later(super().penalty(address, user))

    def counts(self, address, user):
        return self._later(super().counts(address, user))

    def answer(self):
        held, self.held = self.held, []
        for d, value in held:
            d.callback(value)


def test_input_waits_for_a_late_admission_and_a_gone_client_is_released(mailroot: Path) -> None:
    clock = Clock()
    state = SlowState(clock)
    factory = make_factory(mailroot, clock, state=state)
    state.slow = True
    proto, transport = connect(factory)
    assert transport.value() == b"" and transport.producerState == "paused"
    proto.dataReceived(b"CAPA\r\n")  # what was already read waits for the session
    state.answer()
    assert transport.producerState == "producing"
    greeting, capa = take(transport).split(b"\r\n", 1)
    assert greeting.startswith(b"+OK ") and capa.startswith(b"+OK")
    # a client that leaves before its admission is answered does not keep its place
    gone, transport2 = connect(factory, port=40001)
    gone.connectionLost(None)
    state.answer()
    assert state.count("addr:192.0.2.7") == 1 and factory.limits.connections == 1
    # nor does one that leaves while its login waits: no password is checked for it
    logins = []
    backend_login = factory.backend.login
    factory.backend.login = lambda *args: logins.append(args) or backend_login(*args)
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    take(transport)
    proto.connectionLost(None)
    state.answer()
    assert logins == [] and proto.mailbox is None
    assert state._sets == {} and factory.limits.connections == 0


def test_a_logged_in_session_counts_per_user_and_address_not_per_address(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, max_connections_per_ip=1)
    proto, transport = connect(factory)
    take(transport)
    blocked, t2 = connect(factory, port=40001)  # the one place of 192.0.2.7 is taken by a client logging in
    assert take(t2) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
    blocked.connectionLost(None)
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")
    assert state_counts(factory) == (0, 1)
    nat_user, t3 = connect(factory, port=40002)  # another user behind the same address
    assert take(t3).startswith(b"+OK ")
    proto.connectionLost(None)
    nat_user.connectionLost(None)
    assert state_counts(factory) == (0, 0) and factory.limits.connections == 0


def state_counts(factory) -> tuple[int, int]:
    return factory.state.count("addr:192.0.2.7"), factory.state.count("user:alice\x00192.0.2.7")
