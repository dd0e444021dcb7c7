"""Tests for the streaming RFC 1939 dot-stuffer.

The property tests compare against a deliberately naive byte-by-byte
reference model written here, so the fast bytes.replace-based encoder is
checked against an independent statement of the rules.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core.dotstuff import DotStuffer, stuff, unstuff, wire_size, wire_size_chunks


# -- reference model ---------------------------------------------------------


def ref_normalise(data: bytes) -> bytes:
    """Bare LF -> CRLF, lone CR kept, CRLF appended if non-empty and not ending in LF."""
    out = bytearray()
    prev = None
    for byte in data:
        if byte == 0x0A and prev != 0x0D:
            out += b"\r"
        out.append(byte)
        prev = byte
    if data and not data.endswith(b"\n"):
        out += b"\r\n"
    return bytes(out)


def ref_lines(data: bytes) -> list[bytes]:
    """Lines of the normalised message, without their CRLF."""
    norm = ref_normalise(data)
    return norm.split(b"\r\n")[:-1] if norm else []


def ref_top(data: bytes, body_lines: int | None) -> list[bytes]:
    lines = ref_lines(data)
    if body_lines is None:
        return lines
    if b"" not in lines:
        return lines
    blank = lines.index(b"")
    return lines[: blank + 1 + body_lines]


def ref_stuff(data: bytes, body_lines: int | None = None) -> bytes:
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in ref_top(data, body_lines))
    return out + b".\r\n"


def encode_chunked(data: bytes, cuts: list[int], body_lines: int | None = None) -> bytes:
    enc = DotStuffer(body_lines)
    out = []
    prev = 0
    for cut in sorted(cuts) + [len(data)]:
        out.append(enc.feed(data[prev:cut]))
        prev = cut
    out.append(enc.finish())
    return b"".join(out)


# -- byte-exact examples -------------------------------------------------------

EXAMPLES = [
    (b"", b".\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b"..", b"...\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b".\n", b"..\r\n.\r\n"),
    (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    (b"\n", b"\r\n.\r\n"),
    (b"no newline", b"no newline\r\n.\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"mixed\r\nlf\nend", b"mixed\r\nlf\r\nend\r\n.\r\n"),
    (b"lone\rcr\n", b"lone\rcr\r\n.\r\n"),
    (b"a\r.b\n", b"a\r.b\r\n.\r\n"),  # '.' after a lone CR is not at a line start
    (b"ends in cr\r", b"ends in cr\r\r\n.\r\n"),
    (b"a\r\r\nb", b"a\r\r\nb\r\n.\r\n"),
    (b"\r", b"\r\r\n.\r\n"),
    (b"x\n..\n...\n", b"x\r\n...\r\n....\r\n.\r\n"),
    (b".\n.\n.", b"..\r\n..\r\n..\r\n.\r\n"),
]


@pytest.mark.parametrize(("raw", "wire"), EXAMPLES)
def test_examples(raw: bytes, wire: bytes) -> None:
    assert stuff(raw) == wire
    assert unstuff(wire) == ref_normalise(raw)
    assert wire_size(raw) == len(unstuff(wire))


@pytest.mark.parametrize(("raw", "wire"), EXAMPLES)
def test_examples_byte_by_byte(raw: bytes, wire: bytes) -> None:
    assert encode_chunked(raw, list(range(1, len(raw)))) == wire


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n"),  # split between CR and LF, dot follows
        ([b"a\n", b".b"], b"a\r\n..b\r\n.\r\n"),  # split right after LF
        ([b"a\r", b".b"], b"a\r.b\r\n.\r\n"),  # lone CR then dot: no stuffing
        ([b"a\r", b"\r\n"], b"a\r\r\n.\r\n"),
        ([b"a\r", b"", b"\n"], b"a\r\n.\r\n"),  # empty chunk keeps the state
        ([b"", b".", b""], b"..\r\n.\r\n"),
        ([b"a\r\n", b"."], b"a\r\n..\r\n.\r\n"),
    ],
)
def test_chunk_boundaries(chunks: list[bytes], wire: bytes) -> None:
    enc = DotStuffer()
    out = b"".join(enc.feed(c) for c in chunks) + enc.finish()
    assert out == wire


def test_crlf_chunk_is_not_copied_needlessly() -> None:
    chunk = b"a\r\nb\r\n"
    assert DotStuffer().feed(chunk) == chunk


def test_feed_accepts_bytearray_and_memoryview() -> None:
    enc = DotStuffer()
    out = enc.feed(bytearray(b".a\n")) + enc.feed(memoryview(b".b")) + enc.finish()
    assert out == b"..a\r\n..b\r\n.\r\n"


def test_misuse_raises() -> None:
    enc = DotStuffer()
    enc.finish()
    assert enc.done
    with pytest.raises(RuntimeError):
        enc.feed(b"x")
    with pytest.raises(RuntimeError):
        enc.finish()
    with pytest.raises(ValueError):
        DotStuffer(-1)


def test_retr_is_never_done_before_finish() -> None:
    enc = DotStuffer()
    enc.feed(b"a: b\n\nbody\n")
    assert not enc.done


# -- TOP -------------------------------------------------------------------

MSG = b"From: a\nSubject: .dot\n\n.body1\nbody2\nbody3\n"


@pytest.mark.parametrize(
    ("n", "wire"),
    [
        (0, b"From: a\r\nSubject: .dot\r\n\r\n.\r\n"),
        (1, b"From: a\r\nSubject: .dot\r\n\r\n..body1\r\n.\r\n"),
        (2, b"From: a\r\nSubject: .dot\r\n\r\n..body1\r\nbody2\r\n.\r\n"),
        (3, b"From: a\r\nSubject: .dot\r\n\r\n..body1\r\nbody2\r\nbody3\r\n.\r\n"),
        (100, b"From: a\r\nSubject: .dot\r\n\r\n..body1\r\nbody2\r\nbody3\r\n.\r\n"),
    ],
)
def test_top(n: int, wire: bytes) -> None:
    assert stuff(MSG, n) == wire
    assert encode_chunked(MSG, list(range(1, len(MSG))), n) == wire


def test_top_marks_done_and_ignores_rest() -> None:
    enc = DotStuffer(1)
    first = enc.feed(b"H: v\r\n\r\nline1\r\nline2\r\n")
    assert first == b"H: v\r\n\r\nline1\r\n"
    assert enc.done
    assert enc.feed(b"more\r\n") == b""
    assert enc.finish() == b".\r\n"


def test_top_zero_done_as_soon_as_headers_end() -> None:
    enc = DotStuffer(0)
    assert enc.feed(b"H: v\n") == b"H: v\r\n"
    assert not enc.done
    assert enc.feed(b"\nbody") == b"\r\n"
    assert enc.done


def test_top_without_blank_line_is_all_headers() -> None:
    raw = b"H1: a\nH2: b\n.H3"
    assert stuff(raw, 0) == b"H1: a\r\nH2: b\r\n..H3\r\n.\r\n"
    assert stuff(raw, 5) == stuff(raw)


def test_top_blank_line_split_across_chunks() -> None:
    raw = b"H: v\r\n\r\nbody\r\n"
    for i in range(len(raw) + 1):
        assert encode_chunked(raw, [i], 0) == b"H: v\r\n\r\n.\r\n"


def test_top_message_starting_with_blank_line() -> None:
    assert stuff(b"\nbody\nmore\n", 1) == b"\r\nbody\r\n.\r\n"
    assert stuff(b"\r\nbody", 0) == b"\r\n.\r\n"


def test_top_lone_cr_is_not_a_blank_line() -> None:
    # "H\r\r\n" is the line "H\r", not an empty line.
    assert stuff(b"H\r\r\nX\n\nbody\n", 0) == b"H\r\r\nX\r\n\r\n.\r\n"


def test_top_last_body_line_without_newline() -> None:
    assert stuff(b"H: v\n\nonly", 3) == b"H: v\r\n\r\nonly\r\n.\r\n"


# -- unstuff -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"abc",
        b"abc\r\n",
        b"abc\r\n.\r\n.",
        b"abc.\r\n",  # terminator not at a line start
        b".x\r\n.\r\n",  # unstuffed dot on the first line
        b"a\r\n.x\r\n.\r\n",  # unstuffed dot on a later line
        b"a\r\n.\r\nb\r\n.\r\n",  # early terminator
        b"a\nb\r\n.\r\n",  # bare LF
        b".\r\n.\r\n",
    ],
)
def test_unstuff_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(ValueError):
        unstuff(bad)


def test_unstuff_examples() -> None:
    assert unstuff(b".\r\n") == b""
    assert unstuff(b"...\r\n.\r\n") == b"..\r\n"
    assert unstuff(b"a\r\n...b\r\n.\r\n") == b"a\r\n..b\r\n"
    assert unstuff(b"a\rb\r\n.\r\n") == b"a\rb\r\n"


# -- wire_size ---------------------------------------------------------------


def test_wire_size_examples() -> None:
    assert wire_size(b"") == 0
    assert wire_size(b"a") == 3
    assert wire_size(b"a\n") == 3
    assert wire_size(b"a\r\n") == 3
    assert wire_size(b"a\r") == 4
    assert wire_size(b"\n\n") == 4
    assert wire_size(b".\n") == 3  # stuffing dots are not counted


def test_wire_size_chunks_cr_lf_split() -> None:
    assert wire_size_chunks([b"a\r", b"\nb\n"]) == wire_size(b"a\r\nb\n")
    assert wire_size_chunks([b"a\r", b"", b"\n"]) == 3
    assert wire_size_chunks([]) == 0


# -- properties ---------------------------------------------------------------

# Bias towards the bytes that matter so edge cases come up often.
interesting = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\n.", b"\r\n.", b"..", b"\n\n", b"\r\n\r\n"]),
    max_size=40,
).map(b"".join)
messages = st.one_of(interesting, st.binary(max_size=200))


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = draw(messages)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12))
    return data, cuts


body_lines = st.one_of(st.none(), st.integers(min_value=0, max_value=6))


@settings(max_examples=400)
@given(chunked(), body_lines)
def test_matches_reference_for_any_chunking(case: tuple[bytes, list[int]], n: int | None) -> None:
    data, cuts = case
    out = encode_chunked(data, cuts, n)
    assert out == ref_stuff(data, n)
    assert out == stuff(data, n)  # chunk invariance


@settings(max_examples=400)
@given(chunked())
def test_roundtrip_and_size(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    out = encode_chunked(data, cuts)
    assert unstuff(out) == ref_normalise(data)
    assert len(unstuff(out)) == wire_size(data)
    assert wire_size_chunks(data[a:b] for a, b in _pieces(data, cuts)) == wire_size(data)


@settings(max_examples=400)
@given(chunked(), body_lines)
def test_output_shape(case: tuple[bytes, list[int]], n: int | None) -> None:
    data, cuts = case
    out = encode_chunked(data, cuts, n)
    if out == b".\r\n":
        assert not ref_top(data, n)
        return
    assert out.endswith(b"\r\n.\r\n")
    lines = out.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert b"." not in lines[:-2]  # no early terminator
    assert all(ln.startswith(b"..") for ln in lines[:-2] if ln.startswith(b"."))
    assert b"\n" not in out.replace(b"\r\n", b"")  # every LF is part of a CRLF


def _pieces(data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *sorted(cuts), len(data)]
    return list(zip(bounds, bounds[1:]))


def test_large_message_streams_quickly() -> None:
    line = b"x" * 70 + b"\n.dot line\r\n"
    data = line * (4 * 1024 * 1024 // len(line))
    enc = DotStuffer()
    total = 0
    for i in range(0, len(data), 65536):
        total += len(enc.feed(data[i : i + 65536]))
    total += len(enc.finish())
    assert total == wire_size(data) + data.count(b"\n.") + 3


@settings(max_examples=400)
@given(chunked())
def test_the_encoders_octet_count_is_the_wire_size(case: tuple[bytes, list[int]]) -> None:
    """MessageSender checks a small RETR against its promise with this count, not a second pass."""
    data, cuts = case
    enc = DotStuffer()
    for a, b in _pieces(data, cuts):
        enc.feed(data[a:b])
    enc.finish()
    assert enc.octets == wire_size(data)


# -- the no-bare-LF fast path against the normalising path ----------------------------------


def encode_both_ways(data: bytes, cuts: list[int], body_lines: int | None = None) -> tuple[list[bytes], list[bytes]]:
    """Per chunk its output, ``octets`` and ``final_octets``; then the finish and ``octets``: of the
    default encoder and of one forced onto the normalising path from the start
    (``_line_ends = None`` is its state after a bare LF)."""
    fast, slow = DotStuffer(body_lines), DotStuffer(body_lines)
    slow._line_ends = None
    outs: tuple[list[bytes], list[bytes]] = ([], [])
    for a, b in _pieces(data, cuts):
        for enc, out in zip((fast, slow), outs):
            out.append(enc.feed(data[a:b]))
            out.append(str(enc.octets).encode())
            out.append(str(enc.final_octets).encode())
    for enc, out in zip((fast, slow), outs):
        out.append(enc.finish())
        out.append(str(enc.octets).encode())
    return outs


crlf_messages = st.lists(
    st.sampled_from([b"\r\n", b".", b"a", b"\r\n.", b"..", b"\r\n\r\n", b"\r", b"\r\r\n", b"\r\n..\r\n"]),
    max_size=40,
).map(b"".join)
# mostly CRLF, then one bare LF somewhere: the switch from one path to the other mid-message
switching = st.tuples(crlf_messages, st.sampled_from([b"\n", b"\n.", b"\r\n\n", b".\n"]), messages).map(b"".join)


@settings(max_examples=600)
@given(st.one_of(crlf_messages, switching, messages).flatmap(
    lambda data: st.tuples(st.just(data), st.lists(st.integers(0, len(data)), max_size=12))), body_lines)
def test_fast_path_gives_the_same_bytes_and_counts_as_the_normalising_path(
        case: tuple[bytes, list[int]], n: int | None) -> None:
    data, cuts = case
    fast, slow = encode_both_ways(data, cuts, n)
    assert fast == slow
    assert b"".join(fast[0::3]) == ref_stuff(data, n)  # the chunks' outputs, then the finish


@pytest.mark.parametrize(
    "chunks",
    [
        [b"a\r\n", b".b\r\n"],  # a dot line at a chunk start, after CRLF
        [b"a\r", b"\n.b\r\n"],  # CR | LF split, then a dot
        [b"a\r", b"\n", b".", b"b\r\n"],  # one byte at a time around the split
        [b"a\r", b"\r\n"],  # lone CR at the end of a chunk, CRLF next
        [b"a\r", b"b\n"],  # lone CR, then a bare LF in the next chunk
        [b"x\r\n.y\r\n", b"z\n.w"],  # CRLF chunk, then LF-only with a dot line, no final newline
        [b"\n"],  # a bare LF first
        [b"\r", b"\n"],
        [b"no final newline"],
        [b"end\r"],
        [b".", b".\r\n", b".\r\n"],
    ],
)
def test_fast_path_awkward_chunkings(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    cuts = list(itertools.accumulate(len(c) for c in chunks))[:-1]
    fast, slow = encode_both_ways(data, cuts)
    assert fast == slow
    assert b"".join(fast[0::3]) == ref_stuff(data)


def test_crlf_only_chunks_are_not_copied() -> None:
    """A CRLF chunk with no dot line goes out as the very object fed in (a stuffed one is one copy)."""
    enc = DotStuffer()
    chunk = b"Subject: x\r\n\r\n" + b"line\r\n" * 10000
    assert enc.feed(chunk) is chunk
    assert enc._line_ends is not None  # still on the fast path
    enc.feed(b"bare\n")
    assert enc._line_ends is None
