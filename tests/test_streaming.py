"""MessageSender against a StringTransport: RETR sends exactly the promised size or stops short.

Reads run inline (the offload is ``maybeDeferred``), so each case is deterministic; the file
changes are modelled by sources that hold other data than the size promised for them.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pop3shield.core.dotstuff import DotStuffer, stuff, wire_size
from pop3shield import streaming
from pop3shield.streaming import CHUNK, INLINE_CHUNKS, MessageSender, PositionalReader, SizeMismatch, WireCount

STATUS = b"+OK 123 octets\r\n"


def inline(function, *args):  # type: ignore[no-untyped-def]
    return defer.maybeDeferred(function, *args)


class Transport(StringTransport):
    """Counts writes and remembers whether a producer was ever registered."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.registered = False

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        self.registered = True
        super().registerProducer(producer, streaming)


class Trickle(io.RawIOBase):
    """A source that returns at most ``step`` octets per read (short reads that are not the end)."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = data
        self.pos = 0
        self.step = step
        self.reads = 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self.reads += 1
        n = min(self.step, size if size >= 0 else self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def readable(self) -> bool:
        return True


def message(size: int) -> bytes:
    """A message of about ``size`` octets with LF line ends and dot lines."""
    line = b".dotted line of text, LF only\n"
    return b"Subject: m\n\n" + line * (size // len(line))


def send(source, expected: int | None, first: bytes | None = None, body_lines: int | None = None):
    transport = Transport()
    sender = MessageSender(transport, source, DotStuffer(body_lines), inline, expected=expected)
    results: list[object] = []
    sender.start(first, prefix=STATUS).addBoth(results.append)
    assert len(results) == 1, "inline reads must finish the message synchronously"
    return transport, results[0]


def test_small_message_of_the_promised_size_is_one_write() -> None:
    data = message(2000)
    source = io.BytesIO(data)
    transport, result = send(source, wire_size(data), first=source.read(CHUNK))
    assert result == len(STATUS + stuff(data))
    assert transport.value() == STATUS + stuff(data)
    assert transport.writes == 1 and not transport.registered
    assert source.closed


def test_short_reads_do_not_end_a_message_early() -> None:
    data = message(300_000)
    source = Trickle(data, 10_000)  # every read is short, none is the end
    transport, result = send(source, wire_size(data))
    assert transport.value() == STATUS + stuff(data)
    assert result == len(transport.value())
    assert source.reads > len(data) // 10_000


def test_short_first_chunk_that_is_not_the_end_still_sends_everything() -> None:
    data = message(5000)
    source = Trickle(data, 1000)
    first = source.read(CHUNK)
    transport, _ = send(source, wire_size(data), first=first)
    assert transport.value() == STATUS + stuff(data)


@pytest.mark.parametrize("actual_size", [3, 2000, 60_000])
def test_small_file_of_another_size_is_refused_before_any_byte(actual_size: int) -> None:
    data = message(actual_size) if actual_size > 100 else b"ab\n"
    promised = wire_size(message(20_000))
    source = io.BytesIO(data)
    transport, result = send(source, promised, first=source.read(CHUNK))
    assert isinstance(result, Failure) and result.check(SizeMismatch)
    assert result.value.before_first_byte
    assert result.value.expected == promised
    assert transport.value() == b""  # not even the status line
    assert source.closed


def test_small_file_longer_than_promised_is_refused_before_any_byte() -> None:
    promised_data = message(1000)
    source = io.BytesIO(message(3000))
    transport, result = send(source, wire_size(promised_data), first=source.read(CHUNK))
    assert isinstance(result, Failure) and result.value.before_first_byte
    assert transport.value() == b""


def test_file_longer_than_promised_mid_stream_stops_before_the_excess() -> None:
    promised_data = message(200_000)
    data = promised_data + b"appended after the open\n" * 5000
    transport, result = send(io.BytesIO(data), wire_size(promised_data))
    assert isinstance(result, Failure) and result.check(SizeMismatch)
    assert not result.value.before_first_byte
    assert result.value.seen > result.value.expected
    full = STATUS + stuff(promised_data)
    # A prefix of what was promised, without the terminator: never an octet more.
    assert full.startswith(transport.value())
    assert len(transport.value()) <= len(full) - len(b".\r\n")


def test_file_shorter_than_promised_mid_stream_is_not_terminated() -> None:
    promised_data = message(300_000)
    data = promised_data[:150_000]  # truncated after the open
    transport, result = send(io.BytesIO(data), wire_size(promised_data))
    assert isinstance(result, Failure) and result.check(SizeMismatch)
    assert not result.value.before_first_byte
    assert result.value.seen == wire_size(data) < result.value.expected
    assert not transport.value().endswith(b".\r\n")
    assert not transport.producer  # unregistered


def test_exact_large_message_ends_with_the_terminator() -> None:
    data = message(500_000)
    transport, result = send(io.BytesIO(data), wire_size(data))
    assert transport.value() == STATUS + stuff(data)
    assert result == len(transport.value())
    assert not transport.producer


def test_top_is_not_bound_by_the_size() -> None:
    data = message(200_000)
    source = io.BytesIO(data)
    transport, result = send(source, None, first=source.read(CHUNK), body_lines=3)
    assert transport.value() == STATUS + stuff(data, 3)


def test_crlf_split_across_chunks_counts_like_wire_size() -> None:
    data = (b"a" * (CHUNK - 1) + b"\r\n") * 3 + b"no final newline"
    count = WireCount()
    for start in range(0, len(data), CHUNK):
        count.add(data[start : start + CHUNK])
    assert count.final == wire_size(data)
    transport, result = send(io.BytesIO(data), wire_size(data))
    assert transport.value() == STATUS + stuff(data)


# -- regular files: chunks read on the reactor when cached, in the thread pool otherwise -------------

#: messages whose awkward spots sit on chunk boundaries, where the fast paths are most likely wrong
AWKWARD = {
    "lf-only": message(300_000),
    "crlf": message(300_000).replace(b"\n", b"\r\n"),
    "crlf-then-lf": message(150_000).replace(b"\n", b"\r\n") + message(150_000),
    "lf-then-crlf": message(150_000) + message(150_000).replace(b"\n", b"\r\n"),
    "cr|lf split, then a dot": b"a" * (CHUNK - 1) + b"\r\n.dot\r\n" + b"b" * CHUNK + b"\r\n",
    "crlf|dot at the boundary": (b"a" * (CHUNK - 2) + b"\r\n") + b".dot\r\n" * 20_000,
    "lf|dot at the boundary": (b"a" * (CHUNK - 1) + b"\n") + b".dot\n" * 20_000,
    "lone cr at the boundary": b"a" * (CHUNK - 1) + b"\r.no stuffing\r\n" * 10_000,
    "bare lf right after the boundary": b"a" * (CHUNK - 1) + b"\r" + b"x\n" * 50_000,
    "no final newline": message(200_000).replace(b"\n", b"\r\n") + b"tail without newline",
    "ends in cr": b"x\r\n" * 70_000 + b"\r",
    "exactly two chunks": (b"y" * 62 + b"\r\n") * (2 * CHUNK // 64),
}


class Offloads:
    """An inline offload (deterministic) that records what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def __call__(self, function, *args):  # type: ignore[no-untyped-def]
        self.calls.append(function)
        return defer.maybeDeferred(function, *args)


