"""Dovecot passwd-file extra fields (nologin, reason, allow_nets, nodelay) at the POP3 level.

Three layers, all with the real passwd parser and the real ``PasswdFileChecker``:

* the Twisted protocol over ``StringTransport`` and a ``Clock`` (exact bytes, exact delays), the
  checker's thread-pool hop run inline;
* a real pop3shield server (subprocess, 127.0.0.1) and Python's poplib;
* the same passwd file read by a real private Dovecot: both servers must accept and refuse the
  same logins (outcomes are compared, not texts).

Seen from Dovecot 2.3.19 with the same file: a nologin refusal of a right password is answered at
once with "Login disabled for this user" (or the reason).  pop3shield answers it like a wrong
password ("Authentication failed.", after the failure delay) unless the entry has a reason, or
nodelay: without a reason it does not confirm that the password was right.
"""

from __future__ import annotations

import poplib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pop3shield.backends.maildir import MaildirBackend
from pop3shield.checker import PasswdFileChecker
from pop3shield.core.settings import SessionSettings
from pop3shield.events import EventLog
from pop3shield.maildir import Maildir
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm
from tests.support.dovecot import DovecotServer
from tests.support.pop3shield_server import Pop3ShieldError, Pop3ShieldServer

#: user -> (password, extra fields, logs in with the right password from 127.0.0.1)
ACCOUNTS: dict[str, tuple[str, str, bool]] = {
    "plain": ("pw-plain", "", True),
    "dis1": ("pw-dis1", "nologin", False),
    "dis2": ("pw-dis2", "allow_nets=10.0.0.0/8", False),
    "lo": ("pw-lo", "allow_nets=127.0.0.0/8", True),
    "lo6": ("pw-lo6", "allow_nets=::1,192.0.2.0/24", False),
    "why": ("pw-why", "nologin reason=Moved_to_pop.example.org", False),
    "quick": ("pw-quick", "nologin nodelay", False),
    "both": ("pw-both", "nologin reason=Closed allow_nets=10.0.0.0/8", False),
    "boolean": ("pw-boolean", "nologin=no", False),  # a boolean field is true whenever present
    "settings": ("pw-settings", "userdb_quota_rule=*:storage=1G", True),
}


# --------------------------------------------------------------------------- protocol + Clock


class _InlinePool:
    """The checker's thread pool, run inline so the Clock decides every step."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - handed on like the real pool does
            on_result(False, Failure())
        else:
            on_result(True, result)


class _InlineReactor:
    @staticmethod
    def callFromThread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def inline_offload(function, *args):
    """The thread pool's work, run at once so the test controls every step."""
    return defer.maybeDeferred(function, *args)


class _SyncFactory(POP3ServerFactory):
    """The server factory with a Maildir backend whose blocking calls run inline."""

    def __init__(self, settings, portal, events, **kw):
        super().__init__(settings, MaildirBackend(portal, inline_offload), events, **kw)


class _Clean:
    malicious = False
    reasons = ()


class _NoAnalysis:
    def analyze(self, arguments, source=None):
        return defer.succeed([_Clean() for _ in arguments])


def _passwd_lines() -> str:
    return "".join(f"{user}:{{PLAIN}}{password}::::::{extra}\n"
                   for user, (password, extra, _) in ACCOUNTS.items())


@pytest.fixture
def factory(tmp_path: Path) -> _SyncFactory:
    for user in ACCOUNTS:
        Maildir(tmp_path / "mail" / user / "Maildir", create=True)
    passwd = tmp_path / "users.passwd"
    passwd.write_text(_passwd_lines(), encoding="utf-8")
    clock = Clock()
    checker = PasswdFileChecker(str(passwd), allow_plaintext=True, threadpool=_InlinePool(),
                                reactor=_InlineReactor())
    portal = Portal(MaildirRealm(str(tmp_path / "mail" / "{user}" / "Maildir")), [checker])
    settings = SessionSettings(hostname="test.invalid")
    events = EventLog(str(tmp_path / "events.jsonl"), clock=clock.seconds)
    made = _SyncFactory(settings, portal, events, reactor=clock, analyzer=_NoAnalysis(),
                        quick_check=lambda arg, field: _Clean(), auth_failure_delay=2.0,
                        auth_failure_delay_max=2.0)
    made.clock = clock  # type: ignore[attr-defined]
    return made


def _connect(factory: _SyncFactory, address: IPv4Address | IPv6Address) -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def _answer(factory: _SyncFactory, address: IPv4Address | IPv6Address, user: str, password: str) -> tuple[bytes, bytes]:
    """(what PASS got at once, what it got after the 2 s failure delay)."""
    proto, transport = _connect(factory, address)
    proto.dataReceived(f"USER {user}\r\nPASS {password}\r\n".encode())
    factory.clock.advance(0)  # type: ignore[attr-defined]  # what the reactor's next turn runs
    at_once = transport.value()
    transport.clear()
    factory.clock.advance(2.0)  # type: ignore[attr-defined]
    return at_once, transport.value()


