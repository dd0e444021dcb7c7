"""The upstream's CAPA answer is reused by the next logins through the same backend, and asked for
again when it is old, after a failed login through that upstream, and on SIGHUP; a login with the
cached answer sends the upstream the same lines as one that asked (the CAPA excepted)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pop3shield.backends import Credentials, LoginRefused
from pop3shield.backends import upstream as upstream_module
from pop3shield.backends.routing import parse_endpoint
from pop3shield.backends.upstream import UpstreamBackend, UpstreamSettings
from pop3shield.lifecycle import Reloader
from tests.test_upstream_faults import CLIENT, FakeFactory


class SettableClock:
    """The backend's clock for the cache's age; everything else on the real reactor."""

    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class CapaCache(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.fake = FakeFactory()
        self.fake.capa_extra = b"PIPELINING\r\n"
        self.port = reactor.listenTCP(0, self.fake, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clock = SettableClock()
        endpoint = parse_endpoint(f"tcp:host=127.0.0.1:port={self.port.getHost().port}")
        self.backend = UpstreamBackend(UpstreamSettings(endpoint, response_timeout=5.0), self.clock)

    async def session_lines(self) -> list[bytes]:
        """One login and QUIT; the lines the upstream received for it."""
        start = len(self.fake.received)
        box = await self.backend.login(Credentials("alice", b"pw", "USER"), CLIENT)
        self.assertEqual([m.uid for m in box.listing], ["uid-one"])
        await box.commit([])
        await settle()
        return self.fake.received[start:]

    async def refused(self) -> list[bytes]:
        start = len(self.fake.received)
        with self.assertRaises(LoginRefused):
            await self.backend.login(Credentials("alice", b"pw", "USER"), CLIENT)
        await settle()
        return self.fake.received[start:]

    def test_the_second_login_reuses_the_first_ones_capa(self) -> defer.Deferred[None]:
        async def run() -> None:
            first = await self.session_lines()
            second = await self.session_lines()
            self.assertEqual(first[0], b"CAPA")
            self.assertEqual(first[1:], second)  # the same login, listing and QUIT, without CAPA
            self.assertEqual(second, [b"USER alice", b"PASS pw", b"STAT", b"LIST", b"UIDL", b"QUIT"])
        return defer.ensureDeferred(run())

    def test_the_cached_answer_decides_as_a_fresh_one_would(self) -> defer.Deferred[None]:
        """No PIPELINING in CAPA: USER, then PASS, then the listing, cached or not."""
        self.fake.capa_extra = b""

        async def run() -> None:
            first = await self.session_lines()
            second = await self.session_lines()
            self.assertEqual(first, [b"CAPA", *second])
            self.assertEqual(len(self.fake.connections), 2)
        return defer.ensureDeferred(run())

    def test_an_old_answer_is_asked_for_again(self) -> defer.Deferred[None]:
        async def run() -> None:
            await self.session_lines()
            self.clock.now += upstream_module.CAPA_TTL - 1
            self.assertNotIn(b"CAPA", await self.session_lines())
            self.clock.now += 2
            self.assertEqual((await self.session_lines())[0], b"CAPA")
            self.clock.now -= 3600  # a clock set back: not "fresh for an hour"
            self.assertEqual((await self.session_lines())[0], b"CAPA")
        return defer.ensureDeferred(run())

    def test_a_failed_login_forgets_the_answer(self) -> defer.Deferred[None]:
        async def run() -> None:
            await self.session_lines()
            self.fake.pass_reply = b"-ERR [AUTH] Authentication failed.\r\n"
            self.assertNotIn(b"CAPA", await self.refused())  # this one still used the cache
            self.fake.pass_reply = b"+OK logged in\r\n"
            # the upstream changed its mind about PIPELINING: the next login sees it
            self.fake.capa_extra = b""
            lines = await self.session_lines()
            self.assertEqual(lines[0], b"CAPA")
            self.assertEqual(lines[1:], [b"USER alice", b"PASS pw", b"STAT", b"LIST", b"UIDL", b"QUIT"])
        return defer.ensureDeferred(run())

    def test_sighup_forgets_the_answer(self) -> defer.Deferred[None]:
        class Config:
            source = "/nonexistent/pop3shield.toml"

        reloader = Reloader(reactor, Config(), forget=[self.backend.forget_capabilities])

        async def run() -> None:
            await self.session_lines()
            self.assertNotIn(b"CAPA", await self.session_lines())
            await reloader.reload()
            self.assertEqual((await self.session_lines())[0], b"CAPA")
        return defer.ensureDeferred(run())

    def test_a_capa_refused_is_asked_again_each_time(self) -> defer.Deferred[None]:
        from tests.test_upstream_faults import answer_with

        def no_capa(proto, line: bytes, usual) -> None:
            if line.upper() == b"CAPA":
                proto.transport.write(b"-ERR unknown command\r\n")
            else:
                usual(proto, line)

        answer_with(self, no_capa)

        async def run() -> None:
            self.assertEqual((await self.session_lines())[0], b"CAPA")
            self.assertEqual((await self.session_lines())[0], b"CAPA")
        return defer.ensureDeferred(run())


def settle() -> defer.Deferred[None]:
    return task.deferLater(reactor, 0.05, lambda: None)