def outcome(transport: Transport, result: object) -> tuple[bytes, object]:
    if isinstance(result, Failure):
        value = result.value
        if isinstance(value, SizeMismatch):
            return transport.value(), ("mismatch", value.expected, value.seen, value.before_first_byte)
        return transport.value(), ("failure", type(value))
    return transport.value(), result


def send_file(path: Path, expected: int | None, body_lines: int | None = None, *,
              offload: Offloads | None = None, transport: Transport | None = None) -> tuple[bytes, object]:
    """The Maildir backend's way: opened, first chunk read, then the sender (positional reads)."""
    source = open(path, "rb")  # noqa: SIM115 - the sender closes it
    first = source.read(CHUNK)
    transport = transport or Transport()
    results: list[object] = []
    sender = MessageSender(transport, source, DotStuffer(body_lines), offload or Offloads(), expected=expected)
    sender.start(first, prefix=STATUS).addBoth(results.append)
    assert len(results) == 1
    assert source.closed
    return outcome(transport, results[0])


def send_stream(data: bytes, expected: int | None, body_lines: int | None = None) -> tuple[bytes, object]:
    """The same bytes through the stream path (no descriptor: every read is source.read)."""
    source = io.BytesIO(data)
    transport, result = send(source, expected, first=source.read(CHUNK), body_lines=body_lines)
    return outcome(transport, result)