LOCAL4 = IPv4Address("TCP", "127.0.0.1", 40000)
FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def test_nologin_refuses_a_right_password_after_the_delay(factory: _SyncFactory) -> None:
    assert _answer(factory, LOCAL4, "dis1", "pw-dis1") == (b"+OK\r\n", FAILED)
    assert _answer(factory, LOCAL4, "boolean", "pw-boolean") == (b"+OK\r\n", FAILED)


def test_nologin_reason_is_the_error_text_only_for_the_right_password(factory: _SyncFactory) -> None:
    assert _answer(factory, LOCAL4, "why", "pw-why") == (b"+OK\r\n", b"-ERR [AUTH] Moved_to_pop.example.org\r\n")
    assert _answer(factory, LOCAL4, "why", "guess") == (b"+OK\r\n", FAILED)


def test_nodelay_answers_a_nologin_refusal_at_once_but_not_a_wrong_password(factory: _SyncFactory) -> None:
    assert _answer(factory, LOCAL4, "quick", "pw-quick") == (b"+OK\r\n" + FAILED, b"")
    assert _answer(factory, LOCAL4, "quick", "guess") == (b"+OK\r\n", FAILED)


def test_allow_nets_refuses_like_a_wrong_password(factory: _SyncFactory) -> None:
    assert _answer(factory, LOCAL4, "dis2", "pw-dis2") == (b"+OK\r\n", FAILED)
    assert _answer(factory, LOCAL4, "both", "pw-both") == (b"+OK\r\n", FAILED)  # no reason from outside
    inside = IPv4Address("TCP", "10.1.2.3", 40000)
    assert _answer(factory, inside, "both", "pw-both") == (b"+OK\r\n", b"-ERR [AUTH] Closed\r\n")
    at_once, _ = _answer(factory, inside, "dis2", "pw-dis2")
    assert at_once == b"+OK\r\n+OK Logged in, 0 messages (0 octets).\r\n"


def test_allow_nets_matches_ipv4_mapped_clients_as_ipv4(factory: _SyncFactory) -> None:
    mapped = IPv6Address("TCP", "::ffff:10.1.2.3", 40000)
    assert _answer(factory, mapped, "dis2", "pw-dis2")[0] == b"+OK\r\n+OK Logged in, 0 messages (0 octets).\r\n"
    assert _answer(factory, IPv6Address("TCP", "::ffff:127.0.0.1", 40000), "dis2", "pw-dis2") == (
        b"+OK\r\n", FAILED)
    assert _answer(factory, IPv6Address("TCP", "::1", 40000), "lo6", "pw-lo6")[0].endswith(b"+OK Logged in, "
                                                                                          b"0 messages (0 octets).\r\n")


# --------------------------------------------------------------------------- real servers


def _attempt(host: str, port: int, user: str, password: str) -> tuple[bool, bytes, float]:
    """(logged in, the PASS reply, seconds the reply took) over a new poplib connection."""
    client = poplib.POP3(host, port, timeout=20)
    try:
        client.user(user)
        started = time.monotonic()
        try:
            reply, ok = client.pass_(password), True
        except poplib.error_proto as error:
            reply, ok = error.args[0], False
        elapsed = time.monotonic() - started
        if ok:
            client.stat()
        client.quit()
    finally:
        client.close()
    return ok, reply, elapsed


