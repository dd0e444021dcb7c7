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

    def start(self, first_chunk: bytes | None = None, prefix: bytes = b"") -> defer.Deferred[int]:
        """Begin (after ``prefix``, the status line); fires with the number of octets sent.

        A message whose first chunk is all of it goes out in one write, without registering as
        a producer: most mail is small, and that is one write and no producer bookkeeping.
        """
        self._prefix = prefix
        if first_chunk is not None and len(first_chunk) < CHUNK:
            self._stopped = True
            self._write(prefix + self.stuffer.feed(first_chunk) + self.stuffer.finish())
            self._close_source()
            self._done.callback(self.sent)
            return self._done
        self.consumer.registerProducer(self, True)
        if first_chunk is not None:
            self._got(first_chunk)
        else:
            self._read_next()
        return self._done

    _prefix = b""

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
            prefix, self._prefix = self._prefix, b""
            self._write(prefix + self.stuffer.feed(data))
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
        prefix, self._prefix = self._prefix, b""
        self._write(prefix + self.stuffer.finish())
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


def open_and_read(maildrop: Any, key: Any) -> tuple[BinaryIO, bytes]:
    """Open a message and read its first chunk in one trip to the thread pool (BLOCKING)."""
    source = maildrop.open_message(key)
    try:
        return source, source.read(CHUNK)
    except BaseException:
        source.close()
        raise


class Prefetch:
    """At most one message opened ahead of the client's next RETR or TOP.

    Clients walk the maildrop in order (fetchmail, getmail, mpop, poplib loops), so while one
    message goes out the next one is opened and its first chunk read in the thread pool. The
    next request then starts without waiting for a thread: one chunk of memory buys the latency
    of a thread round trip per message.
    """

    def __init__(self, offload: Offload, maildrop: Any) -> None:
        self.offload = offload
        self.maildrop = maildrop
        self._key: Any = None
        self._opening: defer.Deferred[Any] | None = None

    def take(self, key: Any) -> defer.Deferred[Any]:
        """``(source, first_chunk)`` for ``key``: the prefetched one, or a fresh open."""
        if self._opening is not None and self._key == key:
            opening, self._opening, self._key = self._opening, None, None
            return opening
        self.discard()
        return self.offload(open_and_read, self.maildrop, key)

    def start(self, key: Any) -> None:
        """Open ``key`` ahead of time (replacing any earlier prefetch)."""
        self.discard()
        if key is not None:
            self._key = key
            self._opening = self.offload(open_and_read, self.maildrop, key)

    def discard(self) -> None:
        """Drop the prefetch; its file is closed whenever the open completes."""
        if self._opening is not None:
            self._opening.addCallbacks(lambda opened: opened[0].close(), lambda failure: None)
            self._opening = None
            self._key = None