def promises(data: bytes) -> list[int]:
    size = wire_size(data)
    return [size, size + 1, size - 1, size + 5 * CHUNK, size // 2, 10]


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_cached_file_gives_the_same_bytes_and_outcome_as_the_stream_path(tmp_path: Path, name: str) -> None:
    data = AWKWARD[name]
    path = tmp_path / "m"
    path.write_bytes(data)
    for expected in promises(data):
        assert send_file(path, expected) == send_stream(data, expected), expected
    ok = send_file(path, wire_size(data))
    assert ok == (STATUS + stuff(data), len(STATUS + stuff(data)))
    for lines in (0, 3, 10_000):  # TOP: no promise
        assert send_file(path, None, lines) == send_stream(data, None, lines) == \
            (STATUS + stuff(data, lines), len(STATUS + stuff(data, lines)))


def test_cached_chunks_are_read_inline_a_bounded_number_at_a_time(tmp_path: Path) -> None:
    data = message(CHUNK * 3 * INLINE_CHUNKS)
    path = tmp_path / "m"
    path.write_bytes(data)
    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_WILLNEED)
    transport = Transport()
    offloads = Offloads()
    writes_at_offload: list[int] = []

    def offload(function, *args):  # type: ignore[no-untyped-def]
        writes_at_offload.append(transport.writes)
        return offloads(function, *args)
    got = send_file(path, wire_size(data), offload=offload, transport=transport)  # type: ignore[arg-type]
    assert got == (STATUS + stuff(data), len(STATUS + stuff(data)))
    # a thread-pool read only after INLINE_CHUNKS chunks in a row (the reactor runs in between)
    assert offloads.calls, "a consumer that never pauses still yields now and then"
    assert all(getattr(f, "__self__", None).__class__ is PositionalReader for f in offloads.calls)
    gaps = [b - a for a, b in zip([1, *writes_at_offload], writes_at_offload)]
    assert max(gaps) <= INLINE_CHUNKS + 1
    assert transport.writes > 3 * len(offloads.calls)  # most chunks needed no thread


class FakeNowait:
    """os.preadv with RWF_NOWAIT as an uncached file behaves: EAGAIN, partial reads, or no support."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0
        self.real = os.preadv

    def __call__(self, fd, buffers, offset, flags=0):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.mode == "unsupported":
            raise OSError(errno.EOPNOTSUPP, "not supported")
        if self.mode == "eio":
            raise OSError(errno.EIO, "I/O error")
        if self.mode == "eagain" or (self.mode == "mixed" and self.calls % 3 == 0):
            raise BlockingIOError(errno.EAGAIN, "would block")
        if self.mode in ("partial", "mixed"):
            # a part of what was asked for is cached: 1000 octets, then EAGAIN on the rest
            if self.calls % 2 == 0:
                raise BlockingIOError(errno.EAGAIN, "would block")
            view = buffers[0]
            return self.real(fd, [view[: min(1000, len(view))]], offset)
        return self.real(fd, buffers, offset)


@pytest.mark.parametrize("mode", ["eagain", "partial", "mixed", "unsupported"])
def test_uncached_or_unsupported_reads_go_to_the_thread_pool_with_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    fake = FakeNowait(mode)
    monkeypatch.setattr(streaming.os, "preadv", fake)
    sends = 0
    for name in ("crlf", "cr|lf split, then a dot", "no final newline"):
        data = AWKWARD[name]
        path = tmp_path / "m"
        path.write_bytes(data)
        for expected in promises(data):
            offloads = Offloads()
            assert send_file(path, expected, offload=offloads) == send_stream(data, expected)
            sends += 1
            if expected == wire_size(data):
                assert len(offloads.calls) >= (len(data) - CHUNK) // CHUNK  # every later chunk: a thread
    assert fake.calls
    if mode == "unsupported":
        assert fake.calls <= sends  # tried once per message, then never again


def test_an_inline_read_error_cuts_the_message_like_a_thread_read_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = AWKWARD["crlf"]
    path = tmp_path / "m"
    path.write_bytes(data)
    monkeypatch.setattr(streaming.os, "preadv", FakeNowait("eio"))
    value, result = send_file(path, wire_size(data))
    assert result == ("failure", OSError)
    assert value == STATUS + stuff(data)[: CHUNK + data[:CHUNK].count(b"\n.")]  # the first chunk only
    assert not value.endswith(b".\r\n")


def test_a_file_that_grows_or_shrinks_while_it_is_sent(tmp_path: Path) -> None:
    data = AWKWARD["crlf"]
    path = tmp_path / "m"
    for change in ("append", "truncate"):
        path.write_bytes(data)
        transport = Transport()
        original = transport.write

        def write(chunk: bytes, change=change) -> None:  # type: ignore[no-untyped-def]
            original(chunk)
            if transport.writes == 2:  # another agent changes the file mid-message
                with open(path, "r+b") as fh:
                    if change == "append":
                        fh.seek(0, os.SEEK_END)
                        fh.write(b"appended\r\n" * 10_000)
                    else:
                        fh.truncate(len(data) // 2)
        transport.write = write  # type: ignore[method-assign]
        value, result = send_file(path, wire_size(data), transport=transport)
        assert result[0] == "mismatch" and result[3] is False  # type: ignore[index]
        full = STATUS + stuff(data)
        assert full.startswith(value) and len(value) <= len(full) - 3  # never an octet more, no terminator


class Pausing:
    """A consumer whose buffer fills after ``cap`` octets: it pauses the producer in the write."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data: list[bytes] = []
        self.waiting = 0
        self.producer = None
        self.paused = False
        self.chunks_while_paused = 0

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        if self.paused:
            self.chunks_while_paused += 1
        self.data.append(data)
        self.waiting += len(data)
        if self.waiting > self.cap and not self.paused:
            self.paused = True
            self.producer.pauseProducing()  # type: ignore[union-attr]

    def drain(self) -> None:
        self.waiting = 0
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()