DOVECOT_FAST_FAILURES = """\
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DovecotServer, Pop3ShieldServer]]:
    tmp = tmp_path_factory.mktemp("login-policy")
    users = {user: password for user, (password, _, _) in ACCOUNTS.items()}
    dovecot = DovecotServer(extra_config=DOVECOT_FAST_FAILURES,
                            extra_fields={user: extra for user, (_, extra, _) in ACCOUNTS.items()})
    shield = None
    try:
        dovecot.start(tmp / "dovecot", users, tmp / "dovecot-mail")
        assert dovecot.passwd_path is not None
        # The very file Dovecot reads (uid:gid::home:: and the extra fields), unchanged.
        shield = Pop3ShieldServer(passwd_file=dovecot.passwd_path, auth_toml="allow_plaintext = true",
                                  server_toml="auth_failure_delay = 0.5\nauth_failure_delay_max = 0.5")
        shield.start(tmp / "pop3shield", users, tmp / "pop3shield-mail")
        yield dovecot, shield
    finally:
        if shield is not None:
            shield.stop()
        dovecot.stop()


def test_the_same_passwd_file_gives_the_same_logins_in_pop3shield_and_dovecot(
        servers: tuple[DovecotServer, Pop3ShieldServer]) -> None:
    dovecot, shield = servers
    lines = dovecot.passwd_path.read_text().splitlines()  # type: ignore[union-attr]
    assert any(line.startswith("dis1:{PLAIN}pw-dis1:") and line.endswith("::nologin") for line in lines)
    outcomes: dict[str, dict[tuple[str, str], bool]] = {"dovecot": {}, "pop3shield": {}}
    replies: dict[tuple[str, str], bytes] = {}
    timings: dict[tuple[str, str], float] = {}
    for user, (password, _, _) in ACCOUNTS.items():
        for tried in (password, "wrong-" + password):
            for name, server in (("dovecot", dovecot), ("pop3shield", shield)):
                ok, reply, elapsed = _attempt(server.host, server.port, user, tried)  # type: ignore[arg-type]
                outcomes[name][(user, tried)] = ok
                if name == "pop3shield":
                    replies[(user, tried)], timings[(user, tried)] = reply, elapsed
    expected = {}
    for user, (password, _, logs_in) in ACCOUNTS.items():
        expected[(user, password)] = logs_in
        expected[(user, "wrong-" + password)] = False
    assert outcomes["dovecot"] == expected, dovecot.diagnostics()
    assert outcomes["pop3shield"] == expected, shield.diagnostics()

    failed = b"-ERR [AUTH] Authentication failed."
    assert replies[("dis1", "pw-dis1")] == failed
    assert replies[("dis2", "pw-dis2")] == failed
    assert replies[("both", "pw-both")] == failed
    assert replies[("why", "pw-why")] == b"-ERR [AUTH] Moved_to_pop.example.org"
    assert replies[("why", "wrong-pw-why")] == failed
    assert replies[("lo", "pw-lo")].startswith(b"+OK Logged in")
    # nodelay: a refused right password is answered at once; every other failure waits 0.5 s.
    assert timings[("quick", "pw-quick")] < 0.4
    assert timings[("quick", "wrong-pw-quick")] >= 0.45
    assert timings[("dis1", "pw-dis1")] >= 0.45


def test_pop3shield_refuses_to_start_on_a_field_it_does_not_implement(tmp_path: Path) -> None:
    passwd = tmp_path / "dovecot-style.passwd"
    passwd.write_text("ok:{PLAIN}pw::::::nologin\nopen:{PLAIN}::::::nopassword\n", encoding="utf-8")
    shield = Pop3ShieldServer(passwd_file=passwd, auth_toml="allow_plaintext = true", startup_timeout=30)
    with pytest.raises(Pop3ShieldError, match="exited before printing"):
        shield.start(tmp_path / "srv", {"ok": "pw"}, tmp_path / "mail")
    err = shield.stderr_path.read_text()  # type: ignore[union-attr]
    assert err == (f"pop3shield: {passwd}:2: extra field 'nopassword' is not supported: "
                   f"it would accept any password\n")


def test_allow_nets_sees_a_real_ipv4_mapped_client_as_ipv4(tmp_path: Path) -> None:
    """An IPv6 listener that IPv4 clients reach (v4-mapped, on loopback only): Twisted reports the
    peer as ``::ffff:127.0.0.1``, which must match ``127.0.0.0/8`` and not ``::1``."""
    passwd = tmp_path / "users.passwd"
    passwd.write_text("lo:{PLAIN}pw-lo::::::allow_nets=127.0.0.0/8\n"
                      "six:{PLAIN}pw-six::::::allow_nets=::1\n", encoding="utf-8")
    shield = Pop3ShieldServer(passwd_file=passwd, auth_toml="allow_plaintext = true",
                              listen=r"tcp6:0:interface=\:\:ffff\:127.0.0.1",
                              server_toml="auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0")
    try:
        shield.start(tmp_path / "srv", {"lo": "pw-lo", "six": "pw-six"}, tmp_path / "mail")
        assert shield.host == "::ffff:127.0.0.1"
        assert _attempt("127.0.0.1", shield.port, "lo", "pw-lo")[:2] == (  # type: ignore[arg-type]
            True, b"+OK Logged in, 0 messages (0 octets).")
        assert _attempt("127.0.0.1", shield.port, "six", "pw-six")[:2] == (  # type: ignore[arg-type]
            False, b"-ERR [AUTH] Authentication failed.")
        assert "login refused for user=six from ::ffff:127.0.0.1: address not in allow_nets" in \
            shield.log_path.read_text()  # type: ignore[union-attr]
    finally:
        shield.stop()

