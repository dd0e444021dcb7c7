"""Streaming a message to the client: file -> dot-stuffer -> transport, with backpressure.

A push producer: every chunk is read in the thread pool (disk work stays off the reactor), stuffed
and written; when the transport's buffer fills, Twisted pauses us and no more is read until it
drains. A 200 MB message therefore costs one chunk of memory plus the socket buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from pop3shield.core.dotstuff import DotStuffer

CHUNK = 64 * 1024

#: runs a blocking callable somewhere else and returns a Deferred of its result
Offload = Callable[..., defer.Deferred[Any]]


@implementer(IPushProducer)
class MessageSender:
    """Sends one message (RETR) or its head (TOP); ``start()`` fires when the terminator is written."""

    def __init__(
        self,
        consumer: IConsumer,
        source: BinaryIO,
        stuffer: DotStuffer,
        offload: Offload,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.consumer = consumer
        self.source = source
        self.stuffer = stuffer
        self.offload = offload
        self.on_progress = on_progress
        self.sent = 0
        self._paused = False
        self._reading = False
        self._stopped = False
        self._done: defer.Deferred[int] = defer.Deferred()

    def start(self, first_chunk: bytes | None = None) -> defer.Deferred[int]:
        """Register with the consumer and begin; fires with the number of octets sent."""
        self.consumer.registerProducer(self, True)
        if first_chunk is not None:
            self._got(first_chunk)
        else:
            self._read_next()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._reading and not self._stopped:
            self._read_next()

    def stopProducing(self) -> None:
        """The connection is gone: stop reading and fail the Deferred."""
        if self._stopped:
            return
        self._stopped = True
        self._close_source()
        if not self._done.called:
            self._done.errback(ConnectionError("connection lost while sending a message"))

    def _read_next(self) -> None:
        self._reading = True
        d = self.offload(self.source.read, CHUNK)
        d.addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if data:
            self._write(self.stuffer.feed(data))
            # A short read of a regular file is its end (Maildir files never grow once
            # delivered): finishing now saves a trip to the thread pool per message.
            if not self.stuffer.done and len(data) == CHUNK:
                if not self._paused:
                    self._read_next()
                return
        self._finish()

    def _write(self, data: bytes) -> None:
        if data:
            self.sent += len(data)
            self.consumer.write(data)
            self.on_progress()

    def _finish(self) -> None:
        self._stopped = True
        self._write(self.stuffer.finish())
        self.consumer.unregisterProducer()
        self._close_source()
        self._done.callback(self.sent)

    def _failed(self, failure: Any) -> None:
        """A read error after the status line: the response cannot be completed."""
        self._reading = False
        if self._stopped:
            return
        self._stopped = True
        self.consumer.unregisterProducer()
        self._close_source()
        self._done.errback(failure)

    def _close_source(self) -> None:
        try:
            self.source.close()
        except OSError:
            pass
