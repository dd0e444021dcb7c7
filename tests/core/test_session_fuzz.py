"""Property tests: arbitrary input in arbitrary chunks never breaks the session's promises.

For any byte stream (valid commands, random bytes, long lines, NULs, CR/LF soup, floods) cut into
any chunks, in prevent, detect and mixed modes, with a driver that answers every busy action:

* the session never raises;
* every Send is one well-formed response: a status line (``+OK``/``-ERR``/``+ ``) of at most
  512 octets ending in CRLF, or a ``+OK`` multi-line response with dot-stuffed lines and ``.``;
* nothing is sent after a Close, and a closed session accepts no more input;
* ``session.buffered`` stays within ``max(input_buffer_limit, 8192) + 2 * 2048``;
* a Commit only ever follows a QUIT, and deletes each maildrop key at most once.
"""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pop3shield.core import actions as A
from pop3shield.core.session import HARD_LINE_LIMIT
from pop3shield.core.settings import (
    PROTECTION_KEYS,
    Action,
    ProtectionsConfig,
    ProtectionSettings,
    SessionSettings,
)

PASSWORD = b"s3cret-Pa55word"
DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"
WINDOW = 2048

COMMANDS = [
    b"CAPA\r\n", b"USER bob\r\n", b"user bob\r\n", b"PASS " + PASSWORD + b"\r\n", b"PASS wrong\r\n", b"PASS\r\n",
    b"USER\r\n", b"STAT\r\n", b"LIST\r\n", b"LIST 1\r\n", b"LIST 2\r\n", b"LIST 0\r\n", b"LIST -1\r\n",
    b"UIDL\r\n", b"UIDL 1\r\n", b"UIDL 99\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"TOP 1 0\r\n", b"TOP 2 3\r\n",
    b"TOP 1 -1\r\n", b"DELE 1\r\n", b"DELE 2\r\n", b"DELE 0\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"STLS\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH CRAM-MD5\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\x00bob\x00" + PASSWORD) + b"\r\n",
    base64.b64encode(b"\x00bob\x00" + PASSWORD) + b"\r\n", base64.b64encode(b"bob") + b"\r\n",
    base64.b64encode(PASSWORD) + b"\r\n", b"*\r\n", b"=\r\n", b"AUTH PLAIN =\r\n",
    b"APOP bob " + DIGEST + b"\r\n", b"APOP bob x\r\n", b"XYZZ\r\n", b"\r\n", b"NOOP\n", b"CAPA x\r\n",
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"USER SLOWPATH\r\n",
    b"PASS SLOWPATHEVIL\r\n", b"PASS SLOWPATHNONE\r\n", b"USER \x90\x90\x90\x90\r\n", b"PASS %n%n%n%n\r\n",
    b"USER b\xffb\r\n", b"USER bob\x00\r\n", b"USER ../x\r\n",
]

element = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(COMMANDS),
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b".", b"\x00", b"A"]), max_size=30).map(b"".join),
    st.integers(min_value=240, max_value=2100).map(lambda n: b"USER " + b"a" * n + b"\r\n"),
    st.integers(min_value=2000, max_value=12000).map(lambda n: b"PASS " + b"p" * n + b"\n"),
    st.integers(min_value=100, max_value=10000).map(lambda n: b"A" * n),
    st.integers(min_value=1, max_value=12000).map(lambda n: b"NOOP\r\n" * n),
    st.just(b"F" * 70000),
)

MODES = ["prevent", "detect", "mixed"]


@st.composite
def session_settings(draw: Any) -> SessionSettings:
    mode = draw(st.sampled_from(MODES))
    if mode == "mixed":
        actions = {key: draw(st.sampled_from(list(Action))) for key in PROTECTION_KEYS}
    else:
        action = Action.PREVENT if mode == "prevent" else Action.DETECT
        actions = {key: action for key in PROTECTION_KEYS}
    protections = ProtectionsConfig(
        **{key: ProtectionSettings(value) for key, value in actions.items()},
        strict_crlf=draw(st.booleans()),
        unknown_commands=draw(st.sampled_from(["bad_command", "violation"])),
        bad_commands_limit=draw(st.sampled_from([10, 3, 1000])),
        commands_limit=draw(st.sampled_from([50, 2])),
        commands_after_login=draw(st.sampled_from([1000, 3])),
        commands_per_message=draw(st.sampled_from([5, 0, 1])),
    )
    return SessionSettings(protections=protections, apop=draw(st.booleans()),
                           input_buffer_limit=draw(st.sampled_from([65536, 1024, 20000])))


def analysis(arguments: Any) -> list[Any]:
    from types import SimpleNamespace

    out: list[Any] = []
    for arg in arguments:
        if b"NONE" in arg:
            out.append(None)
        else:
            out.append(SimpleNamespace(malicious=b"EVIL" in arg, reasons=("shellcode",) if b"EVIL" in arg else ()))
    return out


