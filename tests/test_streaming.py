"""MessageSender against a StringTransport: RETR sends exactly the promised size or stops short.

Reads run inline (the offload is ``maybeDeferred``), so each case is deterministic; the file
changes are modelled by sources that hold other data than the size promised for them.
"""

from __future__ import annotations

import io

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from pop3shield.core.dotstuff import DotStuffer, stuff, wire_size
from pop3shield.streaming import CHUNK, MessageSender, SizeMismatch, WireCount

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
