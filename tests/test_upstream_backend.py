"""The upstream backend against a real, private Dovecot on loopback.

trial's TestCase spins the real reactor while a returned Deferred is pending. Dovecot is started
per test class (blocking, before the reactor runs the test) and stopped by PID.
"""

from __future__ import annotations

import os
import poplib
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IConsumer
from twisted.trial import unittest
from zope.interface import implementer

from pop3shield.backends import (
    ClientInfo,
    Credentials,
    IMailbox,
    LoginRefused,
    MailboxInUse,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.backends.routing import parse_endpoint
from pop3shield.backends.upstream import UpstreamBackend, UpstreamSettings
from tests.support.dovecot import DovecotServer, free_port
from tests.support.messages import MESSAGES, write_maildir

USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
CLIENT = ClientInfo("test-session", "192.0.2.7", 4242, "127.0.0.1", 110)


@implementer(IConsumer)
class Collector:
    """The client side of send_message: records what was written; pauses when told to."""

    def __init__(self, pause_every: int = 0) -> None:
        self.data = bytearray()
        self.producer: Any = None
        self.registered = 0
        self.pauses = 0
        self.pause_every = pause_every
        self.writes = 0
        self._resumes: list[Any] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer
        self.registered += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1
        if self.pause_every and self.producer is not None and len(self.data) // self.pause_every > self.pauses:
            self.pauses += 1
            self.producer.pauseProducing()
            self._resumes.append(reactor.callLater(0.01, self._resume, self.producer))

    def _resume(self, producer: Any) -> None:
        producer.resumeProducing()

    def close(self) -> None:
        """Cancel a resume still pending when the message is over (the reactor must be clean)."""
        for call in self._resumes:
            if call.active():
                call.cancel()


def creds(user: str, password: str | None = None, mechanism: str = "USER") -> Credentials:
    return Credentials(user, (password or USERS[user]).encode(), mechanism)


def unstuffed(wire: bytes) -> bytes:
    """A status line, a stuffed body and '.': the body as a client keeps it."""
    head, _, rest = wire.partition(b"\r\n")
    assert rest.endswith(b"\r\n.\r\n") or rest == b".\r\n"
    body = rest[:-3]
    return b"".join(line[1:] if line.startswith(b".") else line for line in body.splitlines(keepends=True))


def poplib_direct(host: str, port: int, user: str) -> tuple[list[tuple[int, int]], list[bytes], list[bytes]]:
    client = poplib.POP3(host, port, timeout=20)
    try:
        client.user(user)
        client.pass_(USERS[user])
        listing = [tuple(int(x) for x in line.split()) for line in client.list()[1]]
        uids = [line.split()[1] for line in client.uidl()[1]]
        bodies = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n, _ in listing]
        return listing, uids, bodies
    finally:
        client.quit()


