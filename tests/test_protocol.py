"""The Twisted layer with StringTransport and a Clock: reading pauses, timeouts, limits, no loss.

The thread pool is replaced by running the blocking call at once (``inline_offload``), so
each test is deterministic; the Maildir, the realm, the portal and the event log are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pop3shield.backends.maildir import MaildirBackend
from pop3shield.core.settings import Action, ProtectionSettings, ProtectionsConfig, SessionSettings
from pop3shield.events import EventLog
from pop3shield.maildir import Maildir
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm
from pop3shield.streaming import CHUNK


class Clean:
    malicious = False
    reasons = ()


def inline_offload(function, *args):
    """The thread pool's work, run at once so the test controls every step."""
    return defer.maybeDeferred(function, *args)


class SyncFactory(POP3ServerFactory):
    """Runs 'thread pool' work inline so the test controls every step."""

    def __init__(self, settings, portal, events, **kw):
        super().__init__(settings, MaildirBackend(portal, inline_offload), events, **kw)


class NoAnalysis:
    def analyze(self, arguments, source=None):
        return defer.succeed([Clean() for _ in arguments])


@pytest.fixture
def mailroot(tmp_path: Path) -> Path:
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    store = Maildir(tmp_path / "mail" / "alice" / "Maildir", create=True)
    store.deliver(b"Subject: one\n\nfirst\n")
    store.deliver(b"Subject: two\n\n.dot line\n.\nend\n")
    return tmp_path


def make_factory(root: Path, clock: Clock, protections: ProtectionsConfig | None = None, **kw) -> SyncFactory:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret-pw")
    portal = Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")), [checker])
    settings = SessionSettings(hostname="test.invalid", protections=protections or ProtectionsConfig())
    events = EventLog(str(root / "events.jsonl"), clock=clock.seconds)
    return SyncFactory(settings, portal, events, reactor=clock, analyzer=NoAnalysis(),
                       quick_check=lambda arg, field: Clean(), **kw)


def connect(factory: SyncFactory, host: str = "192.0.2.7", port: int = 40000):
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    return proto, transport


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def login(proto, transport) -> None:
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(transport).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")


def test_greeting_and_full_session(mailroot: Path) -> None:
    clock = Clock()
    proto, transport = connect(make_factory(mailroot, clock))
    assert take(transport) == b"+OK test.invalid POP3 ready.\r\n"
    login(proto, transport)
    proto.dataReceived(b"RETR 2\r\n")
    assert take(transport) == b"+OK 35 octets\r\nSubject: two\r\n\r\n..dot line\r\n..\r\nend\r\n.\r\n"
    proto.dataReceived(b"TOP 1 0\r\n")
    assert take(transport) == b"+OK\r\nSubject: one\r\n\r\n.\r\n"
    proto.dataReceived(b"QUIT\r\n")
    assert take(transport) == b"+OK Logging out.\r\n"
    assert transport.disconnecting


