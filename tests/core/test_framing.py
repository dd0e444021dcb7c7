"""LineFramer: splitting, limits, over-long lines, floods and the memory bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core.framing import WINDOW, Line, LineFramer, Overflow, Overlong


def drain(framer: LineFramer) -> list:
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def assert_tail(event: Overlong, content: bytes) -> None:
    """The tail window is the end of the content (the stripped CR may cost it one octet)."""
    assert content.endswith(event.tail)
    assert len(event.tail) >= min(len(content), WINDOW - 1)


def frame(data: bytes, line_limit: int = 255, hard_limit: int = 8192) -> list:
    framer = LineFramer(line_limit, hard_limit)
    framer.feed(data)
    return drain(framer)


# -- plain lines --------------------------------------------------------------------------


def test_crlf_lines() -> None:
    assert frame(b"USER bob\r\nPASS x y\r\n") == [Line(b"USER bob", False), Line(b"PASS x y", False)]


def test_bare_lf_lines() -> None:
    assert frame(b"NOOP\nSTAT\r\n") == [Line(b"NOOP", True), Line(b"STAT", False)]


def test_empty_lines() -> None:
    assert frame(b"\r\n\n") == [Line(b"", False), Line(b"", True)]


def test_line_length_counts_the_terminator() -> None:
    assert Line(b"NOOP", False).length == 6
    assert Line(b"NOOP", True).length == 5


def test_lone_cr_stays_inside_the_line() -> None:
    assert frame(b"NO\rOP\r\n") == [Line(b"NO\rOP", False)]
    assert frame(b"NOOP\r\r\n") == [Line(b"NOOP\r", False)]


def test_partial_line_is_not_an_event() -> None:
    framer = LineFramer(255, 8192)
    framer.feed(b"NOO")
    assert framer.next_event() is None
    assert framer.has_partial
    framer.feed(b"P\r\n")
    assert drain(framer) == [Line(b"NOOP", False)]
    assert not framer.has_partial


def test_byte_by_byte() -> None:
    data = b"USER bob\r\nPASS secret with spaces\r\nSTAT\nLIST 1\r\n"
    framer = LineFramer(255, 8192)
    events = []
    for i in range(len(data)):
        framer.feed(data[i:i + 1])
        events.extend(drain(framer))
    assert events == [Line(b"USER bob", False), Line(b"PASS secret with spaces", False),
                      Line(b"STAT", True), Line(b"LIST 1", False)]
    assert framer.buffered == 0


def test_cr_and_lf_in_separate_chunks() -> None:
    framer = LineFramer(255, 8192)
    framer.feed(b"NOOP\r")
    assert framer.next_event() is None
    framer.feed(b"\n")
    assert drain(framer) == [Line(b"NOOP", False)]


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
@settings(max_examples=150, deadline=None)
def test_chunking_does_not_matter(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    whole = frame(data)
    points = sorted({c % (len(data) + 1) for c in cuts})
    framer = LineFramer(255, 8192)
    events = []
    prev = 0
    for point in points + [len(data)]:
        framer.feed(data[prev:point])
        events.extend(drain(framer))
        prev = point
    assert events == whole


# -- the line limit -----------------------------------------------------------------------


def test_exact_line_limit_with_crlf_passes() -> None:
    content = b"X" * 253
    assert frame(content + b"\r\n", 255) == [Line(content, False)]


def test_exact_line_limit_with_bare_lf_passes() -> None:
    content = b"X" * 254
    assert frame(content + b"\n", 255) == [Line(content, True)]


def test_one_more_octet_is_overlong() -> None:
    content = b"X" * 254
    events = frame(content + b"\r\n", 255)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Overlong)
    assert event.length == 256
    assert event.terminated


def test_one_more_octet_bare_lf_is_overlong() -> None:
    events = frame(b"X" * 255 + b"\n", 255)
    assert [type(e) for e in events] == [Overlong]
    assert events[0].length == 256


@pytest.mark.parametrize("chunk", [1, 7, 254, 255, 256, 10000])
def test_limit_boundary_in_chunks(chunk: int) -> None:
    ok = b"A" * 253 + b"\r\n"
    bad = b"B" * 254 + b"\r\n"
    data = ok + bad + b"NOOP\r\n"
    framer = LineFramer(255, 8192)
    events = []
    for i in range(0, len(data), chunk):
        framer.feed(data[i:i + chunk])
        events.extend(drain(framer))
    assert events[0] == Line(b"A" * 253, False)
    assert isinstance(events[1], Overlong) and events[1].length == 256 and events[1].terminated
    assert events[2] == Line(b"NOOP", False)
    assert len(events) == 3


def test_overlong_windows_and_length() -> None:
    body = bytes(range(32, 127)) * 200  # 19000 octets, no LF
    data = b"PASS " + body + b"\r\n"
    events = frame(data + b"NOOP\r\n", 255, 65536)
    assert len(events) == 2
    event = events[0]
    assert isinstance(event, Overlong)
    assert event.terminated
    assert event.length == len(data)
    assert event.head == data[:WINDOW]
    assert_tail(event, b"PASS " + body)
    assert events[1] == Line(b"NOOP", False)


def test_overlong_windows_byte_by_byte() -> None:
    content = b"USER " + bytes(range(65, 91)) * 300
    data = content + b"\r\n"
    framer = LineFramer(255, 65536)
    events = []
    for i in range(len(data)):
        framer.feed(data[i:i + 1])
        events.extend(drain(framer))
        assert framer.buffered <= 255 + 2 * WINDOW
    assert len(events) == 1
    event = events[0]
    assert event.length == len(data)
    assert_tail(event, content)
    # the head window must not depend on how the line was chunked by TCP
    assert event.head == content[:WINDOW]


def test_short_overlong_windows_hold_the_content_only() -> None:
    """A line just over the limit: both windows hold the content, neither holds the terminator."""
    content = b"X" * 300
    events = frame(content + b"\r\n", 255)
    assert len(events) == 1
    assert events[0].tail == content
    assert events[0].head == content  # the CR is part of the terminator, not of the head


def test_overlong_bare_lf_tail() -> None:
    content = b"Y" * 300
    [event] = frame(content + b"\n", 255)
    assert event.tail == content
    assert event.length == 301


def test_framer_recovers_after_a_terminated_overlong() -> None:
    events = frame(b"Z" * 1000 + b"\r\nNOOP\r\n" + b"W" * 600 + b"\nSTAT\r\n", 255)
    assert [type(e) for e in events] == [Overlong, Line, Overlong, Line]
    assert events[1] == Line(b"NOOP", False)
    assert events[3] == Line(b"STAT", False)


# -- floods ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1000, 4096, 100000])
def test_unterminated_flood_gives_one_overlong_and_nothing_after(chunk: int) -> None:
    framer = LineFramer(255, 8192)
    events = []
    for _ in range(30):
        framer.feed(b"A" * chunk)
        events.extend(drain(framer))
        assert framer.buffered <= 255 + 2 * WINDOW
    framer.feed(b"\r\nNOOP\r\n")
    events.extend(drain(framer))
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Overlong)
    assert event.terminated is False
    assert event.length >= 8192
    assert event.tail == b"A" * WINDOW
    assert framer.buffered == 0
    # the head window is filled whatever the chunk size (a flood arrives in TCP segments)
    assert event.head == b"A" * WINDOW


def test_flood_ends_exactly_at_the_hard_limit() -> None:
    framer = LineFramer(255, 8192)
    framer.feed(b"A" * 8191)
    assert framer.next_event() is None
    framer.feed(b"A")
    [event] = drain(framer)
    assert event == Overlong(b"A" * WINDOW, b"A" * WINDOW, 8192, False)


def test_overflow_when_pending_lines_exceed_the_hard_limit() -> None:
    framer = LineFramer(255, 1000)
    framer.feed(b"NOOP\r\n" * 166)  # 996 octets pending
    assert framer.buffered == 996
    framer.feed(b"NOOP\r\nNOOP\r\n")
    events = drain(framer)
    assert events[:166] == [Line(b"NOOP", False)] * 166
    assert events[166:] == [Overflow(1001)]  # caught as the partial line grows past the cap
    framer.feed(b"STAT\r\n")
    assert framer.next_event() is None


def test_pending_lines_up_to_the_hard_limit_are_fine() -> None:
    framer = LineFramer(255, 1002)
    framer.feed(b"NOOP\r\n" * 167)
    events = drain(framer)
    assert events == [Line(b"NOOP", False)] * 167


def test_consuming_lines_makes_room() -> None:
    framer = LineFramer(255, 1000)
    for _ in range(50):
        framer.feed(b"NOOP\r\n" * 100)
        assert len(drain(framer)) == 100
    assert framer.buffered == 0


def test_constructor_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        LineFramer(2, 100)
    with pytest.raises(ValueError):
        LineFramer(300, 200)


@given(st.lists(st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"NOOP\r\n", b"A" * 3000, b"B" * 9000 + b"\n"]),
), max_size=40), st.booleans())
@settings(max_examples=200, deadline=None)
def test_buffered_never_exceeds_the_limits(chunks: list[bytes], consume: bool) -> None:
    line_limit, hard_limit = 255, 8192
    framer = LineFramer(line_limit, hard_limit)
    for chunk in chunks:
        framer.feed(chunk)
        assert framer.buffered <= hard_limit + max(line_limit, 2 * WINDOW)
        if consume:
            drain(framer)
            assert framer.buffered <= max(line_limit, 2 * WINDOW)
    for event in drain(framer):
        if isinstance(event, Line):
            assert event.length <= line_limit
            assert b"\n" not in event.content
        elif isinstance(event, Overlong):
            assert len(event.head) <= WINDOW and len(event.tail) <= WINDOW
            assert event.length > line_limit


def test_many_pipelined_lines_come_out_in_order_while_more_arrive() -> None:
    """The pending lines are a list read from an index and compacted in batches: order and
    contents survive any mix of taking and feeding."""
    framer = LineFramer(255, 1 << 20)
    sent = [f"NOOP {n}".encode() for n in range(5000)]
    taken: list[bytes] = []
    for start in range(0, len(sent), 700):
        framer.feed(b"".join(line + b"\r\n" for line in sent[start:start + 700]))
        for _ in range(450):  # take fewer than arrived: the backlog grows and is compacted
            event = framer.next_event()
            assert isinstance(event, Line)
            taken.append(event.content)
    while (event := framer.next_event()) is not None:
        taken.append(event.content)
    assert taken == sent
    assert framer.buffered == 0


def test_lines_after_discard_all_are_framed_afresh() -> None:
    """STLS: one line taken, the rest of the read discarded; what comes in TLS is framed from scratch."""
    framer = LineFramer(255, 8192)
    framer.feed(b"STLS\r\nCAPA\r\nUSER x")
    assert framer.next_event() == Line(b"STLS", False)
    assert framer.discard_all() >= len(b"CAPA\r\nUSER x")
    assert framer.next_event() is None
    framer.feed(b"NOOP\r\nQUIT\r\n")
    assert drain(framer) == [Line(b"NOOP", False), Line(b"QUIT", False)]


class LoopOnly(LineFramer):
    """The framer without its one-split path for a read of whole lines: every line through the
    loop of ``feed``, as before that path existed (the reference it must agree with)."""

    def _whole_lines(self, data: bytes) -> int:
        return 0


def take_events(framer: LineFramer, take: int | None) -> list[object]:
    events = []
    while take is None or len(events) < take:
        event = framer.next_event()
        if event is None:
            break
        events.append(event)
    return events


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(st.tuples(st.integers(0, 24), st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b""])), max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=5),
    limits=st.tuples(st.integers(3, 20), st.integers(0, 20), st.integers(0, 60)),
    take=st.sampled_from([None, 0, 1, 3]),
)
def test_the_one_split_path_frames_as_the_loop_does(lines: list[tuple[int, bytes]], cuts: list[int],
                                                     limits: tuple[int, int, int], take: int | None) -> None:
    """Lines at and around partial_cap, hard limits reached within a read, lines left pending
    between reads: the same events, the same octets held, the same state after each read."""
    line_limit, extra_cap, extra_hard = limits
    partial_cap = line_limit + extra_cap
    hard = partial_cap + extra_hard
    stream = b"".join(bytes([65 + n % 26]) * size + end for n, (size, end) in enumerate(lines))
    points = sorted({c for c in cuts if c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)]) if stream[a:b]]
    fast, loop = LineFramer(line_limit, hard, partial_cap), LoopOnly(line_limit, hard, partial_cap)
    for chunk in chunks:
        fast.feed(chunk)
        loop.feed(chunk)
        assert take_events(fast, take) == take_events(loop, take)
        assert (fast.buffered, fast.has_partial, fast._broken) == (loop.buffered, loop.has_partial, loop._broken)
    assert take_events(fast, None) == take_events(loop, None)


def test_a_line_of_exactly_the_partial_cap_in_one_read_is_overlong() -> None:
    for data in (b"A" * 9 + b"\n", b"NOOP\r\n" + b"A" * 9 + b"\n", b"A" * 8 + b"\r\n"):
        fast, loop = LineFramer(5, 100, 9), LoopOnly(5, 100, 9)
        fast.feed(data)
        loop.feed(data)
        assert take_events(fast, None) == take_events(loop, None)
    # past the windows: what is kept of a line one octet over the cap is the windows, as in the loop
    cap = WINDOW + 500
    for data in (b"B" * (cap - 1) + b"\r\n", b"NOOP\r\n" + b"C" * cap + b"\n"):
        fast, loop = LineFramer(255, 4 * cap, cap), LoopOnly(255, 4 * cap, cap)
        fast.feed(data)
        loop.feed(data)
        assert take_events(fast, None) == take_events(loop, None)
    framer = LineFramer(5, 100, 9)
    framer.feed(b"A" * 9 + b"\n")
    assert isinstance(framer.next_event(), Overlong)
    framer.feed(b"A" * 7 + b"\r\n")  # 8 octets before the LF: kept whole, over the line limit
    event = framer.next_event()
    assert isinstance(event, Overlong) and event.length == 9