class _DovecotCase(unittest.TestCase):
    dovecot_kwargs: dict[str, Any] = {}
    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = Path(tempfile.mkdtemp(prefix="pop3shield-upstream-"))
        cls.ca = trustme.CA()
        cert = cls.ca.issue_cert("mail.test.invalid", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(cls.tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(cls.tmp / "key.pem"))
        cls.ca.cert_pem.write_to_path(str(cls.tmp / "ca.pem"))
        trustme.CA().cert_pem.write_to_path(str(cls.tmp / "other-ca.pem"))
        cls.dovecot = DovecotServer(trusted_networks="127.0.0.1/32", haproxy=True,
                                    tls=(str(cls.tmp / "cert.pem"), str(cls.tmp / "key.pem")),
                                    **cls.dovecot_kwargs)
        root = cls.tmp / "mail"
        for user in USERS:
            write_maildir(root / user / "Maildir", MESSAGES if user != "carol" else MESSAGES[:3])
        cls.host, cls.port = cls.dovecot.start(cls.tmp / "dovecot", USERS, root)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dovecot.stop()

    def backend(self, endpoint: str | None = None, **kwargs: Any) -> UpstreamBackend:
        endpoint = endpoint or f"tcp:host={self.host}:port={self.port}"
        settings = UpstreamSettings(parse_endpoint(endpoint), **kwargs)
        return UpstreamBackend(settings, reactor)

    def log_text(self) -> str:
        return Path(self.dovecot.log_path).read_text(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text())
            if found or time.monotonic() > deadline:
                assert found, f"{pattern!r} not in Dovecot's log:\n{self.log_text()[-2000:]}"
                return found
            await deferLater(0.05)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class RelayedSession(_DovecotCase):
    """Listing, RETR, TOP, commit and release, byte for byte against Dovecot itself."""

    def test_listing_and_messages_match_dovecot(self) -> defer.Deferred[None]:
        async def run() -> None:
            listing, uids, bodies = await defer.ensureDeferred(_in_thread(poplib_direct, self.host, self.port, "alice"))
            box = await self.backend().login(creds("alice"), CLIENT)
            self.assertTrue(IMailbox.providedBy(box))
            self.assertEqual([(m.key, m.size) for m in box.listing], listing)
            self.assertEqual([m.uid.encode() for m in box.listing], uids)
            for message, expected in zip(box.listing, bodies):
                out = Collector()
                status = b"+OK %d octets\r\n" % message.size
                sent = await box.send_message(message.key, None, status, out)
                self.assertEqual(sent, len(out.data))
                self.assertTrue(out.data.startswith(status))
                self.assertEqual(unstuffed(bytes(out.data)[len(status) - 2:]), expected)
                self.assertIsNone(out.producer)
            top = Collector()
            await box.send_message(1, 0, b"+OK\r\n", top)
            self.assertTrue(bytes(top.data).endswith(b"\r\n\r\n.\r\n"))
            self.assertIn(b"X-Test-Id: plain-ascii", bytes(top.data))
            self.assertNotIn(b"Hello Bob", bytes(top.data))
            box.release()
        return defer.ensureDeferred(run())

    def test_a_small_message_reaches_the_client_in_one_write(self) -> defer.Deferred[None]:
        """Status line, body and terminator of one upstream read go out together."""
        async def run() -> None:
            box = await self.backend().login(creds("alice"), CLIENT)
            small = [m for m in box.listing if m.size < 8192]
            self.assertTrue(small)
            for message in small:
                out = Collector()
                await box.send_message(message.key, None, b"+OK %d octets\r\n" % message.size, out)
                self.assertTrue(bytes(out.data).endswith(b"\r\n.\r\n"))
                self.assertEqual(out.writes, 1, message)
            box.release()
        return defer.ensureDeferred(run())

    def test_backpressure_pauses_the_upstream_read(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend().login(creds("alice"), CLIENT)
            big = max(box.listing, key=lambda m: m.size)
            out = Collector(pause_every=64 * 1024)
            await box.send_message(big.key, None, b"+OK\r\n", out)
            self.assertGreater(out.pauses, 5)
            out.close()
            self.assertEqual(len(unstuffed(b"+OK\r\n" + bytes(out.data)[5:])), big.size)
            box.release()
        return defer.ensureDeferred(run())

    def test_release_deletes_nothing_commit_deletes(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend().login(creds("carol"), CLIENT)
            self.assertEqual(len(box.listing), 3)
            box.release()  # as after a dropped client: no QUIT, nothing removed
            box.release()
            await self.wait_log(r"pop3\(carol\).*Disconnected.*del=0/")
            box = await self.backend().login(creds("carol"), CLIENT)
            self.assertEqual(len(box.listing), 3)
            failed = await box.commit([1, 3])
            self.assertEqual(list(failed), [])
            await self.wait_log(r"pop3\(carol\).*Logged out.*del=2/3")
            box = await self.backend().login(creds("carol"), CLIENT)
            self.assertEqual(len(box.listing), 1)
            self.assertEqual(box.listing[0].size, len(MESSAGES[1].wire))
            box.release()
        return defer.ensureDeferred(run())

    def test_unknown_message_is_unavailable(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend().login(creds("alice"), CLIENT)
            with self.assertRaises(MessageUnavailable):
                await box.send_message(999, None, b"+OK\r\n", Collector())
            box.release()
        return defer.ensureDeferred(run())


class LoginErrors(_DovecotCase):
    def test_wrong_password_is_refused(self) -> defer.Deferred[None]:
        async def run() -> None:
            with self.assertRaises(LoginRefused):
                await self.backend().login(creds("alice", "wrong"), CLIENT)
            with self.assertRaises(LoginRefused):
                await self.backend().login(creds("nobody-here", "x"), CLIENT)
        return defer.ensureDeferred(run())

    def test_in_use_reaches_the_backend_caller(self) -> defer.Deferred[None]:
        async def run() -> None:
            first = await self.backend().login(creds("bob"), CLIENT)
            try:
                with self.assertRaises(MailboxInUse):
                    await self.backend().login(creds("bob"), CLIENT)
            finally:
                first.release()
        return defer.ensureDeferred(run())

    def test_upstream_down_is_unavailable(self) -> defer.Deferred[None]:
        async def run() -> None:
            port = free_port()
            with self.assertRaises(Unavailable) as caught:
                await self.backend(f"tcp:host=127.0.0.1:port={port}").login(creds("alice"), CLIENT)
            self.assertEqual(caught.exception.code, "SYS/TEMP")
        return defer.ensureDeferred(run())

    def test_silent_upstream_times_out(self) -> defer.Deferred[None]:
        async def run() -> None:
            silent = socket.socket()
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)
            try:
                started = time.monotonic()
                with self.assertRaises(Unavailable) as caught:
                    await self.backend(f"tcp:host=127.0.0.1:port={silent.getsockname()[1]}",
                                       login_timeout=1.0).login(creds("alice"), CLIENT)
                self.assertEqual(caught.exception.code, "SYS/TEMP")
                self.assertLess(time.monotonic() - started, 5)
            finally:
                silent.close()
        return defer.ensureDeferred(run())

    def test_apop_is_never_relayed(self) -> defer.Deferred[None]:
        async def run() -> None:
            with self.assertRaises(LoginRefused):
                await self.backend().login(Credentials("alice", b"0" * 32, "APOP", b"<1@x>"), CLIENT)
        return defer.ensureDeferred(run())


class ClientAddress(_DovecotCase):
    def test_xclient_gives_dovecot_the_client_address(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend(client_address="xclient").login(
                creds("alice"), ClientInfo("s1", "192.0.2.55", 5555))
            box.release()
            await self.wait_log(r"Login: user=<alice>, method=PLAIN, rip=192\.0\.2\.55, lip=127\.0\.0\.1")
        return defer.ensureDeferred(run())

    def test_proxy_v2_gives_dovecot_the_client_address(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend(f"tcp:host={self.host}:port={self.dovecot.proxy_port}",
                                     client_address="proxy").login(
                creds("alice"), ClientInfo("s2", "198.51.100.23", 6000, "203.0.113.1", 110))
            box.release()
            await self.wait_log(r"Login: user=<alice>, method=PLAIN, rip=198\.51\.100\.23, lip=203\.0\.113\.1")
        return defer.ensureDeferred(run())

    def test_ipv6_client_through_proxy_v2(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend(f"tcp:host={self.host}:port={self.dovecot.proxy_port}",
                                     client_address="proxy").login(
                creds("alice"), ClientInfo("s3", "2001:db8::7", 6001, None, None))
            box.release()
            await self.wait_log(r"Login: user=<alice>, method=PLAIN, rip=2001:db8::7")
        return defer.ensureDeferred(run())


class UpstreamTLS(_DovecotCase):
    def test_implicit_tls_with_the_right_ca(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend(f"tls:host=127.0.0.1:port={self.dovecot.tls_port}",
                                     ca_file=str(self.tmp / "ca.pem"),
                                     tls_hostname="mail.test.invalid").login(creds("alice"), CLIENT)
            self.assertEqual(len(box.listing), len(MESSAGES))
            out = Collector()
            await box.send_message(1, None, b"+OK\r\n", out)
            self.assertIn(b"X-Test-Id: plain-ascii", bytes(out.data))
            box.release()
            await self.wait_log(r"Login: user=<alice>, method=PLAIN, .*TLS")
        return defer.ensureDeferred(run())

    def test_stls_with_the_right_ca(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.backend(stls=True, ca_file=str(self.tmp / "ca.pem"),
                                     tls_hostname="mail.test.invalid").login(creds("bob"), CLIENT)
            self.assertEqual(len(box.listing), len(MESSAGES))
            box.release()
        return defer.ensureDeferred(run())

    def test_wrong_host_name_is_refused(self) -> defer.Deferred[None]:
        async def run() -> None:
            for kwargs in ({"stls": True}, {}):
                endpoint = None if kwargs else f"tls:host=127.0.0.1:port={self.dovecot.tls_port}"
                with self.assertRaises(Unavailable):
                    await self.backend(endpoint, ca_file=str(self.tmp / "ca.pem"),
                                       tls_hostname="other.test.invalid", **kwargs).login(creds("alice"), CLIENT)
        return defer.ensureDeferred(run())

    def test_untrusted_ca_is_refused(self) -> defer.Deferred[None]:
        async def run() -> None:
            for kwargs in ({"stls": True}, {}):
                endpoint = None if kwargs else f"tls:host=127.0.0.1:port={self.dovecot.tls_port}"
                with self.assertRaises(Unavailable):
                    await self.backend(endpoint, ca_file=str(self.tmp / "other-ca.pem"),
                                       tls_hostname="mail.test.invalid", **kwargs).login(creds("alice"), CLIENT)
            # nothing logged in: the password never went over the unverified connection
            self.assertNotIn("Login: user=<alice>, method=PLAIN, rip=192.0.2.7", self.log_text())
        return defer.ensureDeferred(run())


def _in_thread(function: Any, *args: Any) -> defer.Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args)


