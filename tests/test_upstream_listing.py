"""The upstream's UIDL is checked as RFC 1939 says: 1-70 characters in 0x21-0x7E, unique."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pop3shield.backends import Credentials, Unavailable
from pop3shield.backends.routing import parse_endpoint
from pop3shield.backends.upstream import UpstreamBackend, UpstreamSettings, valid_uid
from tests.test_upstream_faults import CLIENT, FakeFactory, FakeUpstream, answer_with


def test_valid_uid_is_exactly_the_rfc_range() -> None:
    """Every code point (a UID is decoded with errors replaced, so anything may show up), alone
    and among valid characters, against the definition."""
    for code in range(0x110000):
        ch = chr(code)
        in_range = 0x21 <= code <= 0x7E
        for uid in (ch, "ab" + ch, ch + "z9", "x" * 35 + ch + "y" * 34):
            assert valid_uid(uid) == in_range, hex(code)
    assert not valid_uid("")
    assert valid_uid("a" * 70) and not valid_uid("a" * 71)


class BadUidl(unittest.TestCase):
    timeout = 30

    def login_with_uidl(self, uids: list[bytes]) -> defer.Deferred[object]:
        fake = FakeFactory()
        body = b"".join(b"%d %s\r\n" % (n, uid) for n, uid in enumerate(uids, 1))

        def answer(proto: FakeUpstream, line: bytes, usual) -> None:
            word = line.split(b" ")[0].upper()
            if word == b"STAT":
                proto.transport.write(b"+OK %d %d\r\n" % (len(uids), 10 * len(uids)))
            elif word == b"LIST":
                proto.transport.write(b"+OK\r\n" + b"".join(b"%d 10\r\n" % n for n in range(1, len(uids) + 1))
                                      + b".\r\n")
            elif word == b"UIDL":
                proto.transport.write(b"+OK\r\n" + body + b".\r\n")
            else:
                usual(proto, line)

        answer_with(self, answer)
        port = reactor.listenTCP(0, fake, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = parse_endpoint(f"tcp:host=127.0.0.1:port={port.getHost().port}")
        backend = UpstreamBackend(UpstreamSettings(endpoint, response_timeout=5.0), reactor)
        return defer.ensureDeferred(backend.login(Credentials("alice", b"pw", "USER"), CLIENT))

    def test_good_uids_are_listed(self) -> defer.Deferred[None]:
        async def run() -> None:
            box = await self.login_with_uidl([b"uid-1", b"~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}", b"x" * 70])
            self.assertEqual([m.uid for m in box.listing][2], "x" * 70)
            box.release()
        return defer.ensureDeferred(run())

    def test_bad_uids_are_refused(self) -> defer.Deferred[None]:
        async def run() -> None:
            for bad in ([b"ok", b"ok"], [b"x" * 71], [b"caf\xc3\xa9"], [b"a\x7fb"], [b"tab\x0bhere"]):
                with self.assertRaises(Unavailable):
                    await self.login_with_uidl(bad)
        return defer.ensureDeferred(run())