def test_dele_then_drop_deletes_nothing_and_quit_deletes_exactly(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    store = Maildir(mailroot / "mail" / "alice" / "Maildir")
    before = [m.key for m in store.scan()]
    proto, transport = connect(factory)
    login(proto, transport)
    proto.dataReceived(b"DELE 1\r\nDELE 2\r\n")
    proto.connectionLost(None)
    assert [m.key for m in store.scan()] == before

    proto, transport = connect(factory)
    take(transport)
    login(proto, transport)
    proto.dataReceived(b"DELE 1\r\nQUIT\r\n")
    assert take(transport) == b"+OK Marked to be deleted.\r\n+OK Logging out.\r\n"
    assert [m.key for m in store.scan()] == before[1:]


def test_second_login_gets_in_use_until_first_ends(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    first, t1 = connect(factory)
    login(first, t1)
    second, t2 = connect(factory, port=40001)
    take(t2)
    second.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(t2) == b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another session.\r\n"
    first.dataReceived(b"QUIT\r\n")
    second.dataReceived(b"PASS secret-pw\r\n")
    second.dataReceived(b"USER alice\r\nPASS secret-pw\r\n")
    assert take(t2).endswith(b"+OK Logged in, 2 messages (58 octets).\r\n")


def test_failed_login_is_delayed_and_delay_grows(mailroot: Path) -> None:
    clock = Clock()
    proto, transport = connect(make_factory(mailroot, clock, auth_failure_delay=2.0, auth_failure_delay_max=15.0))
    take(transport)
    proto.dataReceived(b"USER alice\r\nPASS wrong\r\nNOOP\r\n")
    assert take(transport) == b"+OK\r\n"
    assert transport.producerState == "paused"
    clock.advance(1.9)
    assert take(transport) == b""
    clock.advance(0.2)
    assert take(transport) == b"-ERR [AUTH] Authentication failed.\r\n-ERR Unknown command.\r\n"
    proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
    clock.advance(3.9)
    assert take(transport) == b"+OK\r\n"
    clock.advance(0.2)
    assert take(transport) == b"-ERR [AUTH] Authentication failed.\r\n"


def test_login_timeout_and_idle_timeout(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, login_timeout=30.0, idle_timeout=600.0)
    proto, transport = connect(factory)
    take(transport)
    clock.advance(29)
    proto.dataReceived(b"NOOP\r\n")  # activity resets the timer
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert take(transport).endswith(b"-ERR Disconnected for inactivity.\r\n")
    assert transport.disconnecting

    proto, transport = connect(factory, port=40002)
    login(proto, transport)
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(2)
    assert take(transport) == b"-ERR Disconnected for inactivity.\r\n"
    assert transport.disconnecting


def test_connection_limit_per_address(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, max_connections_per_ip=2)
    a, _ = connect(factory)
    b, _ = connect(factory, port=40001)
    c, tc = connect(factory, port=40002)
    assert tc.value() == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
    assert tc.disconnecting
    other, to = connect(factory, host="192.0.2.8")
    assert to.value().startswith(b"+OK")
    a.connectionLost(None)
    c.connectionLost(None)
    d, td = connect(factory, port=40003)
    assert td.value().startswith(b"+OK")


def test_reading_pauses_while_streaming_and_pipelined_commands_follow(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    store = Maildir(mailroot / "mail" / "alice" / "Maildir")
    store.deliver(b"Subject: big\n\n" + b"x" * (3 * CHUNK) + b"\n")
    proto, transport = connect(factory)
    take(transport)
    proto.dataReceived(b"USER alice\r\nPASS secret-pw\r\nRETR 3\r\nNOOP\r\nSTAT\r\n")
    out = take(transport)
    assert out.count(b"+OK") == 5
    assert out.endswith(b"\r\n.\r\n+OK\r\n+OK 3 " + str(58 + 16 + 3 * CHUNK + 2).encode() + b"\r\n")
    assert transport.producerState == "producing"


def test_prevent_event_written_with_session_and_addresses(mailroot: Path) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    factory = make_factory(mailroot, clock)
    proto, transport = connect(factory)
    take(transport)
    proto.dataReceived(b"USER \r\n")
    assert take(transport) == b"-ERR [AUTH] No username given.\r\n"
    assert transport.disconnecting
    factory.events.close()
    record = json.loads((mailroot / "events.jsonl").read_text())
    assert record["protection"] == "empty_username"
    assert record["attack_name"] == "POP3 Policy Violation"
    assert record["attack_info"] == "No username supplied in USER command"
    assert record["action"] == "prevent"
    assert record["client"] == {"address": "192.0.2.7", "port": 40000}
    assert record["server"] == {"address": "127.0.0.1", "port": 110}
    assert record["session"] == proto.session_id
    assert record["time"] == "2027-01-15T08:00:00.000Z"


def test_detect_mode_repeats_go_to_the_closing_record(mailroot: Path) -> None:
    clock = Clock()
    protections = ProtectionsConfig(empty_password=ProtectionSettings(Action.DETECT))
    factory = make_factory(mailroot, clock, protections)
    proto, transport = connect(factory)
    take(transport)
    proto.dataReceived(b"USER alice\r\nPASS\r\nPASS \r\nPASS  \r\n")
    assert take(transport) == b"+OK\r\n" + b"-ERR No password given.\r\n" * 3
    assert not transport.disconnecting
    proto.connectionLost(None)
    factory.events.close()
    lines = [json.loads(line) for line in (mailroot / "events.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines] == ["security", "summary"]
    assert lines[0]["action"] == "detect" and lines[0]["user"] == "alice"
    assert lines[1]["repeats"] == {"empty_password": 2}


def test_data_before_a_delayed_greeting_is_refused(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, greeting_delay=2.0)
    proto, transport = connect(factory)
    assert transport.value() == b""
    proto.dataReceived(b"USER alice\r\n")
    clock.advance(2.0)
    assert take(transport) == b"-ERR Protocol violation.\r\n"
    assert transport.disconnecting
    factory.events.close()
    record = json.loads((mailroot / "events.jsonl").read_text())
    assert (record["protection"], record["detail"]) == ("non_compliant", {"reason": "data sent before the greeting"})

    patient, t2 = connect(make_factory(mailroot, clock, greeting_delay=2.0), port=40009)
    clock.advance(2.0)
    assert take(t2) == b"+OK test.invalid POP3 ready.\r\n"
    login(patient, t2)


def test_detect_mode_lets_an_early_talker_through(mailroot: Path) -> None:
    clock = Clock()
    protections = ProtectionsConfig(non_compliant=ProtectionSettings(Action.DETECT))
    proto, transport = connect(make_factory(mailroot, clock, protections, greeting_delay=1.0))
    proto.dataReceived(b"CAPA\r\n")
    clock.advance(1.0)
    out = take(transport)
    assert out.startswith(b"+OK test.invalid POP3 ready.\r\n+OK Capability list follows\r\n")


def test_apop_login_when_enabled(mailroot: Path) -> None:
    import hashlib
    import re

    clock = Clock()
    factory = make_factory(mailroot, clock)
    factory.settings = SessionSettings(hostname="test.invalid", apop=True)
    proto, transport = connect(factory)
    greeting = take(transport)
    challenge = re.fullmatch(rb"\+OK test\.invalid POP3 ready\. (<[0-9a-f]{16}\.\d+@test\.invalid>)\r\n",
                             greeting).group(1)
    digest = hashlib.md5(challenge + b"secret-pw").hexdigest().encode()
    proto.dataReceived(b"APOP alice " + digest + b"\r\n")
    assert take(transport) == b"+OK Logged in, 2 messages (58 octets).\r\n"


def test_no_apop_challenge_unless_enabled(mailroot: Path) -> None:
    proto, transport = connect(make_factory(mailroot, Clock()))
    assert b"<" not in take(transport)
    proto.dataReceived(b"APOP alice 0123456789abcdef0123456789abcdef\r\n")
    assert take(transport) == b"-ERR APOP is not enabled.\r\n"


def _open_files(root: Path) -> int:
    """Descriptors of this process open on files under ``root`` (messages, locks)."""
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(root)) and ("/cur/" in target or "/new/" in target)
    return count


def test_prefetched_message_is_served_and_never_leaks_a_file(mailroot: Path) -> None:
    factory = make_factory(mailroot, Clock())
    before = _open_files(mailroot)
    proto, transport = connect(factory)
    login(proto, transport)
    proto.dataReceived(b"RETR 1\r\n")  # opens message 2 ahead
    assert take(transport) == b"+OK 23 octets\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
    proto.dataReceived(b"RETR 2\r\n")
    assert take(transport) == b"+OK 35 octets\r\nSubject: two\r\n\r\n..dot line\r\n..\r\nend\r\n.\r\n"
    proto.dataReceived(b"TOP 1 0\r\n")  # prefetches 2 again, then the client leaves
    take(transport)
    proto.connectionLost(None)
    assert _open_files(mailroot) == before

    proto, transport = connect(factory, port=40010)
    login(proto, transport)
    proto.dataReceived(b"RETR 1\r\nDELE 2\r\nQUIT\r\n")
    assert take(transport).endswith(b"+OK Marked to be deleted.\r\n+OK Logging out.\r\n")
    assert _open_files(mailroot) == before


def test_an_idle_connection_stays_within_the_compact_attribute_form(mailroot: Path) -> None:
    """Issue 12, idle memory: CPython keeps up to 30 instance attributes in a shared-key form and
    gives each instance with more a full dict (about 1.6 KB); 50,000 idle connections feel that."""
    proto, _transport = connect(make_factory(mailroot, Clock()))
    assert len(vars(proto)) <= 30, sorted(vars(proto))
    assert len(vars(proto.session)) <= 30, sorted(vars(proto.session))
