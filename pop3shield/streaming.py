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


class SizeMismatch(Exception):
    """The message file holds more or fewer octets than the size line and LIST promised."""

    def __init__(self, expected: int, seen: int, before_first_byte: bool) -> None:
        self.expected = expected
        self.seen = seen
        #: nothing at all (not even the status line) was written: an -ERR can still be sent
        self.before_first_byte = before_first_byte
        how = "more than" if seen > expected else "fewer than"
        super().__init__(f"the message has {how} the {expected} octets promised (at least {seen})")


class WireCount:
    """Counts octets as :func:`~pop3shield.core.dotstuff.wire_size` does, chunk by chunk.

    ``running`` never decreases and never exceeds the final size, so it can be checked
    against a promise before each chunk goes out; ``final`` adds the CRLF the encoder puts
    before the terminator when the data does not end with LF.
    """

    __slots__ = ("running", "_last")

    def __init__(self) -> None:
        self.running = 0
        self._last = b""

    def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        if b"\r" in chunk:
            bare_lf = chunk.count(b"\n") - chunk.count(b"\r\n")
        else:  # LF line ends only: no two-byte count
            bare_lf = chunk.count(b"\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            bare_lf -= 1  # CR | LF split across chunks: that LF was not bare
        self.running += len(chunk) + bare_lf
        self._last = chunk[-1:]

    @property
    def final(self) -> int:
        return self.running + (2 if self.running and self._last != b"\n" else 0)


@implementer(IPushProducer)
class MessageSender:
    """Sends one message (RETR) or its head (TOP); ``start()`` fires when the terminator is written.

    With ``expected`` (RETR: the size LIST and the status line announced), exactly that many
    octets are sent or the Deferred fails with :class:`SizeMismatch` instead of sending the
    terminator: before the first byte if the mismatch shows in the data read so far (the
    caller can still answer ``-ERR``), otherwise once a chunk would go beyond the promise or
    the file ends short of it (the caller must cut the connection). A short read ends the
    message only when it completes the promise; otherwise the file is read again.
    """

    def __init__(
        self,
        consumer: IConsumer,
        source: BinaryIO,
        stuffer: DotStuffer,
        offload: Offload,
        on_progress: Callable[[], None] = lambda: None,
        expected: int | None = None,
    ) -> None:
        self.consumer = consumer
        self.source = source
        self.stuffer = stuffer
        self.offload = offload
        self.on_progress = on_progress
        self.expected = expected
        self.sent = 0
        self._wire = WireCount()
        self._paused = False
        self._reading = False
        self._stopped = False
        self._registered = False
        self._done: defer.Deferred[int] = defer.Deferred()

    def start(self, first_chunk: bytes | None = None, prefix: bytes = b"") -> defer.Deferred[int]:
        """Begin (after ``prefix``, the status line); fires with the number of octets sent.

        A message whose first chunk is all of it (and, for RETR, exactly the promised size)
        goes out in one write, without registering as a producer: most mail is small, and
        that is one write and no producer bookkeeping.
        """
        self._held = prefix
        if first_chunk is not None and len(first_chunk) < CHUNK:
            stuffer = self.stuffer
            out = stuffer.feed(first_chunk)
            end = stuffer.finish()
            if self.expected is None or stuffer.octets == self.expected:
                self._stopped = True
                self._emit(out + end)
                self._close_source()
                self._done.callback(self.sent)
                return self._done
            # not the promised size: the checked path below decides (the file may be growing),
            # with a fresh encoder (only RETR makes a promise, so there is no TOP count to keep)
            self.stuffer = DotStuffer()
        self.consumer.registerProducer(self, True)
        self._registered = True
        if first_chunk is not None:
            self._got(first_chunk)
        else:
            self._read_next()
        return self._done

    #: output not written yet: the status line until the first write, or data held back
    #: while a short file is checked against the promise before anything goes out
    _held = b""

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
        if not data:  # end of file
            if self.expected is not None and self._wire.final != self.expected:
                self._mismatch()
            else:
                self._finish()
            return
        self._wire.add(data)
        if self.expected is not None and self._wire.running > self.expected:
            self._mismatch()
            return
        out = self.stuffer.feed(data)
        if self.stuffer.done:  # TOP has all it wants
            self._emit(out)
            self._finish()
            return
        if len(data) < CHUNK:
            # A short read of a regular file is its end: when it completes the promise (or
            # nothing was promised), finishing now saves a trip to the thread pool.
            if self.expected is None or self._wire.final == self.expected:
                self._emit(out)
                self._finish()
                return
            if self.sent == 0 and len(self._held) < CHUNK:
                # Short of the promise and nothing sent: the next read decides between
                # "more data" and an -ERR before the first byte.
                self._held += out
                out = b""
        if out:
            self._emit(out)
        if not self._paused:
            self._read_next()

    def _emit(self, data: bytes) -> None:
        held, self._held = self._held, b""
        self._write(held + data)

    def _write(self, data: bytes) -> None:
        if data:
            self.sent += len(data)
            self.consumer.write(data)
            self.on_progress()

    def _finish(self) -> None:
        self._stopped = True
        self._emit(self.stuffer.finish())
        self._unregister()
        self._close_source()
        self._done.callback(self.sent)

    def _mismatch(self) -> None:
        """The file is not the promised size: stop without the terminator."""
        self._stopped = True
        self._held = b""
        self._unregister()
        self._close_source()
        self._done.errback(SizeMismatch(self.expected or 0, self._wire.final, before_first_byte=self.sent == 0))

    def _failed(self, failure: Any) -> None:
        """A read error after the status line: the response cannot be completed."""
        self._reading = False
        if self._stopped:
            return
        self._stopped = True
        self._unregister()
        self._close_source()
        self._done.errback(failure)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self.consumer.unregisterProducer()

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
