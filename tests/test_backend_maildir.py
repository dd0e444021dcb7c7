"""The Maildir backend against the backend contract, and the protocol against any backend.

The Maildir backend runs with the real passwd-file checker, the real realm and a real Maildir on
disk (its thread-pool hops run inline). The protocol tests give ``POP3ServerFactory`` a second,
in-memory implementation of :class:`IBackend`: what the client is told for each backend error
must not depend on the backend being a Maildir.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

import pop3shield.protocol
from pop3shield.backends import (
    ClientInfo,
    Credentials,
    IBackend,
    IMailbox,
    ListedMessage,
    LoginRefused,
    MailboxInUse,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.backends.maildir import MaildirBackend, MaildirMailbox
from pop3shield.checker import PasswdFileChecker
from pop3shield.config import ConfigError, load_config
from pop3shield.core.settings import SessionSettings
from pop3shield.events import EventLog
from pop3shield.maildir import Maildir
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm
from pop3shield.service import BACKEND_BUILDERS, build_backend

CLIENT = ClientInfo("s1", "127.0.0.1", 40000, "127.0.0.1", 110)


def inline(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


class _InlinePool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: ANN001
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001
            on_result(False, Failure())
        else:
            on_result(True, result)


class _InlineReactor:
    @staticmethod
    def callFromThread(f, *args, **kwargs):  # noqa: ANN001
        f(*args, **kwargs)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    box = Maildir(tmp_path / "mail" / "alice" / "Maildir", create=True)
    box.deliver(b"Subject: one\n\nfirst\n")
    box.deliver(b"Subject: two\n\n.dot line\n")
    Maildir(tmp_path / "mail" / "dis" / "Maildir", create=True)
    (tmp_path / "users.passwd").write_text(
        "alice:{PLAIN}pw-alice::::::\n"
        "dis:{PLAIN}pw-dis::::::nologin reason=Moved_away nodelay\n"
        "quiet:{PLAIN}pw-quiet::::::nologin\n"
        "ghost:{PLAIN}pw-ghost::::::\n", encoding="utf-8")
    return tmp_path


def backend(root: Path) -> MaildirBackend:
    checker = PasswdFileChecker(str(root / "users.passwd"), allow_plaintext=True, threadpool=_InlinePool(),
                                reactor=_InlineReactor())
    return MaildirBackend(Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")), [checker]), inline)


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def login(root: Path, user: str, password: str) -> MaildirMailbox:
    return result(backend(root).login(Credentials(user, password.encode(), "USER"), CLIENT))


class Consumer:
    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data


def test_login_opens_the_maildrop_with_its_listing(root: Path) -> None:
    b = backend(root)
    assert verifyObject(IBackend, b)
    mailbox = login(root, "alice", "pw-alice")
    assert verifyObject(IMailbox, mailbox)
    assert mailbox.user == "alice"
    assert [m.size for m in mailbox.listing] == [23, 27]
    assert [m.key for m in mailbox.listing] == [m.key for m in Maildir(root / "mail" / "alice" / "Maildir").scan()]
    mailbox.release()


def test_refusals_become_the_contract_errors(root: Path) -> None:
    with pytest.raises(LoginRefused) as wrong:
        login(root, "alice", "nope")
    assert (wrong.value.reason, wrong.value.nodelay) == (None, False)
    with pytest.raises(LoginRefused) as unknown:
        login(root, "nobody", "pw")
    assert (unknown.value.reason, unknown.value.nodelay) == (None, False)
    with pytest.raises(LoginRefused) as moved:
        login(root, "dis", "pw-dis")
    assert (moved.value.reason, moved.value.nodelay) == ("Moved_away", True)
    with pytest.raises(LoginRefused) as quiet:
        login(root, "quiet", "pw-quiet")
    assert (quiet.value.reason, quiet.value.nodelay) == (None, False)
    apop = Credentials("alice", b"0" * 32, "APOP", b"<1.2@test.invalid>")
    with pytest.raises(LoginRefused):
        result(backend(root).login(apop, CLIENT))


def test_apop_with_the_right_digest_logs_in(root: Path) -> None:
    import hashlib

    challenge = b"<1.2@test.invalid>"
    digest = hashlib.md5(challenge + b"pw-alice").hexdigest().encode()
    mailbox = result(backend(root).login(Credentials("alice", digest, "APOP", challenge), CLIENT))
    assert len(mailbox.listing) == 2
    mailbox.release()


def test_a_held_lock_is_mailbox_in_use_until_released(root: Path) -> None:
    first = login(root, "alice", "pw-alice")
    with pytest.raises(MailboxInUse):
        login(root, "alice", "pw-alice")
    first.release()
    first.release()  # idempotent
    login(root, "alice", "pw-alice").release()


def test_a_symlinked_maildir_is_unavailable(root: Path) -> None:
    (root / "mail" / "ghost").symlink_to(root / "mail" / "alice")
    with pytest.raises(Unavailable) as caught:
        login(root, "ghost", "pw-ghost")
    assert (caught.value.code, caught.value.text) == ("SYS/TEMP", "Temporary server problem, try again later.")


def test_send_message_writes_status_and_stuffed_body(root: Path) -> None:
    mailbox = login(root, "alice", "pw-alice")
    second = mailbox.listing[1]
    out = Consumer()
    sent = result(mailbox.send_message(second.key, None, b"+OK 27 octets\r\n", out))
    assert out.data == b"+OK 27 octets\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n"
    assert sent == len(out.data)
    top = Consumer()
    result(mailbox.send_message(second.key, 0, b"+OK\r\n", top, prefetch=mailbox.listing[0].key))
    assert top.data == b"+OK\r\nSubject: two\r\n\r\n.\r\n"
    first = Consumer()
    result(mailbox.send_message(mailbox.listing[0].key, None, b"+OK 23 octets\r\n", first))
    assert first.data == b"+OK 23 octets\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
    mailbox.release()


def test_a_message_that_changed_size_is_unavailable_before_its_first_byte(root: Path) -> None:
    mailbox = login(root, "alice", "pw-alice")
    entry = mailbox.listing[0]
    (root / "mail" / "alice" / "Maildir" / entry.key).write_bytes(b"Subject: one\n\nfirst, longer now\n")
    out = Consumer()
    with pytest.raises(MessageUnavailable):
        result(mailbox.send_message(entry.key, None, b"+OK 23 octets\r\n", out))
    assert out.data == b""
    (root / "mail" / "alice" / "Maildir" / mailbox.listing[1].key).unlink()
    with pytest.raises(MessageUnavailable):
        result(mailbox.send_message(mailbox.listing[1].key, None, b"+OK 27 octets\r\n", out))
    assert out.data == b""
    mailbox.release()


def test_commit_removes_exactly_the_keys_and_release_removes_nothing(root: Path) -> None:
    store = Maildir(root / "mail" / "alice" / "Maildir")
    keys = [m.key for m in store.scan()]
    mailbox = login(root, "alice", "pw-alice")
    mailbox.release()
    assert [m.key for m in store.scan()] == keys
    mailbox = login(root, "alice", "pw-alice")
    assert list(result(mailbox.commit([keys[0]]))) == []
    assert [m.key for m in store.scan()] == keys[1:]
    mailbox.release()  # after the commit: nothing more happens
    login(root, "alice", "pw-alice").release()  # and the lock is free


# --------------------------------------------------------------------------- any backend


@implementer(IMailbox)
class MemoryMailbox:
    def __init__(self, messages: dict[str, bytes]) -> None:
        self.user = "carol"
        self.messages = messages
        self.listing = [ListedMessage(key, f"uid-{key}", len(body)) for key, body in messages.items()]
        self.released = 0
        self.committed: list[Any] = []

    def send_message(self, key, lines, status, consumer, prefetch=None):  # noqa: ANN001
        if key == "gone":
            return defer.fail(MessageUnavailable("gone"))
        consumer.write(status + self.messages[key] + b".\r\n")
        return defer.succeed(len(status) + len(self.messages[key]) + 3)

    def commit(self, keys):  # noqa: ANN001
        self.committed = list(keys)
        return defer.succeed([])

    def release(self) -> None:
        self.released += 1


@implementer(IBackend)
class MemoryBackend:
    def __init__(self, outcome: Callable[[Credentials, ClientInfo], Any]) -> None:
        self.outcome = outcome
        self.seen: list[tuple[Credentials, ClientInfo]] = []

    def login(self, credentials: Credentials, client: ClientInfo) -> defer.Deferred[Any]:
        self.seen.append((credentials, client))
        return defer.maybeDeferred(self.outcome, credentials, client)


class Clean:
    malicious = False
    reasons = ()


class NoAnalysis:
    def analyze(self, arguments, source=None):  # noqa: ANN001
        return defer.succeed([Clean() for _ in arguments])


def serve(backend: MemoryBackend, clock: Clock, **kw: Any) -> tuple[Any, StringTransport]:
    factory = POP3ServerFactory(SessionSettings(hostname="test.invalid"), backend, EventLog(None, clock=clock.seconds),
                                reactor=clock, analyzer=NoAnalysis(), quick_check=lambda arg, field: Clean(),
                                **kw)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def raises(error: Exception) -> Callable[..., Any]:
    def outcome(credentials: Credentials, client: ClientInfo) -> Any:
        raise error
    return outcome


@pytest.mark.parametrize(("error", "answer"), [
    (MailboxInUse("held"), b"-ERR [IN-USE] Mailbox is locked by another session.\r\n"),
    (Unavailable("upstream down"), b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"),
    (Unavailable("wait", "LOGIN-DELAY", "Wait 5 minutes between logins."),
     b"-ERR [LOGIN-DELAY] Wait 5 minutes between logins.\r\n"),
    (RuntimeError("a bug"), b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"),
])
def test_backend_errors_reach_the_client_with_their_code(error: Exception, answer: bytes) -> None:
    clock = Clock()
    proto, transport = serve(MemoryBackend(raises(error)), clock, auth_failure_delay=2.0)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\n")
    assert transport.value() == b"+OK\r\n" + answer  # at once: only refused credentials wait


@pytest.mark.parametrize(("error", "delay", "answer"), [
    (LoginRefused(), 2.0, b"-ERR [AUTH] Authentication failed.\r\n"),
    (LoginRefused("no route", reason="Moved to pop.example.org"), 2.0, b"-ERR [AUTH] Moved to pop.example.org\r\n"),
    (LoginRefused("disabled", nodelay=True), 0.0, b"-ERR [AUTH] Authentication failed.\r\n"),
])
def test_refused_logins_wait_for_the_failure_delay(error: LoginRefused, delay: float, answer: bytes) -> None:
    clock = Clock()
    proto, transport = serve(MemoryBackend(raises(error)), clock, auth_failure_delay=2.0)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\n")
    clock.advance(0)
    if delay:
        assert transport.value() == b"+OK\r\n"
        clock.advance(delay - 0.01)
        assert transport.value() == b"+OK\r\n"
        clock.advance(0.01)
    assert transport.value() == b"+OK\r\n" + answer


def test_a_session_over_a_non_maildir_backend() -> None:
    clock = Clock()
    mailbox = MemoryMailbox({"a": b"Subject: a\r\n\r\nx\r\n", "gone": b"y\r\n"})
    backend = MemoryBackend(lambda credentials, client: mailbox)
    proto, transport = serve(backend, clock)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\nSTAT\r\nUIDL\r\nRETR 1\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n")
    assert transport.value() == (
        b"+OK\r\n+OK Logged in, 2 messages (20 octets).\r\n+OK 2 20\r\n"
        b"+OK 2 messages\r\n1 uid-a\r\n2 uid-gone\r\n.\r\n"
        b"+OK 17 octets\r\nSubject: a\r\n\r\nx\r\n.\r\n"
        b"-ERR [SYS/TEMP] Message is no longer available.\r\n"
        b"+OK Marked to be deleted.\r\n+OK Logging out.\r\n")
    credentials, client = backend.seen[0]
    assert (credentials.username, credentials.secret, credentials.mechanism) == ("carol", b"pw", "USER")
    assert "pw" not in repr(credentials)
    assert client == ClientInfo(proto.session_id, "192.0.2.7", 40000, "127.0.0.1", 110)
    assert mailbox.committed == ["a"]
    proto.connectionLost(None)
    assert mailbox.released == 0  # committed: nothing to release


def test_a_dropped_connection_releases_without_commit() -> None:
    clock = Clock()
    mailbox = MemoryMailbox({"a": b"x\r\n"})
    proto, transport = serve(MemoryBackend(lambda credentials, client: mailbox), clock)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\nDELE 1\r\n")
    proto.connectionLost(None)
    assert (mailbox.released, mailbox.committed) == (1, [])


def test_a_login_that_completes_after_the_client_left_is_released() -> None:
    clock = Clock()
    mailbox = MemoryMailbox({})
    pending: defer.Deferred[Any] = defer.Deferred()
    proto, transport = serve(MemoryBackend(lambda credentials, client: pending), clock)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\n")
    proto.connectionLost(None)
    pending.callback(mailbox)
    assert mailbox.released == 1


# --------------------------------------------------------------------------- wiring


def test_protocol_knows_no_maildir() -> None:
    tree = ast.parse(Path(pop3shield.protocol.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    for module in ("pop3shield.maildir", "pop3shield.realm", "pop3shield.streaming", "pop3shield.checker",
                   "pop3shield.credentials", "pop3shield.backends.maildir", "twisted.cred.portal"):
        assert module not in imported


def test_the_factory_screens_with_the_detector_unless_told_otherwise() -> None:
    from pop3shield.mcp import quick_check

    clock = Clock()
    events = EventLog(None, clock=clock.seconds)
    default = POP3ServerFactory(SessionSettings(), MemoryBackend(raises(LoginRefused())), events, reactor=clock,
                                analyzer=NoAnalysis())
    assert default.quick_check.__wrapped__ is quick_check  # counted for the metrics, then the detector's
    proto, transport = serve(MemoryBackend(raises(LoginRefused())), clock)
    assert proto.session._quick_check is proto.factory.quick_check


def test_build_backend_picks_the_configured_type(tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "users").write_text("alice:{PLAIN}pw::::::\n", encoding="utf-8")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[auth]\npasswd_file = "{tmp_path / "users"}"\nallow_plaintext = true\n'
                   f'[backend]\ntype = "maildir"\nmaildir = "{tmp_path / "mail" / "{user}" / "Maildir"}"\n',
                   encoding="utf-8")
    config = load_config(str(cfg))
    from twisted.internet import reactor

    built = build_backend(config, reactor)
    assert isinstance(built, MaildirBackend) and verifyObject(IBackend, built)
    assert set(BACKEND_BUILDERS) == {"maildir", "upstream"}
    import dataclasses

    odd = dataclasses.replace(config, backend=dataclasses.replace(config.backend, type="carrier-pigeon"))
    with pytest.raises(ConfigError, match=r"backend.type: unknown backend type 'carrier-pigeon' \(known: maildir, upstream\)"):
        build_backend(odd, reactor)


def test_a_backend_that_raises_instead_of_failing_its_deferred_still_gets_answers() -> None:
    clock = Clock()

    class Broken(MemoryMailbox):
        def commit(self, keys):  # noqa: ANN001
            raise OSError("disk gone")

        def send_message(self, key, lines, status, consumer, prefetch=None):  # noqa: ANN001
            raise RuntimeError("a bug")

    proto, transport = serve(MemoryBackend(lambda credentials, client: Broken({"a": b"x\r\n"})), clock)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n")
    assert transport.value().endswith(b"+OK Marked to be deleted.\r\n"
                                      b"-ERR [SYS/TEMP] 1 messages could not be deleted.\r\n")
    proto, transport = serve(MemoryBackend(lambda credentials, client: Broken({"a": b"x\r\n"})), clock)
    proto.dataReceived(b"USER carol\r\nPASS pw\r\nRETR 1\r\n")
    assert transport.value().endswith(b"+OK Logged in, 1 messages (3 octets).\r\n")
    assert transport.disconnecting or getattr(transport, "disconnected", False)  # cut, never half an answer


class _CountingPool(_InlinePool):
    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: ANN001
        self.calls += 1
        super().callInThreadWithCallback(on_result, f, *args, **kwargs)


def test_a_login_is_one_thread_hop_password_and_maildrop_together(root: Path) -> None:
    pool = _CountingPool()
    offloaded: list[Any] = []

    def counting(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        offloaded.append(function)
        return inline(function, *args)
    checker = PasswdFileChecker(str(root / "users.passwd"), allow_plaintext=True, threadpool=pool,
                                reactor=_InlineReactor())
    b = MaildirBackend(Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")), [checker]), counting)
    mailbox = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    assert (pool.calls, offloaded) == (1, [])  # verified, locked and listed in one call
    assert [m.size for m in mailbox.listing] == [23, 27]
    with pytest.raises(MailboxInUse):  # it holds the lock
        result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    mailbox.release()
    # a wrong password or a nologin entry opens nothing: the maildrop stays free
    for user, password in (("alice", b"nope"), ("dis", b"pw-dis")):
        with pytest.raises(LoginRefused):
            result(b.login(Credentials(user, password, "USER"), CLIENT))
    again = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    again.release()
    assert offloaded == []  # and the releases happened inline (nothing to delete)


def _counting_backend(root: Path) -> tuple[MaildirBackend, list[Any]]:
    offloaded: list[Any] = []

    def counting(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        offloaded.append(function)
        return inline(function, *args)
    checker = PasswdFileChecker(str(root / "users.passwd"), allow_plaintext=True, threadpool=_InlinePool(),
                                reactor=_InlineReactor())
    return MaildirBackend(Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")), [checker]), counting), \
        offloaded


def test_quit_without_deletions_releases_the_lock_without_a_thread_hop(root: Path) -> None:
    b, offloaded = _counting_backend(root)
    mailbox = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    assert result(mailbox.commit([])) == []
    assert offloaded == []  # descriptors closed and the flock dropped inline
    again = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))  # the lock is free
    again.release()  # a dropped connection: inline too
    assert offloaded == []
    third = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    assert result(third.commit([third.listing[0].key])) == []  # a deletion is disk work: in a thread
    assert [f.__name__ for f in offloaded] == ["commit"]
    assert len(Maildir(root / "mail" / "alice" / "Maildir").scan()) == 1


def test_while_a_thread_uses_the_maildir_the_release_goes_to_a_thread_too(root: Path) -> None:
    """If a prefetch is opening a file in the Maildir, the reactor does not wait for its lock."""
    import threading

    checker = PasswdFileChecker(str(root / "users.passwd"), allow_plaintext=True, threadpool=_InlinePool(),
                                reactor=_InlineReactor())
    queued: list[Any] = []

    def later(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        queued.append((function, args))  # a pool that has not run it yet
        return defer.Deferred()
    b = MaildirBackend(Portal(MaildirRealm(str(root / "mail" / "{user}" / "Maildir")), [checker]), later)
    mailbox = result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT))
    store = mailbox.maildrop._store
    held, done = threading.Event(), threading.Event()

    def busy() -> None:
        with store._mutex:
            held.set()
            done.wait(10)
    thread = threading.Thread(target=busy)
    thread.start()
    assert held.wait(5)
    try:
        started = time.monotonic()
        mailbox.commit([])
        assert time.monotonic() - started < 1.0  # did not wait for the other thread
        assert [f.__name__ for f, _ in queued] == ["commit"]
    finally:
        done.set()
        thread.join(5)
    function, args = queued[0]
    assert function(*args) == []  # the thread's turn: released now
    assert result(b.login(Credentials("alice", b"pw-alice", "USER"), CLIENT)).user == "alice"
