"""The relay's writes toward the upstream: pipelined requests go out in one write, in order."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pop3shield.backends._upstream_client import UpstreamFailure, UpstreamProtocol
from pop3shield.core.upstream import DEFAULT_MAX_LINE, Expect, Kind


class CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def connected() -> tuple[UpstreamProtocol, CountingTransport, list]:
    protocol = UpstreamProtocol(reactor=Clock(), response_timeout=5.0, max_line=DEFAULT_MAX_LINE)
    transport = CountingTransport()
    protocol.makeConnection(transport)
    greeting: list = []
    protocol.greeting.addCallback(greeting.append)
    protocol.dataReceived(b"+OK ready\r\n")
    assert greeting and greeting[0].status.ok
    return protocol, transport, greeting


def test_pipelined_requests_are_one_write_and_answered_in_order() -> None:
    protocol, transport, _ = connected()
    replies: list = []
    ds = protocol.pipeline([(b"DELE 1", Kind.SINGLE), (b"DELE 2", Kind.SINGLE), (b"QUIT", Kind.SINGLE)])
    assert transport.writes == [b"DELE 1\r\nDELE 2\r\nQUIT\r\n"]
    for d in ds:
        d.addCallback(lambda r: replies.append(r.status.ok))
    protocol.dataReceived(b"+OK\r\n-ERR no\r\n+OK bye\r\n")
    assert replies == [True, False, True]


def test_a_pipelined_listing_collects_each_body() -> None:
    protocol, transport, _ = connected()
    bound = Expect(Kind.MULTI, per_message=100)
    stat, listed, uidl = protocol.pipeline([(b"STAT", Expect(counts=True)), (b"LIST", bound), (b"UIDL", bound)])
    assert transport.writes == [b"STAT\r\nLIST\r\nUIDL\r\n"]
    out: list = []
    for d in (stat, listed, uidl):
        d.addCallback(out.append)
    protocol.dataReceived(b"+OK 1 22\r\n+OK\r\n1 22\r\n.\r\n+OK\r\n1 uid-one\r\n.\r\n")
    assert [r.status.ok for r in out] == [True, True, True]
    assert out[1].body == b"1 22\r\n" and out[2].body == b"1 uid-one\r\n"


def test_pipelining_on_a_failed_connection_fails_every_request() -> None:
    protocol, transport, _ = connected()
    protocol.abort("gone")
    failures: list = []
    for d in protocol.pipeline([(b"DELE 1", Kind.SINGLE), (b"QUIT", Kind.SINGLE)]):
        d.addErrback(lambda f: failures.append(f.check(UpstreamFailure)))
    assert failures == [UpstreamFailure, UpstreamFailure]
    assert transport.writes == []


def _greeted() -> tuple[Clock, UpstreamProtocol, CountingTransport]:
    """An upstream connection with a 5 s response timeout, past the greeting, on a test clock."""
    clock = Clock()
    protocol = UpstreamProtocol(reactor=clock, response_timeout=5.0, max_line=DEFAULT_MAX_LINE)
    transport = CountingTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"+OK ready\r\n")
    return clock, protocol, transport


def test_the_response_timer_runs_only_for_a_response_that_is_due() -> None:
    """Idle between commands (nothing due), the connection stays however long the client takes;
    a command whose answer does not come within response_timeout still fails and aborts."""
    clock, protocol, transport = _greeted()
    replies: list = []
    protocol.request(b"NOOP").addCallback(replies.append)
    clock.advance(4.0)
    protocol.dataReceived(b"+OK\r\n")  # answered within the timeout
    assert replies and replies[0].status.ok
    clock.advance(4.0)
    clock.advance(60.0)  # idle far past the timeout: nothing was due, nothing happens
    assert not transport.disconnecting and not protocol._closed
    failures: list = []
    protocol.request(b"NOOP").addErrback(failures.append)
    clock.advance(4.9)
    assert not failures
    clock.advance(0.2)  # 5 s after the command, no answer
    assert failures and "no answer within 5 s" in str(failures[0].value)
    assert protocol._closed


def test_a_paused_read_does_not_time_out() -> None:
    clock, protocol, transport = _greeted()
    failures: list = []
    protocol.request(b"RETR 1", Kind.MULTI).addErrback(failures.append)
    protocol.pause()  # the client is slow: the upstream read waits, its timer with it
    clock.advance(30.0)
    assert not failures and not protocol._closed
    protocol.resume()
    clock.advance(5.1)
    assert failures and protocol._closed
