"""The sans-I/O reader of upstream responses (pop3shield.core.upstream)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core.dotstuff import stuff
from pop3shield.core.upstream import (
    MAX_STATUS,
    Body,
    Continuation,
    Discarded,
    End,
    Expect,
    Kind,
    Problem,
    Refused,
    Status,
    UpstreamReader,
    parse_capabilities,
)


def read(data: bytes, *expects: Expect | Kind, max_line: int = 1000, cuts: list[int] | None = None):
    reader = UpstreamReader(max_line=max_line)
    for e in expects or (Kind.SINGLE,):
        reader.expect(e)
    events = []
    prev = 0
    for cut in sorted(cuts or []) + [len(data)]:
        events += reader.feed(data[prev:cut])
        prev = cut
    return reader, events


def merged(events):
    """Adjacent Body events joined: the view a consumer has of the stream."""
    out = []
    for e in events:
        if isinstance(e, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + e.data)
        else:
            out.append(e)
    return out


def test_greeting_and_codes() -> None:
    _, events = read(b"+OK Dovecot ready.\r\n")
    assert events == [Status(True, None, b"Dovecot ready.", b"+OK Dovecot ready.\r\n")]
    _, events = read(b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n")
    assert events[0].ok is False and events[0].code == "IN-USE"
    assert events[0].text == b"Mailbox is locked by another POP3 session."
    _, events = read(b"-ERR [sys/temp] later\r\n")
    assert events[0].code == "SYS/TEMP"
    _, events = read(b"-ERR\r\n")
    assert events == [Status(False, None, b"", b"-ERR\r\n")]
    _, events = read(b"+OK\r\n")
    assert events[0].ok


def test_multi_line_body_passes_through_stuffed() -> None:
    message = b"Subject: x\r\n\r\n.hidden\r\n..two\r\nend\r\n"
    wire = stuff(message)
    _, events = read(b"+OK 41 octets\r\n" + wire, Expect(Kind.MULTI, exact_octets=len(message)))
    events = merged(events)
    assert events[0].ok
    assert events[1] == Body(wire[:-3])
    assert events[2] == End(len(message), 5)
    assert len(events) == 3


def test_multi_line_error_has_no_body() -> None:
    _, events = read(b"-ERR no such message\r\n+OK\r\n", Kind.MULTI, Kind.SINGLE)
    assert [type(e) for e in events] == [Status, Status]


def test_empty_body_and_pipelined_responses() -> None:
    data = b"+OK\r\n.\r\n+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n+OK bye\r\n"
    _, events = read(data, Kind.MULTI, Expect(Kind.MULTI, max_lines=2), Kind.SINGLE)
    assert events[1] == End(0, 0)
    assert events[3] == Body(b"1 10\r\n2 20\r\n")
    assert events[4] == End(12, 2)
    assert events[5].text == b"bye"


def test_unsolicited_bytes_are_refused() -> None:
    reader, events = read(b"+OK hi\r\n+OK again\r\n", Kind.SINGLE)
    assert events[-1] == Refused(Problem.UNSOLICITED, repr(b"+OK again\r\n"))
    assert reader.feed(b"+OK\r\n") == []
    assert UpstreamReader().feed(b"+OK\r\n") == [Refused(Problem.UNSOLICITED, repr(b"+OK\r\n"))]


def test_status_line_bound() -> None:
    line = b"+OK " + b"x" * (MAX_STATUS - 6) + b"\r\n"
    assert len(line) == MAX_STATUS
    _, events = read(line)
    assert isinstance(events[0], Status)
    _, events = read(b"+OK " + b"x" * (MAX_STATUS - 5) + b"\r\n")
    assert events == [Refused(Problem.STATUS_TOO_LONG, f"{MAX_STATUS + 1} octets")]
    # never collected past the bound: 10 MB without a line end is refused at 512 octets
    reader = UpstreamReader()
    reader.expect()
    assert reader.feed(b"+OK ") == []
    events = reader.feed(b"x" * 10_000_000)
    assert events[0].problem is Problem.STATUS_TOO_LONG
    assert reader.buffered == 0


def test_malformed_status_and_controls() -> None:
    assert read(b"* OK IMAP\r\n")[1][0].problem is Problem.MALFORMED_STATUS
    assert read(b"+OKAY\r\n")[1][0].problem is Problem.MALFORMED_STATUS
    assert read(b"+ go on\r\n")[1][0].problem is Problem.MALFORMED_STATUS  # only during AUTH
    assert read(b"+OK a\0b\r\n")[1][0].problem is Problem.NUL
    assert read(b"+OK a\rb\r\n")[1][0].problem is Problem.BARE_CR
    assert read(b"+OK ab\n")[1][0].problem is Problem.BARE_LF


def test_sasl_continuations() -> None:
    reader, events = read(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n", Kind.SASL)
    assert events == [Continuation(b"eyJzdGF0dXMiOiI0MDEifQ==")]
    assert reader.due == 1
    assert reader.feed(b"+ \r\n") == [Continuation(b"")]
    events = reader.feed(b"-ERR [AUTH] Authentication failed.\r\n")
    assert events[0].code == "AUTH" and reader.due == 0


def test_body_controls_refused() -> None:
    head = b"+OK\r\n"
    assert read(head + b"a\0b\r\n.\r\n", Kind.MULTI)[1][-1].problem is Problem.NUL
    assert read(head + b"a\rb\r\n.\r\n", Kind.MULTI)[1][-1].problem is Problem.BARE_CR
    assert read(head + b"ab\n.\r\n", Kind.MULTI)[1][-1].problem is Problem.BARE_LF
    assert read(head + b".x\r\n.\r\n", Kind.MULTI)[1][-1].problem is Problem.UNSTUFFED_DOT
    assert read(head + b"a\r\n.\r\r\n", Kind.MULTI)[1][-1].problem in (Problem.BARE_CR, Problem.UNSTUFFED_DOT)
    # a CR at the end of a piece followed by something else than LF
    assert read(head + b"ab\rc\r\n.\r\n", Kind.MULTI, cuts=[8])[1][-1].problem is Problem.BARE_CR


def test_body_line_bound() -> None:
    ok = b"+OK\r\n" + b"y" * 1000 + b"\r\n.\r\n"
    assert isinstance(read(ok, Kind.MULTI, max_line=1000)[1][-1], End)
    long = b"+OK\r\n" + b"y" * 1001 + b"\r\n.\r\n"
    assert read(long, Kind.MULTI, max_line=1000)[1][-1].problem is Problem.LINE_TOO_LONG
    # a 10 MB line, fed in 64 KiB pieces, is refused once it passes the bound, not buffered
    reader = UpstreamReader(max_line=65536)
    reader.expect(Kind.MULTI)
    events = reader.feed(b"+OK\r\n")
    piece = b"z" * 65536
    for _ in range(160):
        events += reader.feed(piece)
        assert reader.buffered <= 2
        if reader.failed:
            break
    assert reader.failed == Refused(Problem.LINE_TOO_LONG, "bound 65536")
    assert sum(len(e.data) for e in events if isinstance(e, Body)) <= 65536


def test_bounds_from_the_listing() -> None:
    # RETR: the listed size is exact, and nothing past it is passed on
    message = b"a\r\nb\r\n"
    wire = b"+OK\r\n" + stuff(message)
    reader, events = read(wire, Expect(Kind.MULTI, exact_octets=6))
    assert isinstance(events[-1], End)
    _, events = read(wire, Expect(Kind.MULTI, exact_octets=5))
    assert events[-1].problem is Problem.SIZE_MISMATCH
    assert not any(isinstance(e, Body) for e in events)  # refused before the piece went out
    _, events = read(wire, Expect(Kind.MULTI, exact_octets=7))
    assert events[-1].problem is Problem.SIZE_MISMATCH  # short: ended without End
    assert not any(isinstance(e, End) for e in events)
    # final_crlf: two more octets (an added last line end) are accepted, one or three are not
    message = b"a\r\nb"
    wire = b"+OK\r\n" + stuff(message)  # the stuffer adds the CRLF, as Dovecot does
    assert isinstance(read(wire, Expect(Kind.MULTI, exact_octets=4, final_crlf=True))[1][-1], End)
    assert read(wire, Expect(Kind.MULTI, exact_octets=4))[1][-1].problem is Problem.SIZE_MISMATCH
    for listed in (3, 5):
        last = read(wire, Expect(Kind.MULTI, exact_octets=listed, final_crlf=True))[1][-1]
        assert last.problem is Problem.SIZE_MISMATCH
    # stuffing does not count: ".." lines are one octet shorter after un-stuffing
    message = b".\r\n..\r\n"
    _, events = read(b"+OK\r\n" + stuff(message), Expect(Kind.MULTI, exact_octets=len(message)))
    assert events[-1] == End(len(message), 2)
    # LIST/UIDL: no more lines than messages
    _, events = read(b"+OK\r\n1 10\r\n2 20\r\n.\r\n", Expect(Kind.MULTI, max_lines=1))
    assert events[-1].problem is Problem.TOO_LONG
    _, events = read(b"+OK\r\n" + b"x" * 50 + b"\r\n", Expect(Kind.MULTI, max_octets=40))
    assert events[-1].problem is Problem.TOO_LONG


def test_listing_bound_by_a_pipelined_stat() -> None:
    per = Expect(Kind.MULTI, per_message=20)
    data = b"+OK 2 30\r\n+OK\r\n1 10\r\n2 20\r\n.\r\n+OK\r\n1 a\r\n2 b\r\n.\r\n"
    reader, events = read(data, Expect(counts=True), per, per)
    assert reader.count == 2 and [type(e) for e in events].count(End) == 2
    # a LIST longer than STAT said, whatever the split
    data = b"+OK 1 10\r\n+OK\r\n1 10\r\n2 20\r\n.\r\n"
    for cuts in ([], list(range(len(data)))):
        assert read(data, Expect(counts=True), per, cuts=cuts)[1][-1].problem is Problem.TOO_LONG
    # STAT refused or unreadable: no listing line is allowed at all
    for stat in (b"-ERR no\r\n", b"+OK lots\r\n", b"+OK 99999999999 1\r\n", b"+OK 1000001 1\r\n"):
        _, events = read(stat + b"+OK\r\n1 10\r\n.\r\n", Expect(counts=True), per)
        assert events[-1].problem is Problem.TOO_LONG


def test_never_ending_response_is_bounded() -> None:
    reader = UpstreamReader()
    reader.expect(Expect(Kind.MULTI, max_lines=3))
    reader.feed(b"+OK\r\n")
    events = []
    for _ in range(10):
        events += reader.feed(b"1 1\r\n")
    assert reader.failed is not None and reader.failed.problem is Problem.TOO_LONG


def test_discard_after_stls() -> None:
    reader, events = read(b"+OK Begin TLS negotiation now.\r\n-ERR injected\r\n",
                          Expect(Kind.SINGLE, discard_after=True))
    assert events[0].ok and events[1] == Discarded(15)
    assert reader.failed is None and reader.due == 0


def test_capabilities() -> None:
    caps = parse_capabilities(b"CAPA\r\nTOP\r\nSASL PLAIN LOGIN\r\nXCLIENT\r\npipelining\r\n")
    assert caps["SASL"] == ("PLAIN", "LOGIN")
    assert "PIPELINING" in caps and "XCLIENT" in caps


# -- chunking invariance --------------------------------------------------------------

line_bytes = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"").replace(b"\0", b""))
dotted = st.sampled_from([b"", b".", b"..", b".\r\n", b"x"])


@st.composite
def upstream_streams(draw):
    """A sequence of responses (some broken on purpose) and what the shell expects."""
    parts, expects = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([Kind.SINGLE, Kind.MULTI, Kind.SASL]))
        if kind is Kind.SASL and draw(st.booleans()):
            parts.append(b"+ " + draw(line_bytes) + b"\r\n")
        ok = draw(st.booleans())
        parts.append((b"+OK " if ok else b"-ERR ") + draw(line_bytes) + b"\r\n")
        bound = None
        if kind is Kind.MULTI and ok:
            lines = draw(st.lists(st.tuples(dotted, line_bytes), max_size=6))
            message = b"".join(d.replace(b"\r\n", b"") + t + b"\r\n" for d, t in lines)
            parts.append(stuff(message))
            bound = draw(st.sampled_from([None, len(message), max(0, len(message) - 1)]))
        expects.append(Expect(kind, exact_octets=bound))
    data = b"".join(parts)
    if draw(st.booleans()):  # break it somewhere
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.sampled_from([b"\0", b"\r", b"\n", b".x", b"+OK\r\n"])) + data[pos:]
    return data, expects


@settings(max_examples=150, deadline=None)
@given(upstream_streams(), st.lists(st.integers(0, 400), max_size=8))
def test_any_split_gives_the_same_events(stream, cuts) -> None:
    """Identical events for any split; after a refusal only how much body went out may differ."""
    data, expects = stream
    runs = [merged(read(data, *expects, max_line=8, cuts=c)[1])
            for c in ([], list(range(len(data))), [c for c in cuts if c <= len(data)])]
    refused = [isinstance(r[-1], Refused) if r else False for r in runs]
    assert len(set(refused)) == 1
    if not refused[0]:
        assert runs[0] == runs[1] == runs[2]
        return
    shapes = [[type(e) if isinstance(e, Body) else e for e in r] for r in runs]
    # (which problem is named may differ when the input has several: the first piece that shows one)
    for shape, run in zip(shapes, runs):
        # the same events up to the last complete response; the refused one at most passed
        # body that the whole-input run would also have passed had it been split there
        done = [e for e in shape if e is not Body]
        assert done[:-1] == [e for e in shapes[1] if e is not Body][:-1]
        body = b"".join(e.data for e in run if isinstance(e, Body))
        assert body == b"".join(e.data for e in runs[1] if isinstance(e, Body))[: len(body)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(dotted, line_bytes), max_size=8), st.lists(st.integers(0, 200), max_size=6))
def test_bodies_round_trip(lines, cuts) -> None:
    message = b"".join(d.replace(b"\r\n", b"") + t + b"\r\n" for d, t in lines)
    wire = stuff(message)
    reader, events = read(b"+OK\r\n" + wire, Expect(Kind.MULTI, exact_octets=len(message)),
                          cuts=[c for c in cuts if c <= len(wire) + 5])
    assert reader.failed is None
    assert b"".join(e.data for e in events if isinstance(e, Body)) + b".\r\n" == wire
    assert events[-1] == End(len(message), message.count(b"\r\n"))
    assert reader.buffered == 0