def test_inline_reads_stop_when_the_output_is_full_and_go_on_when_it_drains(tmp_path: Path) -> None:
    data = AWKWARD["crlf-then-lf"] * 4
    path = tmp_path / "m"
    path.write_bytes(data)
    consumer = Pausing(4 * CHUNK)
    source = open(path, "rb")  # noqa: SIM115
    results: list[object] = []
    offloads = Offloads()
    sender = MessageSender(consumer, source, DotStuffer(), offloads, expected=wire_size(data))
    sender.start(source.read(CHUNK), prefix=STATUS).addBoth(results.append)
    drains = 0
    while not results:
        assert consumer.paused  # nothing finished and nothing runs: it waits for the drain
        drains += 1
        consumer.drain()
    assert b"".join(consumer.data) == STATUS + stuff(data)
    assert results == [len(STATUS + stuff(data))]
    assert consumer.chunks_while_paused == 0
    assert drains >= len(data) // (5 * CHUNK)


def test_positional_reader_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    assert PositionalReader.of(io.BytesIO(b"x")) is None
    assert PositionalReader.of(Trickle(b"x", 1)) is None
    r, w = os.pipe()
    try:
        with open(r, "rb", closefd=False) as pipe:
            assert PositionalReader.of(pipe) is None
    finally:
        os.close(r)
        os.close(w)
    path = tmp_path / "m"
    path.write_bytes(b"0123456789" * 10_000)
    with open(path, "rb") as fh:
        fh.read(7)
        reader = PositionalReader.of(fh)
        assert reader is not None and reader.offset == 7
        assert reader.read(5) == b"78901"
        cached = reader.read_cached(10)
        assert cached in (None, b"2345678901")  # None: that kernel has no RWF_NOWAIT for this file
        reader.offset = 99_995
        assert reader.read(10) == b"56789"  # short only at the end
        assert reader.read(10) == b""


def test_a_connection_lost_during_a_thread_read_closes_the_file_when_the_read_returns(tmp_path: Path) -> None:
    """Its descriptor must not be closed (and perhaps reused) under a read still running."""
    data = AWKWARD["crlf"] * 8  # more chunks than go inline in one go
    path = tmp_path / "m"
    path.write_bytes(data)
    pending: list[tuple[defer.Deferred, object]] = []

    def later(function, *args):  # type: ignore[no-untyped-def]
        d: defer.Deferred = defer.Deferred()
        pending.append((d, lambda: function(*args)))
        return d
    source = open(path, "rb")  # noqa: SIM115
    transport = Transport()
    sender = MessageSender(transport, source, DotStuffer(), later, expected=wire_size(data))
    results: list[object] = []
    sender.start(source.read(CHUNK), prefix=STATUS).addBoth(results.append)
    assert not results and len(pending) == 1  # INLINE_CHUNKS cached chunks, then a read in the pool
    sender.stopProducing()  # the client left meanwhile
    assert results and isinstance(results[0], Failure) and results[0].check(ConnectionError)
    assert not source.closed
    d, run = pending.pop()
    d.callback(run())  # type: ignore[operator]
    assert source.closed
    assert not transport.value().endswith(b".\r\n")


def test_top_with_a_promise_counts_the_whole_file(tmp_path: Path) -> None:
    """An encoder that cuts counts less than it is fed: a promise is then checked with WireCount."""
    data = AWKWARD["crlf"]
    path = tmp_path / "m"
    path.write_bytes(data)
    assert send_file(path, wire_size(data), 3) == (STATUS + stuff(data, 3), len(STATUS + stuff(data, 3)))
