"""The replay of remembered replies (STAT, NOOP, LIST n, UIDL n) against the whole way.

A session remembers the reply of a line that ran in TRANSACTION with nothing found, and a
later identical line is answered from it after the checks that do not follow from its bytes.
Every test here runs the same input through a session that replays and one that does not
(``replay_replies = False``) and demands the same actions (replies, events, closes, busy
actions), the same transcript, the same counters and the same calls of the detector's fast
tier, in the same order: bad commands, limits reached in the middle of a batch, DELE then
STAT, RSET, a bare LF under strict_crlf, a verdict that changes between two identical lines.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3shield.core import actions as A
from pop3shield.core.settings import Action

ENTRIES = [("k1", "uid-1", 10), ("k2", "uid-2", 20), ("k3", "uid-3", 30)]


class ScriptedCheck:
    """A fast tier whose verdict may change from one call to the next (so no reply can be
    right only because the detector is assumed to be pure): clean, except that every
    ``undecided_every``-th call is undecided and every ``malicious_every``-th is malicious,
    and the markers of the shared kit. Records every call."""

    def __init__(self, kit: Any, undecided_every: int = 0, malicious_every: int = 0) -> None:
        self.kit = kit
        self.undecided_every = undecided_every
        self.malicious_every = malicious_every
        self.calls: list[tuple[bytes, str]] = []

    def __call__(self, argument: bytes, field: str) -> Any:
        self.calls.append((argument, field))
        n = len(self.calls)
        if self.malicious_every and n % self.malicious_every == 0:
            return self.kit.Verdict(True, ("scripted",))
        if self.undecided_every and n % self.undecided_every == 0:
            return None
        return self.kit.marker_check(argument, field)


#: a user whose login lines are short (8 octets with CRLF), so that small line limits can be tried
SHORT_LOGIN = b"USER a\r\nPASS p\r\n"
USERS = {"bob": b"s3cret-Pa55word", "a": b"p"}


def pair(kit: Any, settings_: Any, check: tuple[int, int] | None = (0, 0), turn_budget: int | None = None):
    """Two started drivers on the same settings: the first replays, the second does not."""
    drivers = []
    for replay in (True, False):
        quick = ScriptedCheck(kit, *check) if check is not None else None
        driver = kit.Driver(settings=settings_, entries=[kit.Entry(*e) for e in ENTRIES], quick_check=quick,
                            users=dict(USERS))
        driver.session.replay_replies = replay
        driver.session.turn_budget = turn_budget
        driver.start()
        drivers.append(driver)
    return drivers


def feed(driver: Any, chunks: list[bytes], turn_budget: int | None) -> list[list[Any]]:
    """Each chunk, then the turns the session asks for; the actions of each call."""
    steps = []
    for chunk in chunks:
        driver.session.turn_budget = turn_budget
        driver.send(chunk)
        steps.append(driver.new_actions)
        while driver.session.yielded:
            driver.session.turn_budget = turn_budget
            driver._run(driver.session.proceed)
            steps.append(driver.new_actions)
    return steps


def observed(driver: Any) -> dict[str, Any]:
    session = driver.session
    return {
        "transcript": bytes(driver.transcript),
        "state": session.state,
        "commands": session.commands,
        "toward max_commands": session._commands,
        "errors": session._errors,
        "reported": set(session.engine.reported),
        "repeats": dict(session.engine.repeats),
        "deleted": set(session._deleted),
        "checks": list(session._quick_check.calls) if session._quick_check is not None else None,
        "analyses": [a.arguments for a in driver.analyses],
        "buffered": session.buffered,
    }


def assert_same(kit: Any, settings_: Any, chunks: list[bytes], check: tuple[int, int] | None = (0, 0),
                turn_budget: int | None = None, login: bytes | None = SHORT_LOGIN) -> tuple[Any, Any]:
    fast, slow = pair(kit, settings_, check, turn_budget)
    if login is not None:
        chunks = [login, *chunks]
    assert feed(fast, chunks, turn_budget) == feed(slow, chunks, turn_budget)
    assert observed(fast) == observed(slow)
    return fast, slow


def replayed(driver: Any) -> int:
    return len(driver.session._replies or {})


# --------------------------------------------------------------------------- fixed cases

BATCH = b"STAT\r\nLIST 1\r\nUIDL 1\r\nNOOP\r\n" * 25


def test_a_pipelined_batch_is_replayed_and_gives_the_same(kit: Any) -> None:
    fast, slow = assert_same(kit, kit.make_settings(), [BATCH, BATCH])
    assert replayed(fast) == 4 and replayed(slow) == 0  # the replay did run
    assert fast.transcript.count(b"+OK 3 60\r\n") == 50


def test_dele_then_stat_and_rset(kit: Any) -> None:
    chunks = [BATCH, b"DELE 1\r\nSTAT\r\nLIST 1\r\nUIDL 1\r\nLIST 2\r\nSTAT\r\n", BATCH,
              b"RSET\r\nSTAT\r\nLIST 1\r\n", BATCH, b"DELE 3\r\n" + BATCH]
    fast, _ = assert_same(kit, kit.make_settings(), chunks)
    assert b"+OK 2 50\r\n" in fast.transcript and b"-ERR Message is deleted.\r\n" in fast.transcript


def test_the_command_limit_is_reached_in_the_middle_of_a_batch(kit: Any) -> None:
    for action in (Action.PREVENT, Action.DETECT):
        settings_ = kit.make_settings(max_commands=action, commands_after_login=37, commands_per_message=1)
        fast, _ = assert_same(kit, settings_, [BATCH, BATCH])
        assert "max_commands" in fast.session.engine.reported


def test_bad_commands_between_replayed_lines_count_to_their_limit(kit: Any) -> None:
    bad = b"STAT\r\nLIST 9\r\nNOOP\r\nFOO\r\nLIST 1\r\nUIDL x\r\nLIST 01\r\nstat\r\n"
    for action in (Action.PREVENT, Action.DETECT):
        settings_ = kit.make_settings(max_bad_commands=action, non_compliant=Action.DETECT, bad_commands_limit=4)
        fast, _ = assert_same(kit, settings_, [bad * 4])
        assert "max_bad_commands" in fast.session.engine.reported


def test_a_bare_lf_under_strict_crlf_and_without(kit: Any) -> None:
    mixed = b"STAT\r\nSTAT\nNOOP\r\nNOOP\nLIST 1\nLIST 1\r\n" * 3
    for strict in (False, True):
        for action in (Action.PREVENT, Action.DETECT):
            assert_same(kit, kit.make_settings(non_compliant=action, strict_crlf=strict), [mixed, mixed])


def test_the_line_limit_judges_the_terminator_too(kit: Any) -> None:
    # "UIDL 1" is 8 octets with CRLF and 7 with LF: at a limit of 7 only the LF line fits
    lines = b"UIDL 1\nUIDL 1\r\nUIDL 1\nNOOP\r\nUIDL 1\r\nUIDL 1\n" * 3
    for action in (Action.PREVENT, Action.DETECT):
        settings_ = kit.make_settings(max_line_length=action, line_length_limit=7)
        fast, _ = assert_same(kit, settings_, [lines], login=b"USER a\nPASS p\n")
        assert fast.session.state is not kit_state("authorization")
        assert "max_line_length" in fast.session.engine.reported


def kit_state(name: str) -> Any:
    from pop3shield.core.session import State

    return State(name)


def test_a_verdict_that_changes_between_identical_lines(kit: Any) -> None:
    for every in ((3, 0), (0, 5), (4, 7)):
        for action in (Action.PREVENT, Action.DETECT, Action.INACTIVE):
            fast, _ = assert_same(kit, kit.make_settings(malicious_code=action), [BATCH, BATCH], check=every)
            if action is not Action.INACTIVE and every[0]:
                assert fast.analyses  # undecided verdicts went to the slow tier on both sides


def test_without_a_fast_tier(kit: Any) -> None:
    assert_same(kit, kit.make_settings(), [BATCH], check=None)


def test_turns_of_a_bounded_budget(kit: Any) -> None:
    fast, _ = assert_same(kit, kit.make_settings(), [BATCH, b"DELE 2\r\n" + BATCH], turn_budget=32)
    assert replayed(fast) == 4


def test_lines_after_quit_and_listings_and_messages(kit: Any) -> None:
    chunks = [b"LIST\r\nUIDL\r\nRETR 1\r\nSTAT\r\nTOP 2 0\r\nLIST 1\r\nSTAT\r\n", BATCH,
              b"NOOP\r\nQUIT\r\nSTAT\r\nNOOP\r\n"]
    fast, _ = assert_same(kit, kit.make_settings(), chunks)
    assert fast.session.closed


def test_nothing_is_remembered_before_login(kit: Any) -> None:
    fast, _ = assert_same(kit, kit.make_settings(), [b"NOOP\r\nSTAT\r\nCAPA\r\nNOOP\r\n"], login=None)
    assert replayed(fast) == 0


def test_a_line_that_found_something_is_not_remembered(kit: Any) -> None:
    settings_ = kit.make_settings(non_compliant=Action.DETECT, strict_crlf=True)
    fast, _ = assert_same(kit, settings_, [b"NOOP\nNOOP\nNOOP\r\nNOOP\n"])
    assert "non_compliant" in fast.session.engine.reported
    assert dict(fast.session.engine.repeats) == {"non_compliant": 2}


# --------------------------------------------------------------------------- property

LINES = [b"STAT", b"NOOP", b"LIST 1", b"LIST 2", b"LIST 3", b"LIST 4", b"UIDL 1", b"UIDL 3", b"LIST 01",
         b"DELE 1", b"DELE 2", b"RSET", b"LIST", b"UIDL", b"stat", b"noop", b"List 1", b"NOOP x",
         b"LIST  1", b"LIST 1 2", b"FOO", b"LIST \x00", b"UIDL \xff", b"LIST " + b"9" * 11,
         b"UIDL SLOWPATH", b"LIST %n%n%n%n", b"RETR 2", b"TOP 1 1", b"CAPA", b"QUIT", b"",
         b"LIST " + b"1" * 300, b"\x16\x03\x01", b"GET / HTTP/1.1"]

ACTIONS = st.sampled_from([Action.PREVENT, Action.DETECT, Action.INACTIVE])


@st.composite
def streams(draw: Any) -> list[bytes]:
    lines = draw(st.lists(st.tuples(st.sampled_from(LINES), st.sampled_from([b"\r\n", b"\r\n", b"\n"])),
                          min_size=1, max_size=60))
    stream = b"".join(line + end for line, end in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if stream[a:b]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=streams(), strict=st.booleans(), mcp=ACTIONS, compliant=ACTIONS, too_many=ACTIONS,
       bad=ACTIONS, long_line=ACTIONS, commands=st.integers(1, 40), bad_limit=st.integers(0, 12),
       line_limit=st.sampled_from([255, 255, 8, 9]), check=st.sampled_from([(0, 0), (3, 0), (0, 4), (5, 7)]),
       budget=st.sampled_from([None, None, 1, 3, 32]))
def test_any_stream_gives_what_the_whole_way_gives(kit: Any, chunks: list[bytes], strict: bool, mcp: Action,
                                                   compliant: Action, too_many: Action, bad: Action,
                                                   long_line: Action, commands: int, bad_limit: int,
                                                   line_limit: int, check: tuple[int, int],
                                                   budget: int | None) -> None:
    settings_ = kit.make_settings(malicious_code=mcp, non_compliant=compliant, max_commands=too_many,
                                  max_bad_commands=bad, max_line_length=long_line, strict_crlf=strict,
                                  commands_after_login=commands, commands_per_message=0,
                                  bad_commands_limit=bad_limit, line_length_limit=line_limit)
    assert_same(kit, settings_, chunks, check, budget)


@pytest.mark.parametrize("chunked", [False, True])
def test_every_action_of_a_batch_is_the_same_object_kind(kit: Any, chunked: bool) -> None:
    """The replay emits one Send per reply, as the whole way does (the I/O layer batches them)."""
    fast, slow = pair(kit, kit.make_settings())
    chunks = [BATCH[i:i + 7] for i in range(0, len(BATCH), 7)] if chunked else [BATCH]
    for driver in (fast, slow):
        driver.login()
    a, b = feed(fast, chunks, None), feed(slow, chunks, None)
    assert replayed(fast) == 4
    assert a == b
    assert all(type(x) is A.Send for step in a for x in step)


def test_a_replay_may_cost_a_fraction_of_a_line_of_the_turn(kit: Any) -> None:
    """``replays_per_line`` replays cost one line of ``turn_budget``; a line the whole way costs one.
    The replies are those of the whole way, in order; only the turns they come in are fewer."""
    fast, slow = pair(kit, kit.make_settings())
    for driver in (fast, slow):
        driver.send(SHORT_LOGIN)
    fast.session.replays_per_line = 4
    stream = b"NOOP\r\n" * 20 + b"RSET\r\n" + b"STAT\r\n" * 9
    per_turn = []
    for driver in (fast, slow):
        driver.session.turn_budget = 3
        driver.send(stream)
        turns = [driver.transcript.count(b"\r\n")]
        while driver.session.yielded:
            driver.session.turn_budget = 3
            driver._run(driver.session.proceed)
            turns.append(driver.transcript.count(b"\r\n"))
        per_turn.append(turns)
    assert fast.transcript == slow.transcript
    # NOOP the whole way (1), then 8 replays (2); 8 replays (2), NOOP... ; RSET forgets: STAT the whole way
    before = 3  # the greeting and the login's two replies
    lines = [[b - a for a, b in zip([before, *turns], turns)] for turns in per_turn]
    assert lines[1] == [3] * 10  # the whole way: 3 lines a turn
    # turn 1: NOOP the whole way (1 line) and 8 replays (2); turn 2: the other 11 replays (2, three
    # of a quarter carried) and RSET (1), which forgets; turn 3: STAT the whole way (1) and 5
    # replays (the carried three make the first cost a line, the fifth the next); turn 4: the last 3
    assert lines[0] == [9, 12, 6, 3]
    assert observed(fast)["checks"] == observed(slow)["checks"]
