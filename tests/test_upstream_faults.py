"""A broken, hostile or silent upstream, scripted on loopback: the backend fails cleanly.

The fake upstream is a real listening socket in the test's reactor that speaks enough POP3 for a
login and then misbehaves as each test asks; it records every line it received.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from pop3shield.backends import (
    BackendBroken,
    ClientInfo,
    Credentials,
    LoginRefused,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.backends._upstream_client import UpstreamFailure
from pop3shield.backends.routing import parse_endpoint
from pop3shield.backends.upstream import UpstreamBackend, UpstreamSettings
from pop3shield.checker import PasswdFileChecker
from pop3shield.core.dotstuff import stuff
from tests.test_upstream_backend import Collector

CLIENT = ClientInfo("faults", "192.0.2.9", 1234)
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def answer_with(case: Any, answer: Callable[[Any, bytes, Callable[[Any, bytes], None]], None]) -> None:
    """For this test, :class:`FakeUpstream` answers each line through ``answer(proto, line, usual)``,
    where ``usual(proto, line)`` is its own answer."""
    usual = FakeUpstream.answer
    FakeUpstream.answer = lambda proto, line: answer(proto, line, usual)  # type: ignore[method-assign]
    case.addCleanup(setattr, FakeUpstream, "answer", usual)


class FakeUpstream(Protocol):
    """Answers a login and the listing; RETR/TOP get ``factory.retr`` (bytes or a callable)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""
        if self.factory.greeting is not None:
            self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.factory.received.append(line)
            self.answer(line)

    def answer(self, line: bytes) -> None:
        word = line.split(b" ")[0].upper()
        w = self.transport.write
        if getattr(self, "in_auth", False):  # the SASL response line: refused
            self.in_auth = False
            w(b"-ERR [AUTH] Authentication failed.\r\n")
        elif word == b"AUTH" and line.count(b" ") == 1:
            self.in_auth = True
            w(b"+ \r\n")
        elif word == b"STLS" and self.factory.tls is not None:
            # plaintext injected behind the +OK: the client must drop it, not read it after TLS
            w(b"+OK Begin TLS negotiation now.\r\n-ERR injected before TLS\r\n")
            self.transport.startTLS(self.factory.tls)
            self.factory.tls_started = True
        elif word == b"CAPA":
            stls = b"STLS\r\n" if self.factory.tls is not None and not self.factory.tls_started else b""
            w(b"+OK\r\nUSER\r\n" + stls + self.factory.capa_extra + b".\r\n")
        elif word in (b"USER", b"PASS"):
            w(self.factory.pass_reply if word == b"PASS" else b"+OK\r\n")
        elif word == b"STAT":
            w(b"+OK 1 %d\r\n" % len(MESSAGE))
        elif word == b"LIST":
            w(b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE))
        elif word == b"UIDL":
            w(b"+OK\r\n1 uid-one\r\n.\r\n")
        elif word in (b"RETR", b"TOP"):
            retr = self.factory.retr
            if callable(retr):
                retr(self)
            elif retr is not None:
                w(retr)
        elif word in (b"DELE", b"QUIT"):
            w(b"+OK\r\n")
            if word == b"QUIT":
                self.transport.loseConnection()
        else:
            w(b"-ERR\r\n")


class FakeFactory(Factory):
    protocol = FakeUpstream

    def __init__(self) -> None:
        self.connections: list[FakeUpstream] = []
        self.received: list[bytes] = []
        self.greeting: bytes | None = b"+OK fake ready\r\n"
        self.capa_extra = b""
        self.pass_reply = b"+OK logged in\r\n"
        self.retr: bytes | Callable[[FakeUpstream], None] | None = b"+OK\r\n" + stuff(MESSAGE)
        self.tls: Any = None  # server TLS options: STLS offered
        self.tls_started = False


class FaultCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.fake = FakeFactory()
        self.port = reactor.listenTCP(0, self.fake, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def backend(self, **kwargs: Any) -> UpstreamBackend:
        endpoint = parse_endpoint(f"tcp:host=127.0.0.1:port={self.port.getHost().port}")
        kwargs.setdefault("response_timeout", 1.0)
        return UpstreamBackend(UpstreamSettings(kwargs.pop("endpoint", endpoint), **kwargs), reactor)

    async def login(self, **kwargs: Any) -> Any:
        return await self.backend(**kwargs).login(Credentials("alice", b"pw", "USER"), CLIENT)

    async def retr_fails(self, cut: bool = True) -> Collector:
        box = await self.login()
        out = Collector()
        failure_type = BackendBroken if cut else MessageUnavailable
        with self.assertRaises(failure_type):
            await box.send_message(1, None, b"+OK 22 octets\r\n", out)
        box.release()
        self.assertFalse(bytes(out.data).endswith(b"\r\n.\r\n"), "never completed")
        await _settle()
        for conn in self.fake.connections:
            self.assertFalse(conn.transport.connected, "the upstream connection is closed")
        self.assertNotIn(b"QUIT", self.fake.received)
        return out

    # -- login ------------------------------------------------------------------------------

    def test_relay_works_against_the_fake(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.login()
            out = Collector()
            await box.send_message(1, None, b"+OK\r\n", out)
            self.assertEqual(bytes(out.data), b"+OK\r\n" + stuff(MESSAGE))
            self.assertEqual(list(await box.commit([1])), [])
            self.assertEqual(self.fake.received[-2:], [b"DELE 1", b"QUIT"])
        return defer.ensureDeferred(run())

    def test_garbage_greeting(self) -> defer.Deferred[None]:
        self.fake.greeting = b"HTTP/1.1 400 Bad Request\r\n\r\n"
        return self._unavailable()

    def test_ten_megabyte_status_line(self) -> defer.Deferred[None]:
        self.fake.greeting = b"+OK " + b"x" * 10_000_000
        return self._unavailable()

    def test_never_answering(self) -> defer.Deferred[None]:
        self.fake.greeting = None
        return self._unavailable(login_timeout=1.0)

    def test_unsolicited_bytes_at_login(self) -> defer.Deferred[None]:
        self.fake.greeting = b"+OK hi\r\n+OK surprise\r\n"
        return self._unavailable()

    def _unavailable(self, **kwargs: Any) -> defer.Deferred[None]:
        async def run() -> None:
            started = time.monotonic()
            with self.assertRaises(Unavailable) as caught:
                await self.login(**kwargs)
            self.assertEqual(caught.exception.code, "SYS/TEMP")
            self.assertLess(time.monotonic() - started, 10)
            self.assertNotIn(b"PASS pw", self.fake.received)
        return defer.ensureDeferred(run())

    def test_login_codes(self) -> defer.Deferred[None]:
        async def run() -> None:
            for reply, error, code in ((b"-ERR [AUTH] no\r\n", LoginRefused, None),
                                       (b"-ERR no\r\n", LoginRefused, None),
                                       (b"-ERR [SYS/PERM] gone\r\n", Unavailable, "SYS/PERM"),
                                       (b"-ERR [LOGIN-DELAY] wait\r\n", Unavailable, "LOGIN-DELAY"),
                                       (b"-ERR [SYS/TEMP] later\r\n", Unavailable, "SYS/TEMP")):
                self.fake.pass_reply = reply
                with self.assertRaises(error) as caught:
                    await self.login()
                if code:
                    self.assertEqual(caught.exception.code, code)
        return defer.ensureDeferred(run())

    def test_pipelined_login_and_listing(self) -> defer.Deferred[None]:
        self.fake.capa_extra = b"PIPELINING\r\n"
        chunks: list[bytes] = []
        original = FakeUpstream.dataReceived

        def record(proto: FakeUpstream, data: bytes) -> None:
            chunks.append(data)
            original(proto, data)

        FakeUpstream.dataReceived = record  # type: ignore[method-assign]
        self.addCleanup(setattr, FakeUpstream, "dataReceived", original)

        async def run() -> None:
            box = await self.login()
            self.assertEqual([m.uid for m in box.listing], ["uid-one"])
            box.release()
            # USER, PASS, STAT, LIST and UIDL went out in one write, after CAPA's answer
            self.assertIn(b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\nUIDL\r\n", chunks)
            self.fake.pass_reply = b"-ERR [AUTH] Authentication failed.\r\n"
            with self.assertRaises(LoginRefused):
                await self.login()
            await _settle()
        return defer.ensureDeferred(run())

    def test_auth_plain_when_offered(self) -> defer.Deferred[None]:
        self.fake.capa_extra = b"SASL PLAIN\r\n"

        async def run() -> None:
            with self.assertRaises(LoginRefused):  # the fake answers AUTH with -ERR
                await self.login()
            self.assertEqual(self.fake.received[-1], b"AUTH PLAIN AGFsaWNlAHB3")
        return defer.ensureDeferred(run())

    def test_oauth_tokens_pass_through_unchanged(self) -> defer.Deferred[None]:
        self.fake.capa_extra = b"SASL PLAIN XOAUTH2 OAUTHBEARER\r\n"
        token = b"user=alice\x01auth=Bearer " + b"ya29." + b"x" * 2000 + b"\x01\x01"
        bearer = b"n,a=alice,\x01auth=Bearer " + b"y" * 2500 + b"\x01\x01"

        async def run() -> None:
            for mechanism, message in (("XOAUTH2", token), ("OAUTHBEARER", bearer)):
                with self.assertRaises(LoginRefused):  # the fake refuses every AUTH
                    await self.backend().login(Credentials("alice", message, mechanism), CLIENT)
                # too long for an initial response (255 octets): AUTH, then the token after "+"
                self.assertEqual(self.fake.received[-2:], [b"AUTH " + mechanism.encode(), base64.b64encode(message)])
            self.fake.capa_extra = b"SASL PLAIN\r\n"  # not offered: refused without trying
            count = len(self.fake.received)
            with self.assertRaises(LoginRefused):
                await self.backend().login(Credentials("alice", token, "XOAUTH2"), CLIENT)
            self.assertFalse(any(line.startswith(b"AUTH") for line in self.fake.received[count:]))
        return defer.ensureDeferred(run())

    def test_sasl_challenge_from_the_upstream_is_answered_with_a_cancel(self) -> defer.Deferred[None]:
        self.fake.capa_extra = b"SASL XOAUTH2\r\n"

        def answer(proto: FakeUpstream, line: bytes, usual: Callable[[FakeUpstream, bytes], None]) -> None:
            if line.startswith(b"AUTH") and line.count(b" ") == 1:
                proto.transport.write(b"+ \r\n")
            elif line.startswith(b"AUTH") or line == base64.b64encode(b"tok" * 100):
                proto.transport.write(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
            elif line == b"*":
                proto.transport.write(b"-ERR [AUTH] Authentication failed.\r\n")
            else:
                usual(proto, line)

        answer_with(self, answer)

        async def run() -> None:
            with self.assertRaises(LoginRefused):
                await self.backend().login(Credentials("alice", b"tok", "XOAUTH2"), CLIENT)
            self.assertEqual(self.fake.received[-2:], [b"AUTH XOAUTH2 dG9r", b"*"])
            with self.assertRaises(LoginRefused):
                await self.backend().login(Credentials("alice", b"tok" * 100, "XOAUTH2"), CLIENT)
            self.assertEqual(self.fake.received[-3:], [b"AUTH XOAUTH2", base64.b64encode(b"tok" * 100), b"*"])
        return defer.ensureDeferred(run())

    def test_local_passwd_checked_before_the_upstream(self) -> defer.Deferred[None]:
        async def run() -> None:
            path = Path(tempfile.mkdtemp(prefix="pop3shield-faults-")) / "passwd"
            path.write_text("alice:{PLAIN}right::::::\n")
            checker = PasswdFileChecker(str(path), allow_plaintext=True, reactor=reactor)
            backend = self.backend()
            backend.checker = checker
            with self.assertRaises(LoginRefused):
                await backend.login(Credentials("alice", b"pw", "USER"), CLIENT)
            self.assertEqual(self.fake.connections, [])
            box = await backend.login(Credentials("alice", b"right", "USER"), CLIENT)
            self.assertEqual(self.fake.received[-5:-3], [b"USER alice", b"PASS right"])
            box.release()
        return defer.ensureDeferred(run())

    def test_no_route_is_refused_like_a_wrong_password(self) -> defer.Deferred[None]:
        async def run() -> None:
            routes = Path(tempfile.mkdtemp(prefix="pop3shield-faults-")) / "routes"
            routes.write_text(f"bob tcp:host=127.0.0.1:port={self.port.getHost().port}\n")
            backend = UpstreamBackend(UpstreamSettings(None, routes=str(routes)), reactor)
            with self.assertRaises(LoginRefused):
                await backend.login(Credentials("alice", b"pw", "USER"), CLIENT)
            self.assertEqual(self.fake.connections, [])
            box = await backend.login(Credentials("bob", b"pw", "USER"), CLIENT)
            box.release()
        return defer.ensureDeferred(run())

    # -- RETR -------------------------------------------------------------------------------

    def test_plaintext_injected_after_stls_ok_is_discarded(self) -> defer.Deferred[None]:
        import trustme
        from twisted.internet import ssl

        ca = trustme.CA()
        cert = ca.issue_cert("fake.test.invalid")
        self.fake.tls = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
        ca_file = Path(tempfile.mkdtemp(prefix="pop3shield-faults-")) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))

        async def run() -> None:
            box = await self.login(stls=True, ca_file=str(ca_file), tls_hostname="fake.test.invalid")
            self.assertTrue(self.fake.tls_started)
            self.assertEqual([m.uid for m in box.listing], ["uid-one"])
            out = Collector()
            await box.send_message(1, None, b"+OK\r\n", out)
            self.assertEqual(bytes(out.data), b"+OK\r\n" + stuff(MESSAGE))
            box.release()
        return defer.ensureDeferred(run())

    def test_retr_error_before_the_body(self) -> defer.Deferred[None]:
        self.fake.retr = b"-ERR [SYS/TEMP] cannot\r\n"

        async def run() -> None:
            box = await self.login()
            out = Collector()
            with self.assertRaises(MessageUnavailable):
                await box.send_message(1, None, b"+OK\r\n", out)
            self.assertEqual(bytes(out.data), b"")
            box.release()
        return defer.ensureDeferred(run())

    def test_killed_mid_retr(self) -> defer.Deferred[None]:
        self.fake.retr = lambda p: (p.transport.write(b"+OK\r\nSubject: hi\r\n"),
                                    reactor.callLater(0.1, p.transport.abortConnection))
        return defer.ensureDeferred(self.retr_fails())

    def test_body_longer_than_listed_is_cut(self) -> defer.Deferred[None]:
        self.fake.retr = b"+OK\r\n" + stuff(MESSAGE + b"X-Injected: yes\r\n")

        async def run() -> None:
            out = await self.retr_fails()
            self.assertNotIn(b"X-Injected", bytes(out.data))
        return defer.ensureDeferred(run())

    def test_body_shorter_than_listed_is_cut(self) -> defer.Deferred[None]:
        self.fake.retr = b"+OK\r\n" + stuff(MESSAGE[:-6])
        return defer.ensureDeferred(self.retr_fails())

    def test_ten_megabyte_line_in_a_body(self) -> defer.Deferred[None]:
        self.fake.retr = b"+OK\r\n" + b"A" * 10_000_000 + b"\r\n.\r\n"

        async def run() -> None:
            out = await self.retr_fails()
            self.assertLess(len(out.data), 200_000)
        return defer.ensureDeferred(run())

    def test_nul_and_bare_cr_in_a_body(self) -> defer.Deferred[None]:
        async def run() -> None:
            for body in (b"Subject: a\0b\r\n\r\nbody\r\n.\r\n", b"Subject: a\rb\r\n\r\nbody\r\n.\r\n"):
                self.fake.retr = b"+OK\r\n" + body
                await self.retr_fails()
        return defer.ensureDeferred(run())

    def test_stalled_body_times_out(self) -> defer.Deferred[None]:
        self.fake.retr = b"+OK\r\nSubject: hi\r\n"
        return defer.ensureDeferred(self.retr_fails())

    def test_injected_response_after_the_body(self) -> defer.Deferred[None]:
        self.fake.retr = b"+OK\r\n" + stuff(MESSAGE) + b"+OK injected\r\n"

        async def run() -> None:
            box = await self.login()
            out = Collector()
            # the body was complete; the extra line is refused and closes the connection
            try:
                await box.send_message(1, None, b"+OK\r\n", out)
            except UpstreamFailure:
                pass
            await _settle()
            with self.assertRaises(MessageUnavailable):
                await box.send_message(1, None, b"+OK\r\n", Collector())
            self.assertEqual(list(await box.commit([1])), [1])
            self.assertNotIn(b"DELE 1", self.fake.received)
        return defer.ensureDeferred(run())


def _settle() -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.05, lambda: None)
