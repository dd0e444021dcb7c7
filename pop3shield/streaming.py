"""Streaming a message to the client: file -> dot-stuffer -> transport, with backpressure.

A push producer: chunks are read, stuffed and written; when the transport's buffer fills, Twisted
pauses us and no more is read until it drains. A 200 MB message therefore costs one chunk of
memory plus the socket buffer.

Disk reads never block the reactor. A chunk whose pages are already in the page cache (the usual
case: the file was just written, or the kernel's readahead fetched it behind the previous read) is
read on the reactor with ``preadv(..., RWF_NOWAIT)``, which copies only cached data and fails with
EAGAIN instead of waiting for the disk; anything else (EAGAIN, a partial cached read, a kernel or
file system without RWF_NOWAIT, a source that is not a regular file) is read in the thread pool as
before. The inline reads stop after :data:`INLINE_CHUNKS` chunks in one go, so a consumer that
never pauses still lets the reactor run every so often.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3shield.core.dotstuff import DotStuffer

CHUNK = 64 * 1024
#: chunks read on the reactor in a row before a read goes to the thread pool (which yields)
INLINE_CHUNKS = 16
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
#: preadv flags or the flag itself not supported here: read in the thread pool from now on
_NOWAIT_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})

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


class PositionalReader:
    """Reads a regular file's chunks at an offset of its own, in two ways.

    :meth:`read_cached` runs on the reactor: it returns a chunk only when all of it (or all up to
    the end of the file) is in the page cache, else None, and never waits for the disk.
    :meth:`read` is the blocking read for the thread pool. Both return what a blocking
    ``read(size)`` of the file would: ``size`` octets, fewer only at the end of the file.
    """

    __slots__ = ("fd", "offset", "nowait")

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset
        #: preadv with RWF_NOWAIT works here (until the kernel says it does not)
        self.nowait = _RWF_NOWAIT is not None

    @classmethod
    def of(cls, source: Any) -> PositionalReader | None:
        """A reader at ``source``'s position, if it is a regular file with a descriptor (else None)."""
        try:
            fd = source.fileno()
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return cls(fd, source.tell())
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
            return None

    def read_cached(self, size: int) -> bytes | None:
        """The next chunk if it can be read without blocking, else None (nothing is consumed)."""
        if not self.nowait:
            return None
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        try:
            while got < size:
                n = os.preadv(self.fd, [view[got:]], self.offset + got, _RWF_NOWAIT)
                if n == 0:
                    break  # the end of the file
                got += n
        except BlockingIOError:
            return None  # not (all) in the page cache: the thread pool reads the chunk
        except OSError as exc:
            if exc.errno not in _NOWAIT_UNSUPPORTED:
                raise
            self.nowait = False
            return None
        finally:
            view.release()
        self.offset += got
        return bytes(buf) if got == size else bytes(buf[:got])

    def read(self, size: int) -> bytes:
        """The next chunk (BLOCKING: in the thread pool)."""
        parts = []
        got = 0
        while got < size:
            part = os.pread(self.fd, size - got, self.offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        self.offset += got
        return parts[0] if len(parts) == 1 else b"".join(parts)


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
        # RETR's promise is checked against the encoder's own count (the octets it has emitted,
        # normalised, before stuffing: what WireCount would count, without a second pass); an
        # encoder that cuts (TOP) counts less than it was fed, so a promise then needs WireCount
        self._wire = WireCount() if expected is not None and not stuffer.whole else None
        self._reader: PositionalReader | None = None
        self._positional = True  # not yet known: decided at the first read after the first chunk
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
        if first_chunk is None or self._consume(first_chunk):
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
        """Read and send chunks while they are in the page cache and we are not paused (at most
        :data:`INLINE_CHUNKS`), then, if more is wanted, read the next one in the thread pool."""
        self._reading = True  # no second read loop from a resumeProducing during a write
        reader = self._positional_reader()
        if reader is not None:
            for _ in range(INLINE_CHUNKS):
                try:
                    data = reader.read_cached(CHUNK)
                except OSError:
                    self._failed(Failure())
                    return
                if data is None:
                    break
                if not self._consume(data):
                    self._reading = False
                    return
        self._in_thread = True
        d = self.offload(self.source.read if reader is None else reader.read, CHUNK)
        d.addCallbacks(self._got, self._failed)

    def _positional_reader(self) -> PositionalReader | None:
        if self._positional and self._reader is None:
            self._reader = PositionalReader.of(self.source)
            self._positional = self._reader is not None
        return self._reader

    #: a read runs in the thread pool: the file is closed when it returns, not under it (its
    #: descriptor could be reused by then)
    _in_thread = False
    _close_when_read = False

    def _got(self, data: bytes) -> None:
        """A chunk read in the thread pool."""
        self._thread_read_over()
        if self._consume(data):
            self._read_next()
        else:
            self._reading = False

    def _consume(self, data: bytes) -> bool:
        """Send one chunk (b"": the end of the file); True if the next one should be read now."""
        if self._stopped:
            return False
        stuffer = self.stuffer
        expected = self.expected
        if not data:  # end of file
            if expected is not None and self._final() != expected:
                self._mismatch()
            else:
                self._finish()
            return False
        wire = self._wire
        if wire is not None:
            wire.add(data)
            if wire.running > expected:  # type: ignore[operator]
                self._mismatch()
                return False
        out = stuffer.feed(data)
        if expected is not None and wire is None and stuffer.octets > expected:
            self._mismatch()  # nothing of this chunk goes out
            return False
        if stuffer.done:  # TOP has all it wants
            self._emit(out)
            self._finish()
            return False
        if len(data) < CHUNK:
            # A short read of a regular file is its end: when it completes the promise (or
            # nothing was promised), finishing now saves a read.
            if expected is None or self._final() == expected:
                self._emit(out)
                self._finish()
                return False
            if self.sent == 0 and len(self._held) < CHUNK:
                # Short of the promise and nothing sent: the next read decides between
                # "more data" and an -ERR before the first byte.
                self._held += out
                out = b""
        if out:
            self._emit(out)
        return not self._paused and not self._stopped

    def _final(self) -> int:
        """The size of the message read so far, as LIST counts it."""
        return self.stuffer.final_octets if self._wire is None else self._wire.final

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
        self._done.errback(SizeMismatch(self.expected or 0, self._final(), before_first_byte=self.sent == 0))

    def _thread_read_over(self) -> None:
        if self._in_thread:
            self._in_thread = False
            if self._close_when_read:
                self._close_source()

    def _failed(self, failure: Any) -> None:
        """A read error after the status line: the response cannot be completed."""
        self._thread_read_over()
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
        if self._in_thread:
            self._close_when_read = True
            return
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
