"""pop3shield.eagerwrite over real loopback TCP: the same bytes in the same order as
``transport.write``, sent at once only when nothing is queued, and the queued path (backpressure,
closing, TLS, other transports) left as it was."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from pop3shield import eagerwrite


class Sink(Protocol):
    """Collects what arrives; ``done`` fires with it when the connection ends."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.received))


class Source(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class RealTCP(unittest.TestCase):
    def setUp(self) -> None:
        self.sinks: list[Sink] = []

        def sink() -> Sink:
            self.sinks.append(Sink())
            return self.sinks[-1]

        self.port = reactor.listenTCP(0, Factory.forProtocol(sink), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def connect(self) -> Any:
        factory = ClientFactory.forProtocol(Source)
        factory.connected = defer.Deferred()
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        source = await factory.connected
        return source.transport

    def test_an_idle_connection_sends_at_once(self) -> defer.Deferred[None]:
        async def run() -> None:
            transport = await self.connect()
            eagerwrite.write(transport, b"+OK hello\r\n")
            # nothing queued, the reactor not asked to watch the socket for writing
            self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
            self.assertNotIn(transport, reactor.getWriters())
            transport.write(b"+OK queued\r\n")  # the ordinary path queues until the next turn
            self.assertIn(transport, reactor.getWriters())
            transport.loseConnection()
            self.assertEqual(await self.sinks[0].done, b"+OK hello\r\n+OK queued\r\n")
        return defer.ensureDeferred(run())

    def test_the_same_bytes_in_the_same_order_as_transport_write(self) -> defer.Deferred[None]:
        """Small and large writes mixed at random through both paths, with the kernel's send
        buffer overflowing (a large write queues, the eager writes after it must queue too)."""
        async def run() -> None:
            rng = random.Random(9)
            transport = await self.connect()
            expected = []
            for n in range(300):
                size = rng.choice((1, 7, 100, 1400, 5000, 70000, 600000))
                data = bytes([65 + n % 26]) * size
                expected.append(data)
                if rng.random() < 0.7:
                    eagerwrite.write(transport, data)
                else:
                    transport.write(data)
                if n % 50 == 0:  # let the reactor send some of it now and then
                    await deferLater(0)
            transport.loseConnection()
            received = await self.sinks[0].done
            self.assertEqual(len(received), sum(map(len, expected)))
            self.assertEqual(received, b"".join(expected))
        return defer.ensureDeferred(run())

    def test_a_full_buffer_pauses_the_producer_as_transport_write_does(self) -> defer.Deferred[None]:
        async def run() -> None:
            transport = await self.connect()
            self.sinks[0].transport.pauseProducing()  # the peer stops reading: the kernel fills up
            producer = Producer()
            transport.registerProducer(producer, True)
            transport.bufferSize = 65536
            chunk = b"x" * eagerwrite.MAX_EAGER
            for _ in range(4000):  # far more than the kernel's buffers on both ends
                eagerwrite.write(transport, chunk)
                if producer.calls:
                    break
            self.assertEqual(producer.calls[:1], ["pause"])
            self.assertGreater(len(transport.dataBuffer) + transport._tempDataLen, 0)
            self.sinks[0].transport.resumeProducing()
            transport.unregisterProducer()
            transport.loseConnection()
            received = await self.sinks[0].done
            self.assertEqual(received, b"x" * len(received))
            self.assertEqual(len(received) % len(chunk), 0)
        return defer.ensureDeferred(run())

    def test_a_large_write_takes_the_queued_path(self) -> defer.Deferred[None]:
        async def run() -> None:
            transport = await self.connect()
            big = b"y" * (eagerwrite.MAX_EAGER + 1)
            eagerwrite.write(transport, big)
            self.assertIn(transport, reactor.getWriters())
            transport.loseConnection()
            self.assertEqual(await self.sinks[0].done, big)
        return defer.ensureDeferred(run())

    def test_after_lose_connection_it_queues_like_transport_write(self) -> defer.Deferred[None]:
        async def run() -> None:
            transport = await self.connect()
            eagerwrite.write(transport, b"one\r\n")
            transport.loseConnection()
            eagerwrite.write(transport, b"two\r\n")  # what transport.write does then: still sent
            self.assertEqual(await self.sinks[0].done, b"one\r\ntwo\r\n")
        return defer.ensureDeferred(run())


class OtherTransports(unittest.TestCase):
    def test_anything_but_plain_tcp_gets_transport_write(self) -> None:
        transport = StringTransport()
        eagerwrite.write(transport, b"+OK\r\n")
        self.assertEqual(transport.value(), b"+OK\r\n")

    def test_a_tls_connection_gets_transport_write(self) -> None:
        from twisted.internet import tcp

        calls: list[bytes] = []
        transport = tcp.Server.__new__(tcp.Server)  # only the attributes write() looks at
        transport.TLS = True
        transport.write = calls.append  # type: ignore[method-assign]
        eagerwrite.write(transport, b"+OK secret\r\n")
        self.assertEqual(calls, [b"+OK secret\r\n"])


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
