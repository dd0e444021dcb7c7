"""Bounded work per turn: listings of large maildrops in chunks, a budget of lines per turn.

The core stays sans-I/O: a large LIST/UIDL is a SendListing whose chunks are made as the I/O
layer pulls them, and ``turn_budget`` stops the session after that many lines, ``yielded`` set,
until the I/O layer calls ``proceed()`` in a later turn of its loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pop3shield.core import Session, actions as A
from pop3shield.core import responses
from pop3shield.core._transaction import LISTING_CHUNK, LISTING_INLINE
from pop3shield.core.settings import SessionSettings


@dataclass(frozen=True)
class Entry:
    key: str
    uid: str
    size: int


def entries(count: int) -> list[Entry]:
    return [Entry(f"k{n}", f"uid-{n}.x", 100 + n % 17) for n in range(1, count + 1)]


def session_with(messages: list[Entry], **settings: object) -> Session:
    session = Session(SessionSettings(hostname="t.invalid", **settings), "192.0.2.1")
    session.start()
    session.receive_data(b"USER bob\r\nPASS pw\r\n")
    session.login_succeeded(messages)
    return session


def rendered(messages: list[Entry], uid: bool, deleted: set[int] = frozenset()) -> bytes:
    """What RFC 1939 fixes, built the old way (one line each through responses.multiline)."""
    lines = [f"{n} {m.uid if uid else m.size}".encode() for n, m in enumerate(messages, 1) if n not in deleted]
    return responses.multiline(responses.ok(f"{len(lines)} messages"), lines)


@pytest.mark.parametrize("uid", [False, True])
def test_a_small_listing_is_one_send(uid: bool) -> None:
    messages = entries(LISTING_INLINE)
    session = session_with(messages)
    actions = session.receive_data(b"UIDL\r\n" if uid else b"LIST\r\n")
    assert actions == [A.Send(rendered(messages, uid))]
    assert not session.busy


def test_a_listing_just_over_the_inline_size_is_one_chunk() -> None:
    messages = entries(LISTING_INLINE + 1)
    session = session_with(messages)
    (listing,) = session.receive_data(b"LIST\r\n")
    assert isinstance(listing, A.SendListing)
    assert list(listing.chunks) == [rendered(messages, False)]


@pytest.mark.parametrize("uid", [False, True])
def test_a_large_listing_is_pulled_in_chunks(uid: bool) -> None:
    messages = entries(2 * LISTING_CHUNK + 7)
    session = session_with(messages)
    session.receive_data(b"DELE 3\r\nDELE 700\r\n")
    actions = session.receive_data(b"UIDL\r\nNOOP\r\n" if uid else b"LIST\r\nNOOP\r\n")
    assert [type(a) for a in actions] == [A.SendListing]
    assert session.busy  # the NOOP waits behind the listing
    chunks = list(actions[0].chunks)
    assert len(chunks) == 3
    assert all(chunk.count(b"\r\n") <= LISTING_CHUNK + 2 for chunk in chunks)
    assert b"".join(chunks) == rendered(messages, uid, {3, 700})
    assert session.listing_sent() == [A.Send(b"+OK\r\n")]
    assert not session.busy


def test_listing_chunks_are_made_as_they_are_pulled() -> None:
    messages = entries(100 * LISTING_CHUNK)
    session = session_with(messages)
    (listing,) = session.receive_data(b"LIST\r\n")
    first = next(listing.chunks)
    assert first.startswith(b"+OK 50000 messages\r\n1 101\r\n")
    assert first.count(b"\r\n") == LISTING_CHUNK + 1 and len(first) < 8 * 1024


def test_the_turn_budget_yields_and_proceed_goes_on() -> None:
    session = session_with(entries(2))
    session.turn_budget = 3
    assert session.receive_data(b"NOOP\r\n" * 8) == [A.Send(b"+OK\r\n")] * 3
    assert session.yielded and not session.busy and session.buffered == 8 * 6 - 3 * 6
    assert session.proceed() == []  # the budget is spent: nothing runs until it is renewed
    assert session.yielded
    session.turn_budget = 3
    assert session.proceed() == [A.Send(b"+OK\r\n")] * 3
    session.turn_budget = 3
    assert session.proceed() == [A.Send(b"+OK\r\n")] * 2
    assert not session.yielded and session.turn_budget == 1


def test_a_partial_line_is_not_a_yield() -> None:
    session = session_with(entries(2))
    session.turn_budget = 1
    assert session.receive_data(b"NOOP\r\nNO") == [A.Send(b"+OK\r\n")]
    assert session.yielded  # the framer holds bytes: the I/O layer looks once more
    session.turn_budget = 1
    assert session.proceed() == []
    assert not session.yielded


def test_a_closed_session_does_not_proceed() -> None:
    session = session_with(entries(2))
    session.turn_budget = 1
    session.receive_data(b"NOOP\r\nNOOP\r\n")
    assert session.yielded
    session.connection_lost()
    assert not session.yielded
    assert session.proceed() == []


def test_no_budget_means_no_limit() -> None:
    session = session_with(entries(2))
    assert session.turn_budget is None
    assert session.receive_data(b"NOOP\r\n" * 200) == [A.Send(b"+OK\r\n")] * 200
    assert not session.yielded