def check_status_line(line: bytes) -> None:
    assert len(line) + 2 <= 512, line[:80]
    assert b"\r" not in line and b"\n" not in line
    assert (line in (b"+OK", b"-ERR") or line.startswith((b"+OK ", b"-ERR ", b"+ "))), line[:80]


def check_send(data: bytes) -> None:
    assert data.endswith(b"\r\n"), data[-80:]
    lines = data[:-2].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, data[:200]
    check_status_line(lines[0])
    if len(lines) > 1:
        assert lines[0].startswith(b"+OK"), data[:200]
        assert lines[-1] == b".", data[-80:]
        for body in lines[1:-1]:
            assert body != b"." and (not body.startswith(b".") or body.startswith(b"..")), data[:200]


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        chunks.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        chunks.append(data[pos:])
    return chunks


@given(
    config=session_settings(),
    parts=st.lists(element, max_size=25),
    sizes=st.lists(st.one_of(st.integers(min_value=1, max_value=16), st.integers(min_value=1, max_value=70000)),
                   max_size=40),
    early=st.booleans(),
    login=st.sampled_from([b"", b"USER bob\r\nPASS " + PASSWORD + b"\r\n",
                           b"AUTH PLAIN " + base64.b64encode(b"\x00bob\x00" + PASSWORD) + b"\r\n"]),
    finish=st.sampled_from(["timeout", "lost", "none"]),
)
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_session_survives_anything(kit: Any, config: SessionSettings, parts: list[bytes], sizes: list[int],
                                   early: bool, login: bytes, finish: str) -> None:
    d = kit.Driver(settings=config, quick_check=kit.marker_check, analysis=analysis,
                   challenge=b"<1.2@localhost>", strict=False)
    data = login + b"".join(parts)
    chunks = split(data, sizes)
    if early and chunks:
        d.send(chunks.pop(0))
    d.start()
    for chunk in chunks:
        was_closed = d.session.closed
        d.send(chunk)
        if was_closed:
            assert d.new_actions == []
    if finish == "timeout":
        out = d.call("timed_out")
        if d.new_actions:
            assert out == b"-ERR Disconnected for inactivity.\r\n"
            assert d.new_actions[-1] == A.Close("timeout")
    elif finish == "lost":
        d.session.connection_lost()

    sent_after_close = False
    closed = False
    for action in d.actions:
        if isinstance(action, A.Send):
            sent_after_close |= closed
            check_send(action.data)
        elif isinstance(action, A.StreamMessage):
            check_status_line(action.status[:-2])
            assert action.status.endswith(b"\r\n")
        elif isinstance(action, A.Close):
            closed = True
    assert not sent_after_close

    event(f"closed: {closed}")
    event(f"logged in: {any(isinstance(x, A.LoggedIn) for x in d.actions)}")
    event(f"streamed: {bool(d.streams)}")
    event(f"reports: {min(len(d.reports), 3)}")
    event(f"input > 64 KiB: {len(data) > 65536}")
    bound = max(config.input_buffer_limit, HARD_LINE_LIMIT) + 2 * WINDOW
    assert d.max_buffered <= bound

    for commit in d.commits:
        assert b"QUIT" in data.upper()
        assert len(set(commit.delete)) == len(commit.delete)
        assert set(commit.delete) <= {"k1", "k2"}
    assert len(d.commits) <= 1


@given(parts=st.lists(st.sampled_from(COMMANDS[:45]), max_size=30),
       cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
       mode=st.sampled_from([Action.PREVENT, Action.DETECT]))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_chunking_does_not_change_the_conversation(kit: Any, parts: list[bytes], cuts: list[int],
                                                    mode: Action) -> None:
    """Short, well-terminated commands: one chunk or many, the transcript is the same."""
    config = SessionSettings(protections=ProtectionsConfig(
        **{key: ProtectionSettings(mode) for key in PROTECTION_KEYS}))
    data = b"".join(parts)
    whole = kit.Driver(settings=config, strict=False)
    whole.start()
    whole.send(data)
    pieces = kit.Driver(settings=config, strict=False)
    pieces.start()
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    for point in points + [len(data)]:
        pieces.send(data[prev:point])
        prev = point
    assert bytes(pieces.transcript) == bytes(whole.transcript)
    assert [type(a) for a in pieces.actions] == [type(a) for a in whole.actions]


def test_the_response_checker_rejects_malformed_responses() -> None:
    import pytest

    check_send(b"+OK\r\n")
    check_send(b"+ \r\n")
    check_send(b"+OK 2 messages\r\n1 10\r\n..x\r\n.\r\n")
    for bad in [b"+OK", b"OK\r\n", b"+OK\r\n+OK\r\n", b"+OK x\rforged\r\n", b"-ERR\n", b"+OK\r\n.x\r\n.\r\n",
                b"-ERR x\r\nbody\r\n.\r\n", b"+OK " + b"x" * 509 + b"\r\n", b"+OK\r\n.\r\n.\r\n", b"+\r\n"]:
        with pytest.raises(AssertionError):
            check_send(bad)
